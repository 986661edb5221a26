"""Shared inference helpers: same results as the plain modules on every path."""

from __future__ import annotations

import pytest
import torch
from timm.layers import GELUTanh
from torch import nn

from visionattn.backbones._layers import inplace_act, linear_tokens, pointwise


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(2, 5, 7, 12), (3, 9, 12), (4, 12)])
def test_pointwise_matches_linear(threads: int, shape: tuple) -> None:
    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layer = nn.Linear(12, 6)
        x = torch.randn(shape)
        ref = layer(x)
        with torch.no_grad():  # the CPU-inference route (1x1 conv with > 1 thread)
            y = linear_tokens(x, layer)
            y4 = pointwise(x, layer.weight[:, :, None, None], layer.bias)  # conv-shaped weight
        assert y.shape == ref.shape and y.is_contiguous()
        assert torch.allclose(y, ref, atol=1e-6) and torch.allclose(y4, ref, atol=1e-6)
        g = linear_tokens(x.requires_grad_(), layer)  # with grad: plain F.linear
        assert g.requires_grad and torch.allclose(g, ref, atol=1e-6)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), GELUTanh(), nn.ReLU()])
def test_inplace_act(act: nn.Module) -> None:
    x = torch.randn(3, 8)
    ref = act(x.clone())
    with torch.no_grad():
        y = inplace_act(act, x.clone())
    assert torch.allclose(y, ref, atol=1e-7)
    z = inplace_act(act, x.clone().requires_grad_())  # training: out of place, differentiable
    assert z.requires_grad and torch.allclose(z, ref, atol=1e-7)

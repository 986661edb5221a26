"""Small inference helpers shared by the family files (one place for each trick)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import GELUTanh
from torch import nn

__all__ = ["AutocastLayerNorm", "inplace_act", "linear_tokens", "pointwise"]


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` over the last (channel) dim of a contiguous token tensor.

    CPU inference with more than one thread runs it as a 1x1 convolution over a channels-last
    NCHW view of the same memory (same math, output in ``x``'s layout): oneDNN's convolution
    scales with threads where the BLAS GEMM behind ``F.linear`` barely does (2 threads: ~2x
    faster on the project's CPU box). With one thread PyTorch runs a 1x1 conv on its slower
    native path, so ``F.linear`` stays; training, GPUs and torch.compile take ``F.linear`` too.
    """
    if (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and x.dim() >= 2
        and x.is_contiguous()
        and torch.get_num_threads() > 1
    ):
        w = weight if weight.dim() == 2 else weight.flatten(1)
        x4 = x.reshape(x.shape[0], -1, 1, x.shape[-1]).permute(0, 3, 1, 2)
        y = F.conv2d(x4, w.view(*w.shape, 1, 1), bias).permute(0, 2, 3, 1)
        return y.reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, weight if weight.dim() == 2 else weight.flatten(1), bias)


def linear_tokens(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` through :func:`pointwise` (channels-last ``[..., C]`` tokens)."""
    return pointwise(x, layer.weight, layer.bias)


def inplace_act(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)``; in inference a GELU overwrites ``x`` (a fresh activation nobody else holds),
    saving the allocation of the block's largest tensor."""
    if not torch.is_grad_enabled():
        if isinstance(act, GELUTanh):
            return torch.ops.aten.gelu_(x, approximate="tanh")
        if isinstance(act, nn.GELU):
            return torch.ops.aten.gelu_(x, approximate=act.approximate)
    return act(x)


class AutocastLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state-dict keys) that, under CUDA autocast, runs in
    the autocast dtype instead of autocast's float32 policy: input, weight and bias are cast to
    it and the output stays in it (statistics are still accumulated in float32 by the kernel),
    as timm's ``fast_norm`` does. Saves a float32 output and the cast before the next linear,
    which casts to that dtype anyway. Outside autocast it is plain ``nn.LayerNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            dt = torch.get_autocast_dtype("cuda")
            with torch.autocast("cuda", enabled=False):
                w = None if self.weight is None else self.weight.to(dt)
                b = None if self.bias is None else self.bias.to(dt)
                return F.layer_norm(x.to(dt), self.normalized_shape, w, b, self.eps)
        return super().forward(x)

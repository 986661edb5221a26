"""Backbone test helpers shared across families."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn


@pytest.fixture
def cuda_matches_cpu(monkeypatch: pytest.MonkeyPatch) -> Callable[[nn.Module, torch.Tensor], None]:
    """``check(model, x)``: an eval-mode CPU ``model``, its weights nudged off their init, on
    CUDA against its own CPU output: float32 within 1e-4 (TF32 off: TF32 alone is ~1e-3 off),
    a second call identical (memoised state), bf16 autocast close, and a bf16 training step
    with a finite gradient for every parameter."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    def check(model: nn.Module, x: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
            ref = model(x)
            gpu = model.cuda()
            out = gpu(x.cuda()).cpu()
            out_again = gpu(x.cuda()).cpu()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out_bf16 = gpu(x.cuda()).float().cpu()
        assert (out - ref).abs().max().item() <= 1e-4
        assert out_again.equal(out)
        assert (out_bf16 - ref).abs().max().item() <= 0.05 * ref.abs().max().item() + 0.05
        gpu.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = gpu(x.cuda()).float().logsumexp(-1).mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())

    return check

"""LayerNorm over the last dim with a chosen output dtype: public API, dispatch, autograd.

:func:`layer_norm` is ``F.layer_norm(x, (C,), weight, bias, eps)`` with float32 statistics
and affine, whose output is written directly in ``out_dtype``. Mixed-precision backbones keep
a float32 residual stream and feed each norm's output to a bfloat16 linear: one pass reads
the float32 tokens and writes the bfloat16 ones, and the backward writes the float32
gradient the stream needs.

Dispatch: the Triton kernels (:mod:`visionattn.kernels.layer_norm_triton`) for CUDA tensors in
float16/bfloat16/float32 with ``C <= 8192``; :func:`layer_norm_reference` (PyTorch) otherwise
and under ``torch.compile``, where Inductor generates its own fused norm from it.
``VISIONATTN_LN_IMPL`` (``auto``/``triton``/``reference``) overrides the choice, e.g. to run the
kernels on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import eager_call, impl_choice

__all__ = ["layer_norm", "layer_norm_reference"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON = None


def _triton_module():
    """The kernels, imported on first use (Triton decides at import time whether it
    interprets, and CPU-only installs may lack it)."""
    global _TRITON
    if _TRITON is None:
        from . import layer_norm_triton

        _TRITON = layer_norm_triton
    return _TRITON


def _use_triton(x: Tensor) -> bool:
    # called after eager_call: never while tracing
    choice = impl_choice("VISIONATTN_LN_IMPL")
    if choice == "reference" or x.dtype not in _KERNEL_DTYPES:
        return False
    if choice == "auto" and not x.is_cuda:
        return False
    try:
        tri = _triton_module()
    except Exception:  # pragma: no cover - no usable Triton in this install
        return False
    return x.shape[-1] <= tri.MAX_C


def _rows(t: Tensor, c: int) -> Tensor:
    """``t`` as ``[M, c]`` rows with unit column stride (a view when the layout allows)."""
    t2 = t.reshape(-1, c)
    return t2.contiguous() if c > 1 and t2.stride(1) != 1 else t2


def layer_norm_reference(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """The PyTorch definition of :func:`layer_norm`: statistics and affine in (at least)
    float32, then a cast to ``out_dtype``."""
    ct = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        y = F.layer_norm(
            x.to(ct),
            (x.shape[-1],),
            None if weight is None else weight.to(ct),
            None if bias is None else bias.to(ct),
            eps,
        )
    return y.to(out_dtype or x.dtype)


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):  # noqa: D102
        tri = _triton_module()
        c = x.shape[-1]
        x2 = _rows(x, c)
        y, stats = tri.forward(x2, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x2, weight, stats)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], c)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x2, weight, stats = ctx.saved_tensors
        c = x2.shape[1]
        dy2 = _rows(dy, c)
        need_dw = weight is not None and ctx.needs_input_grad[1]
        need_db = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        dx, dw, db = _triton_module().backward(dy2, x2, weight, stats, need_dw, need_db)
        if dw is not None:
            dw = dw.to(weight.dtype)
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return dx.view(ctx.x_shape), dw, db, None, None


def layer_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """LayerNorm over the last dim of ``x`` (``[..., C]``, any leading dims and strides).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance, statistics and
    affine computed in float32, ``y`` returned in ``out_dtype`` (default ``x``'s dtype), e.g.
    float32 tokens in, bfloat16 out under autocast. ``weight``/``bias``: ``[C]`` or None.
    Gradients flow to ``x`` (in ``x``'s dtype), ``weight`` and ``bias``. Autocast does not
    change the computation: ``out_dtype`` alone decides the output dtype.
    """
    if not x.is_floating_point():
        raise TypeError(f"x: must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: needs a non-empty last (normalised) dim, got shape {tuple(x.shape)}")
    c = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != c:
            raise ValueError(
                f"{name}: must have shape ({c},) to match x's last dim, got {tuple(t.shape)}"
            )
        if t.get_device() != x.get_device():
            raise ValueError(f"{name}: must be on x's device {x.device}, got {t.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: must be floating-point, got {t.dtype}")
    if not eps >= 0.0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype: must be a floating-point dtype, got {out_dtype}")
    out_dtype = out_dtype or x.dtype
    if not eager_call(x) or not _use_triton(x):
        return layer_norm_reference(x, weight, bias, eps, out_dtype)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        return _LayerNormFn.apply(x, weight, bias, float(eps), out_dtype)
    # inference: no autograd node, no saved statistics kept
    c = x.shape[-1]
    y = _triton_module().forward(_rows(x, c), weight, bias, float(eps), out_dtype, stats=False)[0]
    return y.view(*x.shape[:-1], c)

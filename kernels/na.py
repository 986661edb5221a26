"""Neighbourhood (local) attention: public API, validation, dispatch, custom ops, autograd.

``na1d/na2d/na3d`` cover NAT/DiNAT (clamped, dilated, relative-position bias), MaxViT block
(``kernel_size=stride=window``) and grid (``kernel_size=stride=grid``,
``dilation=size//grid``), HaloNet (``kernel_size=block+2*halo``, ``stride=block``,
``border="zero"``) and other windowed attention. Window semantics are documented in
:mod:`visionattn.kernels._common` and in :func:`na2d`.

The computation runs through two ``torch.library`` custom ops (``visionattn::na_fwd`` and
``visionattn::na_bwd``) with fake implementations, so ``torch.compile(fullgraph=True)`` traces
through them. Each op picks its implementation from the device: the Triton kernels on CUDA
(float16/bfloat16/float32), the chunked PyTorch reference elsewhere (and for float64). The
environment variable ``VISIONATTN_NA_IMPL`` (``auto``/``triton``/``reference``) overrides
the choice, e.g. to run the Triton kernels on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import CheckMemo, NAParams, check_na_args, eager_call, impl_choice, window_tables
from .na_reference import reference_backward, reference_forward

try:  # Triton is optional (CPU-only installs); the reference covers every case.
    from . import na_triton as _tri
except Exception:  # pragma: no cover - depends on the install
    _tri = None

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention"]


def _use_triton(q: Tensor, k: Tensor, v: Tensor, p: NAParams) -> bool:
    choice = impl_choice("VISIONATTN_NA_IMPL")
    if choice == "reference" or _tri is None or q.dtype == torch.float64:
        return False
    if choice == "triton":
        return True
    return q.is_cuda and _tri.supported(q, k, v, p.kernel_size)


def _params(
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    is_causal: Sequence[bool],
    zero_border: bool,
    scale: float,
) -> NAParams:
    return NAParams(
        tuple(kernel_size), tuple(stride), tuple(dilation), tuple(is_causal), zero_border, scale
    )


@functools.lru_cache(maxsize=256)
def _cached_rel(spatial: tuple[int, ...], p: NAParams, device: str) -> Tensor:
    # Built outside inference mode: a cached inference tensor would poison every later
    # training step that saves it for backward.
    with torch.inference_mode(False):
        return window_tables(spatial, p, device)[3]


def _rel_table(spatial: tuple[int, ...], p: NAParams, device: torch.device) -> Tensor:
    """``[N, K]`` flat index of each (query, window position) into the rpb table."""
    if torch.compiler.is_compiling():
        return window_tables(spatial, p, device)[3]
    return _cached_rel(spatial, p._replace(scale=1.0), str(device))


def _bias4(q: Tensor, p: NAParams, attn_bias: Tensor | None) -> Tensor | None:
    """attn_bias ``[B|1, h|1, *spatial, *kernel]`` viewed as ``[B|1, h|1, N, K]``."""
    if attn_bias is None:
        return None
    n = math.prod(q.shape[1:-2])
    return attn_bias.reshape(attn_bias.shape[0], attn_bias.shape[1], n, math.prod(p.kernel_size))


def _combined_bias(q: Tensor, p: NAParams, rpb: Tensor | None, attn_bias: Tensor | None):
    """rpb (gathered into window layout) + attn_bias as one ``[B|1, h|1, N, K]`` logit bias:
    the reference's input (the Triton kernels read the rpb table in place)."""
    bias = None
    if rpb is not None:
        rel = _rel_table(tuple(q.shape[1:-2]), p, q.device)
        bias = rpb.reshape(rpb.shape[0], -1)[:, rel].unsqueeze(0)  # [1, h, N, K]
    ab = _bias4(q, p, attn_bias)
    if ab is not None:
        # rpb + attn_bias summed in float32: a half-precision sum would round the logits
        if bias is None:
            bias = ab
        else:
            ct = torch.promote_types(torch.promote_types(bias.dtype, ab.dtype), torch.float32)
            bias = bias.to(ct) + ab.to(ct)
    return bias


def _forward_impl(
    q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, attn_bias: Tensor | None, p: NAParams
) -> tuple[Tensor, Tensor]:
    if _use_triton(q, k, v, p):
        try:
            return _tri.forward(q, k, v, rpb, _bias4(q, p, attn_bias), p)
        except _tri.OutOfResources as exc:
            _warn_fallback(exc)
    return reference_forward(q, k, v, _combined_bias(q, p, rpb, attn_bias), p)


def _warn_fallback(exc: Exception) -> None:
    # A kernel variant that needs more shared memory than the GPU has (seen on H200 only for
    # float32 with 128-wide heads and a gathered bias) raises before it launches, so nothing
    # ran: the reference computes the same result, slower.
    warnings.warn(
        f"visionattn na: Triton kernel out of resources ({exc}); using the PyTorch reference "
        "for this call",
        RuntimeWarning,
        stacklevel=3,
    )


def _backward_impl(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    rpb: Tensor | None,
    attn_bias: Tensor | None,
    p: NAParams,
    need_drpb: bool,
    need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients ``(dq, dk, dv, drpb, dattn_bias)`` (None where not needed).

    d lse / d logits = P, so an lse gradient only shifts the row term of
    dS = P * (dP - delta): both implementations use delta = sum(dout * out) - dlse. The logit
    gradient dS in window layout is attn_bias's gradient (summed over its broadcast dims);
    rpb's is dS summed over the batch and scattered onto the table by the relative index.
    """
    need_ds = need_drpb or need_dbias
    ab4 = _bias4(q, p, attn_bias)
    tri_ok = _use_triton(q, k, v, p)
    if tri_ok:
        try:
            dq, dk, dv, ds, drpb_flat = _tri.backward(
                dout, dlse, q, k, v, out, lse, rpb, ab4, p, need_drpb, need_dbias
            )  # fmt: skip
        except _tri.OutOfResources as exc:
            _warn_fallback(exc)
            tri_ok = False
    if not tri_ok:
        bias = _combined_bias(q, p, rpb, attn_bias)
        dq, dk, dv, ds = reference_backward(q, k, v, out, lse, dout, dlse, bias, p, need_ds)
        drpb_flat = None
    drpb = dbias = None
    if need_dbias:
        dsb = ds
        if ab4.shape[0] == 1 and dsb.shape[0] != 1:
            dsb = dsb.sum(0, keepdim=True)
        if ab4.shape[1] == 1 and dsb.shape[1] != 1:
            dsb = dsb.sum(1, keepdim=True)
        dbias = dsb.to(attn_bias.dtype).reshape(attn_bias.shape)
    if need_drpb and drpb_flat is not None:
        drpb = drpb_flat.reshape(rpb.shape).to(rpb.dtype)
    elif need_drpb:
        h = rpb.shape[0]
        dsum = ds[0] if ds.shape[0] == 1 else ds.sum(0)  # [h, N, K]
        rel = _rel_table(tuple(q.shape[1:-2]), p, q.device).reshape(-1)
        acc = torch.zeros(h, rpb[0].numel(), dtype=torch.float32, device=q.device)
        acc.index_add_(1, rel, dsum.reshape(h, -1))
        drpb = acc.reshape(rpb.shape).to(rpb.dtype)
    return dq, dk, dv, drpb, dbias


@torch.library.custom_op("visionattn::na_fwd", mutates_args=())
def _na_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor | None,
    attn_bias: Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    is_causal: Sequence[bool],
    zero_border: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    p = _params(kernel_size, stride, dilation, is_causal, zero_border, scale)
    return _forward_impl(q, k, v, rpb, attn_bias, p)


@_na_fwd.register_fake
def _na_fwd_fake(
    q, k, v, rpb, attn_bias, kernel_size, stride, dilation, is_causal, zero_border, scale
):  # fmt: skip
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("visionattn::na_bwd", mutates_args=())
def _na_bwd(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    rpb: Tensor | None,
    attn_bias: Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    is_causal: Sequence[bool],
    zero_border: bool,
    scale: float,
    need_drpb: bool,
    need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    p = _params(kernel_size, stride, dilation, is_causal, zero_border, scale)
    dq, dk, dv, drpb, dbias = _backward_impl(
        dout, dlse, q, k, v, out, lse, rpb, attn_bias, p, need_drpb, need_dbias
    )  # fmt: skip
    # a custom op returns tensors: empty ones stand for "no gradient"
    if drpb is None:
        drpb = q.new_empty(0)
    if dbias is None:
        dbias = q.new_empty(0)
    return dq, dk, dv, drpb, dbias


@_na_bwd.register_fake
def _na_bwd_fake(
    dout, dlse, q, k, v, out, lse, rpb, attn_bias, kernel_size, stride, dilation, is_causal,
    zero_border, scale, need_drpb, need_dbias,
):  # fmt: skip
    drpb = rpb.new_empty(rpb.shape) if need_drpb else q.new_empty(0)
    dbias = attn_bias.new_empty(attn_bias.shape) if need_dbias else q.new_empty(0)
    # every implementation returns contiguous gradients
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), drpb, dbias


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, attn_bias, kernel_size, stride, dilation, is_causal, zero_border, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rpb, attn_bias)
    ctx.args = (list(kernel_size), list(stride), list(dilation), list(is_causal), zero_border)
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, rpb, attn_bias = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    need_drpb = rpb is not None and ctx.needs_input_grad[3]
    need_dbias = attn_bias is not None and ctx.needs_input_grad[4]
    dq, dk, dv, drpb, dbias = _na_bwd(
        dout, dlse, q, k, v, out, lse, rpb, attn_bias, *ctx.args, ctx.scale, need_drpb, need_dbias
    )  # fmt: skip
    return (
        dq, dk, dv, drpb if need_drpb else None, dbias if need_dbias else None,
        None, None, None, None, None, None,
    )  # fmt: skip


torch.library.register_autograd("visionattn::na_fwd", _backward, setup_context=_setup_context)


class _NAFunction(torch.autograd.Function):
    """Eager path: the same implementations as the custom ops, without their dispatch.

    ``torch.library`` custom ops cost a few hundred microseconds of host time per call (schema
    parsing of the arguments, the autograd wrapper, redispatch); models with many small
    windowed-attention calls (EfficientViT: 84 per step) were host-bound on it. Outside
    ``torch.compile`` this Function calls the implementation directly; under compile the
    custom ops are used so the graph still traces through them.
    """

    @staticmethod
    def forward(ctx, q, k, v, rpb, attn_bias, p: NAParams):  # noqa: D102 - see class doc
        out, lse = _forward_impl(q, k, v, rpb, attn_bias, p)
        ctx.save_for_backward(q, k, v, out, lse, rpb, attn_bias)
        ctx.p = p
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # noqa: D102
        q, k, v, out, lse, rpb, attn_bias = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        need_drpb = rpb is not None and ctx.needs_input_grad[3]
        need_dbias = attn_bias is not None and ctx.needs_input_grad[4]
        dq, dk, dv, drpb, dbias = _backward_impl(
            dout, dlse, q, k, v, out, lse, rpb, attn_bias, ctx.p, need_drpb, need_dbias
        )  # fmt: skip
        return dq, dk, dv, drpb, dbias, None


_checked_params = CheckMemo()  # memoised check_na_args (see CheckMemo)


def neighborhood_attention(
    n_dims: int,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
    rpb: Tensor | None = None,
    attn_bias: Tensor | None = None,
    scale: float | None = None,
    border: str = "clamp",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Rank-generic entry point behind :func:`na1d`, :func:`na2d` and :func:`na3d`."""
    if n_dims not in (1, 2, 3):
        raise ValueError(f"n_dims must be 1, 2 or 3, got {n_dims}")
    p = _checked_params(
        check_na_args, n_dims, q, k, v, kernel_size, stride, dilation, is_causal, rpb,
        attn_bias, scale, border,
    )  # fmt: skip
    # the custom op (fake impl, autograd registration) while tracing, for tensor subclasses
    # and under dispatch modes; the cheaper autograd.Function for plain eager training calls
    if not eager_call(q):
        out, lse = _na_fwd(
            q, k, v, rpb, attn_bias, list(p.kernel_size), list(p.stride), list(p.dilation),
            list(p.is_causal), p.zero_border, p.scale,
        )  # fmt: skip
    elif torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, rpb, attn_bias)
    ):
        out, lse = _NAFunction.apply(q, k, v, rpb, attn_bias, p)
    else:  # inference: no autograd node at all
        out, lse = _forward_impl(q, k, v, rpb, attn_bias, p)
    return (out, lse) if return_lse else out


_DOC = """{n}-D neighbourhood attention.

    Args:
        q, k: ``[B, {dims}, heads, head_dim]``; v: ``[B, {dims}, heads, head_dim_v]`` (v may have
            its own head dim). Any strides (e.g. views of a fused qkv projection). Same dtype
            (float16/bfloat16/float32/float64) and device.
        kernel_size: window size per axis (int or tuple).
        stride: queries in a stride group (``i' // stride``) share the window of the group's
            leader. ``kernel_size == stride`` gives non-overlapping windows (MaxViT block,
            Swin-style); adding ``dilation = size // window`` gives MaxViT's grid attention.
        dilation: queries and keys interact only inside dilation groups ``i % dilation``.
        is_causal: per-axis causal masking (keys after the query along that axis are masked).
        rpb: optional relative-position bias table ``[heads, {tbl}]`` indexed by
            ``(key - query) / dilation + kernel_size - 1`` per axis (NATTEN <= 0.17
            convention); differentiable.
        attn_bias: optional additive logit bias ``[B or 1, heads or 1, {dims}, {ks}]``: one value
            per (query, window position), window positions in the row-major order of the
            window's keys (offset from the window start along each axis); differentiable.
        scale: logit scale, default ``head_dim ** -0.5``.
        border: ``"clamp"`` (NATTEN: the window is shifted inside the map, every query sees
            ``kernel_size`` keys) or ``"zero"`` (the window is centred on the query/stride
            leader without shifting; positions outside the map are zero keys and values that
            stay in the softmax, as with zero padding: HaloNet, padded windows). With
            ``"zero"`` and a stride that does not divide the map, the leader of the last,
            partial stride group is the centre of the full stride tile, so windows keep tiling
            the map.
        return_lse: also return the natural-log sum-exp of the scaled logits,
            ``[B, {dims}, heads]`` float32, for :func:`merge_attentions`.

    Returns:
        ``out [B, {dims}, heads, head_dim_v]`` (q's dtype), and ``lse`` if ``return_lse``.
    """


def na1d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
    rpb: Tensor | None = None,
    attn_bias: Tensor | None = None,
    scale: float | None = None,
    border: str = "clamp",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    return neighborhood_attention(
        1, q, k, v, kernel_size, stride, dilation, is_causal, rpb, attn_bias, scale, border,
        return_lse,
    )  # fmt: skip


def na2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
    rpb: Tensor | None = None,
    attn_bias: Tensor | None = None,
    scale: float | None = None,
    border: str = "clamp",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    return neighborhood_attention(
        2, q, k, v, kernel_size, stride, dilation, is_causal, rpb, attn_bias, scale, border,
        return_lse,
    )  # fmt: skip


def na3d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
    rpb: Tensor | None = None,
    attn_bias: Tensor | None = None,
    scale: float | None = None,
    border: str = "clamp",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    return neighborhood_attention(
        3, q, k, v, kernel_size, stride, dilation, is_causal, rpb, attn_bias, scale, border,
        return_lse,
    )  # fmt: skip


na1d.__doc__ = _DOC.format(n=1, dims="L", tbl="2k-1", ks="k")
na2d.__doc__ = _DOC.format(n=2, dims="H, W", tbl="2kh-1, 2kw-1", ks="kh, kw")
na3d.__doc__ = _DOC.format(n=3, dims="D, H, W", tbl="2kd-1, 2kh-1, 2kw-1", ks="kd, kh, kw")

"""Routed (block-sparse) attention over 2-D tiles, the op behind BiFormer's bi-level routing.

Each query tile (a rectangular region of the 2-D query map) attends to the union of the key
tiles listed for it, reading those tiles in place: no top-k copy of K/V is ever materialised.

Public entry point: :func:`routed_attention`.  It validates its inputs, then calls the
``visionattn::routed_attn_fwd`` custom op (``torch.library.custom_op`` with a fake impl, so
``torch.compile`` traces it without graph breaks); autograd goes through
``visionattn::routed_attn_bwd``.  Both ops dispatch by device: Triton kernels on CUDA
(:mod:`visionattn.kernels.routed_triton`), the chunked pure-PyTorch reference elsewhere
(:mod:`visionattn.kernels.routed_reference`).  ``VISIONATTN_ROUTED_IMPL``
(``auto``/``triton``/``reference``) overrides the choice; ``float64`` always takes the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import CheckMemo, eager_call, impl_choice
from .routed_reference import routed_bwd_reference, routed_fwd_reference

__all__ = ["routed_attention", "routed_tiles"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# float64 (gradcheck, oracles) always takes the reference path.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------- dispatch
def _triton_module():
    """The Triton implementation, imported lazily (triton decides at import time whether it
    interprets, so tests can load an interpreted copy and install it here)."""
    global _TRITON
    if _TRITON is None:
        from . import routed_triton

        _TRITON = routed_triton
    return _TRITON


_TRITON = None


def _use_triton(x: torch.Tensor) -> bool:
    if x.dtype not in _KERNEL_DTYPES:
        return False
    choice = impl_choice("VISIONATTN_ROUTED_IMPL")
    if choice == "reference":
        return False
    if choice == "triton":  # CPU tensors only work with an interpreted (TRITON_INTERPRET=1) copy
        return True
    if not x.is_cuda:
        return False
    try:
        _triton_module()
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- custom ops
def _fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    t: tuple[int, int, int, int],
    scale: float,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # need_lse=False (inference without return_lse) returns an empty lse and skips writing it
    if _use_triton(q):
        return _triton_module().routed_fwd(q, k, v, indices, t, scale, need_lse)
    out, lse = routed_fwd_reference(q, k, v, indices, t, scale)
    return out.contiguous(), (lse.contiguous() if need_lse else lse.new_empty(0))


def _bwd_impl(dout, q, k, v, indices, out, lse, dlse, t, scale):
    if _use_triton(q):
        return _triton_module().routed_bwd(dout, q, k, v, indices, out, lse, dlse, t, scale)
    dq, dk, dv = routed_bwd_reference(dout, q, k, v, indices, out, lse, dlse, t, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@torch.library.custom_op("visionattn::routed_attn_fwd", mutates_args=())
def _routed_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    tiles: Sequence[int],
    scale: float,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    t = (int(tiles[0]), int(tiles[1]), int(tiles[2]), int(tiles[3]))
    return _fwd_impl(q, k, v, indices, t, scale, need_lse)


@_routed_fwd_op.register_fake
def _(q, k, v, indices, tiles, scale, need_lse):
    b, hq, wq, nheads, _ = q.shape
    out = q.new_empty((b, hq, wq, nheads, v.shape[-1]))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse_shape = (b, hq, wq, nheads) if need_lse else (0,)
    lse = q.new_empty(lse_shape, dtype=lse_dtype)
    return out, lse


@torch.library.custom_op("visionattn::routed_attn_bwd", mutates_args=())
def _routed_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    tiles: Sequence[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = (int(tiles[0]), int(tiles[1]), int(tiles[2]), int(tiles[3]))
    return _bwd_impl(dout, q, k, v, indices, out, lse, dlse, t, scale)


@_routed_bwd_op.register_fake
def _(dout, q, k, v, indices, out, lse, dlse, tiles, scale):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, indices, tiles, scale, _ = inputs
    out, lse = output
    # an unused lse output then arrives as None, not as a materialised zero tensor
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, indices, out, lse)
    ctx.tiles = tiles
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    q, k, v, indices, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _routed_bwd_op(dout, q, k, v, indices, out, lse, dlse, ctx.tiles, ctx.scale)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd(
    "visionattn::routed_attn_fwd", _backward, setup_context=_setup_context
)


class _RoutedEager(torch.autograd.Function):
    """The same forward/backward as the custom ops, for plain eager calls: a
    ``torch.autograd.Function`` straight onto the implementations costs a fraction of the
    custom-op dispatch (which ``torch.compile`` needs, and keeps)."""

    @staticmethod
    def forward(ctx, q, k, v, indices, tiles, scale, need_lse):
        # the backend is chosen once, here; the backward reuses the choice
        tri = _triton_module() if _use_triton(q) else None
        if tri is not None:
            out, lse = tri.routed_fwd(q, k, v, indices, tiles, scale, need_lse)
        else:
            out, lse = _fwd_impl(q, k, v, indices, tiles, scale, need_lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, indices, out, lse)
        ctx.args = (tiles, scale, tri)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, indices, out, lse = ctx.saved_tensors
        tiles, scale, tri = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        if tri is not None:
            dq, dk, dv = tri.routed_bwd(dout, q, k, v, indices, out, lse, dlse, tiles, scale)
        else:
            dq, dk, dv = _bwd_impl(dout, q, k, v, indices, out, lse, dlse, tiles, scale)
        return dq, dk, dv, None, None, None, None


# --------------------------------------------------------------------------- validation
def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2:
        pair = (value[0], value[1])
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    for p in pair:
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        if p < 1:
            raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


def routed_tiles(
    q_hw: tuple[int, int],
    kv_hw: tuple[int, int],
    *,
    n_win: int | Sequence[int] | None = None,
    tile_size: int | Sequence[int] | None = None,
    kv_tile_size: int | Sequence[int] | None = None,
) -> tuple[int, int, int, int]:
    """Resolve the tile grid to ``(th, tw, kth, ktw)`` tile shapes for the query and kv maps.

    Give exactly one of ``n_win`` (tiles per axis, int or ``(rows, cols)``; both maps are cut
    into that grid, as BiFormer does) or ``tile_size`` (query tile shape in pixels).  The kv
    tiles default to the same grid as the query tiles (``kv_hw / grid``); ``kv_tile_size``
    overrides that, letting the kv map have its own number of tiles.  Raises ``ValueError`` if
    a map is not divisible by its grid (pad first, e.g. with :func:`~visionattn.kernels.pad_to_grid`).
    """
    if (n_win is None) == (tile_size is None):
        raise ValueError("give exactly one of n_win (tiles per axis) or tile_size (tile shape)")
    hq, wq = q_hw
    hk, wk = kv_hw
    if n_win is not None:
        nh, nw = _pair("n_win", n_win)
        if hq % nh or wq % nw:
            raise ValueError(
                f"query map {hq}x{wq} is not divisible by n_win={nh}x{nw}; pad it to a multiple "
                "of the grid first (auto_pad / pad_to_grid)"
            )
        th, tw = hq // nh, wq // nw
    else:
        th, tw = _pair("tile_size", tile_size)
        if hq % th or wq % tw:
            raise ValueError(
                f"query map {hq}x{wq} is not divisible by tile_size={th}x{tw}; pad it first"
            )
        nh, nw = hq // th, wq // tw
    if kv_tile_size is not None:
        kth, ktw = _pair("kv_tile_size", kv_tile_size)
        if hk % kth or wk % ktw:
            raise ValueError(
                f"key/value map {hk}x{wk} is not divisible by kv_tile_size={kth}x{ktw}"
            )
    else:
        if hk % nh or wk % nw:
            raise ValueError(
                f"key/value map {hk}x{wk} is not divisible by the tile grid {nh}x{nw}; pass "
                "kv_tile_size or pad it"
            )
        kth, ktw = hk // nh, wk // nw
    return th, tw, kth, ktw


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor
) -> tuple[int, int, int, int, int]:
    for name, t in (("q", q), ("k", k), ("v", v), ("indices", indices)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 5:
            raise ValueError(
                f"{name} must be [B, H, W, heads, head_dim], got shape {tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == indices.device):
        raise ValueError(
            f"q, k, v, indices must be on one device, got {q.device}, {k.device}, {v.device}, "
            f"{indices.device}"
        )
    b, _, _, nheads, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != nheads or v.shape[3] != nheads:
        raise ValueError(f"head counts differ: q {nheads}, k {k.shape[3]}, v {v.shape[3]}")
    if k.shape[4] != d:
        raise ValueError(f"k head_dim {k.shape[4]} must equal q head_dim {d}")
    # (torch.Size comparisons go through symbolic-shape helpers: compare plain tuples)
    if (k.shape[1], k.shape[2]) != (v.shape[1], v.shape[2]):
        raise ValueError(
            f"k and v must share their spatial size, got {tuple(k.shape[1:3])} and "
            f"{tuple(v.shape[1:3])}"
        )
    if min(q.shape) == 0 or min(k.shape) == 0 or min(v.shape) == 0:
        raise ValueError("q, k, v must not be empty")
    if indices.dtype not in _INT_DTYPES:
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if indices.dim() not in (3, 4):
        raise ValueError(
            "indices must be [B, n_query_tiles, topk] (shared by heads) or "
            f"[B, heads, n_query_tiles, topk], got shape {tuple(indices.shape)}"
        )
    return b, nheads, d, v.shape[4], indices.shape[-1]


_checked = CheckMemo()  # memoised _check_all: shapes, dtypes, devices and grid arguments


def _check_all(q, k, v, indices, n_win, tile_size, kv_tile_size):
    """Every shape/dtype/device check of :func:`routed_attention`; returns
    ``(head_dim, (th, tw, kth, ktw), n_kv_tiles)``."""
    b, nheads, d, _, topk = _check_inputs(q, k, v, indices)
    th, tw, kth, ktw = routed_tiles(
        (q.shape[1], q.shape[2]),
        (k.shape[1], k.shape[2]),
        n_win=n_win,
        tile_size=tile_size,
        kv_tile_size=kv_tile_size,
    )
    n_q_tiles = (q.shape[1] // th) * (q.shape[2] // tw)
    n_kv_tiles = (k.shape[1] // kth) * (k.shape[2] // ktw)
    shape = tuple(indices.shape)
    if indices.dim() == 3:
        shape = (shape[0], 1, *shape[1:])
    if shape[0] != b or shape[1] not in (1, nheads) or shape[2] != n_q_tiles:
        raise ValueError(
            f"indices must be [B={b}, T={n_q_tiles}, topk] or [B={b}, heads={nheads}, "
            f"T={n_q_tiles}, topk] for this tile grid, got shape {tuple(indices.shape)}"
        )
    if topk < 1:
        raise ValueError("indices must list at least one kv tile per query tile (topk >= 1)")
    return d, (th, tw, kth, ktw), n_kv_tiles


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    n_win: int | Sequence[int] | None = None,
    tile_size: int | Sequence[int] | None = None,
    kv_tile_size: int | Sequence[int] | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    check_indices: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query tile over the key tiles routed to it.

    Args:
        q: ``[B, Hq, Wq, heads, D]`` queries (heads-last; any strides, e.g. a view of a fused
            qkv projection).
        k: ``[B, Hk, Wk, heads, D]`` keys; the kv map may have its own spatial size.
        v: ``[B, Hk, Wk, heads, Dv]`` values; ``Dv`` may differ from ``D``.
        indices: int32/int64 ``[B, T, topk]`` (shared by all heads, as BiFormer routes) or
            ``[B, heads, T, topk]`` (per head).  ``T = rows * cols`` query tiles in row-major
            order; entries are kv tile numbers, row-major in the kv grid.  Order does not matter;
            a tile listed twice has its keys counted twice in the softmax (identical to gathering
            it twice).  No gradient flows through them.
        n_win: tiles per axis (int or ``(rows, cols)``), applied to both maps (BiFormer's
            ``n_win``).  Exclusive with ``tile_size``.
        tile_size: query tile shape ``(th, tw)`` in pixels.
        kv_tile_size: kv tile shape; defaults to the query grid laid over the kv map.
        scale: logit scale; default ``D ** -0.5``.  BiFormer uses ``qk_dim ** -0.5`` with the
            full (all heads) qk width: pass it explicitly.
        return_lse: also return the float32 log-sum-exp of the scaled logits, ``[B, Hq, Wq, heads]``
            (differentiable).
        check_indices: verify ``0 <= indices < n_kv_tiles`` (one device sync on CUDA; skipped
            while compiling).  Callers that build indices by top-k may pass False.

    Returns:
        ``out [B, Hq, Wq, heads, Dv]`` in q's dtype, and ``lse`` if ``return_lse``.
    """
    compiling = torch.compiler.is_compiling()
    checked = _checked(_check_all, q, k, v, indices, n_win, tile_size, kv_tile_size)
    d, tiles, n_kv_tiles = checked
    if check_indices and not compiling:
        bad = ((indices < 0) | (indices >= n_kv_tiles)).any()
        if bool(bad):
            raise ValueError(
                f"indices out of range: every entry must be in [0, {n_kv_tiles}) "
                f"(number of kv tiles), got min {int(indices.min())}, max {int(indices.max())}"
            )
    if scale is None:
        scale = d**-0.5
    scale = float(scale)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    need_lse = return_lse or grad
    # the custom op (fake impls, autograd registration) while tracing, for tensor subclasses
    # and under dispatch modes; the cheaper autograd.Function for plain eager calls
    if not eager_call(q):
        out, lse = _routed_fwd_op(q, k, v, indices, list(tiles), scale, need_lse)
    elif grad:
        out, lse = _RoutedEager.apply(q, k, v, indices, tiles, scale, need_lse)
    else:  # inference: no autograd node at all
        out, lse = _fwd_impl(q, k, v, indices, tiles, scale, need_lse)
    if return_lse:
        return out, lse
    return out

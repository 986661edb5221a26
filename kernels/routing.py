"""Region routing for bi-level routing attention (BiFormer), and the pad/attend/crop helper.

Semantics follow BiFormer's ``BiLevelRoutingAttention`` (ops/bra_legacy.py of
https://github.com/rayleizhu/BiFormer): both maps are cut into an ``n_win x n_win`` grid of
regions; region descriptors are the means of q and k over each region, taken over the full
qk width (all heads concatenated); the region affinity is ``(q_r * scale) @ k_r^T`` with
``scale = qk_dim ** -0.5``; each query region keeps the ``topk`` most affine key regions
(``torch.topk``, so in descending affinity), shared by every head.  Routing is
non-differentiable by default (``detach=True``, BiFormer's ``diff_routing=False``), and the
routing weights (softmax over the kept logits) are not applied to the values (BiFormer's
``mul_weight='none'``, used by all released models); they are returned on request.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .routed import _pair, routed_attention

__all__ = ["bra_attention", "bra_route", "crop_from_grid", "pad_to_grid", "region_pool"]


def _grid(n_win: int | Sequence[int]) -> tuple[int, int]:
    return _pair("n_win", n_win)


def region_pool(x: torch.Tensor, n_win: int | Sequence[int]) -> torch.Tensor:
    """Mean of ``x [B, H, W, ...]`` over each region of an ``n_win`` grid -> ``[B, T, C]``.

    Trailing dims are flattened into ``C`` (``[B, H, W, heads, D]`` gives the full width
    ``heads * D``, as BiFormer pools its un-split q/k).  Regions are row-major.
    """
    if x.dim() < 3:
        raise ValueError(f"x must be [B, H, W, ...], got shape {tuple(x.shape)}")
    nh, nw = _grid(n_win)
    b, h, w = x.shape[:3]
    if h % nh or w % nw:
        raise ValueError(f"map {h}x{w} is not divisible by n_win={nh}x{nw}; pad it first")
    x = x.reshape(b, nh, h // nh, nw, w // nw, -1)
    return x.mean(dim=(2, 4)).reshape(b, nh * nw, -1)


def bra_route(
    q: torch.Tensor,
    k: torch.Tensor,
    n_win: int | Sequence[int],
    topk: int,
    scale: float | None = None,
    *,
    detach: bool = True,
    per_head: bool = False,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """BiFormer's top-k region routing.

    Args:
        q, k: ``[B, H, W, heads, D]`` (or ``[B, H, W, C]``) queries and keys; their maps may
            differ in size but both are cut into the same ``n_win`` grid.
        n_win: regions per axis (int or ``(rows, cols)``).
        topk: regions kept per query region, ``1 <= topk <= n_regions``.
        scale: affinity scale; default ``(heads * D) ** -0.5`` (BiFormer's ``qk_dim ** -0.5``).
        detach: route on detached q/k (BiFormer's default ``diff_routing=False``).
        per_head: route every head on its own slice of the region means (returns
            ``[B, heads, T, topk]``); False shares one routing over the full width.
        return_weights: also return the softmax over the kept logits (BiFormer's ``r_weight``).

    Returns:
        int64 indices ``[B, T, topk]`` (or ``[B, heads, T, topk]`` with ``per_head``), sorted by
        decreasing affinity, and the weights (same shape, q's dtype) if requested.
    """
    if q.dim() not in (4, 5) or k.dim() != q.dim():
        raise ValueError(
            f"q and k must both be [B, H, W, heads, D] or [B, H, W, C], got {tuple(q.shape)} "
            f"and {tuple(k.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3:] != k.shape[3:]:
        raise ValueError(
            f"q and k must share batch and channel dims, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if per_head and q.dim() != 5:
        raise ValueError("per_head routing needs q, k as [B, H, W, heads, D]")
    nh, nw = _grid(n_win)
    n_regions = nh * nw
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= n_regions:
        raise ValueError(f"topk must be an int in [1, {n_regions}] (n_win^2 regions), got {topk!r}")
    if detach:
        q, k = q.detach(), k.detach()
    if scale is None:
        width = q.shape[3] * (q.shape[4] if q.dim() == 5 else 1)
        scale = width**-0.5
    q_r = region_pool(q, (nh, nw))
    k_r = region_pool(k, (nh, nw))
    if per_head:
        heads, d = q.shape[3], q.shape[4]
        q_r = q_r.reshape(q.shape[0], n_regions, heads, d).transpose(1, 2)
        k_r = k_r.reshape(k.shape[0], n_regions, heads, d).transpose(1, 2)
    logits = torch.matmul(q_r * scale, k_r.transpose(-1, -2))
    top_logits, idx = torch.topk(logits, k=topk, dim=-1)
    if return_weights:
        return idx, torch.softmax(top_logits, dim=-1)
    return idx


def pad_to_grid(
    x: torch.Tensor, n_win: int | Sequence[int]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad ``x [B, H, W, ...]`` at the bottom/right to a multiple of the ``n_win`` grid.

    Returns the padded tensor and ``(pad_bottom, pad_right)``; ``x`` itself when no padding is
    needed.  BiFormer (auto_pad) pads its block input this way before the qkv projection.
    """
    if x.dim() < 3:
        raise ValueError(f"x must be [B, H, W, ...], got shape {tuple(x.shape)}")
    nh, nw = _grid(n_win)
    h, w = x.shape[1], x.shape[2]
    pad_b, pad_r = (-h) % nh, (-w) % nw
    if pad_b == 0 and pad_r == 0:
        return x, (0, 0)
    trailing = x.dim() - 3
    return F.pad(x, [0, 0] * trailing + [0, pad_r, 0, pad_b]), (pad_b, pad_r)


def crop_from_grid(x: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_grid` on a ``[B, H, W, ...]`` tensor."""
    pad_b, pad_r = pad
    if pad_b == 0 and pad_r == 0:
        return x
    return x[:, : x.shape[1] - pad_b, : x.shape[2] - pad_r]


def bra_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    n_win: int | Sequence[int],
    topk: int,
    scale: float | None = None,
    auto_pad: bool = False,
    detach_routing: bool = True,
    per_head: bool = False,
    return_indices: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Bi-level routing attention: route regions with :func:`bra_route`, then attend with
    :func:`~visionattn.kernels.routed_attention` (no gathered K/V copy).

    ``q, k: [B, H, W, heads, D]``, ``v: [B, H, W, heads, Dv]`` on one map.  ``scale`` (default
    ``(heads * D) ** -0.5``, BiFormer's full-width ``qk_dim ** -0.5``) is used for both the
    routing affinity and the token attention, as in BiFormer.

    ``auto_pad``: if the map is not a multiple of ``n_win``, zero-pad q, k, v at the bottom/right,
    route and attend on the padded map (zero tokens count in the region means and, as keys with
    logit 0, in the softmax: they are not masked), then crop the output.  BiFormer's legacy
    module pads its *input* before the qkv projection instead (padded tokens then carry the
    projection bias); to reproduce it exactly, pad the block input with :func:`pad_to_grid`,
    project, call this with ``auto_pad=False`` and crop with :func:`crop_from_grid`.

    Returns ``[B, H, W, heads, Dv]`` (and the ``[B, T, topk]`` indices if ``return_indices``).
    Without ``auto_pad`` a non-divisible map raises ``ValueError``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 5:
            raise ValueError(f"{name} must be a [B, H, W, heads, head_dim] tensor")
    if q.shape[1:3] != k.shape[1:3] or k.shape[1:3] != v.shape[1:3]:
        raise ValueError(
            f"q, k, v must share one map, got {tuple(q.shape[1:3])}, {tuple(k.shape[1:3])}, "
            f"{tuple(v.shape[1:3])}"
        )
    nh, nw = _grid(n_win)
    pad = (0, 0)
    if auto_pad:
        q, pad = pad_to_grid(q, (nh, nw))
        k, _ = pad_to_grid(k, (nh, nw))
        v, _ = pad_to_grid(v, (nh, nw))
    elif q.shape[1] % nh or q.shape[2] % nw:
        raise ValueError(
            f"map {q.shape[1]}x{q.shape[2]} is not divisible by n_win={nh}x{nw}; pass "
            "auto_pad=True or pad the input"
        )
    if scale is None:
        scale = (q.shape[3] * q.shape[4]) ** -0.5
    idx = bra_route(q, k, (nh, nw), topk, scale, detach=detach_routing, per_head=per_head)
    out = routed_attention(q, k, v, idx, n_win=(nh, nw), scale=scale, check_indices=False)
    out = crop_from_grid(out, pad)
    if return_indices:
        return out, idx
    return out

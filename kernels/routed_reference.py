"""Pure-PyTorch routed (block-sparse) attention over 2-D tiles: oracle and CPU path.

Two implementations live here:

* :func:`routed_fwd_reference` / :func:`routed_bwd_reference` -- the memory-bounded reference.
  It processes query tiles in chunks so that the gathered key/value copies never exceed a byte
  budget, computes in float32 and implements the backward pass with explicit formulas (so the
  CPU path of the custom op needs no autograd graph).
* :func:`routed_attention_gather` -- the straightforward algorithm of BiFormer's bi-level routing
  attention (gather the top-k key/value regions of every query region into a new tensor, then
  dense attention), differentiated by autograd.  It is the baseline the fused kernel is measured
  against and a second, independently written oracle for the tests.

Tensor conventions (shared with :mod:`visionattn.kernels.routed`):

* ``q``: ``[B, Hq, Wq, heads, D]``, ``k``: ``[B, Hk, Wk, heads, D]``, ``v``: ``[B, Hk, Wk, heads, Dv]``.
* The query map is cut into ``nh x nw`` tiles of ``th x tw`` pixels, the key/value map into tiles of
  ``kth x ktw`` pixels.  Tile ``t`` is row ``t // nw``, column ``t % nw`` (row-major), pixels inside
  a tile are row-major as well.
* ``indices``: ``[B, hi, T, topk]`` with ``hi`` 1 (shared by all heads) or ``heads``.  Query tile
  ``t`` attends to the union (with multiplicity) of the key tiles ``indices[b, h, t, :]``: a tile
  listed twice contributes its keys twice to the softmax, exactly as a gather would.
"""

from __future__ import annotations

import torch

__all__ = [
    "routed_attention_gather",
    "routed_bwd_reference",
    "routed_fwd_reference",
    "tiles_to_map",
    "map_to_tiles",
]

# Bytes of gathered keys+values (float32) one reference chunk may hold.
_CHUNK_BYTES = 256 * 1024 * 1024


def map_to_tiles(x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """``[B, H, W, heads, D]`` -> ``[B, heads, T, th*tw, D]`` (row-major tiles, a copy)."""
    b, h, w, nheads, d = x.shape
    nh, nw = h // th, w // tw
    x = x.reshape(b, nh, th, nw, tw, nheads, d).permute(0, 5, 1, 3, 2, 4, 6)
    return x.reshape(b, nheads, nh * nw, th * tw, d)


def tiles_to_map(x: torch.Tensor, nh: int, nw: int, th: int, tw: int) -> torch.Tensor:
    """Inverse of :func:`map_to_tiles`: ``[B, heads, T, th*tw, D]`` -> ``[B, H, W, heads, D]``."""
    b, nheads, _, _, d = x.shape
    x = x.reshape(b, nheads, nh, nw, th, tw, d).permute(0, 2, 4, 3, 5, 1, 6)
    return x.reshape(b, nh * th, nw * tw, nheads, d)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half types, float64 stays float64 (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _expand_indices(indices: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, topk]`` or ``[B, hi, T, topk]`` -> int64 ``[B, heads, T, topk]`` (a view)."""
    if indices.dim() == 3:
        indices = indices.unsqueeze(1)
    return indices.long().expand(-1, heads, -1, -1)


def _gather_tiles(tiles: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick tiles ``[B, h, Tk, L, D]`` at ``idx [B, h, n, topk]`` -> ``[B, h, n, topk*L, D]``."""
    b, nheads, _, length, d = tiles.shape
    n, topk = idx.shape[2], idx.shape[3]
    flat = idx.reshape(b, nheads, n * topk, 1, 1).expand(-1, -1, -1, length, d)
    return torch.gather(tiles, 2, flat).reshape(b, nheads, n, topk * length, d)


def _scatter_tiles(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """Adjoint of :func:`_gather_tiles`: ``dst[.., idx[i], ..] += src[i]`` (duplicates add up)."""
    b, nheads, _, length, d = dst.shape
    n, topk = idx.shape[2], idx.shape[3]
    flat = idx.reshape(b, nheads, n * topk, 1, 1).expand(-1, -1, -1, length, d)
    dst.scatter_add_(2, flat, src.reshape(b, nheads, n * topk, length, d))


def _chunk_tiles(q_tiles: torch.Tensor, topk: int, lk: int, d: int, dv: int) -> int:
    b, nheads, t, lq, _ = q_tiles.shape
    per_tile = b * nheads * (topk * lk * (d + dv) + 2 * lq * topk * lk) * 4
    return max(1, min(t, _CHUNK_BYTES // max(per_tile, 1)))


def routed_fwd_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    tiles: tuple[int, int, int, int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed attention forward in float32, chunked over query tiles.

    ``tiles`` is ``(th, tw, kth, ktw)``.  Returns ``out [B, Hq, Wq, heads, Dv]`` in q's dtype and
    ``lse [B, Hq, Wq, heads]`` (float32 or float64, natural-log log-sum-exp of the scaled logits).
    """
    th, tw, kth, ktw = tiles
    b, hq, wq, nheads, d = q.shape
    dv = v.shape[-1]
    nh, nw = hq // th, wq // tw
    acc = _acc_dtype(q)
    qt = map_to_tiles(q.to(acc), th, tw)
    kt = map_to_tiles(k.to(acc), kth, ktw)
    vt = map_to_tiles(v.to(acc), kth, ktw)
    idx = _expand_indices(indices, nheads)
    t, lq, lk, topk = qt.shape[2], qt.shape[3], kt.shape[3], idx.shape[-1]
    out = qt.new_empty(b, nheads, t, lq, dv)
    lse = qt.new_empty(b, nheads, t, lq)
    step = _chunk_tiles(qt, topk, lk, d, dv)
    for t0 in range(0, t, step):
        sl = slice(t0, min(t, t0 + step))
        ic = idx[:, :, sl]
        kg, vg = _gather_tiles(kt, ic), _gather_tiles(vt, ic)
        s = torch.matmul(qt[:, :, sl], kg.transpose(-1, -2)) * scale
        m = torch.logsumexp(s, dim=-1)
        out[:, :, sl] = torch.matmul(torch.exp(s - m.unsqueeze(-1)), vg)
        lse[:, :, sl] = m
    out = tiles_to_map(out, nh, nw, th, tw).to(q.dtype)
    lse = tiles_to_map(lse.unsqueeze(-1), nh, nw, th, tw).squeeze(-1)
    return out, lse


def routed_bwd_reference(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    tiles: tuple[int, int, int, int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of routed attention, float32 math, chunked over query tiles.

    Uses the saved ``lse`` to rebuild the probabilities; ``dlse`` (gradient flowing into the
    returned log-sum-exp, or None) enters as ``dS += P * dlse``.  Key tiles listed several times
    (by one or many query tiles) accumulate every contribution.
    """
    th, tw, kth, ktw = tiles
    b, hq, wq, nheads, d = q.shape
    dv_dim = v.shape[-1]
    acc = _acc_dtype(q)
    qt = map_to_tiles(q.to(acc), th, tw)
    kt = map_to_tiles(k.to(acc), kth, ktw)
    vt = map_to_tiles(v.to(acc), kth, ktw)
    dot = map_to_tiles(dout.to(acc), th, tw)
    # delta_i = sum_j P_ij dP_ij = <dO_i, O_i>; a gradient on lse shifts it.
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    delta_t = map_to_tiles(delta.unsqueeze(-1), th, tw).squeeze(-1)
    lse_t = map_to_tiles(lse.to(acc).unsqueeze(-1), th, tw).squeeze(-1)
    idx = _expand_indices(indices, nheads)
    t, lk, topk = qt.shape[2], kt.shape[3], idx.shape[-1]
    dq = torch.empty_like(qt)
    dk = torch.zeros_like(kt)
    dvt = torch.zeros_like(vt)
    step = _chunk_tiles(qt, topk, lk, d, dv_dim)
    for t0 in range(0, t, step):
        sl = slice(t0, min(t, t0 + step))
        ic = idx[:, :, sl]
        kg, vg = _gather_tiles(kt, ic), _gather_tiles(vt, ic)
        qc, doc = qt[:, :, sl], dot[:, :, sl]
        p = torch.exp(torch.matmul(qc, kg.transpose(-1, -2)) * scale - lse_t[:, :, sl, :, None])
        _scatter_tiles(dvt, ic, torch.matmul(p.transpose(-1, -2), doc))
        ds = p * (torch.matmul(doc, vg.transpose(-1, -2)) - delta_t[:, :, sl, :, None])
        dq[:, :, sl] = torch.matmul(ds, kg) * scale
        _scatter_tiles(dk, ic, torch.matmul(ds.transpose(-1, -2), qc) * scale)
    nh, nw = hq // th, wq // tw
    knh, knw = k.shape[1] // kth, k.shape[2] // ktw
    return (
        tiles_to_map(dq, nh, nw, th, tw).to(q.dtype),
        tiles_to_map(dk, knh, knw, kth, ktw).to(k.dtype),
        tiles_to_map(dvt, knh, knw, kth, ktw).to(v.dtype),
    )


def routed_attention_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    tiles: tuple[int, int, int, int],
    scale: float,
) -> torch.Tensor:
    """BiFormer's algorithm, written plainly: gather top-k key/value tiles, then dense attention.

    Runs in the input dtype and is differentiated by autograd.  With indices shared across heads
    it gathers the concatenated ``[k | v]`` channels of all heads at once, as BiFormer's
    KV gather does; per-head indices gather per head.  Memory grows with ``topk`` (that is the
    point of the comparison).  Returns ``[B, Hq, Wq, heads, Dv]``.
    """
    th, tw, kth, ktw = tiles
    b, hq, wq, nheads, d = q.shape
    hk, wk, dv = k.shape[1], k.shape[2], v.shape[-1]
    nh, nw = hq // th, wq // tw
    knh, knw = hk // kth, wk // ktw
    t, tk = nh * nw, knh * knw
    lk = kth * ktw
    qt = map_to_tiles(q, th, tw)  # [B, h, T, Lq, D]
    if indices.dim() == 3 or indices.shape[1] == 1:
        idx = indices.reshape(b, t, -1).long()
        topk = idx.shape[-1]
        # region layout [B, Tk, Lk, heads*(D+Dv)], as BiFormer keeps k and v fused
        kv = torch.cat([k, v], dim=-1).reshape(b, knh, kth, knw, ktw, nheads * (d + dv))
        kv = kv.permute(0, 1, 3, 2, 4, 5).reshape(b, tk, lk, -1)
        sel = torch.gather(
            kv.unsqueeze(1).expand(-1, t, -1, -1, -1),
            2,
            idx.reshape(b, t, topk, 1, 1).expand(-1, -1, -1, lk, kv.shape[-1]),
        )  # [B, T, topk, Lk, heads*(D+Dv)]
        sel = sel.reshape(b, t, topk * lk, nheads, d + dv).permute(0, 3, 1, 2, 4)
        kg, vg = sel.split([d, dv], dim=-1)
    else:
        idx = indices.long()
        topk = idx.shape[-1]
        kt = map_to_tiles(k, kth, ktw)
        vt = map_to_tiles(v, kth, ktw)
        ex = idx.reshape(b, nheads, t, topk, 1, 1)
        kg = torch.gather(
            kt.unsqueeze(2).expand(-1, -1, t, -1, -1, -1), 3, ex.expand(-1, -1, -1, -1, lk, d)
        ).reshape(b, nheads, t, topk * lk, d)
        vg = torch.gather(
            vt.unsqueeze(2).expand(-1, -1, t, -1, -1, -1), 3, ex.expand(-1, -1, -1, -1, lk, dv)
        ).reshape(b, nheads, t, topk * lk, dv)
    attn = torch.softmax(torch.matmul(qt * scale, kg.transpose(-1, -2)), dim=-1)
    return tiles_to_map(torch.matmul(attn, vg), nh, nw, th, tw)

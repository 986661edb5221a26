"""Pure-PyTorch neighbourhood attention: the oracle for the Triton kernels and the CPU path.

Memory is bounded: queries are processed in chunks and only the keys/values of each chunk's
windows are gathered (``chunk x prod(kernel_size)`` per head), so no ``N x N`` matrix is ever
built and a 224px model runs on CPU. The backward is analytic (same chunking) rather than
autograd through the gathers, so it needs no saved per-window tensors.

Tensors are ``[B, *spatial, heads, head_dim]``; ``bias`` is the combined additive logit bias in
window layout ``[B or 1, heads or 1, N, K]`` (``N = prod(spatial)``, ``K = prod(kernel)``).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ._common import NAParams, window_tables

__all__ = ["reference_backward", "reference_forward"]

# Elements of the largest per-chunk gathered tensor (B x chunk x K x heads x head_dim).
_CHUNK_ELEMS = 1 << 23


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_size(b: int, kk: int, h: int, dmax: int, n: int) -> int:
    return max(1, min(n, _CHUNK_ELEMS // max(1, b * kk * h * dmax)))


def _flat(t: Tensor, n_dims: int, ct: torch.dtype) -> Tensor:
    """[B, *S, h, d] -> [B, N, h, d] in the compute dtype."""
    b, h, d = t.shape[0], t.shape[-2], t.shape[-1]
    return t.reshape(b, -1, h, d).to(ct)


def _pad_row(t: Tensor) -> Tensor:
    """Append one zero token (index N) that zero-border window positions gather from."""
    return torch.cat([t, t.new_zeros(t.shape[0], 1, *t.shape[2:])], dim=1)


def _chunk_logits(
    qc: Tensor, kg: Tensor, bias: Tensor | None, allowed: Tensor, c0: int, c1: int, scale: float
) -> Tensor:
    """Logits [B, c, h, K] of one query chunk, masked positions at -inf."""
    s = torch.einsum("bchd,bckhd->bchk", qc, kg) * scale
    if bias is not None:
        s = s + bias[:, :, c0:c1].permute(0, 2, 1, 3).to(s.dtype)
    return s.masked_fill(~allowed[None, :, None, :], float("-inf"))


@functools.lru_cache(maxsize=128)
def window_groups(
    spatial: tuple[int, ...], p: NAParams, device: str
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Queries that share one window, when they fall into equal groups that do.

    Non-overlapping windows (MaxViT block, EfficientViT, Swin-style), MaxViT's grid (each
    dilation group is exactly one kernel) and HaloNet's blocks (stride groups) all do. Returns
    ``(queries [U, G], keys [U, K], allowed [U, K])`` for ``U`` groups of ``G`` queries, or None
    when windows are not shared (then every query gathers its own window).
    """
    # Built outside inference mode: cached tensors are reused by later autograd calls.
    with torch.inference_mode(False):
        key, _, allowed, _ = window_tables(spatial, p, device)
        uniq, inverse = torch.unique(key * 2 + allowed, dim=0, return_inverse=True)
        counts = torch.bincount(inverse)
        g = int(counts[0])
        if g < 2 or not bool((counts == g).all()):
            return None
        queries = torch.argsort(inverse, stable=True).reshape(len(uniq), g)
        lead = queries[:, 0]
        return queries, key[lead], allowed[lead]


def _grouped_forward(
    qf: Tensor, kf: Tensor, vf: Tensor, bias: Tensor | None, p: NAParams, groups: tuple
) -> tuple[Tensor, Tensor]:
    """Forward over shared windows: one key/value gather per group instead of per query."""
    queries, keys, allowed = groups
    (b, n, h, _), dv = qf.shape, vf.shape[-1]
    u, g = queries.shape
    kk = keys.shape[1]
    out = torch.empty(b, n, h, dv, dtype=qf.dtype, device=qf.device)
    lse = torch.empty(b, n, h, dtype=qf.dtype, device=qf.device)
    step = max(1, min(u, _CHUNK_ELEMS // max(1, b * g * kk * h)))
    for u0 in range(0, u, step):
        qi, ki = queries[u0 : u0 + step], keys[u0 : u0 + step]
        s = torch.einsum("bughd,bukhd->buhgk", qf[:, qi], kf[:, ki]) * p.scale
        if bias is not None:  # [B|1, h|1, N, K] -> [B|1, u, h|1, G, K]
            s = s + bias[:, :, qi].permute(0, 2, 1, 3, 4).to(s.dtype)
        s = s.masked_fill(~allowed[u0 : u0 + step, None, None, :], float("-inf"))
        m = torch.logsumexp(s, dim=-1)
        o = torch.einsum("buhgk,bukhd->bughd", torch.exp(s - m[..., None]), vf[:, ki])
        out[:, qi] = o
        lse[:, qi] = m.transpose(2, 3)
    return out, lse


def reference_forward(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, p: NAParams
) -> tuple[Tensor, Tensor]:
    """Returns ``(out [B, *S, h, dv] in q's dtype, lse [B, *S, h] float32)``."""
    n_dims = q.dim() - 3
    spatial = tuple(q.shape[1 : 1 + n_dims])
    b, h, dv = q.shape[0], q.shape[-2], v.shape[-1]
    ct = _compute_dtype(q.dtype)
    groups = window_groups(spatial, p._replace(scale=1.0), str(q.device))
    if groups is not None:
        qf, kf, vf = (
            _flat(q, n_dims, ct),
            _pad_row(_flat(k, n_dims, ct)),
            _pad_row(_flat(v, n_dims, ct)),
        )
        out, lse = _grouped_forward(qf, kf, vf, bias, p, groups)
        return out.reshape(b, *spatial, h, dv).to(q.dtype), lse.reshape(b, *spatial, h).float()
    key, _, allowed, _ = window_tables(spatial, p, q.device)
    n, kk = key.shape
    qf, kf, vf = (
        _flat(q, n_dims, ct),
        _pad_row(_flat(k, n_dims, ct)),
        _pad_row(_flat(v, n_dims, ct)),
    )
    out = torch.empty(b, n, h, dv, dtype=ct, device=q.device)
    lse = torch.empty(b, n, h, dtype=ct, device=q.device)
    step = _chunk_size(b, kk, h, max(q.shape[-1], dv), n)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        idx = key[c0:c1]
        kg, vg = kf[:, idx], vf[:, idx]  # [B, c, K, h, d]
        s = _chunk_logits(qf[:, c0:c1], kg, bias, allowed[c0:c1], c0, c1, p.scale)
        m = torch.logsumexp(s, dim=-1)
        pr = torch.exp(s - m[..., None])
        out[:, c0:c1] = torch.einsum("bchk,bckhd->bchd", pr, vg)
        lse[:, c0:c1] = m
    out = out.reshape(b, *spatial, h, dv).to(q.dtype)
    return out, lse.reshape(b, *spatial, h).float()


def reference_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dlse: Tensor | None,
    bias: Tensor | None,
    p: NAParams,
    need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients ``(dq, dk, dv, dbias)``; ``dlse`` is an optional gradient of the lse output
    (it enters as ``delta = sum(dout * out) - dlse``); ``dbias`` is ``[B, h, N, K]`` float32 (the logit
    gradient in window layout, unreduced over broadcast dims) or None."""
    n_dims = q.dim() - 3
    spatial = tuple(q.shape[1 : 1 + n_dims])
    b, h = q.shape[0], q.shape[-2]
    ct = _compute_dtype(q.dtype)
    key, _, allowed, _ = window_tables(spatial, p, q.device)
    n, kk = key.shape
    qf = _flat(q, n_dims, ct)
    kf, vf = _pad_row(_flat(k, n_dims, ct)), _pad_row(_flat(v, n_dims, ct))
    of, dof = _flat(out, n_dims, ct), _flat(dout, n_dims, ct)
    lsef = lse.reshape(b, n, h).to(ct)
    dlsef = None if dlse is None else dlse.reshape(b, n, h, 1).to(ct)
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    dbias = torch.empty(b, h, n, kk, dtype=torch.float32, device=q.device) if need_dbias else None
    step = _chunk_size(b, kk, h, max(q.shape[-1], v.shape[-1]), n)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        idx = key[c0:c1]
        kg, vg = kf[:, idx], vf[:, idx]
        qc, doc = qf[:, c0:c1], dof[:, c0:c1]
        s = _chunk_logits(qc, kg, bias, allowed[c0:c1], c0, c1, p.scale)
        pr = torch.exp(s - lsef[:, c0:c1, :, None])  # [B, c, h, K]
        dp = torch.einsum("bchd,bckhd->bchk", doc, vg)
        delta = (doc * of[:, c0:c1]).sum(-1, keepdim=True)
        if dlsef is not None:
            delta = delta - dlsef[:, c0:c1]
        ds = pr * (dp - delta)
        dq[:, c0:c1] = torch.einsum("bchk,bckhd->bchd", ds, kg) * p.scale
        flat_idx = idx.reshape(-1)
        dkg = torch.einsum("bchk,bchd->bckhd", ds, qc) * p.scale
        dvg = torch.einsum("bchk,bchd->bckhd", pr, doc)
        dk.index_add_(1, flat_idx, dkg.reshape(b, -1, *dkg.shape[3:]))
        dv.index_add_(1, flat_idx, dvg.reshape(b, -1, *dvg.shape[3:]))
        if dbias is not None:
            dbias[:, :, c0:c1] = ds.permute(0, 2, 1, 3).float()
    dq = dq.reshape(q.shape).to(q.dtype)
    dk = dk[:, :n].reshape(k.shape).to(k.dtype)
    dv = dv[:, :n].reshape(v.shape).to(v.dtype)
    return dq, dk, dv, dbias


def reference_flops(spatial: tuple[int, ...], p: NAParams, b: int, h: int, d: int, dv: int) -> int:
    """Useful forward FLOPs (2 matmuls over each query's window)."""
    return 2 * b * h * math.prod(spatial) * math.prod(p.kernel_size) * (d + dv)

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
from typing import NamedTuple

import torch
from torch import Tensor

from ._common import NAParams, axis_windows, window_tables

__all__ = ["AxisTiling", "WindowGroups", "reference_backward", "reference_forward", "window_groups"]

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


class AxisTiling(NamedTuple):
    """How one axis's shared windows lie in memory, when they form a regular tiling.

    Queries of group ``u`` (``u < groups``) are the padded-axis positions
    ``u * q_group_step + m * q_member_step`` (``m < members``); positions at or past the axis
    length are padding (computed, then dropped). Group ``u``'s window is the key positions
    ``k_start + u * k_group_step + t * k_member_step`` (``t < kernel``) of the key axis padded
    with ``k_pad`` zeros on each side (``k_start`` already counts the left padding).
    """

    groups: int
    members: int
    q_group_step: int
    q_member_step: int
    q_pad: int
    kernel: int
    k_start: int
    k_group_step: int
    k_member_step: int
    k_pad: tuple[int, int]


class WindowGroups(NamedTuple):
    """Queries that share one window: ``queries [U, G]``, ``keys [U, K]``, ``allowed [U, K]``,
    and ``tiling`` (one :class:`AxisTiling` per axis) when the sharing is a strided tiling
    of the map that views and strided copies can express, else None."""

    queries: Tensor
    keys: Tensor
    allowed: Tensor
    tiling: tuple[AxisTiling, ...] | None


def _axis_tiling(L: int, k: int, s: int, d: int, causal: bool, zero: bool) -> AxisTiling | None:
    """The tiling of one axis's windows, or None when they are not a strided tiling."""
    key, _, allowed, _ = axis_windows(L, k, s, d, causal, zero)
    if not bool(allowed.all()):
        return None
    rows = [tuple(r) for r in key.tolist()]
    lead: dict[tuple, int] = {}
    members: list[list[int]] = []
    for i, r in enumerate(rows):
        if r not in lead:
            lead[r] = len(members)
            members.append([])
        members[lead[r]].append(i)
    u, g = len(members), max(len(m) for m in members)
    # group u holds u*G .. u*G+G-1 (blocks) or u, u+U, u+2U, ... (dilation groups); a short
    # last block / short dilation groups are padded up to G at the end of the axis
    runs = all(m == list(range(i * g, min(L, (i + 1) * g))) for i, m in enumerate(members))
    strided = all(m == list(range(i, L, u)) for i, m in enumerate(members))
    if runs:
        q_gs, q_ms = g, 1
    elif strided:
        q_gs, q_ms = 1, u
    else:
        return None
    win = [rows[m[0]] for m in members]
    k_ms = win[0][1] - win[0][0] if k > 1 else 1
    k_gs = win[1][0] - win[0][0] if u > 1 else 0
    if any(
        w != tuple(win[0][0] + i * k_gs + t * k_ms for t in range(k)) for i, w in enumerate(win)
    ):
        return None
    lo = max(0, -min(w[0] for w in win))
    hi = max(0, max(w[-1] for w in win) + 1 - L)
    if (lo or hi) and not zero:
        return None
    return AxisTiling(u, g, q_gs, q_ms, u * g - L, k, win[0][0] + lo, k_gs, k_ms, (lo, hi))


@functools.lru_cache(maxsize=128)
def window_groups(spatial: tuple[int, ...], p: NAParams, device: str) -> WindowGroups | None:
    """Queries that share one window, when they fall into equal groups that do.

    Non-overlapping windows (MaxViT block, EfficientViT, Swin-style), MaxViT's grid (each
    dilation group is exactly one kernel) and HaloNet's blocks (stride groups) all do; these
    also form a strided tiling (``tiling``), which :func:`reference_forward` runs on views and
    strided copies. Returns None when windows are not shared (then every query gathers its
    own window).
    """
    tiles = [
        _axis_tiling(L, p.kernel_size[a], p.stride[a], p.dilation[a], p.is_causal[a], p.zero_border)
        for a, L in enumerate(spatial)
    ]
    tiling = tuple(tiles) if all(t is not None for t in tiles) else None
    if tiling is not None and math.prod(t.members for t in tiling) < 2:
        tiling = None
    # Built outside inference mode: cached tensors are reused by later autograd calls.
    with torch.inference_mode(False):
        key, _, allowed, _ = window_tables(spatial, p, device)
        uniq, inverse = torch.unique(key * 2 + allowed, dim=0, return_inverse=True)
        counts = torch.bincount(inverse)
        g = int(counts[0])
        if g < 2 or not bool((counts == g).all()):
            if tiling is None:
                return None
            empty = key.new_empty(0, 0)
            return WindowGroups(empty, empty, allowed.new_empty(0, 0), tiling)
        queries = torch.argsort(inverse, stable=True).reshape(len(uniq), g)
        lead = queries[:, 0]
        return WindowGroups(queries, key[lead], allowed[lead], tiling)


def _tile_view(t: Tensor, tiling: tuple[AxisTiling, ...], queries: bool, lead: int = 1) -> Tensor:
    """Strided view ``[*lead, *mid, U_1..U_n, G_1..G_n (or K_1..K_n), last]`` of a
    ``[*lead, *spatial (padded), *mid, last]`` tensor: every group's queries (or window keys)."""
    n = len(tiling)
    st = t.stride()
    sp = st[lead : lead + n]
    offset = t.storage_offset()
    g_size, g_stride, m_size, m_stride = [], [], [], []
    for a, ax in enumerate(tiling):
        g_size.append(ax.groups)
        if queries:
            g_stride.append(ax.q_group_step * sp[a])
            m_size.append(ax.members)
            m_stride.append(ax.q_member_step * sp[a])
        else:
            offset += ax.k_start * sp[a]
            g_stride.append(ax.k_group_step * sp[a])
            m_size.append(ax.kernel)
            m_stride.append(ax.k_member_step * sp[a])
    lead_sz, lead_st = list(t.shape[:lead]), list(st[:lead])
    mid_sz, mid_st = list(t.shape[lead + n : -1]), list(st[lead + n : -1])
    size = lead_sz + mid_sz + g_size + m_size + [t.shape[-1]]
    stride = lead_st + mid_st + g_stride + m_stride + [st[-1]]
    return t.as_strided(size, stride, offset)


def _pad_axes(t: Tensor, pads: list[tuple[int, int]], lead: int = 1) -> Tensor:
    """Zero-pad the spatial axes ``lead .. lead + n`` of ``t`` (lo, hi per axis)."""
    if not any(lo or hi for lo, hi in pads):
        return t
    trailing = t.dim() - lead - len(pads)
    flat: list[int] = [0, 0] * trailing
    for lo, hi in reversed(pads):
        flat += [lo, hi]
    return torch.nn.functional.pad(t, flat)


# Elements of the largest logit block of the tiled path (the batch is split above it).
_TILE_ELEMS = 1 << 25


class _TilePlan(NamedTuple):
    """Per-tiling constants of :func:`_tiled_forward` (cached: the models repeat few)."""

    ug: tuple[int, ...]  # groups per axis
    gm: tuple[int, ...]  # queries per group per axis
    kw: tuple[int, ...]  # window per axis
    u: int
    g: int
    kk: int
    qpads: list[tuple[int, int]]
    kpads: list[tuple[int, int]]
    any_qpad: bool
    # windows are exactly their groups' queries (non-overlapping windows, dilation groups):
    # q, k, v and the output are then plain reshape + permute views of the map
    self_keys: bool
    split: tuple[int, ...]  # each axis split into (groups, members) or (members, groups)
    perm: tuple[int, ...]  # [B, split.., h, d] -> [B, h, U.., G.., d]
    bias_perm: tuple[int, ...]  # [b, h, split.., K] -> [b, h, U.., G.., K]


@functools.lru_cache(maxsize=256)
def _tile_plan(tiling: tuple[AxisTiling, ...]) -> _TilePlan:
    n = len(tiling)
    split, gdim, mdim = [], [], []
    for a, ax in enumerate(tiling):
        if ax.q_member_step == 1:  # blocks: index = group * G + member
            split += [ax.groups, ax.members]
            gdim.append(2 * a)
            mdim.append(2 * a + 1)
        else:  # dilation groups: index = member * U + group
            split += [ax.members, ax.groups]
            gdim.append(2 * a + 1)
            mdim.append(2 * a)
    perm = (0, 1 + 2 * n, *(1 + d for d in gdim), *(1 + d for d in mdim), 2 + 2 * n)
    bias_perm = (0, 1, *(2 + d for d in gdim), *(2 + d for d in mdim), 2 + 2 * n)
    self_keys = all(
        ax.kernel == ax.members
        and ax.q_pad == 0
        and ax.k_pad == (0, 0)
        and ax.k_start == 0
        and (ax.groups == 1 or ax.k_group_step == ax.q_group_step)
        and ax.k_member_step == ax.q_member_step
        for ax in tiling
    )
    ug = tuple(ax.groups for ax in tiling)
    gm = tuple(ax.members for ax in tiling)
    kw = tuple(ax.kernel for ax in tiling)
    qpads = [(0, ax.q_pad) for ax in tiling]
    return _TilePlan(
        ug, gm, kw, math.prod(ug), math.prod(gm), math.prod(kw), qpads,
        [ax.k_pad for ax in tiling], any(ax.q_pad for ax in tiling), self_keys,
        tuple(split), perm, bias_perm,
    )  # fmt: skip


def _split_view(t: Tensor, plan: _TilePlan) -> Tensor:
    """``[B, *spatial, h, d]`` -> view ``[B, h, U.., G.., d]`` (self-key tilings)."""
    return t.view(t.shape[0], *plan.split, *t.shape[-2:]).permute(plan.perm)


def _tile_attend(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    b_t: Tensor | None,
    scale: float,
    plan: _TilePlan,
    ct: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Attention of ``[b, h, U.., G.., d]`` query views against ``[b, h, U.., K.., d]`` window
    views: ``(out [b*h*U, G, dv] in ct, lse [b*h*U, G, 1])``."""
    b, h = q_t.shape[0], q_t.shape[1]
    nb, g, kk = b * h * plan.u, plan.g, plan.kk
    # reshape copies only views a batched matmul cannot read (e.g. several windows)
    qg = q_t.reshape(nb, g, q_t.shape[-1])
    kg = k_t.reshape(nb, kk, k_t.shape[-1])
    vg = v_t.reshape(nb, kk, v_t.shape[-1])
    if qg.dtype != ct:
        qg, kg, vg = qg.to(ct), kg.to(ct), vg.to(ct)
    s = torch.bmm(qg, kg.transpose(1, 2))
    if b_t is not None:  # s = bias + scale * s, in place (one pass)
        s5 = s.view(b, h, *plan.ug, *plan.gm, kk)
        torch.add(b_t, s5, alpha=scale, out=s5)
    else:
        s.mul_(scale)
    # softmax in place (torch.logsumexp is a dozen small ops inside: slower here)
    m = s.amax(-1, keepdim=True)
    l_sum = s.sub_(m).exp_().sum(-1, keepdim=True)
    o = torch.bmm(s, vg).div_(l_sum)
    return o, m.add_(l_sum.log_())


def _one_window_forward(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, g: int, kk: int
) -> tuple[Tensor, Tensor]:
    """One head, one window covering the whole map (EfficientViT's per-head calls, any map
    that is a single window): plain batched attention on views of the inputs, the bias and
    scale fused into the first matmul, the output already in ``[B, *spatial, 1, dv]`` layout.
    A few ops fewer than the general tiled path, which matters at these sizes."""
    b = q.shape[0]
    qg, kg, vg = q.reshape(b, g, q.shape[-1]), k.reshape(b, kk, k.shape[-1]), v.reshape(b, kk, -1)
    if bias is None:
        s = torch.bmm(qg, kg.transpose(1, 2)).mul_(scale)
    else:  # [B|1, 1, N, K] broadcasts over the batch of the matmul
        bias = bias.reshape(bias.shape[0], g, kk)
        s = torch.baddbmm(bias.to(qg.dtype), qg, kg.transpose(1, 2), alpha=scale)
    m = s.amax(-1, keepdim=True)
    l_sum = s.sub_(m).exp_().sum(-1, keepdim=True)
    o = torch.bmm(s, vg).div_(l_sum)
    return o.view(*q.shape[:-1], vg.shape[-1]), m.add_(l_sum.log_()).view(q.shape[:-1])


def _tiled_forward(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, p: NAParams, tiling: tuple
) -> tuple[Tensor, Tensor]:
    """Forward over a strided window tiling: q, k, v as strided views of each group's queries
    and window (copied only where a batched matmul cannot read the view), the bias view added
    in place, an in-place softmax, one strided copy back. No index tensors, no gathers; the
    windows' keys are read once per group."""
    plan = _tile_plan(tiling)
    n = len(tiling)
    b, h, dv = q.shape[0], q.shape[-2], v.shape[-1]
    ct = _compute_dtype(q.dtype)
    ug, gm, u, g, kk = plan.ug, plan.gm, plan.u, plan.g, plan.kk
    if u == 1 and h == 1 and plan.self_keys and q.dtype == ct and b * g * kk <= _TILE_ELEMS:
        return _one_window_forward(q, k, v, bias, p.scale, g, kk)
    if plan.self_keys:
        q_t, k_t, v_t = _split_view(q, plan), _split_view(k, plan), _split_view(v, plan)
    else:
        q_t = _tile_view(_pad_axes(q, plan.qpads), tiling, True)  # [B, h, U.., G.., d]
        k_t = _tile_view(_pad_axes(k, plan.kpads), tiling, False)  # [B, h, U.., K.., d]
        v_t = _tile_view(_pad_axes(v, plan.kpads), tiling, False)
    b_t = None
    if bias is not None:  # [B|1, h|1, N, K] -> view [B|1, h|1, U.., G.., K], added in place
        if plan.any_qpad:
            spatial = tuple(q.shape[1 : 1 + n])
            bb = bias.reshape(*bias.shape[:2], *spatial, kk)
            bb = _pad_axes(bb, plan.qpads, lead=2).view(*bias.shape[:2], *plan.split, kk)
        else:
            bb = bias.view(*bias.shape[:2], *plan.split, kk)
        b_t = bb.permute(plan.bias_perm)
    step = max(1, _TILE_ELEMS // max(1, h * u * g * kk))
    if step >= b and u == 1 and h == 1 and not plan.any_qpad:
        # one window over the whole map, one head: the matmul output is already the
        # [B, *spatial, 1, dv] layout, no copy back
        o, lse = _tile_attend(q_t, k_t, v_t, b_t, p.scale, plan, ct)
        return o.to(q.dtype).view(*q.shape[:-1], dv), lse.view(q.shape[:-1])
    qpad_shape = [ax.groups * ax.members for ax in tiling]
    out_p = torch.empty(b, *qpad_shape, h, dv, dtype=q.dtype, device=q.device)
    lse_p = torch.empty(b, *qpad_shape, h, 1, dtype=torch.float32, device=q.device)
    if plan.self_keys:
        out_t, lse_t = _split_view(out_p, plan), _split_view(lse_p, plan)
    else:
        out_t, lse_t = _tile_view(out_p, tiling, True), _tile_view(lse_p, tiling, True)
    for b0 in range(0, b, step):
        b1 = min(b, b0 + step)
        sl = slice(b0, b1) if step < b else slice(None)
        bt = b_t if b_t is None or b_t.shape[0] == 1 else b_t[sl]
        o, lse = _tile_attend(q_t[sl], k_t[sl], v_t[sl], bt, p.scale, plan, ct)
        out_t[sl].copy_(o.view(b1 - b0, h, *ug, *gm, dv))
        lse_t[sl].copy_(lse.view(b1 - b0, h, *ug, *gm, 1))
    if plan.any_qpad:
        crop = (slice(None), *(slice(0, L) for L in q.shape[1 : 1 + n]))
        out_p, lse_p = out_p[crop].contiguous(), lse_p[crop].contiguous()
    return out_p, lse_p.squeeze(-1)


def _grouped_forward(
    qf: Tensor, kf: Tensor, vf: Tensor, bias: Tensor | None, p: NAParams, groups: tuple
) -> tuple[Tensor, Tensor]:
    """Forward over shared windows: one key/value gather per group instead of per query."""
    queries, keys, allowed = groups[:3]
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
    if groups is not None and groups.tiling is not None:
        out, lse = _tiled_forward(q, k, v, bias, p, groups.tiling)
        return out, (lse if lse.dtype == torch.float32 else lse.float())
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

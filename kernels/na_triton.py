"""Triton kernels for neighbourhood attention (forward, backward dq + dbias, backward dk/dv).

Every problem is handled as 3-D: 1-D and 2-D maps get leading unit axes (length 1, kernel 1).
All index arithmetic runs in dilation-group coordinates (see :mod:`._common`), so dilation
costs nothing beyond a different address computation.

Forward / dq: one program per (query tile, head, batch). A query tile is a box of
``TQ0 x TQ1 x TQ2`` group coordinates (``QSTEP_a <= TQ_a`` of them valid per axis, so tiles
can follow stride groups, e.g. 7x7 MaxViT windows in 8x8 boxes). Window starts are monotone
in the query coordinate, so the union of the tile's windows is the box from the first
query's window start to the last query's window end; the kernel walks that box in
``KB0 x KB1 x KB2`` key blocks with tensor-core dots and an online (base-2) softmax, masking
each (query, key) pair by window membership, causality and the map border. With
``border="zero"`` the box may leave the map: masked loads give zero keys/values whose logits
(0 + bias) stay in the softmax, exactly the zero-padding semantics.

dk/dv: one program per key tile; a window always contains its query, so the queries that
can see a key lie within ``kernel - 1`` of it per axis; the kernel walks that box in query
blocks and recomputes P^T from the saved lse.

The logit bias (rpb gathered to window layout and/or attn_bias) is ``[B|1, h|1, N, K]`` and
is gathered per (query, window position); the dq kernel writes dS in the same layout, which
is the bias gradient.

Whole windows: when the windows tile the map (kernel = stride, every dilation group a whole
number of windows, no causal axis: MaxViT block/grid, Swin, LITv2 Hi-Fi, EfficientViT), one
program owns whole windows instead (``_na_win_kernel``): one dense masked score block per
window, a single-pass softmax, the rpb values gathered once per program and reused over a
loop of batch elements, and one fused backward kernel for dq, dk, dv and the bias gradients.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

try:  # raised when a compiled variant needs more shared memory / registers than the GPU has
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - older/newer Triton layouts
    OutOfResources = RuntimeError

from ._common import NAParams, next_pow2
from ._launch import DirectLauncher, has_maxnreg

__all__ = ["backward", "forward", "supported"]

_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


_I32 = 2**31 - 1


def _slice_extent(t: Tensor) -> int:
    """Largest element offset inside one batch element (excluding the batch stride)."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape[1:], t.stride()[1:]))


def supported(q: Tensor, k: Tensor, v: Tensor, kernel_size: tuple[int, ...]) -> bool:
    """Whether the Triton path handles this input (else the reference is used): head dims up
    to 256, and offsets inside one batch element (q/k/v/outputs, ``[N, K]`` bias slices) that
    fit the kernels' 32-bit index arithmetic."""
    if max(q.shape[-1], v.shape[-1]) > _MAX_HEAD_DIM:
        return False
    n_tok_heads = q.numel() // (q.shape[0] * q.shape[-1])
    if n_tok_heads * math.prod(kernel_size) >= _I32:  # attn_bias / dS slices [N, K] per head
        return False
    # fast path: small tensors (even as views of a 3x wider qkv buffer) fit trivially
    if 4 * max(q.numel(), v.numel()) < _I32:
        return True
    extents = (_slice_extent(q), _slice_extent(k), _slice_extent(v), n_tok_heads * v.shape[-1])
    return max(extents) < _I32


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _window(ip, lg, K, S, causal, zero):
    """Window of queries ``ip`` (group coords) on one axis: ``(start, lo, hi)``.

    ``start`` is the first window position, ``[lo, hi]`` the keys that take part (clipped to
    the map for clamp, to the query for causal). ``causal``/``zero`` are runtime flags, so one
    compiled kernel serves every pattern.
    """
    base = (ip // S) * S
    lead = tl.where(causal != 0, base + S - 1, base + S // 2)
    lead = tl.where(zero != 0, lead, tl.minimum(lead, lg - 1))
    start = tl.where(causal != 0, lead - K + 1, lead - K // 2)
    clamped = tl.minimum(tl.maximum(start, 0), lg - K)
    start = tl.where((zero == 0) & (causal == 0), clamped, start)
    lo = tl.where(zero != 0, start, tl.maximum(start, 0))
    hi = start + K - 1
    hi = tl.where(causal != 0, tl.minimum(hi, ip), hi)
    hi = tl.where(zero != 0, hi, tl.minimum(hi, lg - 1))
    return start, lo, hi


@triton.jit
def _exp2_shifted(s, scale2, shift, FOLD: tl.constexpr):
    """``exp2(scaled logits - shift)``. ``FOLD``: ``s`` holds raw logits and the (positive)
    scale rides in the FMA; else ``s`` is already scaled."""
    if FOLD:
        e = tl.exp2(s * scale2 - shift)
    else:
        e = tl.exp2(s - shift)
    return e


@triton.jit
def _scaled_max(s, axis: tl.constexpr, scale2, FOLD: tl.constexpr):
    """Row max of the scaled logits (a positive scale commutes with the max)."""
    m = tl.max(s, axis)
    if FOLD:
        m = m * scale2
    return m


@triton.jit
def _decode3(r, T1: tl.constexpr, T2: tl.constexpr):
    return r // (T1 * T2), (r // T2) % T1, r % T2


@triton.jit
def _tile_ids(pid, NT0, NT1, NT2, D1, D2):
    """Program id -> (dilation group, tile) per axis; tiles vary fastest for L2 locality."""
    t2 = pid % NT2
    pid = pid // NT2
    t1 = pid % NT1
    pid = pid // NT1
    t0 = pid % NT0
    pid = pid // NT0
    g2 = pid % D2
    pid = pid // D2
    g1 = pid % D1
    g0 = pid // D1
    return g0, g1, g2, t0, t1, t2


# Problem sizes are not specialised (one compiled variant serves every map size). Strides and
# the real head dims keep Triton's divisibility-by-16 specialisation: it is what lets the
# head-dim masks (d < dk_real) vectorise. With dk_real unspecialised every q/k/v element was
# a scalar load (56x56 k7 forward: L1-bound at 74%; 215 -> 156 us on H200, session 6).
_SIZES = ["H", "L0", "L1", "L2", "K0", "K1", "K2", "S0", "S1", "S2", "D0", "D1", "D2",
          "NT0", "NT1", "NT2", "C0", "C1", "C2", "ZERO"]  # fmt: skip


# ----------------------------------------------------------------------------- forward / dq
@triton.jit(do_not_specialize=_SIZES + ["QSTEP0", "QSTEP1", "QSTEP2", "OB1", "OB2", "NM1", "NM2"])
def _na_fwd_kernel(
    Q, Kp, V, Out, LSE, BIAS, RPB, DO, DLSE, DELTA, DQ, DBIAS, RPBO,
    sqb, sq0, sq1, sq2, sqh, sqd,
    skb, sk0, sk1, sk2, skh, skd,
    svb, sv0, sv1, sv2, svh, svd,
    sob, so0, so1, so2, soh, sod,
    sgb, sg0, sg1, sg2, sgh, sgd,
    sbb, sbh, srh, sdb, sdh,
    H, L0, L1, L2, K0, K1, K2, S0, S1, S2, D0, D1, D2,
    NT0, NT1, NT2, QSTEP0, QSTEP1, QSTEP2,
    scale2, dk_real, dv_real,
    C0, C1, C2, ZERO, OB1, OB2, NM1, NM2,
    HAS_BIAS: tl.constexpr, HAS_RPB: tl.constexpr, HAS_DLSE: tl.constexpr,
    BWD: tl.constexpr, WRITE_DBIAS: tl.constexpr, ATOMIC_DBIAS: tl.constexpr,
    RPB_BLOCKS: tl.constexpr, DRPB_BLOCKS: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    KB0: tl.constexpr, KB1: tl.constexpr, KB2: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, IEEE: tl.constexpr, FOLD: tl.constexpr = False,
    UMASK: tl.constexpr = True,
):  # fmt: skip
    """Forward (BWD=False: O, LSE) or dq pass (BWD=True: DELTA, DQ and optionally DBIAS).

    The dq pass computes ``delta = rowsum(dO * O) - dlse`` for its own query rows and writes
    it for the dk/dv kernel (launched after it on the same stream). ``RPB`` is the per-head
    relative-position table, read in place through the relative index. DBIAS receives the
    logit gradient dS in ``[B|1, h, N, K]`` layout: stored per batch element, or atomically
    summed over the batch into one slice (``ATOMIC_DBIAS``, batch stride 0) when only its
    batch sum is needed (rpb, batch-broadcast attn_bias). ``RPB_BLOCKS``: ``RPB`` holds the
    rpb values laid out per (key-block set, key block, query, key) (:func:`_rpb_fwd_index`);
    ``RPBO`` gives each tile's key-block set (per axis, by the offset of its key box).
    ``DRPB_BLOCKS`` (dq pass): dS is summed atomically into DBIAS laid out like those blocks
    (batch and tiles of one block set share it), which the host scatters onto the table.
    """
    BLOCK_M: tl.constexpr = TQ0 * TQ1 * TQ2
    BLOCK_N: tl.constexpr = KB0 * KB1 * KB2
    pid = tl.program_id(0)
    h = pid % H
    g0, g1, g2, t0, t1, t2 = _tile_ids(pid // H, NT0, NT1, NT2, D1, D2)
    b = tl.program_id(1).to(tl.int64)
    lg0 = (L0 - g0 + D0 - 1) // D0
    lg1 = (L1 - g1 + D1 - 1) // D1
    lg2 = (L2 - g2 + D2 - 1) // D2
    NTOK = L0 * L1 * L2
    # (batch, head) move the scalar base pointers in 64-bit; the per-element offsets inside
    # one (batch, head) slice stay 32-bit (the host checks they fit), halving index math.
    Q += b * sqb + h * sqh
    Kp += b * skb + h * skh
    V += b * svb + h * svh
    Out += b * sob + h * soh
    DO += b * sob + h * soh
    DQ += b * sgb + h * sgh
    LSE += b * NTOK * H + h
    DELTA += b * NTOK * H + h
    DLSE += b * NTOK * H + h
    BIAS += b * sbb + h * sbh
    DBIAS += b * sdb + h * sdh

    r = tl.arange(0, BLOCK_M)
    r0, r1, r2 = _decode3(r, TQ1, TQ2)
    qp0 = t0 * QSTEP0 + r0
    qp1 = t1 * QSTEP1 + r1
    qp2 = t2 * QSTEP2 + r2
    row_ok = (r0 < QSTEP0) & (r1 < QSTEP1) & (r2 < QSTEP2) & (qp0 < lg0) & (qp1 < lg1)
    row_ok = row_ok & (qp2 < lg2)
    qi0 = qp0 * D0 + g0
    qi1 = qp1 * D1 + g1
    qi2 = qp2 * D2 + g2
    st0, wl0, wh0 = _window(qp0, lg0, K0, S0, C0, ZERO)
    st1, wl1, wh1 = _window(qp1, lg1, K1, S1, C1, ZERO)
    st2, wl2, wh2 = _window(qp2, lg2, K2, S2, C2, ZERO)

    # Box of keys covering every window of the tile (first valid to last valid query).
    last0 = tl.minimum(t0 * QSTEP0 + QSTEP0, lg0) - 1
    last1 = tl.minimum(t1 * QSTEP1 + QSTEP1, lg1) - 1
    last2 = tl.minimum(t2 * QSTEP2 + QSTEP2, lg2) - 1
    lo0 = _window(t0 * QSTEP0, lg0, K0, S0, C0, ZERO)[1]
    lo1 = _window(t1 * QSTEP1, lg1, K1, S1, C1, ZERO)[1]
    lo2 = _window(t2 * QSTEP2, lg2, K2, S2, C2, ZERO)[1]
    hi0 = _window(last0, lg0, K0, S0, C0, ZERO)[2] + 1
    hi1 = _window(last1, lg1, K1, S1, C1, ZERO)[2] + 1
    hi2 = _window(last2, lg2, K2, S2, C2, ZERO)[2] + 1

    dq_ = tl.arange(0, DK)
    dv_ = tl.arange(0, DV)
    q_off = qi0 * sq0 + qi1 * sq1 + qi2 * sq2
    q = tl.load(
        Q + q_off[:, None] + dq_[None, :] * sqd,
        mask=row_ok[:, None] & (dq_[None, :] < dk_real),
        other=0.0,
    )
    qflat = (qi0 * L1 + qi1) * L2 + qi2
    KT = K0 * K1 * K2
    if HAS_BIAS:
        bias_row = BIAS + qflat * KT
    if HAS_RPB:
        rpb_h = RPB + h * srh
        if RPB_BLOCKS:
            # this tile's block set: one entry per axis for (dilation group, tile)
            e_t = tl.load(RPBO + g0 * NT0 + t0) + tl.load(RPBO + OB1 + g1 * NT1 + t1)
            e_t += tl.load(RPBO + OB2 + g2 * NT2 + t2)
            rpb_h += e_t
            if DRPB_BLOCKS:
                drpb_h = DBIAS + e_t
        else:
            T1 = 2 * K1 - 1
            T2 = 2 * K2 - 1
            # relative index (k' - q' + K - 1) per axis, row-major over the (2K-1) table
            rq = ((K0 - 1 - qp0) * T1 + (K1 - 1 - qp1)) * T2 + (K2 - 1 - qp2)
    o_row = qi0 * so0 + qi1 * so1 + qi2 * so2
    lse_off = qflat * H

    if BWD:
        lse2 = tl.load(LSE + lse_off, mask=row_ok, other=0.0) * 1.4426950408889634
        omask = row_ok[:, None] & (dv_[None, :] < dv_real)
        do = tl.load(DO + o_row[:, None] + dv_[None, :] * sod, mask=omask, other=0.0)
        o_prev = tl.load(Out + o_row[:, None] + dv_[None, :] * sod, mask=omask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o_prev.to(tl.float32), 1)
        if HAS_DLSE:
            delta = delta - tl.load(DLSE + lse_off, mask=row_ok, other=0.0)
        tl.store(DELTA + lse_off, delta, mask=row_ok)
        dq_acc = tl.zeros([BLOCK_M, DK], dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)

    c = tl.arange(0, BLOCK_N)
    c0, c1, c2 = _decode3(c, KB1, KB2)
    # UMASK: window membership per axis as one unsigned compare, 0 <= key - lo <= hi - lo,
    # with padding rows folded into the row operands (no key: their bias loads and dS stay
    # masked); their windows may be empty (hi < lo), which the unsigned compare would read as
    # huge. Otherwise two signed compares per axis and the row mask per element.
    if UMASK:
        ww0 = tl.where(row_ok, wh0 - wl0, 0).to(tl.uint32, bitcast=True)
        wm0 = tl.where(row_ok, wl0, -(1 << 30))
        ww1 = (wh1 - wl1).to(tl.uint32, bitcast=True)
        ww2 = (wh2 - wl2).to(tl.uint32, bitcast=True)
    for j0 in range(lo0, hi0, KB0):
        kp0 = j0 + c0
        if UMASK:
            m0 = (kp0[None, :] - wm0[:, None]).to(tl.uint32, bitcast=True) <= ww0[:, None]
        else:
            m0 = (kp0[None, :] >= wl0[:, None]) & (kp0[None, :] <= wh0[:, None])
            m0 = m0 & row_ok[:, None]
        for j1 in range(lo1, hi1, KB1):
            kp1 = j1 + c1
            if UMASK:
                d1 = (kp1[None, :] - wl1[:, None]).to(tl.uint32, bitcast=True)
                m01 = m0 & (d1 <= ww1[:, None])
            else:
                m01 = m0 & (kp1[None, :] >= wl1[:, None]) & (kp1[None, :] <= wh1[:, None])
            for j2 in range(lo2, hi2, KB2):
                kp2 = j2 + c2
                if UMASK:
                    d2 = (kp2[None, :] - wl2[:, None]).to(tl.uint32, bitcast=True)
                    mask = m01 & (d2 <= ww2[:, None])
                else:
                    mask = m01 & (kp2[None, :] >= wl2[:, None]) & (kp2[None, :] <= wh2[:, None])
                in_map = (kp0 >= 0) & (kp0 < lg0) & (kp1 >= 0) & (kp1 < lg1)
                in_map = in_map & (kp2 >= 0) & (kp2 < lg2)
                ki0 = kp0 * D0 + g0
                ki1 = kp1 * D1 + g1
                ki2 = kp2 * D2 + g2
                k_off = ki0 * sk0 + ki1 * sk1 + ki2 * sk2
                kt = tl.load(
                    Kp + k_off[None, :] + dq_[:, None] * skd,
                    mask=in_map[None, :] & (dq_[:, None] < dk_real),
                    other=0.0,
                )
                if IEEE:
                    s = tl.dot(q, kt, input_precision="ieee")
                else:
                    s = tl.dot(q, kt)
                if not FOLD:
                    s = s * scale2
                if HAS_BIAS:
                    tt = ((kp0[None, :] - st0[:, None]) * K1 + (kp1[None, :] - st1[:, None])) * K2
                    tt = tt + (kp2[None, :] - st2[:, None])
                    bv = tl.load(bias_row[:, None] + tt, mask=mask, other=0.0)
                    s = s + bv.to(tl.float32) * 1.4426950408889634
                if HAS_RPB:
                    if RPB_BLOCKS:
                        mb = ((j0 - lo0) // KB0 * NM1 + (j1 - lo1) // KB1) * NM2
                        mb = mb + (j2 - lo2) // KB2
                        blk = rpb_h + mb * (BLOCK_M * BLOCK_N)
                        rv = tl.load(blk + r[:, None] * BLOCK_N + c[None, :])
                    else:
                        rk = (kp0 * T1 + kp1) * T2 + kp2
                        rv = tl.load(rpb_h + (rq[:, None] + rk[None, :]), mask=mask, other=0.0)
                    s = s + rv.to(tl.float32) * 1.4426950408889634
                s = tl.where(mask, s, float("-inf"))
                v_off = ki0 * sv0 + ki1 * sv1 + ki2 * sv2
                vv = tl.load(
                    V + v_off[:, None] + dv_[None, :] * svd,
                    mask=in_map[:, None] & (dv_[None, :] < dv_real),
                    other=0.0,
                )
                if BWD:
                    p = _exp2_shifted(s, scale2, lse2[:, None], FOLD)
                    if IEEE:
                        dp = tl.dot(do, tl.trans(vv), input_precision="ieee")
                    else:
                        dp = tl.dot(do, tl.trans(vv))
                    ds = p * (dp - delta[:, None])
                    if DRPB_BLOCKS:
                        # contiguous [rows, keys] block: coalesced atomics, unlike [N, K]
                        dptr = drpb_h + mb * (BLOCK_M * BLOCK_N) + r[:, None] * BLOCK_N
                        tl.atomic_add(dptr + c[None, :], ds, mask=mask, sem="relaxed")
                    if WRITE_DBIAS:
                        tt2 = (kp0[None, :] - st0[:, None]) * K1 + (kp1[None, :] - st1[:, None])
                        tt2 = tt2 * K2 + (kp2[None, :] - st2[:, None])
                        dbias_row = DBIAS + qflat * KT
                        if ATOMIC_DBIAS:
                            tl.atomic_add(dbias_row[:, None] + tt2, ds, mask=mask, sem="relaxed")
                        else:
                            tl.store(dbias_row[:, None] + tt2, ds, mask=mask)
                    if IEEE:
                        dq_acc += tl.dot(ds, tl.trans(kt), input_precision="ieee")
                    else:
                        dq_acc += tl.dot(ds.to(kt.dtype), tl.trans(kt))
                else:
                    m_new = tl.maximum(m_i, _scaled_max(s, 1, scale2, FOLD))
                    p = _exp2_shifted(s, scale2, m_new[:, None], FOLD)
                    alpha = tl.exp2(m_i - m_new)
                    l_i = l_i * alpha + tl.sum(p, 1)
                    acc = acc * alpha[:, None]
                    if IEEE:
                        acc += tl.dot(p, vv, input_precision="ieee")
                    else:
                        acc += tl.dot(p.to(vv.dtype), vv)
                    m_i = m_new

    if BWD:
        dq_acc = dq_acc * (scale2 * 0.6931471805599453)
        dq_off = qi0 * sg0 + qi1 * sg1 + qi2 * sg2
        tl.store(
            DQ + dq_off[:, None] + dq_[None, :] * sgd,
            dq_acc.to(DQ.dtype.element_ty),
            mask=row_ok[:, None] & (dq_[None, :] < dk_real),
        )
    else:
        l_safe = tl.where(row_ok, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(
            Out + o_row[:, None] + dv_[None, :] * sod,
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & (dv_[None, :] < dv_real),
        )
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
        tl.store(LSE + lse_off, lse, mask=row_ok)


# ----------------------------------------------------------------------------- dk / dv
@triton.jit(do_not_specialize=_SIZES)
def _na_bwd_kv_kernel(
    Q, Kp, V, LSE, BIAS, RPB, DO, DELTA, DK_, DV_,
    sqb, sq0, sq1, sq2, sqh, sqd,
    skb, sk0, sk1, sk2, skh, skd,
    svb, sv0, sv1, sv2, svh, svd,
    sob, so0, so1, so2, soh, sod,
    sgb, sg0, sg1, sg2, sgh, sgd,
    shb, sh0, sh1, sh2, shh, shd,
    sbb, sbh, srh,
    H, L0, L1, L2, K0, K1, K2, S0, S1, S2, D0, D1, D2,
    NT0, NT1, NT2,
    scale2, dk_real, dv_real,
    C0, C1, C2, ZERO,
    HAS_BIAS: tl.constexpr, HAS_RPB: tl.constexpr, RPB_BLOCKS: tl.constexpr,
    KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr,
    QB0: tl.constexpr, QB1: tl.constexpr, QB2: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, IEEE: tl.constexpr, FOLD: tl.constexpr = False,
):  # fmt: skip
    """dK and dV of one key tile. ``RPB_BLOCKS``: ``RPB`` holds the rpb values already laid
    out per (query block, key, query) (:func:`_rpb_kv_blocks`), read as contiguous blocks."""
    BLOCK_N: tl.constexpr = KT0 * KT1 * KT2
    BLOCK_M: tl.constexpr = QB0 * QB1 * QB2
    pid = tl.program_id(0)
    h = pid % H
    g0, g1, g2, t0, t1, t2 = _tile_ids(pid // H, NT0, NT1, NT2, D1, D2)
    b = tl.program_id(1).to(tl.int64)
    lg0 = (L0 - g0 + D0 - 1) // D0
    lg1 = (L1 - g1 + D1 - 1) // D1
    lg2 = (L2 - g2 + D2 - 1) // D2
    NTOK = L0 * L1 * L2
    # 64-bit scalar bases per (batch, head), 32-bit offsets inside (see the forward kernel)
    Q += b * sqb + h * sqh
    Kp += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sob + h * soh
    DK_ += b * sgb + h * sgh
    DV_ += b * shb + h * shh
    LSE += b * NTOK * H + h
    DELTA += b * NTOK * H + h
    BIAS += b * sbb + h * sbh

    c = tl.arange(0, BLOCK_N)
    c0, c1, c2 = _decode3(c, KT1, KT2)
    kp0 = t0 * KT0 + c0
    kp1 = t1 * KT1 + c1
    kp2 = t2 * KT2 + c2
    key_ok = (kp0 < lg0) & (kp1 < lg1) & (kp2 < lg2)
    ki0 = kp0 * D0 + g0
    ki1 = kp1 * D1 + g1
    ki2 = kp2 * D2 + g2
    dq_ = tl.arange(0, DK)
    dv_ = tl.arange(0, DV)
    k_off = ki0 * sk0 + ki1 * sk1 + ki2 * sk2
    kk = tl.load(
        Kp + k_off[:, None] + dq_[None, :] * skd,
        mask=key_ok[:, None] & (dq_[None, :] < dk_real),
        other=0.0,
    )
    v_off = ki0 * sv0 + ki1 * sv1 + ki2 * sv2
    vv = tl.load(
        V + v_off[:, None] + dv_[None, :] * svd,
        mask=key_ok[:, None] & (dv_[None, :] < dv_real),
        other=0.0,
    )
    dk_acc = tl.zeros([BLOCK_N, DK], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, DV], dtype=tl.float32)

    # Queries that can see this key tile lie within kernel - 1 of it on every axis.
    lo0 = t0 * KT0 - K0 + 1
    lo1 = t1 * KT1 - K1 + 1
    lo2 = t2 * KT2 - K2 + 1
    if not RPB_BLOCKS:
        lo0 = tl.maximum(lo0, 0)
        lo1 = tl.maximum(lo1, 0)
        lo2 = tl.maximum(lo2, 0)
    # else query blocks keep the same offsets from every key tile, so the rpb values of
    # (query block n, key, query) are one precomputed block per n; rows above the map masked
    hi0 = tl.minimum(t0 * KT0 + KT0 + K0 - 1, lg0)
    hi1 = tl.minimum(t1 * KT1 + KT1 + K1 - 1, lg1)
    hi2 = tl.minimum(t2 * KT2 + KT2 + K2 - 1, lg2)
    KT = K0 * K1 * K2
    if HAS_RPB:
        rpb_h = RPB + h * srh
        if RPB_BLOCKS:
            NB1 = (KT1 + 2 * K1 - 2 + QB1 - 1) // QB1
            NB2 = (KT2 + 2 * K2 - 2 + QB2 - 1) // QB2
        else:
            T1 = 2 * K1 - 1
            T2 = 2 * K2 - 1
            rk = ((kp0 + K0 - 1) * T1 + (kp1 + K1 - 1)) * T2 + (kp2 + K2 - 1)

    r = tl.arange(0, BLOCK_M)
    r0, r1, r2 = _decode3(r, QB1, QB2)
    # window membership per axis as one unsigned compare (0 <= key - lo <= hi - lo); keys
    # past the map and padding queries are folded into the per-key / per-query operands
    km0 = tl.where(key_ok, kp0, -(1 << 30))
    for i0 in range(lo0, hi0, QB0):
        qp0 = i0 + r0
        st0, wl0, wh0 = _window(qp0, lg0, K0, S0, C0, ZERO)
        ww0 = (wh0 - wl0).to(tl.uint32, bitcast=True)
        m0 = (km0[:, None] - wl0[None, :]).to(tl.uint32, bitcast=True) <= ww0[None, :]
        for i1 in range(lo1, hi1, QB1):
            qp1 = i1 + r1
            st1, wl1, wh1 = _window(qp1, lg1, K1, S1, C1, ZERO)
            ww1 = (wh1 - wl1).to(tl.uint32, bitcast=True)
            m01 = m0 & ((kp1[:, None] - wl1[None, :]).to(tl.uint32, bitcast=True) <= ww1[None, :])
            for i2 in range(lo2, hi2, QB2):
                qp2 = i2 + r2
                st2, wl2, wh2 = _window(qp2, lg2, K2, S2, C2, ZERO)
                q_ok = (qp0 < hi0) & (qp1 < hi1) & (qp2 < hi2)
                if RPB_BLOCKS:
                    q_ok = q_ok & (qp0 >= 0) & (qp1 >= 0) & (qp2 >= 0)
                ww2 = tl.where(q_ok, wh2 - wl2, 0).to(tl.uint32, bitcast=True)
                wm2 = tl.where(q_ok, wl2, -(1 << 30))
                mask = m01 & (
                    (kp2[:, None] - wm2[None, :]).to(tl.uint32, bitcast=True) <= ww2[None, :]
                )
                qi0 = qp0 * D0 + g0
                qi1 = qp1 * D1 + g1
                qi2 = qp2 * D2 + g2
                q_off = qi0 * sq0 + qi1 * sq1 + qi2 * sq2
                qt = tl.load(
                    Q + q_off[None, :] + dq_[:, None] * sqd,
                    mask=q_ok[None, :] & (dq_[:, None] < dk_real),
                    other=0.0,
                )
                o_off = qi0 * so0 + qi1 * so1 + qi2 * so2
                dot_ = tl.load(
                    DO + o_off[None, :] + dv_[:, None] * sod,
                    mask=q_ok[None, :] & (dv_[:, None] < dv_real),
                    other=0.0,
                )
                qflat = (qi0 * L1 + qi1) * L2 + qi2
                lse_off = qflat * H
                lse2 = tl.load(LSE + lse_off, mask=q_ok, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTA + lse_off, mask=q_ok, other=0.0)
                if IEEE:
                    st = tl.dot(kk, qt, input_precision="ieee")
                else:
                    st = tl.dot(kk, qt)
                if not FOLD:
                    st = st * scale2
                if HAS_BIAS:
                    tt = ((kp0[:, None] - st0[None, :]) * K1 + (kp1[:, None] - st1[None, :])) * K2
                    tt = tt + (kp2[:, None] - st2[None, :])
                    bptr = BIAS + qflat[None, :] * KT + tt
                    bv = tl.load(bptr, mask=mask, other=0.0)
                    st = st + bv.to(tl.float32) * 1.4426950408889634
                if HAS_RPB:
                    if RPB_BLOCKS:
                        nb = (((i0 - lo0) // QB0) * NB1 + (i1 - lo1) // QB1) * NB2
                        nb = nb + (i2 - lo2) // QB2
                        blk = rpb_h + nb * (BLOCK_N * BLOCK_M)
                        rv = tl.load(blk + c[:, None] * BLOCK_M + r[None, :])
                    else:
                        rq = (qp0 * T1 + qp1) * T2 + qp2
                        rv = tl.load(rpb_h + (rk[:, None] - rq[None, :]), mask=mask, other=0.0)
                    st = st + rv.to(tl.float32) * 1.4426950408889634
                pt = tl.where(mask, _exp2_shifted(st, scale2, lse2[None, :], FOLD), 0.0)
                if IEEE:
                    dv_acc += tl.dot(pt, tl.trans(dot_), input_precision="ieee")
                    dpt = tl.dot(vv, dot_, input_precision="ieee")
                else:
                    dv_acc += tl.dot(pt.to(dot_.dtype), tl.trans(dot_))
                    dpt = tl.dot(vv, dot_)
                dst = pt * (dpt - delta[None, :])
                if IEEE:
                    dk_acc += tl.dot(dst, tl.trans(qt), input_precision="ieee")
                else:
                    dk_acc += tl.dot(dst.to(qt.dtype), tl.trans(qt))

    dk_acc = dk_acc * (scale2 * 0.6931471805599453)
    dk_off = ki0 * sg0 + ki1 * sg1 + ki2 * sg2
    tl.store(
        DK_ + dk_off[:, None] + dq_[None, :] * sgd,
        dk_acc.to(DK_.dtype.element_ty),
        mask=key_ok[:, None] & (dq_[None, :] < dk_real),
    )
    dv_off = ki0 * sh0 + ki1 * sh1 + ki2 * sh2
    tl.store(
        DV_ + dv_off[:, None] + dv_[None, :] * shd,
        dv_acc.to(DV_.dtype.element_ty),
        mask=key_ok[:, None] & (dv_[None, :] < dv_real),
    )


# ----------------------------------------------------------------------------- window tiling
# When the windows tile the map exactly (kernel = stride on every axis, no causal axis, every
# dilation group a whole number of windows: MaxViT block and grid, Swin/LITv2/EfficientViT
# windows), a window's queries see exactly that window's keys and nothing else. One program
# then owns whole windows: q, k, v are read once, the scores are one dense block, the softmax
# needs no online rescaling, and the backward needs no second pass over overlapping windows
# (dq, dk, dv of a window come from that window alone). The rpb values depend only on the
# (query, key) positions inside the window, so a program gathers them once and reuses them
# for every batch element it loops over; their gradient is summed in registers over that loop.
_WIN_SIZES = ["B", "H", "NTOK", "L1", "L2", "K0", "K1", "K2", "D0", "D1", "D2", "NW1", "NW2",
              "NWIN", "BPER"]  # fmt: skip


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit(do_not_specialize=_WIN_SIZES)
def _na_win_kernel(
    Q, Kp, V, Out, LSE, BIAS, RPB, DO, DLSE, DQ, DK_, DV_, DSB, DTILE,
    sqb, sq0, sq1, sq2, sqh, sqd,
    skb, sk0, sk1, sk2, skh, skd,
    svb, sv0, sv1, sv2, svh, svd,
    sob, so0, so1, so2, soh, sod,
    sgb, sg0, sg1, sg2, sgh, sgd,
    shb, sh0, sh1, sh2, shh, shd,
    sbb, sbh, srh,
    B, H, NTOK, L1, L2, K0, K1, K2, D0, D1, D2, NW1, NW2, NWIN, BPER,
    scale2, dk_real, dv_real,
    HAS_BIAS: tl.constexpr, HAS_RPB: tl.constexpr, HAS_DLSE: tl.constexpr,
    BWD: tl.constexpr, DBIAS_MODE: tl.constexpr, WRITE_DTILE: tl.constexpr,
    P: tl.constexpr, WP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    IEEE: tl.constexpr, FOLD: tl.constexpr = False,
):  # fmt: skip
    """Whole-window attention: ``P`` windows of ``WP`` (padded) tokens per program, looping
    over ``BPER`` batch elements. Forward writes O and LSE; ``BWD`` writes dq, dk, dv and, per
    ``DBIAS_MODE``, the logit gradient dS in ``[B, h, N, K]`` layout (1: per batch element,
    2: summed over this program's batch elements into ``[splits, h, N, K]``); ``WRITE_DTILE``
    sums dS per (query position, key position) of the window into ``[tiles, splits, h, WP,
    WP]`` (the rpb gradient before its scatter onto the table)."""
    BM: tl.constexpr = P * WP
    pid = tl.program_id(0)
    h = pid % H
    tile = pid // H
    split = tl.program_id(1)
    b_lo = split * BPER
    b_hi = tl.minimum(b_lo + BPER, B)
    KT = K0 * K1 * K2

    r = tl.arange(0, BM)
    slot = r // WP
    pos = r % WP
    w = tile * P + slot
    ok = (pos < KT) & (w < NWIN)
    # window -> (group, window in group) per axis; position in window -> offsets
    w2 = w % NW2
    w1 = (w // NW2) % NW1
    w0 = w // (NW2 * NW1)
    p2 = pos % K2
    p1 = (pos // K2) % K1
    p0 = pos // (K2 * K1)
    i0 = ((w0 // D0) * K0 + p0) * D0 + w0 % D0
    i1 = ((w1 // D1) * K1 + p1) * D1 + w1 % D1
    i2 = ((w2 // D2) * K2 + p2) * D2 + w2 % D2
    qflat = (i0 * L1 + i1) * L2 + i2
    same = (slot[:, None] == slot[None, :]) & ok[None, :]

    dq_ = tl.arange(0, DK)
    dv_ = tl.arange(0, DV)
    qmask = ok[:, None] & (dq_[None, :] < dk_real)
    vmask = ok[:, None] & (dv_[None, :] < dv_real)
    q_off = (i0 * sq0 + i1 * sq1 + i2 * sq2 + h * sqh)[:, None] + dq_[None, :] * sqd
    k_off = (i0 * sk0 + i1 * sk1 + i2 * sk2 + h * skh)[:, None] + dq_[None, :] * skd
    v_off = (i0 * sv0 + i1 * sv1 + i2 * sv2 + h * svh)[:, None] + dv_[None, :] * svd
    o_off = (i0 * so0 + i1 * so1 + i2 * so2 + h * soh)[:, None] + dv_[None, :] * sod
    l_off = qflat * H + h
    if HAS_RPB:
        # relative index (key - query + K - 1) per axis, row-major over the (2K-1) table
        T1 = 2 * K1 - 1
        T2 = 2 * K2 - 1
        rq = ((K0 - 1 - p0) * T1 + (K1 - 1 - p1)) * T2 + (K2 - 1 - p2)
        rk = (p0 * T1 + p1) * T2 + p2
        pair = (pos < KT)[:, None] & (pos < KT)[None, :]
        tb = tl.load(RPB + h * srh + rq[:, None] + rk[None, :], mask=pair, other=0.0)
        tb = tb.to(tl.float32) * 1.4426950408889634
    if HAS_BIAS:
        b_off = h * sbh + qflat[:, None] * KT + pos[None, :]
        bmask = ok[:, None] & same
    if BWD:
        if DBIAS_MODE == 2:
            ds_sum = tl.zeros([BM, BM], dtype=tl.float32)
        if WRITE_DTILE:
            dt_sum = tl.zeros([BM, BM], dtype=tl.float32)

    one64 = tl.full([], 1, tl.int64)  # 64-bit batch offsets (the interpreter's loop var is int)
    for b in range(b_lo, b_hi):
        bb = b * one64
        q = tl.load(Q + bb * sqb + q_off, mask=qmask, other=0.0)
        k = tl.load(Kp + bb * skb + k_off, mask=qmask, other=0.0)
        v = tl.load(V + bb * svb + v_off, mask=vmask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE)
        if not FOLD:
            s = s * scale2
        if HAS_RPB:
            s = s + tb
        if HAS_BIAS:
            bv = tl.load(BIAS + bb * sbb + b_off, mask=bmask, other=0.0)
            s = s + bv.to(tl.float32) * 1.4426950408889634
        # -1e30, not -inf: a padding window has no valid key, and its rows must stay finite
        s = tl.where(same, s, -1.0e30)
        lrow = bb * NTOK * H + l_off
        if BWD:
            do = tl.load(DO + bb * sob + o_off, mask=vmask, other=0.0)
            o = tl.load(Out + bb * sob + o_off, mask=vmask, other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            if HAS_DLSE:
                delta = delta - tl.load(DLSE + lrow, mask=ok, other=0.0)
            lse2 = tl.load(LSE + lrow, mask=ok, other=0.0) * 1.4426950408889634
            p = tl.where(same, _exp2_shifted(s, scale2, lse2[:, None], FOLD), 0.0)
            dv = _dot(tl.trans(p.to(do.dtype)), do, IEEE)
            dp = _dot(do, tl.trans(v), IEEE)
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(k.dtype), k, IEEE) * (scale2 * 0.6931471805599453)
            dk = _dot(tl.trans(ds.to(q.dtype)), q, IEEE) * (scale2 * 0.6931471805599453)
            g_off = (i0 * sg0 + i1 * sg1 + i2 * sg2 + h * sgh)[:, None] + dq_[None, :] * sgd
            tl.store(DQ + bb * sgb + g_off, dq.to(DQ.dtype.element_ty), mask=qmask)
            tl.store(DK_ + bb * sgb + g_off, dk.to(DK_.dtype.element_ty), mask=qmask)
            e_off = (i0 * sh0 + i1 * sh1 + i2 * sh2 + h * shh)[:, None] + dv_[None, :] * shd
            tl.store(DV_ + bb * shb + e_off, dv.to(DV_.dtype.element_ty), mask=vmask)
            if DBIAS_MODE == 1:
                ds_row = (bb * H + h) * NTOK * KT + qflat * KT
                tl.store(DSB + ds_row[:, None] + pos[None, :], ds, mask=ok[:, None] & same)
            if DBIAS_MODE == 2:
                ds_sum += ds
            if WRITE_DTILE:
                dt_sum += ds
        else:
            m = _scaled_max(s, 1, scale2, FOLD)
            pe = _exp2_shifted(s, scale2, m[:, None], FOLD)
            l_i = tl.sum(pe, 1)
            o = _dot(pe.to(v.dtype), v, IEEE) / l_i[:, None]
            tl.store(Out + bb * sob + o_off, o.to(Out.dtype.element_ty), mask=vmask)
            tl.store(LSE + lrow, (m + tl.log2(l_i)) * 0.6931471805599453, mask=ok)

    if BWD:
        if DBIAS_MODE == 2:
            ds_row = (split.to(tl.int64) * H + h) * NTOK * KT + qflat * KT
            tl.store(DSB + ds_row[:, None] + pos[None, :], ds_sum, mask=ok[:, None] & same)
        if WRITE_DTILE:
            if P == 1:
                folded = dt_sum
            else:
                # off-diagonal (window, window) blocks are zero: summing both window axes
                # adds up the P diagonal blocks
                folded = tl.sum(tl.sum(tl.reshape(dt_sum, [P, WP, P, WP]), 2), 0)
            wr = tl.arange(0, WP)
            t_off = ((tile * tl.num_programs(1) + split) * H + h).to(tl.int64) * (WP * WP)
            tl.store(DTILE + t_off + wr[:, None] * WP + wr[None, :], folded)


# ----------------------------------------------------------------------------- host side
def _pad3(vals: tuple, n: int, fill) -> tuple:
    return (fill,) * (3 - n) + tuple(vals)


def _lg_max(L: int, d: int) -> int:
    return -(-L // d)


def _tile(lg: int, want: int) -> int:
    return max(1, min(want, next_pow2(lg, 1)))


# Tile boxes per rank (measured on H200, see NOTES.md); _TUNE overrides them for
# experiments: keys "tq", "kb", "kt", "qb", "dq_kb" (3-tuples), "warps", "stages", "bwd_warps",
# "dq_warps", "dq_stages", "maxnreg", "bwd_maxnreg", "dq_maxnreg", "no_cap", "no_fold";
# "no_rpb_blocks" (gather rpb from the table), "nk_drpb" (rpb's
# gradient through [1, h, N, K] dS atomics instead of the blocks layout).
_TUNE: dict = {}
_DEFAULT_TILES = {1: (1, 1, 64), 2: (1, 8, 8), 3: (4, 4, 4)}
# dk/dv pass query blocks. 2-D: 8x16 measured 10-25% faster than 8x8 while the head-dim
# loads were scalar (session 1). With them vectorised (session 6, H200), 8x8 together with
# _launch_opts' 2 warps (heads <= 32) or 1 stage (heads >= 64) beat 8x16 by 11-44% on the
# 2-D benchmark problems; 8x8 alone at 4 warps was slower for d32 (667 vs 584 us, 56x56 k7).
_DEFAULT_QB = {1: (1, 1, 64), 2: (1, 8, 8), 3: (4, 4, 4)}


def _head_pads(dk: int, dv: int) -> tuple[int, int]:
    """Padded (power-of-two >= 16) head dims. On H200 (Triton 3.6) fp16/bf16 kernels with a
    padded v head narrower than the q/k head (e.g. 64/32, 32/16) gave wrong results or illegal
    addresses while every dv >= dk case was right, so v is padded to at least q/k's width."""
    dkp, dvp = next_pow2(dk), next_pow2(dv)
    return dkp, max(dvp, dkp)


def _launch_opts(
    bwd: bool,
    ieee: bool,
    n: int,
    head: int,
    gathers: bool,
    rpb_blocks: bool = False,
    dq: bool = False,
    attn_bias: bool = False,
) -> dict:
    """num_warps / num_stages / maxnreg of one general-kernel launch (the window kernel has
    its own). ``gathers``: the launch reads a logit bias (any kernel) or the rpb table
    (forward/dq); ``rpb_blocks``: it reads precomputed rpb blocks instead; ``dq``: the dq
    pass (``bwd`` covers it and the dk/dv pass); ``attn_bias``: it reads an attn_bias."""
    opts = {}
    if ieee and head >= 64:  # fp32 tiles with wide heads overflow shared memory when pipelined
        opts["num_stages"] = 1
    if rpb_blocks and n == 2 and head <= 32 and not ieee:
        # 2 stages (H200, B128 NAT-mini stages 56/28/14): dq + dk/dv 1881 -> 1622,
        # 1156 -> 1005, 550 -> 482 us; forward 430 -> 406, 245 -> 229, 148 -> 143 (session 7,
        # kernels/NOTES.md). The dk/dv launch reading rpb blocks too: B64 56x56 k7 backward
        # 871 -> 821 us (session 11).
        opts["num_stages"] = 2
    if not bwd and not gathers and n == 2 and head <= 32 and not ieee:
        # 2 stages for the unbiased forward: 56x56 k7 B64 125 -> 118 us, 128x128 k7
        # 318 -> 300, HaloNet 64 162 -> 154 (H200, CUDA graph, session 11)
        opts["num_stages"] = 2
    if n == 2 and head <= 32 and not ieee:
        # 2 warps: 56x56 k7 d32 forward 156 -> 131 us, backward 584 -> 488 (with 8x8 query
        # blocks), HaloNet and 128x128 likewise; 64-wide heads and up lose (H200, session 6).
        # Gathered [M, N] bias loads (and the dq pass's dS stores) need 4 warps' registers:
        # NAT-mini's forward + dq kernels took 51 ms per training step with 2 warps against
        # 19 with 4 (rpb); HaloNet50ts's dk/dv kernel 34 against 3.1 ms (attn_bias). With rpb
        # alone the dk/dv kernel measured faster at 2 warps (NAT-mini: 11.1 ms against 12.3
        # with 4 warps, 24 with 4 warps and 8x16 query blocks), so rpb counts as a gather
        # only for the forward/dq kernel.
        opts["num_warps"] = 4 if gathers else 2
    if n == 2 and not ieee:
        # A register cap trades a few spills for resident programs: the 2-D forward held
        # 247 registers at 2 warps (4 programs of 64 threads per SM, 12% warps active, stalls
        # on fixed-latency dependencies; ncu, session 11). H200, CUDA-graph us, default ->
        # capped: forward, heads <= 32 at 168: 56x56 k7 119 -> 108, + rpb 214 -> 178,
        # 128x128 k7 301 -> 271, HaloNet 156 -> 140; 64-wide at 128: 128x128 k13 365 -> 292.
        # dq pass reading rpb blocks at 128: 827 -> 777 (56x56 k7 dq + dk/dv); 64-wide at 168:
        # 1481 -> 1381. 128-wide heads, the dk/dv pass and the unbiased narrow dq pass lost
        # or stayed within 2% with any cap. Launches gathering an attn_bias stay uncapped:
        # HaloNet50ts inference fell 7198 -> 6459 img/s with the cap (session 11,
        # kernels/NOTES.md).
        cap = None
        if not bwd:
            cap = 168 if head <= 32 else 128 if head <= 64 else None
        elif dq:
            cap = (128 if rpb_blocks else None) if head <= 32 else 168 if head <= 64 else None
        if cap and not attn_bias and not _TUNE.get("no_cap") and has_maxnreg():
            opts["maxnreg"] = cap
    if bwd and head >= 64:
        # the dk/dv pass spills at 255 registers; without the pipeline's extra buffers it
        # ran 128x128 k13 d64 2.65 -> 1.49 ms and 64x64 k9 d128 0.39 -> 0.22 ms (H200)
        opts["num_stages"] = 1
    w = _TUNE.get("bwd_warps" if bwd else "warps")
    if w:
        opts["num_warps"] = w
    if _TUNE.get("stages"):
        opts["num_stages"] = _TUNE["stages"]
    if _TUNE.get("bwd_maxnreg" if bwd else "maxnreg"):
        opts["maxnreg"] = _TUNE["bwd_maxnreg" if bwd else "maxnreg"]
    return opts


# Key blocks of the forward/dq kernel when it reads the rpb table (2-D): two rows of 16
# keys. Per (query, key) the table index is row-major in the key position, so 16 keys along
# a row are 16 adjacent table entries; 8x8 blocks scattered the gather over 8 table rows.
# H200, bf16, 56x56 k7 B64 h2 d32 + rpb: forward 877 -> 236 us, dq + dk/dv 1.87 -> 1.53 ms;
# 14x14 B128 h8: 578 -> 135 us (session 6). Without a bias 8x8 stays faster (131 vs 137 us).
_RPB_KB2 = (1, 2, 16)


def _fwd_config(L, K, S, D, n, rpb: bool = False, want_kb: tuple | None = None):
    """Query tile box, its step per axis and the key block box (``want_kb``: the key block
    wanted instead of the defaults, fitted to the map like them)."""
    want_q = _TUNE.get("tq", _DEFAULT_TILES[n]) if n == 2 else _DEFAULT_TILES[n]
    want_k = want_q
    if n == 2:
        want_k = want_kb or _TUNE.get("kb", _RPB_KB2 if rpb else want_q)
    tq = [_tile(_lg_max(L[a], D[a]), want_q[a]) for a in range(3)]
    # at least 16 rows for tl.dot: grow the innermost non-trivial axis
    while math.prod(tq) < 16:
        a = max(i for i in range(3) if L[i] > 1) if any(x > 1 for x in L) else 2
        tq[a] *= 2
    qstep = []
    for a in range(3):
        step = tq[a]
        if S[a] > 1 and S[a] <= tq[a]:
            step = (tq[a] // S[a]) * S[a]  # tiles follow stride groups
        qstep.append(step)
    kb = []
    for a in range(3):
        extent = min(_lg_max(L[a], D[a]) + K[a], qstep[a] + S[a] + K[a])
        kb.append(_tile(extent, want_k[a]))
    while math.prod(kb) < 16:
        a = max(i for i in range(3) if L[i] > 1) if any(x > 1 for x in L) else 2
        kb[a] *= 2
    return tuple(tq), tuple(qstep), tuple(kb)


def _kv_config(L, K, D, n):
    default_q = _DEFAULT_QB[n]
    want = _TUNE.get("kt", _DEFAULT_TILES[n]) if n == 2 else _DEFAULT_TILES[n]
    want_q = _TUNE.get("qb", default_q) if n == 2 else default_q
    kt = [_tile(_lg_max(L[a], D[a]), want[a]) for a in range(3)]
    qb = [_tile(_lg_max(L[a], D[a]), want_q[a]) for a in range(3)]
    for box in (kt, qb):
        while math.prod(box) < 16:
            a = max(i for i in range(3) if L[i] > 1) if any(x > 1 for x in L) else 2
            box[a] *= 2
    return tuple(kt), tuple(qb)


def _geometry(q: Tensor, p: NAParams):
    n = q.dim() - 3
    L = _pad3(q.shape[1 : 1 + n], n, 1)
    K = _pad3(p.kernel_size, n, 1)
    S = _pad3(p.stride, n, 1)
    D = _pad3(p.dilation, n, 1)
    C = _pad3(p.is_causal, n, False)
    return n, L, K, S, D, C


class _Plan(NamedTuple):
    """Everything about a launch that depends only on shapes, dtype and parameters."""

    n: int
    geo: tuple  # H, L0..2, K0..2, S0..2, D0..2
    flags: tuple  # C0, C1, C2, ZERO (runtime ints)
    any_causal: bool
    scale2: float
    dk: int
    dv: int
    dkp: int
    dvp: int
    ieee: bool
    fwd_grid: tuple
    fwd_sizes: tuple  # NT0..2, QSTEP0..2
    fwd_consts: dict  # constexpr tiles and head dims of the forward/dq kernel
    kv_grid: tuple
    kv_sizes: tuple  # NT0..2 of key tiles
    kv_consts: dict  # the same for the dk/dv kernel
    ntok: int
    kt: int
    metas: dict  # per kernel-flag combination: DirectLauncher meta (filled lazily)
    rpb_kb: dict  # KB0..2 of the forward/dq kernel when it gathers from the rpb table
    rpb_block_kb: dict  # the same when it reads precomputed rpb blocks
    rpb_dq_kb: dict  # the same in the dq pass


@functools.lru_cache(maxsize=1024)
def _plan_cached(shape: tuple, dv: int, dtype: torch.dtype, p: NAParams, tune: tuple) -> _Plan:
    n = len(shape) - 3
    L = _pad3(shape[1 : 1 + n], n, 1)
    K = _pad3(p.kernel_size, n, 1)
    S = _pad3(p.stride, n, 1)
    D = _pad3(p.dilation, n, 1)
    C = _pad3(p.is_causal, n, False)
    B, H, dk = shape[0], shape[-2], shape[-1]
    dkp, dvp = _head_pads(dk, dv)
    ieee = dtype == torch.float32
    tq, qstep, kb = _fwd_config(L, K, S, D, n)
    rkb = _fwd_config(L, K, S, D, n, rpb=True)[2]
    # With precomputed rpb blocks nothing is gathered, so heads <= 32 keep the unbiased key
    # blocks: 56x56 k7 d32 B128 forward 868 -> 429 us (8x8 against 2x16), 28x28 519 -> 244;
    # 128x128 k13 d64 went the other way (735 us with 2x16, 890 with 8x8; H200, session 7).
    bkb = kb if max(dkp, dvp) <= 32 else rkb
    # The dq pass (dS, dq and the dS stores of rpb's gradient live at once) spilled 182
    # registers with 8x8 key blocks; single rows of 16 keys do not: dq + dk/dv at 56x56 k7
    # d32 B128 2358 -> 1923 us, 28x28 1365 -> 1161, 14x14 744 -> 539 (H200, session 7)
    qkb = bkb
    if n == 2 and max(dkp, dvp) <= 32:
        qkb = _fwd_config(L, K, S, D, n, want_kb=_TUNE.get("dq_kb", (1, 1, 16)))[2]
    nt = tuple(-(-_lg_max(L[a], D[a]) // qstep[a]) for a in range(3))
    ktile, qb = _kv_config(L, K, D, n)
    ntk = tuple(-(-_lg_max(L[a], D[a]) // ktile[a]) for a in range(3))
    tiles = dict(TQ0=tq[0], TQ1=tq[1], TQ2=tq[2], KB0=kb[0], KB1=kb[1], KB2=kb[2])
    return _Plan(
        n=n, geo=(H, *L, *K, *S, *D), flags=(*(int(c) for c in C), int(p.zero_border)),
        any_causal=any(C), scale2=p.scale * _LOG2E, dk=dk, dv=dv, dkp=dkp, dvp=dvp, ieee=ieee,
        fwd_grid=(math.prod(nt) * math.prod(D) * H, B), fwd_sizes=(*nt, *qstep),
        fwd_consts=dict(tiles, DK=dkp, DV=dvp, IEEE=ieee),
        kv_grid=(math.prod(ntk) * math.prod(D) * H, B), kv_sizes=ntk,
        kv_consts=dict(
            KT0=ktile[0], KT1=ktile[1], KT2=ktile[2], QB0=qb[0], QB1=qb[1], QB2=qb[2],
            DK=dkp, DV=dvp, IEEE=ieee,
        ),
        ntok=math.prod(L), kt=math.prod(K), metas={},
        rpb_kb=dict(KB0=rkb[0], KB1=rkb[1], KB2=rkb[2]),
        rpb_block_kb=dict(KB0=bkb[0], KB1=bkb[1], KB2=bkb[2]),
        rpb_dq_kb=dict(KB0=qkb[0], KB1=qkb[1], KB2=qkb[2]),
    )  # fmt: skip


def _plan(q: Tensor, dv: int, p: NAParams) -> _Plan:
    # _TUNE is part of the key so experiments that edit it see fresh plans
    tune = tuple(sorted(_TUNE.items())) if _TUNE else ()
    return _plan_cached(tuple(q.shape), dv, q.dtype, p, tune)


def _strides_of(t: Tensor, n: int) -> tuple[int, ...]:
    st = t.stride()
    if n == 2:  # the common case without the generic padding
        return (st[0], 0, st[1], st[2], st[3], st[4])
    return (st[0], *_pad3(st[1 : 1 + n], n, 0), st[-2], st[-1])


def _fold(biased: bool, scale2: float) -> bool:
    """Whether a launch folds the softmax scale into the exponent's FMA (``FOLD``): only
    without a logit bias (bias terms are added to scaled logits) and with a positive scale
    (masked logits are -inf before scaling and the running max is taken on raw logits)."""
    return not biased and scale2 > 0 and not _TUNE.get("no_fold")


def _meta(consts: dict) -> tuple:
    """Split a launch dict into (constexprs, options, hashable key) for :class:`DirectLauncher`."""
    opts = {k: consts.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in consts}
    return consts, opts, (tuple(consts.items()), tuple(opts.items()))


_fwd_launch = DirectLauncher(_na_fwd_kernel, "VISIONATTN_NA_FAST_LAUNCH")
_kv_launch = DirectLauncher(_na_bwd_kv_kernel, "VISIONATTN_NA_FAST_LAUNCH")
_FWD_FLAGS = (
    "HAS_BIAS", "HAS_RPB", "HAS_DLSE", "BWD", "WRITE_DBIAS", "ATOMIC_DBIAS", "RPB_BLOCKS",
    "DRPB_BLOCKS",
)  # fmt: skip


def _flag_meta(pl: _Plan, flags: tuple) -> tuple:
    """The launch meta of one flag combination (8 flags: forward/dq kernel, 3: dk/dv)."""
    m = pl.metas.get(flags)
    if m is None:
        if len(flags) == 8:
            bwd, gathers = flags[3], flags[0] or flags[1]
            d = dict(pl.fwd_consts, **dict(zip(_FWD_FLAGS, flags)))
            d["FOLD"] = _fold(gathers, pl.scale2)
            # the signed two-compare masks for attn_bias launches: HaloNet50ts inference ran
            # 3% slower with the unsigned form (H200, session 11)
            d["UMASK"] = _TUNE.get("umask", not flags[0])
            if flags[1]:
                d.update(pl.rpb_kb)
                if flags[6]:
                    d.update(pl.rpb_dq_kb if bwd else pl.rpb_block_kb)
        else:
            bwd, gathers = True, flags[0]
            d = dict(pl.kv_consts, HAS_BIAS=flags[0], HAS_RPB=flags[1], RPB_BLOCKS=flags[2])
            d["FOLD"] = _fold(flags[0] or flags[1], pl.scale2)
        blocks = flags[6] if len(flags) == 8 else flags[2]
        is_dq = len(flags) == 8 and bwd
        opts = _launch_opts(
            bwd, pl.ieee, pl.n, max(pl.dkp, pl.dvp), gathers, blocks, is_dq, bool(flags[0])
        )
        d.update(opts)
        if len(flags) == 8 and bwd:  # experiment knobs of the dq pass alone
            for key, opt in (
                ("dq_warps", "num_warps"),
                ("dq_stages", "num_stages"),
                ("dq_maxnreg", "maxnreg"),
            ):
                if _TUNE.get(key):
                    d[opt] = _TUNE[key]
        if flags[0] and flags[1]:
            # two gathered [M, N] bias loads per block (attn_bias and the rpb table): the
            # pipeliner stages both in shared memory, which overflowed H200's 227 KB with 3
            # stages (bf16 and fp32, head 32); unpipelined is within limits
            d["num_stages"] = 1
        m = pl.metas[flags] = _meta(d)
    return m


def _bias_args(bias: Tensor | None, q: Tensor):
    """``[B|1, h|1, N, K]`` attn_bias -> (tensor with contiguous ``[N, K]``, batch/head strides)."""
    if bias is None:
        return q, 0, 0  # dummy pointer, never read
    bb, hb, n, kt = bias.shape
    if bias.stride(3) != 1 or bias.stride(2) != kt:
        bias = bias.contiguous()
    sbb = 0 if bb == 1 else bias.stride(0)
    sbh = 0 if hb == 1 else bias.stride(1)
    return bias, sbb, sbh


# The dk/dv kernel's rpb values as contiguous blocks instead of a per-element gather of the
# table: [h, 2k-1, ...] -> [h, query blocks, keys of a tile, queries of a block]. Per head
# this is at most _RPB_BLOCKS_MAX elements (9 x 64 x 64 for a 7x7 kernel with 8x8 tiles).
_RPB_BLOCKS_MAX = 1 << 20


@functools.lru_cache(maxsize=64)
def _rpb_kv_index(K: tuple, KT: tuple, QB: tuple, device: torch.device) -> Tensor:
    """Flat table index of every (query block, key, query) of the dk/dv kernel with
    ``RPB_BLOCKS``: ``[NB0 * NB1 * NB2, prod(KT), prod(QB)]``.

    Per axis, key ``c`` of a tile at ``o`` and query ``r`` of block ``n`` (at
    ``o - (K - 1) + n * QB``) have table index ``K - 1 + key - query = c - n * QB - r +
    2 (K - 1)``. Pairs outside ``[0, 2K - 2]`` are never in one window (clamped; the kernel
    masks them).
    """
    axes, nbs = [], []
    for a in range(3):
        nb = -(-(KT[a] + 2 * K[a] - 2) // QB[a])
        n = torch.arange(nb).view(nb, 1, 1)
        c = torch.arange(KT[a]).view(1, KT[a], 1)
        r = torch.arange(QB[a]).view(1, 1, QB[a])
        axes.append((c - n * QB[a] - r + 2 * (K[a] - 1)).clamp(0, 2 * K[a] - 2))
        nbs.append(nb)
    idx = _flat_table_index(axes, K)
    return idx.reshape(math.prod(nbs), math.prod(KT), math.prod(QB)).to(device)


def _flat_table_index(per_axis: list[Tensor], K: tuple) -> Tensor:
    """Per-axis rpb table rows (three tensors of one rank m, ``[n_1, ..., n_m]`` each) -> flat
    index into the row-major ``prod(2K - 1)`` table, laid out ``[n_1 of axes 0..2, ...,
    n_m of axes 0..2]``."""
    m = per_axis[0].dim()
    idx = torch.zeros((), dtype=torch.long)
    for a in range(3):
        shape = [1] * (3 * m)
        for j in range(m):
            shape[3 * j + a] = per_axis[a].shape[j]
        idx = idx * (2 * K[a] - 1) + per_axis[a].reshape(shape)
    return idx


def _gather_blocks(rpb: Tensor, idx: Tensor) -> tuple[Tensor, int]:
    """(rpb values at ``idx`` per head, head stride). Float32 whatever rpb's dtype: the kernels
    add them in float32, and bfloat16 blocks spilled (56x56 k7 d32 B64 forward 625 us
    against 219 with float32; H200)."""
    blocks = rpb.float().reshape(rpb.shape[0], -1)[:, idx]
    return blocks, blocks.stride(0)


def _rpb_kv_blocks(rpb: Tensor, pl: _Plan) -> tuple[Tensor, int] | None:
    """(blocks ``[h, NB, keys, queries]``, head stride) for the dk/dv kernel, or None when
    they would exceed ``_RPB_BLOCKS_MAX`` per head (the kernel then gathers from the table)."""
    if _TUNE.get("no_rpb_blocks"):
        return None
    c = pl.kv_consts
    K = pl.geo[4:7]
    idx = _rpb_kv_index(
        K, (c["KT0"], c["KT1"], c["KT2"]), (c["QB0"], c["QB1"], c["QB2"]), rpb.device
    )
    if idx.numel() > _RPB_BLOCKS_MAX:
        return None
    return _gather_blocks(rpb, idx)


def _py_window(ip: int, lg: int, K: int, S: int, causal: int, zero: int) -> tuple[int, int]:
    """(lo, hi) of the kernels' ``_window`` for one query (group coordinates)."""
    base = (ip // S) * S
    lead = base + S - 1 if causal else base + S // 2
    if not zero:
        lead = min(lead, lg - 1)
    start = lead - K + 1 if causal else lead - K // 2
    if not zero and not causal:
        start = min(max(start, 0), lg - K)
    lo = start if zero else max(start, 0)
    hi = start + K - 1
    if causal:
        hi = min(hi, ip)
    if not zero:
        hi = min(hi, lg - 1)
    return lo, hi


@functools.lru_cache(maxsize=256)
def _rpb_fwd_index(geo: tuple, flags: tuple, sizes: tuple, tq: tuple, kb: tuple, device):
    """Table index of the forward/dq kernel's rpb blocks and each tile's block-set offset.

    A tile's key box starts at ``lo`` (its first query's window); the rpb value of query row
    ``r`` and key ``c`` of key block ``m`` is, per axis, at ``off + m * KB + c - r + K - 1``
    with ``off = lo - tile start``, which takes few values (interior tiles share one; map
    borders, dilation groups and strides add a few). Blocks are laid out
    ``[NU0, NU1, NU2, NM0, NM1, NM2, rows, keys]`` (``NU``: distinct offsets, ``NM``: most key
    blocks of a tile, per axis). Returns ``(index, tile table, (OB1, OB2, NM1, NM2))`` or None
    when the blocks would exceed ``_RPB_BLOCKS_MAX`` per head. The tile table holds, per axis
    and (group, tile), the element offset of that axis' block set (axes at 0, OB1, OB2).
    """
    L, K, S, D = geo[1:4], geo[4:7], geo[7:10], geo[10:13]
    nt, qstep = sizes[:3], sizes[3:]
    causal, zero = flags[:3], flags[3]
    uidx, offs, nms = [], [], []
    for a in range(3):
        found: dict = {}
        per_tile, nm = [], 1
        for g in range(D[a]):
            lg = -(-(L[a] - g) // D[a])
            for t in range(nt[a]):
                first = t * qstep[a]
                lo = _py_window(first, lg, K[a], S[a], causal[a], zero)[0]
                last = min(first + qstep[a], lg) - 1
                hi = _py_window(last, lg, K[a], S[a], causal[a], zero)[1] + 1
                nm = max(nm, -(-(hi - lo) // kb[a]))
                per_tile.append(found.setdefault(lo - first, len(found)))
        uidx.append(per_tile)
        offs.append(list(found))
        nms.append(nm)
    nu = [len(o) for o in offs]
    rows, keys = math.prod(tq), math.prod(kb)
    if math.prod(nu) * math.prod(nms) * rows * keys > _RPB_BLOCKS_MAX:
        return None
    per_axis = []
    for a in range(3):
        off = torch.tensor(offs[a]).view(-1, 1, 1, 1)
        m = torch.arange(nms[a]).view(1, -1, 1, 1)
        r = torch.arange(tq[a]).view(1, 1, -1, 1)
        c = torch.arange(kb[a]).view(1, 1, 1, -1)
        per_axis.append((off + m * kb[a] + c - r + K[a] - 1).clamp(0, 2 * K[a] - 2))
    idx = _flat_table_index(per_axis, K).reshape(-1)  # [u0..2, m0..2, r0..2, c0..2]
    set_size = math.prod(nms) * rows * keys
    ustride = (nu[1] * nu[2] * set_size, nu[2] * set_size, set_size)
    table = [u * ustride[a] for a in range(3) for u in uidx[a]]
    ob1, ob2 = len(uidx[0]), len(uidx[0]) + len(uidx[1])
    tiles = torch.tensor(table, dtype=torch.int32)
    return idx.to(device), tiles.to(device), (ob1, ob2, nms[1], nms[2])


def _rpb_fwd_args(rpb: Tensor | None, q: Tensor, pl: _Plan, dq: bool = False):
    """(rpb tensor, head stride, tile table, (OB1, OB2, NM1, NM2), block index) of the
    forward/dq kernel: precomputed rpb blocks where they fit (the tile table is then not
    ``q``; the block index maps block elements to the table), else the table itself
    (gathered per element in the kernel; index None)."""
    if rpb is None:
        return q, 0, q, (0, 0, 1, 1), None
    c = pl.fwd_consts
    tq = (c["TQ0"], c["TQ1"], c["TQ2"])
    kbs = pl.rpb_dq_kb if dq else pl.rpb_block_kb
    kb = tuple(kbs[k] for k in ("KB0", "KB1", "KB2"))
    got = None
    if not _TUNE.get("no_rpb_blocks"):
        got = _rpb_fwd_index(pl.geo, pl.flags, pl.fwd_sizes, tq, kb, rpb.device)
    if got is None:
        rpb_t, srh = _rpb_args(rpb, q)
        return rpb_t, srh, q, (0, 0, 1, 1), None
    idx, tiles, args = got
    return *_gather_blocks(rpb, idx), tiles, args, idx


def _rpb_args(rpb: Tensor | None, q: Tensor):
    """``[h, 2k-1, ...]`` table -> (contiguous table, head stride)."""
    if rpb is None:
        return q, 0
    if not rpb.is_contiguous():
        rpb = rpb.contiguous()
    return rpb, rpb.stride(0)


class _WinPlan(NamedTuple):
    """Launch plan of the whole-window kernel (see ``_na_win_kernel``)."""

    n: int
    sizes: tuple  # B, H, NTOK, L1, L2, K0..2, D0..2, NW1, NW2, NWIN
    P: int
    WP: int
    ntiles: int
    fwd_split: tuple  # (splits, batch elements per program)
    bwd_split: tuple
    scale2: float
    dk: int
    dv: int
    ntok: int
    kt: int
    meta: dict  # constexprs + launch options of the forward
    meta_bwd: dict  # the same for the backward
    metas: dict  # per flag combination: DirectLauncher meta (filled lazily)
    status: dict  # "failed": a launch ran out of GPU resources, the general kernels serve it


def _splits(B: int, per: int, target: int) -> tuple[int, int]:
    """Batch splits so that about ``target`` programs run: (splits, batch elements each)."""
    want = max(1, min(B, -(-target // per)))
    bper = -(-B // want)
    return -(-B // bper), bper


@functools.lru_cache(maxsize=1024)
def _win_plan_cached(
    shape: tuple, dv: int, dtype: torch.dtype, p: NAParams, tune: tuple, sms: int
) -> _WinPlan | None:
    t = dict(tune)
    if t.get("no_window"):
        return None
    n = len(shape) - 3
    L = _pad3(shape[1 : 1 + n], n, 1)
    K = _pad3(p.kernel_size, n, 1)
    S = _pad3(p.stride, n, 1)
    D = _pad3(p.dilation, n, 1)
    if any(p.is_causal) or any(L[a] % (K[a] * D[a]) for a in range(3)):
        return None
    # windows tile the map when kernel = stride; with clamped borders also on an axis where
    # each dilation group is a single window (MaxViT grid: stride 1, dilation = map / grid),
    # since every query of the group then sees the whole group whatever the stride
    if any(S[a] != K[a] and (p.zero_border or L[a] != K[a] * D[a]) for a in range(3)):
        return None
    kt = math.prod(K)
    WP = next_pow2(kt, 1)
    if WP > 128:  # one window per program must fit a [WP, WP] score block in registers
        return None
    B, H, dk = shape[0], shape[-2], shape[-1]
    nw = tuple(L[a] // K[a] for a in range(3))
    nwin = math.prod(nw)
    # small windows are packed (block-diagonal scores) up to 64 rows; tl.dot needs >= 16
    P = max(min(t.get("win_rows", 64) // WP, next_pow2(nwin, 1)), -(-16 // WP), 1)
    ntiles = -(-nwin // P)
    dkp, dvp = _head_pads(dk, dv)
    ieee = dtype == torch.float32
    meta = dict(P=P, WP=WP, DK=dkp, DV=dvp, IEEE=ieee)
    rows = P * WP
    if ieee and max(dkp, dvp) >= 64 or rows >= 128:
        meta["num_warps"] = 8
    for key, opt in (("win_warps", "num_warps"), ("win_stages", "num_stages")):
        if t.get(key):
            meta[opt] = t[key]
    # the backward holds five [rows, head] tiles and three [rows, rows] blocks at once: with 4
    # warps it spilled (H200, 64-row MaxViT and LITv2 tiles: 8 warps 0.71 vs 0.79-0.86 ms
    # fwd+bwd; 2 warps 3.5 ms), so it gets 8 warps from 64 rows on
    meta_bwd = dict(meta)
    if rows >= 64:
        meta_bwd["num_warps"] = 8
    if t.get("win_bwd_warps"):
        meta_bwd["num_warps"] = t["win_bwd_warps"]
    per = ntiles * H
    return _WinPlan(
        n=n, sizes=(B, H, math.prod(L), L[1], L[2], *K, *D, nw[1], nw[2], nwin), P=P, WP=WP,
        ntiles=ntiles, fwd_split=_splits(B, per, t.get("win_fwd_target", 8 * sms)),
        bwd_split=_splits(B, per, t.get("win_bwd_target", 4 * sms)), scale2=p.scale * _LOG2E,
        dk=dk, dv=dv, ntok=math.prod(L), kt=kt, meta=meta, meta_bwd=meta_bwd, metas={}, status={},
    )  # fmt: skip


@functools.lru_cache(maxsize=16)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _win_plan(q: Tensor, dv: int, p: NAParams) -> _WinPlan | None:
    tune = tuple(sorted(_TUNE.items())) if _TUNE else ()
    sms = _sm_count(q.device.index or 0) if q.is_cuda else 132
    return _win_plan_cached(tuple(q.shape), dv, q.dtype, p, tune, sms)


@functools.lru_cache(maxsize=64)
def _win_rel(K: tuple, WP: int, device: str) -> tuple[Tensor, Tensor]:
    """(flat ``[WP, WP]`` tile position, flat rpb-table index) of every valid window pair."""
    with torch.inference_mode(False):
        grids = torch.meshgrid(*(torch.arange(k) for k in K), indexing="ij")
        c = torch.stack([g.reshape(-1) for g in grids])  # [3, kt]
        kt = c.shape[1]
        rel = torch.zeros(kt, kt, dtype=torch.long)
        for a in range(3):
            rel = rel * (2 * K[a] - 1) + (c[a][None, :] - c[a][:, None] + K[a] - 1)
        pos = torch.arange(kt)
        tile = (pos[:, None] * WP + pos[None, :]).reshape(-1)
        return tile.to(device), rel.reshape(-1).to(device)


_win_launch = DirectLauncher(_na_win_kernel, "VISIONATTN_NA_FAST_LAUNCH")
_WIN_FLAGS = ("HAS_BIAS", "HAS_RPB", "HAS_DLSE", "BWD", "DBIAS_MODE", "WRITE_DTILE")


def _win_call(
    wp: _WinPlan, bwd: bool, tensors: tuple, q, k, v, out, g, hgrad, sbb, sbh, srh, flags
) -> None:
    n = wp.n
    m = wp.metas.get(flags)
    if m is None:
        base = wp.meta_bwd if bwd else wp.meta
        d = dict(base, **dict(zip(_WIN_FLAGS, flags)))
        d["FOLD"] = _fold(flags[0] or flags[1], wp.scale2)
        m = wp.metas[flags] = _meta(d)
    splits, bper = wp.bwd_split if bwd else wp.fwd_split
    _win_launch(
        (wp.ntiles * wp.sizes[1], splits),
        tensors,
        (
            *_strides_of(q, n), *_strides_of(k, n), *_strides_of(v, n), *_strides_of(out, n),
            *_strides_of(g, n), *_strides_of(hgrad, n), sbb, sbh, srh, *wp.sizes, bper,
            wp.scale2, wp.dk, wp.dv,
        ),
        *m,
    )  # fmt: skip


def _win_forward(wp: _WinPlan, q, k, v, rpb, bias):
    out = q.new_empty(*q.shape[:-1], wp.dv)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    bias_t, sbb, sbh = _bias_args(bias, q)
    rpb_t, srh = _rpb_args(rpb, q)
    flags = (bias is not None, rpb is not None, False, False, 0, False)
    tensors = (q, k, v, out, lse, bias_t, rpb_t, q, q, q, q, q, q, q)
    _win_call(wp, False, tensors, q, k, v, out, q, v, sbb, sbh, srh, flags)
    return out, lse


def _win_backward(wp: _WinPlan, dout, dlse, q, k, v, out, lse, rpb, bias, need_drpb,
                  need_dbias):  # fmt: skip
    B, H = q.shape[0], q.shape[-2]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dkt = torch.empty_like(k, memory_format=torch.contiguous_format)
    dvt = torch.empty_like(v, memory_format=torch.contiguous_format)
    splits = wp.bwd_split[0]
    mode = 0
    ds = dtile = None
    if need_dbias:
        mode = 2 if (bias.shape[0] == 1 and B > 1) else 1
        bd = splits if mode == 2 else B
        # causal-free whole windows: every (query, window position) entry is written
        ds = torch.empty(bd, H, wp.ntok, wp.kt, dtype=torch.float32, device=q.device)
    if need_drpb:
        dtile = torch.empty(
            wp.ntiles * splits, H, wp.WP, wp.WP, dtype=torch.float32, device=q.device
        )
    bias_t, sbb, sbh = _bias_args(bias, q)
    rpb_t, srh = _rpb_args(rpb, q)
    flags = (bias is not None, rpb is not None, dlse is not None, True, mode, need_drpb)
    tensors = (
        q, k, v, out, lse, bias_t, rpb_t, dout, dlse if dlse is not None else lse, dq, dkt,
        dvt, ds if ds is not None else q, dtile if dtile is not None else q,
    )  # fmt: skip
    _win_call(wp, True, tensors, q, k, v, out, dq, dvt, sbb, sbh, srh, flags)
    if mode == 2:
        ds = ds.sum(0, keepdim=True)
    drpb = None
    if need_drpb:
        tpos, rel = _win_rel(wp.sizes[5:8], wp.WP, str(q.device))
        summed = dtile.sum(0).reshape(H, -1)[:, tpos]  # [h, kt * kt]
        drpb = torch.zeros(H, rpb[0].numel(), dtype=torch.float32, device=q.device)
        drpb.index_add_(1, rel, summed)
    return dq, dkt, dvt, ds, drpb


def forward(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, bias: Tensor | None, p: NAParams):
    """Returns ``(out [B, *S, h, dv], lse [B, *S, h] float32)``.

    ``rpb``: ``[h, 2k-1, ...]`` table (read in the kernel); ``bias``: attn_bias as
    ``[B|1, h|1, N, K]``.
    """
    wp = _win_plan(q, v.shape[-1], p)
    if wp is not None and not wp.status.get("failed"):
        try:
            return _win_forward(wp, q, k, v, rpb, bias)
        except OutOfResources:
            # a variant too large for the GPU (e.g. float32, 128-token windows, wide heads):
            # the general kernels handle the same call; remembered with the plan
            wp.status["failed"] = True
    pl = _plan(q, v.shape[-1], p)
    n = pl.n
    out = q.new_empty(*q.shape[:-1], pl.dv)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    bias_t, sbb, sbh = _bias_args(bias, q)
    rpb_t, srh, rpbo, rpbo_args, _ = _rpb_fwd_args(rpb, q, pl)
    _fwd_launch(
        pl.fwd_grid,
        (q, k, v, out, lse, bias_t, rpb_t, q, q, q, q, q, rpbo),
        (
            *_strides_of(q, n), *_strides_of(k, n), *_strides_of(v, n), *_strides_of(out, n),
            *_strides_of(q, n), sbb, sbh, srh, 0, 0, *pl.geo, *pl.fwd_sizes, pl.scale2, pl.dk,
            pl.dv, *pl.flags, *rpbo_args,
        ),
        *_flag_meta(
            pl,
            (bias is not None, rpb is not None, False, False, False, False, rpbo is not q, False),
        ),
    )  # fmt: skip
    return out, lse


def backward(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    rpb: Tensor | None,
    bias: Tensor | None,
    p: NAParams,
    need_drpb: bool,
    need_dbias: bool,
):
    """Returns ``(dq, dk, dv, ds, drpb)``.

    ``ds`` is the logit gradient in window layout, float32, None unless ``need_dbias``:
    ``[B, h, N, K]`` if attn_bias has a batch axis, else its batch sum ``[1, h, N, K]``
    (the general kernels also return it for ``need_drpb`` alone). ``drpb`` is rpb's gradient
    ``[h, table size]`` float32 where the whole-window kernel computed it directly, else None
    (then the caller scatters ``ds`` onto the table).
    """
    B, H = q.shape[0], q.shape[-2]
    # dO is read with O's strides (the dq kernel forms delta = rowsum(dO * O) itself)
    if dout.stride() != out.stride():
        dout = dout.contiguous()
        if dout.stride() != out.stride():
            out = out.contiguous()
    if not lse.is_contiguous():
        lse = lse.contiguous()
    if dlse is not None and (dlse.dtype != torch.float32 or not dlse.is_contiguous()):
        dlse = dlse.float().contiguous()
    wp = _win_plan(q, v.shape[-1], p)
    if wp is not None and not wp.status.get("failed"):
        try:
            return _win_backward(
                wp, dout, dlse, q, k, v, out, lse, rpb, bias, need_drpb, need_dbias
            )  # fmt: skip
        except OutOfResources:
            wp.status["failed"] = True  # as in forward: the general kernels take over
    pl = _plan(q, v.shape[-1], p)
    n = pl.n
    need_ds = need_drpb or need_dbias
    ds_per_batch = need_dbias and bias.shape[0] != 1
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dkt = torch.empty_like(k, memory_format=torch.contiguous_format)
    dvt = torch.empty_like(v, memory_format=torch.contiguous_format)
    ds = None
    atomic = False
    rpb_f, srh_f, rpbo, rpbo_args, ridx = _rpb_fwd_args(rpb, q, pl, dq=True)
    # rpb's gradient alone, with rpb blocks: dS summed into the blocks' layout
    blk = need_drpb and not need_dbias and ridx is not None and not _TUNE.get("nk_drpb")
    if blk:
        ds = torch.zeros(H, rpb_f.shape[1], dtype=torch.float32, device=q.device)
        need_ds = False
    elif need_ds:
        atomic = not ds_per_batch and B > 1
        bd = B if ds_per_batch else 1
        # summed atomically from zero; causal-masked window positions are never visited
        alloc = torch.zeros if (atomic or pl.any_causal) else torch.empty
        ds = alloc(bd, H, pl.ntok, pl.kt, dtype=torch.float32, device=q.device)
    bias_t, sbb, sbh = _bias_args(bias, q)
    sdb = H * pl.ntok * pl.kt if (need_ds and not atomic) else 0
    sdh = ds.stride(0) if blk else pl.ntok * pl.kt
    has_bias, has_rpb = bias is not None, rpb is not None
    _fwd_launch(
        pl.fwd_grid,
        (
            q, k, v, out, lse, bias_t, rpb_f, dout, dlse if dlse is not None else lse, delta, dq,
            ds if (need_ds or blk) else q, rpbo,
        ),
        (
            *_strides_of(q, n), *_strides_of(k, n), *_strides_of(v, n), *_strides_of(out, n),
            *_strides_of(dq, n), sbb, sbh, srh_f, sdb, sdh, *pl.geo, *pl.fwd_sizes,
            pl.scale2, pl.dk, pl.dv, *pl.flags, *rpbo_args,
        ),
        *_flag_meta(
            pl, (has_bias, has_rpb, dlse is not None, True, need_ds, atomic, rpbo is not q, blk)
        ),
    )  # fmt: skip
    kv_blocks = _rpb_kv_blocks(rpb, pl) if has_rpb else None
    kv_rpb, kv_srh = kv_blocks if kv_blocks is not None else _rpb_args(rpb, q)
    _kv_launch(
        pl.kv_grid,
        (q, k, v, lse, bias_t, kv_rpb, dout, delta, dkt, dvt),
        (
            *_strides_of(q, n), *_strides_of(k, n), *_strides_of(v, n), *_strides_of(out, n),
            *_strides_of(dkt, n), *_strides_of(dvt, n), sbb, sbh, kv_srh, *pl.geo, *pl.kv_sizes,
            pl.scale2, pl.dk, pl.dv, *pl.flags,
        ),
        *_flag_meta(pl, (has_bias, has_rpb, kv_blocks is not None)),
    )  # fmt: skip
    if blk:
        drpb = torch.zeros(H, rpb[0].numel(), dtype=torch.float32, device=q.device)
        return dq, dkt, dvt, None, drpb.index_add_(1, ridx, ds)
    return dq, dkt, dvt, ds, None

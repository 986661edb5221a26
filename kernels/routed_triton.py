"""Triton kernels for routed (block-sparse) attention over 2-D tiles, forward and backward.

Layout: ``q [B, Hq, Wq, heads, D]``, ``k [B, Hk, Wk, heads, D]``, ``v [B, Hk, Wk, heads, Dv]``
with arbitrary strides (read in place, e.g. views of one fused qkv projection), indices
``[B, hi, T, topk]`` (``hi`` 1 = shared by heads, or ``heads``).  See
:mod:`visionattn.kernels.routed` for the semantics.

Forward (one program per ``BLOCK_M`` query pixels of one query tile and one (batch, head)):
the keys of the routed tiles are walked as one flat sequence of ``topk * Lk`` keys, so a
block of ``BLOCK_N`` keys may span several small tiles (BiFormer's later stages have 2x2 and
4x4 tiles; a block per tile would leave most of the tensor cores idle).  Each key's address
comes from its slot's tile index; nothing is gathered into memory.  Online softmax in base 2.
For small tiles (half precision) a program takes two heads at once (3-D tensors, batched
``tl.dot``), which doubles the loads each program has in flight; large tiles of 32-wide
half-precision heads (BiFormer at detection size) take 128 x 128 steps, and steps holding
only routed keys skip the score mask.

Backward: a ``dq`` kernel (the forward's key walk again; it also stores
``delta = rowsum(dO * O) - dlse``) and a ``dK/dV`` kernel whose programs each own kv tiles
and walk the query rows that list them, through an inverted index (for every kv tile, the
query tiles listing it, with multiplicity).  Short index lists are inverted by the dK/dV
programs themselves (one scan of the list per program, into a scratch bucket of their own);
long ones by a separate launch.  Each kv block accumulates its gradient in registers and
writes it once: no atomics, deterministic, no float32 gradient buffers.

Host: launch plans (grid, block shapes, the scalar argument tuple) are cached per signature
and the compiled binaries launched directly (:class:`._launch.DirectLauncher`): small BiFormer stages are
otherwise bound by the host, not the GPU.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import DirectLauncher, has_maxnreg

__all__ = ["routed_bwd", "routed_fwd"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _head_blocks(d: int, dv: int) -> tuple[int, int]:
    """Padded (power-of-two >= 16) q/k and v head dims, v at least as wide as q/k.

    On H200 (Triton 3.6) half-precision kernels whose padded v head is narrower than the q/k
    head gave wrong outputs (the NA kernels, and one routed sweep config: fp16, q/k 40, v 8),
    while every dv >= dk case was right; the NA kernels' same work-around passed their sweeps.
    """
    bd = _next_pow2(d)
    return bd, max(_next_pow2(dv), bd)


def _next_pow2(x: int, minimum: int = 16) -> int:
    # plain integer arithmetic: triton.next_power_of_2 / triton.cdiv are jit-wrapped and cost
    # microseconds per call on the host, which these small problems cannot afford
    return max(minimum, 1 << (max(1, int(x)) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the Triton interpreter mis-multiplies bfloat16 operands; run them in float32 there.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _rows(pid_t, N_MBLK, T, TH, TW, NW, PACK: tl.constexpr, BLOCK_M: tl.constexpr):
    # the query rows of one program: PACK > 1 packs PACK whole tiles (PACK * lq <= BLOCK_M),
    # PACK == 1 takes the mblk-th BLOCK_M slice of one tile
    lq = TH * TW
    tile0 = (pid_t // N_MBLK) * PACK
    r = (pid_t % N_MBLK) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.minimum(r // lq, PACK - 1)  # clamped: padded rows stay finite, masked below
    t = tile0 + g
    m_ok = (r < PACK * lq) & (t < T)
    t = tl.minimum(t, T - 1)
    pix = r - g * lq
    y = (t // NW) * TH + pix // TW
    x = (t % NW) * TW + pix % TW
    return tile0, g, t, m_ok, y, x


@triton.jit
def _key_block(
    idx_base,
    sit,
    sik,
    tile0,
    n0,
    T,
    N_KV_TILES,
    KNW,
    KTH,
    KTW,
    n_keys,
    PACK: tl.constexpr,
    BLOCK_NT: tl.constexpr,
):
    # PACK groups of BLOCK_NT keys: group gc walks the routed keys of query tile tile0 + gc
    lk = KTH * KTW
    c = tl.arange(0, PACK * BLOCK_NT)
    gc = c // BLOCK_NT
    kn = n0 + c % BLOCK_NT
    n_ok = (kn < n_keys) & (tile0 + gc < T)
    slot = kn // lk
    pix = kn % lk
    tq = tl.minimum(tile0 + gc, T - 1)
    j = tl.load(idx_base + tq * sit + slot * sik, mask=n_ok, other=0).to(tl.int32)
    # out-of-range tiles (unchecked input) are clamped so they can never fault
    j = tl.minimum(tl.maximum(j, 0), N_KV_TILES - 1)
    ky = (j // KNW) * KTH + pix // KTW
    kx = (j % KNW) * KTW + pix % KTW
    return gc, n_ok, ky, kx


@triton.jit
def _fwd_step(
    q, m_i, l_i, acc, n0, g, tile0, idx_base, sit, sik, T, N_KV_TILES, KNW, KTH, KTW, n_keys,
    k_base, skh, skw, skd, v_base, svh, svw, svd, offs_d, offs_dv, d_ok, dv_ok, qk_scale,
    PACK: tl.constexpr, BLOCK_NT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    MASK: tl.constexpr, FOLD: tl.constexpr,
):  # fmt: skip
    # one step of BLOCK_NT routed keys; MASK: the step may hold keys past the routed ones or
    # (packed tiles) other tiles' keys; FOLD: the (positive) scale rides in the exponent's FMA
    gc, n_ok, ky, kx = _key_block(
        idx_base, sit, sik, tile0, n0, T, N_KV_TILES, KNW, KTH, KTW, n_keys, PACK, BLOCK_NT
    )
    kt = tl.load(
        k_base + ky[None, :] * skh + kx[None, :] * skw + offs_d[:, None] * skd,
        mask=n_ok[None, :] & d_ok[:, None],
        other=0.0,
    )
    s = _dot(q, kt, PREC, UPCAST)
    if not FOLD:
        s = s * qk_scale
    if MASK:  # packed tiles: a row only sees its own tile's keys (block-diagonal)
        s = tl.where(n_ok[None, :] & (gc[None, :] == g[:, None]), s, float("-inf"))
    if FOLD:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    vb = tl.load(
        v_base + ky[:, None] * svh + kx[:, None] * svw + offs_dv[None, :] * svd,
        mask=n_ok[:, None] & dv_ok[None, :],
        other=0.0,
    )
    acc = acc * alpha[:, None] + _dot(p.to(vb.dtype), vb, PREC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _routed_fwd_kernel(
    Q, K, V, IDX, OUT, LSE,
    sqb, sqh, sqw, sqn, sqd, skb, skh, skw, skn, skd, svb, svh, svw, svn, svd,
    sob, soh, sow, son, sod, slb, slh, slw, sln, sib, sih, sit, sik,
    HEADS, T, NW, TH, TW, KNW, KTH, KTW, N_KV_TILES, TOPK, D, DV,
    qk_scale,  # scale * log2(e)
    N_MBLK,
    STORE_LSE: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_NT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, FOLD: tl.constexpr = False,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)
    h = pid_bh % HEADS
    n_keys = TOPK * KTH * KTW
    tile0, g, t, m_ok, y, x = _rows(pid_t, N_MBLK, T, TH, TW, NW, PACK, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q_ptrs = Q + b * sqb + h * sqn + y[:, None] * sqh + x[:, None] * sqw + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    idx_base = IDX + b * sib + h * sih
    k_base = K + b * skb + h * skn
    v_base = V + b * svb + h * svn

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # One tile per program (PACK == 1): every step but a short last one holds routed keys
    # only, so their scores need no mask (detection-size tiles walk 4-32 such steps); the short
    # step is peeled off as a branch, not a second loop: a second pipelined loop costs shared
    # memory, and so resident programs (BiFormer-T s1 forward 57 -> 69 us, H200). Packed
    # tiles mask every step (block-diagonal scores).
    n_loop = n_keys
    if PACK == 1:
        n_loop = (n_keys // BLOCK_NT) * BLOCK_NT
    for n0 in range(0, n_loop, BLOCK_NT):
        m_i, l_i, acc = _fwd_step(
            q, m_i, l_i, acc, n0, g, tile0, idx_base, sit, sik, T, N_KV_TILES, KNW, KTH, KTW,
            n_keys, k_base, skh, skw, skd, v_base, svh, svw, svd, offs_d, offs_dv, d_ok, dv_ok,
            qk_scale, PACK, BLOCK_NT, PREC, UPCAST, PACK > 1, FOLD,
        )  # fmt: skip
    if PACK == 1:
        if n_loop < n_keys:
            m_i, l_i, acc = _fwd_step(
                q, m_i, l_i, acc, n_loop, g, tile0, idx_base, sit, sik, T, N_KV_TILES, KNW,
                KTH, KTW, n_keys, k_base, skh, skw, skd, v_base, svh, svw, svd, offs_d,
                offs_dv, d_ok, dv_ok, qk_scale, PACK, BLOCK_NT, PREC, UPCAST, True, FOLD,
            )  # fmt: skip

    acc = acc / l_i[:, None]
    o_ptrs = OUT + b * sob + h * son + y[:, None] * soh + x[:, None] * sow + offs_dv[None, :] * sod
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    if STORE_LSE:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + b * slb + h * sln + y * slh + x * slw, lse, mask=m_ok)


@triton.jit
def _routed_fwd_heads_kernel(
    Q, K, V, IDX, OUT, LSE,
    sqb, sqh, sqw, sqn, sqd, skb, skh, skw, skn, skd, svb, svh, svw, svn, svd,
    sob, soh, sow, son, sod, slb, slh, slw, sln, sib, sih, sit, sik,
    HEADS, N_HBLK, T, NW, TH, TW, KNW, KTH, KTW, N_KV_TILES, TOPK, D, DV,
    qk_scale,  # scale * log2(e)
    N_MBLK,
    STORE_LSE: tl.constexpr, HB: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_NT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, FULL: tl.constexpr = False,
    FOLD: tl.constexpr = False,
):  # fmt: skip
    # The forward above for HB heads at once (3-D tensors [HB, rows, ...], batched tl.dot):
    # small tiles give a program little work, so its few loads wait alone; HB heads issue HB
    # times the loads together, and with shared indices (BiFormer) their key rows are adjacent
    # in memory and one index lookup serves all of them.
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // N_HBLK).to(tl.int64)
    hh = (pid_bh % N_HBLK) * HB + tl.arange(0, HB)
    h_ok = hh < HEADS
    hh = tl.minimum(hh, HEADS - 1)
    n_keys = TOPK * KTH * KTW
    tile0, g, t, m_ok, y, x = _rows(pid_t, N_MBLK, T, TH, TW, NW, PACK, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    hm_ok = h_ok[:, None] & m_ok[None, :]  # [HB, M]

    q_ptrs = (
        Q + b * sqb + hh[:, None, None] * sqn
        + (y * sqh + x * sqw)[None, :, None] + offs_d[None, None, :] * sqd
    )  # fmt: skip
    q = tl.load(q_ptrs, mask=hm_ok[:, :, None] & d_ok[None, None, :], other=0.0)

    lk = KTH * KTW
    idx_h = b * sib + hh * sih  # [HB] (sih is 0 for shared lists)
    m_i = tl.full([HB, BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([HB, BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([HB, BLOCK_M, BLOCK_DV], dtype=tl.float32)
    c = tl.arange(0, PACK * BLOCK_NT)
    gc = c // BLOCK_NT
    tq = tl.minimum(tile0 + gc, T - 1)
    for n0 in range(0, n_keys, BLOCK_NT):
        kn = n0 + c % BLOCK_NT
        n_ok = (kn < n_keys) & (tile0 + gc < T)  # [N]
        # unsigned division (every operand is >= 0): no sign fix-ups per element
        kn_u = kn.to(tl.uint32)
        # tl.cast, not .to: an argument equal to 1 arrives as a Python int (JIT constant)
        lk_u = tl.cast(lk, tl.uint32)
        slot = (kn_u // lk_u).to(tl.int32)
        pix = (kn_u % lk_u).to(tl.int32)
        j = tl.load(
            IDX + idx_h[:, None] + (tq * sit + slot * sik)[None, :],
            mask=h_ok[:, None] & n_ok[None, :],
            other=0,
        ).to(tl.int32)  # [HB, N]
        j = tl.minimum(tl.maximum(j, 0), N_KV_TILES - 1)
        j_u = j.to(tl.uint32)
        knw_u = tl.cast(KNW, tl.uint32)
        pix_u = pix.to(tl.uint32)
        ktw_u = tl.cast(KTW, tl.uint32)
        ky = (j_u // knw_u).to(tl.int32) * KTH + (pix_u // ktw_u).to(tl.int32)[None, :]
        kx = (j_u % knw_u).to(tl.int32) * KTW + (pix_u % ktw_u).to(tl.int32)[None, :]
        hn_ok = h_ok[:, None] & n_ok[None, :]
        kt = tl.load(
            K
            + b * skb
            + (hh[:, None] * skn + ky * skh + kx * skw)[:, None, :]
            + offs_d[None, :, None] * skd,
            mask=hn_ok[:, None, :] & d_ok[None, :, None],
            other=0.0,
        )  # [HB, D, N]
        s = _dot(q, kt, PREC, UPCAST)  # [HB, M, N]
        if not FOLD:
            s = s * qk_scale
        if not FULL:  # FULL: one unpacked tile and whole key steps, every score counts
            ok = n_ok[None, :] & (gc[None, :] == g[:, None])  # block-diagonal when packed
            s = tl.where(ok[None, :, :], s, float("-inf"))
        if FOLD:
            # raw logits: max first, the (positive) scale rides in the exponent's FMA
            m_new = tl.maximum(m_i, tl.max(s, 2) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, :, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 2))
            p = tl.exp2(s - m_new[:, :, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 2)
        vb = tl.load(
            V
            + b * svb
            + (hh[:, None] * svn + ky * svh + kx * svw)[:, :, None]
            + offs_dv[None, None, :] * svd,
            mask=hn_ok[:, :, None] & dv_ok[None, None, :],
            other=0.0,
        )  # [HB, N, DV]
        acc = acc * alpha[:, :, None] + _dot(p.to(vb.dtype), vb, PREC, UPCAST)
        m_i = m_new

    acc = acc / l_i[:, :, None]
    o_ptrs = (
        OUT + b * sob + hh[:, None, None] * son
        + (y * soh + x * sow)[None, :, None] + offs_dv[None, None, :] * sod
    )  # fmt: skip
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=hm_ok[:, :, None] & dv_ok[None, None, :])
    if STORE_LSE:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + b * slb + hh[:, None] * sln + (y * slh + x * slw)[None, :], lse, mask=hm_ok)


@triton.jit
def _routed_bwd_dq_kernel(
    Q, K, V, IDX, OUT, DOUT, LSE, DLSE, DQ, DELTA,
    sqb, sqh, sqw, sqn, sqd, skb, skh, skw, skn, skd, svb, svh, svw, svn, svd,
    sob, soh, sow, son, sod, sdob, sdoh, sdow, sdon, sdod, slb, slh, slw, sln,
    sib, sih, sit, sik, sdqb, sdqh, sdqw, sdqn, sdqd,
    HEADS, T, NW, TH, TW, KNW, KTH, KTW, N_KV_TILES, TOPK, D, DV,
    qk_scale,  # scale * log2(e)
    scale, N_MBLK,
    HAS_DLSE: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # dq of BLOCK_M query rows: the forward's key walk again, with P rebuilt from the lse; it
    # also stores delta = rowsum(dO * O) - dlse for the dK/dV kernel
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)
    h = pid_bh % HEADS
    n_keys = TOPK * KTH * KTW
    tile0, g, t, m_ok, y, x = _rows(pid_t, N_MBLK, T, TH, TW, NW, PACK, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    md = m_ok[:, None] & d_ok[None, :]
    mdv = m_ok[:, None] & dv_ok[None, :]
    q = tl.load(
        Q + b * sqb + h * sqn + y[:, None] * sqh + x[:, None] * sqw + offs_d[None, :] * sqd,
        mask=md,
        other=0.0,
    )
    do = tl.load(
        DOUT
        + b * sdob
        + h * sdon
        + y[:, None] * sdoh
        + x[:, None] * sdow
        + offs_dv[None, :] * sdod,
        mask=mdv,
        other=0.0,
    )
    o = tl.load(
        OUT + b * sob + h * son + y[:, None] * soh + x[:, None] * sow + offs_dv[None, :] * sod,
        mask=mdv,
        other=0.0,
    )
    row = b * slb + h * sln + y * slh + x * slw
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=m_ok, other=0.0)
    tl.store(DELTA + row, delta, mask=m_ok)
    lse2 = tl.load(LSE + row, mask=m_ok, other=0.0) * 1.4426950408889634

    idx_base = IDX + b * sib + h * sih
    k_base = K + b * skb + h * skn
    v_base = V + b * svb + h * svn
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n_keys, BLOCK_NT):
        gc, n_ok, ky, kx = _key_block(
            idx_base, sit, sik, tile0, n0, T, N_KV_TILES, KNW, KTH, KTW, n_keys, PACK, BLOCK_NT
        )
        kb = tl.load(
            k_base + ky[:, None] * skh + kx[:, None] * skw + offs_d[None, :] * skd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        vt = tl.load(
            v_base + ky[None, :] * svh + kx[None, :] * svw + offs_dv[:, None] * svd,
            mask=n_ok[None, :] & dv_ok[:, None],
            other=0.0,
        )
        s = _dot(q, tl.trans(kb), PREC, UPCAST) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(n_ok[None, :] & (gc[None, :] == g[:, None]), p, 0.0)
        dp = _dot(do, vt, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kb.dtype), kb, PREC, UPCAST)

    dq *= scale
    tl.store(
        DQ + b * sdqb + h * sdqn + y[:, None] * sdqh + x[:, None] * sdqw + offs_d[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=md,
    )


@triton.jit
def _routed_bwd_dkv_kernel(
    Q, K, V, IDX, DOUT, LSE, DELTA, DK, DV_, REF_OFF, REF_TILE,
    sqb, sqh, sqw, sqn, sqd, skb, skh, skw, skn, skd, svb, svh, svw, svn, svd,
    sdob, sdoh, sdow, sdon, sdod, slb, slh, slw, sln,
    sib, sih, sit, sik, sdkb, sdkh, sdkw, sdkn, sdkd, sdvb, sdvh, sdvw, sdvn, sdvd,
    HEADS, IDX_HEADS, T, NW, TH, TW, KNW, KTH, KTW, N_KV_TILES, TOPK, D, DV, qk_scale, scale,
    N_NBLK,
    BUILD_INDEX: tl.constexpr, PACK: tl.constexpr,
    BLOCK_MT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_E: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # keys: PACK whole kv tiles (PACK > 1) or the nblk-th BLOCK_N slice of one tile; rows:
    # PACK groups of BLOCK_MT rows, group g walking the query rows that list kv tile j0 + g
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)
    h = pid_bh % HEADS
    lq = TH * TW
    lk = KTH * KTW
    j0 = (pid_t // N_NBLK) * PACK
    c = (pid_t % N_NBLK) * BLOCK_N + tl.arange(0, BLOCK_N)
    gk = tl.minimum(c // lk, PACK - 1)
    j = j0 + gk
    n_ok = (c < PACK * lk) & (j < N_KV_TILES)
    j = tl.minimum(j, N_KV_TILES - 1)
    kp = c - gk * lk
    ky = (j // KNW) * KTH + kp // KTW
    kx = (j % KNW) * KTW + kp % KTW
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    nd = n_ok[:, None] & d_ok[None, :]
    ndv = n_ok[:, None] & dv_ok[None, :]
    k_ptrs = K + b * skb + h * skn + ky[:, None] * skh + kx[:, None] * skw + offs_d[None, :] * skd
    v_ptrs = V + b * svb + h * svn + ky[:, None] * svh + kx[:, None] * svw + offs_dv[None, :] * svd
    kb = tl.load(k_ptrs, mask=nd, other=0.0)
    vb = tl.load(v_ptrs, mask=ndv, other=0.0)

    r = tl.arange(0, PACK * BLOCK_MT)
    gr = r // BLOCK_MT
    g_ok = j0 + gr < N_KV_TILES
    if BUILD_INDEX:
        # the query tiles listing each of this program's kv tiles (with multiplicity, in
        # ascending order), found by one scan of this (batch, head)'s index list and written
        # to this program's own bucket of the scratch: no separate index launch
        n_e = T * TOPK
        e = tl.arange(0, BLOCK_E)
        e_ok = e < n_e
        te = e // TOPK
        je = tl.load(
            IDX + b * sib + (h % IDX_HEADS) * sih + te * sit + (e % TOPK) * sik,
            mask=e_ok,
            other=0,
        ).to(tl.int32)
        je = tl.minimum(tl.maximum(je, 0), N_KV_TILES - 1)
        ref_base = REF_TILE + pid_bh.to(tl.int64) * n_e
        start = tl.zeros([PACK * BLOCK_MT], dtype=tl.int32)
        count = tl.zeros([PACK * BLOCK_MT], dtype=tl.int32)
        for gg in tl.static_range(PACK):
            hit = (e_ok & (je == j0 + gg)).to(tl.int32)
            before = tl.sum((e_ok & (je < j0 + gg)).to(tl.int32), 0)
            tl.store(ref_base + before + tl.cumsum(hit, 0) - 1, te, mask=hit > 0)
            start = tl.where(gr == gg, before, start)
            count = tl.where(gr == gg, tl.sum(hit, 0), count)
        tl.debug_barrier()  # the bucket is read back by other threads of this program
        n_rows = tl.where(g_ok, count * lq, 0)
    else:
        jr = tl.minimum(j0 + gr, N_KV_TILES - 1)
        ref = (b * IDX_HEADS + h % IDX_HEADS) * N_KV_TILES + jr
        start = tl.load(REF_OFF + ref)
        n_rows = tl.where(g_ok, (tl.load(REF_OFF + ref + 1) - start) * lq, 0)
        ref_base = REF_TILE
    max_rows = tl.max(n_rows, 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    q_base = Q + b * sqb + h * sqn
    do_base = DOUT + b * sdob + h * sdon
    row_base = b * slb + h * sln
    same = gr[:, None] == gk[None, :]
    for m0 in range(0, max_rows, BLOCK_MT):
        offs_m = m0 + r % BLOCK_MT
        m_ok = offs_m < n_rows
        # .cg: read through L2, where this program's bucket writes are
        t = tl.load(ref_base + start + offs_m // lq, mask=m_ok, other=0, cache_modifier=".cg")
        pix = offs_m % lq
        y = (t // NW) * TH + pix // TW
        x = (t % NW) * TW + pix % TW
        mdv = m_ok[:, None] & dv_ok[None, :]
        q = tl.load(
            q_base + y[:, None] * sqh + x[:, None] * sqw + offs_d[None, :] * sqd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        do = tl.load(
            do_base + y[:, None] * sdoh + x[:, None] * sdow + offs_dv[None, :] * sdod,
            mask=mdv,
            other=0.0,
        )
        row = row_base + y * slh + x * slw
        delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
        lse2 = tl.load(LSE + row, mask=m_ok, other=0.0) * 1.4426950408889634
        s = _dot(q, tl.trans(kb), PREC, UPCAST) * qk_scale  # [M, N]
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(m_ok[:, None] & same, p, 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, PREC, UPCAST)
        dp = _dot(do, tl.trans(vb), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PREC, UPCAST)

    dk *= scale
    tl.store(
        DK + b * sdkb + h * sdkn + ky[:, None] * sdkh + kx[:, None] * sdkw + offs_d[None, :] * sdkd,
        dk.to(DK.dtype.element_ty),
        mask=nd,
    )
    tl.store(
        DV_
        + b * sdvb
        + h * sdvn
        + ky[:, None] * sdvh
        + kx[:, None] * sdvw
        + offs_dv[None, :] * sdvd,
        dv.to(DV_.dtype.element_ty),
        mask=ndv,
    )


@triton.jit
def _inverted_index_kernel(
    IDX,
    OFF,
    REF,
    sib,
    sih,
    sit,
    sik,
    IDX_HEADS,
    T,
    TOPK,
    N_KV,
    N_GROUPS,
    BLOCK_E: tl.constexpr,
):
    # one program per (group, kv tile j), group = (batch, index head): it scans the group's
    # T*topk entries once; its bucket starts after every entry with a smaller tile number, so
    # no program waits for another.  Inside a bucket the query tiles stay in ascending order.
    pid = tl.program_id(0)
    g = pid // N_KV
    j = pid % N_KV
    b = (g // IDX_HEADS).to(tl.int64)
    hi = g % IDX_HEADS
    n_e = T * TOPK
    e = tl.arange(0, BLOCK_E)
    ok = e < n_e
    t = e // TOPK
    j_all = tl.load(IDX + b * sib + hi * sih + t * sit + (e % TOPK) * sik, mask=ok, other=0)
    j_all = tl.minimum(tl.maximum(j_all.to(tl.int32), 0), N_KV - 1)
    start = g * n_e + tl.sum((ok & (j_all < j)).to(tl.int32), 0)
    hit = (ok & (j_all == j)).to(tl.int32)
    pos = tl.cumsum(hit, 0) - 1
    tl.store(REF + start + pos, t, mask=hit > 0)
    tl.store(OFF + pid, start)
    tl.store(OFF + N_GROUPS * N_KV, N_GROUPS * n_e, mask=pid == 0)


# --------------------------------------------------------------------------- host side
def _prec(dtype: torch.dtype) -> str:
    # float32 inputs keep float32 accuracy (the half types go through the tensor cores anyway)
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and type(_routed_fwd_kernel).__name__ == "InterpretedFunction"


def _as4d(indices: torch.Tensor) -> torch.Tensor:
    return indices.unsqueeze(1) if indices.dim() == 3 else indices


def _geometry(q, k, tiles):
    th, tw, kth, ktw = tiles
    nh, nw = q.shape[1] // th, q.shape[2] // tw
    knh, knw = k.shape[1] // kth, k.shape[2] // ktw
    return nh, nw, knh, knw


# Block-shape knobs (tuned on an H200; tests and benchmarks may override them).
# fwd_rows / dq_rows: query rows per forward / dq program when small tiles are packed;
# fwd_cols / dq_cols: keys per forward / dq step (all packed tiles together); dkv_keys: keys per dK/dV program when
# small kv tiles are packed; dkv_rows: query rows per dK/dV step; warps: num_warps of the
# kernels when their fixed side (query rows, or keys for dK/dV) is > 32, small_warps when
# <= 32 (H200: 2 warps made the 28x28 and 14x14 BiFormer stages 20-30% faster, 8 warps 2-3x
# slower); index_in_kernel: the dK/dV programs build their own inverted index when
# (index entries per (batch, head), rounded to a power of two) x (kv tiles per program) is at
# most this, else a separate index launch does (H200: in-kernel saved a launch on the 28x28
# stage, but cost 25% of the 14x14 stage's GPU time, where every program scans 8 times).
# fwd_heads: at most this many heads per forward program, with heads x rows <= fwd_head_rows
# (half dtypes; H200: 2 heads of 16 rows beat 1 and 4 on the 28x28 and 14x14 stages);
# fwd_stages: num_stages of that kernel (1 and 3 were slower); fwd_no_lean: 1 keeps the score
# mask and the separate scale multiply in both forward kernels where they are not needed
# (A/Bs); fwd_big_rows / fwd_big_cols: query rows / keys per step of a forward program that
# takes one slice of a large tile (detection-size maps), fwd_big_warps its warps when it takes
# more than 64 rows; fwd_small_cols: keys per step when one tile of <= 64 pixels fills the
# program. H200, bf16 d32, us (do_bench), 64 x 64 -> 128 x 128 with 4 warps: BiFormer
# detection rows topk 4 / 8 / 16 255 -> 228, 456 -> 403, 884 -> 727 (128 x 64 with 8 warps
# 240 / 431 / 759); 32-key steps on 8x8 tiles: BiFormer-T s1 63 -> 54 (session 12,
# kernels/NOTES_routed.md). dq_big_* / dkv_big_*: the backward's shapes for the same large
# tiles (dq: query rows x keys per step; dK/dV: keys per program x query rows per step).
# H200, CUDA-graph us of the backward, 64 x 64 -> dq 64 x 128 and dK/dV 64 x 128: detection
# rows topk 4 / 8 / 16 946 -> 637, 1745 -> 1144, 3231 -> 1959 (256 query rows, 8 warps or
# 32-key programs lost). fwd_big_stages / bwd_big_stages: num_stages of those large-tile
# launches (1 and 3 measured equal or slower); fwd_maxnreg: a register cap for the packed-heads
# forward, 0 = none (96 was within noise on s2/s3, 80 and 64 slower).
TUNE: dict[str, int] = dict(
    fwd_rows=16,
    fwd_heads=4,
    fwd_head_rows=32,
    fwd_stages=2,
    dq_rows=32,
    fwd_cols=64,
    dq_cols=128,
    dkv_keys=32,
    dkv_rows=64,
    warps=4,
    small_warps=2,
    index_in_kernel=512,
    fwd_no_lean=0,
    fwd_big_rows=128,
    fwd_big_cols=128,
    fwd_big_warps=4,
    fwd_small_cols=32,
    dq_big_rows=64,
    dq_big_cols=128,
    dq_big_warps=4,
    dkv_big_keys=64,
    dkv_big_rows=128,
    dkv_big_warps=4,
    fwd_big_stages=2,
    bwd_big_stages=2,
    fwd_maxnreg=0,
)


def _warps(fixed_side: int) -> int:
    return TUNE["small_warps"] if fixed_side <= 32 else TUNE["warps"]


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _q_blocks(
    lq: int, n_keys: int, d: int, dv: int, rows: int, cols: int, big: tuple[int, int] = (64, 64)
) -> tuple[int, int, int, int]:
    """``(pack, block_m, block_nt, n_mblk)`` for the forward and dq kernels: ``pack`` whole query
    tiles per program when tiles are small (each with its own ``block_nt`` keys per step, a
    block-diagonal score block), else one ``block_m`` slice of one tile, with at most ``big``
    = (rows, keys) per step."""
    cols = cols if max(d, dv) <= 64 else cols // 2
    pack = max(1, _pow2_floor(rows // lq)) if 2 * lq <= rows else 1
    if pack > 1:
        block_m = _next_pow2(pack * lq)
        block_nt = min(_next_pow2(n_keys, 1), max(1, cols // pack))
        block_nt = max(block_nt, 16 // pack)  # tl.dot needs >= 16 columns in all
        return pack, block_m, block_nt, 1
    # big tiles: ``big`` = (query rows, keys) per program step
    block_m = min(big[0], _next_pow2(lq))
    cap = big[1] if max(d, dv) <= 64 else 32
    return 1, block_m, min(cap, _next_pow2(n_keys)), _cdiv(lq, block_m)


def _kv_blocks(lk: int, rows: int, d: int, dv: int) -> tuple[int, int, int, int]:
    """``(pack, block_mt, block_n, n_nblk)`` for the dK/dV kernel (``rows``: the average number
    of query rows listing one kv tile)."""
    cap_n = 64 if max(d, dv) <= 64 else 32
    pack = max(1, _pow2_floor(TUNE["dkv_keys"] // lk)) if 2 * lk <= TUNE["dkv_keys"] else 1
    if pack > 1:
        block_n = _next_pow2(pack * lk)
        block_mt = max(1, min(_next_pow2(rows, 1), TUNE["dkv_rows"] // pack))
        block_mt = max(block_mt, 16 // pack)
        return pack, block_mt, block_n, 1
    block_n = min(cap_n, _next_pow2(lk))
    return 1, min(TUNE["dkv_rows"], _next_pow2(rows)), block_n, _cdiv(lk, block_n)


@functools.cache
def _warps_kw(num_warps: int, num_stages: int = 2, maxnreg: int = 0) -> dict:
    """Launch options (and their hashable key) of a :class:`DirectLauncher` call; ``maxnreg``
    (0: none) only where the installed Triton takes it."""
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg and has_maxnreg():
        opts["maxnreg"] = maxnreg
    return dict(opts=opts, meta_key=(num_warps, num_stages, opts.get("maxnreg", 0)))


_fwd_launch = DirectLauncher(_routed_fwd_kernel, "VISIONATTN_ROUTED_FAST_LAUNCH")
_fwd_heads_launch = DirectLauncher(_routed_fwd_heads_kernel, "VISIONATTN_ROUTED_FAST_LAUNCH")
_dq_launch = DirectLauncher(_routed_bwd_dq_kernel, "VISIONATTN_ROUTED_FAST_LAUNCH")
_dkv_launch = DirectLauncher(_routed_bwd_dkv_kernel, "VISIONATTN_ROUTED_FAST_LAUNCH")
_index_launch = DirectLauncher(_inverted_index_kernel, "VISIONATTN_ROUTED_FAST_LAUNCH")

# Launch plans: everything a launch needs that depends only on shapes, strides, dtypes and
# options (grid, block shapes, the scalar argument tuple), computed once per signature so a
# repeated call does a dict lookup, its allocations and the launch.
_PLANS: dict = {}


def _plan_cache_put(key, plan):
    if len(_PLANS) > 4096:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _idx_strides(idx: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``(sib, sih, sit, sik, idx_heads)`` for ``[B, T, topk]`` or ``[B, hi, T, topk]``
    indices (shared lists get head stride 0)."""
    s = idx.stride()
    if idx.dim() == 3:
        return s[0], 0, s[1], s[2], 1
    hi = idx.shape[1]
    return s[0], (s[1] if hi > 1 else 0), s[2], s[3], hi


def _contig_strides(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _fwd_plan(q, k, v, idx, tiles, scale, need_lse):
    th, tw, kth, ktw = tiles
    b, hq, wq, heads, d = q.shape
    dv = v.shape[-1]
    sib, sih, sit, sik, _ = _idx_strides(idx)
    nh, nw, knh, knw = _geometry(q, k, tiles)
    t = nh * nw
    topk = idx.shape[-1]
    out_shape = (b, hq, wq, heads, dv)
    lse_shape = (b, hq, wq, heads) if need_lse else (0,)
    lse_strides = _contig_strides(lse_shape) if need_lse else (0, 0, 0, 0)
    pack, block_m, block_nt, n_mblk = _q_blocks(
        th * tw, topk * kth * ktw, d, dv, TUNE["fwd_rows"], TUNE["fwd_cols"]
    )
    hb = 1
    if q.dtype != torch.float32:  # batched dots only on the half-precision tensor-core path
        hb = min(
            TUNE["fwd_heads"], _pow2_floor(TUNE["fwd_head_rows"] // block_m), _next_pow2(heads, 1)
        )
    if hb > 1:
        n_hblk = _cdiv(heads, hb)
        scalars = (
            *q.stride(), *k.stride(), *v.stride(), *_contig_strides(out_shape), *lse_strides,
            sib, sih, sit, sik,
            heads, n_hblk, t, nw, th, tw, knw, kth, ktw, knh * knw, topk, d, dv,
            scale * _LOG2E, n_mblk,
            need_lse, hb, pack, block_m, block_nt, *_head_blocks(d, dv),
            _prec(q.dtype), _upcast(q.dtype),
            # FULL: no score mask (s2 of BiFormer-T: one 16-pixel tile, all 64 keys in one
            # step); FOLD: the scale in the exponent's FMA (positive scales)
            pack == 1 and (topk * kth * ktw) % block_nt == 0 and not TUNE["fwd_no_lean"],
            scale > 0 and not TUNE["fwd_no_lean"],
        )  # fmt: skip
        grid = (_cdiv(t, pack) * n_mblk, b * n_hblk)
        warps = (_warps(block_m * hb), TUNE["fwd_stages"], TUNE["fwd_maxnreg"])
        return (out_shape, lse_shape, grid, scalars, warps, {}, _fwd_heads_launch)
    if q.dtype != torch.float32 and max(d, dv) <= 32 and pack == 1:
        # one tile per program, half precision, 32-wide heads (BiFormer's; other heads and
        # float32 keep the shapes above): tiles of > 64 pixels take 128 x 128 steps, smaller
        # ones 32-key steps (H200 numbers at TUNE)
        if th * tw > 64:
            big = (TUNE["fwd_big_rows"], TUNE["fwd_big_cols"])
            pack, block_m, block_nt, n_mblk = _q_blocks(
                th * tw, topk * kth * ktw, d, dv, TUNE["fwd_rows"], TUNE["fwd_cols"], big
            )
        else:
            block_nt = max(16, min(block_nt, TUNE["fwd_small_cols"]))
    scalars = (
        *q.stride(), *k.stride(), *v.stride(), *_contig_strides(out_shape), *lse_strides,
        sib, sih, sit, sik,
        heads, t, nw, th, tw, knw, kth, ktw, knh * knw, topk, d, dv,
        scale * _LOG2E, n_mblk,
        need_lse, pack, block_m, block_nt, *_head_blocks(d, dv),
        _prec(q.dtype), _upcast(q.dtype), scale > 0 and not TUNE["fwd_no_lean"],
    )  # fmt: skip
    grid = (_cdiv(t, pack) * n_mblk, b * heads)
    warps = (_warps(block_m), 2)
    if block_m > 64:
        warps = (TUNE["fwd_big_warps"], TUNE["fwd_big_stages"])
    return (out_shape, lse_shape, grid, scalars, warps, {}, _fwd_launch)


def routed_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    tiles: tuple[int, int, int, int],
    scale: float,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``out [B, Hq, Wq, heads, Dv]`` (q's dtype, contiguous), ``lse [B, Hq, Wq, heads]``
    (float32; an empty tensor, never written, when ``need_lse`` is False)."""
    key = (
        "f", q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), indices.shape,
        indices.stride(), q.dtype, indices.dtype, tiles, scale, need_lse, *TUNE.values(),
    )  # fmt: skip
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan_cache_put(key, _fwd_plan(q, k, v, indices, tiles, scale, need_lse))
    out_shape, lse_shape, grid, scalars, warps, runs, launch = plan
    out = q.new_empty(out_shape)
    lse = q.new_empty(lse_shape, dtype=torch.float32)
    launch(grid, (q, k, v, indices, out, lse), scalars, **_warps_kw(*warps), runs=runs)
    return out, lse


# entries per (batch, index head) group that the one-program index kernel keeps in registers
_INDEX_KERNEL_MAX = 8192


def _inverted_index(idx: torch.Tensor, n_kv_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``idx [B, hi, T, topk]``: ``offsets [B*hi*n_kv_tiles + 1]`` and ``tiles [B*hi*T*topk]``
    so that the query tiles listing kv tile ``j`` of group ``g`` are
    ``tiles[offsets[g*n_kv_tiles + j] : offsets[g*n_kv_tiles + j + 1]]`` (duplicates kept, in
    ascending query-tile order).  One small kernel launch (a stable sort for index lists too
    long to keep in registers); no host sync either way.  The backward builds these lists
    inside its own launch when they are short (``TUNE["index_in_kernel"]``)."""
    b, hi, t, topk = idx.shape
    if t * topk <= _INDEX_KERNEL_MAX:
        groups = b * hi
        offsets = torch.empty(groups * n_kv_tiles + 1, device=idx.device, dtype=torch.int32)
        ref_tile = torch.empty(groups * t * topk, device=idx.device, dtype=torch.int32)
        _index_launch(
            (groups * n_kv_tiles,),
            (idx, offsets, ref_tile),
            (*idx.stride(), hi, t, topk, n_kv_tiles, groups, _next_pow2(t * topk, 1)),
            **_warps_kw(4),
        )
        return offsets, ref_tile
    return _inverted_index_sorted(idx, n_kv_tiles)


def _inverted_index_sorted(idx: torch.Tensor, n_kv_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_inverted_index` by a stable sort + searchsorted (any size; more launches)."""
    b, hi, t, topk = idx.shape
    groups = b * hi
    j = idx.reshape(groups, t * topk).long().clamp(0, n_kv_tiles - 1)
    key = (j + torch.arange(groups, device=idx.device).unsqueeze(1) * n_kv_tiles).reshape(-1)
    sorted_key, order = torch.sort(key, stable=True)
    ref_tile = ((order % (t * topk)) // topk).to(torch.int32)
    bounds = torch.arange(groups * n_kv_tiles + 1, device=idx.device)
    offsets = torch.searchsorted(sorted_key, bounds).to(torch.int32)
    return offsets, ref_tile


def _bwd_plan(q, k, v, idx, tiles, scale, out, dout, lse, dlse):
    th, tw, kth, ktw = tiles
    b, hq, wq, heads, d = q.shape
    dv_dim = v.shape[-1]
    sib, sih, sit, sik, idx_heads = _idx_strides(idx)
    nh, nw, knh, knw = _geometry(q, k, tiles)
    n_kv = knh * knw
    lq, lk = th * tw, kth * ktw
    t = nh * nw
    topk = idx.shape[-1]
    prec, upcast = _prec(q.dtype), _upcast(q.dtype)
    bd, bdv = _head_blocks(d, dv_dim)
    pack, block_m, block_nt, n_mblk = _q_blocks(
        lq, topk * lk, d, dv_dim, TUNE["dq_rows"], TUNE["dq_cols"]
    )
    dq_warps = (_warps(block_m), 2)
    # large tiles, half precision, 32-wide heads: their own block shapes (as the forward's)
    big = q.dtype != torch.float32 and max(d, dv_dim) <= 32
    if big and pack == 1 and lq > 64:
        pack, block_m, block_nt, n_mblk = _q_blocks(
            lq, topk * lk, d, dv_dim, TUNE["dq_rows"], TUNE["dq_cols"],
            (TUNE["dq_big_rows"], TUNE["dq_big_cols"]),
        )  # fmt: skip
        dq_warps = (TUNE["dq_big_warps"], TUNE["bwd_big_stages"])
    dq_scalars = (
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *lse.stride(),
        sib, sih, sit, sik, *_contig_strides(q.shape),
        heads, t, nw, th, tw, knw, kth, ktw, n_kv, topk, d, dv_dim, scale * _LOG2E, scale,
        n_mblk, dlse is not None, pack, block_m, block_nt, bd, bdv, prec, upcast,
    )  # fmt: skip
    dq = ((_cdiv(t, pack) * n_mblk, b * heads), dq_scalars, dq_warps, {})
    # rows per kv tile: on average every kv tile is listed T*topk/n_kv times
    kpack, block_mt, block_n, n_nblk = _kv_blocks(lk, (t * topk * lq) // n_kv + 1, d, dv_dim)
    dkv_warps = (_warps(block_n), 2)
    if big and kpack == 1 and lk > 64:
        block_n = min(TUNE["dkv_big_keys"], _next_pow2(lk))
        block_mt = min(TUNE["dkv_big_rows"], _next_pow2((t * topk * lq) // n_kv + 1))
        n_nblk = _cdiv(lk, block_n)
        dkv_warps = (TUNE["dkv_big_warps"], TUNE["bwd_big_stages"])
    block_e = _next_pow2(t * topk, 1)
    build = block_e * kpack <= TUNE["index_in_kernel"]
    dkv_scalars = (
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride(),
        sib, sih, sit, sik, *_contig_strides(k.shape), *_contig_strides(v.shape),
        heads, idx_heads, t, nw, th, tw, knw, kth, ktw, n_kv, topk, d, dv_dim,
        scale * _LOG2E, scale, n_nblk,
        build, kpack, block_mt, block_n, bd, bdv, block_e if build else 1, prec, upcast,
    )  # fmt: skip
    dkv = ((_cdiv(n_kv, kpack) * n_nblk, b * heads), dkv_scalars, dkv_warps, {})
    return build, b * heads * t * topk, n_kv, dq, dkv


def routed_bwd(
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
    """Backward: ``(dq, dk, dv)``, contiguous, in the inputs' dtypes."""
    # lse, delta and dlse share one row indexing (lse comes contiguous from the forward)
    if not lse.is_contiguous():
        lse = lse.contiguous()
    if dlse is not None and dlse.stride() != lse.stride():
        dlse = dlse.contiguous()
    key = (
        "b", q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), indices.shape,
        indices.stride(), q.dtype, indices.dtype, tiles, scale, out.stride(), dout.stride(),
        lse.stride(),
        dlse is None, *TUNE.values(),
    )  # fmt: skip
    plan = _PLANS.get(key)
    if plan is None:
        plan = _bwd_plan(q, k, v, indices, tiles, scale, out, dout, lse, dlse)
        plan = _plan_cache_put(key, plan)
    build, n_scratch, n_kv, dq_launch, dkv_launch = plan
    dq = q.new_empty(q.shape)
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    delta = lse.new_empty(lse.shape)  # contiguous, like lse (stride-checked above)
    grid, scalars, warps, runs = dq_launch
    dlse_t = lse if dlse is None else dlse
    _dq_launch(
        grid,
        (q, k, v, indices, out, dout, lse, dlse_t, dq, delta),
        scalars,
        **_warps_kw(*warps),
        runs=runs,
    )
    if build:  # per (batch, head) buckets, filled and read inside the dK/dV launch
        offsets = ref_tile = q.new_empty((n_scratch,), dtype=torch.int32)
    else:
        offsets, ref_tile = _inverted_index(_as4d(indices), n_kv)
    grid, scalars, warps, runs = dkv_launch
    tensors = (q, k, v, indices, dout, lse, delta, dk, dv, offsets, ref_tile)
    _dkv_launch(grid, tensors, scalars, **_warps_kw(*warps), runs=runs)
    return dq, dk, dv

"""Triton LayerNorm over the last dim: forward and fused backward (dx, dweight, dbias).

The kernels behind :func:`visionattn.kernels.layer_norm`; see that function for semantics.

Why a kernel of our own: the backbones' token tensors are ``[M, C]`` with ``C`` between 64 and
1024 and ``M`` in the hundreds of thousands. PyTorch's CUDA LayerNorm gives each row its own
thread block, which leaves most lanes idle at small ``C`` (measured on the H200: 155-220 us for
a ``[401408, 64]`` bfloat16 forward, against ~21 us of bytes at HBM bandwidth). It also cannot
read a float32 residual stream and write the autocast dtype in one pass, so mixed-precision
models paid an extra cast of their widest tensor before every norm and its gradient's cast
back. Here each program normalises a ``[BLOCK_M, C]`` tile of rows, reads ``x`` in its own
dtype and writes ``y`` in the requested one; the backward writes ``dx`` in ``x``'s dtype and
sums the weight/bias gradients per program in registers (one small ``[programs, C]`` partial
sum per call, no atomics, deterministic).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import DirectLauncher

__all__ = ["MAX_C", "backward", "forward"]

# widest row one program holds (BLOCK_C elements of float32 per row in registers)
MAX_C = 8192


@triton.jit
def _ln_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,
    M, C, stride_xm, stride_ym, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(X + r64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STATS:
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(
    DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART,
    M, C, stride_dym, stride_xm, stride_dxm, n_iter,
    HAS_W: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # program p handles row blocks p, p + P, p + 2P, ... (P programs) and keeps the weight and
    # bias gradient sums of its rows in registers
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    # per-lane partial sums, reduced over the rows once at the end: a reduction across warps
    # in every iteration doubled the kernel's time
    dw_acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for i in range(0, n_iter):
        rows = (pid + i * nprog) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)
        x = tl.load(X + r64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + r64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :] if HAS_W else dy
        c1 = tl.sum(xhat * g, axis=1) / C
        c2 = tl.sum(g, axis=1) / C
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(
            DX + r64[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask
        )
        if NEED_DW:
            dw_acc += dy * xhat
        if NEED_DB:
            db_acc += dy
    if NEED_DW:
        tl.store(DW_PART + pid * C + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    if NEED_DB:
        tl.store(DB_PART + pid * C + cols, tl.sum(db_acc, axis=0), mask=cmask)


_fwd_launch = DirectLauncher(_ln_fwd_kernel, "VISIONATTN_LN_FAST_LAUNCH")
_bwd_launch = DirectLauncher(_ln_bwd_kernel, "VISIONATTN_LN_FAST_LAUNCH")

# Tile sizes (elements per tile, rows x padded C), warps, and backward programs per SM. Module
# state so a tuning script can sweep them; plans are cached per C, clear them after a change.
TUNE = dict(fwd_elems=4096, fwd_warps=4, bwd_elems=2048, bwd_warps=4, bwd_per_sm=8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a JIT function: slow to call from Python


@functools.cache
def _plan(c: int, bwd: bool) -> tuple[int, int, int]:
    block_c = triton.next_power_of_2(c)
    elems = TUNE["bwd_elems" if bwd else "fwd_elems"]
    block_m = max(1, elems // block_c)
    warps = TUNE["bwd_warps" if bwd else "fwd_warps"]
    if block_m * block_c >= 2 * elems:  # one row wider than a tile: more warps per row
        warps = 8
    return block_m, block_c, warps


@functools.cache
def _n_sm(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def forward(
    x2: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x2 [M, C]`` (unit column stride) -> ``(y [M, C] out_dtype, stats)``; ``stats`` is
    ``[2, M]`` float32 (mean, 1/std) for :func:`backward`, or None when not asked for."""
    m, c = x2.shape
    y = torch.empty((m, c), device=x2.device, dtype=out_dtype)
    st = torch.empty((2, m), device=x2.device, dtype=torch.float32) if stats else None
    if m == 0:
        return y, st
    block_m, block_c, warps = _plan(c, False)
    has_w, has_b = weight is not None, bias is not None
    _fwd_launch(
        (_cdiv(m, block_m),),
        (
            x2, weight if has_w else x2, bias if has_b else x2, y,
            st[0] if stats else y, st[1] if stats else y,
        ),
        (m, c, x2.stride(0), c, eps),
        dict(HAS_W=has_w, HAS_B=has_b, STATS=stats, BLOCK_M=block_m, BLOCK_C=block_c),
        dict(num_warps=warps),
        (has_w, has_b, stats, block_m, block_c, warps),
    )  # fmt: skip
    return y, st


def backward(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dx [M, C] in x's dtype, dweight [C] float32 or None, dbias [C] float32 or
    None)`` from ``dy2 [M, C]`` (unit column stride) and the forward's ``stats``."""
    m, c = x2.shape
    dx = torch.empty((m, c), device=x2.device, dtype=x2.dtype)
    block_m, block_c, warps = _plan(c, True)
    n_blocks = _cdiv(m, block_m)
    # a few programs per SM; on CPU (the interpreter) a handful, enough to exercise the loop
    slots = _n_sm(x2.get_device()) * TUNE["bwd_per_sm"] if x2.is_cuda else 3
    programs = max(1, min(n_blocks, slots))
    need_dw = need_dw and weight is not None
    part = None
    if need_dw or need_db:
        # every program writes its row of partial sums (programs <= row blocks)
        alloc = torch.empty if m > 0 else torch.zeros
        part = alloc((2, programs, c), device=x2.device, dtype=torch.float32)
    if m > 0:
        has_w = weight is not None
        _bwd_launch(
            (programs,),
            (
                dy2, x2, weight if has_w else x2, stats[0], stats[1], dx,
                part[0] if part is not None else dx, part[1] if part is not None else dx,
            ),
            (m, c, dy2.stride(0), x2.stride(0), c, _cdiv(n_blocks, programs)),
            dict(
                HAS_W=has_w, NEED_DW=need_dw, NEED_DB=need_db, BLOCK_M=block_m, BLOCK_C=block_c
            ),
            dict(num_warps=warps),
            (has_w, need_dw, need_db, block_m, block_c, warps),
        )  # fmt: skip
    if part is None:
        return dx, None, None
    sums = part.sum(1)
    return dx, sums[0] if need_dw else None, sums[1] if need_db else None

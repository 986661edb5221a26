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
_FWD_ELEMS = 4096  # elements per forward tile (rows x padded C)
_BWD_ELEMS = 4096
_BWD_PROGRAMS_PER_SM = 4


@triton.jit
def _ln_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,
    M, C, stride_xm, stride_ym, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
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
    dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
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
            dw_acc += tl.sum(dy * xhat, axis=0)
        if NEED_DB:
            db_acc += tl.sum(dy, axis=0)
    if NEED_DW:
        tl.store(DW_PART + pid * C + cols, dw_acc, mask=cmask)
    if NEED_DB:
        tl.store(DB_PART + pid * C + cols, db_acc, mask=cmask)


_fwd_launch = DirectLauncher(_ln_fwd_kernel, "VISIONATTN_LN_FAST_LAUNCH")
_bwd_launch = DirectLauncher(_ln_bwd_kernel, "VISIONATTN_LN_FAST_LAUNCH")


@functools.cache
def _fwd_meta(c: int) -> tuple:
    block_c = triton.next_power_of_2(c)
    block_m = max(1, _FWD_ELEMS // block_c)
    warps = 8 if block_c >= 2048 else 4
    return block_m, block_c, warps


@functools.cache
def _bwd_meta(c: int) -> tuple:
    block_c = triton.next_power_of_2(c)
    block_m = max(1, _BWD_ELEMS // block_c)
    warps = 8 if block_c >= 2048 else 4
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x2 [M, C]`` (unit column stride) -> ``(y [M, C] out_dtype, mean [M], rstd [M])``
    (statistics float32)."""
    m, c = x2.shape
    y = torch.empty((m, c), device=x2.device, dtype=out_dtype)
    mean = torch.empty(m, device=x2.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x2.device, dtype=torch.float32)
    if m == 0:
        return y, mean, rstd
    block_m, block_c, warps = _fwd_meta(c)
    has_w, has_b = weight is not None, bias is not None
    consts = dict(HAS_W=has_w, HAS_B=has_b, BLOCK_M=block_m, BLOCK_C=block_c)
    _fwd_launch(
        (triton.cdiv(m, block_m),),
        (x2, weight if has_w else x2, bias if has_b else x2, y, mean, rstd),
        (m, c, x2.stride(0), c, float(eps)),
        consts,
        dict(num_warps=warps),
        (has_w, has_b, block_m, block_c, warps),
    )
    return y, mean, rstd


def backward(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dx [M, C] in x's dtype, dweight [C] float32 or None, dbias [C] float32 or
    None)`` from ``dy2 [M, C]`` (unit column stride)."""
    m, c = x2.shape
    dx = torch.empty((m, c), device=x2.device, dtype=x2.dtype)
    block_m, block_c, warps = _bwd_meta(c)
    n_blocks = triton.cdiv(m, block_m)
    # a few programs per SM; on CPU (the interpreter) a handful, enough to exercise the loop
    slots = _n_sm(x2.device.index or 0) * _BWD_PROGRAMS_PER_SM if x2.is_cuda else 3
    programs = max(1, min(n_blocks, slots))
    n_iter = triton.cdiv(n_blocks, programs)
    need_dw = need_dw and weight is not None
    part = None
    if need_dw or need_db:
        part = torch.empty((2, programs, c), device=x2.device, dtype=torch.float32)
    if m > 0:
        has_w = weight is not None
        consts = dict(
            HAS_W=has_w, NEED_DW=need_dw, NEED_DB=need_db, BLOCK_M=block_m, BLOCK_C=block_c
        )
        dw_part = part[0] if part is not None else x2
        db_part = part[1] if part is not None else x2
        _bwd_launch(
            (programs,),
            (dy2, x2, weight if has_w else x2, mean, rstd, dx, dw_part, db_part),
            (m, c, dy2.stride(0), x2.stride(0), c, n_iter),
            consts,
            dict(num_warps=warps),
            (has_w, need_dw, need_db, block_m, block_c, warps),
        )
    elif part is not None:
        part.zero_()
    sums = part.sum(1) if part is not None else None
    dw = sums[0] if need_dw else None
    db = sums[1] if need_db else None
    return dx, dw, db

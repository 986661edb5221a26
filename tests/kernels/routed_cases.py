"""Routed-attention Triton kernels in Triton's interpreter (CPU): randomized sweep vs the
reference and the BiFormer-style gather.

Not collected by default (no ``test_`` prefix): Triton decides interpret-or-compile when each
``@triton.jit`` function is defined, including its own standard library, so these cases need
``TRITON_INTERPRET=1`` from the very start of the process.  ``test_routed_triton.py`` runs this
file in a subprocess with that variable set; the helpers here are also reused by its GPU tests.
Run by hand: ``TRITON_INTERPRET=1 pytest tests/kernels/routed_cases.py``.
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

import visionattn.kernels.routed as routed_mod
from visionattn.kernels.routed import routed_attention
from visionattn.kernels.routed_reference import (
    routed_attention_gather,
    routed_bwd_reference,
    routed_fwd_reference,
)


def _fast_interpreter() -> None:
    """Turn off the interpreter's per-op int32 overflow checks on address arithmetic: they
    double the run time, and these problems are far too small to overflow."""
    try:
        from triton.runtime import interpreter as ti

        ti.interpreter_builder.options = dataclasses.replace(
            ti.interpreter_builder.options, sanitize_overflow=False
        )
    except (ImportError, AttributeError, TypeError):  # other Triton versions: keep the checks
        pass


@pytest.fixture(scope="module")
def interp():
    """``routed_triton`` with every kernel interpreted (needs TRITON_INTERPRET=1 at startup)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("run this file with TRITON_INTERPRET=1 (test_routed_triton.py does)")
    import visionattn.kernels.routed_triton as mod

    _fast_interpreter()

    assert type(mod._routed_fwd_kernel).__name__ == "InterpretedFunction"
    return mod


_TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
# gradients are sums over many rows/keys rounded through half precision (P and dS are cast
# for the tensor cores): their tolerance is a multiple of the forward one, relative to |grad|
_GRAD_FACTOR = {torch.float32: 2.0, torch.float16: 4.0, torch.bfloat16: 4.0}


def _case(rng: random.Random, *, small: bool, device: str = "cpu"):
    """One random problem.  ``small`` keeps the interpreter's grid to a handful of programs."""
    if small:
        nh, nw = rng.choice([(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (2, 3), (3, 2)])
        th, tw = rng.randint(1, 5), rng.randint(1, 5)
        b, heads = rng.choice([(1, 1), (1, 2), (2, 1)])
        d = rng.choice([16, 32, 64, 8, 24])
    else:
        nh, nw = rng.randint(1, 8), rng.randint(1, 8)
        th, tw = rng.randint(1, 12), rng.randint(1, 12)
        b, heads = rng.randint(1, 3), rng.randint(1, 4)
        d = rng.choice([16, 32, 64, 128, 24, 40])
    if rng.random() < 0.25:
        kth, ktw = rng.randint(1, 4), rng.randint(1, 4)
    else:
        kth, ktw = th, tw
    dv = d if rng.random() < 0.7 else rng.choice([16, 32, 8, 48])
    t = nh * nw
    topk = rng.choice([1, t, rng.randint(1, t), t + rng.randint(1, 2)])
    per_head = rng.random() < 0.35
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    shape = (b, heads, t, topk) if per_head else (b, t, topk)
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    idx = torch.randint(0, t, shape, generator=g)  # random order, duplicates likely
    if rng.random() < 0.3:
        idx = idx.int()
    strided = rng.random() < 0.3
    if strided and (kth, ktw) == (th, tw) and dv == d:
        # views of one fused projection [B, H, W, 3, heads, D] -> heads-last non-contiguous
        qkv = torch.randn(b, nh * th, nw * tw, 3, heads, d, generator=g)
        q, k, v = qkv.to(device, dtype).unbind(3)
    else:
        q = torch.randn(b, nh * th, nw * tw, heads, d, generator=g).to(device, dtype)
        k = torch.randn(b, nh * kth, nw * ktw, heads, d, generator=g).to(device, dtype)
        v = torch.randn(b, nh * kth, nw * ktw, heads, dv, generator=g).to(device, dtype)
    scale = rng.uniform(0.05, 0.4)
    return q, k, v, idx.to(device), (th, tw, kth, ktw), scale


def _check_case(mod, q, k, v, idx, tiles, scale, *, with_dlse: bool, gather: bool):
    tol = _TOL[q.dtype]
    out, lse = mod.routed_fwd(q, k, v, idx, tiles, scale)
    ref_out, ref_lse = routed_fwd_reference(q, k, v, idx, tiles, scale)
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)
    g = torch.Generator().manual_seed(0)
    dout = torch.randn(out.shape, generator=g).to(q.device, q.dtype)
    dlse = torch.randn(lse.shape, generator=g).to(q.device) if with_dlse else None
    got = mod.routed_bwd(dout, q, k, v, idx, out, lse, dlse, tiles, scale)
    # the oracle sees the kernel's own forward output (delta = rowsum(dO * O) uses it)
    want = routed_bwd_reference(dout, q, k, v, idx, out, lse, dlse, tiles, scale)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # gradients sum over many keys/queries: scale the tolerance with their magnitude
        mag = b.float().abs().max().item() + 1.0
        torch.testing.assert_close(
            a.float(),
            b.float(),
            atol=tol["atol"] * mag * _GRAD_FACTOR[q.dtype],
            rtol=tol["rtol"] * _GRAD_FACTOR[q.dtype],
            msg=lambda m, n=name: f"d{n}: {m}",
        )
    if gather:
        qg, kg, vg = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = routed_attention_gather(qg, kg, vg, idx, tiles, scale)
        ref.backward(dout.double())
        torch.testing.assert_close(out.double(), ref.detach(), **tol)
        if dlse is None:
            for a, b in zip(got, (qg.grad, kg.grad, vg.grad)):
                mag = b.abs().max().item() + 1.0
                torch.testing.assert_close(
                    a.double(),
                    b,
                    atol=tol["atol"] * mag * _GRAD_FACTOR[q.dtype],
                    rtol=tol["rtol"] * _GRAD_FACTOR[q.dtype],
                )


# 10 shards x 21 configs = 210 randomized fwd+bwd configs per CI run
@pytest.mark.parametrize("shard", range(10))
def test_interpreted_sweep(interp, shard):
    rng = random.Random(1000 + shard)
    for i in range(21):
        q, k, v, idx, tiles, scale = _case(rng, small=True)
        try:
            _check_case(
                interp, q, k, v, idx, tiles, scale, with_dlse=(i % 5 == 0), gather=(i % 3 == 0)
            )
        except AssertionError as e:
            raise AssertionError(
                f"config {i}: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} "
                f"idx{tuple(idx.shape)} tiles={tiles} {q.dtype}\n{e}"
            ) from e


@pytest.mark.parametrize(
    "tune",
    [
        dict(fwd_rows=64, fwd_cols=32, dkv_keys=64, dkv_rows=16),
        dict(fwd_rows=16, fwd_cols=256, dkv_keys=16, dkv_rows=128),
        dict(fwd_rows=32, dq_rows=16, index_in_kernel=0),
        dict(fwd_rows=8, fwd_heads=1, fwd_cols=16),
        dict(fwd_rows=128, fwd_heads=4, fwd_head_rows=512, fwd_cols=128),
    ],
)
def test_interpreted_other_packings(interp, monkeypatch, tune):
    """Other tile packings (more/fewer tiles per program, other key steps, 1 to 4 heads per
    forward program) give the same, and so does the backward with a separate inverted-index
    launch."""
    monkeypatch.setattr(interp, "TUNE", {**interp.TUNE, **tune})
    rng = random.Random(77 + tune["fwd_rows"])
    for i in range(12):
        _check_case(interp, *_case(rng, small=True), with_dlse=i % 4 == 0, gather=False)


def test_interpreted_biformer_like_tiles(interp):
    """BiFormer stage-3-like 2x2 tiles on a 5x5 grid, topk 1, 7 and all-but-one."""
    g = torch.Generator().manual_seed(7)
    for topk in (1, 7, 24):
        q, k, v = (torch.randn(1, 10, 10, 1, 32, generator=g) for _ in range(3))
        idx = torch.stack([torch.randperm(25, generator=g)[:topk] for _ in range(25)]).unsqueeze(0)
        _check_case(interp, q, k, v, idx, (2, 2, 2, 2), 96**-0.5, with_dlse=False, gather=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interpreted_lean_heads_forward(interp, dtype):
    """The heads forward without a score mask (one unpacked tile per program, whole key steps)
    and with the scale folded into the exponent (positive scales), against the reference and
    against the masked, unfolded form; negative scales keep the separate multiply."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 8, 8, 4, 32, generator=g).to(dtype) for _ in range(3))
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(2 * 4)]).view(2, 4, 2)
    tiles = (4, 4, 4, 4)  # 16-pixel tiles, 2 routed tiles: 32 keys, one step
    for scale in (0.15, -0.15):
        flags = interp._fwd_plan(q, k, v, idx, tiles, scale, True)[3][-2:]
        assert flags == (True, scale > 0), flags
        out, lse = interp.routed_fwd(q, k, v, idx, tiles, scale)
        ref_out, ref_lse = routed_fwd_reference(q, k, v, idx, tiles, scale)
        torch.testing.assert_close(out.float(), ref_out.float(), **_TOL[dtype])
        torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)
        interp.TUNE["fwd_no_lean"] = 1
        try:
            out2, _ = interp.routed_fwd(q, k, v, idx, tiles, scale)
        finally:
            interp.TUNE["fwd_no_lean"] = 0
        torch.testing.assert_close(out, out2, atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile, big", [(6, (128, 128)), (12, (128, 128)), (12, (128, 32))])
def test_interpreted_lean_plain_forward(interp, monkeypatch, dtype, tile, big):
    """The one-tile-per-program forward: unmasked whole key steps and a masked short last one,
    the scale folded into the exponent for positive scales; against the reference and the
    masked, unfolded form. 36-pixel tiles take 32-key steps in bf16, 144-pixel tiles the
    ``big`` block shape (float32 keeps 64 x 64)."""
    monkeypatch.setattr(
        interp, "TUNE", {**interp.TUNE, "fwd_big_rows": big[0], "fwd_big_cols": big[1]}
    )
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2 * tile, 2 * tile, 2, 16, generator=g).to(dtype) for _ in range(3))
    idx = torch.stack([torch.randperm(4, generator=g)[:3] for _ in range(4)]).view(1, 4, 3)
    tiles = (tile, tile, tile, tile)  # 3 routed tiles: whole key steps and a short one
    for scale in (0.2, -0.2):
        plan = interp._fwd_plan(q, k, v, idx, tiles, scale, True)
        assert plan[-1] is interp._fwd_launch and plan[3][-1] == (scale > 0), plan[3][-6:]
        block_m, block_nt = plan[3][-7:-5]
        if dtype == torch.float32:
            assert (block_m, block_nt) == (64, 64)
        else:
            assert (block_m, block_nt) == ((64, 32) if tile == 6 else big)
        out, lse = interp.routed_fwd(q, k, v, idx, tiles, scale)
        ref_out, ref_lse = routed_fwd_reference(q, k, v, idx, tiles, scale)
        torch.testing.assert_close(out.float(), ref_out.float(), **_TOL[dtype])
        torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)
        interp.TUNE["fwd_no_lean"] = 1
        out2, _ = interp.routed_fwd(q, k, v, idx, tiles, scale)
        interp.TUNE["fwd_no_lean"] = 0
        torch.testing.assert_close(out, out2, atol=2e-3 if dtype != torch.float32 else 1e-5, rtol=0)


def test_interpreted_large_tile_backward(interp):
    """144-pixel tiles in bf16 take the large-tile backward shapes (dq: 64 rows x 128 keys;
    dK/dV: 64 keys x 128 query rows); forward and gradients against the reference."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 24, 24, 2, 16, generator=g).bfloat16() for _ in range(3))
    idx = torch.stack([torch.randperm(4, generator=g)[:3] for _ in range(4)]).view(1, 4, 3)
    tiles, scale = (12, 12, 12, 12), 0.2
    out, lse = interp.routed_fwd(q, k, v, idx, tiles, scale)
    plan = interp._bwd_plan(q, k, v, idx, tiles, scale, out, out, lse, None)
    dq_scalars, dkv_scalars = plan[3][1], plan[4][1]
    assert dq_scalars[-6:-4] == (64, 128), dq_scalars[-9:]
    assert dkv_scalars[-7:-5] == (128, 64), dkv_scalars[-9:]
    _check_case(interp, q, k, v, idx, tiles, scale, with_dlse=True, gather=False)


def test_interpreted_public_api_autograd(interp, monkeypatch):
    """routed_attention through the custom ops with the (interpreted) Triton backend."""
    monkeypatch.setattr(routed_mod, "_TRITON", interp)
    monkeypatch.setenv("VISIONATTN_ROUTED_IMPL", "triton")
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 4, 6, 3, 2, 16, generator=g, requires_grad=True)
    q, k, v = qkv.unbind(3)
    idx = torch.tensor([[[0, 0, 5], [1, 2, 3], [4, 4, 4], [2, 0, 1], [3, 5, 0], [1, 1, 2]]] * 2)
    out, lse = routed_attention(q, k, v, idx, n_win=(2, 3), scale=0.2, return_lse=True)
    (out.square().sum() + lse.sum()).backward()
    got = qkv.grad.clone()
    qkv.grad = None
    monkeypatch.setenv("VISIONATTN_ROUTED_IMPL", "reference")
    out2, lse2 = routed_attention(q, k, v, idx, n_win=(2, 3), scale=0.2, return_lse=True)
    (out2.square().sum() + lse2.sum()).backward()
    torch.testing.assert_close(out, out2, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, qkv.grad, atol=5e-5, rtol=5e-5)


def test_inverted_index(interp):
    idx = torch.tensor([[[[2, 0, 2], [1, 2, 2]]], [[[0, 0, 0], [1, 1, 2]]]])  # [B=2, 1, T=2, 3]
    want = [[0], [1], [0, 0, 1, 1], [0, 0, 0], [1, 1], [1]]
    for build in (interp._inverted_index, interp._inverted_index_sorted):
        off, tiles = build(idx, 3)
        assert [tiles[off[i] : off[i + 1]].tolist() for i in range(6)] == want
    # kernel vs sort on a random per-head list with a kv grid of its own size
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 7, (2, 3, 5, 4), generator=g).int()[:, :, :, 1:]  # strided view
    a, b = interp._inverted_index(idx, 7), interp._inverted_index_sorted(idx, 7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_forward_without_lse(interp):
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 4, 4, 2, 16, generator=g) for _ in range(3))
    idx = torch.randint(0, 4, (1, 4, 3), generator=g)
    out, lse = interp.routed_fwd(q, k, v, idx, (2, 2, 2, 2), 0.3, True)
    out2, lse2 = interp.routed_fwd(q, k, v, idx, (2, 2, 2, 2), 0.3, False)
    assert lse2.numel() == 0
    torch.testing.assert_close(out, out2)


@pytest.mark.slow
def test_interpreted_sweep_large(interp):
    rng = random.Random(99)
    for _ in range(200):
        _check_case(interp, *_case(rng, small=True), with_dlse=rng.random() < 0.3, gather=True)

"""Routed attention: public API, reference path, custom op / autograd / compile, bad inputs.

The Triton kernels are checked in test_routed_triton.py (interpreter on CPU, compiled on GPU).
"""

from __future__ import annotations

import random

import pytest
import torch

from visionattn.kernels.routed import routed_attention, routed_tiles
from visionattn.kernels.routed_reference import (
    routed_attention_gather,
    routed_bwd_reference,
    routed_fwd_reference,
)


def _random_case(rng: random.Random, dtype=torch.float32, device="cpu"):
    """A random routed-attention problem: grids, tile shapes, topk, duplicates, head dims."""
    nh, nw = rng.randint(1, 4), rng.randint(1, 4)
    th, tw = rng.randint(1, 4), rng.randint(1, 4)
    if rng.random() < 0.3:  # kv map with its own size (same grid, other tile shape)
        kth, ktw = rng.randint(1, 3), rng.randint(1, 3)
    else:
        kth, ktw = th, tw
    b, heads = rng.randint(1, 2), rng.randint(1, 3)
    d = rng.choice([4, 8, 16])
    dv = d if rng.random() < 0.7 else rng.choice([4, 8, 12])
    t = nh * nw
    topk = rng.randint(1, t + 2)  # > t forces duplicates
    per_head = rng.random() < 0.4
    shape = (b, heads, t, topk) if per_head else (b, t, topk)
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    if topk <= t and rng.random() < 0.5:
        idx = torch.stack(
            [
                torch.randperm(t, generator=g)[:topk]
                for _ in range(b * t * (heads if per_head else 1))
            ]
        )
        idx = idx.reshape(shape)
    else:
        idx = torch.randint(0, t, shape, generator=g)
    q = torch.randn(b, nh * th, nw * tw, heads, d, generator=g)
    k = torch.randn(b, nh * kth, nw * ktw, heads, d, generator=g)
    v = torch.randn(b, nh * kth, nw * ktw, heads, dv, generator=g)
    return (
        q.to(device, dtype),
        k.to(device, dtype),
        v.to(device, dtype),
        idx.to(device),
        (nh, nw),
        (th, tw, kth, ktw),
    )


def _naive(q, k, v, idx, tiles, scale):
    """Per-query loop: build each query's key list explicitly (duplicates repeated)."""
    th, tw, kth, ktw = tiles
    b, hq, wq, heads, _ = q.shape
    nw, knw = wq // tw, k.shape[2] // ktw
    if idx.dim() == 3:
        idx = idx.unsqueeze(1).expand(-1, heads, -1, -1)
    out = torch.zeros(b, hq, wq, heads, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(heads):
            for y in range(hq):
                for x in range(wq):
                    t = (y // th) * nw + x // tw
                    keys, vals = [], []
                    for j in idx[bi, h, t].tolist():
                        r0, c0 = (j // knw) * kth, (j % knw) * ktw
                        blk_k = k[bi, r0 : r0 + kth, c0 : c0 + ktw, h].reshape(-1, k.shape[-1])
                        blk_v = v[bi, r0 : r0 + kth, c0 : c0 + ktw, h].reshape(-1, v.shape[-1])
                        keys.append(blk_k)
                        vals.append(blk_v)
                    kk, vv = torch.cat(keys).double(), torch.cat(vals).double()
                    p = torch.softmax(kk @ q[bi, y, x, h].double() * scale, 0)
                    out[bi, y, x, h] = p @ vv
    return out


def test_reference_matches_naive_loop():
    rng = random.Random(0)
    for _ in range(12):
        q, k, v, idx, grid, tiles = _random_case(rng)
        scale = rng.uniform(0.1, 0.6)
        out, _ = routed_fwd_reference(q, k, v, idx, tiles, scale)
        torch.testing.assert_close(
            out.double(), _naive(q, k, v, idx, tiles, scale), atol=1e-5, rtol=1e-5
        )


def test_reference_and_gather_agree_fwd_bwd_sweep():
    """Chunked reference (explicit backward) vs BiFormer-style gather (autograd), 60 configs."""
    rng = random.Random(1)
    for _ in range(60):
        q, k, v, idx, grid, tiles = _random_case(rng, dtype=torch.float64)
        scale = rng.uniform(0.1, 0.6)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        ref = routed_attention_gather(qg, kg, vg, idx, tiles, scale)
        dout = torch.randn_like(ref)
        ref.backward(dout)
        out, lse = routed_fwd_reference(q, k, v, idx, tiles, scale)
        torch.testing.assert_close(out, ref.detach())
        dq, dk, dv = routed_bwd_reference(dout, q, k, v, idx, out, lse, None, tiles, scale)
        torch.testing.assert_close(dq, qg.grad)
        torch.testing.assert_close(dk, kg.grad)
        torch.testing.assert_close(dv, vg.grad)


def test_public_api_autograd_and_lse():
    rng = random.Random(2)
    for _ in range(10):
        q, k, v, idx, grid, tiles = _random_case(rng, dtype=torch.float64)
        th, tw, kth, ktw = tiles
        scale = 0.3
        qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = routed_attention(
            qa,
            ka,
            va,
            idx,
            tile_size=(th, tw),
            kv_tile_size=(kth, ktw),
            scale=scale,
            return_lse=True,
        )
        # a loss that uses both outputs exercises the lse gradient
        wo, wl = torch.randn_like(out), torch.randn_like(lse)
        ((out * wo).sum() + (lse * wl).sum()).backward()
        qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
        ref = routed_attention_gather(qb, kb, vb, idx, tiles, scale)
        # the lse of the gathered logits, for the oracle
        from visionattn.kernels.routed_reference import _expand_indices, _gather_tiles, map_to_tiles

        heads = q.shape[3]
        qt = map_to_tiles(qb, th, tw)
        kt = map_to_tiles(kb, kth, ktw)
        ref_lse = torch.logsumexp(
            torch.matmul(qt, _gather_tiles(kt, _expand_indices(idx, heads)).transpose(-1, -2))
            * scale,
            -1,
        )
        nh, nw = q.shape[1] // th, q.shape[2] // tw
        from visionattn.kernels.routed_reference import tiles_to_map

        ref_lse = tiles_to_map(ref_lse.unsqueeze(-1), nh, nw, th, tw).squeeze(-1)
        ((ref * wo).sum() + (ref_lse * wl).sum()).backward()
        torch.testing.assert_close(out, ref.detach())
        torch.testing.assert_close(lse, ref_lse.detach())
        for a, b_ in ((qa, qb), (ka, kb), (va, vb)):
            torch.testing.assert_close(a.grad, b_.grad)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 6, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 4, 6, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 4, 6, 2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.tensor([[[0, 5, 5], [1, 2, 3], [4, 4, 4], [2, 0, 1], [3, 5, 0], [1, 1, 2]]])

    def f(q, k, v):
        out, lse = routed_attention(q, k, v, idx, n_win=(2, 3), scale=0.7, return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_duplicates_count_twice():
    """A tile listed twice weighs double in the softmax, exactly as a gather would do."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 4, 1, 8, generator=g)
    k = torch.randn(1, 2, 4, 1, 8, generator=g)
    v = torch.randn(1, 2, 4, 1, 8, generator=g)
    dup = torch.tensor([[[0, 0, 1], [1, 1, 1]]])
    out = routed_attention(q, k, v, dup, n_win=(1, 2))
    ref = routed_attention_gather(q, k, v, dup, (2, 2, 2, 2), 8**-0.5)
    torch.testing.assert_close(out, ref)
    # query tile 1 lists only tile 1 (three times): same as listing it once
    once = routed_attention(
        q, k, v, torch.tensor([[[0, 0, 1], [1, 1, 1]]])[..., :1].clone(), n_win=(1, 2)
    )
    torch.testing.assert_close(out[:, :, 2:], once[:, :, 2:])
    # query tile 0 weighs tile 0 double: differs from the de-duplicated list
    dedup = routed_attention(q, k, v, torch.tensor([[[0, 1], [1, 0]]]), n_win=(1, 2))
    assert (out[:, :, :2] - dedup[:, :, :2]).abs().max() > 1e-3


def test_order_invariance_and_shared_equals_per_head():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 6, 6, 3, 8, generator=g) for _ in range(3))
    idx = torch.randint(0, 9, (2, 9, 4), generator=g)
    out = routed_attention(q, k, v, idx, n_win=3)
    perm = idx[..., torch.tensor([2, 0, 3, 1])]
    torch.testing.assert_close(routed_attention(q, k, v, perm, n_win=3), out, atol=1e-6, rtol=1e-5)
    per_head = idx.unsqueeze(1).expand(-1, 3, -1, -1)
    torch.testing.assert_close(routed_attention(q, k, v, per_head, n_win=3), out)


def test_strided_views_of_fused_qkv():
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(2, 8, 4, 3 * 2 * 8, generator=g).requires_grad_()
    q, k, v = qkv.reshape(2, 8, 4, 3, 2, 8).unbind(3)
    idx = torch.randint(0, 4, (2, 4, 2), generator=g)
    out = routed_attention(q, k, v, idx, n_win=(2, 2))
    ref = routed_attention_gather(
        q.contiguous(), k.contiguous(), v.contiguous(), idx, (4, 2, 4, 2), 8**-0.5
    )
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0


def test_default_scale_is_head_dim():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 4, 4, 2, 16, generator=g) for _ in range(3))
    idx = torch.randint(0, 4, (1, 4, 2), generator=g)
    torch.testing.assert_close(
        routed_attention(q, k, v, idx, n_win=2), routed_attention(q, k, v, idx, n_win=2, scale=0.25)
    )


def test_half_dtypes_on_reference_path():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 4, 4, 2, 16, generator=g) for _ in range(3))
    idx = torch.randint(0, 4, (1, 4, 3), generator=g)
    ref = routed_attention(q, k, v, idx, n_win=2)
    for dt in (torch.float16, torch.bfloat16):
        out = routed_attention(q.to(dt), k.to(dt), v.to(dt), idx, n_win=2)
        assert out.dtype == dt
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 4, 4, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    idx = torch.randint(0, 4, (1, 4, 2), generator=g)

    def f(q, k, v, idx):
        return (
            routed_attention(q, k, v, idx, n_win=2, scale=0.5, check_indices=False).square().sum()
        )

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, idx)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    f(q, k, v, idx).backward()
    torch.testing.assert_close(loss, f(q, k, v, idx))
    for a, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, t.grad)


def test_opcheck():
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 4, 4, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    idx = torch.randint(0, 4, (1, 1, 4, 2), generator=g)
    torch.library.opcheck(
        torch.ops.visionattn.routed_attn_fwd.default, (q, k, v, idx, [2, 2, 2, 2], 0.5, True)
    )


def test_inference_skips_lse():
    """Without grad and return_lse the op returns an empty lse (nothing extra is kept)."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 4, 4, 2, 8, generator=g) for _ in range(3))
    idx = torch.randint(0, 4, (1, 4, 2), generator=g)
    out, lse = torch.ops.visionattn.routed_attn_fwd(q, k, v, idx, [2, 2, 2, 2], 0.5, False)
    assert lse.numel() == 0
    torch.testing.assert_close(out, routed_attention(q, k, v, idx, n_win=2, scale=0.5))


def test_routed_tiles():
    assert routed_tiles((8, 12), (8, 12), n_win=4) == (2, 3, 2, 3)
    assert routed_tiles((8, 12), (4, 6), n_win=(2, 3)) == (4, 4, 2, 2)
    assert routed_tiles((8, 12), (4, 6), tile_size=(4, 4)) == (4, 4, 2, 2)
    assert routed_tiles((8, 12), (4, 6), tile_size=(4, 4), kv_tile_size=1) == (4, 4, 1, 1)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(idx=torch.tensor([[[0], [4], [1], [2]]])), ValueError, "out of range"),
        (dict(idx=torch.tensor([[[0], [-1], [1], [2]]])), ValueError, "out of range"),
        (dict(idx=torch.zeros(1, 3, 1, dtype=torch.long)), ValueError, "indices must be"),
        (dict(idx=torch.zeros(1, 4, 1)), TypeError, "int32 or int64"),
        (dict(idx=torch.zeros(1, 4, 0, dtype=torch.long)), ValueError, "topk >= 1"),
        (dict(idx=torch.zeros(1, 3, 4, 1, dtype=torch.long)), ValueError, "indices must be"),
        (dict(n_win=3), ValueError, "not divisible"),
        (dict(n_win=None), ValueError, "exactly one"),
        (dict(tile_size=2), ValueError, "exactly one"),
        (dict(n_win=0), ValueError, "positive"),
        (dict(n_win=2.0), TypeError, "n_win"),
        (dict(k=torch.randn(1, 4, 4, 2, 4)), ValueError, "head_dim"),
        (dict(k=torch.randn(1, 4, 4, 3, 8)), ValueError, "head counts"),
        (dict(v=torch.randn(1, 2, 4, 2, 8)), ValueError, "spatial"),
        (dict(k=torch.randn(2, 4, 4, 2, 8)), ValueError, "batch"),
        (dict(q=torch.randn(1, 4, 4, 16)), ValueError, "heads, head_dim"),
        (dict(v=torch.randn(1, 4, 4, 2, 8).half()), TypeError, "dtype"),
        (dict(q=torch.randint(0, 3, (1, 4, 4, 2, 8))), TypeError, "float"),
        (
            dict(
                k=torch.randn(1, 5, 4, 2, 8), v=torch.randn(1, 5, 4, 2, 8), n_win=None, tile_size=2
            ),
            ValueError,
            "not divisible",
        ),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    g = torch.Generator().manual_seed(11)
    args = dict(
        q=torch.randn(1, 4, 4, 2, 8, generator=g),
        k=torch.randn(1, 4, 4, 2, 8, generator=g),
        v=torch.randn(1, 4, 4, 2, 8, generator=g),
        idx=torch.zeros(1, 4, 1, dtype=torch.long),
        n_win=2,
    )
    args.update(kwargs)
    extra = {"tile_size": args.pop("tile_size")} if "tile_size" in args else {}
    with pytest.raises(exc, match=match):
        routed_attention(args["q"], args["k"], args["v"], args["idx"], n_win=args["n_win"], **extra)

"""Neighbourhood attention: API, reference vs independent oracles, natten, compile, errors.

Oracles used here, each written independently of the library code:
* ``_oracle``: dense ``q @ k^T`` over the whole map, then each query picks its window columns
  from index tables built with plain Python loops from the documented semantics;
* natten's own ``na1d/na2d/na3d`` (Flex backend, CPU) for every ``border="clamp"`` pattern;
* explicit constructions: zero-padded unfold (HaloNet-style blocks and plain zero-border
  windows) and window / grid partitions + SDPA (MaxViT block and grid).
"""

from __future__ import annotations

import itertools
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from visionattn.kernels import merge_attentions, na1d, na2d, na3d

OPS = {1: na1d, 2: na2d, 3: na3d}


# ----------------------------------------------------------------------------- oracle
def _axis_py(L, k, s, d, causal, zero):
    """Per query: list of (key index, inside map, takes part, rel index), Python loops."""
    rows = []
    for i in range(L):
        g, ip = i % d, i // d
        lg = len(range(g, L, d))
        if causal:
            lead = (ip // s) * s + s - 1
            if not zero:
                lead = min(lead, lg - 1)
            first = lead - k + 1
        else:
            lead = (ip // s) * s + s // 2
            if not zero:
                lead = min(lead, lg - 1)
            first = lead - k // 2
            if not zero:
                first = max(0, min(first, lg - k))
        row = []
        for t in range(k):
            jp = first + t
            inside = 0 <= jp < lg
            takes = jp <= ip if causal else True
            if not zero and not inside:
                takes = False
            row.append((jp * d + g, inside, takes, jp - ip + k - 1))
        rows.append(row)
    return rows


def _oracle_tables(spatial, ks, st, dl, ca, zero):
    axes = [_axis_py(L, k, s, d, c, zero) for L, k, s, d, c in zip(spatial, ks, st, dl, ca)]
    n = math.prod(spatial)
    kk = math.prod(ks)
    key = torch.zeros(n, kk, dtype=torch.long)
    inside = torch.zeros(n, kk, dtype=torch.bool)
    takes = torch.zeros(n, kk, dtype=torch.bool)
    rel = torch.zeros(n, kk, dtype=torch.long)
    for qi, qc in enumerate(itertools.product(*[range(L) for L in spatial])):
        for ti, tc in enumerate(itertools.product(*[range(k) for k in ks])):
            ent = [axes[a][qc[a]][tc[a]] for a in range(len(spatial))]
            ins = all(e[1] for e in ent)
            flat, r = 0, 0
            for a, e in enumerate(ent):
                flat = flat * spatial[a] + min(max(e[0], 0), spatial[a] - 1)
                r = r * (2 * ks[a] - 1) + e[3]
            key[qi, ti] = flat
            inside[qi, ti] = ins
            takes[qi, ti] = all(e[2] for e in ent)
            rel[qi, ti] = r
    return key, inside, takes, rel


def _oracle(q, k, v, ks, st, dl, ca, zero, rpb=None, attn_bias=None, scale=None):
    """Dense masked attention: full q k^T, each query's window columns picked by the tables."""
    n_dims = q.dim() - 3
    spatial = tuple(q.shape[1 : 1 + n_dims])
    b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    key, inside, takes, rel = _oracle_tables(spatial, ks, st, dl, ca, zero)
    n, kk = key.shape
    qf = q.reshape(b, n, h, d).transpose(1, 2)
    kf = k.reshape(b, n, h, d).transpose(1, 2)
    vf = v.reshape(b, n, h, v.shape[-1]).transpose(1, 2)
    dense = qf @ kf.transpose(-1, -2) * scale  # [B, h, N, N]
    logits = torch.gather(dense, 3, key.expand(b, h, n, kk))
    logits = torch.where(inside, logits, torch.zeros_like(logits))  # zero keys: q.0 = 0
    if rpb is not None:
        logits = logits + rpb.reshape(h, -1)[:, rel].unsqueeze(0)
    if attn_bias is not None:
        logits = logits + attn_bias.reshape(*attn_bias.shape[:2], n, kk)
    logits = logits.masked_fill(~takes, float("-inf"))
    p = logits.softmax(-1)
    lse = logits.logsumexp(-1)
    pw = torch.where(inside, p, torch.zeros_like(p))  # zero values contribute nothing
    dense_p = torch.zeros(b, h, n, n, dtype=p.dtype).scatter_add(3, key.expand(b, h, n, kk), pw)
    out = (dense_p @ vf).transpose(1, 2).reshape(b, *spatial, h, v.shape[-1])
    return out, lse.permute(0, 2, 1).reshape(b, *spatial, h)


def _rand(shape, dtype=torch.float64, grad=False, gen=None):
    t = torch.randn(shape, dtype=dtype, generator=gen)
    return t.requires_grad_(grad)


def _random_config(rng, n_dims, border=None):
    spatial, ks, st, dl, ca = [], [], [], [], []
    for _ in range(n_dims):
        k = rng.randint(1, 5)
        d = rng.choice([1, 1, 2, 3])
        L = k * d + rng.randint(0, 5)
        spatial.append(L)
        ks.append(k)
        st.append(rng.randint(1, k))
        dl.append(d)
        ca.append(rng.random() < 0.25)
    border = border or rng.choice(["clamp", "zero"])
    return tuple(spatial), tuple(ks), tuple(st), tuple(dl), tuple(ca), border


# ----------------------------------------------------------------------------- reference vs oracle
@pytest.mark.parametrize("seed", range(32))
def test_reference_matches_oracle_fp64(seed):
    rng = random.Random(seed)
    n_dims = [1, 2, 2, 3][seed % 4]
    spatial, ks, st, dl, ca, border = _random_config(rng, n_dims)
    if n_dims == 3:  # keep the Python-loop oracle tables small
        spatial = tuple(max(k * d, min(s, 5)) for s, k, d in zip(spatial, ks, dl))
    b, h = rng.randint(1, 2), rng.randint(1, 3)
    d, dv = rng.choice([4, 8, 12]), rng.choice([4, 8, 12])
    gen = torch.Generator().manual_seed(seed)
    q = _rand((b, *spatial, h, d), grad=True, gen=gen)
    k = _rand((b, *spatial, h, d), grad=True, gen=gen)
    v = _rand((b, *spatial, h, dv), grad=True, gen=gen)
    rpb = _rand((h, *(2 * x - 1 for x in ks)), grad=True, gen=gen) if rng.random() < 0.5 else None
    ab = None
    if rng.random() < 0.5:
        ab = _rand((rng.choice([1, b]), rng.choice([1, h]), *spatial, *ks), grad=True, gen=gen)
    scale = rng.choice([None, 0.3])
    out, lse = OPS[n_dims](
        q, k, v, ks, st, dl, ca, rpb=rpb, attn_bias=ab, scale=scale, border=border,
        return_lse=True,
    )  # fmt: skip
    ref, ref_lse = _oracle(q, k, v, ks, st, dl, ca, border == "zero", rpb, ab, scale)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)  # lse is float32
    # Gradients, including through lse (e.g. merging with other attention).
    g_out = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    g_lse = torch.randn(ref_lse.shape, dtype=ref_lse.dtype, generator=gen)
    leaves = {"q": q, "k": k, "v": v, "rpb": rpb, "attn_bias": ab}
    leaves = {n_: t for n_, t in leaves.items() if t is not None}
    got = torch.autograd.grad(
        (out * g_out).sum() + (lse.double() * g_lse).sum(), list(leaves.values())
    )
    want = torch.autograd.grad((ref * g_out).sum() + (ref_lse * g_lse).sum(), list(leaves.values()))
    for name, a, b_ in zip(leaves, got, want):
        # the backward recomputes P from the float32 lse (relative error ~1e-7); the table
        # gradients sum P-weighted terms over every query, so the error scales with them
        atol = 1e-6 * max(1.0, b_.abs().max().item())
        torch.testing.assert_close(a, b_, atol=atol, rtol=1e-6, msg=f"grad {name}")


def test_reference_fp32_and_strided_views():
    """fp32 at 1e-4, q/k/v as non-contiguous views of a fused qkv projection."""
    gen = torch.Generator().manual_seed(0)
    b, hgt, wid, h, d = 2, 9, 11, 3, 16
    qkv = torch.randn(b, hgt, wid, 3, h, d, generator=gen)
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    out = na2d(q, k, v, (3, 5), stride=(1, 2), dilation=(2, 1))
    ref, _ = _oracle(
        q.double(), k.double(), v.double(), (3, 5), (1, 2), (2, 1), (False,) * 2, False
    )
    torch.testing.assert_close(out, ref.float(), atol=1e-4, rtol=1e-4)


def test_reference_half_dtypes_on_cpu():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 8, 8, 2, 16, generator=gen) for _ in range(3))
    ref = na2d(q, k, v, 3)
    for dt in (torch.float16, torch.bfloat16):
        out = na2d(q.to(dt), k.to(dt), v.to(dt), 3)
        assert out.dtype == dt
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_reference_chunking_matches_unchunked(monkeypatch):
    import visionattn.kernels.na_reference as nr

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 10, 9, 2, 8, dtype=torch.float64, generator=gen) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_(True)
    out = na2d(q, k, v, 5, dilation=(2, 1), border="zero")
    g = torch.autograd.grad(out.square().sum(), (q, k, v))
    monkeypatch.setattr(nr, "_CHUNK_ELEMS", 1)  # one query per chunk
    out2 = na2d(q, k, v, 5, dilation=(2, 1), border="zero")
    g2 = torch.autograd.grad(out2.square().sum(), (q, k, v))
    torch.testing.assert_close(out, out2)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- explicit constructions
def test_zero_border_matches_padded_unfold():
    """Plain zero-border NA (stride 1) == attention over unfolded zero-padded k/v windows."""
    gen = torch.Generator().manual_seed(3)
    b, H, W, h, d, ksz = 2, 6, 7, 2, 8, 4  # even kernel: 2 before, 1 after
    q, k, v = (torch.randn(b, H, W, h, d, dtype=torch.float64, generator=gen) for _ in range(3))
    out = na2d(q, k, v, ksz, border="zero")
    before, after = ksz // 2, ksz - 1 - ksz // 2

    def windows(x):  # [B, H, W, h, d] -> [B, H, W, h, k*k, d]
        xp = F.pad(x.permute(0, 3, 4, 1, 2), (before, after, before, after))
        u = xp.unfold(3, ksz, 1).unfold(4, ksz, 1)  # [B, h, d, H, W, k, k]
        return u.reshape(b, h, d, H, W, ksz * ksz).permute(0, 3, 4, 1, 5, 2)

    kw, vw = windows(k), windows(v)
    att = (torch.einsum("bxyhd,bxyhtd->bxyht", q, kw) * d**-0.5).softmax(-1)
    ref = torch.einsum("bxyht,bxyhtd->bxyhd", att, vw)
    torch.testing.assert_close(out, ref)


def test_halonet_blocks():
    """HaloNet: block 4, halo 1 -> kernel 6, stride 4, zero border, content-dependent bias."""
    gen = torch.Generator().manual_seed(4)
    b, H, W, h, d, blk, halo = 2, 8, 8, 2, 8, 4, 1
    win = blk + 2 * halo
    q, k, v = (torch.randn(b, H, W, h, d, dtype=torch.float64, generator=gen) for _ in range(3))
    bias = torch.randn(b, h, H, W, win, win, dtype=torch.float64, generator=gen)
    out = na2d(q, k, v, win, stride=blk, border="zero", attn_bias=bias)

    def blocks(x):  # keys/values: padded by halo, unfold (win, step blk)
        xp = F.pad(x.permute(0, 3, 4, 1, 2), (halo, halo, halo, halo))
        u = xp.unfold(3, win, blk).unfold(4, win, blk)  # [B, h, d, nH, nW, win, win]
        return u.reshape(*u.shape[:5], win * win)

    kb, vb = blocks(k), blocks(v)  # [B, h, d, nH, nW, T]
    qb = q.reshape(b, H // blk, blk, W // blk, blk, h, d)
    logits = torch.einsum("bxiyjhd,bhdxyt->bxiyjht", qb, kb) * d**-0.5
    logits = logits + bias.reshape(b, h, H // blk, blk, W // blk, blk, -1).permute(
        0, 2, 3, 4, 5, 1, 6
    )
    ref = torch.einsum("bxiyjht,bhdxyt->bxiyjhd", logits.softmax(-1), vb).reshape(b, H, W, h, d)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("border", ["clamp", "zero"])
def test_maxvit_block_and_grid(border):
    """kernel=stride=window -> window partition; + dilation=size//grid -> grid partition."""
    gen = torch.Generator().manual_seed(5)
    b, H, W, h, d, p = 2, 6, 9, 2, 8, 3
    q, k, v = (torch.randn(b, H, W, h, d, dtype=torch.float64, generator=gen) for _ in range(3))
    rpb = torch.randn(h, 2 * p - 1, 2 * p - 1, dtype=torch.float64, generator=gen)
    # relative bias of a p x p window, as MaxViT/Swin index it
    coords = torch.stack(torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")).flatten(1)
    relc = coords[:, None, :] - coords[:, :, None] + p - 1  # [2, Tq, Tk]: key - query
    table_bias = rpb[:, relc[0], relc[1]]  # [h, Tq, Tk]

    def attend(xq, xk, xv):  # [..., T, h, d]
        lg = torch.einsum("...qhd,...khd->...hqk", xq, xk) * d**-0.5 + table_bias
        return torch.einsum("...hqk,...khd->...qhd", lg.softmax(-1), xv)

    def part_block(x):
        x = x.reshape(b, H // p, p, W // p, p, h, d).permute(0, 1, 3, 2, 4, 5, 6)
        return x.reshape(b, H // p, W // p, p * p, h, d)

    def unpart_block(x):
        x = x.reshape(b, H // p, W // p, p, p, h, d).permute(0, 1, 3, 2, 4, 5, 6)
        return x.reshape(b, H, W, h, d)

    out = na2d(q, k, v, p, stride=p, rpb=rpb, border=border)
    ref = unpart_block(attend(part_block(q), part_block(k), part_block(v)))
    torch.testing.assert_close(out, ref)

    def part_grid(x):
        x = x.reshape(b, p, H // p, p, W // p, h, d).permute(0, 2, 4, 1, 3, 5, 6)
        return x.reshape(b, H // p, W // p, p * p, h, d)

    def unpart_grid(x):
        x = x.reshape(b, H // p, W // p, p, p, h, d).permute(0, 3, 1, 4, 2, 5, 6)
        return x.reshape(b, H, W, h, d)

    out = na2d(q, k, v, p, stride=p, dilation=(H // p, W // p), rpb=rpb, border=border)
    ref = unpart_grid(attend(part_grid(q), part_grid(k), part_grid(v)))
    torch.testing.assert_close(out, ref)


def test_full_window_is_dense_attention():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 5, 6, 3, 8, generator=gen) for _ in range(3))
    out = na2d(q, k, v, (5, 6))
    ref = F.scaled_dot_product_attention(
        *(t.flatten(1, 2).transpose(1, 2) for t in (q, k, v))
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref.reshape(out.shape), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- natten
natten = pytest.importorskip("natten")


def _natten_configs(seed, counts):
    rng = random.Random(seed)
    cfgs = []
    for n_dims, count in zip((1, 2, 3), counts):
        for _ in range(count):
            spatial, ks, st, dl, ca = [], [], [], [], []
            for a in range(n_dims):
                k = rng.randint(2, 5 if n_dims < 3 else 3)  # natten needs kernel_size >= 2
                d = rng.choice([1, 1, 2, 3])
                # natten hands kernel == map (self attention) to its FMHA path, which has no
                # CPU backend; keep the first axis larger than its kernel.
                spatial.append(k * d + rng.randint(1 if a == 0 else 0, 4))
                ks.append(k)
                st.append(rng.randint(1, k))
                dl.append(d)
                ca.append(rng.random() < 0.3)
            cfgs.append((tuple(spatial), tuple(ks), tuple(st), tuple(dl), tuple(ca)))
    return cfgs


NATTEN_OPS = {1: "na1d", 2: "na2d", 3: "na3d"}


_NATTEN_FAST = _natten_configs(1234, (8, 14, 4))
_NATTEN_SLOW = [pytest.param(c, marks=pytest.mark.slow) for c in _natten_configs(99, (40, 80, 30))]


@pytest.mark.parametrize("cfg", _NATTEN_FAST + _NATTEN_SLOW, ids=lambda c: "-".join(map(str, c)))
def test_clamp_matches_natten(cfg):
    spatial, ks, st, dl, ca = cfg
    n_dims = len(spatial)
    gen = torch.Generator().manual_seed(hash(cfg) % 2**31)
    q, k, v = (torch.randn(2, *spatial, 2, 16, generator=gen) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, ref_lse = getattr(natten, NATTEN_OPS[n_dims])(
            q, k, v, kernel_size=ks, stride=st, dilation=dl, is_causal=ca, return_lse=True
        )
    out, lse = OPS[n_dims](q, k, v, ks, st, dl, ca, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- merge
def test_merge_with_global_tokens():
    """NA + a few global tokens via lse merge == softmax over the union of both key sets."""
    gen = torch.Generator().manual_seed(7)
    b, H, W, h, d, ng = 2, 6, 6, 2, 8, 3
    q, k, v = (torch.randn(b, H, W, h, d, dtype=torch.float64, generator=gen) for _ in range(3))
    gk, gv = (torch.randn(b, ng, h, d, dtype=torch.float64, generator=gen) for _ in range(2))
    for t in (q, k, v, gk, gv):
        t.requires_grad_(True)
    o1, l1 = na2d(q, k, v, 3, return_lse=True)
    lg = torch.einsum("bxyhd,bghd->bxyhg", q, gk) * d**-0.5
    o2 = torch.einsum("bxyhg,bghd->bxyhd", lg.softmax(-1), gv)
    out, lse = merge_attentions([o1, o2], [l1, lg.logsumexp(-1)])
    # union oracle
    key, inside, takes, _ = _oracle_tables((H, W), (3, 3), (1, 1), (1, 1), (False, False), False)
    kf, vf = k.reshape(b, -1, h, d), v.reshape(b, -1, h, d)
    qf = q.reshape(b, -1, h, d)
    local = torch.einsum("bnhd,bnkhd->bnhk", qf, kf[:, key]) * d**-0.5
    glob = torch.einsum("bnhd,bghd->bnhg", qf, gk) * d**-0.5
    p = torch.cat([local, glob], -1).softmax(-1)
    ref = torch.einsum("bnhk,bnkhd->bnhd", p[..., :9], vf[:, key]) + torch.einsum(
        "bnhg,bghd->bnhd", p[..., 9:], gv
    )
    # na's lse is float32, so the merge weights carry float32 rounding
    torch.testing.assert_close(out, ref.reshape(out.shape), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        lse.double(), torch.cat([local, glob], -1).logsumexp(-1).reshape(lse.shape), atol=1e-5,
        rtol=1e-5,
    )  # fmt: skip
    ins = (q, k, v, gk, gv)
    got = torch.autograd.grad(out.square().sum(), ins)
    want = torch.autograd.grad(ref.square().sum(), ins)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- compile
def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 6, 6, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=gen, requires_grad=True)

    def f(q, k, v, rpb):
        return na2d(q, k, v, 3, dilation=2, rpb=rpb).square().sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    val = cf(q, k, v, rpb)
    g = torch.autograd.grad(val, (q, k, v, rpb))
    val_ref = f(q, k, v, rpb)
    g_ref = torch.autograd.grad(val_ref, (q, k, v, rpb))
    torch.testing.assert_close(val, val_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_custom_op_opcheck():
    from visionattn.kernels.na import _na_fwd

    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 5, 6, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=gen, requires_grad=True)
    bias = torch.randn(1, 2, 5, 6, 3, 3, generator=gen, requires_grad=True)
    args = (q, k, v, rpb, bias, [3, 3], [1, 2], [1, 1], [False, True], True, 0.3)
    torch.library.opcheck(_na_fwd, args)


# ----------------------------------------------------------------------------- errors
def _qkv(shape=(1, 8, 8, 2, 16), **kw):
    return tuple(torch.randn(shape, **kw) for _ in range(3))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(kernel_size=5, dilation=2), ValueError, "kernel_size \\* dilation"),
        (dict(kernel_size=9), ValueError, "kernel_size \\* dilation"),
        (dict(kernel_size=3, stride=4), ValueError, "stride"),
        (dict(kernel_size=0), ValueError, "kernel_size"),
        (dict(kernel_size=(3, 3, 3)), TypeError, "kernel_size"),
        (dict(kernel_size=3.0), TypeError, "kernel_size"),
        (dict(kernel_size=3, dilation=0), ValueError, "dilation"),
        (dict(kernel_size=3, is_causal=1), TypeError, "is_causal"),
        (dict(kernel_size=3, border="reflect"), ValueError, "border"),
        (dict(kernel_size=3, scale="x"), TypeError, "scale"),
        (dict(kernel_size=3, rpb=torch.randn(2, 4, 5)), ValueError, "rpb"),
        (dict(kernel_size=3, attn_bias=torch.randn(1, 2, 8, 8, 3)), ValueError, "attn_bias"),
        (dict(kernel_size=3, attn_bias=torch.randn(3, 2, 8, 8, 3, 3)), ValueError, "attn_bias"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        na2d(q, k, v, **kwargs)


def test_bad_tensors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q must have 5 dims"):
        na2d(q[0], k[0], v[0], 3)
    with pytest.raises(ValueError, match="k shape"):
        na2d(q, k[:, :7], v, 3)
    with pytest.raises(ValueError, match="v shape"):
        na2d(q, k, v[:, :, :7], 3)
    with pytest.raises(TypeError, match="k dtype"):
        na2d(q, k.double(), v, 3)
    with pytest.raises(TypeError, match="v dtype"):
        na2d(q, k, v.half(), 3)
    with pytest.raises(TypeError, match="q must be float"):
        na2d(q.long(), k.long(), v.long(), 3)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        na2d(q.numpy(), k, v, 3)
    with pytest.raises(ValueError, match="k is on meta"):
        na2d(q, k.to("meta"), v, 3)
    with pytest.raises(ValueError, match="merge|equal length"):
        merge_attentions([q], [])


def test_v_head_dim_and_odd_head_dims():
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(1, 7, 2, 12, dtype=torch.float64, generator=gen)
    k = torch.randn(1, 7, 2, 12, dtype=torch.float64, generator=gen)
    v = torch.randn(1, 7, 2, 5, dtype=torch.float64, generator=gen)
    out = na1d(q, k, v, 3)
    ref, _ = _oracle(q, k, v, (3,), (1,), (1,), (False,), False)
    assert out.shape == (1, 7, 2, 5)
    torch.testing.assert_close(out, ref)


def test_rpb_after_inference_mode_still_trains() -> None:
    # the rpb index table is cached; one built under inference_mode must not break backward
    from visionattn.kernels.na import _cached_rel

    _cached_rel.cache_clear()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 9, 10, 2, 8, generator=g) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=g)
    with torch.inference_mode():
        ref = na2d(q, k, v, 3, rpb=rpb)
    q.requires_grad_(True)
    rpb.requires_grad_(True)
    out = na2d(q, k, v, 3, rpb=rpb)
    out.sum().backward()
    assert torch.allclose(out.detach(), ref, atol=1e-6)
    assert q.grad is not None and rpb.grad is not None


@pytest.mark.parametrize(
    "spatial, kw",
    [
        ((14, 21), dict(kernel_size=7, stride=7)),  # MaxViT block / EfficientViT windows
        ((14, 14), dict(kernel_size=7, dilation=2)),  # MaxViT grid: each dilation group one window
        ((16, 24), dict(kernel_size=14, stride=8, border="zero")),  # HaloNet blocks
        ((12, 12), dict(kernel_size=(4, 6), stride=(4, 6), dilation=(3, 2))),
    ],
)
def test_shared_window_path_matches_per_query_path(spatial, kw, monkeypatch) -> None:
    from visionattn.kernels import na_reference

    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, *spatial, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, *spatial, 2, 12, generator=g, dtype=torch.float64)
    ks = kw["kernel_size"]
    ks = (ks, ks) if isinstance(ks, int) else ks
    rpb = torch.randn(2, 2 * ks[0] - 1, 2 * ks[1] - 1, generator=g, dtype=torch.float64)
    real = na_reference.window_groups
    used = []
    monkeypatch.setattr(na_reference, "window_groups", lambda *a: used.append(real(*a)) or used[-1])
    fast, fast_lse = na2d(q, k, v, rpb=rpb, return_lse=True, **kw)
    assert used and used[-1] is not None, "these windows are shared: the grouped path must run"
    monkeypatch.setattr(na_reference, "window_groups", lambda *a: None)
    slow, slow_lse = na2d(q, k, v, rpb=rpb, return_lse=True, **kw)
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fast_lse, slow_lse, atol=1e-10, rtol=1e-10)


def test_argument_cache_keeps_errors_and_eager_matches_custom_op() -> None:
    # validation is memoised on argument types/shapes: an invalid variant of a cached valid
    # call (3.0 vs 3, True vs 1) must still reach the checker and raise
    q, k, v = _qkv()
    na2d(q, k, v, 3)
    with pytest.raises(TypeError, match="kernel_size"):
        na2d(q, k, v, 3.0)
    with pytest.raises(TypeError, match="kernel_size"):
        na2d(q, k, v, (3, True))
    # eager autograd.Function vs the custom op (the compiled path): same values and gradients,
    # including a gradient that reaches only the lse output
    from visionattn.kernels.na import _na_fwd

    g = torch.Generator().manual_seed(11)
    ins = [torch.randn(2, 5, 6, 2, 8, generator=g, requires_grad=True) for _ in range(3)]
    ab = torch.randn(1, 2, 5, 6, 3, 3, generator=g, requires_grad=True)
    rpb = torch.randn(2, 5, 5, generator=g, requires_grad=True)
    out, lse = na2d(*ins, 3, stride=(1, 2), rpb=rpb, attn_bias=ab, return_lse=True)
    ga = torch.autograd.grad(lse.sum(), [*ins, rpb, ab])
    ref_out, ref_lse = _na_fwd(
        *ins, rpb, ab, [3, 3], [1, 2], [1, 1], [False, False], False, 8**-0.5
    )
    gb = torch.autograd.grad(ref_lse.sum(), [*ins, rpb, ab])
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse.reshape(lse.shape))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_triton_out_of_resources_falls_back_to_reference(monkeypatch) -> None:
    na = pytest.importorskip("visionattn.kernels.na")
    if na._tri is None:
        pytest.skip("triton not installed")

    def boom(*a, **k):
        raise na._tri.OutOfResources(1 << 18, 1 << 17, "shared memory")

    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 6, 7, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=g, requires_grad=True)
    ref = na2d(q, k, v, 3, rpb=rpb)
    ref_g = torch.autograd.grad(ref.sum(), (q, k, v, rpb))
    monkeypatch.setenv("VISIONATTN_NA_IMPL", "triton")
    monkeypatch.setattr(na._tri, "forward", boom)
    monkeypatch.setattr(na._tri, "backward", boom)
    with pytest.warns(RuntimeWarning, match="out of resources"):
        out = na2d(q, k, v, 3, rpb=rpb)
        got_g = torch.autograd.grad(out.sum(), (q, k, v, rpb))
    torch.testing.assert_close(out, ref)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b)


def test_dispatch_paths_fake_mode_and_inference() -> None:
    """Fake tensors (FakeTensorMode) take the custom op's fake impl; inference calls take the
    direct path with no autograd node, giving the training path's values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qf = torch.randn(2, 8, 8, 2, 16)
        assert na2d(qf, qf, qf, 3, rpb=torch.randn(2, 5, 5)).shape == (2, 8, 8, 2, 16)
    q = torch.randn(2, 8, 8, 2, 16, requires_grad=True)
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    with torch.no_grad():
        a = na2d(q, q, q, 3, rpb=rpb)
    b = na2d(q, q, q, 3, rpb=rpb)
    assert a.grad_fn is None and b.grad_fn is not None
    assert torch.equal(a, b)

"""BiFormer routing helper: region pooling, top-k routing, pad/attend/crop, and a block-level
re-derivation of BiFormer's legacy bi-level routing attention forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visionattn.kernels.routing import (
    bra_attention,
    bra_route,
    crop_from_grid,
    pad_to_grid,
    region_pool,
)


def test_region_pool_means():
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.float64).reshape(2, 4, 6, 3)
    r = region_pool(x, (2, 3))
    assert r.shape == (2, 6, 3)
    # region (1, 2): rows 2..3, cols 4..5
    torch.testing.assert_close(r[:, 5], x[:, 2:4, 4:6].mean(dim=(1, 2)))
    x5 = x.reshape(2, 4, 6, 1, 3)
    torch.testing.assert_close(region_pool(x5, (2, 3)), r)


def test_bra_route_semantics():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 6, 2, 4, generator=g, requires_grad=True)
    k = torch.randn(2, 6, 6, 2, 4, generator=g, requires_grad=True)
    idx, w = bra_route(q, k, 3, 4, return_weights=True)
    assert idx.shape == (2, 9, 4) and idx.dtype == torch.int64
    assert not w.requires_grad  # detached by default (BiFormer diff_routing=False)
    qr = q.detach().reshape(2, 3, 2, 3, 2, 8).mean((2, 4)).reshape(2, 9, 8)
    kr = k.detach().reshape(2, 3, 2, 3, 2, 8).mean((2, 4)).reshape(2, 9, 8)
    logits = (qr * 8**-0.5) @ kr.transpose(1, 2)
    top, ref = logits.topk(4, dim=-1)
    assert torch.equal(idx, ref)
    torch.testing.assert_close(w, top.softmax(-1))
    # scale is positive, so it changes the weights but never the selection
    idx2, w2 = bra_route(q, k, 3, 4, scale=1.0, return_weights=True)
    assert torch.equal(idx2, idx)
    torch.testing.assert_close(w2, logits.mul(8**0.5).topk(4, dim=-1).values.softmax(-1))
    w3 = bra_route(q, k, 3, 4, detach=False, return_weights=True)[1]
    assert w3.requires_grad
    ph = bra_route(q, k, 3, 2, per_head=True)
    assert ph.shape == (2, 2, 9, 2)
    qh = q.detach().reshape(2, 3, 2, 3, 2, 2, 4).mean((2, 4)).reshape(2, 9, 2, 4).transpose(1, 2)
    kh = k.detach().reshape(2, 3, 2, 3, 2, 2, 4).mean((2, 4)).reshape(2, 9, 2, 4).transpose(1, 2)
    assert torch.equal(ph, (qh @ kh.transpose(-1, -2)).topk(2, dim=-1).indices)


def test_pad_and_crop():
    x = torch.randn(1, 5, 7, 3)
    xp, pad = pad_to_grid(x, 4)
    assert xp.shape == (1, 8, 8, 3) and pad == (3, 1)
    assert (
        torch.equal(xp[:, :5, :7], x)
        and xp[:, 5:].abs().sum() == 0
        and xp[:, :, 7:].abs().sum() == 0
    )
    assert torch.equal(crop_from_grid(xp, pad), x)
    same, pad0 = pad_to_grid(x, (5, 7))
    assert same is x and pad0 == (0, 0)
    x5 = torch.randn(1, 5, 7, 2, 4)
    assert pad_to_grid(x5, (2, 3))[0].shape == (1, 6, 9, 2, 4)


def _legacy_bra_forward(x, qkv_w, qkv_b, lepe_w, lepe_b, wo_w, wo_b, n_win, heads, qk_dim, topk):
    """BiFormer's legacy BiLevelRoutingAttention.forward (auto_pad=True, kv_downsample
    'identity', mul_weight 'none'), step by step in plain torch: pad the input, cut windows,
    project, route on window means, gather top-k kv windows, attend, add LePE, project, crop."""
    n, h_in, w_in, c = x.shape
    pad_r, pad_b = (n_win - w_in % n_win) % n_win, (n_win - h_in % n_win) % n_win
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, h, w, _ = x.shape
    wh, ww = h // n_win, w // n_win
    xw = (
        x.reshape(n, n_win, wh, n_win, ww, c)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(n, n_win**2, wh, ww, c)
    )
    qkv = F.linear(xw, qkv_w, qkv_b)
    q, kv = qkv[..., :qk_dim], qkv[..., qk_dim:]
    scale = qk_dim**-0.5
    q_win, k_win = q.mean((2, 3)), kv[..., :qk_dim].mean((2, 3))
    v_map = (
        kv[..., qk_dim:]
        .reshape(n, n_win, n_win, wh, ww, c)
        .permute(0, 5, 1, 3, 2, 4)
        .reshape(n, c, h, w)
    )
    lepe = F.conv2d(v_map, lepe_w, lepe_b, padding=lepe_w.shape[-1] // 2, groups=c).permute(
        0, 2, 3, 1
    )
    r_idx = ((q_win * scale) @ k_win.transpose(-1, -2)).topk(topk, dim=-1).indices
    kv_pix = kv.reshape(n, n_win**2, wh * ww, -1)
    sel = torch.stack([kv_pix[b][r_idx[b]] for b in range(n)])  # (n, p2, topk, w2, ckv)
    k_sel, v_sel = sel[..., :qk_dim], sel[..., qk_dim:]
    k_sel = k_sel.reshape(n, n_win**2, topk * wh * ww, heads, -1).permute(0, 1, 3, 4, 2)
    v_sel = v_sel.reshape(n, n_win**2, topk * wh * ww, heads, -1).permute(0, 1, 3, 2, 4)
    q_pix = q.reshape(n, n_win**2, wh * ww, heads, -1).permute(0, 1, 3, 2, 4)
    attn = ((q_pix * scale) @ k_sel).softmax(-1)
    o = (attn @ v_sel).permute(0, 1, 3, 2, 4).reshape(n, n_win, n_win, wh, ww, c)
    o = o.permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
    out = F.linear(o + lepe, wo_w, wo_b)
    return out[:, :h_in, :w_in]


@pytest.mark.parametrize(
    "h, w, n_win, topk, dim, heads",
    [(14, 14, 7, 4, 32, 2), (28, 21, 7, 1, 16, 1), (13, 19, 4, 5, 24, 3), (10, 9, 7, 49, 16, 2)],
)
def test_matches_legacy_block_forward(h, w, n_win, topk, dim, heads):
    g = torch.Generator().manual_seed(h * w + topk)
    x = torch.randn(2, h, w, dim, dtype=torch.float64, generator=g)
    qkv_w = torch.randn(3 * dim, dim, dtype=torch.float64, generator=g) * dim**-0.5
    qkv_b = torch.randn(3 * dim, dtype=torch.float64, generator=g) * 0.1
    lepe_w = torch.randn(dim, 1, 5, 5, dtype=torch.float64, generator=g) * 0.2
    lepe_b = torch.randn(dim, dtype=torch.float64, generator=g) * 0.1
    wo_w = torch.randn(dim, dim, dtype=torch.float64, generator=g) * dim**-0.5
    wo_b = torch.randn(dim, dtype=torch.float64, generator=g) * 0.1
    ref = _legacy_bra_forward(x, qkv_w, qkv_b, lepe_w, lepe_b, wo_w, wo_b, n_win, heads, dim, topk)
    # the way a backbone reproduces it: pad the input, project, attend, LePE, project, crop
    xp, pad = pad_to_grid(x, n_win)
    q, k, v = F.linear(xp, qkv_w, qkv_b).reshape(*xp.shape[:3], 3, heads, dim // heads).unbind(3)
    o = bra_attention(q, k, v, n_win=n_win, topk=topk, scale=dim**-0.5).flatten(3)
    lepe = F.conv2d(v.flatten(3).permute(0, 3, 1, 2), lepe_w, lepe_b, padding=2, groups=dim)
    out = crop_from_grid(F.linear(o + lepe.permute(0, 2, 3, 1), wo_w, wo_b), pad)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_bra_attention_auto_pad_pads_qkv_and_crops():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 9, 10, 2, 8, generator=g) for _ in range(3))
    out, idx = bra_attention(q, k, v, n_win=4, topk=3, auto_pad=True, return_indices=True)
    assert out.shape == (1, 9, 10, 2, 8) and idx.shape == (1, 16, 3)
    qp, kp, vp = (pad_to_grid(t, 4)[0] for t in (q, k, v))
    full = bra_attention(qp, kp, vp, n_win=4, topk=3)
    torch.testing.assert_close(out, full[:, :9, :10])
    with pytest.raises(ValueError, match="not divisible"):
        bra_attention(q, k, v, n_win=4, topk=3)


def test_bra_attention_topk_all_is_dense():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 6, 6, 2, 8, generator=g) for _ in range(3))
    out = bra_attention(q, k, v, n_win=3, topk=9, scale=0.2)
    flat = lambda t: t.flatten(1, 2).transpose(1, 2)  # noqa: E731
    dense = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), scale=0.2)
    torch.testing.assert_close(
        out, dense.transpose(1, 2).reshape(2, 6, 6, 2, 8), atol=1e-5, rtol=1e-5
    )


def test_bra_attention_gradients_flow_to_qkv():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 4, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    bra_attention(q, k, v, n_win=2, topk=2).square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda q, k: bra_route(q, k, 2, 5), ValueError, "topk"),
        (lambda q, k: bra_route(q, k, 2, 0), ValueError, "topk"),
        (lambda q, k: bra_route(q, k, 3, 1), ValueError, "divisible"),
        (lambda q, k: bra_route(q, k[..., :4], 2, 1), ValueError, "channel"),
        (
            lambda q, k: bra_route(q.flatten(3), k.flatten(3), 2, 1, per_head=True),
            ValueError,
            "per_head",
        ),
        (lambda q, k: region_pool(q[0, 0, 0], 2), ValueError, "B, H, W"),
        (lambda q, k: pad_to_grid(q, 0), ValueError, "positive"),
        (lambda q, k: bra_attention(q, k, k[:, :2], n_win=2, topk=1), ValueError, "one map"),
    ],
)
def test_bad_inputs(call, exc, match):
    q, k = torch.randn(1, 4, 4, 2, 8), torch.randn(1, 4, 4, 2, 8)
    with pytest.raises(exc, match=match):
        call(q, k)

"""HaloNet on na2d against timm's own halo networks (random weights, float32).

Every halo variant timm ships is checked: its full-size state dict maps key-for-key and
shape-for-shape (meta device), and a reduced copy built with the same overrides in both
libraries gives the same logits and per-stage features on square and non-square inputs. The
attention layer itself is checked against ``timm.layers.HaloAttn`` forward and backward over its
options, and on maps timm rejects against timm on the zero-padded map.
"""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from timm.layers.halo_attn import HaloAttn as TimmHaloAttn
from timm.models.byobnet import ByobNet

import visionattn
import visionattn.convert
from visionattn.backbones import halonet as Hn

TOL = 1e-4
VARIANTS = list(Hn._TIMM_NAMES)


def _tame(model: torch.nn.Module, seed: int = 0) -> None:
    """Random BN statistics with small residual-branch gains: every attention layer matters
    while fp32 stays well-conditioned (timm's zero-init would hide the residual branches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                lo, hi = (0.1, 0.3) if "conv3_1x1" in name else (0.5, 1.0)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * (hi - lo) + lo)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _compare(t: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref_logits, logits = t(x), ours(x)
        ref_feats = t.forward_intermediates(x, intermediates_only=True)
        feats = ours.forward_intermediates(x, intermediates_only=True)
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits).abs().max().item() <= TOL
    assert len(feats) == len(ref_feats) >= 4
    for i, (a, b) in enumerate(zip(feats, ref_feats)):
        assert a.shape == b.shape, f"feature {i}"
        assert (a - b).abs().max().item() <= TOL, f"feature {i}"


def _reduced_kwargs(name: str) -> dict:
    if name == "haloregnetz_b":  # group size 16 needs the full width; it is small anyway
        return {}
    kw: dict = dict(width_factor=0.25)
    if name == "halonet_h1":  # halo attention in every block: one block per stage
        cfg = Hn.model_cfgs[name]
        kw["blocks"] = tuple(dataclasses.replace(b, d=1) for b in cfg.blocks)
    if "bot" in name:
        kw["img_size"] = 256
    return kw


def _timm_kwargs(name: str, kw: dict) -> dict:
    """The same overrides for timm's model (blocks carry no layer objects there)."""
    return dict(kw)


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_maps_every_key(name: str) -> None:
    kw = {"img_size": 256} if "bot" in name else {}
    ref = timm.create_model(name, device="meta", **kw).state_dict()
    model = timm.create_model(f"va_{name}", device="meta", **kw)
    ours = model.state_dict()
    mapped = Hn.checkpoint_filter_fn(ref, model)
    assert set(mapped) == set(ours) == set(ref)
    for k, v in ours.items():
        assert mapped[k].shape == v.shape, k


@pytest.mark.parametrize("name", VARIANTS)
def test_reduced_variant_matches_timm(name: str) -> None:
    kw = _reduced_kwargs(name)
    torch.manual_seed(0)
    t = timm.create_model(name, **kw).eval()
    _tame(t)
    ours = Hn.from_timm(name, t.state_dict(), **kw)
    base = 224 if name == "haloregnetz_b" else 256
    _compare(t, ours, torch.randn(1, 3, base, base))
    if "bot" not in name:  # the bottleneck-attention variants are fixed-size in timm too
        _compare(t, ours, torch.randn(1, 3, base, 2 * base))


def test_full_size_halonet26t_matches_timm() -> None:
    torch.manual_seed(1)
    t = timm.create_model("halonet26t").eval()
    _tame(t, 1)
    ours = visionattn.convert.from_timm("halonet26t.a1h_in1k", t.state_dict())
    assert isinstance(ours, Hn.HaloNet)
    _compare(t, ours, torch.randn(1, 3, 256, 256))


def _timm_twin(cfg_name: str) -> ByobNet:
    """timm's ByobNet with the same config and timm's own HaloAttn."""

    def swap(kwargs_owner):
        if kwargs_owner.self_attn_layer is Hn.HaloAttn:
            return dataclasses.replace(kwargs_owner, self_attn_layer="halo")
        return kwargs_owner

    cfg = Hn.model_cfgs[cfg_name]
    blocks = tuple(
        tuple(swap(b) for b in s) if isinstance(s, tuple) else swap(s) for s in cfg.blocks
    )
    return ByobNet(dataclasses.replace(swap(cfg), blocks=blocks))


def test_test_model_matches_timm_forward_and_backward() -> None:
    torch.manual_seed(2)
    t = _timm_twin("test_va_halonet")
    _tame(t, 2)
    ours = timm.create_model("test_va_halonet")
    ours.load_state_dict(Hn.checkpoint_filter_fn(t.state_dict(), ours), strict=True)
    t.eval(), ours.eval()
    _compare(t, ours, torch.randn(2, 3, 64, 64))
    _compare(t, ours, torch.randn(1, 3, 64, 128))
    t.train(), ours.train()
    x = torch.randn(2, 3, 128, 64)
    t(x).square().mean().backward()
    ours(x).square().mean().backward()
    ref = dict(t.named_parameters())
    for n, p in ours.named_parameters():
        assert p.grad is not None, n
        assert torch.allclose(p.grad, ref[n].grad, rtol=1e-3, atol=1e-5), n


HALO_CASES = [
    dict(block_size=4, halo_size=1),
    dict(block_size=4, halo_size=2, stride=2),  # strided queries
    dict(block_size=3, halo_size=1, stride=2),  # odd block: avg-pool downsample
    dict(block_size=4, halo_size=1, stride=2, avg_down=True),
    dict(block_size=4, halo_size=2, dim_head=4, qkv_bias=True),  # q/k width != v width
    dict(block_size=4, halo_size=1, qk_ratio=0.5, scale_pos_embed=True),
    dict(block_size=4, halo_size=3),  # window (10) larger than the 8 px map
]


def _assert_layer_matches(ref: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> None:
    """Same output, input gradient and parameter gradients as timm's layer."""
    x2 = x.detach().clone().requires_grad_(True)
    want, got = ref(x), ours(x2)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    assert torch.allclose(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    ref_p = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        assert torch.allclose(p.grad, ref_p[n].grad, rtol=1e-4, atol=1e-5), n


@pytest.mark.parametrize(
    "case", HALO_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())
)
def test_halo_layer_matches_timm(case: dict) -> None:
    torch.manual_seed(3)
    ref = TimmHaloAttn(16, 24, num_heads=2, **case)
    ours = Hn.HaloAttn(16, 24, num_heads=2, **case)
    ours.load_state_dict(ref.state_dict(), strict=True)
    h = 12 if case["block_size"] == 3 else 8
    x = torch.randn(2, 16, h, 2 * h, requires_grad=True)
    _assert_layer_matches(ref, ours, x)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("halo", [1, 3])
def test_single_block_map_matches_timm(stride: int, halo: int) -> None:
    # The deep stages' maps are one block (8x8, window 14): the zero-halo-key path there must
    # equal timm's padded unfold, forward and backward (gradients reach the rel-pos tables
    # through both the map keys and the zero keys' logits).
    torch.manual_seed(6)
    ref = TimmHaloAttn(16, 16, num_heads=2, block_size=8, halo_size=halo, stride=stride)
    ours = Hn.HaloAttn(16, 16, num_heads=2, block_size=8, halo_size=halo, stride=stride)
    ours.load_state_dict(ref.state_dict(), strict=True)
    _assert_layer_matches(ref, ours, torch.randn(2, 16, 8, 8, requires_grad=True))
    # a map smaller than the block equals timm on the zero-padded map (no qkv bias)
    x = torch.randn(1, 16, 6, 7)
    with torch.no_grad():
        got = ours(x)
        want = ref(torch.nn.functional.pad(x, (0, 1, 0, 2)))
    ho, wo = -(-6 // stride), -(-7 // stride)
    assert (got - want[..., :ho, :wo]).abs().max().item() <= TOL


@pytest.mark.parametrize("stride", [1, 2])
def test_halo_layer_on_maps_timm_rejects_equals_zero_padding(stride: int) -> None:
    # Without qkv bias a zero-padded input has zero keys/values there: exactly border="zero".
    torch.manual_seed(4)
    ref = TimmHaloAttn(16, 16, num_heads=2, block_size=4, halo_size=2, stride=stride)
    ours = Hn.HaloAttn(16, 16, num_heads=2, block_size=4, halo_size=2, stride=stride)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 16, 10, 13)
    with torch.no_grad():
        got = ours(x)
        want = ref(torch.nn.functional.pad(x, (0, 3, 0, 2)))
    ho, wo = -(-10 // stride), -(-13 // stride)
    assert got.shape[-2:] == (ho, wo)
    assert (got - want[..., :ho, :wo]).abs().max().item() <= TOL


def test_odd_input_sizes_run() -> None:
    model = timm.create_model("test_va_halonet")
    for h, w in ((72, 88), (50, 61)):
        x = torch.randn(1, 3, h, w, requires_grad=True)
        out = model(x)
        assert out.shape == (1, 1000) and torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(x.grad).all()


def test_pretrained_cfgs_point_at_timm_weights() -> None:
    names = timm.list_models("va_*halo*")
    assert len(names) == 8
    timm_tags = set(timm.list_pretrained())
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        ref_name = name.removeprefix("va_")
        ref = timm.models.get_pretrained_cfg(ref_name)
        if cfg.hf_hub_id:  # "timm/<timm name>.<tag>", a pretrained tag timm knows
            assert cfg.hf_hub_id == f"timm/{ref_name}.{cfg.tag}", name
            assert f"{ref_name}.{cfg.tag}" in timm_tags, name
        assert cfg.input_size == ref.input_size and cfg.mean == ref.mean, name
        assert cfg.first_conv == ref.first_conv and cfg.fixed_input_size == ref.fixed_input_size


def test_from_timm_rejects_other_networks() -> None:
    with pytest.raises(ValueError, match="timm_model_name"):
        Hn.from_timm("botnet26t_256", {})
    with pytest.raises(ValueError, match="stride"):
        Hn.HaloAttn(16, stride=3)

"""MaxViT on na2d against timm's own MaxViT (random weights, float32).

Every TF-ported variant is checked three ways: its full-size state dict maps key-for-key and
shape-for-shape (on the meta device), a reduced-width copy built with the same overrides in
both libraries gives the same logits and per-stage features on square and non-square inputs,
and the full-size tiny model matches at its native size.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.maxxvit import checkpoint_filter_fn as timm_filter_fn

import visionattn
import visionattn.convert
from visionattn.backbones import maxvit as M

TOL = 1e-4
SIZES = ("tiny", "small", "base", "large", "xlarge")
RES = (224, 384, 512)
VARIANTS = [f"maxvit_{s}_tf_{r}" for s in SIZES for r in RES]


def _reduced_kwargs(name: str, width_div: int = 8) -> dict:
    """The variant's own layout at 1/width_div width, one block per stage, dim_head 4."""
    cfg = M.model_cfgs[name.rsplit("_", 1)[0]]
    return dict(
        embed_dim=tuple(e // width_div for e in cfg.embed_dim),
        depths=(1, 1, 1, 1),
        stem_width=cfg.stem_width // 4,
        head_hidden_size=cfg.head_hidden_size // width_div,
        transformer_dim_head=4,
    )


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and rel-pos tables, moderate enough to keep fp32 well-conditioned."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))


def _compare(t: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref_logits = t(x)
        logits = ours(x)
        ref_feats = t.forward_intermediates(x, intermediates_only=True)
        feats = ours.forward_intermediates(x, intermediates_only=True)
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits).abs().max().item() <= TOL
    assert len(feats) == len(ref_feats) == 5
    for i, (a, b) in enumerate(zip(feats, ref_feats)):
        assert a.shape == b.shape, f"stage {i}"
        assert (a - b).abs().max().item() <= TOL, f"stage {i}"


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_maps_every_key(name: str) -> None:
    ref = timm.create_model(name, device="meta").state_dict()
    ours_model = timm.create_model(f"va_{name}", device="meta")
    ours = ours_model.state_dict()
    mapped = M.checkpoint_filter_fn(ref, ours_model)
    assert set(mapped) == set(ours) == set(ref)
    for k, v in ours.items():
        assert mapped[k].shape == v.shape, k


def _check_reduced(name: str, width_div: int, non_square: bool) -> None:
    res = int(name.rsplit("_", 1)[1])
    kw = _reduced_kwargs(name, width_div)
    torch.manual_seed(0)
    t = timm.create_model(name, **kw).eval()
    _randomize(t)
    ours = M.from_timm(name, t.state_dict(), **kw)
    assert ours.stages[0].blocks[0].attn_block.attn.partition_size == (res // 32, res // 32)
    _compare(t, ours, torch.randn(1, 3, res, res))
    if non_square:  # non-square inputs timm accepts: multiples of 32 * partition per side
        _compare(t, ours, torch.randn(2, 3, res, 2 * res))


# CI: every size at 224 (partition 7) plus the 12 and 16 partitions of the 384/512 variants
# on the tiny layout; the resolution variants differ only in img_size, i.e. partition size.
CI_VARIANTS = [f"maxvit_{s}_tf_224" for s in SIZES] + ["maxvit_tiny_tf_384", "maxvit_tiny_tf_512"]


@pytest.mark.parametrize("name", CI_VARIANTS)
def test_reduced_variant_matches_timm(name: str) -> None:
    _check_reduced(name, 16 if name.endswith("512") else 8, non_square=name == "maxvit_tiny_tf_224")


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_reduced_variant_matches_timm_sweep(name: str) -> None:
    _check_reduced(name, 8, non_square=True)


def test_non_square_partition_matches_timm() -> None:
    # img_size (128, 192) gives (4, 6) partitions: rectangular windows and grids.
    kw = dict(_reduced_kwargs("maxvit_small_tf_224"), img_size=(128, 192))
    torch.manual_seed(1)
    t = timm.create_model("maxvit_small_tf_224", **kw).eval()
    _randomize(t, 1)
    ours = M.from_timm("maxvit_small_tf_224", t.state_dict(), **kw)
    assert ours.stages[0].blocks[0].attn_grid.attn.partition_size == (4, 6)
    _compare(t, ours, torch.randn(2, 3, 128, 192))
    _compare(t, ours, torch.randn(1, 3, 256, 192))


def test_full_size_tiny_matches_timm() -> None:
    torch.manual_seed(2)
    t = timm.create_model("maxvit_tiny_tf_224").eval()
    _randomize(t, 2)
    ours = visionattn.convert.from_timm("maxvit_tiny_tf_224.in1k", t.state_dict())
    assert type(ours).__name__ == "MaxVit"
    _compare(t, ours, torch.randn(1, 3, 224, 224))


def _test_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    kw = dict(
        img_size=96,
        embed_dim=(16, 24, 32, 48),
        depths=(1, 1, 1, 1),
        stem_width=16,
        head_hidden_size=48,
        transformer_dim_head=8,
    )
    torch.manual_seed(3)
    t = timm.create_model("maxvit_tiny_tf_224", **kw)
    _randomize(t, 3)
    ours = timm.create_model("test_va_maxvit")
    ours.load_state_dict(M.checkpoint_filter_fn(t.state_dict(), ours))
    return t, ours


def test_test_model_is_timm_config_and_gradients_match() -> None:
    t, ours = _test_pair()
    t.eval(), ours.eval()
    _compare(t, ours, torch.randn(2, 3, 96, 96))
    # Training mode (batch statistics), forward and backward against timm's autograd.
    t.train(), ours.train()
    x = torch.randn(2, 3, 96, 192)
    t(x).square().mean().backward()
    ours(x).square().mean().backward()
    ref_grads = dict(t.named_parameters())
    for n, p in ours.named_parameters():
        assert p.grad is not None, n
        g_ref = ref_grads[n].grad
        assert torch.allclose(p.grad, g_ref, rtol=1e-3, atol=1e-5), n


def test_inputs_timm_rejects_are_padded() -> None:
    model = timm.create_model("test_va_maxvit").eval()
    for h, w in ((64, 64), (70, 101), (33, 47)):
        x = torch.randn(1, 3, h, w, requires_grad=True)
        feats = model.forward_intermediates(x, intermediates_only=True)
        for i, f in enumerate(feats):  # TF "same" padding: every stride-2 step rounds up
            assert tuple(f.shape[-2:]) == (-(-h // 2 ** (i + 1)), -(-w // 2 ** (i + 1)))
        out = model(x)
        assert out.shape == (1, 1000) and torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(x.grad).all()


def test_padding_equals_timm_on_padded_partition_map() -> None:
    # On a map that is not a partition multiple the block is run on the zero-padded map and
    # cropped: check one PartitionAttention block against timm's on that padded map.
    from timm.models.maxxvit import MaxxVitTransformerCfg, PartitionAttentionCl

    torch.manual_seed(4)
    tcfg = MaxxVitTransformerCfg(
        dim_head=8, window_size=(4, 4), head_first=False, rel_pos_type="bias_tf", norm_eps=1e-5
    )
    ocfg = M.MaxVitTransformerCfg(dim_head=8, window_size=(4, 4), head_first=False, norm_eps=1e-5)
    for kind in ("block", "grid"):
        ref = PartitionAttentionCl(16, kind, tcfg).eval()
        ours = M.PartitionAttention(16, kind, ocfg).eval()
        with torch.no_grad():
            ref.attn.rel_pos.relative_position_bias_table.normal_()
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(2, 10, 7, 16)
        with torch.no_grad():
            got = ours._partition_attn(ours.norm1(x))
            xp = torch.nn.functional.pad(ref.norm1(x), (0, 0, 0, 1, 0, 2))
            want = ref._partition_attn(xp)[:, :10, :7]
        assert (got - want).abs().max().item() <= TOL, kind


def test_checkpoint_filter_resizes_rel_pos_like_timm() -> None:
    kw = _reduced_kwargs("maxvit_tiny_tf_224")
    src = timm.create_model("maxvit_tiny_tf_224", **kw).state_dict()
    ref_model = timm.create_model("maxvit_tiny_tf_384", **kw)
    ours = timm.create_model("va_maxvit_tiny_tf_384", **kw)
    ref_sd = timm_filter_fn(dict(src), ref_model)
    got = M.checkpoint_filter_fn(dict(src), ours)
    ours.load_state_dict(got, strict=True)
    key = "stages.0.blocks.0.attn_block.attn.rel_pos.relative_position_bias_table"
    assert got[key].shape == (kw["embed_dim"][0] // kw["transformer_dim_head"], 23, 23)
    assert torch.allclose(got[key], ref_sd[key])


def test_pretrained_cfgs_point_at_timm_weights() -> None:
    ours = [n for n in timm.list_pretrained("va_maxvit_*")]
    assert len(ours) == 21
    timm_tags = set(timm.list_pretrained("maxvit_*_tf_*"))
    for name in ours:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id == "timm/" + name.removeprefix("va_"), name
        assert cfg.hf_hub_id.removeprefix("timm/") in timm_tags, name
        ref = timm.models.get_pretrained_cfg(name.removeprefix("va_"))
        assert cfg.num_classes == ref.num_classes and cfg.input_size == ref.input_size, name
        assert cfg.mean == ref.mean and cfg.std == ref.std, name


def test_from_timm_rejects_other_maxvits() -> None:
    with pytest.raises(ValueError, match="timm_model_name"):
        M.from_timm("maxvit_rmlp_tiny_rw_256", {})
    with pytest.raises(ValueError, match="rel_pos_type"):
        M.MaxVitTransformerCfg(rel_pos_type="mlp")


@pytest.mark.parametrize(
    "stride, padding, pre_act", [(1, "", False), (2, "same", False), (2, "", True)]
)
def test_mbconv_cpu_fold_matches_unfolded(stride: int, padding: str, pre_act: bool) -> None:
    """CPU inference folds pre-norm, norm1 and norm2 into the 1x1 and kxk convs: same output
    as the unfolded block, and the cache follows in-place updates of the BN statistics."""
    torch.manual_seed(0)
    cfg = M.MaxVitConvCfg(padding=padding, pre_norm_act=pre_act)
    blk = M.MbConvBlock(8, 8 if stride == 1 else 16, stride=stride, cfg=cfg).eval()
    for bn in (blk.pre_norm, blk.norm1, blk.norm2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    assert blk._can_fold and blk._fold_pre is not pre_act
    x = torch.randn(2, 8, 10, 10)
    want = blk(x)  # autograd on: the unfolded path
    with torch.no_grad():
        torch.testing.assert_close(blk(x), want, atol=1e-5, rtol=1e-5)
        assert blk._fold_cache is not None  # the folded path ran
        blk.norm1.running_var.mul_(2.0)
        want = torch.enable_grad()(blk)(x)
        torch.testing.assert_close(blk(x), want, atol=1e-5, rtol=1e-5)

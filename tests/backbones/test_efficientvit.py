"""EfficientViT (MSRA): fidelity against timm's models (random weights), official-key conversion."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from timm.models import efficientvit_msra as timm_evit

import visionattn  # noqa: F401  (registers our models)
from visionattn.backbones import efficientvit as ours

VARIANTS = sorted(ours._TIMM_ARGS)
# 128: stage maps 8/4/2 against windows 7/7/4 (padding, 2x2 windows); 96x160 non-square
SIZES = {n: [(128, 128), (96, 160)][i % 2] for i, n in enumerate(VARIANTS)}
TINY = dict(
    img_size=64,
    embed_dim=(16, 24, 32),
    key_dim=(4, 4, 4),
    depth=(1, 1, 1),
    num_heads=(2, 2, 2),
    window_size=(3, 2, 2),
    kernels=(3, 3),
)


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial weights and BN statistics (timm zero-inits biases and some BN scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 1.0)


def _pair(args: dict, num_classes: int = 10) -> tuple[torch.nn.Module, torch.nn.Module]:
    ref = timm_evit.EfficientVitMsra(**args, num_classes=num_classes).eval()
    _randomize(ref)
    model = ours.EfficientVitMsra(**args, num_classes=num_classes).eval()
    model.load_state_dict(ours.checkpoint_filter_fn(ref.state_dict(), model), strict=True)
    return ref, model


def _check(ref: torch.nn.Module, model: torch.nn.Module, size: tuple[int, int]) -> None:
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        ref_final, ref_feats = ref.forward_intermediates(x)
        final, feats = model.forward_intermediates(x)
        want, got = ref.forward_head(ref_final), model.forward_head(final)
    for i, (a, b) in enumerate(zip(feats, ref_feats)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"stage {i} at {size}")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=f"logits at {size}")


@pytest.mark.parametrize("name", VARIANTS)
def test_fidelity_full_config(name: str) -> None:
    """Every variant at its full config, padded or non-square input (eval, no autograd)."""
    ref, model = _pair(ours._TIMM_ARGS[name])
    _check(ref, model, SIZES[name])


def test_fidelity_m5_224_and_from_timm() -> None:
    ref = timm.create_model("efficientvit_m5").eval()
    _randomize(ref)
    model = ours.from_timm("efficientvit_m5", ref.state_dict())
    assert model.num_classes == 1000
    _check(ref, model, (224, 224))


def test_fidelity_tiny_sizes_and_grad_mode() -> None:
    """Windows 3/2/1 with padding; eval with autograd on (unfolded path) matches too."""
    ref, model = _pair(TINY)
    for size in [(64, 64), (50, 70), (16, 16)]:
        _check(ref, model, size)
    x = torch.randn(2, 3, 64, 48)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)


def test_train_mode_outputs_grads_and_bn_stats() -> None:
    """Training mode (batch statistics) gives timm's outputs, gradients and running stats."""
    ref, model = _pair(TINY)
    ref.train()
    model.train()
    x = torch.randn(3, 3, 64, 80)
    out_ref, out = ref(x), model(x)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=0)
    w = torch.randn_like(out)
    (out_ref * w).sum().backward()
    (out * w).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        want = ref_params[name].grad
        # float32 summation order differs (GEMM vs conv, flat BN): bound relative to the scale
        err = (p.grad - want).abs().max().item()
        assert err <= 1e-4 * max(1.0, want.abs().max().item()), (name, err)
    ref_buffers = dict(ref.named_buffers())
    for name, b in model.named_buffers():
        if "running" in name:
            torch.testing.assert_close(b, ref_buffers[name], atol=1e-4, rtol=1e-4, msg=name)


def test_folded_cache_tracks_in_place_updates() -> None:
    """Eval folding caches weights; in-place edits (EMA, load_state_dict) invalidate them."""
    ref, model = _pair(TINY)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        for m in (ref, model):
            m.stages[0].blocks[0].dw0.m.bn.running_var.mul_(3.0)
            m.stages[0].blocks[0].mixer.m.attn.attention_biases.add_(0.5)
            m.stages[1].blocks[0].ffn0.m.pw1.conv.weight.mul_(-1.0)
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)
        _randomize(ref, seed=5)
        model.load_state_dict(ours.checkpoint_filter_fn(ref.state_dict(), model))
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_full_key_mapping(name: str) -> None:
    with torch.device("meta"):
        ref = timm_evit.EfficientVitMsra(**ours._TIMM_ARGS[name])
        model = ours.EfficientVitMsra(**ours._TIMM_ARGS[name])
    mapped = ours.checkpoint_filter_fn(ref.state_dict(), model)
    target = model.state_dict()
    assert set(mapped) == set(target)
    for k, v in mapped.items():
        assert v.shape == target[k].shape, k


def _official_state_dict(model: ours.EfficientVitMsra) -> dict[str, torch.Tensor]:
    """Our weights under the official microsoft/Cream names.

    Official (EfficientViT/classification/model/efficientvit.py): ``patch_embed`` is a
    Sequential of ``Conv2d_BN`` (children ``c``, ``bn``) at indices 0, 2, 4, 6; stage ``s``
    lives in ``blocks{s+1}``, which first holds the subsample from the previous stage (residual
    dw + FFN, ``PatchMerging``, residual dw + FFN) and then the stage's blocks; the head is
    ``BN_Linear`` (``bn``, ``l``); every attention keeps an ``attention_bias_idxs`` buffer.
    """
    out = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"\.conv\.weight$", ".c.weight", k)
        k = k.replace("head.linear.", "head.l.")
        m = re.match(r"^patch_embed\.conv(\d)\.(.*)$", k)
        if m:
            k = f"patch_embed.{(int(m[1]) - 1) * 2}.{m[2]}"
        m = re.match(r"^stages\.(\d+)\.(downsample|blocks)\.(\w+)\.(.*)$", k)
        if m:
            s, part, idx, rest = int(m[1]), m[2], m[3], m[4]
            has_down = not isinstance(model.stages[s].downsample, torch.nn.Identity)
            if part == "downsample":
                j = ("res1", "patchmerge", "res2").index(idx)
            else:
                j = int(idx) + (3 if has_down else 0)
            k = f"blocks{s + 1}.{j}.{rest}"
        out[k] = v.clone()
        if k.endswith("attention_biases"):
            out[k.replace("attention_biases", "attention_bias_idxs")] = torch.zeros(1)
    return out


def test_from_official() -> None:
    official = dict(
        img_size=64,
        embed_dim=[16, 24, 32],
        key_dim=[4, 4, 4],
        depth=[1, 2, 1],
        num_heads=[2, 2, 2],
        window_size=[3, 2, 2],
        kernels=[3, 3],
        num_classes=7,
    )
    args = ours.official_to_model_args(official)
    assert args["down_ops"] == (("", 1), ("subsample", 2), ("subsample", 2))
    src = ours.EfficientVitMsra(**args).eval()
    _randomize(src)
    sd = _official_state_dict(src)
    assert "blocks2.1.conv1.c.weight" in sd and "patch_embed.6.bn.weight" in sd
    assert "blocks2.3.mixer.m.attn.qkvs.0.c.weight" in sd
    model = ours.from_official(sd, official)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="distillation"):
        ours.from_official({**sd, "head_dist.l.weight": torch.zeros(1)}, official)


def test_from_official_variant_meta() -> None:
    with torch.device("meta"):
        src = ours.EfficientVitMsra(**ours._TIMM_ARGS["efficientvit_m4"])
        sd = _official_state_dict(src)
        model = ours.from_official(sd, variant="EfficientViT_M4")
    assert model.num_classes == 1000
    with pytest.raises(ValueError, match="variant"):
        ours.from_official(sd, variant="EfficientViT_M9")
    with pytest.raises(ValueError, match="patch_size"):
        ours.official_to_model_args(dict(patch_size=8))
    with pytest.raises(ValueError, match="timm_model_name"):
        ours.from_timm("efficientvit_b0", {})


def test_tiny_variant_train_step() -> None:
    model = timm.create_model("test_va_efficientvit", num_classes=4)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 200_000
    out = model(torch.randn(2, 3, 64, 96))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_converted_model_rebuilds_from_registered_name() -> None:
    ref = timm_evit.EfficientVitMsra(**ours._TIMM_ARGS["efficientvit_m0"], num_classes=6).eval()
    model = ours.from_timm("efficientvit_m0", ref.state_dict())
    assert model.pretrained_cfg["architecture"] == "va_efficientvit_m0"
    rebuilt = timm.create_model("va_efficientvit_m0", **model.model_args)
    assert rebuilt.num_classes == 6


def test_pretrained_path_loads_timm_weights(tmp_path) -> None:
    """pretrained=True runs timm's loader with our filter over a timm-format checkpoint."""
    assert timm.get_pretrained_cfg("va_efficientvit_m0").hf_hub_id == (
        "timm/efficientvit_m0.r224_in1k"
    )
    ref, _ = _pair(ours._TIMM_ARGS["efficientvit_m0"], num_classes=1000)
    path = tmp_path / "timm_evit.pth"
    torch.save(ref.state_dict(), path)
    model = timm.create_model(
        "va_efficientvit_m0", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    _check(ref, model, (128, 128))

"""FocalNet: fidelity against timm's models (random weights) and official-key conversion."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from timm.models import focalnet as timm_focalnet

import visionattn  # noqa: F401  (registers our models)
from visionattn.backbones import focalnet as ours

VARIANTS = sorted(ours._TIMM_ARGS)
# small enough for CI, large enough to cover every stage and level
REDUCED = dict(depths=(1, 1, 2, 1), embed_dim=16)
SIZES = [(72, 40), (50, 66)]  # non-square, not multiples of 32


def _timm_model(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    # timm's register functions reject overrides of their own args: build the class directly
    model = timm_focalnet.FocalNet(**dict(ours._TIMM_ARGS[name], **overrides))
    _randomize(model)
    return model.eval()


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial values everywhere (timm zero-inits biases, ones norms)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # layer scale 1e-4 hides errors
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _convert(name: str, timm_model: torch.nn.Module, **overrides) -> torch.nn.Module:
    model = timm.create_model(
        "va_" + name, num_classes=timm_model.num_classes, drop_path_rate=0.0, **overrides
    ).eval()
    model.load_state_dict(ours.checkpoint_filter_fn(timm_model.state_dict(), model), strict=True)
    return model


def _check(timm_model: torch.nn.Module, model: torch.nn.Module, size: tuple[int, int]) -> None:
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        ref_final, ref_feats = timm_model.forward_intermediates(x)
        final, feats = model.forward_intermediates(x)
        ref, out = timm_model.forward_head(ref_final), model.forward_head(final)
    assert len(feats) == len(ref_feats)
    for i, (a, b) in enumerate(zip(feats, ref_feats)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"stage {i} at {size}")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0, msg=f"logits at {size}")


@pytest.mark.parametrize("name", VARIANTS)
def test_fidelity_reduced(name: str) -> None:
    """Every variant's config (levels, windows, post-norms, layer scale) at reduced depth/width."""
    ref = _timm_model(name, num_classes=10, drop_path_rate=0.0, **REDUCED)
    model = _convert(name, ref, **REDUCED)
    for size in SIZES:
        _check(ref, model, size)


def test_fidelity_full_tiny() -> None:
    """One full-size variant at its full config."""
    ref = _timm_model("focalnet_tiny_srf", drop_path_rate=0.0)
    model = ours.from_timm("focalnet_tiny_srf", ref.state_dict())
    _check(ref, model, (64, 96))


@pytest.mark.parametrize("name", VARIANTS)
def test_full_key_mapping(name: str) -> None:
    """Full-size timm state dict maps key-for-key and shape-for-shape (meta device, no memory)."""
    with torch.device("meta"):
        ref = timm_focalnet.FocalNet(**ours._TIMM_ARGS[name])
        model = ours.FocalNet(**ours._TIMM_ARGS[name])
    mapped = ours.checkpoint_filter_fn(ref.state_dict(), model)
    target = model.state_dict()
    assert set(mapped) == set(target)
    for k, v in mapped.items():
        assert v.shape == target[k].shape, k


def _official_state_dict(model: torch.nn.Module, args: dict) -> dict[str, torch.Tensor]:
    """Our state dict renamed to the official repository's keys and shapes.

    Official naming (microsoft/FocalNet classification/focalnet.py): ``patch_embed``;
    stage ``i``'s downsample lives at the end of ``layers.{i-1}``; layer scale is
    ``gamma_1/gamma_2``; post-norm blocks reuse ``norm1/norm2``; the modulation norm is
    ``ln``; ``modulation.h`` is a 1x1 conv; the head is ``head``.
    """
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace("stem.", "patch_embed.", 1) if k.startswith("stem.") else k
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k)
        k = re.sub(r"ls([12])\.gamma$", r"gamma_\1", k)
        k = re.sub(r"norm([12])_post\.", r"norm\1.", k)
        k = k.replace(".modulation.norm.", ".modulation.ln.")
        k = k.replace("head.fc.", "head.")
        if k.endswith("modulation.h.weight"):
            v = v[:, :, None, None]
        out[k] = v.clone()
    return out


@pytest.mark.parametrize(
    "variant", ["focalnet_tiny_lrf", "focalnet_huge_fl4", "focalnet_large_fl4"]
)
def test_from_official(variant: str) -> None:
    """Official-key checkpoints convert (strict) and reproduce the source model."""
    official = dict(ours.OFFICIAL_VARIANTS[variant], embed_dim=16, depths=[1, 1, 1, 1])
    official["num_classes"] = 7
    args = ours.official_to_model_args(official)
    torch.manual_seed(0)
    src = ours.FocalNet(**args).eval()
    _randomize(src)
    sd = _official_state_dict(src, args)
    assert "patch_embed.proj.weight" in sd and "layers.0.downsample.proj.weight" in sd
    model = ours.from_official(sd, official)
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), atol=1e-5, rtol=0)
    if variant == "focalnet_large_fl4":
        assert model.layers[0].blocks[0].modulation.normalize_modulator  # official config


def test_from_official_variant_and_errors() -> None:
    with torch.device("meta"):
        src = ours.FocalNet(
            **ours.official_to_model_args(ours.OFFICIAL_VARIANTS["focalnet_tiny_srf"])
        )
    sd = _official_state_dict(src, {})
    with torch.device("meta"):
        model = ours.from_official(sd, variant="focalnet_tiny_srf")
    assert model.num_classes == 1000
    with pytest.raises(ValueError, match="variant"):
        ours.from_official(sd, variant="focalnet_nope")
    with pytest.raises(ValueError, match="patch_size"):
        ours.official_to_model_args(dict(patch_size=16))
    with pytest.raises(ValueError, match="unsupported"):
        ours.official_to_model_args(dict(bogus=1))
    with pytest.raises(ValueError, match="timm_model_name"):
        ours.from_timm("focalnet_nope", {})


def test_train_step_and_grads() -> None:
    model = timm.create_model("test_va_focalnet", num_classes=4, drop_path_rate=0.1)
    _randomize(model)
    model.train()
    out = model(torch.randn(2, 3, 64, 80))
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_converted_model_rebuilds_from_registered_name() -> None:
    """Converted models carry a pretrained_cfg and the args that rebuild them (Hub export)."""
    official = dict(ours.OFFICIAL_VARIANTS["focalnet_large_fl4"], embed_dim=16, depths=[1, 1, 1, 1])
    src = ours.FocalNet(**dict(ours.official_to_model_args(official), num_classes=3)).eval()
    model = ours.from_official(_official_state_dict(src, {}), official)
    rebuilt = timm.create_model(model.pretrained_cfg["architecture"], **model.model_args).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.layers[0].blocks[0].modulation.normalize_modulator
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    ref = _timm_model("focalnet_tiny_srf", num_classes=5, drop_path_rate=0.0, **REDUCED)
    with pytest.raises(RuntimeError):
        ours.from_timm("focalnet_tiny_srf", ref.state_dict())  # wrong config must not load


def test_pretrained_path_loads_timm_weights(tmp_path) -> None:
    """pretrained=True runs timm's loader with our filter over a timm-format checkpoint."""
    assert timm.get_pretrained_cfg("va_focalnet_tiny_srf").hf_hub_id == (
        "timm/focalnet_tiny_srf.ms_in1k"
    )
    ref = _timm_model("focalnet_tiny_srf", drop_path_rate=0.0, **REDUCED)
    path = tmp_path / "timm_focalnet.pth"
    torch.save(ref.state_dict(), path)
    model = timm.create_model(
        "va_focalnet_tiny_srf", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
        drop_path_rate=0.0, **REDUCED,
    ).eval()  # fmt: skip
    _check(ref, model, (64, 64))

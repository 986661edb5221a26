"""Conversion routing and the `visionattn convert` command, end to end through timm."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import visionattn
from visionattn import convert
from visionattn.cli import main

# one small timm model per family visionattn converts from timm
TIMM_MODELS = ["efficientvit_m0", "halonet26t", "maxvit_tiny_tf_224", "focalnet_tiny_srf"]


def test_unwrap_state_dict() -> None:
    sd = {"a.weight": torch.ones(1)}
    assert (
        convert.unwrap_state_dict({"model": {"module.a.weight": torch.ones(1)}}).keys() == sd.keys()
    )
    assert convert.unwrap_state_dict({"state_dict": sd, "epoch": 3}).keys() == sd.keys()
    with pytest.raises(ValueError, match="checkpoint"):
        convert.unwrap_state_dict({"epoch": 3})


def test_routing_errors() -> None:
    with pytest.raises(ValueError, match="family"):
        convert.from_official("swin", {"a": torch.ones(1)}, variant="x")
    with pytest.raises(ValueError, match="official_kwargs"):
        convert.from_official("nat", {"a": torch.ones(1)})
    with pytest.raises(ValueError, match="timm_model_name"):
        convert.from_timm("resnet50", {"a": torch.ones(1)})


@pytest.mark.parametrize("timm_name", TIMM_MODELS)
def test_convert_timm_checkpoint_to_hub_folder(timm_name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = timm.create_model(timm_name).eval()
    # move BatchNorm statistics off their defaults so the conversion has to carry them
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ckpt = tmp_path / "timm.pth"
    torch.save({"state_dict": ref.state_dict()}, ckpt)
    out = tmp_path / "hub"
    assert main(["convert", "--timm-model", timm_name, str(ckpt), str(out)]) == 0
    ours = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert ours.pretrained_cfg["architecture"] == f"va_{timm_name}"
    x = torch.randn(1, 3, *ref.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        err = (ours(x) - ref(x)).abs().max().item()
    assert err <= 1e-4, f"{timm_name}: converted logits differ from timm's by {err:.3g}"


def test_every_va_model_routes_from_its_timm_name() -> None:
    ours = [n for n in visionattn.list_models() if n.startswith("va_")]
    assert ours
    for name in ours:
        assert timm.is_model(name[3:]), f"{name}: timm has no {name[3:]}"
        assert convert.timm_family(name[3:]) in visionattn.backbones.family_modules()

"""backbones/_convert.py: the official-variant resolution every official-checkpoint family uses."""

from __future__ import annotations

import pytest
import torch

from visionattn.backbones._convert import official_variant_args

VARIANTS = {
    "fam_tiny": dict(embed_dim=64, depths=(2, 2), drop_path_rate=0.1),
    "fam_small": dict(embed_dim=96, depths=(2, 2), drop_path_rate=0.2),
}


def _to_ours(kw):
    out = {"dim": kw["embed_dim"], "depths": kw["depths"]}
    if "drop_path_rate" in kw:
        out["drop_path_rate"] = kw["drop_path_rate"]
    return out


def _args(sd, kwargs=None, variant=None, **kw):
    return official_variant_args(
        sd, kwargs, variant, label="Fam", variants=VARIANTS, to_ours=_to_ours,
        default="fam_tiny", **kw,
    )  # fmt: skip


def test_variant_names_the_model_and_the_head_sets_num_classes() -> None:
    sd = {"head.weight": torch.zeros(10, 96)}
    name, ours = _args(sd, variant="fam_small")
    assert name == "fam_small"
    assert ours == {"dim": 96, "depths": (2, 2), "drop_path_rate": 0.2, "num_classes": 10}
    assert _args({}, variant="fam_small")[1]["num_classes"] == 0  # headless


def test_kwargs_match_a_variant_by_architecture_only() -> None:
    # another drop-path rate and a list instead of a tuple still name fam_small
    name, ours = _args({}, dict(embed_dim=96, depths=[2, 2], drop_path_rate=0.5))
    assert name == "fam_small" and ours["drop_path_rate"] == 0.5
    assert _args({}, dict(embed_dim=80, depths=[2, 2]))[0] == "fam_tiny"  # no match: default


def test_aliases_and_custom_architecture_key() -> None:
    assert _args({}, variant="Official_Small", aliases={"Official_Small": "fam_small"})[0] == (
        "fam_small"
    )
    name, _ = _args({}, dict(embed_dim=1, depths=(3, 3)), arch=lambda kw: len(kw["depths"]))
    assert name == "fam_tiny"  # both variants have two stages; the first one wins


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="variant: 'fam_huge' is not an official Fam variant"):
        _args({}, variant="fam_huge")
    with pytest.raises(ValueError, match="official_kwargs: give"):
        _args({})
    sd = {"head.weight": torch.zeros(10, 64)}
    with pytest.raises(ValueError, match="num_classes=1000 but the checkpoint's head has 10"):
        _args(sd, dict(embed_dim=64, depths=(2, 2), num_classes=1000))

"""Registration with timm: no name collisions, families, pretrained cfgs."""

from __future__ import annotations

import json
import subprocess
import sys

import timm

import visionattn


def test_no_name_collides_with_timm() -> None:
    # timm's own names must be read before visionattn registers anything: a clash
    # overwrites timm's entry (and drops its pretrained tags) silently.
    code = (
        "import json, timm; own = set(timm.list_models()); import visionattn; "
        "print(json.dumps(sorted(own & set(visionattn.list_models()))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    clashes = json.loads(out.stdout.strip().splitlines()[-1])
    assert clashes == [], f"visionattn names that timm already owns: {clashes}"


def test_every_model_is_created_by_timm_and_has_a_family() -> None:
    fams = set(visionattn.list_families())
    for name in visionattn.list_models():
        assert timm.is_model(name)
        assert visionattn.model_family(name) in fams


def test_list_models_filters() -> None:
    names = visionattn.list_models()
    fam = visionattn.model_family(names[0])
    sub = visionattn.list_models(family=fam)
    assert sub and all(visionattn.model_family(n) == fam for n in sub)
    assert visionattn.list_models("no_such_model_*") == []

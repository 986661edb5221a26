"""timm's model contract over every model visionattn registers.

Tiny ``test_*`` variants (one or more per family) get every check, torch.compile included;
every full-size variant gets the config checks (built on the meta device, so cheap) and a
real forward/backward at 64px when it is small enough for CI; VISIONATTN_SLOW=1 runs the
whole contract on every model.
"""

from __future__ import annotations

import os

import pytest
import torch

import visionattn
from visionattn.contract import CHECKS, run_contract

ALL = visionattn.list_models()
TINY = [n for n in ALL if n.startswith("test_")]
FULL = [n for n in ALL if not n.startswith("test_")]
SLOW = os.environ.get("VISIONATTN_SLOW", "") not in ("", "0")
# real forward+backward in CI for full variants up to this size; all of them when SLOW
MAX_CI_PARAMS = 100e6


def _params(name: str) -> int:
    import timm

    with torch.device("meta"):
        m = timm.create_model(name)
    return sum(p.numel() for p in m.parameters())


def test_registry_not_empty_and_every_family_has_a_tiny_variant() -> None:
    assert ALL, "visionattn registers no models"
    fams_with_tiny = {visionattn.model_family(n) for n in TINY}
    modules = {visionattn.model_family(n) for n in ALL}
    missing = sorted(modules - fams_with_tiny)
    assert not missing, f"families without a tiny test_ variant for the contract suite: {missing}"


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "compile"])
@pytest.mark.parametrize("name", TINY)
def test_tiny_contract(name: str, check: str) -> None:
    run_contract(name, [check])


def _one_tiny_per_family() -> list[str]:
    seen: dict[str, str] = {}
    for n in TINY:
        seen.setdefault(visionattn.model_family(n), n)
    return sorted(seen.values())


@pytest.mark.parametrize("name", _one_tiny_per_family())
def test_compile_fullgraph(name: str) -> None:
    run_contract(name, ["compile"])


@pytest.mark.parametrize("name", FULL)
def test_full_variant_cfg(name: str) -> None:
    run_contract(name, ["default_cfg"])


@pytest.mark.parametrize("name", FULL)
def test_full_variant_forward_backward(name: str) -> None:
    if SLOW:
        run_contract(name)
        return
    if _params(name) > MAX_CI_PARAMS:
        pytest.skip(f"{name}: over {MAX_CI_PARAMS / 1e6:.0f}M params; runs with VISIONATTN_SLOW=1")
    run_contract(name, ["forward", "backward"])

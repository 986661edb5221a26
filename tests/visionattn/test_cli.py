"""The visionattn command: list, export/convert round trips, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import visionattn
from visionattn import hub
from visionattn.cli import main

TINY = [n for n in visionattn.list_models() if n.startswith("test_")]


def test_console_script_and_module_agree() -> None:
    exe = shutil.which("visionattn", path=str(Path(sys.executable).parent))
    assert exe, "console script `visionattn` is not installed beside the interpreter"
    a = subprocess.run(
        [exe, "list", "--json", "--no-params"], capture_output=True, text=True, check=True
    )
    b = subprocess.run(
        [sys.executable, "-m", "visionattn", "list", "--json", "--no-params"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(a.stdout)
    assert rows == json.loads(b.stdout)
    assert {r["model"] for r in rows} == set(visionattn.list_models())
    for r in rows:
        assert r["family"] in visionattn.list_families()
        assert len(r["input_size"]) == 3


def test_list_table_filters(capsys: pytest.CaptureFixture[str]) -> None:
    name = TINY[0]
    fam = visionattn.model_family(name)
    assert main(["list", "--family", fam]) == 0
    out = capsys.readouterr().out
    assert name in out and "params (M)" in out
    others = [n for n in visionattn.list_models() if visionattn.model_family(n) != fam]
    assert not any(f"\n{n} " in out for n in others)
    assert main(["list", name]) == 0
    out = capsys.readouterr().out
    assert f"\n{name} " in out and "1 models" in out
    assert main(["list", "zzz_no_such_*"]) == 1


def test_list_unknown_family_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["list", "--family", "nope"])
    assert "family" in capsys.readouterr().err


def test_unknown_command() -> None:
    assert main(["frobnicate"]) == 2
    assert main(["bench", "nothing"]) == 2


@pytest.mark.parametrize("name", TINY[:1])
def test_export_round_trip_through_timm(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(weights))
    out = tmp_path / "hub"
    assert main(["export", name, str(out), "--weights", str(weights), "--num-classes", "5"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == name and cfg["num_classes"] == 5
    x = torch.randn(1, 3, 64, 64)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    overlay = timm.create_model(
        name,
        pretrained=True,
        num_classes=5,
        # the overlay states the file's class count, else timm drops a mismatched classifier
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=5),
    ).eval()
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(loaded(x), ref)
        assert torch.equal(overlay(x), ref)


def test_hub_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="model"):
        hub.save_hub_folder(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(ValueError, match="file"):
        hub.load_weights(torch.nn.Linear(2, 2), tmp_path / "missing.safetensors")


def test_card_command(tmp_path: Path) -> None:
    name = visionattn.list_models()[0] if not TINY else TINY[0]
    assert main(["card", name, "--out", str(tmp_path), "--include-tiny"]) == 0
    text = (tmp_path / f"{name}.md").read_text()
    fam = visionattn.model_family(name)
    assert f"# {name}" in text and f"Family **{fam}**" in text
    assert "| parameters |" in text and "features_only=True" in text
    assert main(["card", "zzz_none_*", "--out", str(tmp_path)]) == 1


def test_committed_model_cards_are_current() -> None:
    # model_cards/ is generated (`visionattn card`); a model change must regenerate it
    from visionattn.cards import render_card

    cards = Path(__file__).resolve().parents[2] / "model_cards"
    want = {n for n in visionattn.list_models() if not n.startswith("test_")}
    have = {p.stem for p in cards.glob("*.md")}
    assert have == want, f"missing {sorted(want - have)[:5]}, stale {sorted(have - want)[:5]}"
    stale = [n for n in sorted(want) if (cards / f"{n}.md").read_text() != render_card(n)]
    assert not stale, f"regenerate with `visionattn card`: {stale[:5]}"

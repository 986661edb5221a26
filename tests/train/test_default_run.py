"""The README's main-job command: `visionattn train` with no arguments.

The shipped default recipe trains a tiny model of one of our families on the embedded digits
on the CPU. CI runs it shortened to 4 epochs (the full default runs 8) and asserts that the
held-out accuracy is high, which also checks that the recipe, the data pipeline and the
model train together end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import visionattn
from visionattn.train.cli import train_main
from visionattn.train.config import load_recipe


def test_default_recipe_trains_one_of_our_models_to_high_accuracy(tmp_path: Path) -> None:
    default_model = load_recipe("default")["model"]
    assert default_model in visionattn.list_models()  # ours, not a timm model
    argv = ["--epochs", "4", "--output", str(tmp_path), "--run-name", "d", "--no-progress"]
    assert train_main(argv) == 0
    run = tmp_path / "d"
    m = json.loads((run / "metrics.json").read_text())
    assert m["model"] == default_model and m["config"]["data_dir"] is None
    assert [e["epoch"] for e in m["epochs"]] == [1, 2, 3, 4]
    final = m["epochs"][-1]
    assert final["top1"] >= 90.0, final  # 10 classes: chance is 10%
    assert final["train_loss"] < m["epochs"][0]["train_loss"]
    assert (run / "best.safetensors").is_file() and (run / "curves.png").is_file()

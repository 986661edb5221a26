"""`pip install .` and `pip install -e .` give the same `visionattn.*` namespace, and nothing
is installed as a bare top-level `kernels`/`backbones`/`train` package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import visionattn

REPO = Path(__file__).resolve().parents[2]


def test_wheel_layout_and_import(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("visionattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"visionattn"}, f"wheel installs top-level {sorted(tops)}"
    for needed in ("kernels/na.py", "backbones/nat.py", "train/trainer.py", "configs/default.yaml"):
        assert f"visionattn/{needed}" in names, f"wheel lacks visionattn/{needed}"

    target = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True
    )
    code = (
        "import json, visionattn; "
        "print(json.dumps([visionattn.__file__, visionattn.list_models()]))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    path, models = json.loads(out.stdout.strip().splitlines()[-1])
    assert path.startswith(str(target)), f"imported {path}, not the installed wheel"
    assert models == visionattn.list_models()

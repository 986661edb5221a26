"""Exact resume with two processes (torchrun + gloo on the CPU): each process's RNG streams,
loss sums and EMA BatchNorm statistics are restored, so the resumed run matches the
uninterrupted one bit for bit. Slow (three two-process launches): VISIONATTN_SLOW=1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from visionattn.train.trainer import TIMING_FIELDS

ARGS = (
    "--model test_efficientnet --digits-size 16 --img-size 16 --crop-pct 1.0 --batch-size 32 "
    "--epochs 2 --warmup-epochs 1 --lr 3e-3 --workers 0 --no-progress --ema --ema-decay 0.9 "
    "--mixup 0.4 --cutmix 1.0 --drop-path 0.1 --reprob 0.25 --log-every 5 --no-tensorboard --cpu"
).split()


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path: Path, launch_two_processes) -> None:
    launch_two_processes(*ARGS, "--output", str(tmp_path), "--run-name", "full")
    launch_two_processes(
        *ARGS, "--output", str(tmp_path), "--run-name", "part", "--stop-after", "5"
    )
    launch_two_processes("--resume", str(tmp_path / "part"))
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    assert a["world_size"] == b["world_size"] == 2 and a["num_updates"] == b["num_updates"]
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]

    assert strip(a["history"]["epochs"]) == strip(b["history"]["epochs"])
    assert strip(a["history"]["steps"]) == strip(b["history"]["steps"])

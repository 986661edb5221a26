"""Exact resume with two processes (torchrun + gloo on the CPU): each process's RNG streams,
loss sums and EMA BatchNorm statistics are restored, so the resumed run matches the
uninterrupted one bit for bit. Slow (three two-process launches): VISIONATTN_SLOW=1."""

from __future__ import annotations

from pathlib import Path

import pytest

ARGS = (
    "--model test_efficientnet --digits-size 16 --img-size 16 --crop-pct 1.0 --batch-size 32 "
    "--epochs 2 --warmup-epochs 1 --lr 3e-3 --workers 0 --no-progress --ema --ema-decay 0.9 "
    "--mixup 0.4 --cutmix 1.0 --drop-path 0.1 --reprob 0.25 --log-every 5 --no-tensorboard --cpu"
).split()


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path: Path, two_process_resume, strip_timing) -> None:
    # weights, EMA, update count and epoch history are compared by the fixture (conftest)
    a, b = two_process_resume(tmp_path, *ARGS)
    assert strip_timing(a["history"]["steps"]) == strip_timing(b["history"]["steps"])

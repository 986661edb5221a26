"""Training test helpers shared across modules."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from visionattn.train.trainer import TIMING_FIELDS


@pytest.fixture
def launch_two_processes() -> Callable[..., None]:
    """``launch(*argv)``: ``python -m visionattn.train *argv`` as two processes under
    torchrun (one thread each), failing the test if it fails."""

    def launch(*argv: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", "2", "-m", "visionattn.train", *argv]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, timeout=600)

    return launch


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


@pytest.fixture
def strip_timing() -> Callable[[list[dict]], list[dict]]:
    """``strip(rows)``: history rows without their wall-clock fields (the rest of a resumed
    run's history must equal the uninterrupted run's)."""
    return _without_timing


@pytest.fixture
def two_process_resume(launch_two_processes) -> Callable[..., tuple[dict, dict]]:
    """``check(out_dir, *argv)``: a two-process run of ``argv`` to the end ("full"), the same
    stopped after 5 updates ("part") and resumed; asserts that both end with the same world
    size, update count, weights, EMA weights and per-epoch history, and returns the two final
    checkpoints ``(full, resumed)`` for further checks."""

    def check(out_dir, *argv: str) -> tuple[dict, dict]:
        launch_two_processes(*argv, "--output", str(out_dir), "--run-name", "full")
        launch_two_processes(
            *argv, "--output", str(out_dir), "--run-name", "part", "--stop-after", "5"
        )
        launch_two_processes("--resume", str(out_dir / "part"))
        a = torch.load(out_dir / "full" / "last.pt", weights_only=False)
        b = torch.load(out_dir / "part" / "last.pt", weights_only=False)
        assert a["world_size"] == b["world_size"] == 2 and a["num_updates"] == b["num_updates"]
        for key in ("model", "ema"):
            for k in a[key]:
                assert torch.equal(a[key][k], b[key][k]), (key, k)
        assert _without_timing(a["history"]["epochs"]) == _without_timing(b["history"]["epochs"])
        return a, b

    return check

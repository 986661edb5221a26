"""Training test helpers shared across modules."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest


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

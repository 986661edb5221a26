"""Shared pytest setup: the gpu/slow markers, CPU thread limits, parity-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # CI has 2 cores; intra-op threads beyond that only add contention.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    slow = os.environ.get("VISIONATTN_SLOW", "") not in ("", "0")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the lent GPU, see README)")
    skip_slow = pytest.mark.skip(reason="larger sweep: set VISIONATTN_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not slow:
            item.add_marker(skip_slow)


def parity_dir() -> Path | None:
    """Directory of the official parity vectors, or None when this checkout has none."""
    env = os.environ.get("VISIONATTN_PARITY_DIR")
    for cand in ([Path(env)] if env else []) + [
        REPO.parent / "shared" / "parity",
        REPO / ".gpu" / "parity",
    ]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def parity_path() -> Path:
    d = parity_dir()
    if d is None:
        pytest.skip(
            "parity vectors not found: set VISIONATTN_PARITY_DIR or place them at "
            f"{REPO.parent / 'shared' / 'parity'}"
        )
    return d

"""tools/sass_counts.py: compiles the NA and routed launches of small problems for sm_90 on the
CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_TOOL = Path(__file__).parents[2] / "tools" / "sass_counts.py"


def _bundled(name: str) -> bool:
    triton = pytest.importorskip("triton")
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", name))  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess:
    """The tool on compiled (not interpreted) kernels."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, str(_TOOL), *args], capture_output=True, text=True, timeout=300, env=env
    )


def _rows(*args: str) -> list[dict]:
    """The tool's JSON rows (forward, dq, dk/dv); skips without Triton's CUDA binutils."""
    if not (_bundled("nvdisasm") and _bundled("cuobjdump") and _bundled("ptxas")):
        pytest.skip("this Triton wheel bundles no CUDA binutils")
    res = _run(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["kernel"] for r in rows] == ["forward", "dq", "dk/dv"]
    return rows


def test_counts_three_kernels():
    rows = _rows("--shape", "1,16,16", "--kernel", "5")
    for r in rows:
        # the forward/dq walk key blocks in nested loops, the dk/dv pass query blocks
        assert len(r["loops"]) >= 2 and r["loops"] == sorted(r["loops"])
        assert 0 < r["registers"] <= 255 and r["instructions"] > r["loops"][-1]
        assert r["innermost_ops"].get("HMMA", 0) > 0  # tensor-core dots in the inner loop
    assert rows[0]["launch"]["maxnreg"] == 168  # the forward's register cap is applied
    assert rows[0]["registers"] <= 168


def test_window_problem_is_refused():
    pytest.importorskip("triton")
    res = _run("--shape", "1,14,14", "--kernel", "7", "--stride", "7")
    assert res.returncode == 1 and "whole-window kernel" in res.stdout


def test_counts_routed_kernels():
    rows = _rows("--op", "routed", "--shape", "1,8,8", "--n-win", "2", "--topk", "2")
    for r in rows:
        assert len(r["loops"]) >= 1 and 0 < r["registers"] <= 255
        assert r["innermost_ops"].get("HMMA", 0) > 0  # tensor-core dots in the key/query walk

"""kernels/bench.py: the roofline fields and the table (the timings themselves need a GPU)."""

from __future__ import annotations

import pytest

from visionattn.kernels.bench import format_table, roofline


def test_roofline_takes_the_slower_side():
    # 1 GB at 4 TB/s is 0.25 ms; 1 TFLOP at 800 TFLOP/s is 1.25 ms: compute-bound
    r = roofline(1e9, 1e12, 4e12, 8e14)
    assert r["roofline_bound"] == "compute"
    assert r["roofline_mem_ms"] == pytest.approx(0.25)
    assert r["roofline_flop_ms"] == pytest.approx(1.25)
    assert r["roofline_ms"] == pytest.approx(1.25)
    r = roofline(1e9, 1e10, 4e12, 8e14)
    assert r["roofline_bound"] == "memory" and r["roofline_ms"] == pytest.approx(0.25)


def test_table_marks_the_bound():
    row = dict(name="p", op="na2d", impl="ours", ms=0.5, pct_roofline=50.0, tflops=1.0,
               peak_mem_mb=1.0, speedup_vs_flex=None, note="", **{"pass": "fwd"},
               **roofline(1e9, 1e12, 4e12, 8e14))  # fmt: skip
    line = format_table([row]).splitlines()[-1]
    assert "  50.0 c " in line
    failed = dict(row, ms=None, roofline_ms=None, pct_roofline=None, roofline_bound=None)
    assert format_table([failed]).splitlines()[-1].split()[:4] == ["p", "ours", "fwd", "-"]

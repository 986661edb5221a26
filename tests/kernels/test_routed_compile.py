"""The routed kernels compile for sm_90 with the JIT's specialisations, on the CPU.

The interpreter passes every integer argument as a value, so it cannot see what the compiled
path sees: an argument equal to 1 arrives in the kernel as a Python int constant (a tile one
pixel wide, a tile grid one tile wide). Here each launch of small problems is recorded instead
of run and compiled the way the JIT would specialise it (``tools/sass_counts.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).parents[2]

# (q map, k map, tiles (th, tw, kth, ktw), topk, heads, dtype): ones in the tile shapes and
# tile-grid widths, the packed-heads forward (half dtypes), the plain one (float32) and the
# plain one's large-tile block shape
_PROBLEMS = [
    ((4, 4), (4, 4), (2, 2, 1, 1), 4, 2, torch.bfloat16),
    ((4, 2), (4, 2), (2, 2, 2, 2), 2, 4, torch.float16),
    ((4, 4), (4, 4), (1, 4, 1, 4), 2, 1, torch.float32),
    ((24, 24), (24, 24), (12, 12, 12, 12), 3, 2, torch.bfloat16),  # 128 x 128 forward steps
]


def _sass_counts():
    spec = importlib.util.spec_from_file_location("sass_counts", _ROOT / "tools" / "sass_counts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record_launches(tool) -> list[dict]:
    from visionattn.kernels import routed_triton as rt

    records: list[dict] = []
    for qhw, khw, tiles, topk, heads, dtype in _PROBLEMS:
        q = torch.zeros(1, *qhw, heads, 32, dtype=dtype)
        k = torch.zeros(1, *khw, heads, 32, dtype=dtype)
        v = torch.zeros(1, *khw, heads, 32, dtype=dtype)
        n_q = (qhw[0] // tiles[0]) * (qhw[1] // tiles[1])
        n_kv = (khw[0] // tiles[2]) * (khw[1] // tiles[3])
        idx = torch.arange(n_q * topk).reshape(1, n_q, topk) % n_kv
        scale = 0.25
        out = torch.zeros(1, *qhw, heads, 32, dtype=dtype)
        lse = torch.zeros(q.shape[:-1])
        fwd = functools.partial(rt.routed_fwd, q, k, v, idx, tiles, scale)
        bwd = functools.partial(rt.routed_bwd, out, q, k, v, idx, out, lse, None, tiles, scale)
        records += tool.capture(fwd, rt) + tool.capture(bwd, rt)
    return records


def main() -> int:
    tool = _sass_counts()
    seen = set()
    for rec in _record_launches(tool):
        tool.compile_launch(rec)  # raises on a compile error
        seen.add(rec["launcher"])
    print("compiled", " ".join(sorted(seen)))
    return 0


def test_routed_kernels_compile_with_specialised_ones():
    pytest.importorskip("triton")
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton wheel bundles no ptxas")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's
    res = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=600, env=env
    )
    assert res.returncode == 0, res.stderr[-4000:]
    line = res.stdout.strip().splitlines()[-1]
    # the packed-heads and plain forwards, dq and dK/dV were all compiled
    for name in ("_fwd_launch", "_fwd_heads_launch", "_dq_launch", "_dkv_launch"):
        assert name in line.split(), line


if __name__ == "__main__":
    sys.exit(main())

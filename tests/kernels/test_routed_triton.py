"""Triton routed-attention kernels: the interpreter sweep (subprocess) and GPU tests.

On CPU the kernels run in Triton's interpreter, which must be switched on before Triton (and
its standard library) is imported, so the sweep in ``routed_cases.py`` runs in a child pytest
with ``TRITON_INTERPRET=1``; nothing leaks into this process or other test modules.  GPU tests
(marker ``gpu``) use the compiled kernels.
"""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visionattn.kernels.routed import routed_attention
from visionattn.kernels.routed_reference import routed_attention_gather

_CASES = Path(__file__).with_name("routed_cases.py")
_spec = importlib.util.spec_from_file_location("_routed_cases", _CASES)
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)


def test_interpreter_suite():
    """>= 200 randomized fwd+bwd configs (dtypes, grids, topk 1..all+duplicates, per-head and
    shared indices, strided views, odd head dims, lse gradients) through the interpreted
    kernels, plus the public API with the Triton backend."""
    env = dict(
        os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(_CASES)]
    res = subprocess.run(
        cmd, env=env, cwd=_CASES.parents[2], capture_output=True, text=True, timeout=900
    )
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_sweep():
    """Compiled kernels on CUDA vs the float32 reference, 320 random configs.

    Each config compiles its own specialisations, so parallel worker processes share the
    compile time (one CPU core each).
    """
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    per = -(-_GPU_CONFIGS // workers)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(c), str(per)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in range(workers)
    ]
    for c, proc in enumerate(procs):
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"worker {c}:\n{(out + err)[-4000:]}"
        assert out.strip().splitlines()[-1] == f"checked {per}", out[-2000:]


_GPU_CONFIGS = 320


def _gpu_sweep_chunk(chunk: int, count: int) -> int:
    """Check ``count`` random configs of ``chunk``; one line per config (``ok i`` or ``FAIL i``
    with the config and the error), so a run stopped early still reports its counts; the last
    line is ``checked count`` when all passed.  Returns the number of failures."""
    rng = random.Random(2024 + chunk)
    import visionattn.kernels.routed_triton as tri

    failed = 0
    for i in range(count):
        q, k, v, idx, tiles, scale = cases._case(rng, small=i % 2 == 0, device="cuda")
        try:
            cases._check_case(
                tri, q, k, v, idx, tiles, scale, with_dlse=i % 7 == 0, gather=i % 10 == 0
            )
        except AssertionError as e:
            failed += 1
            msg = str(e).replace("\n", " | ")[:600]
            print(
                f"FAIL {i}: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} "
                f"idx{tuple(idx.shape)} tiles={tiles} {q.dtype}: {msg}",
                flush=True,
            )
        else:
            print(f"ok {i}", flush=True)
    print(f"checked {count}" if not failed else f"failed {failed} of {count}", flush=True)
    return failed


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "hw, n_win, topk, heads, d",
    [
        ((56, 56), 7, 1, 2, 32),
        ((28, 28), 7, 4, 4, 32),
        ((14, 14), 7, 16, 8, 32),
        ((208, 304), 16, 8, 2, 32),
    ],
)
def test_gpu_biformer_shapes(dtype, hw, n_win, topk, heads, d):
    """BiFormer-T stages and the detection stage-1 map, through the public API and autograd."""
    from visionattn.kernels.routing import bra_route

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, *hw, heads, d)
    q, k, v = (
        torch.randn(shape, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(3)
    )
    scale = (heads * d) ** -0.5
    idx = bra_route(q, k, n_win, topk, scale)
    out = routed_attention(q, k, v, idx, n_win=n_win, scale=scale)
    dout = torch.randn_like(out)
    out.backward(dout)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    th, tw = hw[0] // n_win, hw[1] // n_win
    ref = routed_attention_gather(qr, kr, vr, idx, (th, tw, th, tw), scale)
    ref.backward(dout.double())
    tol = cases._TOL[dtype]
    torch.testing.assert_close(out.double(), ref, **tol)
    for a, b in zip((q, k, v), (qr, kr, vr)):
        mag = b.grad.abs().max().item() + 1.0
        torch.testing.assert_close(
            a.grad.double(),
            b.grad,
            atol=tol["atol"] * mag * cases._GRAD_FACTOR[dtype],
            rtol=tol["rtol"] * cases._GRAD_FACTOR[dtype],
        )


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (
        torch.randn(2, 28, 28, 4, 32, device="cuda", generator=g).bfloat16().requires_grad_()
        for _ in range(3)
    )
    idx = torch.randint(0, 49, (2, 49, 4), device="cuda", generator=g)

    def f(q, k, v):
        return (
            routed_attention(q, k, v, idx, n_win=7, scale=0.1, check_indices=False)
            .float()
            .square()
            .sum()
        )

    loss = torch.compile(f, fullgraph=True)(q, k, v)
    loss.backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = f(q, k, v)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-2)
    for a, t in zip(got, (q, k, v)):
        torch.testing.assert_close(a, t.grad, rtol=1e-2, atol=1e-2)


if __name__ == "__main__":  # GPU sweep worker: chunk count (exit status 1 on any failure)
    sys.exit(1 if _gpu_sweep_chunk(int(sys.argv[1]), int(sys.argv[2])) else 0)

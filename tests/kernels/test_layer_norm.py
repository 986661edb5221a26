"""LayerNorm kernel (``visionattn.kernels.layer_norm``) against its PyTorch definition.

* CPU: the reference and the argument checks in-process; the Triton kernels in a child
  process under ``TRITON_INTERPRET=1`` (``python test_layer_norm.py <count>``), so the
  interpreter never leaks into other tests.
* GPU (marker ``gpu``): model-sized shapes, compiled kernels.

Every config compares the output and the gradients of x, weight and bias with the float64
reference fed the same output gradient.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visionattn.kernels.layer_norm import layer_norm, layer_norm_reference

_FILE = Path(__file__).resolve()
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_config(rng: random.Random, small: bool) -> dict:
    c = rng.choice([1, 3, 16, 24, 64, 96, 130] if small else [64, 96, 192, 320, 384, 768, 1000])
    lead = [rng.randint(1, 5) for _ in range(rng.randint(0, 2))]
    rows = rng.randint(1, 70) if small else rng.randint(1000, 60000)
    return dict(
        shape=[*lead, rows, c],
        dtype=rng.choice(["float32", "bfloat16", "float16"]),
        out_dtype=rng.choice([None, "float32", "bfloat16"]),
        affine=rng.choice(["both", "both", "weight", "none"]),
        # a strided view (every other row of a wider buffer), as a slice of a fused projection
        strided=rng.random() < 0.3,
        grads=rng.choice(["all", "all", "x", "params"]),
        eps=rng.choice([1e-5, 1e-6]),
    )


def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


def check_config(cfg: dict, device: str) -> None:
    """Forward and gradients of :func:`layer_norm` vs the float64 reference."""
    g = torch.Generator().manual_seed(hash(str(cfg)) % 2**31)
    dtype = getattr(torch, cfg["dtype"])
    out_dtype = getattr(torch, cfg["out_dtype"]) if cfg["out_dtype"] else None
    *lead, rows, c = cfg["shape"]
    base = torch.randn(*lead, rows, 2 * c if cfg["strided"] else c, generator=g) * 3 + 1
    x = base[..., :c] if cfg["strided"] else base
    x = x.to(device, dtype)
    w = (torch.randn(c, generator=g) * 0.5 + 1).to(device)
    b = (torch.randn(c, generator=g) * 0.2).to(device)
    w = w if cfg["affine"] in ("both", "weight") else None
    b = b if cfg["affine"] == "both" else None
    want_x = cfg["grads"] in ("all", "x")
    want_p = cfg["grads"] in ("all", "params")
    xs = x.detach().requires_grad_(want_x)
    ws = None if w is None else w.detach().requires_grad_(want_p)
    bs = None if b is None else b.detach().requires_grad_(want_p)
    y = layer_norm(xs, ws, bs, cfg["eps"], out_dtype)
    assert y.dtype == (out_dtype or dtype) and y.shape == x.shape
    x64 = x.detach().double().requires_grad_(want_x)
    w64 = None if w is None else w.detach().double().requires_grad_(want_p)
    b64 = None if b is None else b.detach().double().requires_grad_(want_p)
    ref = layer_norm_reference(x64, w64, b64, cfg["eps"], torch.float64)
    tol = _tol(y.dtype)
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    pairs = [
        (name, t, t64)
        for name, t, t64 in (("x", xs, x64), ("weight", ws, w64), ("bias", bs, b64))
        if t is not None and t.requires_grad
    ]
    if not pairs:
        return
    dy = torch.randn(y.shape, generator=g).to(device, y.dtype)
    got = torch.autograd.grad(y, [t for _, t, _ in pairs], dy)
    want = torch.autograd.grad(ref, [t64 for _, _, t64 in pairs], dy.double())
    for (name, leaf, _), a, r in zip(pairs, got, want, strict=True):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        # weight/bias gradients sum over every row: scale the tolerance with the row count
        scale = 1.0 if name == "x" else max(1.0, (x.numel() // c) ** 0.5 / 4)
        gt = max(_tol(x.dtype), _tol(y.dtype)) * scale
        torch.testing.assert_close(
            a.double(), r, atol=gt, rtol=gt, msg=lambda m, n=name: f"d{n}: {m}"
        )


# --------------------------------------------------------------------------- CPU
def test_reference_matches_torch() -> None:
    x = torch.randn(4, 5, 24)
    w, b = torch.randn(24), torch.randn(24)
    torch.testing.assert_close(layer_norm(x, w, b, 1e-6), F.layer_norm(x, (24,), w, b, 1e-6))
    # float32 statistics and affine, then the cast
    xb = x.bfloat16()
    want = F.layer_norm(xb.float(), (24,), w, b).bfloat16()
    assert torch.equal(layer_norm(xb, w, b), want)
    assert layer_norm(x, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_reference_ignores_autocast() -> None:
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer_norm(x, torch.ones(32), torch.zeros(32), out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.layer_norm(x, (32,)), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "kwargs, exc, text",
    [
        (dict(x=torch.arange(4).view(1, 4)), TypeError, "x: must be a floating-point"),
        (dict(x=torch.randn(3, 0)), ValueError, "x: needs a non-empty last"),
        (dict(weight=torch.ones(5)), ValueError, "weight: must have shape (4,)"),
        (dict(bias=torch.ones(2, 2)), ValueError, "bias: must have shape (4,)"),
        (dict(weight=torch.ones(4, dtype=torch.int32)), TypeError, "weight: must be floating"),
        (dict(eps=-1.0), ValueError, "eps: must be >= 0"),
        (dict(out_dtype=torch.int8), TypeError, "out_dtype: must be a floating-point"),
    ],
)
def test_bad_arguments(kwargs: dict, exc: type, text: str) -> None:
    args = dict(x=torch.randn(2, 4), weight=None, bias=None, eps=1e-5, out_dtype=None)
    args.update(kwargs)
    with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
        layer_norm(**args)


def test_bad_impl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONATTN_LN_IMPL", "fast")
    with pytest.raises(ValueError, match="VISIONATTN_LN_IMPL"):
        layer_norm(torch.randn(2, 4))


def test_interpreter_sweep() -> None:
    """The Triton kernels under the interpreter: 40 random configs (dtypes, output dtypes,
    affine variants, strided rows, gradient subsets), run in a child process."""
    env = dict(os.environ, TRITON_INTERPRET="1", VISIONATTN_LN_IMPL="triton")
    res = subprocess.run(
        [sys.executable, str(_FILE), "40"], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert res.stdout.strip().splitlines()[-1] == "checked 40", res.stdout[-2000:]


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [(128, 3136, 64), (128, 56, 56, 96), (128, 196, 384), (64, 49, 768), (7, 3, 4000)]
)
@pytest.mark.parametrize("dtype, out_dtype", [("float32", "bfloat16"), ("bfloat16", None)])
def test_gpu_model_shapes(shape: tuple, dtype: str, out_dtype: str | None) -> None:
    cfg = dict(
        shape=list(shape), dtype=dtype, out_dtype=out_dtype, affine="both", strided=False,
        grads="all", eps=1e-6,
    )  # fmt: skip
    check_config(cfg, "cuda")


@pytest.mark.gpu
def test_gpu_sweep() -> None:
    rng = random.Random(1)
    for _ in range(60):
        check_config(make_config(rng, small=False), "cuda")


if __name__ == "__main__":
    count = int(sys.argv[1])
    rng = random.Random(0)
    for i in range(count):
        cfg = make_config(rng, small=True)
        try:
            check_config(cfg, "cpu")
        except Exception as e:
            print(f"FAIL {i} {cfg}: {e}")
            raise
    print(f"checked {count}")

"""Triton neighbourhood-attention kernels vs the PyTorch reference.

* CPU (CI): randomized sweep through the public API with the Triton path forced, run under
  ``TRITON_INTERPRET=1`` in subprocesses, so the interpreter never leaks into other tests
  (triton decides interpreted-vs-compiled when a kernel module is imported).
* GPU (marker ``gpu``): >= 1000 random configs in float32/float16/bfloat16 plus
  model-sized shapes.

Every config compares the output, lse and the gradients of q, k, v, rpb and attn_bias.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_FILE = Path(__file__).resolve()


def make_config(rng: random.Random, small: bool) -> dict:
    n_dims = rng.choices([1, 2, 3], weights=[3, 6, 1] if small else [2, 6, 2])[0]
    spatial, ks, st, dl, ca = [], [], [], [], []
    for _ in range(n_dims):
        kmax = (3 if n_dims == 3 else 5) if small else (5 if n_dims == 3 else 13)
        k = rng.randint(1, kmax)
        d = rng.choice([1, 1, 1, 2, 3] if small else [1, 1, 2, 3, 4, 8])
        extra = rng.randint(0, 3 if small else 24 // n_dims)
        spatial.append(k * d + extra)
        ks.append(k)
        st.append(rng.randint(1, k))
        dl.append(d)
        ca.append(rng.random() < 0.2)
    if rng.random() < 0.2:
        # windows that tile the map (kernel = stride, whole windows per dilation group): the
        # whole-window kernel's cases, e.g. MaxViT block/grid, Swin, EfficientViT
        for a in range(n_dims):
            spatial[a] = ks[a] * dl[a] * rng.randint(1, 2 if small else 4)
            one = spatial[a] == ks[a] * dl[a]
            st[a] = rng.randint(1, ks[a]) if one and rng.random() < 0.5 else ks[a]
            ca[a] = False
    if small:
        hd = rng.choice([16, 16, 12, 32])
        dv = rng.choice([hd, hd, 8, 24])
    else:
        hd = rng.choice([16, 32, 64, 128, 12, 24, 48, 80])
        dv = rng.choice([hd, hd, hd, 16, 40])
    return dict(
        spatial=spatial, kernel_size=ks, stride=st, dilation=dl, is_causal=ca,
        border=rng.choice(["clamp", "zero"]),
        # the interpreter's cost grows with the grid: mostly one batch element and head
        batch=(2 if rng.random() < 0.2 else 1) if small else rng.randint(1, 3),
        heads=(2 if rng.random() < 0.2 else 1) if small else rng.randint(1, 4),
        head_dim=hd, head_dim_v=dv,
        rpb=rng.random() < 0.35, attn_bias=rng.choice([None, None, "full", "b1", "h1"]),
        qkv_view=rng.random() < 0.3, scale=rng.choice([None, 0.2]),
    )  # fmt: skip


def _inputs(cfg: dict, dtype: torch.dtype, device: str, seed: int):
    from visionattn.kernels import na1d, na2d, na3d

    gen = torch.Generator().manual_seed(seed)
    n = len(cfg["spatial"])
    b, h, hd, dv = cfg["batch"], cfg["heads"], cfg["head_dim"], cfg["head_dim_v"]
    shape = (b, *cfg["spatial"], h)

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    if cfg["qkv_view"] and dv == hd:
        qkv = rnd(*shape, 3, hd)
        q, k, v = (qkv.select(-2, i) for i in range(3))
    else:
        q, k, v = rnd(*shape, hd), rnd(*shape, hd), rnd(*shape, dv)
    extra = {}
    if cfg["rpb"]:
        extra["rpb"] = rnd(h, *(2 * x - 1 for x in cfg["kernel_size"]))
    if cfg["attn_bias"] is not None:
        bb = 1 if cfg["attn_bias"] == "b1" else b
        hb = 1 if cfg["attn_bias"] == "h1" else h
        extra["attn_bias"] = rnd(bb, hb, *cfg["spatial"], *cfg["kernel_size"])
    op = {1: na1d, 2: na2d, 3: na3d}[n]
    return op, q, k, v, extra


def check_config(cfg: dict, dtype: torch.dtype, device: str, seed: int) -> str | None:
    """Run the Triton path and the reference on one config; None if they agree."""
    op, q, k, v, extra = _inputs(cfg, dtype, device, seed)
    leaves = {"q": q, "k": k, "v": v, **extra}
    results = {}
    for impl in ("triton", "reference"):
        os.environ["VISIONATTN_NA_IMPL"] = impl
        try:
            ins = {name: t.detach().clone().requires_grad_(True) for name, t in leaves.items()}
            if impl == "reference" and dtype != torch.float32:
                # the oracle for half precision: float32 reference on the same rounded inputs
                ins = {n_: t.detach().float().requires_grad_(True) for n_, t in ins.items()}
            out, lse = op(
                ins["q"], ins["k"], ins["v"], cfg["kernel_size"], cfg["stride"],
                cfg["dilation"], cfg["is_causal"], rpb=ins.get("rpb"),
                attn_bias=ins.get("attn_bias"), scale=cfg["scale"], border=cfg["border"],
                return_lse=True,
            )  # fmt: skip
            g = torch.Generator().manual_seed(seed + 1)
            go = torch.randn(out.shape, generator=g).to(device)
            gl = torch.randn(lse.shape, generator=g).to(device)
            loss = (out.float() * go).sum() + (lse * gl).sum()
            grads = torch.autograd.grad(loss, list(ins.values()))
            results[impl] = (out.float(), lse, {n_: gr.float() for n_, gr in zip(ins, grads)})
        finally:
            os.environ.pop("VISIONATTN_NA_IMPL", None)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    (o1, l1, g1), (o2, l2, g2) = results["triton"], results["reference"]
    errs = []
    if not torch.allclose(o1, o2, atol=tol, rtol=tol):
        errs.append(f"out {(o1 - o2).abs().max().item():.2e}")
    if not torch.allclose(l1, l2, atol=tol, rtol=tol):
        errs.append(f"lse {(l1 - l2).abs().max().item():.2e}")
    for name in g1:
        a, b_ = g1[name], g2[name]
        # gradient sums over many terms: scale the tolerance by the gradient's magnitude
        gtol = tol * max(1.0, b_.abs().max().item())
        if not torch.allclose(a, b_, atol=gtol, rtol=tol):
            errs.append(f"d{name} {(a - b_).abs().max().item():.2e}")
    return "; ".join(errs) or None


def run_sweep(
    seed: int, count: int, small: bool, device: str, dtypes: list[torch.dtype], log=None
) -> list:
    rng = random.Random(seed)
    failures = []
    for i in range(count):
        cfg = make_config(rng, small)
        dtype = dtypes[i % len(dtypes)]
        err = check_config(cfg, dtype, device, seed * 100003 + i)
        if err:
            failures.append(dict(cfg=cfg, dtype=str(dtype), err=err))
        if log is not None:  # progress survives a worker that is cut off
            print(f"config {i} {'FAIL ' + err if err else 'ok'}", file=log, flush=True)
    return failures


# ----------------------------------------------------------------------------- CPU interpreter
_CHUNKS = 4
_PER_CHUNK = 52  # 208 configs per CI run
_PARALLEL = 2  # CI has 2 cores: two single-threaded interpreter workers per test
_GPU_CONFIGS = 1050


@pytest.mark.parametrize("pair", range(_CHUNKS // _PARALLEL))
def test_triton_interpreter_sweep(pair):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("VISIONATTN_NA_IMPL", None)
    chunks = [pair * _PARALLEL + i for i in range(_PARALLEL)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(_FILE), str(c), str(_PER_CHUNK)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for c in chunks
    ]
    for c, proc in zip(chunks, procs):
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"chunk {c}: {err[-4000:]}"
        result = json.loads(out.strip().splitlines()[-1])
        assert result["checked"] == _PER_CHUNK
        assert not result["failures"], json.dumps(result["failures"][:5], indent=1)


# Whole-window kernel: configs with the launch knobs that the random sweep leaves at their
# defaults (several batch elements per program, packed small windows, split partial sums).
_WINDOW_CASES = [
    # (tune, cfg overrides)
    ({"win_fwd_target": 1, "win_bwd_target": 2}, dict(spatial=[14, 14], kernel_size=[7, 7],
     stride=[7, 7], batch=5, rpb=True, attn_bias="b1")),
    ({}, dict(spatial=[8, 12], kernel_size=[2, 3], stride=[2, 3], dilation=[2, 1], batch=3,
     rpb=True, head_dim_v=24)),
    ({"win_rows": 16}, dict(spatial=[8, 8], kernel_size=[2, 2], stride=[2, 2], batch=2,
     attn_bias="full")),
    ({"win_bwd_target": 1}, dict(spatial=[12, 12], kernel_size=[4, 4], stride=[1, 1],
     dilation=[3, 3], batch=3, rpb=True, attn_bias="h1")),
    ({}, dict(spatial=[4, 4, 6], kernel_size=[2, 2, 3], stride=[2, 2, 3], dilation=[1, 1, 2],
     rpb=True)),
]  # fmt: skip


# rpb on the general kernels: every kernel reads the rpb values as precomputed contiguous
# blocks (forward/dq: one block set per key-box offset of a tile; dk/dv: query blocks at fixed
# offsets from each key tile, rows off the map masked); map
# borders, dilation, stride, causal, zero borders, non-square kernels, 1-D, 3-D, and a kernel
# wider than the query block.
_RPB_CASES = [
    dict(spatial=[16, 16], kernel_size=[7, 7], batch=2),
    dict(spatial=[12, 20], kernel_size=[5, 7], dilation=[2, 1], stride=[1, 2], head_dim=32),
    dict(spatial=[16, 11], kernel_size=[5, 3], is_causal=[True, False], heads=3),
    dict(spatial=[16, 12], kernel_size=[7, 5], border="zero", qkv_view=True, scale=0.2),
    dict(spatial=[20, 18], kernel_size=[9, 9], dilation=[2, 1], head_dim=64, head_dim_v=24),
    dict(spatial=[90], kernel_size=[13], dilation=[2], batch=2),
    dict(spatial=[6, 8, 9], kernel_size=[3, 5, 3], is_causal=[False, False, True]),
    # with a batch-broadcast attn_bias (dS summed over the batch by the dq kernel's atomics)
    dict(spatial=[11, 9], kernel_size=[3, 5], batch=3, attn_bias="b1", is_causal=[True, False]),
]


# Scale folded into the exponent (FOLD: unbiased launches with a positive scale) and left out
# (negative scales, where the raw-logit running max and the -inf masks would be wrong):
# general kernels with padding query rows and keys past the map, a causal 1-D case, and the
# whole-window kernel.
_FOLD_CASES = [
    dict(spatial=[13, 11], kernel_size=[5, 3], scale=0.3, batch=2),
    dict(spatial=[13, 11], kernel_size=[5, 3], scale=-0.3, batch=2),
    dict(spatial=[13, 10], kernel_size=[4, 5], stride=[2, 1], border="zero", scale=-0.25),
    dict(spatial=[37], kernel_size=[7], is_causal=[True], scale=-0.4),
    dict(spatial=[8, 8], kernel_size=[4, 4], stride=[4, 4], scale=0.3),
    dict(spatial=[8, 8], kernel_size=[4, 4], stride=[4, 4], scale=-0.3),
]


def _fixed_cfg(over: dict, **defaults) -> dict:
    """A full config for :func:`check_config`: unit stride/dilation, no causal axis, clamped
    borders, no biases, unless ``defaults`` or ``over`` say otherwise."""
    n = len(over["spatial"])
    cfg = dict(
        stride=[1] * n, dilation=[1] * n, is_causal=[False] * n, border="clamp", batch=1,
        heads=2, head_dim=16, head_dim_v=over.get("head_dim", 16), rpb=False, attn_bias=None,
        qkv_view=False, scale=None,
    )  # fmt: skip
    cfg.update(defaults)
    cfg.update(over)
    return cfg


def test_window_plan_choice():
    """The whole-window kernel takes exactly the patterns whose windows tile the map."""
    from visionattn.kernels import na_triton
    from visionattn.kernels._common import NAParams

    def plan(shape, k, s, d, causal=False, zero=False):
        p = NAParams(k, s, d, (causal,) * len(k), zero, 1.0)
        return na_triton._win_plan(torch.empty(shape), shape[-1], p)

    assert plan((2, 56, 56, 2, 32), (7, 7), (7, 7), (1, 1)) is not None  # MaxViT block
    assert plan((2, 56, 56, 2, 32), (7, 7), (1, 1), (8, 8)) is not None  # MaxViT grid
    assert plan((2, 56, 56, 2, 32), (7, 7), (1, 1), (8, 8), zero=True) is None  # centred
    assert plan((2, 56, 56, 2, 32), (7, 7), (1, 1), (1, 1)) is None  # NAT
    assert plan((2, 57, 56, 2, 32), (7, 7), (7, 7), (1, 1)) is None  # partial window
    assert plan((2, 56, 56, 2, 32), (7, 7), (7, 7), (1, 1), causal=True) is None
    assert plan((2, 64, 64, 2, 32), (16, 16), (16, 16), (1, 1)) is None  # > 128 tokens
    small = plan((2, 8, 8, 2, 32), (2, 2), (2, 2), (1, 1))
    assert small.WP == 4 and small.P == 16  # 16 packed windows of 4 tokens: 64 rows


def test_general_launch_options():
    """Launch policy of the general kernels (measured on H200, kernels/NOTES.md sessions 6-11):
    2 warps only for unbiased 2-D half-precision calls with heads <= 32 (biased 2-warp
    variants spilled: HaloNet's dk/dv 11x slower), 2x16 key blocks when the rpb table is read,
    one pipeline stage for the backward of wide heads, two for narrow unbiased forwards and
    for launches reading rpb blocks."""
    pytest.importorskip("triton")
    from visionattn.kernels import na_triton
    from visionattn.kernels._common import NAParams

    p = NAParams((7, 7), (1, 1), (1, 1), (False, False), False, 1.0)
    q = torch.empty(2, 56, 56, 2, 32, dtype=torch.bfloat16)

    def launch(q, flags):
        consts, opts, _ = na_triton._flag_meta(na_triton._plan(q, q.shape[-1], p), flags)
        return consts, opts

    fwd = (False,) * 8
    c, o = launch(q, fwd)
    assert o["num_warps"] == 2 and (c["KB1"], c["KB2"]) == (8, 8) and o["num_stages"] == 2
    assert c["FOLD"] and not launch(q, (False, True) + fwd[2:])[0]["FOLD"]  # scale folding
    assert "num_stages" not in launch(q, fwd[:3] + (True,) + fwd[4:])[1]  # unbiased dq pass
    c, o = launch(q, (False, True) + fwd[2:])  # rpb: 4 warps, 2x16 key blocks
    assert o["num_warps"] == 4 and (c["KB1"], c["KB2"]) == (2, 16)
    assert launch(q, (True,) + fwd[1:])[1]["num_warps"] == 4  # attn_bias
    assert (
        launch(q, (True, False, False, True, True, False, False, False))[1]["num_warps"] == 4
    )  # dq
    # precomputed rpb blocks: heads <= 32 keep the unbiased 8x8 key blocks, wider ones 2x16
    # (2 pipeline stages for those narrow half-precision launches)
    c, o = launch(q, (False, True, False, False, False, False, True, False))
    assert o["num_warps"] == 4 and (c["KB1"], c["KB2"]) == (8, 8) and o["num_stages"] == 2
    # ... and the dq pass single rows of 16 keys (8x8 spilled)
    c, o = launch(q, (False, True, False, True, False, False, True, True))
    assert o["num_warps"] == 4 and (c["KB1"], c["KB2"]) == (1, 16) and o["num_stages"] == 2
    assert "num_stages" not in launch(q, (False, True) + fwd[2:])[1]  # table gather: default
    assert "num_stages" not in launch(q.float(), (False, True, False) + fwd[3:6] + (True, False))[1]
    wide = torch.empty(2, 56, 56, 2, 64, dtype=torch.bfloat16)
    c, o = launch(wide, (False, True, False, False, False, False, True, False))
    assert (c["KB1"], c["KB2"]) == (2, 16) and "num_stages" not in o
    assert launch(wide, (False, True, False, True, False, False, True, True))[0]["KB2"] == 16
    assert launch(q, (True, False, False))[1]["num_warps"] == 4  # dk/dv with attn_bias
    assert launch(q, (False, True, True))[1]["num_warps"] == 2  # dk/dv with rpb alone
    assert launch(q, (False, True, True))[1]["num_stages"] == 2  # ... reading rpb blocks
    assert "num_stages" not in launch(q, (False, False, False))[1]
    # register caps (resident programs over spills): narrow forwards 168, 64-wide 128; the dq
    # pass reading rpb blocks 128, 64-wide 168; never the dk/dv pass, an attn_bias, fp32 or
    # 128-wide heads
    assert launch(q, fwd)[1]["maxnreg"] == 168
    assert launch(q, (False, True, False, True, False, False, True, True))[1]["maxnreg"] == 128
    assert "maxnreg" not in launch(q, fwd[:3] + (True,) + fwd[4:])[1]  # unbiased narrow dq
    assert "maxnreg" not in launch(q, (False, True, True))[1]
    assert "maxnreg" not in launch(q, (True,) + fwd[1:])[1]  # attn_bias gathers: uncapped
    assert "maxnreg" not in launch(q.float(), fwd)[1]
    assert launch(wide, fwd)[1]["maxnreg"] == 128
    assert launch(wide, fwd[:3] + (True,) + fwd[4:])[1]["maxnreg"] == 168
    d128 = torch.empty(2, 56, 56, 2, 128, dtype=torch.bfloat16)
    assert "maxnreg" not in launch(d128, fwd)[1]
    assert launch(q.float(), fwd)[1].get("num_warps") is None  # fp32: Triton's default
    assert launch(wide, fwd)[1].get("num_warps") is None
    assert launch(wide, (False, False, False))[1]["num_stages"] == 1


def test_window_out_of_resources_uses_general_kernels(monkeypatch):
    """A whole-window variant that does not fit the GPU hands its calls, this one and later
    ones, to the general kernels (no retry per call)."""
    pytest.importorskip("triton")
    from visionattn.kernels import na_triton
    from visionattn.kernels._common import NAParams

    tried, general = [], []

    def boom(*args, **kwargs):
        tried.append(1)
        raise na_triton.OutOfResources(1 << 18, 1 << 17, "shared memory")

    monkeypatch.setattr(na_triton, "_win_forward", boom)
    monkeypatch.setattr(na_triton, "_fwd_launch", lambda *a, **k: general.append(a[0]))
    monkeypatch.setitem(na_triton._TUNE, "win_rows", 32)  # a plan of this test's own
    p = NAParams((7, 7), (7, 7), (1, 1), (False, False), False, 1.0)
    q = torch.randn(2, 14, 14, 2, 16)
    for _ in range(2):
        out, lse = na_triton.forward(q, q, q, None, None, p)
        assert out.shape == q.shape and lse.shape == q.shape[:-1]
    assert len(tried) == 1 and len(general) == 2


def _interpreted(kind: str, case: int) -> dict:
    """Run one ``window``/``rpb`` case of this file's worker under ``TRITON_INTERPRET=1``."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("VISIONATTN_NA_IMPL", None)
    proc = subprocess.run(
        [sys.executable, str(_FILE), kind, str(case)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(_FOLD_CASES)))
def test_scale_fold_interpreter(case):
    result = _interpreted("fold", case)
    assert result["fold"] == (_FOLD_CASES[case]["scale"] > 0)
    assert result["error"] is None, result["error"]


@pytest.mark.parametrize("case", range(len(_WINDOW_CASES)))
def test_window_kernel_interpreter(case):
    result = _interpreted("window", case)
    assert result["window_plan"], "the case must take the whole-window kernel"
    assert result["error"] is None, result["error"]


@pytest.mark.parametrize("case", range(len(_RPB_CASES)))
def test_rpb_blocks_interpreter(case):
    result = _interpreted("rpb", case)
    assert result["blocks"], "every kernel must read precomputed rpb blocks"
    assert result["error"] is None, result["error"]


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_triton_gpu_sweep():
    """>= 1000 random configs (fp32/fp16/bf16) on CUDA against the reference.

    Every config is a fresh kernel specialisation, so the time goes into Triton's compiler
    (one CPU core per process): the sweep runs in parallel worker processes.
    """
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    per = -(-_GPU_CONFIGS // workers)
    procs = [
        subprocess.Popen(
            [sys.executable, str(_FILE), str(c), str(per), "cuda"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for c in range(workers)
    ]
    failures, checked = [], 0
    for c, proc in enumerate(procs):
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"worker {c}: {err[-4000:]}"
        result = json.loads(out.strip().splitlines()[-1])
        checked += result["checked"]
        failures += result["failures"]
    assert checked >= _GPU_CONFIGS
    assert not failures, json.dumps(failures[:10], indent=1)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name, cfg",
    [
        ("dinat_s1", dict(spatial=[56, 56], kernel_size=[7, 7], dilation=[8, 8], head_dim=32)),
        ("nat_s1", dict(spatial=[56, 56], kernel_size=[7, 7], dilation=[1, 1], head_dim=32)),
        ("nat_s1_rpb", dict(spatial=[56, 56], kernel_size=[7, 7], head_dim=32, rpb=True)),
        ("nat_s3_rpb", dict(spatial=[14, 14], kernel_size=[7, 7], head_dim=32, rpb=True)),
        ("k13_rpb", dict(spatial=[40, 36], kernel_size=[13, 11], head_dim=64, rpb=True)),
        ("k13_d64", dict(spatial=[48, 40], kernel_size=[13, 13], dilation=[1, 2], head_dim=64)),
        (
            "maxvit_grid",
            dict(
                spatial=[56, 56],
                kernel_size=[7, 7],
                stride=[7, 7],
                dilation=[8, 8],
                head_dim=32,
                rpb=True,
            ),
        ),  # fmt: skip
        (
            "maxvit_block",
            dict(spatial=[56, 56], kernel_size=[7, 7], stride=[7, 7], head_dim=32, rpb=True),
        ),  # fmt: skip
        (
            "maxvit_grid_s1",
            dict(spatial=[56, 56], kernel_size=[7, 7], dilation=[8, 8], head_dim=32, rpb=True),
        ),  # fmt: skip
        (
            "efficientvit",
            dict(
                spatial=[7, 7],
                kernel_size=[7, 7],
                stride=[7, 7],
                head_dim=16,
                head_dim_v=64,
                attn_bias="b1",
            ),
        ),  # fmt: skip
        (
            "halonet",
            dict(
                spatial=[64, 64],
                kernel_size=[14, 14],
                stride=[8, 8],
                border="zero",
                head_dim=64,
                attn_bias="full",
            ),
        ),  # fmt: skip
        ("na_d128", dict(spatial=[32, 40], kernel_size=[9, 9], dilation=[1, 2], head_dim=128)),
        (
            "na3d",
            dict(spatial=[8, 16, 16], kernel_size=[3, 5, 5], dilation=[1, 2, 1], head_dim=128),
        ),  # fmt: skip
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gpu_model_shapes(name, cfg, dtype):
    err = check_config(_fixed_cfg(cfg, batch=2, qkv_view=True), dtype, "cuda", 7)
    assert err is None, err


def _params_and_query(cfg: dict):
    """(NAParams, empty q) of a config, for plan checks."""
    from visionattn.kernels._common import NAParams

    p = NAParams(tuple(cfg["kernel_size"]), tuple(cfg["stride"]), tuple(cfg["dilation"]),
                 tuple(cfg["is_causal"]), cfg["border"] == "zero", 1.0)  # fmt: skip
    return p, torch.empty(cfg["batch"], *cfg["spatial"], cfg["heads"], cfg["head_dim"])


def _window_worker(case: int) -> dict:
    from visionattn.kernels import na_triton

    tune, over = _WINDOW_CASES[case]
    cfg = _fixed_cfg(over)
    na_triton._TUNE.update(tune)
    p, q = _params_and_query(cfg)
    chosen = na_triton._win_plan(q, cfg["head_dim_v"], p) is not None
    return dict(window_plan=chosen, error=check_config(cfg, torch.float32, "cpu", 11 + case))


def _rpb_worker(case: int) -> dict:
    from visionattn.kernels import na_triton

    cfg = _fixed_cfg(_RPB_CASES[case], rpb=True)
    p, q = _params_and_query(cfg)
    rpb = torch.zeros(cfg["heads"], *(2 * k - 1 for k in cfg["kernel_size"]))
    blocks = na_triton._win_plan(q, cfg["head_dim_v"], p) is None
    pl = na_triton._plan(q, cfg["head_dim_v"], p)
    blocks = blocks and na_triton._rpb_kv_blocks(rpb, pl) is not None
    blocks = blocks and na_triton._rpb_fwd_args(rpb, q, pl)[2] is not q
    return dict(blocks=blocks, error=check_config(cfg, torch.float32, "cpu", 31 + case))


def _fold_worker(case: int) -> dict:
    """One ``_FOLD_CASES`` config against the reference, and whether its launches folded."""
    from visionattn.kernels import na_triton

    cfg = _fixed_cfg(_FOLD_CASES[case])
    folded = []
    for name in ("_fwd_launch", "_kv_launch", "_win_launch"):

        def spy(*args, _launch=getattr(na_triton, name), **kwargs):
            folded.append(args[3].get("FOLD"))
            return _launch(*args, **kwargs)

        setattr(na_triton, name, spy)  # this worker process only
    error = check_config(cfg, torch.float32, "cpu", 51 + case)
    assert folded and len(set(folded)) == 1, folded
    return dict(fold=folded[0], error=error)


if __name__ == "__main__":  # sweep worker: chunk count [cuda]; on CPU TRITON_INTERPRET=1 is set
    torch.set_num_threads(1)
    if sys.argv[1] in ("window", "rpb", "fold"):
        worker = {"window": _window_worker, "rpb": _rpb_worker, "fold": _fold_worker}[sys.argv[1]]
        print(json.dumps(worker(int(sys.argv[2]))))
        sys.exit(0)
    chunk, count = int(sys.argv[1]), int(sys.argv[2])
    if sys.argv[3:] == ["cuda"]:
        dts = [torch.float32, torch.float16, torch.bfloat16]
        fails = run_sweep(
            2024 + chunk, count, small=False, device="cuda", dtypes=dts, log=sys.stderr
        )
    else:
        fails = run_sweep(1000 + chunk, count, small=True, device="cpu", dtypes=[torch.float32])
    print(json.dumps(dict(checked=count, failures=fails)))

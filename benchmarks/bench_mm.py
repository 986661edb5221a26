"""Detection-resolution backbone throughput: visionattn.mm's backbone per family, beside the
official downstream backbone where its code runs here.

Forward + backward (sum of the output maps' means, no optimizer step) images/s at 800x1216,
batch 2, bf16 autocast, eager, one GPU; the backbone exactly as the mmdet configs build it
(``VisionAttnBackbone(model_name, downstream="det")``: the official detection settings, the
per-output norms, the four stride-4..32 outputs).

The GPU image has no mmcv/mmengine; the adapter needs only mmengine's ``BaseModule`` and
``print_log``, so without mmengine this script gives it a two-name stand-in (``nn.Module`` and
``print``) -- the forward path timed is the adapter's own.

Official comparisons (code under ``.gpu/third_party``; same loaders as bench_nat.py /
bench_biformer.py):

* NAT-Mini / DiNAT-Mini: the official classification trunk (``forward_features``) with the
  detection dilations, on NATTEN 0.21's Flex backend (no relative position bias: NATTEN >= 0.20
  dropped it), i.e. the official detection backbone minus its four output norms and bias adds.
* BiFormer-S: the official model with ``n_win=16, auto_pad=True`` (its detection settings),
  ``forward_features`` (needs einops on the path: a wheel under ``.gpu/mm/``).

Usage on the lent GPU (prints one table, writes ``mm_<gpu>.json`` to --out-dir and $OUT):

    source tools/gpu_env.sh; python3 benchmarks/bench_mm.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

# (family, model name) at the configs' sizes
MODELS = [
    ("nat", "nat_mini"),
    ("dinat", "dinat_mini"),
    ("biformer", "biformer_small"),
    ("focalnet", "va_focalnet_tiny_srf"),
    ("maxvit", "va_maxvit_tiny_tf_224"),
    ("halonet", "va_halonet50ts"),
    ("efficientvit", "va_efficientvit_m4"),
    ("litv2", "litv2_small"),
    ("agent_swin", "agent_swin_tiny"),
    ("agent_pvt", "agent_pvt_tiny"),
    ("agent_cswin", "agent_cswin_tiny"),
]
TINY = {  # --tiny: the test variants (CPU dry run of this script)
    "nat_mini": "test_nat",
    "dinat_mini": "test_dinat",
    "biformer_small": "test_biformer",
    "va_focalnet_tiny_srf": "test_va_focalnet",
    "va_maxvit_tiny_tf_224": "test_va_maxvit",
    "va_halonet50ts": "test_va_halonet",
    "va_efficientvit_m4": "test_va_efficientvit",
    "litv2_small": "test_litv2",
    "agent_swin_tiny": "test_agent_swin",
    "agent_pvt_tiny": "test_agent_pvt",
    "agent_cswin_tiny": "test_agent_cswin",
}


def _mmengine_stand_in() -> bool:
    """Install ``mmengine.model.BaseModule`` / ``mmengine.logging.print_log`` stand-ins when
    mmengine is absent; returns whether it was absent."""
    try:
        import mmengine  # noqa: F401

        return False
    except ImportError:
        pass

    class BaseModule(nn.Module):
        def __init__(self, init_cfg=None) -> None:
            super().__init__()
            self.init_cfg = init_cfg

    root = types.ModuleType("mmengine")
    model = types.ModuleType("mmengine.model")
    logging = types.ModuleType("mmengine.logging")
    model.BaseModule = BaseModule
    logging.print_log = lambda msg, logger=None: print(msg)
    root.model, root.logging = model, logging
    sys.modules.update({"mmengine": root, "mmengine.model": model, "mmengine.logging": logging})
    return True


def _timed(fn: Callable[[], None], steps: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def fwd_bwd(
    model: nn.Module,
    forward: Callable[[torch.Tensor], object],
    x: torch.Tensor,
    steps: int,
    warmup: int,
) -> dict[str, float]:
    cuda = x.is_cuda
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cuda):
            out = forward(x)
            outs = out if isinstance(out, (list, tuple)) else [out]
            loss = sum(o.float().mean() for o in outs)
        loss.backward()
        for p in params:
            p.grad = None

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sec = _timed(step, steps, warmup, cuda)
    res = dict(img_s=x.shape[0] / sec, ms_per_iter=sec * 1e3)
    if cuda:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def _official(name: str, args: argparse.Namespace) -> tuple[nn.Module, Callable] | None:
    """The official backbone for ``name`` (None when there is none to compare with)."""
    if args.tiny:
        return None
    if name in ("nat_mini", "dinat_mini"):
        import bench_nat

        from visionattn.mm import downstream_kwargs

        factory = bench_nat._official_factory(name)
        kw = {}
        if name == "dinat_mini":
            # the factory fixes the classification dilations: build its class with the
            # detection ones (SHI-Labs detection/configs/dinat/mask_rcnn_dinat_mini_3x_coco.py)
            mod = sys.modules[factory.__module__]
            m = mod.DiNAT(
                depths=[3, 4, 6, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3,
                drop_path_rate=0.2, kernel_size=7,
                dilations=downstream_kwargs("dinat_mini", "det")["dilations"],
            )  # fmt: skip
        else:
            m = factory(**kw)
        return m, m.forward_features
    if name == "biformer_small":
        import bench_biformer

        ob = bench_biformer.load_official(REPO / ".gpu" / "third_party" / "biformer")
        m = bench_biformer.official_model(ob, "biformer_small", n_win=16, auto_pad=True)
        return m, m.forward_features
    return None


def _commit() -> str:
    if os.environ.get("VA_COMMIT"):
        return os.environ["VA_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
    except OSError:
        out = ""
    return out or "unknown"


def bench(args: argparse.Namespace, write: Callable[[dict], None]) -> dict:
    """Ours for every family first, then the official backbones (their NATTEN Flex graphs
    compile slowly); ``write`` is called after every measurement so partial runs keep data."""
    stand_in = _mmengine_stand_in()
    import visionattn  # noqa: F401
    from visionattn.mm import VisionAttnBackbone

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h, w = args.size
    x = torch.randn(args.batch, 3, h, w, device=dev)
    res = dict(
        what="backbone forward+backward img/s, VisionAttnBackbone(downstream='det')",
        input=[args.batch, 3, h, w],
        dtype="bf16 autocast" if dev.type == "cuda" else "fp32",
        gpu=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        torch=torch.__version__,
        timm=timm.__version__,
        commit=_commit(),
        mmengine_stand_in=stand_in,
        steps=args.steps,
        warmup=args.warmup,
        rows=[],
    )
    todo = [(f, n) for f, n in MODELS if not args.only or f in args.only]
    for family, name in todo:
        run_name = TINY[name] if args.tiny else name
        row: dict = dict(family=family, model=run_name)
        res["rows"].append(row)
        try:
            torch.manual_seed(0)
            bb = VisionAttnBackbone(run_name, downstream="det").to(dev)
            row["params_m"] = sum(p.numel() for p in bb.parameters()) / 1e6
            row["ours"] = fwd_bwd(bb, bb, x, args.steps, args.warmup)
            del bb
        except Exception as e:  # one family failing must not lose the others' numbers
            row["ours"] = dict(error=f"{type(e).__name__}: {e}")
            traceback.print_exc()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        write(res)
    # BiFormer's official model first: NATTEN's compiled Flex graphs take the longest
    order = sorted(range(len(todo)), key=lambda i: todo[i][0] != "biformer")
    for row, (_family, name) in ((res["rows"][i], todo[i]) for i in order):
        try:
            off = _official(name, args)
            if off is None:
                continue
            m, fwd = off
            m = m.to(dev)
            t0 = time.perf_counter()
            row["official"] = fwd_bwd(m, fwd, x, args.steps, args.warmup)
            row["official"]["first_call_s"] = time.perf_counter() - t0
            del m
        except Exception as e:
            row["official"] = dict(error=f"{type(e).__name__}: {e}")
            traceback.print_exc()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        write(res)
    return res


def _fmt(r: dict | None) -> str:
    if not r:
        return "-"
    if "error" in r:
        return "error"
    s = f"{r['img_s']:.1f}"
    if "peak_gib" in r:
        s += f" ({r['peak_gib']:.1f} GiB)"
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=2, default=(800, 1216))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="families to run")
    ap.add_argument("--tiny", action="store_true", help="test variants (CPU dry run)")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    args = ap.parse_args()
    name = "mm_tiny_cpu.json" if args.tiny else None

    def write(res: dict) -> None:
        gpu = res["gpu"].lower()
        tag = "h200" if "h200" in gpu else "h100" if "h100" in gpu else gpu.split()[-1]
        fname = name or f"mm_{tag}.json"
        for d in {args.out_dir, os.environ.get("OUT", "")} - {""}:
            Path(d).mkdir(parents=True, exist_ok=True)
            (Path(d) / fname).write_text(json.dumps(res, indent=1) + "\n")

    res = bench(args, write)
    print(f"{res['gpu']}  input {res['input']}  {res['dtype']}  commit {res['commit'][:10]}")
    print(f"{'family':<13}{'model':<24}{'params M':>9}  {'ours img/s':>20}  {'official img/s':>20}")
    for r in res["rows"]:
        print(
            f"{r['family']:<13}{r['model']:<24}{r.get('params_m', 0):>9.1f}  "
            f"{_fmt(r.get('ours')):>20}  {_fmt(r.get('official')):>20}"
        )


if __name__ == "__main__":
    main()

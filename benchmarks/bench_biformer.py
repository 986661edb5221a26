"""BiFormer on the routed kernel vs the official implementation: speed, memory, agreement.

Runs in one process on one GPU:

1. agreement: the official ``biformer_tiny`` (random weights) converted with
   ``from_official``; max |logits diff| in float32 (TF32 off) at 224px with n_win 7, and at a
   detection-like size (n_win 16, auto_pad, a map not divisible by the grid);
2. throughput: eager, bf16 autocast, 224px; inference (no grad, eval) at batch 256, training
   (forward, backward, SGD step, train mode) at batch 128 -- the official model and ours;
3. memory at detection resolution: peak allocated memory of a training step (and of
   inference) at n_win 16 with auto_pad, official vs ours, beside the bytes of the top-k K/V
   copies the official gather keeps alive for backward.

The official code (github.com/rayleizhu/BiFormer: models/biformer.py, models/_common.py,
ops/bra_legacy.py) is read from ``--official`` (not shipped with visionattn; it needs einops).

    python benchmarks/bench_biformer.py --official .gpu/third_party/biformer --out-dir $OUT

Prints a table and writes ``biformer_<gpu>.json`` into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import visionattn
from visionattn.backbones import biformer as bf


def load_official(root: Path) -> types.ModuleType:
    """Import the official ``models.biformer`` from ``root`` without touching timm's registry."""
    if not (root / "models" / "biformer.py").exists():
        raise FileNotFoundError(f"--official: no models/biformer.py under {root}")
    # the official file imports fairscale's checkpoint_wrapper, used only when
    # use_checkpoint_stages is set (never here)
    fs = types.ModuleType("fairscale")
    fs_nn = types.ModuleType("fairscale.nn")
    fs_ck = types.ModuleType("fairscale.nn.checkpoint")
    fs_ck.checkpoint_wrapper = lambda m, *a, **k: m
    fs.nn, fs_nn.checkpoint = fs_nn, fs_ck
    sys.modules.setdefault("fairscale", fs)
    sys.modules.setdefault("fairscale.nn", fs_nn)
    sys.modules.setdefault("fairscale.nn.checkpoint", fs_ck)
    sys.path.insert(0, str(root))
    # its @register_model would replace our biformer_* entries in timm's registry
    tm = importlib.import_module("timm.models")
    orig = tm.register_model
    tm.register_model = lambda fn: fn
    try:
        return importlib.import_module("models.biformer")
    finally:
        tm.register_model = orig


def official_model(ob: types.ModuleType, variant: str, **overrides: Any) -> nn.Module:
    return ob.BiFormer(**{**bf.OFFICIAL_VARIANTS[variant], **overrides})


def perturb_(model: nn.Module, seed: int = 0) -> None:
    """Random non-trivial weights (zero biases and unit norms would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * 0.02)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def agreement(ob: types.ModuleType, dev: torch.device) -> dict[str, Any]:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    res: dict[str, Any] = {}
    for tag, overrides, size in (
        ("cls_224_nwin7", {}, (224, 224)),
        ("det_nwin16_autopad", {"n_win": 16, "auto_pad": True}, (416, 600)),
    ):
        torch.manual_seed(0)
        off = official_model(ob, "biformer_tiny", **overrides)
        perturb_(off)
        off = off.to(dev).eval()
        kw = {**bf.OFFICIAL_VARIANTS["biformer_tiny"], **overrides}
        ours = bf.from_official(off.state_dict(), kw).to(dev).eval()
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1)).to(dev)
        with torch.no_grad():
            ref, out = off(x), ours(x)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ref_bf, out_bf = off(x), ours(x)
        res[tag] = dict(
            input=list(x.shape),
            fp32_max_abs_diff=max_diff(ref, out),
            bf16_max_abs_diff=max_diff(ref_bf, out_bf),
            bf16_official_vs_fp32=max_diff(ref_bf, ref),
            max_abs_logit=ref.abs().max().item(),
        )
        del off, ours
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return res


def timed(fn: Callable[[], None], steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def throughput(
    model: nn.Module, dev: torch.device, infer_bs: int, train_bs: int, steps: int, warmup: int
) -> dict[str, float]:
    model = model.to(dev)
    g = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    x = torch.randn(infer_bs, 3, 224, 224, generator=g).to(dev)
    model.eval()

    def infer() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    torch.cuda.reset_peak_memory_stats()
    out["infer_img_per_s"] = infer_bs * steps / timed(infer, steps, warmup)
    out["infer_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    xt = torch.randn(train_bs, 3, 224, 224, generator=g).to(dev)
    y = torch.randint(0, 1000, (train_bs,), generator=g).to(dev)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(xt), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out["train_img_per_s"] = train_bs * steps / timed(train, steps, warmup)
    out["train_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    model.to("cpu")
    torch.cuda.empty_cache()
    return out


def gathered_kv_bytes(variant: str, h: int, w: int, n_win: int, batch: int, elt: int) -> int:
    """Bytes of the top-k K/V copies the official gather keeps per training step."""
    kw = bf.OFFICIAL_VARIANTS[variant]
    total = 0
    hh, ww = -(-h // 4), -(-w // 4)
    for i in range(4):
        if i:
            hh, ww = -(-hh // 2), -(-ww // 2)
        topk = kw["topks"][i]
        if topk <= 0:
            continue
        ph, pw = -(-hh // n_win) * n_win, -(-ww // n_win) * n_win
        region = (ph // n_win) * (pw // n_win)
        c_kv = kw["qk_dims"][i] + kw["embed_dim"][i]
        total += kw["depth"][i] * batch * n_win * n_win * topk * region * c_kv * elt
    return total


def detection_memory(
    ob: types.ModuleType, dev: torch.device, variant: str, size: tuple[int, int], batch: int
) -> dict[str, Any]:
    overrides = {"n_win": 16, "auto_pad": True}
    res: dict[str, Any] = dict(variant=variant, input=[batch, 3, *size], n_win=16, auto_pad=True)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(2)).to(dev)
    for impl in ("official", "ours"):
        torch.manual_seed(0)
        if impl == "official":
            model = official_model(ob, variant, **overrides)
            feats = model.forward_features
        else:
            model = bf.from_official(
                official_model(ob, variant, **overrides).state_dict(),
                {**bf.OFFICIAL_VARIANTS[variant], **overrides},
            )
            feats = model.forward_features
        model = model.to(dev).train()
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        torch.cuda.empty_cache()
        try:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = feats(x).float().mean()
            loss.backward()
            torch.cuda.synchronize()
            res[f"{impl}_train_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            model.zero_grad(set_to_none=True)
            del loss
            model.eval()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                feats(x)
            torch.cuda.synchronize()
            res[f"{impl}_infer_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        except torch.OutOfMemoryError:
            res[f"{impl}_error"] = "OOM"
        res["param_mib"] = params / 2**20
        model.to("cpu")
        del model, feats
        torch.cuda.empty_cache()
    res["official_gathered_kv_mib_bf16"] = (
        gathered_kv_bytes(variant, size[0], size[1], 16, batch, 2) / 2**20
    )
    return res


def profile_ours(dev: torch.device, batch: int) -> str:
    """Top CUDA kernels of one training step of ours (where the time goes)."""
    model = timm.create_model("biformer_tiny").to(dev).train()
    x = torch.randn(batch, 3, 224, 224, device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    model.to("cpu")
    return prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=18, max_name_column_width=60
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, default=Path(".gpu/third_party/biformer"))
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks"))
    ap.add_argument("--variants", default="biformer_tiny")
    ap.add_argument("--infer-bs", type=int, default=256)
    ap.add_argument("--train-bs", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--det-size", default="800,1344")
    ap.add_argument("--det-batch", type=int, default=2)
    ap.add_argument("--det-variant", default="biformer_small")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_biformer: needs a CUDA GPU")
    dev = torch.device("cuda")
    ob = load_official(args.official)
    name = torch.cuda.get_device_name(0)
    gpu = next(
        (t.lower() for t in name.replace("-", " ").split() if t[:1] in "HABL" and t[1:2].isdigit()),
        "gpu",
    )
    from visionattn.kernels import routed as routed_mod

    report: dict[str, Any] = dict(
        device=name,
        torch=torch.__version__,
        triton=importlib.import_module("triton").__version__,
        timm=timm.__version__,
        visionattn=visionattn.__version__,
        python=platform.python_version(),
        routed_backend="triton"
        if routed_mod._use_triton(torch.empty(1, device=dev))
        else "reference",
        settings=dict(
            amp="bf16",
            img_size=224,
            infer_batch=args.infer_bs,
            train_batch=args.train_bs,
            steps=args.steps,
            warmup=args.warmup,
            mode="eager",
        ),
    )
    t0 = time.time()
    report["agreement"] = agreement(ob, dev)
    print("agreement:", json.dumps(report["agreement"], indent=1), flush=True)

    rows = []
    for variant in args.variants.split(","):
        for impl in ("official", "ours"):
            torch.manual_seed(0)
            model = (
                official_model(ob, variant) if impl == "official" else timm.create_model(variant)
            )
            r = throughput(model, dev, args.infer_bs, args.train_bs, args.steps, args.warmup)
            rows.append(dict(model=variant, impl=impl, **r))
            print(rows[-1], flush=True)
            del model
    report["throughput"] = rows
    h, w = (int(s) for s in args.det_size.split(","))
    report["detection_memory"] = detection_memory(ob, dev, args.det_variant, (h, w), args.det_batch)
    print("detection memory:", report["detection_memory"], flush=True)
    if args.profile:
        report["profile_ours_train"] = profile_ours(dev, args.train_bs)
        print(report["profile_ours_train"])
    report["wall_s"] = time.time() - t0

    lines = [f"BiFormer, {name}, torch {torch.__version__}, eager bf16, 224px"]
    lines.append(
        f"{'model':16} {'impl':9} {'infer img/s':>12} {'speedup':>8} {'train img/s':>12} "
        f"{'speedup':>8} {'infer MiB':>10} {'train MiB':>10}"
    )
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["impl"] == "official")
        lines.append(
            f"{r['model']:16} {r['impl']:9} {r['infer_img_per_s']:12.0f} "
            f"{r['infer_img_per_s'] / base['infer_img_per_s']:7.2f}x {r['train_img_per_s']:12.0f} "
            f"{r['train_img_per_s'] / base['train_img_per_s']:7.2f}x {r['infer_peak_mib']:10.0f} "
            f"{r['train_peak_mib']:10.0f}"
        )
    d = report["detection_memory"]
    lines.append(
        f"detection memory ({d['variant']}, input {d['input']}, n_win 16, auto_pad, bf16), "
        "MiB above weights:"
    )
    for impl in ("official", "ours"):
        lines.append(
            f"  {impl:9} train step {d.get(f'{impl}_train_peak_mib', float('nan')):9.0f}   "
            f"inference {d.get(f'{impl}_infer_peak_mib', float('nan')):9.0f}"
        )
    lines.append(
        f"  official top-k K/V copies (bf16, all routed layers): "
        f"{d['official_gathered_kv_mib_bf16']:.0f} MiB"
    )
    table = "\n".join(lines)
    report["table"] = table
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"biformer_{gpu}.json"
    path.write_text(json.dumps(report, indent=1))
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

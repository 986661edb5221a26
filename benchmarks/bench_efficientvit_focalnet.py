"""EfficientViT (MSRA) and FocalNet: ours vs timm's own models, speed, memory, agreement.

GPU mode (default; one process, one GPU):

1. agreement: timm's model with random weights, converted with ``from_timm``; max |diff| of
   logits in float32 (TF32 off) and under bf16 autocast, 224px;
2. throughput, eager, bf16 autocast, 224px, timm's model and ours interleaved (best of
   ``--rounds``): inference (eval, ``inference_mode``) at batch 256 and training (train mode,
   forward + cross-entropy + backward + SGD step) at batch 128; img/s and peak memory;
3. a short profile of our training step (top CUDA kernels) for each family.

CPU mode (``--cpu``): inference img/s of both at a small batch on this machine's CPU,
merged into the JSON given by ``--merge`` (or written alone).

    python benchmarks/bench_efficientvit_focalnet.py --out-dir $OUT
    python benchmarks/bench_efficientvit_focalnet.py --cpu --merge benchmarks/efficientvit_focalnet_h100.json

Prints a table and writes ``efficientvit_focalnet_<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import visionattn
from visionattn.convert import from_timm

MODELS = ["efficientvit_m5", "efficientvit_m0", "focalnet_tiny_srf"]


def perturb_(model: nn.Module, seed: int = 0) -> None:
    """Random non-trivial weights and BN statistics (zero-init branches would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * 0.02)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g).to(b) + 1.0)


def pair(name: str, device: torch.device) -> tuple[nn.Module, nn.Module]:
    ref = timm.create_model(name)
    perturb_(ref)
    ours = from_timm(name, ref.state_dict())
    return ref.to(device), ours.to(device)


def agreement(name: str, ref: nn.Module, ours: nn.Module, dev: torch.device) -> dict[str, float]:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ref.eval(), ours.eval()
    x = torch.randn(8, 3, 224, 224, device=dev, generator=torch.Generator(dev).manual_seed(0))
    out: dict[str, float] = {}
    with torch.no_grad():
        a, b = ref(x), ours(x)
        out["fp32_max_abs_diff"] = (a - b).abs().max().item()
        out["logit_scale"] = a.abs().max().item()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            a16, b16 = ref(x).float(), ours(x).float()
        out["bf16_max_abs_diff_vs_fp32"] = {
            "timm": (a16 - a).abs().max().item(),
            "ours": (b16 - a).abs().max().item(),
        }
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return out


def timed(fn: Callable[[], None], steps: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


def infer_fn(model: nn.Module, x: torch.Tensor, amp: bool) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            model(x)

    return run


def train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def run() -> None:
        with torch.autocast(x.device.type, torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def gpu_throughput(
    ref: nn.Module, ours: nn.Module, dev: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    res: dict[str, Any] = {}
    sync = torch.cuda.synchronize
    xi = torch.randn(args.infer_batch, 3, 224, 224, device=dev)
    xt = torch.randn(args.train_batch, 3, 224, 224, device=dev)
    yt = torch.randint(0, 1000, (args.train_batch,), device=dev)
    for mode in ("infer", "train"):
        best = {"timm": float("inf"), "ours": float("inf")}
        peak = {}
        fns = {
            impl: (infer_fn(m, xi, True) if mode == "infer" else train_fn(m, xt, yt))
            for impl, m in (("timm", ref), ("ours", ours))
        }
        for r in range(args.rounds):
            for impl, fn in fns.items():
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t = timed(fn, args.steps, args.warmup if r == 0 else 2, sync)
                best[impl] = min(best[impl], t)
                peak[impl] = (torch.cuda.max_memory_allocated() - base) / 2**20
        batch = xi.shape[0] if mode == "infer" else xt.shape[0]
        for impl in best:
            res[f"{impl}_{mode}_img_s"] = batch / best[impl]
            res[f"{impl}_{mode}_peak_mib"] = peak[impl]
        res[f"{mode}_speedup"] = res[f"ours_{mode}_img_s"] / res[f"timm_{mode}_img_s"]
        del fns
    return res


def profile_train(model: nn.Module, dev: torch.device, batch: int, cpu: bool = False) -> str:
    """Top CUDA kernels of two training steps (and, with ``cpu``, top ops by CPU time)."""
    x = torch.randn(batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    step = train_fn(model, x, y)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    text = avg.table(sort_by="self_cuda_time_total", row_limit=12)
    if cpu:
        text += "\n" + avg.table(sort_by="cpu_time_total", row_limit=25)
    return text


def cpu_throughput(
    name: str, batch: int, steps: int, threads: int, rounds: int = 6
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    ref, ours = pair(name, torch.device("cpu"))
    x = torch.randn(batch, 3, 224, 224)
    best = {"timm": float("inf"), "ours": float("inf")}
    # shared CPUs are noisy: many short interleaved rounds, best of each
    for _ in range(rounds):
        for impl, m in (("timm", ref), ("ours", ours)):
            t = timed(infer_fn(m, x, False), steps, 1, lambda: None)
            best[impl] = min(best[impl], t)
    out = {f"{impl}_cpu_infer_img_s": batch / t for impl, t in best.items()}
    out["cpu_infer_speedup"] = out["ours_cpu_infer_img_s"] / out["timm_cpu_infer_img_s"]
    out.update(cpu_batch=batch, cpu_threads=threads, cpu=platform.processor() or platform.machine())
    return out


def table(results: dict[str, Any]) -> str:
    rows = [
        f"{'model':<20} {'timm inf':>9} {'ours inf':>9} {'x':>5} {'timm trn':>9} "
        f"{'ours trn':>9} {'x':>5} {'mem trn t/o MiB':>16} {'fp32 diff':>9} {'cpu x':>6}"
    ]
    for name, r in results["models"].items():
        g = r.get("gpu", {})
        c = r.get("cpu", {})

        def f(key: str, fmt: str = "{:9.0f}", src: dict = g) -> str:
            return fmt.format(src[key]) if key in src else f"{'-':>9}"

        mem = (
            f"{g['timm_train_peak_mib']:.0f}/{g['ours_train_peak_mib']:.0f}"
            if "timm_train_peak_mib" in g
            else "-"
        )
        diff = r.get("agreement", {}).get("fp32_max_abs_diff")
        rows.append(
            f"{name:<20} {f('timm_infer_img_s')} {f('ours_infer_img_s')} "
            f"{f('infer_speedup', '{:5.2f}')} {f('timm_train_img_s')} {f('ours_train_img_s')} "
            f"{f('train_speedup', '{:5.2f}')} {mem:>16} "
            f"{(f'{diff:.1e}' if diff is not None else '-'):>9} "
            f"{f('cpu_infer_speedup', '{:6.2f}', c)}"
        )
    return "\n".join(rows)


def gpu_slug(name: str) -> str:
    m = re.search(r"(H100|H200|A100|L40S|B200|GH200)", name, re.I)
    return m[1].lower() if m else re.sub(r"\W+", "_", name.lower()).strip("_")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks"))
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="profile our training steps")
    ap.add_argument("--cpu", action="store_true", help="CPU inference comparison instead")
    ap.add_argument("--cpu-batch", type=int, default=8)
    ap.add_argument("--cpu-threads", type=int, default=2)
    ap.add_argument("--merge", type=Path, help="JSON to add the CPU results to")
    args = ap.parse_args()

    if args.cpu:
        path = args.merge or args.out_dir / "efficientvit_focalnet_cpu.json"
        results = json.loads(path.read_text()) if path.exists() else {"models": {}}
        for name in args.models:
            results["models"].setdefault(name, {})["cpu"] = cpu_throughput(
                name, args.cpu_batch, 2, args.cpu_threads
            )
            print(name, results["models"][name]["cpu"], flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(table(results))
        return

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name(dev)
    results: dict[str, Any] = {
        "device": gpu,
        "versions": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "triton": __import__("triton").__version__,
            "visionattn": getattr(visionattn, "__version__", "dev"),
            "cuda": torch.version.cuda,
        },
        "settings": {
            "mode": "eager, bf16 autocast, 224px",
            "infer_batch": args.infer_batch,
            "train_batch": args.train_batch,
            "steps": args.steps,
            "rounds": args.rounds,
            "train_step": "forward + cross-entropy + backward + SGD(momentum) step",
        },
        "models": {},
    }
    profiles = {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"efficientvit_focalnet_{gpu_slug(gpu)}.json"
    for name in args.models:
        ref, ours = pair(name, dev)
        entry = {"agreement": agreement(name, ref, ours, dev)}
        entry["gpu"] = gpu_throughput(ref, ours, dev, args)
        results["models"][name] = entry
        path.write_text(json.dumps(results, indent=2))  # after each model: a cut run keeps them
        print(name, json.dumps(entry), flush=True)
        if args.profile and name in ("efficientvit_m5", "focalnet_tiny_srf"):
            profiles[name] = {
                impl: profile_train(m, dev, args.train_batch, cpu=impl == "ours")
                for impl, m in (("ours", ours), ("timm", ref))
            }
        del ref, ours
        torch.cuda.empty_cache()
    path.write_text(json.dumps(results, indent=2))
    for name, prof in profiles.items():
        for impl, text in prof.items():
            print(f"\n== profile {impl} {name} train step x2\n{text}")
    print(f"\n{gpu}, torch {torch.__version__}, timm {timm.__version__}")
    print(table(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

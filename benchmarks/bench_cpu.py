"""CPU inference img/s of visionattn's MaxViT / HaloNet / EfficientViT / FocalNet beside timm's.

Each pair is built from the same timm weights (``visionattn.convert.from_timm``), checked for
float32 agreement, then timed in one process: float32, ``torch.inference_mode``, a fixed
thread count, timm and ours interleaved round by round (so the machine's load hits both
alike), best-of-``--reps`` per round and the median over rounds. Prints a table and writes
``benchmarks/cpu_<tag>.json``.

    python benchmarks/bench_cpu.py --threads 2 --batch 4 --rounds 5
    python benchmarks/bench_cpu.py --models efficientvit_m5 --profile   # op table of ours
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import timm
import torch

import visionattn
import visionattn.convert

# timm name -> input resolution (each model's default)
MODELS = {
    "maxvit_tiny_tf_224": 224,
    "halonet50ts": 256,
    "halonet26t": 256,
    "efficientvit_m5": 224,
    "efficientvit_m0": 224,
    "focalnet_tiny_srf": 224,
    "focalnet_tiny_lrf": 224,
}


def _pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ref = timm.create_model(name).eval()
    ours = visionattn.convert.from_timm(name, ref.state_dict()).eval()
    return ref, ours


def _once(model: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_pair(
    ref: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor, rounds: int, reps: int
) -> dict[str, Any]:
    """Interleaved timing; returns img/s of both and the per-round speedups."""
    t_ref, t_ours = [], []
    with torch.inference_mode():
        diff = (ref(x) - ours(x)).abs().max().item()  # also the warm-up
        ours(x)
        for r in range(rounds):
            # alternate which model goes first so neither always runs on a warmer cache
            first, second = (ref, ours) if r % 2 == 0 else (ours, ref)
            a, b = _once(first, x, reps), _once(second, x, reps)
            t_ref.append(a if first is ref else b)
            t_ours.append(b if first is ref else a)
    bsz = x.shape[0]
    ratios = sorted(a / b for a, b in zip(t_ref, t_ours))
    return dict(
        timm_img_s=bsz / statistics.median(t_ref),
        ours_img_s=bsz / statistics.median(t_ours),
        speedup=statistics.median(t_ref) / statistics.median(t_ours),
        speedup_min_round=ratios[0],
        speedup_max_round=ratios[-1],
        fp32_max_abs=diff,
    )


def profile_ours(model: torch.nn.Module, x: torch.Tensor, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), help="timm model names")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2, help="best-of per round")
    ap.add_argument("--profile", action="store_true", help="print ours' op table, no timing")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/cpu_<tag>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    try:  # the model name, where Linux tells it
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load_before = os.getloadavg()
    path = Path(args.out or Path(__file__).parent / f"cpu_{platform.machine()}.json")
    record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    record["env"] = dict(
        cpu=cpu,
        cores=os.cpu_count(),
        batch=args.batch,
        torch=torch.__version__,
        timm=timm.__version__,
        visionattn=visionattn.__version__,
        python=platform.python_version(),
        precision="fp32, inference_mode",
    )
    # one table per thread count
    results = record.setdefault("results", {}).setdefault(f"threads_{args.threads}", {})
    results.clear()
    record.setdefault("load_avg_1min_at_start", {})[f"threads_{args.threads}"] = round(
        load_before[0], 2
    )
    rows = []
    for name in args.models:
        res = MODELS.get(name) or int(timm.models.get_pretrained_cfg(name).input_size[-1])
        ref, ours = _pair(name)
        x = torch.randn(args.batch, 3, res, res)
        if args.profile:
            print(f"== {name} (ours)")
            profile_ours(ours, x, 30)
            print(f"== {name} (timm)")
            profile_ours(ref, x, 30)
            continue
        r = bench_pair(ref, ours, x, args.rounds, args.reps)
        results[name] = dict(res=res, rounds=args.rounds, **r)
        # other jobs on a shared machine skew single rounds: the load says how busy it was
        results[name]["load_avg_1min"] = round(os.getloadavg()[0], 2)
        row = (
            f"{name:20s} {res:4d} | {r['timm_img_s']:8.2f} {r['ours_img_s']:8.2f} | "
            f"x{r['speedup']:.2f} [{r['speedup_min_round']:.2f}-{r['speedup_max_round']:.2f}] | "
            f"{r['fp32_max_abs']:.1e}"
        )
        rows.append(row)
        print(row, flush=True)
    if args.profile:
        return
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{cpu}, {args.threads} threads, batch {args.batch}, torch {torch.__version__}")
    print("model                 res | timm img/s ours img/s | speedup [round range] | max diff")
    print("\n".join(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

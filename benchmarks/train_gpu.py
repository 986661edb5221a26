"""Training throughput of ``visionattn train`` on one GPU and under ``accelerate launch`` on two.

Runs the same short recipe twice: once as a single process on GPU 0, once as two processes
(``accelerate launch --multi_gpu --num_processes 2 -m visionattn.train``, DDP by accelerate),
each GPU with the same per-device batch. Data: the embedded digits upscaled to 224 px and
visited ``--repeats`` times per epoch (so the numbers measure the model, loader and DDP, not
disk I/O). Reported img/s is the steady-state training rate: the mean of the step-log rates
after the first epoch (which carries Triton JIT compilation and autotuning).

Usage on the lent 2-GPU machine (writes ``train_<gpu>.json`` and ``.md`` into --out-dir and
$OUT):

    source tools/gpu_env.sh; python3 benchmarks/train_gpu.py --model nat_mini
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _common_args(a: argparse.Namespace, run_dir: Path, name: str) -> list[str]:
    return [
        "--recipe",
        a.recipe,
        "--model",
        a.model,
        "--set",
        "data_dir=null",
        "--digits-size",
        str(a.img_size),
        "--img-size",
        str(a.img_size),
        "--epoch-repeats",
        str(a.repeats),
        "--epochs",
        str(a.epochs),
        "--warmup-epochs",
        "1",
        "--cooldown-epochs",
        "0",
        "--batch-size",
        str(a.batch_size),
        "--amp",
        "bf16",
        "--workers",
        str(a.workers),
        "--lr",
        str(a.lr),
        "--hflip",
        "0",
        "--color-jitter",
        "0",
        "--scale",
        "0.35",
        "1.0",
        "--aa",
        "none",
        "--reprob",
        "0",
        "--crop-pct",
        "1.0",
        "--log-every",
        "10",
        "--val-batch-size",
        "256",
        "--no-progress",
        "--output",
        str(run_dir),
        "--run-name",
        name,
    ]


def _run(cmd: list[str], env: dict[str, str], timeout: int, log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(
                cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def _steady(steps: list[dict]) -> float | None:
    """Mean step-log img/s after epoch 1, leaving out intervals that span an epoch end.

    (Runs from before the trainer restarted its interval clock each epoch timed the
    validation and checkpoint writes into the first interval of the next epoch.)
    """
    rates = []
    for i, s in enumerate(steps):
        prev = steps[i - 1]["epoch"] if i else 0.0
        if s["epoch"] > 1.0 + 1e-9 and abs(prev - round(prev)) > 1e-9:
            rates.append(s["img_per_s"])
    return statistics.mean(rates) if rates else None


def _summary(metrics: Path, processes: int, batch: int, wall: float, rc: int) -> dict:
    out: dict = {"processes": processes, "per_device_batch": batch, "wall_s": wall, "rc": rc}
    if not metrics.is_file():
        return out
    m = json.loads(metrics.read_text())
    out.update(
        global_batch=batch * processes,
        steady_img_per_s=_steady(m["steps"]),
        epoch_img_per_s=[e["train_img_per_s"] for e in m["epochs"]],
        final_top1=m["epochs"][-1].get("top1") if m["epochs"] else None,
        final_train_loss=m["epochs"][-1].get("train_loss") if m["epochs"] else None,
        env=m.get("env"),
    )
    return out


def _write_report(
    a: argparse.Namespace, gpu: str, tag: str, results: dict, dests: list[Path]
) -> bool:
    """Write ``train_<tag>.json`` and ``.md`` into every folder of ``dests``."""
    r1, r2 = results["1gpu"].get("steady_img_per_s"), results["2gpu"].get("steady_img_per_s")
    report = {
        "model": a.model,
        "gpu": gpu,
        "settings": {
            "recipe": a.recipe,
            "img_size": a.img_size,
            "per_device_batch": a.batch_size,
            "epochs": a.epochs,
            "epoch_repeats": a.repeats,
            "amp": "bf16",
            "lr": a.lr,
            "workers_per_process": a.workers,
            "data": "embedded digits upscaled, RandomResizedCrop + mixup/cutmix, no RandAugment",
        },
        "runs": results,
        "scaling_efficiency": (r2 / (2 * r1)) if r1 and r2 else None,
    }
    lines = [
        f"# `visionattn train` throughput: {a.model} on {gpu}",
        "",
        f"Steady-state training img/s (after epoch 1), bf16, {a.img_size} px, per-GPU batch "
        f"{a.batch_size}, {a.recipe} recipe (mixup/cutmix, label smoothing, clip 5.0).",
        "",
        "| run | processes | global batch | train img/s | final val top-1 | wall (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in (("1gpu", "python -m visionattn.train"), ("2gpu", "accelerate launch")):
        r = results[key]
        ips = r.get("steady_img_per_s")
        top1 = r.get("final_top1")
        lines.append(
            f"| {label} | {r['processes']} | {r.get('global_batch', '-')} | "
            f"{f'{ips:.0f}' if ips else 'failed'} | {f'{top1:.1f}%' if top1 is not None else '-'} "
            f"| {r['wall_s']:.0f} |"
        )
    if report["scaling_efficiency"]:
        lines += ["", f"2-GPU scaling efficiency: {100 * report['scaling_efficiency']:.0f}%"]
    text = "\n".join(lines) + "\n"
    print(text)
    for d in dests:
        d.mkdir(parents=True, exist_ok=True)
        (d / f"train_{tag}.json").write_text(json.dumps(report, indent=2))
        (d / f"train_{tag}.md").write_text(text)
    return bool(r1 and r2)


def _resummarize(path: Path, out_dir: Path) -> int:
    """Rebuild a report from a previous one and the metrics files saved beside it."""
    prev = json.loads(path.read_text())
    tag = path.stem.removeprefix("train_")
    st = prev["settings"]
    a = argparse.Namespace(
        model=prev["model"],
        recipe=st["recipe"],
        img_size=st["img_size"],
        batch_size=st["per_device_batch"],
        epochs=st["epochs"],
        repeats=st["epoch_repeats"],
        lr=st["lr"],
        workers=st["workers_per_process"],
    )
    results = {}
    for key, n in (("1gpu", 1), ("2gpu", 2)):
        r = prev["runs"][key]
        metrics = path.parent / f"train_{tag}_gpu{n}_metrics.json"
        results[key] = _summary(metrics, n, a.batch_size, r["wall_s"], r["rc"])
    return 0 if _write_report(a, prev["gpu"], tag, results, [out_dir]) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="nat_mini")
    p.add_argument("--recipe", default="nat")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--workers", type=int, default=7)
    p.add_argument("--lr", type=float, default=1e-3, help="same absolute lr for both runs")
    p.add_argument("--timeout", type=int, default=150, help="seconds per run")
    p.add_argument("--out-dir", default="benchmarks")
    p.add_argument("--work-dir", default="/tmp/va_train_gpu")
    p.add_argument("--summarize", default=None, help="rebuild the report of a previous run")
    a = p.parse_args()
    if a.summarize:
        return _resummarize(Path(a.summarize), Path(a.out_dir))

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    tag = (
        gpu.lower().replace("nvidia", "").strip().split()[0] if torch.cuda.is_available() else "cpu"
    )
    work = Path(a.work_dir)  # checkpoints stay here; only logs and metrics are copied out
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")

    results = {}
    one = [sys.executable, "-m", "visionattn.train", *_common_args(a, work, "gpu1")]
    rc, wall = _run(one, {**env, "CUDA_VISIBLE_DEVICES": "0"}, a.timeout, work / "gpu1.log")
    results["1gpu"] = _summary(work / "gpu1" / "metrics.json", 1, a.batch_size, wall, rc)
    print("1 GPU:", json.dumps(results["1gpu"]), flush=True)

    two = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16",
        "--dynamo_backend",
        "no",
        "-m",
        "visionattn.train",
        *_common_args(a, work, "gpu2"),
    ]
    rc, wall = _run(two, {**env, "CUDA_VISIBLE_DEVICES": "0,1"}, a.timeout, work / "gpu2.log")
    results["2gpu"] = _summary(work / "gpu2" / "metrics.json", 2, a.batch_size, wall, rc)
    print("2 GPUs:", json.dumps(results["2gpu"]), flush=True)

    dests = [Path(a.out_dir)] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    ok = _write_report(a, gpu, tag, results, dests)
    for d in dests:
        for name in ("gpu1", "gpu2"):
            (d / f"train_{tag}_{name}.log").write_bytes((work / f"{name}.log").read_bytes())
            for f in ("metrics.json", "curves.png"):
                if (work / name / f).is_file():
                    (d / f"train_{tag}_{name}_{f}").write_bytes((work / name / f).read_bytes())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

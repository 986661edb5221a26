"""Throughput of visionattn's MaxViT / HaloNet beside timm's own models, in one process.

GPU (default): bf16 autocast, eager; inference img/s at batch 256 and training img/s (forward,
backward, SGD step) at batch 128, with peak memory; a float32 fidelity check of each pair
(random weights converted from timm's model) on the GPU kernels first. CPU (``--device cpu``):
float32 inference at a small batch, timm and ours interleaved. Results are printed as a table
and merged into ``benchmarks/maxvit_halonet_<device>.json``.

    python benchmarks/bench_maxvit_halonet.py                      # GPU
    python benchmarks/bench_maxvit_halonet.py --device cpu --batch-infer 8
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any

import timm
import torch

import visionattn
import visionattn.convert

PAIRS = {
    "maxvit_tiny_tf_224": 224,
    "halonet50ts": 256,
    "halonet26t": 256,
    "sehalonet33ts": 256,
    "maxvit_small_tf_224": 224,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _pair(name: str, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ref = timm.create_model(name)
    ours = visionattn.convert.from_timm(name, ref.state_dict())
    return ref.to(device), ours.to(device)


def _randomize(model: torch.nn.Module) -> None:
    """Random BN statistics, small residual-branch gains and random rel-pos tables, so every
    branch (attention included) shapes the logits while float32 stays well-conditioned; timm's
    zero-init would leave near-constant logits that hide differences."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                lo, hi = (0.1, 0.3) if "conv3_1x1" in name else (0.5, 1.0)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * (hi - lo) + lo)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))


def fidelity(name: str, res: int, device: torch.device) -> dict[str, Any]:
    """Same weights in both models: float32 logits (TF32 off), bf16-autocast logits, and
    float32 training-mode gradients (global and worst per-parameter relative error)."""
    torch.manual_seed(0)
    ref = timm.create_model(name)
    _randomize(ref)
    ours = visionattn.convert.from_timm(name, ref.state_dict())
    ref, ours = ref.to(device).eval(), ours.to(device).eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    x = torch.randn(4, 3, res, res, device=device)
    out: dict[str, Any] = {}
    try:
        with torch.no_grad():
            a = ref(x)
            out["fp32_max_abs"] = (a - ours(x)).abs().max().item()
            out["fp32_logit_scale"] = a.abs().max().item()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                a, b = ref(x).float(), ours(x).float()
            out["bf16_max_abs"] = (a - b).abs().max().item()
        ref.train(), ours.train()
        ref(x).square().mean().backward()
        ours(x).square().mean().backward()
        ref_p = dict(ref.named_parameters())
        num = den = 0.0
        per = []
        for n, p in ours.named_parameters():
            d, r = (p.grad - ref_p[n].grad).norm().item(), ref_p[n].grad.norm().item()
            num, den = num + d * d, den + r * r
            per.append((d / max(r, 1e-30), r, n))
        big = max(r for _, r, _ in per)
        per = sorted((e, n) for e, r, n in per if r > 1e-4 * big)  # ignore ~zero gradients
        out["fp32_grad_rel_err"] = (num / max(den, 1e-30)) ** 0.5
        out["fp32_grad_worst"] = [(n, e) for e, n in per[-3:]]
        # pass: the whole gradient within 1e-3 and every non-negligible tensor within 1e-2
        # (fp32 accumulation orders differ: atomics in the kernels, cuBLAS vs Triton dots)
        out["fp32_grad_ok"] = out["fp32_grad_rel_err"] <= 1e-3 and (not per or per[-1][0] <= 1e-2)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return out


def _bench_infer(model: torch.nn.Module, x: torch.Tensor, iters: int) -> dict[str, float]:
    model.eval()

    def step() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    step()  # first call: cuDNN autotuning's trial workspaces are not the model's footprint
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = _time(step, x.device, 3, iters)
    return dict(
        infer_img_s=x.shape[0] / statistics.median(t),
        infer_peak_gb=torch.cuda.max_memory_allocated() / 2**30,
    )


def _bench_train(model: torch.nn.Module, x: torch.Tensor, iters: int) -> dict[str, float]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    y = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # as in _bench_infer: steady-state peak, without autotuning workspaces
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = _time(step, x.device, 3, iters)
    return dict(
        train_img_s=x.shape[0] / statistics.median(t),
        train_peak_gb=torch.cuda.max_memory_allocated() / 2**30,
    )


def bench_gpu(
    model: torch.nn.Module, res: int, bi: int, bt: int, device: torch.device, iters: int
) -> dict[str, Any]:
    """bf16-autocast inference (batch ``bi``) and training (batch ``bt``) img/s + peak GiB."""
    out = _bench_infer(model, torch.randn(bi, 3, res, res, device=device), iters)
    torch.cuda.empty_cache()
    out.update(_bench_train(model, torch.randn(bt, 3, res, res, device=device), iters))
    torch.cuda.empty_cache()
    return out


def bench_cpu(
    ref: torch.nn.Module, ours: torch.nn.Module, res: int, batch: int, rounds: int
) -> dict[str, Any]:
    ref.eval(), ours.eval()
    x = torch.randn(batch, 3, res, res)
    t_ref, t_ours = [], []
    with torch.no_grad():
        ref(x), ours(x)  # warm-up
        for _ in range(rounds):  # interleaved: the machine's load hits both alike
            t0 = time.perf_counter()
            ref(x)
            t_ref.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ours(x)
            t_ours.append(time.perf_counter() - t0)
    return {
        "timm_img_s": batch / statistics.median(t_ref),
        "ours_img_s": batch / statistics.median(t_ours),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--models", nargs="*", default=list(PAIRS), help="timm model names")
    ap.add_argument("--batch-infer", type=int, default=256)
    ap.add_argument("--batch-train", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/maxvit_halonet_<dev>.json)"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name()
        tag = (re.search(r"[A-Z]\d{2,3}", dev_name) or re.search(r"\w+", dev_name)).group(0).lower()
        torch.backends.cudnn.benchmark = True
    else:
        dev_name, tag = platform.processor() or platform.machine(), "cpu"
    path = Path(args.out or Path(__file__).parent / f"maxvit_halonet_{tag}.json")
    record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    record["env" if device.type == "cuda" else "env_cpu"] = dict(
        device=dev_name,
        torch=torch.__version__,
        timm=timm.__version__,
        visionattn=visionattn.__version__,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
    )
    results = record.setdefault("results", {})
    rows = []
    for name in args.models:
        res = PAIRS.get(name) or int(timm.models.get_pretrained_cfg(name).input_size[-1])
        try:
            row, entry = _run_one(name, res, device, args)
        except Exception as e:  # keep going: one model's failure must not cost the others
            import traceback

            traceback.print_exc()
            row, entry = f"{name}: FAILED {type(e).__name__}: {e}", {"error": repr(e)}
        rows.append(row)
        results.setdefault(name, {}).update(entry)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(row, flush=True)
    print(f"\n{dev_name}  torch {torch.__version__}  timm {timm.__version__}")
    print("model                   res | infer img/s timm ours | train img/s timm ours | ...")
    print("\n".join(rows))
    print(f"wrote {path}")


def _run_one(
    name: str, res: int, device: torch.device, args: argparse.Namespace
) -> tuple[str, dict[str, Any]]:
    """Benchmark one timm model and its visionattn twin; returns (table row, JSON entry)."""
    if device.type == "cpu":
        ref, ours = _pair(name, device)
        r = bench_cpu(ref, ours, res, args.batch_infer, max(3, args.iters))
        entry = dict(res=res, batch=args.batch_infer, precision="fp32", **r)
        entry["speedup"] = r["ours_img_s"] / r["timm_img_s"]
        row = (
            f"{name:22s} {res:4d} | cpu infer timm {r['timm_img_s']:7.2f} ours "
            f"{r['ours_img_s']:7.2f} img/s x{entry['speedup']:.2f}"
        )
        return row, {"cpu": dict(entry, threads=torch.get_num_threads())}
    fid = fidelity(name, res, device)
    ref, ours = _pair(name, device)
    r_ref = bench_gpu(ref, res, args.batch_infer, args.batch_train, device, args.iters)
    del ref
    torch.cuda.empty_cache()
    r_ours = bench_gpu(ours, res, args.batch_infer, args.batch_train, device, args.iters)
    del ours
    torch.cuda.empty_cache()
    entry = dict(
        res=res, batch_infer=args.batch_infer, batch_train=args.batch_train,
        precision="bf16 autocast", mode="eager", timm=r_ref, ours=r_ours, fidelity=fid,
        speedup_infer=r_ours["infer_img_s"] / r_ref["infer_img_s"],
        speedup_train=r_ours["train_img_s"] / r_ref["train_img_s"],
    )  # fmt: skip
    row = (
        f"{name:22s} {res:4d} | infer {r_ref['infer_img_s']:8.0f} {r_ours['infer_img_s']:8.0f} "
        f"x{entry['speedup_infer']:.2f} | train {r_ref['train_img_s']:7.0f} "
        f"{r_ours['train_img_s']:7.0f} x{entry['speedup_train']:.2f} | mem(train) "
        f"{r_ref['train_peak_gb']:5.1f} {r_ours['train_peak_gb']:5.1f} GB | "
        f"fp32 diff {fid['fp32_max_abs']:.1e} grad rel {fid['fp32_grad_rel_err']:.1e} "
        f"{'ok' if fid['fp32_grad_ok'] else 'FAIL ' + str(fid['fp32_grad_worst'])}"
    )
    return row, entry


if __name__ == "__main__":
    main()

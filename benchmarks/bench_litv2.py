"""LITv2 throughput: ours beside the official implementation, one process, one GPU.

Inference (batch 256, eval, ``no_grad``) and training (batch 128, forward + cross-entropy +
backward + AdamW step) images/s at 224 px under bf16 autocast, eager mode (the method of
``bench_nat.py``). Compared:

* ``ours``: ``timm.create_model(name)`` after ``import visionattn`` (Hi-Fi windows on the
  Triton ``na2d``, Lo-Fi on SDPA, norms on the Triton ``layer_norm``, DTM as ``grid_sample``
  + conv, the default ``deform_impl="sample"``);
* ``ours_tv``: the same with ``deform_impl="torchvision"`` (DTM on
  ``torchvision.ops.deform_conv2d`` in float32);
* ``official``: ziplab/LITv2 ``classification/models`` (expected under
  ``.gpu/third_party/litv2/classification``, not part of this repository). Its DCN is a CUDA
  extension we do not build: the official ``DeformConv2dFunction`` is replaced at import time
  by ``torchvision.ops.deform_conv2d`` (same function: the parity vector's ``dcn_check``), and
  ``apex.amp.float_function`` by the identity (torchvision's deform conv runs in float32 under
  autocast, as the decorator made the official one).

Before timing, the official model (random weights, perturbed) is converted with
``from_official`` and both are compared in float32 (TF32 off). ``--profile`` adds the top CUDA
kernels of one training step of each implementation.

    source tools/gpu_env.sh; python3 benchmarks/bench_litv2.py --profile

Prints a table; writes ``litv2_<gpu>.json`` into ``--out-dir`` and $OUT.
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
from pathlib import Path

import timm
import torch
from torch import nn

import visionattn  # noqa: F401  (registers our models)
from visionattn.backbones import litv2

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_DIR = REPO / ".gpu" / "third_party" / "litv2" / "classification"


class _TorchvisionDeformConv2dFunction:
    """Stand-in for the official ``DeformConv2dFunction`` (CUDA extension ``DCN``):
    ``torchvision.ops.deform_conv2d``, differentiable through torchvision's own backward."""

    @staticmethod
    def apply(input, offset, weight, bias, stride, padding, dilation, groups, dgroups, _step):
        from torchvision.ops import deform_conv2d

        if groups != 1 or dgroups != 1:
            raise NotImplementedError("stand-in covers groups = deformable_groups = 1 (DTM)")
        dev = input.device.type
        # apex's float_function: the official op runs on float32 inputs, autocast off
        with torch.autocast(dev, enabled=False):
            return deform_conv2d(
                input.float(), offset.float(), weight.float(), bias.float(),
                stride=stride, padding=padding, dilation=dilation,
            )  # fmt: skip


def official_class() -> type[nn.Module]:
    """The official ``LITv2`` class with the DCN / apex stand-ins installed."""
    if not (OFFICIAL_DIR / "models" / "litv2.py").is_file():
        raise FileNotFoundError(f"official code not found at {OFFICIAL_DIR}")
    sys.modules.setdefault("DCN", types.ModuleType("DCN"))  # never called: apply is replaced
    apex = types.ModuleType("apex")
    apex.amp = types.SimpleNamespace(float_function=lambda fn: fn)
    sys.modules.setdefault("apex", apex)
    if str(OFFICIAL_DIR) not in sys.path:
        sys.path.insert(0, str(OFFICIAL_DIR))
    import mm_modules.DCN.modules.deform_conv2d as dcn_module
    from models.litv2 import LITv2

    dcn_module.DeformConv2dFunction = _TorchvisionDeformConv2dFunction
    return LITv2


def build(impl: str, name: str) -> nn.Module:
    if impl == "ours":
        return timm.create_model(name)
    if impl == "ours_tv":
        return timm.create_model(name, deform_impl="torchvision")
    if impl == "official":
        return official_class()(num_classes=1000, **litv2.OFFICIAL_VARIANTS[name])
    raise ValueError(f"impl: unknown {impl!r}")


def agreement(name: str, device: torch.device) -> dict:
    """Official model (perturbed random weights) vs ours from ``from_official``: max |diff| of
    float32 logits (TF32 off) for both DTM implementations; bf16-autocast logits of each (and of
    the official model) against the official float32 logits."""
    torch.manual_seed(0)
    off = build("official", name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in off.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    ours = litv2.from_official(off.state_dict(), variant=name)
    off, ours = off.to(device).eval(), ours.to(device).eval()
    x = torch.randn(4, 3, 224, 224, generator=g).to(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    res: dict = {}
    try:
        with torch.no_grad():
            ref = off(x)
            res["max_abs_logit"] = ref.abs().max().item()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                ref16 = off(x).float()
            res["official_bf16_max_abs_diff_vs_fp32"] = (ref16 - ref).abs().max().item()
            for impl in ("torchvision", "sample"):
                for m in ours.modules():
                    if isinstance(m, litv2.DeformConv2x2):
                        m.impl = impl
                res[f"fp32_max_abs_diff_{impl}"] = (ours(x) - ref).abs().max().item()
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    ours16 = ours(x).float()
                res[f"bf16_max_abs_diff_vs_fp32_{impl}"] = (ours16 - ref).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return res


def _timed(fn, iters: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` (mean over ``iters``, synchronized)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def _closures(model: nn.Module, args: argparse.Namespace, device: torch.device):
    amp = dict(device_type=device.type, dtype=torch.bfloat16)
    size = (3, args.img_size, args.img_size)
    x = torch.randn(args.infer_batch, *size, device=device)
    xt = torch.randn(args.train_batch, *size, device=device)
    target = torch.randint(0, 1000, (args.train_batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def infer() -> None:
        # no_grad, not inference_mode: na2d caches index tables that training saves later
        with torch.no_grad(), torch.autocast(**amp):
            model(x)

    def step() -> None:
        with torch.autocast(**amp):
            loss = loss_fn(model(xt), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return infer, step


def bench_one(impl: str, name: str, args: argparse.Namespace, device: torch.device) -> dict:
    res: dict = dict(impl=impl, model=name)
    model = build(impl, name).to(device)
    res["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    infer, step = _closures(model, args, device)
    model.eval()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        infer()
    res["infer_warmup_s"] = round(time.perf_counter() - t0, 1)
    res["infer_img_s"] = round(args.infer_batch / _timed(infer, args.iters, device), 1)
    model.train()
    t1 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    res["train_warmup_s"] = round(time.perf_counter() - t1, 1)
    res["train_img_s"] = round(args.train_batch / _timed(step, args.iters, device), 1)
    if device.type == "cuda":
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    return res


def profile(impl: str, name: str, args: argparse.Namespace, device: torch.device) -> str:
    """Top CUDA kernels (self time) of two training steps and two inference calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    model = build(impl, name).to(device).train()
    infer, step = _closures(model, args, device)
    step()
    model.eval()
    infer()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = []
    for label, fn, train in (("train step", step, True), ("inference", infer, False)):
        model.train(train)
        with tprofile(activities=acts) as prof:
            for _ in range(2):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows)
        out.append(f"== {impl} {name}: {label} x2\n{table}")
    return "\n".join(out)


def _write(out_dir: str, gpu: str, payload: dict) -> None:
    slug = gpu.split()[1].lower() if gpu.startswith("NVIDIA ") else gpu.replace(" ", "_").lower()
    for d in {out_dir, os.environ.get("OUT")} - {None, ""}:
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / f"litv2_{slug}.json").write_text(json.dumps(payload, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--runs",
        default="official:litv2_small,ours:litv2_small,ours_tv:litv2_small",
        help="comma-separated impl:model entries (impl: ours, ours_tv, official)",
    )
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best kept")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-rows", type=int, default=22)
    ap.add_argument("--budget-s", type=float, default=300.0, help="skip entries past this")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    commit = os.environ.get("VISIONATTN_COMMIT")  # the lent GPU's copy has stale git metadata
    try:
        commit = commit or subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False,
        ).stdout.strip() or None  # fmt: skip
    except OSError:
        commit = None
    import torchvision

    env = dict(
        device=gpu,
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        timm=timm.__version__,
        triton=getattr(sys.modules.get("triton"), "__version__", None),
        commit=commit,
        img_size=args.img_size,
        infer_batch=args.infer_batch,
        train_batch=args.train_batch,
        precision="bf16 autocast, fp32 weights, eager, TF32 on",
        warmup=args.warmup,
        iters=args.iters,
        rounds=args.rounds,
        official="ziplab/LITv2 @ 7501c86, DCN -> torchvision.ops.deform_conv2d",
    )
    payload: dict = dict(env=env, agreement={}, results=[])
    start = time.perf_counter()
    entries = [tuple(e.split(":")) for e in args.runs.split(",")]
    for name in sorted({n for _, n in entries}):
        try:
            payload["agreement"][name] = agreement(name, device)
        except Exception as e:
            traceback.print_exc()
            payload["agreement"][name] = dict(error=f"{type(e).__name__}: {e}"[:500])
        print("agreement", name, json.dumps(payload["agreement"][name]), flush=True)
    best: dict[tuple[str, str], dict] = {}
    for rnd in range(args.rounds):
        for impl, name in entries:
            if time.perf_counter() - start > args.budget_s:
                best.setdefault((impl, name), dict(impl=impl, model=name, error="skipped: budget"))
                continue
            try:
                r = bench_one(impl, name, args, device)
            except Exception as e:
                traceback.print_exc()
                r = dict(impl=impl, model=name, error=f"{type(e).__name__}: {e}"[:500])
            print(f"round {rnd}", json.dumps(r), flush=True)
            prev = best.get((impl, name))
            if prev is None or "error" in prev:
                best[(impl, name)] = r
            elif "error" not in r:
                for key in ("infer_img_s", "train_img_s"):
                    prev[key] = max(prev[key], r[key])
            if device.type == "cuda":
                torch.cuda.empty_cache()
        payload["results"] = list(best.values())
        _write(args.out_dir, gpu, payload)
    ref = best.get(("official", entries[0][1]), {})
    for r in payload["results"]:
        if "error" not in r and "error" not in ref and ref and r["impl"] != "official":
            r["infer_speedup_vs_official"] = round(r["infer_img_s"] / ref["infer_img_s"], 3)
            r["train_speedup_vs_official"] = round(r["train_img_s"] / ref["train_img_s"], 3)
    if args.profile:
        payload["profile"] = {}
        for impl in dict.fromkeys(i for i, _ in entries):
            name = next(n for i, n in entries if i == impl)
            try:
                text = profile(impl, name, args, device)
            except Exception as e:
                traceback.print_exc()
                text = f"{type(e).__name__}: {e}"
            payload["profile"][f"{impl}:{name}"] = text
            print(text, flush=True)
    _write(args.out_dir, gpu, payload)

    print(f"\n{gpu} | torch {env['torch']} | torchvision {env['torchvision']} | {env['precision']}")
    hdr = (
        f"{'impl':12} {'model':14} {'infer img/s':>12} {'train img/s':>12} "
        f"{'x infer':>8} {'x train':>8} {'mem GiB':>8}"
    )
    print(hdr + "\n" + "-" * len(hdr))
    for r in payload["results"]:
        if "error" in r:
            print(f"{r['impl']:12} {r['model']:14} {r['error'][:70]}")
        else:
            print(
                f"{r['impl']:12} {r['model']:14} {r['infer_img_s']:>12} {r['train_img_s']:>12} "
                f"{r.get('infer_speedup_vs_official', '-'):>8} "
                f"{r.get('train_speedup_vs_official', '-'):>8} {r.get('peak_mem_gib', '-'):>8}"
            )


if __name__ == "__main__":
    main()

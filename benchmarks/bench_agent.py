"""Agent-attention families' throughput: ours beside the official implementation, one GPU.

Inference (batch 256, eval, ``no_grad``) and training (batch 128, forward + cross-entropy +
backward + AdamW step) images/s under bf16 autocast, eager mode (the method of
``bench_nat.py``). Compared:

* ``ours``: ``timm.create_model(name)`` after ``import visionattn``;
* ``official``: LeapLabTHU/Agent-Attention ``agent_transformer/models/<file>.py`` (expected
  under ``.gpu/third_party/agent_attention/``, not part of this repository), imported as a
  package without its ``__init__`` (which imports every model through ``build.py``); its
  ``@register_model`` is made the identity so it cannot replace registry entries.

Families are rows of ``OFFICIAL``: the official file and how to build a variant from the
official constructor kwargs our family module records (``OFFICIAL_VARIANTS``). Before timing,
each official model (random init, perturbed) is converted with ``from_official`` and the two
are compared in float32 (TF32 off). ``--profile`` adds the top CUDA kernels of one training
step of each implementation.

    source tools/gpu_env.sh; python3 benchmarks/bench_agent.py --profile

Prints a table; writes ``agent_<gpu>.json`` into ``--out-dir`` and $OUT.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import visionattn  # noqa: F401  (registers our models)
from visionattn import convert

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_DIR = REPO / ".gpu" / "third_party" / "agent_attention"
_PKG = "_agent_official"


def _official_module(file: str) -> types.ModuleType:
    """``agent_transformer/models/<file>.py`` as ``_agent_official.<file>`` (relative imports
    such as agent_deit's ``from .deit import Block`` resolve inside the package)."""
    if not (OFFICIAL_DIR / f"{file}.py").is_file():
        raise FileNotFoundError(f"official code not found at {OFFICIAL_DIR / file}.py")
    import timm.models.registry as timm_registry

    timm_registry.register_model = lambda fn: fn
    if _PKG not in sys.modules:
        pkg = types.ModuleType(_PKG)
        pkg.__path__ = [str(OFFICIAL_DIR)]
        sys.modules[_PKG] = pkg
    return importlib.import_module(f"{_PKG}.{file}")


def _family_variants(family: str) -> dict[str, dict[str, Any]]:
    return importlib.import_module(f"visionattn.backbones.{family}").OFFICIAL_VARIANTS


def _swin(name: str) -> nn.Module:
    mod = _official_module("agent_swin")
    return mod.AgentSwinTransformer(**_family_variants("agent_swin")[name])


def _pvt(name: str) -> nn.Module:
    mod = _official_module("agent_pvt")
    kw = dict(_family_variants("agent_pvt")[name])
    # the official factory supplies the architecture; build.py passes these from the config
    keep = ("img_size", "drop_path_rate", "agent_num", "attn_type", "agent_sr_ratios")
    return getattr(mod, name.removesuffix("_256"))(**{k: kw[k] for k in keep})


def _deit(name: str) -> nn.Module:
    mod = _official_module("agent_deit")
    return mod.VisionTransformer(**_family_variants("agent_deit")[name])


class _Rearrange(nn.Module):
    """Stand-in for einops' ``Rearrange`` (not in the GPU image) for the one pattern the
    official agent_cswin stem uses."""

    def __init__(self, pattern: str, **sizes: int) -> None:
        super().__init__()
        if pattern != "b c h w -> b (h w) c":
            raise ValueError(f"pattern: only 'b c h w -> b (h w) c' is emulated, got {pattern!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def _cswin(name: str) -> nn.Module:
    try:
        import einops.layers.torch  # noqa: F401
    except ImportError:
        shim = types.ModuleType("einops.layers.torch")
        shim.Rearrange = _Rearrange
        for mod_name in ("einops", "einops.layers"):
            sys.modules.setdefault(mod_name, types.ModuleType(mod_name))
        sys.modules["einops.layers.torch"] = shim
    mod = _official_module("agent_cswin")
    return mod.CSWinTransformer(**_family_variants("agent_cswin")[name])


# family -> (official builder from our registered variant name, family name for from_official)
OFFICIAL: dict[str, tuple[Callable[[str], nn.Module], str]] = {
    "agent_swin": (_swin, "agent_swin"),
    "agent_pvt": (_pvt, "agent_pvt"),
    "agent_deit": (_deit, "agent_deit"),
    "agent_cswin": (_cswin, "agent_cswin"),
}


def _family_of(name: str) -> str:
    for fam in sorted(OFFICIAL, key=len, reverse=True):
        if name.startswith(fam + "_"):
            return fam
    raise ValueError(f"model: no OFFICIAL row for {name!r} (known: {sorted(OFFICIAL)})")


def build(impl: str, name: str) -> nn.Module:
    if impl == "ours":
        return timm.create_model(name)
    if impl == "official":
        return OFFICIAL[_family_of(name)][0](name)
    raise ValueError(f"impl: unknown {impl!r}")


def fidelity(name: str, device: torch.device) -> dict:
    """Max |ours - official| (float32, TF32 off) on a perturbed random official model."""
    builder, family = OFFICIAL[_family_of(name)]
    torch.manual_seed(0)
    off = builder(name).eval()
    with torch.no_grad():
        for p in off.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    official_kwargs = _family_variants(family)[name]
    ours = convert.from_official(family, off.state_dict(), official_kwargs)
    off, ours = off.to(device), ours.to(device)
    size = ours.pretrained_cfg["input_size"]
    x = torch.randn(2, *size, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            a, b = ours(x), off(x)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return dict(max_abs_diff=float((a - b).abs().max()), max_abs_ref=float(b.abs().max()))


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


def _top_kernels(fn, device: torch.device, k: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0), reverse=True)[:k]
    return [dict(name=e.key[:90], ms=round(getattr(e, attr, 0) / 1e3, 2), n=e.count) for e in rows]


def bench_one(impl: str, name: str, args: argparse.Namespace, device: torch.device) -> dict:
    res: dict = dict(impl=impl, model=name)
    model = build(impl, name).to(device)
    res["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    amp = dict(device_type=device.type, dtype=torch.bfloat16)
    img = args.img_size or timm.get_pretrained_cfg(name).input_size[-1]
    size = (3, img, img)

    model.eval()
    x = torch.randn(args.infer_batch, *size, device=device)

    def infer() -> None:
        with torch.no_grad(), torch.autocast(**amp):
            model(x)

    for _ in range(args.warmup):
        infer()
    res["infer_img_s"] = round(args.infer_batch / _timed(infer, args.iters, device), 1)
    if device.type == "cuda":
        res["infer_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()

    model.train()
    xt = torch.randn(args.train_batch, *size, device=device)
    target = torch.randint(0, 1000, (args.train_batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast(**amp):
            loss = loss_fn(model(xt), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    res["train_img_s"] = round(args.train_batch / _timed(step, args.iters, device), 1)
    if device.type == "cuda":
        res["train_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    if args.profile:
        res["train_top_kernels"] = _top_kernels(step, device)
        model.eval()
        res["infer_top_kernels"] = _top_kernels(infer, device)
    return res


def _best_of(rounds: list[list[dict]], runs: list[list[str]]) -> list[dict]:
    """Per (impl, model) of ``runs``: the first measured row, with the best inference and the
    best training rate over the rounds (each rate's round kept in ``*_round``)."""
    out = []
    for impl, name in dict.fromkeys(map(tuple, runs)):
        rows = [r for rr in rounds for r in rr if r["impl"] == impl and r["model"] == name]
        ok = [r for r in rows if "error" not in r]
        if not ok:
            out.extend(rows[:1])
            continue
        best = dict(ok[0])
        for key in ("infer_img_s", "train_img_s"):
            top = max(ok, key=lambda r: r[key])
            best[key], best[key.replace("img_s", "round")] = top[key], ok.index(top)
        out.append(best)
    return out


def _write(out_dir: str, gpu: str, payload: dict) -> None:
    """``agent_<gpu>.json`` into ``out_dir`` and $OUT (rewritten after every entry)."""
    slug = gpu.split()[1].lower() if gpu.startswith("NVIDIA ") else gpu.replace(" ", "_").lower()
    for d in {out_dir, os.environ.get("OUT")} - {None, ""}:
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / f"agent_{slug}.json").write_text(json.dumps(payload, indent=1))


def _commit() -> str | None:
    if os.environ.get("VISIONATTN_COMMIT"):  # the lent GPU's copy has stale git metadata
        return os.environ["VISIONATTN_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True)
        return out.stdout.decode().strip() or None
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--runs",
        default="ours:agent_pvt_tiny,official:agent_pvt_tiny,"
        "ours:agent_swin_tiny,official:agent_swin_tiny",
        help="comma-separated impl:model entries (impl: ours, official)",
    )
    ap.add_argument("--img-size", type=int, default=0, help="0: the model's pretrained_cfg size")
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best rate kept")
    ap.add_argument("--profile", action="store_true", help="top kernels of one step each")
    ap.add_argument("--no-fidelity", action="store_true")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip entries past this")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    env = dict(
        device=gpu,
        torch=torch.__version__,
        timm=timm.__version__,
        triton=getattr(sys.modules.get("triton"), "__version__", None),
        commit=_commit(),
        official="LeapLabTHU/Agent-Attention@207ce3eb357b22ef8a15f8fa21cd1f14697bbaba",
        infer_batch=args.infer_batch,
        train_batch=args.train_batch,
        precision="bf16 autocast, fp32 weights, eager",
        warmup=args.warmup,
        iters=args.iters,
        rounds=args.rounds,
    )
    results: list[dict] = []
    fid: dict[str, dict] = {}
    payload = dict(env=env, fidelity_fp32=fid, results=results)
    start = time.perf_counter()
    runs = [e.split(":") for e in args.runs.split(",")]
    if not args.no_fidelity:
        for name in dict.fromkeys(n for i, n in runs if i == "official"):
            try:
                fid[name] = fidelity(name, device)
            except Exception as e:
                traceback.print_exc()
                fid[name] = dict(error=f"{type(e).__name__}: {e}"[:300])
            print(name, "fidelity", json.dumps(fid[name]), flush=True)
    # Interleaved rounds, best rate of each kept: single timings of this script moved by up to
    # ~30% between calls (the official models' too), the best of rounds far less.
    rounds: list[list[dict]] = []
    payload["rounds"] = rounds
    for rnd in range(args.rounds):
        rounds.append([])
        for impl, name in runs:
            if time.perf_counter() - start > args.budget_s:
                rounds[-1].append(dict(impl=impl, model=name, error="skipped: time budget"))
                continue
            try:
                rounds[-1].append(bench_one(impl, name, args, device))
            except Exception as e:
                traceback.print_exc()
                err = f"{type(e).__name__}: {e}"[:500]
                rounds[-1].append(dict(impl=impl, model=name, error=err))
            row = {k: v for k, v in rounds[-1][-1].items() if "top" not in k}
            print(f"round {rnd}", json.dumps(row), flush=True)
            results[:] = _best_of(rounds, runs)
            _write(args.out_dir, gpu, payload)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(f"\n{gpu} | torch {env['torch']} | {env['precision']}")
    hdr = f"{'impl':9} {'model':22} {'infer img/s':>12} {'train img/s':>12} {'vs official':>16}"
    print(hdr + "\n" + "-" * len(hdr))
    base = {r["model"]: r for r in results if r["impl"] == "official" and "error" not in r}
    for r in results:
        if "error" in r:
            print(f"{r['impl']:9} {r['model']:22} {r['error'][:60]}")
            continue
        ratio = ""
        if r["impl"] != "official" and r["model"] in base:
            o = base[r["model"]]
            ratio = f"{r['infer_img_s'] / o['infer_img_s']:.2f}x / {r['train_img_s'] / o['train_img_s']:.2f}x"
        print(
            f"{r['impl']:9} {r['model']:22} {r['infer_img_s']:>12} {r['train_img_s']:>12} "
            f"{ratio:>16}"
        )
    if args.profile:
        for r in results:
            for key in ("train_top_kernels", "infer_top_kernels"):
                if key in r:
                    print(f"\n{r['impl']} {r['model']} {key}:")
                    for row in r[key]:
                        print(f"  {row['ms']:>8} ms  x{row['n']:<5} {row['name']}")


if __name__ == "__main__":
    main()

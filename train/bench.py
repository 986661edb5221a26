"""``visionattn bench models``: training and inference throughput and peak memory.

Any list of timm model names (ours and timm's side by side) is measured under the same
settings in one process: inference is a no-grad forward in eval mode, training a forward,
backward and SGD step in train mode, both on a fixed random batch (data loading is out of
the measurement). Throughput is images per second over ``steps`` timed iterations after
``warmup`` untimed ones; peak memory is ``torch.cuda.max_memory_allocated`` per mode.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from visionattn.train.graphed import WARMUP_STEPS, GraphedTrainStep, graph_optimizer_kwargs

__all__ = ["bench_model", "bench_models", "bench_models_main", "format_table"]

_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - t0


def _make_step(
    mode: str,
    model: torch.nn.Module,
    fwd: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Any,
    use_scaler: bool,
    dev: torch.device,
    cuda_graph: bool = False,
) -> Any:
    """One benchmark iteration for ``mode`` as a closure (``cuda_graph``: training through the
    trainer's :class:`~visionattn.train.graphed.GraphedTrainStep`)."""
    if mode == "infer":
        model.eval()

        def infer_step() -> None:
            with torch.no_grad(), autocast():
                fwd(x)

        return infer_step
    model.train()
    if cuda_graph:
        opt = torch.optim.SGD(
            model.parameters(), lr=1e-4, momentum=0.9, **graph_optimizer_kwargs("momentum")
        )

        def forward_backward(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            with autocast(cache_enabled=False):
                loss = torch.nn.functional.cross_entropy(fwd(xb), yb)
            loss.backward()
            return loss.detach()

        runner = GraphedTrainStep(forward_backward, opt.step, opt)
        return lambda: runner(x, y)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(dev.type, enabled=use_scaler)

    def train_step() -> None:
        with autocast():
            loss = torch.nn.functional.cross_entropy(fwd(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return train_step


def bench_model(
    name: str,
    *,
    batch_size: int = 64,
    img_size: int | None = None,
    amp: str = "bf16",
    channels_last: bool = False,
    compile: bool = False,
    steps: int = 20,
    warmup: int = 5,
    modes: tuple[str, ...] = ("infer", "train"),
    device: str | torch.device | None = None,
    grad_checkpointing: bool = False,
    cuda_graph: bool = False,
) -> dict[str, Any]:
    """Measure one model; returns a row with ``<mode>_img_per_s``/``<mode>_peak_mib``.

    ``cuda_graph`` times training as ``visionattn train --cuda-graph`` runs it (captured
    once after the warm-up, then replayed). A mode that runs out of memory records
    ``"<mode>_error": "OOM"`` instead of failing.
    """
    import timm

    import visionattn  # noqa: F401  (registers our models)

    if not timm.is_model(name):
        raise ValueError(f"models: {name!r} is not a registered timm/visionattn model")
    if amp not in _DTYPES:
        raise ValueError(f"amp: must be one of {tuple(_DTYPES)}, got {amp!r}")
    bad = set(modes) - {"infer", "train"}
    if bad:
        raise ValueError(f"modes: unknown {sorted(bad)}; use 'infer' and/or 'train'")
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if cuda_graph and (dev.type != "cuda" or amp == "fp16" or compile):
        raise ValueError(
            f"cuda_graph: needs a CUDA device, amp 'no' or 'bf16' and no compile (device "
            f"{dev.type}, amp {amp!r}, compile {compile})"
        )
    model = timm.create_model(name)
    if img_size is None:
        img_size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    row: dict[str, Any] = {
        "model": name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "img_size": img_size,
        "batch_size": batch_size,
        "amp": amp,
        "compile": compile,
        "channels_last": channels_last,
        "cuda_graph": cuda_graph,
    }
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    fwd = torch.compile(model) if compile else model
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=g).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.num_classes or 1, (batch_size,), generator=g).to(dev)
    dtype = _DTYPES[amp]

    def autocast(cache_enabled: bool = True) -> Any:
        if dtype is None:
            return nullcontext()
        return torch.autocast(dev.type, dtype=dtype, cache_enabled=cache_enabled)

    for mode in modes:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            graphed = cuda_graph and mode == "train"
            step = _make_step(mode, model, fwd, x, y, autocast, amp == "fp16", dev, graphed)
            # the graphed step's eager warm-up and capture stay out of the timing
            secs = _timed(step, steps, max(warmup, WARMUP_STEPS + 1) if graphed else warmup, dev)
            row[f"{mode}_img_per_s"] = batch_size * steps / secs
            row[f"{mode}_ms_per_step"] = 1e3 * secs / steps
            row[f"{mode}_peak_mib"] = (
                torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
            )
        except torch.OutOfMemoryError:
            row[f"{mode}_error"] = "OOM"
        except Exception as e:  # a model that fails to run is reported, the others go on
            row[f"{mode}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    del model, fwd
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_models(names: list[str], **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`bench_model` for every name (all checked before any is measured)."""
    import timm

    import visionattn  # noqa: F401

    unknown = [n for n in names if not timm.is_model(n)]
    if unknown:
        raise ValueError(f"models: not registered timm/visionattn models: {unknown}")
    return [bench_model(n, **kwargs) for n in names]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a fixed-width text table."""
    cols = [
        ("model", "model", "{}"),
        ("params_m", "params (M)", "{:.2f}"),
        ("img_size", "px", "{}"),
        ("batch_size", "batch", "{}"),
        ("infer_img_per_s", "infer img/s", "{:.0f}"),
        ("infer_peak_mib", "infer MiB", "{:.0f}"),
        ("train_img_per_s", "train img/s", "{:.0f}"),
        ("train_peak_mib", "train MiB", "{:.0f}"),
    ]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        line = []
        for key, _, fmt in cols:
            v = r.get(key)
            mode = key.split("_", 1)[0]
            if v is None and f"{mode}_error" in r:
                line.append(str(r[f"{mode}_error"])[:24])
            else:
                line.append("-" if v is None else fmt.format(v))
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    out = []
    for j, row in enumerate(cells):
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
            )
        )
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _env(device: torch.device) -> dict[str, Any]:
    import timm

    env = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def build_bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="visionattn bench models",
        description="Training and inference img/s and peak memory of timm/visionattn models.",
    )
    p.add_argument("models", nargs="+", help="model names (ours and timm's)")
    p.add_argument("--batch-size", "-b", type=int, default=64)
    p.add_argument("--img-size", type=int, default=None, help="default: each model's own")
    p.add_argument("--amp", default="bf16", choices=list(_DTYPES))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="time training captured once and replayed (as `visionattn train --cuda-graph`)",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--modes", default="infer,train", help="comma list of infer,train")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--json", default=None, help="write settings, environment and rows here")
    return p


def bench_models_main(argv: list[str] | None = None) -> int:
    """``visionattn bench models``: prints a table, optionally writes JSON; exit code."""
    args = build_bench_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        print(
            "visionattn bench models: error: steps and batch-size must be >= 1, warmup >= 0",
            file=sys.stderr,
        )
        return 2
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = {
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "grad_checkpointing": args.grad_checkpointing,
        "cuda_graph": args.cuda_graph,
        "steps": args.steps,
        "warmup": args.warmup,
        "modes": list(modes),
    }
    try:
        rows = bench_models(
            args.models,
            batch_size=args.batch_size,
            img_size=args.img_size,
            amp=args.amp,
            channels_last=args.channels_last,
            compile=args.compile,
            steps=args.steps,
            warmup=args.warmup,
            modes=modes,
            device=dev,
            grad_checkpointing=args.grad_checkpointing,
            cuda_graph=args.cuda_graph,
        )
    except ValueError as e:
        print(f"visionattn bench models: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"env": _env(dev), "settings": settings, "results": rows}, indent=2)
        )
        print(f"wrote {args.json}")
    return 0

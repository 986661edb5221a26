"""NAT / DiNAT throughput: ours beside the official implementation and timm's Swin-T.

Inference (batch 256) and training (batch 128, forward + backward + AdamW step) images/s at
224 px under bf16 autocast, eager mode, one process, one GPU. Compared:

* ``ours``: ``timm.create_model(name)`` after ``import visionattn`` (Triton ``na2d`` kernel).
* ``official``: the official classification code (SHI-Labs/Neighborhood-Attention-Transformer,
  ``classification/nat.py`` / ``dinat.py``, expected under ``.gpu/third_party/nat/``) on the
  NATTEN that ``pip install natten`` gives (0.21: no CUDA extension, so the Flex-attention
  backend, compiled with ``torch_compile=True``). NATTEN >= 0.20 dropped the relative position
  bias and changed ``NeighborhoodAttention2D``'s signature, so the official modules get a
  stand-in with the old signature that runs ``natten.na2d`` (qkv -> NA -> proj, no bias):
  the official model minus its bias add.
* ``timm``: ``swin_tiny_patch4_window7_224`` (similar FLOPs), as the speed to aim at.

Usage on the lent GPU (prints a table, writes ``nat_<gpu>.json`` into ``--out-dir`` and $OUT):

    source tools/gpu_env.sh; python3 benchmarks/bench_nat.py
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import timm
import torch
from torch import nn

import visionattn  # noqa: F401  (registers our models)

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_DIR = REPO / ".gpu" / "third_party" / "nat"


class _NattenNA2dOldSignature(nn.Module):
    """NATTEN 0.17's ``NeighborhoodAttention2D`` signature on NATTEN >= 0.20 (no RPB).

    ``[B, H, W, C] -> [B, H, W, C]``: qkv projection, ``natten.na2d`` on the chosen backend,
    output projection. ``rel_pos_bias`` / ``bias`` are accepted and ignored (the Flex backend
    has none); attention dropout is not supported by NATTEN >= 0.20 either.
    """

    backend: str = "flex-fna"
    torch_compile: bool = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        dilation: int | None = 1,
        is_causal: bool = False,
        rel_pos_bias: bool = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        **_: object,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.kernel_size = kernel_size
        self.dilation = dilation or 1
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import natten

        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H, W, 3, self.num_heads, self.head_dim).unbind(3)
        y = natten.na2d(
            q,
            k,
            v,
            kernel_size=self.kernel_size,
            dilation=self.dilation,
            scale=self.scale,
            backend=self.backend,
            torch_compile=self.torch_compile,
        )
        return self.proj_drop(self.proj(y.reshape(B, H, W, C)))


def _official_factory(name: str):
    """The official factory function ``name`` (``nat_*`` / ``dinat_*``)."""
    import natten
    import timm.models.registry as timm_registry

    if not (OFFICIAL_DIR / "nat.py").is_file():
        raise FileNotFoundError(f"official code not found at {OFFICIAL_DIR}")
    # keep the official @register_model from replacing our registry entries of the same names
    timm_registry.register_model = lambda fn: fn
    natten.NeighborhoodAttention2D = _NattenNA2dOldSignature
    if _NattenNA2dOldSignature.torch_compile:
        # NATTEN refuses to compile Flex attention unless told to; compiled is its fast path
        natten.allow_flex_compile(True, backprop=True)
        # one compiled graph per (heads, dilation) of every stage: dynamo's default limit of 8
        # recompiles sends DiNAT's later layers to eager Flex (measured: 1008 vs 2218 img/s)
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.accumulated_recompile_limit = 4096
    if str(OFFICIAL_DIR) not in sys.path:
        sys.path.insert(0, str(OFFICIAL_DIR))
    mod = importlib.import_module("dinat" if name.startswith("dinat") else "nat")
    return getattr(mod, name)


def build(impl: str, name: str, img_size: int) -> nn.Module:
    if impl == "ours":
        return timm.create_model(name)
    if impl == "official":
        return _official_factory(name)()
    if impl == "timm":
        return timm.create_model(name, img_size=img_size)
    raise ValueError(f"impl: unknown {impl!r}")


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


def bench_one(impl: str, name: str, args: argparse.Namespace, device: torch.device) -> dict:
    res: dict = dict(impl=impl, model=name)
    t0 = time.perf_counter()
    model = build(impl, name, args.img_size).to(device)
    res["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    amp = dict(device_type=device.type, dtype=torch.bfloat16)
    size = (3, args.img_size, args.img_size)

    model.eval()
    x = torch.randn(args.infer_batch, *size, device=device)

    def infer() -> None:
        # no_grad rather than inference_mode: visionattn's na2d caches index tables, and one
        # made under inference_mode cannot be saved for backward by the training run after
        with torch.no_grad(), torch.autocast(**amp):
            model(x)

    for _ in range(args.warmup):
        infer()
    res["infer_warmup_s"] = round(time.perf_counter() - t0, 1)
    res["infer_img_s"] = round(args.infer_batch / _timed(infer, args.iters, device), 1)

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

    t1 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    res["train_warmup_s"] = round(time.perf_counter() - t1, 1)
    res["train_img_s"] = round(args.train_batch / _timed(step, args.iters, device), 1)
    if device.type == "cuda":
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    return res


def _write(out_dir: str, gpu: str, payload: dict) -> None:
    """``nat_<gpu>.json`` into ``out_dir`` and $OUT (rewritten after every entry, so a run cut
    short still leaves what it measured)."""
    slug = gpu.split()[1].lower() if gpu.startswith("NVIDIA ") else gpu.replace(" ", "_").lower()
    for d in {out_dir, os.environ.get("OUT")} - {None, ""}:
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / f"nat_{slug}.json").write_text(json.dumps(payload, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--runs",
        default="ours:nat_mini,ours:dinat_mini,timm:swin_tiny_patch4_window7_224,"
        "official:nat_mini,official:dinat_mini",
        help="comma-separated impl:model entries (impl: ours, official, timm)",
    )
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=300.0, help="skip entries past this")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu":
        _NattenNA2dOldSignature.torch_compile = False  # dry runs only
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    env = dict(
        device=gpu,
        torch=torch.__version__,
        timm=timm.__version__,
        triton=getattr(sys.modules.get("triton"), "__version__", None),
        natten=None,
        img_size=args.img_size,
        infer_batch=args.infer_batch,
        train_batch=args.train_batch,
        precision="bf16 autocast, fp32 weights, eager",
        warmup=args.warmup,
        iters=args.iters,
    )
    try:
        import natten

        env["natten"] = natten.__version__
    except Exception as e:  # the official runs need it; ours do not
        env["natten"] = f"unavailable: {e}"
    results = []
    start = time.perf_counter()
    for entry in args.runs.split(","):
        impl, name = entry.split(":")
        if time.perf_counter() - start > args.budget_s:
            results.append(dict(impl=impl, model=name, error="skipped: time budget"))
            continue
        try:
            results.append(bench_one(impl, name, args, device))
        except Exception as e:
            traceback.print_exc()
            results.append(dict(impl=impl, model=name, error=f"{type(e).__name__}: {e}"[:500]))
        print(json.dumps(results[-1]), flush=True)
        _write(args.out_dir, gpu, dict(env=env, results=results))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{gpu} | torch {env['torch']} | natten {env['natten']} | {env['precision']}")
    hdr = f"{'impl':9} {'model':30} {'infer img/s':>12} {'train img/s':>12} {'mem GiB':>8}"
    print(hdr + "\n" + "-" * len(hdr))
    for r in results:
        if "error" in r:
            print(f"{r['impl']:9} {r['model']:30} {r['error'][:60]}")
        else:
            print(
                f"{r['impl']:9} {r['model']:30} {r['infer_img_s']:>12} {r['train_img_s']:>12} "
                f"{r.get('peak_mem_gib', '-'):>8}"
            )


if __name__ == "__main__":
    main()

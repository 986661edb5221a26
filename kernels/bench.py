"""Kernel benchmark: ours vs dense SDPA vs compiled FlexAttention vs natten, one table.

``visionattn bench kernels [--quick] [--out PATH] [--only NAME,...]`` (needs a CUDA GPU).
Prints one table and writes JSON to ``benchmarks/kernels_<gpu>.json``.

Row dict (shared with other kernel modules, e.g. ``visionattn.kernels.routed_bench``, whose
``rows(quick: bool) -> list[dict]`` is called when that module exists):

* ``name``: problem name (e.g. ``"nat_56x56_k7_d1"``); ``op``: the op (``"na2d"``, ``"routed"``)
* ``impl``: ``"ours"``, ``"sdpa_dense"``, ``"flex"`` (torch.compile'd FlexAttention with a
  block mask for the same pattern), ``"natten"`` or another baseline
* ``pass``: ``"fwd"`` or ``"fwdbwd"``
* ``ms``: median time; ``roofline_ms``: the larger of ``roofline_mem_ms`` (bytes of q, k, v, o
  for fwd, plus dO read and dq, dk, dv written for fwdbwd, over the measured HBM copy
  bandwidth) and ``roofline_flop_ms`` (the pattern's FLOPs over the measured dense bf16 matmul
  rate); ``roofline_bound``: which one; ``pct_roofline``: roofline_ms / ms
* ``tflops``: useful TFLOP/s (the pattern's FLOPs, dense N^2 for SDPA; bwd counted 2.5x fwd)
* ``peak_mem_mb``: peak extra CUDA memory of one call; ``speedup_vs_flex``: flex ms / ms
* optional: ``shape`` (text), ``note``, ``max_abs_err`` (vs the reference impl of the row)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROW_KEYS = (
    "name", "op", "impl", "pass", "ms", "roofline_ms", "pct_roofline", "tflops",
    "peak_mem_mb", "speedup_vs_flex",
)  # fmt: skip

# name, spatial, kernel, stride, dilation, batch, heads, head_dim, border, rpb
PROBLEMS = [
    ("dinat_56_k7_dil1", (56, 56), 7, 1, 1, 64, 2, 32, "clamp", False),
    ("nat_56_k7_rpb", (56, 56), 7, 1, 1, 64, 2, 32, "clamp", True),  # NAT-mini stage 1
    ("dinat_56_k7_dil8", (56, 56), 7, 1, 8, 64, 2, 32, "clamp", False),
    ("dinat_28_k7_dil4", (28, 28), 7, 1, 4, 64, 4, 32, "clamp", False),
    ("na_128_k7", (128, 128), 7, 1, 1, 16, 4, 32, "clamp", False),
    ("na_128_k13_d64", (128, 128), 13, 1, 1, 4, 8, 64, "clamp", False),
    ("na_64_k9_d128", (64, 64), 9, 1, 1, 2, 8, 128, "clamp", False),
    ("maxvit_block_56", (56, 56), 7, 7, 1, 64, 2, 32, "clamp", True),
    ("maxvit_grid_56", (56, 56), 7, 7, 8, 64, 2, 32, "clamp", True),
    ("halonet_64_b8_h3", (64, 64), 14, 8, 1, 16, 8, 32, "zero", False),
]
QUICK = {"dinat_56_k7_dil1", "dinat_56_k7_dil8", "maxvit_grid_56"}


def _bench(fn: Callable[[], object], grad_to_none=None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none))


def copy_bandwidth() -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


def matrix_rate() -> float:
    """Measured dense bf16 matmul rate in FLOP/s (cuBLAS, 8192^3)."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    ms = _bench(lambda: a @ b)
    return 2 * 8192**3 / (ms * 1e-3)


def roofline(nbytes: float, flops: float, bw: float, rate: float) -> dict:
    """Roofline fields of a row: ``roofline_ms`` is the larger of ``nbytes`` over the HBM
    bandwidth ``bw`` (bytes/s) and ``flops`` over the matrix rate ``rate`` (FLOP/s)."""
    mem_ms, flop_ms = nbytes / bw * 1e3, flops / rate * 1e3
    return dict(
        roofline_ms=max(mem_ms, flop_ms),
        roofline_bound="memory" if mem_ms >= flop_ms else "compute",
        roofline_mem_ms=mem_ms,
        roofline_flop_ms=flop_ms,
    )


def _peak_mb(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _dense_mask_and_bias(spatial, ks, st, dl, border, heads, rpb):
    """Dense [N, N] allowed mask and (optional) [h, N, N] bias of the NA pattern."""
    from ._common import NAParams, window_tables

    n = len(spatial)
    p = NAParams((ks,) * n, (st,) * n, (dl,) * n, (False,) * n, border == "zero", 1.0)
    key, in_map, allowed, rel = window_tables(spatial, p, "cuda")
    ntok = math.prod(spatial)
    ok = allowed & in_map  # flex cannot keep zero keys: border keys are simply dropped
    mask = torch.zeros(ntok, ntok + 1, dtype=torch.bool, device="cuda")
    mask.scatter_(1, torch.where(ok, key, ntok), True)
    mask = mask[:, :ntok].contiguous()
    bias = None
    if rpb is not None:
        bias = torch.zeros(heads, ntok, ntok + 1, dtype=torch.float32, device="cuda")
        vals = rpb.detach().float().reshape(heads, -1)[:, rel]  # [h, N, K], fixed for flex
        idx = torch.where(ok, key, ntok).expand(heads, -1, -1)
        bias.scatter_(2, idx, vals)
        bias = bias[:, :, :ntok].contiguous()
    return mask, bias


NATTEN_PROBLEMS = {"dinat_56_k7_dil1", "dinat_56_k7_dil8"}


def problem_rows(prob, bw: float, rate: float, with_natten: bool) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from . import na2d

    name, spatial, ks, st, dl, b, h, d, border, use_rpb = prob
    # Every problem recompiles flex; past dynamo's recompile limit torch silently runs flex
    # eagerly (materialised scores), which made later flex rows meaningless: reset dynamo per
    # problem and raise the limits (fwd, fwd+bwd and grad-mode variants compile per problem).
    torch._dynamo.reset()
    for attr in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, max(getattr(torch._dynamo.config, attr), 256))
    ntok = math.prod(spatial)
    kt = ks ** len(spatial)
    dt = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(b, *spatial, 3, h, d, device="cuda", dtype=dt, generator=gen)
    q, k, v = (qkv[..., i, :, :].detach().requires_grad_(True) for i in range(3))
    rpb = None
    if use_rpb:
        rpb = torch.randn(h, 2 * ks - 1, 2 * ks - 1, device="cuda", dtype=dt, generator=gen)
        rpb.requires_grad_(True)
    g = torch.randn(b, *spatial, h, d, device="cuda", dtype=dt, generator=gen)
    elt = q.element_size()
    tensor_bytes = b * ntok * h * d * elt
    bytes_fwd = 4 * tensor_bytes
    bytes_bwd = bytes_fwd + 9 * tensor_bytes  # + read q,k,v,o,dO and write dq,dk,dv (+lse)
    flops_fwd = 4 * b * h * ntok * kt * d
    shape = f"{spatial[0]}x{spatial[1]} k{ks} s{st} dil{dl} B{b} h{h} d{d} {border}"
    if use_rpb:
        shape += " rpb"

    def ours():
        return na2d(q, k, v, ks, st, dl, rpb=rpb, border=border)

    # torch layouts for SDPA / Flex: [B, h, N, d]
    qh, kh, vh = (t.detach().reshape(b, ntok, h, d).transpose(1, 2).contiguous() for t in (q, k, v))
    for t in (qh, kh, vh):
        t.requires_grad_(True)
    gh = g.reshape(b, ntok, h, d).transpose(1, 2).contiguous()
    mask, bias = _dense_mask_and_bias(spatial, ks, st, dl, border, h, rpb)

    def mask_mod(bb, hh, qi, ki):
        return mask[qi, ki]

    # compiled mask creation: the eager path materialises N x N index tensors (OOM at 128x128)
    block_mask = create_block_mask(mask_mod, None, None, ntok, ntok, device="cuda", _compile=True)
    flex_c = torch.compile(flex_attention, dynamic=False)
    score_mod = None
    if bias is not None:
        bias_h = bias

        def score_mod(s, bb, hh, qi, ki):
            return s + bias_h[hh, qi, ki]

    def flex():
        return flex_c(qh, kh, vh, score_mod=score_mod, block_mask=block_mask)

    def sdpa():
        return F.scaled_dot_product_attention(qh, kh, vh)

    impls = {"ours": (ours, [q, k, v] + ([rpb] if rpb is not None else []), g), "flex": None}
    impls["flex"] = (flex, [qh, kh, vh], gh)
    impls["sdpa_dense"] = (sdpa, [qh, kh, vh], gh)
    if with_natten:
        import natten

        def nat():
            return natten.na2d(
                q, k, v, ks, stride=st, dilation=dl, backend="flex-fna", torch_compile=True
            )

        # natten's GPU path without its CUDA extension is Flex again: run it on the NAT rows
        if border == "clamp" and not use_rpb and name in NATTEN_PROBLEMS:
            impls["natten"] = (nat, [q, k, v], g)

    rows = []
    ref = ours().float()
    for impl, (fn, leaves, grad) in impls.items():
        note = ""
        try:
            out = fn()
            if impl in ("flex", "natten"):
                o = out if impl == "natten" else out.transpose(1, 2).reshape(ref.shape)
                err = (o.float() - ref).abs().max().item()
                note = f"max|diff| vs ours {err:.1e}"
                if border == "zero":
                    note += " (flex drops zero keys)"

            def fwdbwd(fn=fn, leaves=leaves, grad=grad):
                fn().backward(grad)

            for pas, f, fl, by in (
                ("fwd", fn, flops_fwd, bytes_fwd),
                ("fwdbwd", fwdbwd, 3.5 * flops_fwd, bytes_bwd),
            ):
                with torch.no_grad() if pas == "fwd" else torch.enable_grad():
                    f()
                    ms = _bench(f, grad_to_none=leaves if pas == "fwdbwd" else None)
                    mem = _peak_mb(f)
                    # GPU time alone (CUDA-graph replay: no Python, no launch latency); on
                    # the lent machine's slow host a small call's do_bench time is host time
                    # (forward only: capturing the fwd+bwd call failed on the H200 and left
                    # the CUDA context in an error state that broke every later row; the
                    # same do_bench_cudagraph backward failure is common across operators,
                    # meta-pytorch/tritonbench#349)
                    ms_graph = None
                    if impl == "ours" and pas == "fwd":
                        from triton.testing import do_bench_cudagraph

                        ms_graph = float(do_bench_cudagraph(f, rep=20))
                roof = roofline(by, fl, bw, rate)  # the pattern's FLOPs, for every impl
                if impl == "sdpa_dense":
                    fl = fl / kt * ntok  # dense attention computes every pair
                row_note = note
                if ms_graph:
                    sep = "; " if note else ""
                    row_note = f"{note}{sep}GPU-only (CUDA graph) {ms_graph:.3f} ms"
                rows.append(
                    dict(
                        name=name, op="na2d", impl=impl, **{"pass": pas}, ms=ms,
                        **roof, pct_roofline=100.0 * roof["roofline_ms"] / ms,
                        tflops=fl / (ms * 1e-3) / 1e12, peak_mem_mb=mem,
                        speedup_vs_flex=None, shape=shape, note=row_note, ms_cudagraph=ms_graph,
                    )
                )  # fmt: skip
        except Exception as exc:  # a baseline that cannot run this pattern is reported
            rows.append(
                dict(name=name, op="na2d", impl=impl, **{"pass": "fwd"}, ms=None,
                     roofline_ms=None, pct_roofline=None, tflops=None, peak_mem_mb=None,
                     speedup_vs_flex=None, shape=shape, note=f"failed: {type(exc).__name__}: "
                     f"{str(exc).splitlines()[0][:120] if str(exc) else ''}")
            )  # fmt: skip
        torch.cuda.empty_cache()
    return rows


def _fill_speedups(rows: list[dict]) -> None:
    flex = {(r["name"], r["pass"]): r["ms"] for r in rows if r["impl"] == "flex" and r["ms"]}
    for r in rows:
        f = flex.get((r["name"], r["pass"]))
        if f and r["ms"]:
            r["speedup_vs_flex"] = f / r["ms"]


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'name':<20} {'impl':<11} {'pass':<6} {'ms':>8} {'roof ms':>8} {'%roof':>6} {'':1} "
        f"{'TFLOP/s':>8} {'mem MB':>8} {'x flex':>7}  note"
    )
    # after %roof: m = memory-bound (bytes), c = compute-bound (FLOPs over the matmul rate)
    lines = [head, "-" * len(head)]

    def fmt(x, spec):
        return format(x, spec) if isinstance(x, (int, float)) else format("-", ">" + spec[:-3])

    for r in rows:
        lines.append(
            f"{r['name']:<20} {r['impl']:<11} {r['pass']:<6} {fmt(r['ms'], '8.3f')} "
            f"{fmt(r['roofline_ms'], '8.3f')} {fmt(r['pct_roofline'], '6.1f')} "
            f"{(r.get('roofline_bound') or ' ')[0]} "
            f"{fmt(r['tflops'], '8.1f')} {fmt(r['peak_mem_mb'], '8.1f')} "
            f"{fmt(r['speedup_vs_flex'], '7.2f')}  {r.get('note', '')}"
        )
    return "\n".join(lines)


def _commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted kernel changes), or ``unknown``;
    ``VISIONATTN_COMMIT`` names it where the copy has no git metadata (the lent GPU)."""
    import os
    import subprocess

    if os.environ.get("VISIONATTN_COMMIT"):
        return os.environ["VISIONATTN_COMMIT"]

    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "kernels"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def host_overhead(n: int = 200) -> dict:
    """Wall time per call of a tiny windowed problem where the GPU work is negligible
    (EfficientViT-M5-like: q=k=v [128, 14, 14, 1, 16] bf16, 7x7 windows), i.e. the host
    cost of one call: forward, forward+backward, each without and with rpb. Synchronised only
    at the end of ``n`` calls, so it measures the host when the host is the bottleneck."""
    import time

    from . import na2d

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(128, 14, 14, 1, 16, device="cuda", dtype=torch.bfloat16, generator=gen)
        .requires_grad_(True)
        for _ in range(3)
    )  # fmt: skip
    tab = torch.randn(1, 13, 13, device="cuda", generator=gen, requires_grad=True)
    go = torch.randn_like(q)
    res = {}
    for rpb in (None, tab):

        def fwd(rpb=rpb):
            with torch.no_grad():
                na2d(q, k, v, 7, 7, rpb=rpb)

        def fwdbwd(rpb=rpb):
            na2d(q, k, v, 7, 7, rpb=rpb).backward(go)

        for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            key = name + ("_rpb" if rpb is not None else "")
            res[key] = (time.perf_counter() - t0) / n * 1e6
    return res


def gpu_slug() -> str:
    name = torch.cuda.get_device_name()
    m = re.search(r"(H100|H200|H20|A100|A10G?|L40S?|L4|B200|GB200|RTX ?\d{4}|V100|T4)", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name.lower())).lower().replace(" ", "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="visionattn bench kernels", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="a few problems only")
    ap.add_argument("--only", default="", help="comma-separated problem names")
    ap.add_argument("--out", default="", help="JSON path (default benchmarks/kernels_<gpu>.json)")
    ap.add_argument("--no-natten", action="store_true", help="skip natten even if installed")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("visionattn bench kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    with_natten = False
    if not args.no_natten:
        try:
            import natten

            natten.allow_flex_compile()
            natten.allow_flex_compile_backprop()
            with_natten = True
        except Exception:
            with_natten = False
    bw = copy_bandwidth()
    rate = matrix_rate()
    only = {x for x in args.only.split(",") if x}
    probs = [
        p for p in PROBLEMS if (not only or p[0] in only) and (not args.quick or p[0] in QUICK)
    ]
    rows: list[dict] = []
    out = Path(args.out) if args.out else Path("benchmarks") / f"kernels_{gpu_slug()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import triton

    meta = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        copy_bandwidth_tbs=bw / 1e12, matrix_tflops=rate / 1e12, natten=with_natten, dtype="bfloat16", commit=_commit(),
        host_us_per_call=host_overhead(),
    )  # fmt: skip
    for prob in probs:
        rows.extend(problem_rows(prob, bw, rate, with_natten))
        _fill_speedups(rows)
        out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))  # partial results
        print(f"done {prob[0]}", file=sys.stderr, flush=True)
    try:
        from . import routed_bench  # contributed by the routed-attention module, if present
    except ImportError:
        routed_bench = None
    if routed_bench is not None and not only:
        rows.extend(routed_bench.rows(args.quick, bw=bw, rate=rate))
    _fill_speedups(rows)
    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
        f"triton {triton.__version__}  commit {meta['commit']}  "
        f"copy bandwidth {bw / 1e12:.2f} TB/s  bf16 matmul {rate / 1e12:.0f} TFLOP/s  natten: {'yes' if with_natten else 'no'}"
    )
    print(
        "host us/call (q=k=v [128,14,14,1,16] bf16, 7x7 windows): "
        + ", ".join(f"{k_} {v_:.0f}" for k_, v_ in meta["host_us_per_call"].items())
    )
    print(format_table(rows))
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

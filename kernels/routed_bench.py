"""Routed-attention benchmark rows for ``visionattn bench kernels`` (see :mod:`.bench`).

Problems: the three routed stages of BiFormer-T at 224x224, batch 64, and BiFormer's detection
setting (``n_win=16``) at an 800x1216 input, batch 2, whose stride-4 map (200x304) is padded
to 208x304 (``auto_pad``), with topk 4/8/16.  Indices come from :func:`bra_route` (BiFormer's
routing) on the benchmark's own q/k, and are computed once, outside the timings.

Implementations, all bf16 on the same q/k/v:

* ``ours``: :func:`routed_attention` (Triton, routed tiles read in place).
* ``gather``: BiFormer's algorithm (gather the top-k k/v regions into a new tensor, dense
  attention), :func:`routed_attention_gather`.
* ``flex``: ``torch.compile``'d FlexAttention with a BlockMask of the same tile pattern.  Its
  inputs are given already permuted to tile-major token order ([B, h, N, d], every tile
  contiguous) at no cost, so its block mask is as sparse as the pattern allows.
* ``sdpa_dense``: dense SDPA over all tokens (what routing avoids; a different result).

Roofline and FLOP conventions are those of :mod:`.bench` (the larger of q, k, v, o bytes over
the measured copy bandwidth and the routed pattern's FLOPs over the measured bf16 matmul rate;
bwd FLOPs 2.5x fwd, and 9 more tensor passes for the backward).  The detection rows are
compute-bound by that measure, BiFormer-T's stages memory-bound.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .routed import routed_attention
from .routed_reference import routed_attention_gather
from .routing import bra_route

__all__ = ["PROBLEMS", "rows"]

# name, map (already a multiple of the grid), n_win, topk, batch, heads, head_dim
PROBLEMS = [
    ("biformer_t_s1_56", (56, 56), 7, 1, 64, 2, 32),
    ("biformer_t_s2_28", (28, 28), 7, 4, 64, 4, 32),
    ("biformer_t_s3_14", (14, 14), 7, 16, 64, 8, 32),
    ("bif_det_208x304_k4", (208, 304), 16, 4, 2, 2, 32),
    ("bif_det_208x304_k8", (208, 304), 16, 8, 2, 2, 32),
    ("bif_det_208x304_k16", (208, 304), 16, 16, 2, 2, 32),
]
QUICK = {"biformer_t_s1_56", "biformer_t_s2_28", "bif_det_208x304_k8"}


def _tile_major(x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """``[B, H, W, h, d]`` -> ``[B, h, N, d]`` with tokens ordered tile by tile."""
    b, hh, ww, heads, d = x.shape
    x = x.reshape(b, hh // th, th, ww // tw, tw, heads, d).permute(0, 5, 1, 3, 2, 4, 6)
    return x.reshape(b, heads, hh * ww, d)


def problem_rows(prob, bw: float, rate: float) -> list[dict]:
    # every problem compiles flex (fwd and fwd+bwd) anew: keep dynamo from giving up and
    # silently falling back to the unfused eager path after its recompile limit
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from .bench import _bench, _peak_mb, roofline

    for attr in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, max(getattr(torch._dynamo.config, attr), 256))
    name, (hh, ww), n_win, topk, b, heads, d = prob
    th, tw = hh // n_win, ww // n_win
    t, lq = n_win * n_win, th * tw
    ntok = hh * ww
    scale = (heads * d) ** -0.5  # BiFormer: full qk width
    dt = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(b, hh, ww, 3, heads, d, device="cuda", dtype=dt, generator=gen)
    q, k, v = (qkv[..., i, :, :].detach().requires_grad_(True) for i in range(3))
    g = torch.randn(b, hh, ww, heads, d, device="cuda", dtype=dt, generator=gen)
    idx = bra_route(q, k, n_win, topk, scale)  # [B, T, topk]
    tiles = (th, tw, th, tw)

    tensor_bytes = b * ntok * heads * d * q.element_size()
    bytes_fwd = 4 * tensor_bytes
    bytes_bwd = bytes_fwd + 9 * tensor_bytes
    flops_fwd = 4 * b * heads * ntok * topk * lq * d
    shape = f"{hh}x{ww} n_win{n_win} tile{th}x{tw} topk{topk} B{b} h{heads} d{d}"

    def ours():
        return routed_attention(q, k, v, idx, n_win=n_win, scale=scale, check_indices=False)

    def gather():
        return routed_attention_gather(q, k, v, idx, tiles, scale)

    # FlexAttention on tile-major tokens: query tile qi // lq may see key tile ki // lq
    qh, kh, vh = (_tile_major(x.detach(), th, tw).contiguous() for x in (q, k, v))
    for x in (qh, kh, vh):
        x.requires_grad_(True)
    gh = _tile_major(g, th, tw).contiguous()
    allowed = torch.zeros(b, t, t, dtype=torch.bool, device="cuda")
    allowed.scatter_(2, idx, True)

    def mask_mod(bb, hd, qi, ki):
        return allowed[bb, qi // lq, ki // lq]

    flex_state: dict = {}

    def flex():
        if not flex_state:  # built on first use, inside the row's error handling
            flex_state["mask"] = create_block_mask(
                mask_mod, b, None, ntok, ntok, device="cuda", _compile=True
            )
            flex_state["fn"] = torch.compile(flex_attention, dynamic=False)
        return flex_state["fn"](qh, kh, vh, block_mask=flex_state["mask"], scale=scale)

    def sdpa():
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale)

    impls = {
        "ours": (ours, [q, k, v], g),
        "gather": (gather, [q, k, v], g),
        "flex": (flex, [qh, kh, vh], gh),
        "sdpa_dense": (sdpa, [qh, kh, vh], gh),
    }
    with torch.no_grad():
        ref = gather().float()
    rows = []
    for impl, (fn, leaves, grad) in impls.items():
        note = ""
        try:
            with torch.no_grad():
                out = fn()
            if impl in ("ours", "flex"):
                if impl == "flex":
                    out = out.reshape(b, heads, n_win, n_win, th, tw, d)
                    out = out.permute(0, 2, 4, 3, 5, 1, 6).reshape(ref.shape)
                note = f"max|diff| vs gather {(out.float() - ref).abs().max().item():.1e}"

            def fwdbwd(fn=fn, grad=grad):
                fn().backward(grad)

            for pas, f, fl, by in (
                ("fwd", fn, flops_fwd, bytes_fwd),
                ("fwdbwd", fwdbwd, 3.5 * flops_fwd, bytes_bwd),
            ):
                with torch.no_grad() if pas == "fwd" else torch.enable_grad():
                    f()
                    ms = _bench(f, grad_to_none=leaves if pas == "fwdbwd" else None)
                    for x in leaves:
                        x.grad = None
                    mem = _peak_mb(f)
                    for x in leaves:
                        x.grad = None
                    # GPU time alone (CUDA graph replay: no Python, no launch latency)
                    ms_graph = None
                    if impl == "ours":
                        from triton.testing import do_bench_cudagraph

                        ms_graph = float(
                            do_bench_cudagraph(
                                f, rep=20, grad_to_none=leaves if pas == "fwdbwd" else None
                            )
                        )
                        for x in leaves:
                            x.grad = None
                roof = roofline(by, fl, bw, rate)  # the routed pattern's FLOPs, every impl
                if impl == "sdpa_dense":
                    fl = fl / (topk * lq) * ntok
                rows.append(
                    dict(
                        name=name, op="routed", impl=impl, **{"pass": pas}, ms=ms,
                        **roof, pct_roofline=100.0 * roof["roofline_ms"] / ms,
                        tflops=fl / (ms * 1e-3) / 1e12, peak_mem_mb=mem,
                        speedup_vs_flex=None, shape=shape, note=note, ms_cudagraph=ms_graph,
                    )
                )  # fmt: skip
        except Exception as exc:  # a baseline that cannot run (e.g. out of memory) is reported
            msg = str(exc).splitlines()[0][:120] if str(exc) else ""
            rows.append(
                dict(name=name, op="routed", impl=impl, **{"pass": "fwd"}, ms=None,
                     roofline_ms=None, pct_roofline=None, tflops=None, peak_mem_mb=None,
                     speedup_vs_flex=None, shape=shape,
                     note=f"failed: {type(exc).__name__}: {msg}")
            )  # fmt: skip
        torch.cuda.empty_cache()
    # the ratio the issue asks for: ours vs the gather implementation
    by_key = {(r["impl"], r["pass"]): r["ms"] for r in rows if r["ms"]}
    for r in rows:
        if r["impl"] == "ours" and by_key.get(("gather", r["pass"])):
            r["note"] = (
                r["note"] + f"; {by_key[('gather', r['pass'])] / r['ms']:.1f}x gather"
            ).lstrip("; ")
        if r.get("ms_cudagraph"):
            r["note"] += f"; GPU-only (CUDA graph) {r['ms_cudagraph']:.3f} ms"
    return rows


def rows(
    quick: bool,
    verbose: bool = False,
    on_problem=None,
    bw: float | None = None,
    rate: float | None = None,
) -> list[dict]:
    """Benchmark rows (keys of :mod:`.bench`) for every routed problem (``quick``: a subset).
    ``bw`` / ``rate``: the copy bandwidth and matmul rate the caller measured for its table
    (measured here when not given)."""
    from .bench import copy_bandwidth, matrix_rate

    bw = copy_bandwidth() if bw is None else bw
    rate = matrix_rate() if rate is None else rate
    out: list[dict] = []
    for prob in PROBLEMS:
        if quick and prob[0] not in QUICK:
            continue
        try:
            out.extend(problem_rows(prob, bw, rate))
        except Exception as exc:  # keep the other problems' rows
            out.append(
                dict(name=prob[0], op="routed", impl="-", **{"pass": "-"}, ms=None,
                     roofline_ms=None, pct_roofline=None, tflops=None, peak_mem_mb=None,
                     speedup_vs_flex=None, note=f"failed: {type(exc).__name__}: {exc}"[:160])
            )  # fmt: skip
        torch.cuda.empty_cache()
        print(f"done {prob[0]}", file=sys.stderr, flush=True)
        if on_problem is not None:  # e.g. save partial results
            on_problem(out)
        if verbose:
            from .bench import format_table

            print(format_table(out[-8:]), file=sys.stderr, flush=True)
    return out


def main() -> int:
    """Print the routed rows alone (``python -m visionattn.kernels.routed_bench [--quick]``)."""
    import json

    from .bench import _fill_speedups, format_table

    only = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--only=")]
    if only:
        keep = set(only[0].split(","))
        PROBLEMS[:] = [p for p in PROBLEMS if p[0] in keep]
    commit = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--commit=")]
    import triton

    from .bench import copy_bandwidth, matrix_rate

    bw, rate = copy_bandwidth(), matrix_rate()
    meta = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        copy_bandwidth_tbs=bw / 1e12,
        matrix_tflops=rate / 1e12,
        dtype="bfloat16",
        commit=commit[0] if commit else None,
        timing="triton do_bench median (host time included); ms_cudagraph: do_bench_cudagraph",
    )
    paths = [a[len("--json=") :] for a in sys.argv[1:] if a.startswith("--json=")]

    def save(rs: list[dict]) -> None:
        _fill_speedups(rs)
        for path in paths:
            with open(path, "w") as fh:
                json.dump(dict(meta=meta, rows=rs), fh, indent=1)

    rs = rows("--quick" in sys.argv, verbose=True, on_problem=save, bw=bw, rate=rate)
    save(rs)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(format_table(rs))
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())

"""LayerNorm benchmark: :func:`visionattn.kernels.layer_norm` beside PyTorch, one table + JSON.

    python -m visionattn.kernels.layer_norm_bench [--out benchmarks/layer_norm_h200.json]

Problems: the token tensors the backbones normalise at 224 px, training batch 128 (LITv2-S /
Agent-Swin-T stage 1 ``[128*56*56, 96]``, Agent-PVT-T stages ``C = 64 .. 512``, stage 3 and 4
of the Swin-like models). Each runs with a float32 input and a bfloat16 output (autocast
training: float32 residual stream, bfloat16 into the next linear) and all-bfloat16.

Implementations, same inputs:

* ``ours``: :func:`layer_norm` (Triton).
* ``torch``: what the model ran before, ``F.layer_norm`` on the input cast to the output dtype
  (the cast included in the time).
* ``autocast``: ``nn.LayerNorm`` under autocast (float32 output) plus the cast to bfloat16 the
  next linear performs.
* ``compiled``: ``torch.compile`` of the float32-statistics definition
  (:func:`layer_norm_reference`), Inductor's fused norm.

Medians of ``triton.testing.do_bench`` in ms. ``fwd``: the forward as a model calls it.
``bwd``: the backward kernels called directly (ours: :func:`layer_norm_triton.backward`;
torch: ``native_layer_norm_backward`` plus the casts of the gradients back to float32), since
through ``.backward()`` a single small norm is bound by the autograd engine's host time on
the lent machine (the ``*_fwdbwd_ms`` JSON fields keep that measurement). Roofline: bytes
that must move (fwd: read x, write y; bwd: read dy and x, write dx) over the measured copy
bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import layer_norm_triton
from .bench import _bench, _commit, copy_bandwidth
from .layer_norm import layer_norm, layer_norm_reference

__all__ = ["PROBLEMS", "main"]

# name, rows, channels
PROBLEMS = [
    ("s1_56x56_c96", 128 * 56 * 56, 96),
    ("pvt_s1_c64", 128 * 56 * 56, 64),
    ("pvt_s2_c128", 128 * 28 * 28, 128),
    ("s2_28x28_c192", 128 * 28 * 28, 192),
    ("pvt_s3_c320", 128 * 14 * 14, 320),
    ("s3_14x14_c384", 128 * 14 * 14, 384),
    ("s4_7x7_c768", 128 * 7 * 7, 768),
]


def _impls(dtype_in: torch.dtype, out: torch.dtype, w, b):
    ref_c = torch.compile(layer_norm_reference, dynamic=True)

    def torch_cast(x):
        return F.layer_norm(x.to(out), (x.shape[-1],), w.to(out), b.to(out), 1e-6)

    def autocast(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.layer_norm(x, (x.shape[-1],), w, b, 1e-6).to(out)

    return {
        "ours": lambda x: layer_norm(x, w, b, 1e-6, out),
        "torch": torch_cast,
        "autocast": autocast,
        "compiled": lambda x: ref_c(x, w, b, 1e-6, out),
    }


def _bwd_direct(x, w, b, dy) -> dict:
    """Backward kernel times without autograd: ours, and PyTorch's bf16 norm with its casts."""
    c = x.shape[-1]
    _, stats = layer_norm_triton.forward(x, w.detach(), b.detach(), 1e-6, dy.dtype)
    ours = _bench(lambda: layer_norm_triton.backward(dy, x, w.detach(), stats, True, True))
    xb, wb, bb = x.to(dy.dtype), w.detach().to(dy.dtype), b.detach().to(dy.dtype)
    _, mean, rstd = torch.ops.aten.native_layer_norm(xb, [c], wb, bb, 1e-6)

    def torch_bwd():
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy, xb, [c], mean, rstd, wb, bb, [True, True, True]
        )
        return dx.to(x.dtype), dw.float(), db.float()

    return dict(ours_bwd_ms=ours, torch_bwd_ms=_bench(torch_bwd))


def rows(bw: float) -> list[dict]:
    res = []
    for dtype_in in (torch.float32, torch.bfloat16):
        out = torch.bfloat16
        for name, m, c in PROBLEMS:
            x = torch.randn(m, c, device="cuda", dtype=dtype_in)
            w = torch.randn(c, device="cuda", requires_grad=True)
            b = torch.randn(c, device="cuda", requires_grad=True)
            dy = torch.randn(m, c, device="cuda", dtype=out)
            xs = x.detach().requires_grad_()
            fwd_bytes = m * c * (x.element_size() + 2)
            bwd_bytes = fwd_bytes + m * c * (2 + 2 * x.element_size())
            row = dict(problem=name, rows=m, channels=c, dtype_in=str(dtype_in)[6:], out="bfloat16")
            row["roofline_fwd_ms"] = fwd_bytes / bw * 1e3
            row["roofline_fwdbwd_ms"] = bwd_bytes / bw * 1e3
            row["roofline_bwd_ms"] = (bwd_bytes - fwd_bytes) / bw * 1e3
            row.update(_bwd_direct(x, w, b, dy))
            for impl, fn in _impls(dtype_in, out, w, b).items():
                try:
                    with torch.no_grad():
                        t_f = _bench(lambda fn=fn, x=x: fn(x))

                    def fb(fn=fn, xs=xs, dy=dy):
                        fn(xs).backward(dy)

                    t_fb = _bench(fb, grad_to_none=[xs, w, b])
                except Exception as e:  # a failing reference must not hide the others
                    row[f"{impl}_error"] = f"{type(e).__name__}: {e}"[:200]
                    continue
                row[f"{impl}_fwd_ms"] = t_f
                row[f"{impl}_fwdbwd_ms"] = t_fb
            res.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args()
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64
    bw = copy_bandwidth()
    import triton

    env = dict(
        device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
        commit=_commit(), copy_bandwidth_tbs=bw / 1e12,
    )  # fmt: skip
    res = rows(bw)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(env=env, rows=res), indent=1))
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {bw / 1e12:.2f} TB/s")
    hdr = (
        f"{'problem':15} {'in':5} {'ours f':>7} {'%roof':>6} {'torch f':>8} {'autoc f':>8} "
        f"{'comp f':>7} | {'ours b':>7} {'%roof':>6} {'torch b':>8}"
    )
    print(hdr + "\n" + "-" * len(hdr))
    for r in res:

        def g(k, r=r):
            v = r.get(k)
            return f"{v:.3f}" if isinstance(v, float) else "err"

        pf = 100 * r["roofline_fwd_ms"] / r["ours_fwd_ms"] if "ours_fwd_ms" in r else 0.0
        pb = 100 * r["roofline_bwd_ms"] / r["ours_bwd_ms"]
        print(
            f"{r['problem']:15} {r['dtype_in'][:5]:5} {g('ours_fwd_ms'):>7} {pf:>5.0f}% "
            f"{g('torch_fwd_ms'):>8} {g('autocast_fwd_ms'):>8} {g('compiled_fwd_ms'):>7} | "
            f"{g('ours_bwd_ms'):>7} {pb:>5.0f}% {g('torch_bwd_ms'):>8}"
        )


if __name__ == "__main__":
    main()

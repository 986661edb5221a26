"""One-call GPU check: our ops against the reference on CUDA (incl. v head_dim != q/k's),
and a bf16 forward+backward of every family's tiny model. Prints a table last."""

import json
import os
import time

import timm
import torch

import visionattn
from visionattn.kernels import na2d, routed_attention

rows = []


def add(row):
    rows.append(row)  # printed as it comes: a run cut short still reports what it checked
    print(
        f"{row['check']:42s} {row['dtype']:14s} {row['max_rel_err']:12.2e}  {'OK' if row['ok'] else 'FAIL'}",
        flush=True,
    )


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def na_case(
    name, B, H, W, h, dqk, dv, k, stride=1, dil=1, border="clamp", rpb=False, dtype=torch.bfloat16,
    ab=None,
):  # fmt: skip
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, W, h, dqk, device="cuda", generator=g, dtype=dtype, requires_grad=True)
    kk = torch.randn(B, H, W, h, dqk, device="cuda", generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, W, h, dv, device="cuda", generator=g, dtype=dtype, requires_grad=True)
    tab = (
        torch.randn(h, 2 * k - 1, 2 * k - 1, device="cuda", generator=g, requires_grad=True)
        if rpb
        else None
    )
    # attn_bias: "full" [B, h, ...] (per-batch gradient) or "b1" [1, h, ...] (batch-summed)
    bias = (
        torch.randn(
            B if ab == "full" else 1, h, H, W, k, k, device="cuda", generator=g, dtype=dtype,
            requires_grad=True,
        )
        if ab
        else None
    )  # fmt: skip
    kw = dict(kernel_size=k, stride=stride, dilation=dil, border=border, rpb=tab, attn_bias=bias)
    leaves = [q, kk, v] + ([tab] if rpb else []) + ([bias] if ab else [])
    out = na2d(q, kk, v, **kw)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    os.environ["VISIONATTN_NA_IMPL"] = "reference"
    try:
        qs, ks, vs = (t.detach().double().requires_grad_(True) for t in (q, kk, v))
        ts = tab.detach().double().requires_grad_(True) if rpb else None
        bs = bias.detach().double().requires_grad_(True) if ab else None
        ref = na2d(qs, ks, vs, **{**kw, "rpb": ts, "attn_bias": bs})
        rleaves = [qs, ks, vs] + ([ts] if rpb else []) + ([bs] if ab else [])
        rgrads = torch.autograd.grad(ref, rleaves, do.double())
    finally:
        os.environ.pop("VISIONATTN_NA_IMPL")
    errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, rgrads)]
    tol = 2e-2 if dtype != torch.float32 else 1e-3
    add(
        dict(
            check=name,
            dtype=str(dtype).split(".")[-1],
            max_rel_err=max(errs),
            ok=max(errs) < tol and all(map(lambda e: e == e, errs)),
        )
    )


DTYPES = [
    getattr(torch, d)
    for d in os.environ.get("GPU_CHECK_DTYPES", "bfloat16,float16,float32").split(",")
]
for dt in DTYPES:
    na_case("na2d effvit dqk16 dv64 win7", 4, 14, 14, 4, 16, 64, 7, stride=7, dtype=dt)
    na_case("na2d dqk64 dv16", 2, 20, 20, 2, 64, 16, 5, dtype=dt)
    na_case("na2d dqk48 dv16 dil2", 2, 24, 24, 2, 48, 16, 5, dil=2, dtype=dt)
    na_case("na2d dinat k7 d8 rpb", 2, 56, 56, 2, 32, 32, 7, dil=8, rpb=True, dtype=dt)
    na_case("na2d halo zero k14 s8", 2, 32, 32, 2, 64, 64, 14, stride=8, border="zero", dtype=dt)
    na_case("na2d nat hd12 rpb", 2, 28, 28, 2, 12, 12, 7, rpb=True, dtype=dt)
    # rpb read in-kernel + batch-summed (atomic) / per-batch logit gradients
    na_case("na2d maxvit block w7 rpb B8", 8, 28, 28, 2, 32, 32, 7, stride=7, rpb=True, dtype=dt)
    na_case("na2d maxvit grid w7 rpb B8", 8, 28, 28, 2, 32, 32, 7, 7, 4, rpb=True, dtype=dt)
    na_case("na2d rpb + attn_bias b1 B4", 4, 20, 20, 2, 32, 32, 5, rpb=True, ab="b1", dtype=dt)
    na_case("na2d rpb + attn_bias full B3", 3, 20, 20, 2, 32, 32, 5, 1, 2, rpb=True, ab="full",
            dtype=dt)  # fmt: skip
    na_case("na2d halo attn_bias b1 B4", 4, 32, 32, 2, 32, 32, 14, 8, border="zero", ab="b1",
            dtype=dt)  # fmt: skip

# routed attention vs its reference, bf16
g = torch.Generator(device="cuda").manual_seed(1)
for topk in (1, 4, 49):
    q, k, v = (
        torch.randn(
            2, 28, 28, 4, 32, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True
        )
        for _ in range(3)
    )
    idx = torch.randint(0, 49, (2, 49, topk), device="cuda", generator=g)
    out = routed_attention(q, k, v, idx, n_win=7, scale=0.1)
    do = torch.randn_like(out)
    gr = torch.autograd.grad(out, [q, k, v], do)
    os.environ["VISIONATTN_ROUTED_IMPL"] = "reference"
    try:
        qs, ks, vs = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        ref = routed_attention(qs, ks, vs, idx, n_win=7, scale=0.1)
        rg = torch.autograd.grad(ref, [qs, ks, vs], do.double())
    finally:
        os.environ.pop("VISIONATTN_ROUTED_IMPL")
    e = max([rel(out, ref)] + [rel(a, b) for a, b in zip(gr, rg)])
    add(dict(check=f"routed 28x28 nwin7 topk{topk}", dtype="bfloat16", max_rel_err=e, ok=e < 2e-2))

# every family's tiny model: bf16 autocast forward+backward on CUDA vs fp32 CPU forward
for name in [n for n in visionattn.list_models() if n.startswith("test_")]:
    torch.manual_seed(0)
    m = timm.create_model(name).eval()
    size = m.pretrained_cfg["input_size"][1:]
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = m(x)
    mc = m.cuda()
    t0 = time.time()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = mc(x.cuda())
    out.float().square().mean().backward()
    nograd = [n for n, p in mc.named_parameters() if p.grad is None]
    e = rel(out.float().cpu(), ref)
    add(
        dict(
            check=f"model {name} bf16 fwd+bwd",
            dtype="bf16-autocast",
            max_rel_err=e,
            ok=e < 5e-2 and not nograd and bool(torch.isfinite(out).all()),
        )
    )

dev = torch.cuda.get_device_name()
print(
    json.dumps(dict(gpu=dev, torch=torch.__version__, rows=rows)),
    file=open(os.path.join(os.environ.get("OUT", "."), "gpu_check.json"), "w"),
)
print(f"\n{dev} torch {torch.__version__}")
print(f"{'check':42s} {'dtype':14s} {'max rel err':>12s}  ok")
for r in rows:
    print(
        f"{r['check']:42s} {r['dtype']:14s} {r['max_rel_err']:12.2e}  {'OK' if r['ok'] else 'FAIL'}"
    )
print(f"{sum(r['ok'] for r in rows)}/{len(rows)} ok")

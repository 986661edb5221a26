"""SASS instruction counts of the neighbourhood- and routed-attention launches, without a GPU.

Captures the forward, dq and dk/dv launches that ``visionattn.kernels.na_triton`` (or, with
``--op routed``, ``routed_triton``) would make for one problem (the launchers are swapped for
recorders), compiles each kernel for a CUDA
target with Triton's bundled ``ptxas`` and disassembles it with its ``nvdisasm``. Prints,
per kernel, the instructions of each loop (innermost first), registers and stack (spill)
bytes. Counts come from the local Triton, which may differ from the GPU image's; they guide
a change, the GPU measures it (kernels/NOTES.md, session 11; kernels/NOTES_routed.md).

    python tools/sass_counts.py --shape 64,56,56 --heads 2 --head-dim 32 --kernel 7
    python tools/sass_counts.py ... --rpb --tune '{"maxnreg": 128}'
    python tools/sass_counts.py --op routed --shape 64,28,28 --heads 4 --n-win 7 --topk 4
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable

import torch
import triton
from triton.backends.compiler import GPUTarget

from visionattn.kernels import na_triton, routed_triton
from visionattn.kernels._common import NAParams
from visionattn.kernels._launch import DirectLauncher

_DTYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
_DTYPES.update({torch.int32: "*i32", torch.int64: "*i64"})


def capture(call: Callable[[], object], module=na_triton) -> list[dict]:
    """The launches ``call`` makes through ``module``'s launchers (every
    :class:`~visionattn.kernels._launch.DirectLauncher` attribute: the NA or the routed
    kernels), in order, without running them; ``launcher`` names the attribute."""
    records: list[dict] = []
    names = [n for n, obj in vars(module).items() if isinstance(obj, DirectLauncher)]

    def recorder(name, kernel):
        def record(grid, tensors, scalars, consts=None, opts=None, meta_key=(), runs=None):
            records.append(
                dict(launcher=name, kernel=kernel, tensors=tensors, scalars=scalars,
                     consts=dict(consts or {}), opts=dict(opts or {}))
            )  # fmt: skip

        return record

    saved = {n: getattr(module, n) for n in names}
    for n in names:
        setattr(module, n, recorder(n, saved[n].fn))
    try:
        call()
    finally:
        for n in names:
            setattr(module, n, saved[n])
    return records


def compile_launch(rec: dict, arch: int = 90):
    """Compile one recorded launch with the JIT's specialisations: ints equal to 1 become
    constants and ints divisible by 16 carry the divisibility hint, except the parameters the
    kernel does not specialise; pointers are 16-byte aligned."""
    fn = rec["kernel"]
    names = fn.arg_names
    constexpr_params = {p.name for p in fn.params if p.is_constexpr}
    keep = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    values = dict(zip(names, (*rec["tensors"], *rec["scalars"])))
    signature, attrs, constants = {}, {}, dict(rec["consts"])
    for i, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = values[name]
        if name in constexpr_params:
            constants[name], signature[name] = value, "constexpr"
        elif isinstance(value, torch.Tensor):
            signature[name] = _DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif name not in keep and value == 1:
            constants[name], signature[name] = 1, "constexpr"
        else:
            signature[name] = "i32"
            if name not in keep and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": 4, "num_stages": 3, **rec["opts"]}
    opts = triton.compiler.make_backend(target).parse_options(options)
    return triton.compile(src, target=target, options=opts.__dict__)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _run_on_cubin(tool: str, args: list[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool(tool), *args, f.name], capture_output=True, text=True).stdout


def loop_counts(sass: str) -> list[tuple[int, collections.Counter]]:
    """``(instructions, opcode counts)`` of every loop (a branch back to a label), in address
    order of the branch: inner loops come before the loops that contain them."""
    label_at, current = {}, None
    lines, addrs = [], []
    for line in sass.splitlines():
        m = re.match(r"\s*\.L_x_(\d+):", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/", line)
        if m:
            addr = int(m.group(1), 16)
            if current is not None:
                label_at[current], current = addr, None
            lines.append(line)
            addrs.append(addr)
    loops = []
    for line, addr in zip(lines, addrs):
        m = re.search(r"BRA\s+`\(\.L_x_(\d+)\)", line)
        start = label_at.get(m.group(1)) if m else None
        if start is None or start >= addr:
            continue
        ops = collections.Counter()
        for body, a in zip(lines, addrs):
            if start <= a <= addr:
                op = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", body)
                if op:
                    ops[op.group(1)] += 1
        loops.append((sum(ops.values()), ops))
    return loops


def report(rec: dict, label: str, arch: int = 90) -> dict:
    compiled = compile_launch(rec, arch)
    cubin = compiled.asm["cubin"]
    sass = _run_on_cubin("nvdisasm", ["-c"], cubin)
    usage = _run_on_cubin("cuobjdump", ["--dump-resource-usage"], cubin)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    total = sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line))
    loops = loop_counts(sass)
    return dict(
        kernel=label,
        instructions=total,
        registers=int(m.group(1)) if m else None,
        stack_bytes=int(m.group(2)) if m else None,
        loops=[n for n, _ in loops],
        innermost_ops=dict(loops[0][1].most_common(12)) if loops else {},
        launch=rec["opts"],
    )


def routed_reports(
    b: int,
    h: int,
    w: int,
    n_win: int,
    topk: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    tune: dict,
    arch: int = 90,
) -> list[dict]:
    """Reports of the routed forward, dq and dK/dV launches for one BiFormer-like problem
    (``n_win`` tiles per axis, ``topk`` routed tiles per query tile, indices shared by the
    heads, BiFormer's scale)."""
    q, k, v = torch.zeros(b, h, w, 3, heads, head_dim, dtype=dtype).unbind(3)
    n_tiles = n_win * n_win
    idx = (torch.arange(n_tiles * topk) % n_tiles).reshape(1, n_tiles, topk).expand(b, -1, -1)
    tiles = (h // n_win, w // n_win, h // n_win, w // n_win)
    scale = (heads * head_dim) ** -0.5
    saved = dict(routed_triton.TUNE)
    routed_triton.TUNE.update(tune)
    try:
        out = torch.zeros_like(q)
        lse = torch.zeros(q.shape[:-1])
        fwd = capture(lambda: routed_triton.routed_fwd(q, k, v, idx, tiles, scale), routed_triton)
        bwd = capture(
            lambda: routed_triton.routed_bwd(out, q, k, v, idx, out, lse, None, tiles, scale),
            routed_triton,
        )
        kernels = [r for r in bwd if r["launcher"] in ("_dq_launch", "_dkv_launch")]
        return [report(rec, label, arch) for rec, label in zip([fwd[0], *kernels],
                                                                ("forward", "dq", "dk/dv"))]  # fmt: skip
    finally:
        routed_triton.TUNE.clear()
        routed_triton.TUNE.update(saved)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--op", choices=["na", "routed"], default="na")
    ap.add_argument("--n-win", type=int, default=7, help="routed: tiles per axis")
    ap.add_argument("--topk", type=int, default=4, help="routed: routed tiles per query tile")
    ap.add_argument("--shape", default="2,56,56", help="batch,H,W (the map is 2-D)")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--kernel", type=int, default=7)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--dilation", type=int, default=1)
    ap.add_argument("--border", choices=["clamp", "zero"], default="clamp")
    ap.add_argument("--rpb", action="store_true", help="with a relative position bias table")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    ap.add_argument(
        "--tune", default="{}", help="JSON dict merged into na_triton._TUNE (routed: its TUNE)"
    )
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    b, h, w = (int(x) for x in args.shape.split(","))
    if args.op == "routed":
        for rep in routed_reports(b, h, w, args.n_win, args.topk, args.heads, args.head_dim,
                                  dtype, json.loads(args.tune), args.arch):  # fmt: skip
            print(json.dumps(rep))
        return 0
    qkv = torch.zeros(b, h, w, 3, args.heads, args.head_dim, dtype=dtype)
    q, k, v = qkv.unbind(3)
    ks, st, dl = args.kernel, args.stride, args.dilation
    p = NAParams((ks, ks), (st, st), (dl, dl), (False, False), args.border == "zero",
                 args.head_dim**-0.5)  # fmt: skip
    rpb = torch.zeros(args.heads, 2 * ks - 1, 2 * ks - 1, dtype=dtype) if args.rpb else None
    na_triton._TUNE.update(json.loads(args.tune))
    if na_triton._win_plan(q, v.shape[-1], p) is not None:
        print("the whole-window kernel takes this problem: not covered here")
        return 1
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[:-1])
    fwd = capture(lambda: na_triton.forward(q, k, v, rpb, None, p))
    bwd = capture(
        lambda: na_triton.backward(out, None, q, k, v, out, lse, rpb, None, p, args.rpb, False)
    )
    recs = [(fwd[0], "forward"), (bwd[0], "dq"), (bwd[-1], "dk/dv")]
    for rec, label in recs:
        print(json.dumps(report(rec, label, args.arch)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

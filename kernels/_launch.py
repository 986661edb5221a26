"""Cached direct launches of compiled Triton kernels, shared by every op in this package.

Triton's per-call path (``kernel[grid](...)``) binds every argument, builds the
specialisation key and looks the binary up: 50-100 us per launch on the lent H200's host for
our 60-85-argument kernels, more than the GPU time of a small windowed or routed attention
call. :class:`DirectLauncher` pays that once per launch signature and afterwards calls the
compiled binary's launcher directly.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["DirectLauncher", "has_maxnreg"]

_OFF = ("0", "false", "False")


class DirectLauncher:
    """``fn[grid](*tensors, *scalars, **consts, **opts)`` with less host time on repeats.

    The first launch of a signature goes through Triton (which compiles or finds the binary);
    later launches with the same signature call that binary's launcher directly. The signature
    is everything Triton specialises on or bakes in: the current device, the grid, the scalar
    values, the constexprs and options (``meta_key``, a hashable summary of both), and every
    tensor's dtype and 16-byte alignment. A caller that caches launch plans may pass ``runs``,
    a dict owned by the plan, whose own key already fixes all but the device and the
    alignment: then an all-aligned launch is looked up by device alone.

    Interpreted kernels (``TRITON_INTERPRET=1``) always take Triton's path, as does every
    launch when ``VISIONATTN_FAST_LAUNCH=0`` (or the op's own ``env`` switch) is set, or when
    the installed Triton's compiled kernels have no ``kernel[grid]`` launcher.
    """

    def __init__(self, fn: Any, env: str) -> None:
        self.fn = fn
        self.cache: dict = {}
        flags = (os.environ.get("VISIONATTN_FAST_LAUNCH", "1"), os.environ.get(env, "1"))
        self.direct = type(fn).__name__ != "InterpretedFunction" and not any(
            f in _OFF for f in flags
        )

    def __call__(
        self,
        grid: tuple,
        tensors: tuple,
        scalars: tuple,
        consts: dict | None = None,
        opts: dict | None = None,
        meta_key: tuple = (),
        runs: dict | None = None,
    ) -> None:
        consts = consts or {}
        opts = opts or {}
        if not self.direct:
            self.fn[grid](*tensors, *scalars, **consts, **opts)
            return
        ptrs = 0
        for t in tensors:
            ptrs |= t.data_ptr()
        aligned = ptrs & 15 == 0
        device = torch.cuda.current_device()
        if runs is not None and aligned:
            key: Any = device
        else:
            runs = self.cache
            align = True if aligned else tuple(t.data_ptr() % 16 == 0 for t in tensors)
            key = (device, grid, scalars, meta_key, align, tuple(t.dtype for t in tensors))
        hit = runs.get(key)
        if hit is not None:
            run, cvals = hit
            run(*tensors, *scalars, *cvals)
            return
        kernel = self.fn[grid](*tensors, *scalars, **consts, **opts)
        runner: Callable | None = getattr(kernel, "__getitem__", None)
        names = self.fn.arg_names[len(tensors) + len(scalars) :]
        if runner is None or set(names) != set(consts):
            return  # unknown Triton API or argument layout: keep Triton's path
        if len(runs) > 4096:  # many distinct signatures: start over rather than grow
            runs.clear()
        runs[key] = (kernel[(*grid, 1, 1)[:3]], tuple(consts[n] for n in names))


@functools.lru_cache(maxsize=1)
def has_maxnreg() -> bool:
    """Whether this Triton's CUDA backend takes a ``maxnreg`` launch option (a register cap)."""
    try:
        import dataclasses

        from triton.backends.nvidia.compiler import CUDAOptions

        return any(f.name == "maxnreg" for f in dataclasses.fields(CUDAOptions))
    except Exception:  # pragma: no cover - other backend layouts: no cap
        return False

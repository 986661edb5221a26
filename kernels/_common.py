"""Shared argument handling and window geometry for the local-attention kernels.

Everything here is plain PyTorch / Python so it can be imported by every kernel module and by
the routed-attention helper without pulling in Triton.

Window geometry (per axis, length ``L``, kernel ``k``, stride ``s``, dilation ``d``):

* A query at index ``i`` belongs to dilation group ``g = i % d`` and has group coordinate
  ``i' = i // d``; the group holds ``L_g = ceil((L - g) / d)`` positions. Keys are only taken
  from the query's own group, so every formula below runs in group coordinates and a key's
  real index is ``j = j' * d + g``.
* Non-causal: the stride group ``i' // s`` has leader ``(i' // s) * s + s // 2`` (its centre,
  right-centre for even strides). The window starts ``k // 2`` before the leader, i.e. even
  kernels take ``k/2`` keys before and ``k/2 - 1`` after.
  - ``border="clamp"`` (NATTEN): the leader is capped at ``L_g - 1`` and the window start is
    clamped into ``[0, L_g - k]`` so every query sees exactly ``k`` keys of the map.
  - ``border="zero"``: no clamping; window positions outside ``[0, L_g)`` are zero keys and
    zero values that still take part in the softmax (their logit is the bias alone).
* Causal: the leader is the last query of the stride group (capped at ``L_g - 1`` for clamp),
  the window is ``[leader - k + 1, leader]`` and keys after the query are masked out. With
  ``border="clamp"`` positions before the map are masked; with ``"zero"`` they are zero keys.
* A window always contains its query, so ``|j' - i'| <= k - 1`` and the relative-position
  bias index ``j' - i' + k - 1`` stays inside a ``2k - 1`` table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

__all__ = [
    "NAParams",
    "impl_choice",
    "axis_windows",
    "check_na_args",
    "next_pow2",
    "normalize_tuple",
    "window_tables",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class NAParams(NamedTuple):
    """Normalised neighbourhood-attention arguments (all tuples have one entry per axis)."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    zero_border: bool
    scale: float


def next_pow2(x: int, minimum: int = 16) -> int:
    """Smallest power of two ``>= max(x, minimum)``."""
    return max(minimum, 1 << max(0, int(x) - 1).bit_length())


def normalize_tuple(value: object, n: int, name: str, *, kind: type = int) -> tuple:
    """Turn an int/bool or a length-``n`` sequence into an ``n``-tuple, checking the type."""
    if kind is bool:
        if isinstance(value, bool):
            return (value,) * n
        if isinstance(value, Sequence) and not isinstance(value, str):
            vals = tuple(value)
            if len(vals) == n and all(isinstance(v, bool) for v in vals):
                return vals
        raise TypeError(f"{name} must be a bool or a sequence of {n} bools, got {value!r}")
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, Sequence) and not isinstance(value, str):
        vals = tuple(value)
        if len(vals) == n and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            return vals
    raise TypeError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")


def _check_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_na_args(
    n: int,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: object,
    stride: object,
    dilation: object,
    is_causal: object,
    rpb: Tensor | None,
    attn_bias: Tensor | None,
    scale: float | None,
    border: str,
) -> NAParams:
    """Validate every argument of ``na{n}d`` and return the normalised parameters.

    Raises ``TypeError``/``ValueError`` naming the offending argument and the constraint.
    """
    q = _check_tensor(q, "q")
    k = _check_tensor(k, "k")
    v = _check_tensor(v, "v")
    rank = n + 3
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(
                f"{name} must have {rank} dims [B, {', '.join(f'S{i}' for i in range(n))}, "
                f"heads, head_dim] for na{n}d, got shape {tuple(t.shape)}"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.shape != q.shape:
        raise ValueError(f"k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"v shape {tuple(v.shape)} must match q shape {tuple(q.shape)} in every dim but "
            "the last (v may have its own head_dim)"
        )
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError("head_dim of q/k and v must be >= 1")
    spatial = tuple(q.shape[1 : 1 + n])
    if q.shape[0] < 1 or any(s < 1 for s in spatial) or q.shape[-2] < 1:
        raise ValueError(f"q must have non-empty batch, spatial and head dims, got {q.shape}")

    ks = normalize_tuple(kernel_size, n, "kernel_size")
    st = normalize_tuple(stride, n, "stride")
    dl = normalize_tuple(dilation, n, "dilation")
    ca = normalize_tuple(is_causal, n, "is_causal", kind=bool)
    if any(x < 1 for x in ks):
        raise ValueError(f"kernel_size must be >= 1 on every axis, got {ks}")
    if any(x < 1 for x in st):
        raise ValueError(f"stride must be >= 1 on every axis, got {st}")
    if any(x < 1 for x in dl):
        raise ValueError(f"dilation must be >= 1 on every axis, got {dl}")
    if any(s > kk for s, kk in zip(st, ks)):
        raise ValueError(f"stride {st} must not exceed kernel_size {ks} on any axis")
    if any(kk * d > L for kk, d, L in zip(ks, dl, spatial)):
        raise ValueError(
            f"kernel_size * dilation must not exceed the map size on any axis: "
            f"kernel_size={ks}, dilation={dl}, spatial size={spatial}"
        )
    if border not in ("clamp", "zero"):
        raise ValueError(f"border must be 'clamp' or 'zero', got {border!r}")

    heads = q.shape[-2]
    if rpb is not None:
        rpb = _check_tensor(rpb, "rpb")
        want = (heads, *(2 * kk - 1 for kk in ks))
        if tuple(rpb.shape) != want:
            raise ValueError(
                f"rpb must have shape [heads, 2k-1, ...] = {list(want)}, got {list(rpb.shape)}"
            )
        if rpb.device != q.device:
            raise ValueError(f"rpb is on {rpb.device} but q is on {q.device}")
    if attn_bias is not None:
        attn_bias = _check_tensor(attn_bias, "attn_bias")
        want_tail = (*spatial, *ks)
        ok = (
            attn_bias.dim() == 2 + 2 * n
            and attn_bias.shape[0] in (1, q.shape[0])
            and attn_bias.shape[1] in (1, heads)
            and tuple(attn_bias.shape[2:]) == want_tail
        )
        if not ok:
            raise ValueError(
                "attn_bias must have shape [B or 1, heads or 1, *spatial, *kernel_size] = "
                f"[{q.shape[0]}|1, {heads}|1, {', '.join(map(str, want_tail))}], "
                f"got {list(attn_bias.shape)}"
            )
        if attn_bias.device != q.device:
            raise ValueError(f"attn_bias is on {attn_bias.device} but q is on {q.device}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    elif not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    return NAParams(ks, st, dl, ca, border == "zero", float(scale))


def axis_windows(
    L: int,
    k: int,
    s: int,
    d: int,
    causal: bool,
    zero_border: bool,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Window of every query along one axis.

    Returns ``(key, in_map, allowed, rel)``, each ``[L, k]``: the real key index of each
    window position (may be outside ``[0, L)`` for ``border="zero"``), whether it lies in the
    map, whether it takes part in the softmax (False = masked, e.g. causal), and the
    relative-position index ``j' - i' + k - 1`` into a ``2k - 1`` bias table.
    """
    i = torch.arange(L, device=device)
    g = i % d
    ip = i // d
    lg = torch.div(L - g + d - 1, d, rounding_mode="floor")
    if causal:
        leader = (ip // s) * s + (s - 1)
        if not zero_border:
            leader = torch.minimum(leader, lg - 1)
        start = leader - (k - 1)
    else:
        leader = (ip // s) * s + s // 2
        if not zero_border:
            leader = torch.minimum(leader, lg - 1)
        start = leader - k // 2
        if not zero_border:
            start = torch.minimum(torch.clamp(start, min=0), lg - k)
    t = torch.arange(k, device=device)
    jp = start[:, None] + t[None, :]
    in_map = (jp >= 0) & (jp < lg[:, None])
    if causal:
        allowed = jp <= ip[:, None]
        if not zero_border:
            allowed = allowed & in_map
    else:
        allowed = torch.ones_like(in_map)
    key = jp * d + g[:, None]
    rel = jp - ip[:, None] + (k - 1)
    return key, in_map, allowed, rel


def window_tables(
    spatial: Sequence[int], p: NAParams, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flattened window tables over all axes, each ``[N, K]`` (``N = prod(spatial)``,
    ``K = prod(kernel_size)``, both row-major).

    Returns ``(key, in_map, allowed, rel)``: flat key index (``N`` marks a zero-padding key),
    in-map flag, softmax-participation flag, flat index into the ``prod(2k-1)`` bias table.
    """
    n = len(spatial)
    key = in_map = allowed = rel = None
    for a in range(n):
        L, kk = spatial[a], p.kernel_size[a]
        ka, ma, aa, ra = axis_windows(
            L, kk, p.stride[a], p.dilation[a], p.is_causal[a], p.zero_border, device
        )
        ka = ka.clamp(0, L - 1)
        if key is None:
            key, in_map, allowed, rel = ka, ma, aa, ra
            continue
        # Outer product of the previous axes (rows x cols) with this axis.
        key = (key[:, None, :, None] * L + ka[None, :, None, :]).reshape(key.shape[0] * L, -1)
        in_map = (in_map[:, None, :, None] & ma[None, :, None, :]).reshape(key.shape)
        allowed = (allowed[:, None, :, None] & aa[None, :, None, :]).reshape(key.shape)
        rel = (rel[:, None, :, None] * (2 * kk - 1) + ra[None, :, None, :]).reshape(key.shape)
    n_tokens = math.prod(spatial)
    key = torch.where(in_map, key, torch.full_like(key, n_tokens))
    return key, in_map, allowed, rel


def _arg_key(x: object) -> object:
    """Hashable, type-exact key of one API argument: tensors by (type, shape, dtype, device),
    scalars by (type, value) so ``3``, ``3.0`` and ``True`` never share an entry (only some of
    them are valid), sequences element-wise; anything else raises TypeError (not memoised)."""
    if isinstance(x, Tensor):
        return (type(x), tuple(x.shape), x.dtype, x.device)
    if x is None or isinstance(x, (bool, int, float, str)):
        return (type(x), x)
    if isinstance(x, (list, tuple)):
        return tuple(_arg_key(e) for e in x)
    raise TypeError(f"not memoisable: {type(x).__name__}")


class CheckMemo:
    """Results of an op's argument checks, memoised on everything they look at.

    A model repeats the same few calls every step and a full validation costs tens of
    microseconds of Python per call, more than a small kernel. Only successful checks are
    stored, so bad arguments always reach the checker and its error messages; under
    ``torch.compile`` nothing is memoised (shapes may be symbolic). Bounded, not LRU: real
    workloads have a handful of signatures.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.results: dict = {}

    def __call__(self, check, *args: object):
        """``check(*args)``, or its stored result for arguments with the same key."""
        key = None
        if not torch.compiler.is_compiling():
            try:
                key = tuple(_arg_key(a) for a in args)
                hash(key)
            except TypeError:
                key = None
        if key is not None:
            hit = self.results.get(key)
            if hit is not None:
                return hit
        result = check(*args)
        if key is not None:
            if len(self.results) >= self.size:
                self.results.clear()
            self.results[key] = result
        return result


def impl_choice(env: str) -> str:
    """An op's implementation override from the environment variable ``env``: ``"auto"``
    (default: Triton on CUDA, the reference elsewhere), ``"triton"`` or ``"reference"``."""
    choice = os.environ.get(env, "auto").lower()
    if choice not in ("auto", "triton", "reference"):
        raise ValueError(f"{env} must be 'auto', 'triton' or 'reference', got {choice!r}")
    return choice


def eager_call(q: Tensor) -> bool:
    """Whether an op call may skip its ``torch.library`` custom op for the cheaper direct
    path: not while tracing, not for tensor subclasses (FakeTensor, DTensor, ...) and not
    under a dispatch mode (FakeTensorMode, ...), which need the custom op's fake impl and
    registration."""
    return (
        not torch.compiler.is_compiling() and type(q) is Tensor and _current_dispatch_mode() is None
    )

"""Agent attention: the computation shared by the Agent-DeiT / PVT / Swin / CSwin families.

Paper: `Agent Attention: On the Integration of Softmax and Linear Attention`
(Han, Ye, Han, Xia, Pan, Wan, Song, Huang; ECCV 2024) - https://arxiv.org/abs/2312.08874
Official code: https://github.com/LeapLabTHU/Agent-Attention (``agent_transformer/models``).

For queries ``Q [N, d]``, keys/values ``K, V [M, d]`` of one head, ``A`` agent tokens
(average-pooled queries on a ``g x g`` grid) and learned position biases:

* aggregation: ``V_A = softmax(A K^T * scale + B_ak) V``       (agents attend to the keys)
* broadcast:   ``O   = softmax(Q A^T * scale + B_qa) V_A``     (queries attend to the agents)
* plus a depthwise 3x3 convolution of ``V`` over the token map (the "diversity" term).

In inference both softmax steps run through ``F.scaled_dot_product_attention`` with the bias
as an additive ``attn_mask`` (broadcast over the batch, never repeated per image), so no
``[B, heads, N, A]`` score tensor is materialised. In training with a learned bias, the
fused kernels' backward (which also has to produce the bias gradient) is slow when A <= 64
agents meet >= 1024 tokens; there the scores are small (``A / d`` times the size of q) and the
two steps run as matmul + softmax (``VISIONATTN_AGENT_ATTN=sdpa|math`` forces either path).

Biases, per head (official parameter names and shapes, see :func:`init_agent_biases`):

* ``an_bias [heads, A, 7, 7]`` bilinearly resized to the key map, plus the separable
  ``ah_bias [1, heads, A, Hk, 1] + aw_bias [1, heads, A, 1, Wk]`` -> ``B_ak [heads, A, Hk*Wk]``;
* ``na_bias [heads, A, 7, 7]`` resized to the query map, plus
  ``ha_bias [1, heads, Hq, 1, A] + wa_bias [1, heads, 1, Wq, A]`` -> ``B_qa [heads, Hq*Wq, A]``.

The biases depend only on parameters and sizes: in eval each module memoises its pair
(:func:`map_biases`); in training each model or stage builds its blocks' pairs together, one
build per group of equal table shapes (:func:`map_biases_group`), and either way they are laid out as SDPA's memory-efficient
kernel takes them (row-major, aligned rows).

At another running resolution the separable terms are bilinearly resized along their map axis,
as the official detection / segmentation backbones do (they resize ``ah + aw`` jointly; bilinear
resizing is separable and its weights sum to one, so resizing each term is the same map). At
the size they were trained for nothing is resized.

Token layout: ``[B, N, C]`` row-major over an ``H x W`` map; heads-first ``[B, heads, N, d]``
views (:func:`split_heads`) feed the attention.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from visionattn.backbones._layers import (
    AutocastLayerNorm,  # noqa: F401  (re-exported)
    autocast_dtype,  # noqa: F401  (re-exported)
    module_memo,
    tensors_key,
)

__all__ = [
    "agent_aggregate",
    "agent_attention",
    "agent_broadcast",
    "AutocastLayerNorm",
    "agent_cfg",
    "agent_grid",
    "fit_agent_biases",
    "agent_key_bias",
    "check_agent_shapes",
    "dwc_tokens",
    "eval_memo",
    "full_precision",
    "init_agent_biases",
    "map_biases",
    "map_biases_group",
    "merge_heads",
    "pool_agents",
    "query_agent_bias",
    "resize_agent_axis",
    "resize_axis",
    "run_blocks",
    "split_heads",
]


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    t = (size, size) if isinstance(size, int) else tuple(size)
    if len(t) != 2 or not all(isinstance(s, int) and s > 0 for s in t):
        raise ValueError(f"{name}: must be a positive int or a pair of them, got {size!r}")
    return t  # type: ignore[return-value]


def agent_grid(num_agents: int) -> tuple[int, int]:
    """The ``g x g`` pooling grid of ``num_agents`` agent tokens (must be a perfect square)."""
    g = math.isqrt(num_agents) if isinstance(num_agents, int) and num_agents > 0 else 0
    if g * g != num_agents or g == 0:
        raise ValueError(f"num_agents: must be a positive perfect square, got {num_agents!r}")
    return g, g


# ----------------------------------------------------------------------------------------------
# agent tokens


def _bins(n: int, g: int, device: torch.device) -> Tensor:
    """``[g, n]`` 0/1 membership of adaptive-pooling bins ``floor(i*n/g) : ceil((i+1)*n/g)``."""
    i = torch.arange(g, device=device)[:, None]
    pos = torch.arange(n, device=device)[None, :]
    return ((pos >= (i * n) // g) & (pos < ((i + 1) * n + g - 1) // g)).float()


def _build_pool_matrix(
    size: tuple[int, int],
    grid: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
    skip: int = 0,
) -> tuple[Tensor, Tensor]:
    # tensor ops only, so torch.compile traces it without a graph break
    member = torch.kron(_bins(size[0], grid[0], device), _bins(size[1], grid[1], device))
    member = F.pad(member, (skip, 0))  # leading tokens in no bin
    inv = 1.0 / member.sum(1, keepdim=True).double()
    return member.to(dtype), inv.to(torch.promote_types(dtype, torch.float32))


@lru_cache(maxsize=64)
def _cached_pool_matrix(
    size: tuple[int, int],
    grid: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
    skip: int,
) -> tuple[Tensor, Tensor]:
    return _build_pool_matrix(size, grid, device, dtype, skip)


def _pool_matrix(
    size: tuple[int, int],
    grid: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
    skip: int = 0,
) -> tuple[Tensor, Tensor]:
    """0/1 bin-membership matrix ``[gh*gw, skip + H*W]`` of adaptive average pooling (agents
    and tokens both row-major; the ``skip`` leading tokens in no bin) in ``dtype`` (0/1 are
    exact in any dtype) and the reciprocal bin sizes ``[gh*gw, 1]`` in ``dtype`` promoted to at
    least float32; cached per dtype in eager mode (no cast per call), rebuilt from tensor ops
    while compiling."""
    if torch.compiler.is_compiling():
        return _build_pool_matrix(size, grid, device, dtype, skip)
    return _cached_pool_matrix(size, grid, device, dtype, skip)


def pool_agents(
    tokens: Tensor, size: int | Sequence[int], grid: int | Sequence[int], skip: int = 0
) -> Tensor:
    """Agent tokens: ``F.adaptive_avg_pool2d`` of the ``H x W`` token map onto ``grid``.

    Args:
        tokens: ``[B, skip + H*W, C]``: ``skip`` leading tokens (e.g. a class token, left out of
            the pooling) then the row-major map tokens (any strides, e.g. a slice of a fused
            qkv). Pooling past them instead of slicing them off spares the slice's backward
            (a zero-filled copy of the gradient).
        size: ``(H, W)`` of the token map.
        grid: ``(gh, gw)`` pooling grid (``agent_grid(num_agents)``).

    Returns:
        ``[B, gh*gw, C]`` in ``tokens``' dtype, agents row-major over the grid. Computed as one
        matmul with the pooling matrix (reads ``tokens`` in place, no NCHW copy); bins are
        summed by the matmul and divided by their size in float32 (float64 for float64).
    """
    h, w = _pair(size, "size")
    grid = _pair(grid, "grid")
    if not isinstance(skip, int) or skip < 0:
        raise ValueError(f"skip: must be a non-negative int, got {skip!r}")
    if tokens.dim() != 3 or tokens.shape[1] != skip + h * w:
        raise ValueError(
            f"tokens: expected [B, {skip + h * w}, C] for size {(h, w)} and skip {skip}, got "
            f"{tuple(tokens.shape)}"
        )
    member, inv = _pool_matrix((h, w), grid, tokens.device, tokens.dtype, skip)
    summed = torch.matmul(member, tokens)
    # the division in float32 at least (bf16 1/size would be inexact)
    return (summed * inv).to(tokens.dtype)


# ----------------------------------------------------------------------------------------------
# heads


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[B, N, C]`` -> ``[B, heads, N, C // heads]`` (a view, no copy)."""
    B, N, C = x.shape
    if C % num_heads:
        raise ValueError(f"num_heads: {num_heads} must divide the channel count {C}")
    return x.unflatten(-1, (num_heads, C // num_heads)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``[B, heads, N, d]`` -> ``[B, N, heads * d]`` (a view when the heads are interleaved in
    memory, as SDPA's outputs are)."""
    B, nh, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, nh * d)


# ----------------------------------------------------------------------------------------------
# attention


def _mask(bias: Tensor | None, like: Tensor) -> Tensor | None:
    if bias is None:
        return None
    if not bias.is_floating_point():
        raise TypeError(f"bias: must be a floating-point additive bias, got {bias.dtype}")
    return bias.to(like.dtype)


# Measured on an H200 (bf16, training step): matmul + softmax beat SDPA by ~12% on
# agent_swin_tiny (3136 tokens, 9 agents in stage 1) and lost by ~30% on agent_deit_tiny
# (196 tokens, 49 agents).
_MATH_MAX_AGENTS = 64
_MATH_MIN_TOKENS = 1024


def _attend(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float | None, dropout_p: float
) -> Tensor:
    mask = _mask(bias, q)
    mode = os.environ.get("VISIONATTN_AGENT_ATTN", "auto")
    if mode not in ("auto", "sdpa", "math"):
        raise ValueError(f"VISIONATTN_AGENT_ATTN: must be auto, sdpa or math, got {mode!r}")
    use_math = mode == "math" or (
        mode == "auto"
        and torch.is_grad_enabled()
        and mask is not None
        and mask.requires_grad
        and min(q.shape[-2], k.shape[-2]) <= _MATH_MAX_AGENTS
        and max(q.shape[-2], k.shape[-2]) >= _MATH_MIN_TOKENS
    )
    if not use_math:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
    s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s + mask
    p = s.softmax(dim=-1).to(v.dtype)  # autocast runs softmax in float32
    if dropout_p:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v)


def agent_aggregate(
    agents: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Agents attend to the keys: ``softmax(agents k^T * scale + bias) v``.

    Args:
        agents: ``[B, heads, A, d]``; k: ``[B, heads, M, d]``; v: ``[B, heads, M, dv]``.
        bias: additive logits broadcastable to ``[B, heads, A, M]`` (e.g. ``[heads, A, M]``
            from :func:`agent_key_bias`), differentiable; cast to the agents' dtype.
        scale: logit scale, default ``d ** -0.5``.
        dropout_p: dropout on the attention weights (training only; pass 0 in eval).

    Returns:
        ``agent_v [B, heads, A, dv]``.
    """
    return _attend(agents, k, v, bias, scale, dropout_p)


def agent_broadcast(
    q: Tensor,
    agents: Tensor,
    agent_v: Tensor,
    bias: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Queries attend to the agents: ``softmax(q agents^T * scale + bias) agent_v``.

    Args:
        q: ``[B, heads, N, d]``; agents: ``[B, heads, A, d]``; agent_v: ``[B, heads, A, dv]``.
        bias: additive logits broadcastable to ``[B, heads, N, A]`` (e.g. ``[heads, N, A]``
            from :func:`query_agent_bias`), differentiable; cast to q's dtype.
        scale: logit scale, default ``d ** -0.5``.
        dropout_p: dropout on the attention weights (training only).

    Returns:
        ``[B, heads, N, dv]``.
    """
    return _attend(q, agents, agent_v, bias, scale, dropout_p)


def agent_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    agent_bias: Tensor | None = None,
    query_bias: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """:func:`agent_aggregate` then :func:`agent_broadcast` (both steps share ``scale`` and
    ``dropout_p``); shapes as there. Returns ``[B, heads, N, dv]``."""
    agent_v = agent_aggregate(agents, k, v, agent_bias, scale, dropout_p)
    return agent_broadcast(q, agents, agent_v, query_bias, scale, dropout_p)


# ----------------------------------------------------------------------------------------------
# position biases


def resize_axis(x: Tensor, dim: int, size: int) -> Tensor:
    """Linear resize of ``x`` along ``dim`` to ``size`` with ``align_corners=False`` (one axis
    of ``F.interpolate(mode="bilinear")``); ``x`` itself when the size already matches."""
    dim = dim % x.dim()
    if x.shape[dim] == size:
        return x
    t = x.movedim(dim, -1)
    lead = t.shape[:-1]
    t = F.interpolate(t.reshape(1, -1, t.shape[-1]), size=size, mode="linear")
    return t.reshape(*lead, size).movedim(-1, dim)


_MAP_BIASES = re.compile(r"(^|\.)(ah|aw|ha|wa)_bias$")


def fit_agent_biases(
    state_dict: dict[str, Tensor], target: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Resize a checkpoint's separable agent biases (``ah/aw/ha/wa_bias``) trained at another
    resolution to the model's shapes, linearly along each map axis that differs (what the
    official fine-tuning at a higher resolution does when it loads 224 px weights). In place;
    returns ``state_dict``."""
    for k, v in state_dict.items():
        if _MAP_BIASES.search(k) and k in target and target[k].shape != v.shape:
            out = v.float()
            for dim, size in enumerate(target[k].shape):
                out = resize_axis(out, dim, size)
            state_dict[k] = out.to(v.dtype)
    return state_dict


def _build_interp_matrix(n_in: int, n_out: int, device: torch.device) -> Tensor:
    eye = torch.eye(n_in, device=device)[None]
    return F.interpolate(eye, size=n_out, mode="linear")[0].t().contiguous()  # [n_out, n_in]


@lru_cache(maxsize=128)
def _cached_interp_matrix(n_in: int, n_out: int, device: torch.device) -> Tensor:
    return _build_interp_matrix(n_in, n_out, device)


def _bilinear(table: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(table, size, mode="bilinear")`` (align_corners=False) as two small
    matmuls with the separable resize matrices (the same map; PyTorch's generic bilinear
    kernel is slow on these many-channel tiny tables)."""
    if torch.compiler.is_compiling():
        get = _build_interp_matrix
    else:
        get = _cached_interp_matrix
    rh = get(table.shape[-2], size[0], table.device).to(table.dtype)
    rw = get(table.shape[-1], size[1], table.device).to(table.dtype)
    return torch.matmul(torch.matmul(rh, table), rw.t())


def agent_key_bias(
    an_bias: Tensor, ah_bias: Tensor, aw_bias: Tensor, size: int | Sequence[int]
) -> Tensor:
    """Agent -> key bias ``[heads, A, Hk*Wk]`` for a ``size = (Hk, Wk)`` key map.

    ``an_bias [heads, A, 7, 7]`` is bilinearly resized to ``size`` (as the official code does at
    every resolution); ``ah_bias [1, heads, A, h0, 1]`` / ``aw_bias [1, heads, A, 1, w0]`` are
    resized along their map axis only when ``size`` differs from ``(h0, w0)``.
    """
    hk, wk = _pair(size, "size")
    nh, na = an_bias.shape[:2]
    an = _bilinear(an_bias, (hk, wk))
    ah = resize_axis(ah_bias, 3, hk).reshape(nh, na, hk, 1)
    aw = resize_axis(aw_bias, 4, wk).reshape(nh, na, 1, wk)
    return (an + (ah + aw)).reshape(nh, na, hk * wk)


def query_agent_bias(
    na_bias: Tensor, ha_bias: Tensor, wa_bias: Tensor, size: int | Sequence[int]
) -> Tensor:
    """Query -> agent bias ``[heads, Hq*Wq, A]`` for a ``size = (Hq, Wq)`` query map.

    ``na_bias [heads, A, 7, 7]`` is bilinearly resized to ``size``; ``ha_bias
    [1, heads, h0, 1, A]`` / ``wa_bias [1, heads, 1, w0, A]`` are resized along their map axis
    only when ``size`` differs from ``(h0, w0)``.
    """
    hq, wq = _pair(size, "size")
    nh, na = na_bias.shape[:2]
    nab = _bilinear(na_bias, (hq, wq)).reshape(nh, na, hq * wq)
    ha = resize_axis(ha_bias, 2, hq).reshape(nh, hq, 1, na)
    wa = resize_axis(wa_bias, 3, wq).reshape(nh, 1, wq, na)
    return nab.transpose(1, 2) + (ha + wa).reshape(nh, hq * wq, na)


def full_precision(t: Tensor) -> torch.autocast:
    """Autocast off on ``t``'s device: the bias tables are resized and combined in their own
    (float32) precision, as the official ``F.interpolate`` does under autocast, with one cast
    at the end instead of a cast per resize matmul (and its backward)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def eval_memo(
    module: nn.Module, key: tuple, build: Callable[[], tuple[Tensor, ...]], *params: Tensor
) -> tuple[Tensor, ...]:
    """``build()``, kept on ``module`` while autograd is off (eval, outside torch.compile) and
    returned again while ``key`` and ``params`` are unchanged.

    ``params`` are the tensors ``build`` reads: an optimizer step, ``load_state_dict`` or
    ``.to()`` changes their version or storage and so rebuilds the entry. Used for the agent
    position biases, which depend only on parameters and the running map size but take ~10
    small ops per block to resize and combine: host time that dominates small-model inference.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return build()
    return module_memo(module, "_eval_memo", (key, tensors_key(*params)), build)


_TABLES = ("an_bias", "ah_bias", "aw_bias", "na_bias", "ha_bias", "wa_bias")
_CLASS_TABLES = ("ac_bias", "ca_bias")
# the head axis of each table (an/na ``[heads, ...]``, the others ``[1, heads, ...]``)
_HEAD_AXIS = {"an_bias": 0, "na_bias": 0}


def _table_names(class_token: bool) -> tuple[str, ...]:
    return _TABLES + (_CLASS_TABLES if class_token else ())


def _bias_tables(module: nn.Module, class_token: bool) -> list[Tensor]:
    return [getattr(module, n) for n in _table_names(class_token)]


def _build_biases(
    tables: Sequence[Tensor],
    grid: Sequence[int],
    key_size: Sequence[int],
    query_size: Sequence[int],
    dtype: torch.dtype,
    agent_shape: Sequence[int] | None,
) -> tuple[Tensor, Tensor]:
    """The two biases from the tables in :func:`_bias_tables` order (any number of heads)."""
    an, ah, aw, na, ha, wa, *cls = tables
    with full_precision(an):
        kb = agent_key_bias(an, ah, aw, key_size)
        qb = query_agent_bias(na, ha, wa, query_size)
        if agent_shape is not None:
            kb = resize_agent_axis(kb, 1, grid, agent_shape)
            qb = resize_agent_axis(qb, 2, grid, agent_shape)
        if cls:
            kb = torch.cat([cls[0][0], kb], dim=-1)
            qb = torch.cat([cls[1][0], qb], dim=-2)
        return _aligned(kb, dtype), _aligned(qb, dtype)


# SDPA's memory-efficient kernel needs attn_mask's last stride to be 1 (else SDPA falls back
# to its math path, in float32) and every other stride to be a multiple of 8 elements (else
# it pads the mask, and slices its gradient, at every call)
_MASK_ALIGN = 16


def _aligned(bias: Tensor, dtype: torch.dtype) -> Tensor:
    """``bias`` in ``dtype``, row-major, as a view of storage whose rows are padded to
    ``_MASK_ALIGN`` elements (laid out once where the bias is built, not inside each attention
    call). The query bias comes out of its build transposed (last stride != 1)."""
    n = bias.shape[-1]
    pad = -n % _MASK_ALIGN
    if pad:
        bias = F.pad(bias, (0, pad))
    # (``to`` returns ``bias`` itself, layout and all, when the dtype already matches)
    out = bias.to(dtype=dtype, memory_format=torch.contiguous_format).contiguous()
    return out[..., :n] if pad else out


def map_biases(
    module: nn.Module,
    key_size: Sequence[int],
    query_size: Sequence[int],
    dtype: torch.dtype,
    agent_shape: Sequence[int] | None = None,
    class_token: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(agent -> key [heads, A, Nk], query -> agent [heads, Nq, A])`` biases of a module
    holding the six :func:`init_agent_biases` tables, in ``dtype``, with the agent axis resized
    from the module's ``grid`` to ``agent_shape`` when given; memoised in eval (:func:`eval_memo`).

    ``class_token``: a class token leads the tokens; the module's ``ac_bias [1, heads, A, 1]``
    (agents -> class key) and ``ca_bias [1, heads, 1, A]`` (class query -> agents) come first
    along the token axis (Agent-DeiT).
    """
    tables = _bias_tables(module, class_token)

    def build() -> tuple[Tensor, Tensor]:
        return _build_biases(tables, module.grid, key_size, query_size, dtype, agent_shape)

    key = (
        tuple(key_size),
        tuple(query_size),
        dtype,
        None if agent_shape is None else tuple(agent_shape),
        class_token,
    )
    return eval_memo(module, key, build, *tables)  # type: ignore[return-value]


def map_biases_group(
    modules: Sequence[nn.Module | None],
    key_size: Sequence[int],
    query_size: Sequence[int],
    dtype: torch.dtype,
    agent_shape: Sequence[int] | None = None,
    class_token: bool = False,
) -> list[tuple[Tensor, Tensor] | None]:
    """:func:`map_biases` of every module in ``modules`` (same arguments for all), one pair
    per module, equal to calling it per module; None for a None entry (e.g. a block without
    agent attention), so the result lines up with a model's blocks.

    With autograd on (training) the biases are rebuilt at every forward, ~40 small ops and
    ~55 backward ops per module: on small models a fifth of the training step's host time.
    Modules whose tables have the same shapes are therefore built together, their tables
    concatenated along the head axis (the build is per head), and the result split back. In
    eval each module's biases come from its memo.
    """
    together = torch.is_grad_enabled() or torch.compiler.is_compiling()
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(modules)
    groups: dict[Any, list[int]] = {}
    for i, m in enumerate(modules):
        if m is None:
            continue
        # eval: one group per module (its memo); training: one per grid and table shapes
        key = (tuple(m.grid), *(t.shape for t in _bias_tables(m, class_token))) if together else i
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        group = [modules[i] for i in idx]
        if len(group) == 1:
            out[idx[0]] = map_biases(
                group[0], key_size, query_size, dtype, agent_shape, class_token
            )
            continue
        per_module = [_bias_tables(m, class_token) for m in group]
        tables = [
            torch.cat(same, dim=_HEAD_AXIS.get(name, 1))
            for name, same in zip(_table_names(class_token), zip(*per_module))
        ]
        kb, qb = _build_biases(tables, group[0].grid, key_size, query_size, dtype, agent_shape)
        g = len(idx)
        for i, k, q in zip(
            idx, kb.unflatten(0, (g, -1)).unbind(0), qb.unflatten(0, (g, -1)).unbind(0)
        ):
            out[i] = (k, q)
    return out


def run_blocks(
    blocks: Iterable[nn.Module],
    x: Tensor,
    per_block: Sequence[Any],
    *args: Any,
    checkpointing: bool = False,
) -> Tensor:
    """``x = block(x, *args, extra)`` through ``blocks``, each with its ``per_block`` entry (its
    prebuilt biases, or None), each block checkpointed when ``checkpointing`` (the entries
    are inputs of the checkpointed call, so recomputation does not rebuild them)."""
    for blk, extra in zip(blocks, per_block):
        if checkpointing and not torch.jit.is_scripting():
            x = checkpoint(blk, x, *args, extra, use_reentrant=False)
        else:
            x = blk(x, *args, extra)
    return x


def init_agent_biases(
    module: nn.Module,
    num_heads: int,
    num_agents: int,
    key_size: int | Sequence[int],
    query_size: int | Sequence[int],
    std: float = 0.02,
) -> None:
    """Register the six official agent-bias parameters on ``module`` (official names and shapes:
    ``an_bias``, ``na_bias`` ``[heads, A, 7, 7]``, ``ah_bias [1, heads, A, Hk, 1]``, ``aw_bias
    [1, heads, A, 1, Wk]``, ``ha_bias [1, heads, Hq, 1, A]``, ``wa_bias [1, heads, 1, Wq, A]``),
    truncated-normal initialised with ``std`` like the official code."""
    hk, wk = _pair(key_size, "key_size")
    hq, wq = _pair(query_size, "query_size")
    shapes = {
        "an_bias": (num_heads, num_agents, 7, 7),
        "na_bias": (num_heads, num_agents, 7, 7),
        "ah_bias": (1, num_heads, num_agents, hk, 1),
        "aw_bias": (1, num_heads, num_agents, 1, wk),
        "ha_bias": (1, num_heads, hq, 1, num_agents),
        "wa_bias": (1, num_heads, 1, wq, num_agents),
    }
    for name, shape in shapes.items():
        p = nn.Parameter(torch.zeros(shape))
        trunc_normal_(p, std=std)
        module.register_parameter(name, p)


# ----------------------------------------------------------------------------------------------
# depthwise-conv term


def dwc_tokens(v: Tensor, size: int | Sequence[int], conv: nn.Module) -> Tensor:
    """``conv`` (a depthwise ``nn.Conv2d``) over the ``H x W`` map of tokens ``v [B, H*W, C]``,
    returned as ``[B, H*W, C]`` tokens.

    The map is handed to the conv channels-last (one copy of ``v`` at most, none when ``v`` is
    already contiguous) and the channels-last output is read back as tokens without a copy.
    """
    h, w = _pair(size, "size")
    B, N, C = v.shape
    if N != h * w:
        raise ValueError(f"v: expected {h * w} tokens for size {(h, w)}, got {N}")
    x = v.reshape(B, h, w, C).permute(0, 3, 1, 2)
    x = x.contiguous(memory_format=torch.channels_last)
    return conv(x).permute(0, 2, 3, 1).reshape(B, N, C)


# ----------------------------------------------------------------------------------------------
# downstream agent grids


def check_agent_shapes(shapes: Sequence[Sequence[int]] | None, num_stages: int) -> list | None:
    """Validated ``downstream_agent_shapes``: None, or one ``(gh, gw)`` pair of positive ints
    per stage (lists accepted, e.g. from a JSON/mmengine config), returned as tuples."""
    if shapes is None:
        return None
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence):
        raise ValueError(
            f"downstream_agent_shapes: must be None or a sequence of (gh, gw) pairs, got {shapes!r}"
        )
    if len(shapes) != num_stages:
        raise ValueError(
            f"downstream_agent_shapes: needs one (gh, gw) pair per stage ({num_stages}), got "
            f"{len(shapes)}: {list(shapes)!r}"
        )
    out = []
    for s in shapes:
        ok = isinstance(s, Sequence) and not isinstance(s, (str, bytes)) and len(s) == 2
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s):
            raise ValueError(
                f"downstream_agent_shapes: every entry must be a pair of positive ints "
                f"(gh, gw), got {s!r} in {list(shapes)!r}"
            )
        out.append((int(s[0]), int(s[1])))
    return out


def resize_agent_axis(bias: Tensor, dim: int, grid: Sequence[int], shape: Sequence[int]) -> Tensor:
    """Bias resized along its agent axis from the ``grid`` agents to the ``shape`` agents.

    The agent axis ``dim`` of ``bias`` (e.g. ``[heads, A, N]`` from :func:`agent_key_bias`
    with ``dim=1``, ``[heads, N, A]`` from :func:`query_agent_bias` with ``dim=2``) holds the
    ``gh x gw`` agents row-major; the result holds ``shape = (sh, sw)`` agents, each a
    bilinear (``align_corners=False``) interpolation of the grid's biases -- what the official
    detection / segmentation backbones do with ``F.interpolate(..., size=
    downstream_agent_shape, mode="bilinear")`` at every forward. ``bias`` itself when the
    shapes match.
    """
    gh, gw = _pair(tuple(grid), "grid")
    sh, sw = _pair(tuple(shape), "shape")
    dim = dim % bias.dim()
    if bias.shape[dim] != gh * gw:
        raise ValueError(
            f"bias: axis {dim} has {bias.shape[dim]} entries, expected {gh * gw} agents for "
            f"grid {(gh, gw)}"
        )
    if (gh, gw) == (sh, sw):
        return bias
    get = _build_interp_matrix if torch.compiler.is_compiling() else _cached_interp_matrix
    rh = get(gh, sh, bias.device).to(bias.dtype)  # [sh, gh]
    rw = get(gw, sw, bias.device).to(bias.dtype)  # [sw, gw]
    t = bias.movedim(dim, -1).unflatten(-1, (gh, gw))
    # [..., gh, gw] -> [..., sh, sw]: rows by rh, columns by rw
    t = torch.matmul(torch.matmul(rh, t), rw.t())
    return t.flatten(-2).movedim(-1, dim)


# ----------------------------------------------------------------------------------------------
# pretrained configs


def agent_cfg(first_conv: str, classifier: str, **kwargs: Any) -> dict[str, Any]:
    """timm ``pretrained_cfg`` shared by the four Agent families; ``kwargs`` add or override.

    Input settings of the official evaluation (``agent_transformer/data/build.py``): resize to
    a square of ``int(256 / 224 * size)`` (``crop_mode="squash"``), center crop, bicubic,
    ImageNet mean/std.
    """
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "crop_mode": "squash",
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        "license": "unknown",  # the official repository has no license file
        "paper_ids": "arXiv:2312.08874",
        "paper_name": "Agent Attention: On the Integration of Softmax and Linear Attention",
        "origin_url": "https://github.com/LeapLabTHU/Agent-Attention",
        **kwargs,
    }

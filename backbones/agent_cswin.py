"""Agent-CSwin: CSWin Transformer with agent attention in its early stages.

Papers:
    `Agent Attention: On the Integration of Softmax and Linear Attention`
    - https://arxiv.org/abs/2312.08874 (Han et al., ECCV 2024)
    `CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows`
    - https://arxiv.org/abs/2107.00652 (Dong et al., CVPR 2022)

Official code and checkpoints: https://github.com/LeapLabTHU/Agent-Attention
(``agent_transformer/models/agent_cswin.py``, commit 207ce3e). This is an independent
implementation whose weights are interchangeable with the official ones
(``checkpoint_filter_fn``, ``from_official``).

Architecture. A 7x7 stride-4 conv stem with LayerNorm, four stages of pre-norm blocks with a
3x3 stride-2 conv + LayerNorm between stages, LayerNorm, average pooling, linear head. Each
block projects ``qkv`` once and runs its attention in one or two branches:

* two branches (``dim / 2`` channels and ``heads / 2`` heads each): branch 0 attends inside
  vertical stripes ``H x split``, branch 1 inside horizontal stripes ``split x W``; their
  outputs are concatenated;
* one branch when the stripe covers the whole stage map (the last stage, or ``split`` equal to
  the stage resolution at ``img_size``): attention over the whole map.

A block's attention is of type ``"A"`` (agent attention: agent tokens pooled from the queries,
aggregation / broadcast softmaxes with learned position biases, plus a depthwise 3x3 conv of
the values; stripe width ``la_split_size``) or ``"B"`` (CSWin's stripe self-attention plus
LePE, a depthwise 3x3 conv of the values inside each stripe; stripe width ``split_size``).
``attn_type`` gives one letter per stage; ``"M"`` mixes, the first ``int(attn_type[4:])``
blocks of that stage being ``"A"`` and the rest ``"B"``. Every official variant is ``"AABB"``
with ``la_split_size`` equal to the stage resolutions (one whole-map agent branch in stages 1
and 2).

Kernels: stripe self-attention is ``visionattn.kernels.na2d`` with ``kernel_size = stride =
(stripe height, stripe width)`` (non-overlapping rectangular windows read straight from the
fused qkv projection); agent attention is ``F.scaled_dot_product_attention`` through
``backbones/_agent.py``.

Input sizes. Any input size works. Stripes follow the running map as CSWin's official
segmentation backbone does: a branch's stripe spans the running map height (or width), the
other side is ``split`` and the map is zero-padded symmetrically (``pad // 2`` before) to a
multiple of it (padded queries, keys and values are zeros that stay in the softmax), and the
result is cropped. Agent position biases are resized to the running stripe / map size
(bilinear, as the official downstream backbones do), so nothing is resized at ``img_size``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

import visionattn.kernels as _kernels
from visionattn.backbones import _agent
from visionattn.backbones._convert import build_converted, official_variant_args

# official family names visionattn.convert.from_official routes here
OFFICIAL_FAMILIES = ("agent_cswin",)

__all__ = [
    "FAMILIES",
    "OFFICIAL_VARIANTS",
    "AgentCSWin",
    "checkpoint_filter_fn",
    "convert_official_state_dict",
    "from_official",
    "official_model_args",
]

FAMILIES = ("agent_cswin",)


# ----------------------------------------------------------------------------------------------
# stripe geometry


def _stripe(branch: int, split: int, h: int, w: int) -> tuple[int, int]:
    """Stripe ``(height, width)`` of a branch on an ``h x w`` map: -1 whole map, 0 vertical
    stripes ``h x split``, 1 horizontal stripes ``split x w``."""
    if branch == -1:
        return h, w
    return (h, split) if branch == 0 else (split, w)


def _pad_amounts(h: int, w: int, sh: int, sw: int) -> tuple[int, int, int, int]:
    """Symmetric zero padding (top, bottom, left, right) up to multiples of the stripe, the
    first half rounded down (CSWin's official segmentation backbone)."""
    ph, pw = (-h) % sh, (-w) % sw
    return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2


def _to_windows(x: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """``[B, H, W, C] -> [B * nW, sh * sw, C]``, windows row-major, tokens row-major inside."""
    B, H, W, C = x.shape
    if sh == H and sw == W:
        return x.reshape(B, H * W, C)
    x = x.reshape(B, H // sh, sh, W // sw, sw, C).transpose(2, 3)
    return x.reshape(-1, sh * sw, C)


def _from_windows(x: torch.Tensor, sh: int, sw: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`_to_windows`: ``[B * nW, sh * sw, C] -> [B, H, W, C]``."""
    C = x.shape[-1]
    if sh == H and sw == W:
        return x.reshape(-1, H, W, C)
    x = x.reshape(-1, H // sh, W // sw, sh, sw, C).transpose(2, 3)
    return x.reshape(-1, H, W, C)


def _window_dwconv(
    v: torch.Tensor, conv: Callable[[torch.Tensor], torch.Tensor], sh: int, sw: int
) -> torch.Tensor:
    """Depthwise ``conv`` (a 3x3 ``nn.Conv2d`` or the same as a function) applied inside each
    ``sh x sw`` window of ``v [B, H, W, C]`` (zero padding at every window border), returned
    as ``[B, H, W, C]``."""
    B, H, W, C = v.shape
    if sh == H and sw == W:
        x = v.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        return conv(x).permute(0, 2, 3, 1)
    x = v.reshape(B, H // sh, sh, W // sw, sw, C).permute(0, 1, 3, 5, 2, 4)
    x = conv(x.reshape(-1, C, sh, sw))
    x = x.reshape(B, H // sh, W // sw, C, sh, sw).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(B, H, W, C)


# ----------------------------------------------------------------------------------------------
# attention branches


class LePEStripeAttention(nn.Module):
    """CSWin stripe self-attention with locally-enhanced positional encoding, one branch.

    ``forward(q, k, v)`` takes ``[B, H, W, heads, head_dim]`` views of the block's qkv and
    returns ``[B, H, W, heads * head_dim]``: softmax attention inside each stripe (``na2d`` with
    ``kernel_size = stride = stripe``) plus ``get_v`` (depthwise 3x3) applied to ``v`` inside
    the same stripe.
    """

    def __init__(
        self, dim: int, num_heads: int, branch: int, split_size: int, qk_scale: float | None
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide the branch width {dim}")
        self.num_heads = num_heads
        self.branch = branch
        self.split_size = split_size
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, W, nh, hd = q.shape
        sh, sw = _stripe(self.branch, self.split_size, H, W)
        top, bottom, left, right = _pad_amounts(H, W, sh, sw)
        padded = top or bottom or left or right
        if padded:
            pad = (0, 0, 0, 0, left, right, top, bottom)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        Hp, Wp = H + top + bottom, W + left + right
        x = _kernels.na2d(q, k, v, kernel_size=(sh, sw), stride=(sh, sw), scale=self.scale)
        x = x.reshape(B, Hp, Wp, nh * hd) + _window_dwconv(
            v.reshape(B, Hp, Wp, nh * hd), self.get_v, sh, sw
        )
        if padded:
            x = x[:, top : top + H, left : left + W]
        return x

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, branch={self.branch}, split_size={self.split_size}"


# both LePE branches of a block in one attention call and one conv where the geometry allows
# (see _lepe_pair); False runs them one by one (tests compare the two)
_PAIR_LEPE = True


def _lepe_pair(attns: nn.ModuleList, b0: torch.Tensor, b1: torch.Tensor) -> torch.Tensor | None:
    """A block's two LePE branches (vertical stripes ``b0``, horizontal stripes ``b1``, each
    the ``[B, H, W, 3, C/2]`` q/k/v of its heads) as one problem, or None where that does not
    apply (non-square map, padding, unequal branches) or does not pay (autograd off).

    On a square map the horizontal stripes of ``b1`` are the vertical stripes of its
    transpose, so both branches run as one ``na2d`` over ``[b0 | b1^T]`` heads and one depthwise
    conv (``b1``'s kernels transposed): one attention call and one conv instead of two of each
    (host time: CSwin's stage 3 has 18 such blocks), for one extra copy of the qkv (the
    concatenation). Same result: attention inside a window and the window conv commute with
    transposing the map. Returns ``[B, H, W, C]``, branch 0's channels first.

    Only with autograd on: training steps are host-bound and gain (agent_cswin_tiny, H200,
    B128: +10% img/s), while inference is GPU-bound and the transposed copy costs more than the
    call it saves (B256 batch 27.4 -> 31.3 ms).
    """
    a0, a1 = attns
    B, H, W, _, cb = b0.shape
    if not (
        _PAIR_LEPE
        and torch.is_grad_enabled()
        and H == W
        and isinstance(a0, LePEStripeAttention)
        and isinstance(a1, LePEStripeAttention)
        and (a0.branch, a1.branch) == (0, 1)
        and (a0.split_size, a0.num_heads, a0.scale) == (a1.split_size, a1.num_heads, a1.scale)
    ):
        return None
    sh, sw = _stripe(0, a0.split_size, H, W)
    if any(_pad_amounts(H, W, sh, sw)):
        return None
    both = torch.cat([b0, b1.transpose(1, 2)], dim=-1)  # [B, H, W, 3, C]
    q, k, v = (t.unflatten(-1, (2 * a0.num_heads, -1)) for t in both.unbind(3))
    x = _kernels.na2d(q, k, v, kernel_size=(sh, sw), stride=(sh, sw), scale=a0.scale)
    c0, c1 = a0.get_v, a1.get_v
    w = torch.cat([c0.weight, c1.weight.transpose(-1, -2)])
    bias = None if c0.bias is None else torch.cat([c0.bias, c1.bias])

    def conv(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, bias, padding=1, groups=2 * cb)

    x = x.reshape(B, H, W, 2 * cb) + _window_dwconv(v.reshape(B, H, W, 2 * cb), conv, sh, sw)
    y0, y1 = x.split(cb, dim=-1)
    return torch.cat([y0, y1.transpose(1, 2)], dim=-1)


class AgentStripeAttention(nn.Module):
    """Agent attention inside CSWin stripes (or over the whole map), one branch.

    ``forward(q, k, v)`` as :class:`LePEStripeAttention`. Per stripe: ``agent_num`` agent
    tokens average-pooled from the queries, aggregation and broadcast softmaxes with the
    official position biases (sized for the stripe at ``resolution``, resized to the running
    stripe), plus ``get_v`` (depthwise 3x3) of ``v`` inside the stripe.
    """

    def __init__(
        self, dim: int, num_heads: int, branch: int, split_size: int, resolution: int,
        agent_num: int,
    ) -> None:  # fmt: skip
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide the branch width {dim}")
        self.num_heads = num_heads
        self.branch = branch
        self.split_size = split_size
        self.agent_num = agent_num
        self.grid = _agent.agent_grid(agent_num)
        self.scale = (dim // num_heads) ** -0.5
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        size = _stripe(branch, split_size, resolution, resolution)
        _agent.init_agent_biases(self, num_heads, agent_num, size, size)

    def stripe(self, size: tuple[int, int]) -> tuple[int, int]:
        """The stripe (window) shape on a ``size`` map."""
        return _stripe(self.branch, self.split_size, size[0], size[1])

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        biases: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``biases``: this module's ``map_biases`` for the running stripe when the caller
        built them (the stage builds its blocks' together); else built here."""
        B, H, W, nh, hd = q.shape
        C = nh * hd
        sh, sw = _stripe(self.branch, self.split_size, H, W)
        top, bottom, left, right = _pad_amounts(H, W, sh, sw)
        padded = top or bottom or left or right
        q, k, v = (t.reshape(B, H, W, C) for t in (q, k, v))
        if padded:
            pad = (0, 0, left, right, top, bottom)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        Hp, Wp = H + top + bottom, W + left + right
        qw, kw, vw = (_to_windows(t, sh, sw) for t in (q, k, v))
        agents = _agent.split_heads(_agent.pool_agents(qw, (sh, sw), self.grid), nh)
        if biases is None:
            biases = _agent.map_biases(self, (sh, sw), (sh, sw), qw.dtype)
        key_bias, query_bias = biases
        x = _agent.agent_attention(
            _agent.split_heads(qw, nh),
            _agent.split_heads(kw, nh),
            _agent.split_heads(vw, nh),
            agents,
            key_bias,
            query_bias,
            scale=self.scale,
        )
        x = _from_windows(_agent.merge_heads(x), sh, sw, Hp, Wp)
        x = x + _window_dwconv(v, self.get_v, sh, sw)
        if padded:
            x = x[:, top : top + H, left : left + W]
        return x

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, branch={self.branch}, split_size={self.split_size}, "
            f"agent_num={self.agent_num}"
        )


# ----------------------------------------------------------------------------------------------
# blocks, stages, model


class CSWinBlock(nn.Module):
    """Pre-norm block: fused qkv, one or two attention branches, projection, MLP.

    ``[B, H, W, C] -> [B, H, W, C]``. ``whole_map`` selects one branch over the whole map
    (else two stripe branches of ``dim / 2`` channels and ``heads / 2`` heads).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: int,
        split_size: int,
        attn_type: str,
        agent_num: int,
        whole_map: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if attn_type not in ("A", "B"):
            raise ValueError(f"attn_type: block type must be 'A' or 'B', got {attn_type!r}")
        self.dim = dim
        self.attn_type = attn_type
        self.norm1 = _agent.AutocastLayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        branches = [-1] if whole_map else [0, 1]
        n = len(branches)
        if num_heads % n:
            raise ValueError(f"num_heads: {num_heads} must be even for two stripe branches")
        if attn_type == "A":
            self.attns = nn.ModuleList(
                AgentStripeAttention(dim // n, num_heads // n, b, split_size, resolution, agent_num)
                for b in branches
            )
        else:
            self.attns = nn.ModuleList(
                LePEStripeAttention(dim // n, num_heads // n, b, split_size, qk_scale)
                for b in branches
            )
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = _agent.AutocastLayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(
        self, x: torch.Tensor, biases: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """``biases``: one prebuilt bias pair per agent branch (ignored by LePE blocks)."""
        B, H, W, C = x.shape
        n = len(self.attns)
        # unbind, not indexing: its backward stacks the branches' gradients in one copy, where
        # each index's backward would zero-fill a qkv-sized gradient and add them up
        branches = self.qkv(self.norm1(x)).view(B, H, W, 3, n, -1).unbind(4)
        y = _lepe_pair(self.attns, *branches) if n == 2 else None
        if y is not None:
            x = x + self.drop_path(self.proj_drop(self.proj(y)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        outs = []
        for i, attn in enumerate(self.attns):
            q, k, v = (t.unflatten(-1, (attn.num_heads, -1)) for t in branches[i].unbind(3))
            if biases is not None and isinstance(attn, AgentStripeAttention):
                outs.append(attn(q, k, v, biases[i]))
            else:
                outs.append(attn(q, k, v))
        y = outs[0] if n == 1 else torch.cat(outs, dim=-1)
        x = x + self.drop_path(self.proj_drop(self.proj(y)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvStem(nn.Module):
    """7x7 stride-4 conv (padding 2) and LayerNorm: ``[B, C_in, H, W] -> [B, H', W', dim]``."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=7, stride=4, padding=2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"x: expected an image batch [B, {self.in_chans}, H, W], got {tuple(x.shape)}"
            )
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class MergeBlock(nn.Module):
    """3x3 stride-2 conv (padding 1) and LayerNorm between stages, channels-last in and out."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class CSWinStage(nn.Module):
    """Optional downsampling from the previous stage, then the stage's blocks."""

    def __init__(self, downsample: nn.Module | None, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        biases = self._block_biases(x)
        return _agent.run_blocks(self.blocks, x, biases, checkpointing=self.grad_checkpointing)

    def _block_biases(self, x: torch.Tensor) -> list[list | None]:
        """Per block, the agent branches' biases, built together per branch position
        (``map_biases_group``); None for LePE blocks."""
        blocks = list(self.blocks)
        agent = [b for b in blocks if b.attn_type == "A"]
        if not agent:
            return [None] * len(blocks)
        size, dtype = tuple(x.shape[1:3]), _agent.autocast_dtype(x)
        per_branch = []
        for j, branch in enumerate(agent[0].attns):
            attns = [b.attns[j] if b.attn_type == "A" else None for b in blocks]
            stripe = branch.stripe(size)
            per_branch.append(_agent.map_biases_group(attns, stripe, stripe, dtype))
        return [list(bs) if b.attn_type == "A" else None for b, bs in zip(blocks, zip(*per_branch))]


def _block_types(attn_type: str, depths: Sequence[int]) -> list[list[str]]:
    """Per stage, per block ``"A"`` / ``"B"`` from the official ``attn_type`` string."""
    if len(attn_type) < len(depths) or any(c not in "ABM" for c in attn_type[: len(depths)]):
        raise ValueError(
            f"attn_type: needs one of 'A', 'B', 'M' per stage ({len(depths)}), got {attn_type!r}"
        )
    n_agent = 0
    if "M" in attn_type[: len(depths)]:
        tail = attn_type[4:]
        if not tail.isdigit():
            raise ValueError(
                f"attn_type: an 'M' stage needs the count of its agent blocks after the four "
                f"letters (e.g. 'AAMB6'), got {attn_type!r}"
            )
        n_agent = int(tail)
    out = []
    for c, d in zip(attn_type, depths):
        out.append([("A" if i < n_agent else "B") if c == "M" else c for i in range(d)])
    return out


def _init_weights(module: nn.Module) -> None:
    # Official init: truncated-normal linears with zero bias, unit LayerNorms; convs default.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class AgentCSWin(nn.Module):
    """Agent-CSwin (and plain CSWin with ``attn_type="BBBB"``).

    Args:
        img_size: training resolution; fixes which blocks have one whole-map branch and the
            agent-bias sizes (other input sizes run, see the module docstring).
        in_chans: image channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: ``"avg"`` or ``""``.
        embed_dim: channels of stage 1, doubled at every later stage.
        depths: blocks per stage.
        num_heads: heads per stage (even where a block has two branches).
        split_size: stripe width of ``"B"`` blocks, per stage.
        la_split_size: stripe width of ``"A"`` blocks, per stage (the stage resolution at
            ``img_size`` gives one whole-map agent branch, as every official variant).
        agent_num: agent tokens per ``"A"`` block, per stage (perfect squares).
        attn_type: one of ``"A"``, ``"B"``, ``"M"`` per stage (module docstring).
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias in the qkv projections.
        qk_scale: logit scale of ``"B"`` blocks (default ``head_dim ** -0.5``).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention projection and in the MLP (official
            ``drop_rate``).
        attn_drop_rate: must be 0 (the fused stripe kernel has no attention dropout).
        drop_path_rate: stochastic depth, linear over all blocks.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: Sequence[int] = (2, 4, 18, 1),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        split_size: Sequence[int] = (1, 2, 7, 7),
        la_split_size: Sequence[int] = (56, 28, 14, 7),
        agent_num: Sequence[int] = (9, 16, 49, 49),
        attn_type: str = "AABB",
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        n_stages = len(depths)
        for name, val in (
            ("num_heads", num_heads), ("split_size", split_size),
            ("la_split_size", la_split_size), ("agent_num", agent_num),
        ):  # fmt: skip
            if len(val) != n_stages:
                raise ValueError(f"{name}: needs one entry per stage ({n_stages}), got {val}")
        if attn_drop_rate:
            raise ValueError(
                "attn_drop_rate: the stripe attention kernel has no attention-weight dropout; "
                f"use 0 (every official model does), got {attn_drop_rate}"
            )
        if (
            isinstance(img_size, (tuple, list))
            and len(img_size) == 2
            and img_size[0] == img_size[1]
        ):
            img_size = img_size[0]  # timm passes the pretrained input size as (H, W)
        if not isinstance(img_size, int) or img_size < 32:
            raise ValueError(f"img_size: must be an int >= 32 or a square (H, W), got {img_size!r}")
        types = _block_types(attn_type, depths)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.img_size = img_size
        dims = [embed_dim * 2**i for i in range(n_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.embed_dim = embed_dim

        self.stem = ConvStem(in_chans, embed_dim)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.Sequential()
        self.feature_info: list[dict[str, Any]] = []
        j = 0
        for s in range(n_stages):
            reso = img_size // 4 // 2**s
            blocks = []
            for b in range(depths[s]):
                t = types[s][b]
                split = int(la_split_size[s] if t == "A" else split_size[s])
                blocks.append(
                    CSWinBlock(
                        dims[s], num_heads[s], resolution=reso, split_size=split,
                        attn_type=t, agent_num=int(agent_num[s]),
                        whole_map=s == n_stages - 1 or split == reso, mlp_ratio=mlp_ratio,
                        qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate,
                        drop_path=dpr[j],
                    )
                )  # fmt: skip
                j += 1
            down = MergeBlock(dims[s - 1], dims[s]) if s > 0 else None
            self.stages.append(CSWinStage(down, blocks))
            self.feature_info.append(
                dict(num_chs=dims[s], reduction=4 * 2**s, module=f"stages.{s}")
            )
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
            input_fmt="NHWC",
        )  # fmt: skip
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # The official recipe decays every parameter but 1-D ones (norms, biases) and the names
        # it lists; the agent biases are decayed there too, so nothing extra is exempt here.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (before the next downsampling) and, unless ``intermediates_only``,
        the normalized final map ``[B, H, W, C]``.

        ``indices``: last n stages if int, all if None, else the given stage indices. ``norm``
        applies the final norm to the last stage's output. ``output_fmt``: ``"NCHW"`` or
        ``"NHWC"``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt: must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        intermediates = []
        x = self.stem(x)
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(
                    y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y
                )
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and norm/head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W] -> [B, H/32, W/32, num_features]`` (normalized, channels-last)."""
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# official variants and checkpoint conversion

_T = dict(embed_dim=64, depth=[2, 4, 18, 1], num_heads=[2, 4, 8, 16])
_S = dict(embed_dim=64, depth=[3, 6, 29, 2], num_heads=[2, 4, 8, 16])
_B = dict(embed_dim=96, depth=[3, 6, 29, 2], num_heads=[4, 8, 16, 32])
_AGENT = dict(agent_num=["9", "16", "49", "49"], attn_type="AABB", patch_size=4, mlp_ratio=4.0)

# Our registered name -> the official constructor kwargs, from agent_transformer/models/
# agent_cswin.py factories + cfgs/agent_cswin_{t,s,b,b_384}.yaml (drop path, agent settings;
# CSWIN_LA_SPLIT_SIZE defaults to the stage resolutions) at commit 207ce3e.
OFFICIAL_VARIANTS: dict[str, dict[str, Any]] = {
    "agent_cswin_tiny": dict(
        _T, **_AGENT, split_size=[1, 2, 7, 7], img_size=224, drop_path_rate=0.2,
        la_split_size="56-28-14-7"),
    "agent_cswin_small": dict(
        _S, **_AGENT, split_size=[1, 2, 7, 7], img_size=224, drop_path_rate=0.4,
        la_split_size="56-28-14-7"),
    "agent_cswin_base": dict(
        _B, **_AGENT, split_size=[1, 2, 7, 7], img_size=224, drop_path_rate=0.5,
        la_split_size="56-28-14-7"),
    "agent_cswin_base_384": dict(
        _B, **_AGENT, split_size=[1, 2, 12, 12], img_size=384, drop_path_rate=0.7,
        la_split_size="96-48-24-12"),
}  # fmt: skip

# official names of the same variants (config MODEL.NAME and factory MODEL.TYPE) -> ours
_OFFICIAL_NAMES = {
    "Agent_CSWin_tiny": "agent_cswin_tiny",
    "Agent_CSWin_small": "agent_cswin_small",
    "Agent_CSWin_base": "agent_cswin_base",
    "Agent_CSWin_base_384": "agent_cswin_base_384",
    "Agent_CSWin_64_24181_tiny_224": "agent_cswin_tiny",
    "Agent_CSWin_64_36292_small_224": "agent_cswin_small",
    "Agent_CSWin_96_36292_base_224": "agent_cswin_base",
    "Agent_CSWin_96_36292_base_384": "agent_cswin_base_384",
}

# official kwarg -> ours (same meaning)
_KWARG_MAP = {
    "img_size": "img_size", "in_chans": "in_chans", "num_classes": "num_classes",
    "embed_dim": "embed_dim", "depth": "depths", "num_heads": "num_heads",
    "split_size": "split_size", "la_split_size": "la_split_size", "agent_num": "agent_num",
    "attn_type": "attn_type", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias",
    "qk_scale": "qk_scale", "drop_rate": "proj_drop_rate", "attn_drop_rate": "attn_drop_rate",
    "drop_path_rate": "drop_path_rate",
}  # fmt: skip
# official kwargs without effect on the architecture (the stem is always 7x7 stride 4)
_IGNORED = {"patch_size", "use_chk", "pretrained"}


def _ints(value: Any, name: str) -> list[int]:
    """An official per-stage list: ``"56-28-14-7"``, ``["9", "16", ...]`` or ints."""
    if isinstance(value, str):
        value = value.split("-")
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(
            f"official_kwargs: {name} must be per-stage integers, got {value!r}"
        ) from None


def official_to_ours_kwargs(official_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Our :class:`AgentCSWin` kwargs for the official ``CSWinTransformer`` kwargs."""
    out: dict[str, Any] = {}
    for key, value in official_kwargs.items():
        if key in _IGNORED:
            continue
        if key == "hybrid_backbone":
            if value is not None:
                raise ValueError("official_kwargs: hybrid_backbone is not supported")
        elif key == "norm_layer":
            if "LayerNorm" not in str(value):
                raise ValueError(f"official_kwargs: norm_layer must be LayerNorm, got {value!r}")
        elif key in ("la_split_size", "agent_num", "split_size", "depth", "num_heads"):
            out[_KWARG_MAP[key]] = _ints(value, key)
        elif key in _KWARG_MAP:
            out[_KWARG_MAP[key]] = value
        else:
            raise ValueError(
                f"official_kwargs: {key!r} is not an argument of the official CSWinTransformer "
                f"(known: {sorted(_KWARG_MAP) + sorted(_IGNORED)})"
            )
    if "la_split_size" not in out:
        out["la_split_size"] = [1, 2, 7, 7]  # the official constructor's default
    if "agent_num" in out and len(out["agent_num"]) == 1:
        out["agent_num"] = out["agent_num"] * 4
    return out


def _official_key(key: str) -> str | None:
    """Our key for one official key (None when the key is not an official one)."""
    parts = key.split(".")
    if parts[0] == "stage1_conv_embed" and len(parts) == 3:
        mod = {"0": "conv", "2": "norm"}.get(parts[1])
        return None if mod is None else f"stem.{mod}.{parts[2]}"
    if parts[0].startswith("stage") and parts[0][5:].isdigit() and len(parts) >= 3:
        s = int(parts[0][5:]) - 1
        return ".".join(["stages", str(s), "blocks", *parts[1:]])
    if parts[0].startswith("merge") and parts[0][5:].isdigit() and len(parts) == 3:
        return f"stages.{int(parts[0][5:])}.downsample.{parts[1]}.{parts[2]}"
    if parts[0] == "norm" and len(parts) == 2:
        return key
    if parts[0] == "head" and len(parts) == 2:
        return "head.fc." + parts[1]
    return None


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Tensor state dict of a checkpoint: bare, or under the official training script's
    ``model`` key (the weights its evaluation command loads) or ``state_dict_ema``."""
    from visionattn.convert import unwrap_state_dict

    sd = unwrap_state_dict(checkpoint) if "state_dict_ema" not in checkpoint else None
    if sd is None:
        inner = checkpoint.get("model", checkpoint["state_dict_ema"])
        sd = unwrap_state_dict(inner)
    return sd


def convert_official_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename an official Agent-CSwin state dict to our keys; every key must be known."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in _unwrap(state_dict).items():
        new = _official_key(k)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise ValueError(f"state_dict: official Agent-CSwin keys not recognized: {unknown[:10]}")
    return out


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Official Agent-CSwin checkpoints (bare or wrapped), or ours, into ``model``'s keys.

    Agent biases sized for another ``img_size`` are resized linearly along their map axis, as
    the official fine-tuning script does.
    """
    sd = _unwrap(state_dict)
    if not any(k.startswith(("stem.", "stages.")) for k in sd):
        sd = convert_official_state_dict(sd)
    return _agent.fit_agent_biases(sd, model.state_dict())


def official_model_args(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Registered model name and kwargs that build our counterpart of an official model.

    ``official_kwargs``: the official constructor's kwargs (e.g. a parity vector's
    ``constructor_kwargs``); without them ``variant`` names an official variant (ours, e.g.
    ``"agent_cswin_tiny"``, or the official ``"Agent_CSWin_tiny"`` /
    ``"Agent_CSWin_64_24181_tiny_224"``). ``num_classes`` follows the checkpoint's head.
    """
    return official_variant_args(
        _unwrap(state_dict), official_kwargs, variant, label="Agent-CSwin",
        variants=OFFICIAL_VARIANTS, to_ours=official_to_ours_kwargs, default="agent_cswin_tiny",
        model_cls=AgentCSWin, aliases=_OFFICIAL_NAMES,
    )  # fmt: skip


def from_official(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "agent_cswin",
) -> nn.Module:
    """Our model built from an official Agent-CSwin checkpoint, weights loaded (strict).

    ``official_kwargs``: the official ``CSWinTransformer`` kwargs (official names and value
    formats, e.g. ``la_split_size="56-28-14-7"``); without them ``variant`` names an official
    variant. Returns the model in eval mode; ``model.model_args`` rebuilds it from its name.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: must be one of {FAMILIES}, got {family!r}")
    name, args = official_model_args(state_dict, official_kwargs, variant=variant)
    return build_converted(name, args, lambda m: convert_official_state_dict(state_dict))


# ----------------------------------------------------------------------------------------------
# pretrained configs and registration


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return _agent.agent_cfg("stem.conv", "head.fc", **kwargs)


# ImageNet-1k top-1 of the official checkpoints (agent_transformer/README.md)
_TOP1 = {"agent_cswin_tiny": 83.1, "agent_cswin_small": 83.9, "agent_cswin_base": 84.7,
         "agent_cswin_base_384": 85.8}  # fmt: skip

default_cfgs = generate_default_cfgs(
    {
        **{
            f"{n}.in1k": _cfg(
                hf_hub_id=f"visionattn/{n}.in1k",
                **(dict(input_size=(3, 384, 384), pool_size=(12, 12)) if "384" in n else {}),
            )
            for n in OFFICIAL_VARIANTS
        },
        "test_agent_cswin.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
    }
)

# tiny configuration for tests: agent stripes (stage 0) and a whole-map agent branch
# (stage 1), LePE stripes (stage 2) and a whole-map LePE branch (stage 3)
_TEST_ARGS = dict(
    img_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[2, 2, 4, 4],
    split_size=[1, 2, 2, 2], la_split_size=[4, 8, 4, 2], agent_num=[4, 4, 4, 1],
    attn_type="AABB", mlp_ratio=2.0, drop_path_rate=0.0,
)  # fmt: skip


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentCSWin:
    if variant in OFFICIAL_VARIANTS:
        args = official_to_ours_kwargs(OFFICIAL_VARIANTS[variant])
    else:
        args = dict(_TEST_ARGS)
    args.update(kwargs)
    n_stages = len(args.get("depths", (2, 4, 18, 1)))
    out_indices = args.pop("out_indices", tuple(range(n_stages)))
    return build_model_with_cfg(
        AgentCSWin,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **args,
    )


@register_model
def agent_cswin_tiny(pretrained: bool = False, **kwargs: Any) -> AgentCSWin:
    """Agent-CSwin-T (21M params, 83.1% top-1 at 224 px)."""
    return _create("agent_cswin_tiny", pretrained, **kwargs)


@register_model
def agent_cswin_small(pretrained: bool = False, **kwargs: Any) -> AgentCSWin:
    """Agent-CSwin-S (33M, 83.9%)."""
    return _create("agent_cswin_small", pretrained, **kwargs)


@register_model
def agent_cswin_base(pretrained: bool = False, **kwargs: Any) -> AgentCSWin:
    """Agent-CSwin-B (73M, 84.7%)."""
    return _create("agent_cswin_base", pretrained, **kwargs)


@register_model
def agent_cswin_base_384(pretrained: bool = False, **kwargs: Any) -> AgentCSWin:
    """Agent-CSwin-B fine-tuned at 384 px (73M, 85.8%)."""
    return _create("agent_cswin_base_384", pretrained, **kwargs)


@register_model
def test_agent_cswin(pretrained: bool = False, **kwargs: Any) -> AgentCSWin:
    """Tiny Agent-CSwin for tests."""
    return _create("test_agent_cswin", pretrained, **kwargs)

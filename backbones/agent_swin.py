"""Agent-Swin: Swin Transformer with agent attention in its early stages.

Paper: `Agent Attention: On the Integration of Softmax and Linear Attention`
(Han, Ye, Han, Xia, Pan, Wan, Song, Huang; ECCV 2024) - https://arxiv.org/abs/2312.08874
Official code and checkpoints: https://github.com/LeapLabTHU/Agent-Attention
(``agent_transformer/models/agent_swin.py``, configs ``cfgs/agent_swin_*.yaml``). This is an
independent implementation whose weights are interchangeable with the official ones
(``checkpoint_filter_fn``, ``from_official``).

Architecture: Swin's 4x4 patch embedding, patch merging and MLP blocks; each stage's attention
type comes from ``attn_type`` (one letter per stage): ``A`` agent attention
(``visionattn.backbones._agent``, SDPA), ``B`` Swin window attention with relative position
bias on ``visionattn.kernels.na2d`` (kernel = stride = window; shifted windows by roll + the
Swin region mask as ``attn_bias``), ``M`` the first ``n`` blocks agent, the rest window
attention (``n`` is the digit(s) after the per-stage letters, e.g. ``"AAMB2"``). Window blocks
use ``max(7, window_size // 8)``. As in the official code a block whose map (at ``img_size``)
fits in its window uses window = map size and no shift; with ``window_size`` = map size
(every official config) each agent block attends over the whole stage map.

Input sizes: agent blocks always attend over the whole map, their position biases resized to
the running map (what the official detection / segmentation backbones do); window blocks keep
their window and shift and pad the map to a multiple of the window (zeros before the qkv
projection, as Swin's downstream code pads); the patch embedding pads the image to a
multiple of the patch and patch merging pads odd maps. At the official resolutions nothing is
resized or padded and the outputs equal the official model's.

Detection / segmentation: ``downstream_agent_shapes`` (one ``(gh, gw)`` per stage, e.g.
``[(9, 9), (12, 12), (14, 14), (7, 7)]`` in the official configs) pools the agents onto those
grids and resizes the agent biases along the agent axis at every forward (bilinear, after
their resize to the running map), as the official ``downstream/`` backbones do; the stored
biases keep their classification shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._registry import generate_default_cfgs, register_model
from torch import nn

from visionattn.backbones import _agent
from visionattn.backbones._convert import (
    TRAINING_ONLY_KWARGS,
    build_converted,
    official_variant_args,
)
from visionattn.kernels import na2d

__all__ = [
    "AgentSwinTransformer",
    "FAMILIES",
    "OFFICIAL_FAMILIES",
    "OFFICIAL_VARIANTS",
    "checkpoint_filter_fn",
    "from_official",
    "official_model_args",
]

FAMILIES = ("agent_swin",)
# official family names visionattn.convert.from_official routes here
OFFICIAL_FAMILIES = ("agent_swin",)


def parse_attn_types(attn_type: str, depths: Sequence[int]) -> list[list[str]]:
    """Per stage, per block ``"A"`` (agent) or ``"B"`` (window) from an official ``attn_type``
    string (one of ``A``/``B``/``M`` per stage, then the ``M`` split count)."""
    n = len(depths)
    if not isinstance(attn_type, str) or len(attn_type) < n:
        raise ValueError(f"attn_type: needs one letter per stage ({n}), got {attn_type!r}")
    letters, tail = attn_type[:n], attn_type[n:]
    if any(c not in "ABM" for c in letters):
        raise ValueError(f"attn_type: stage letters must be A, B or M, got {attn_type!r}")
    if "M" in letters and not tail.isdigit():
        raise ValueError(f"attn_type: an 'M' stage needs its agent-block count, got {attn_type!r}")
    out = []
    for c, d in zip(letters, depths):
        if c == "M":
            out.append(["A" if i < int(tail) else "B" for i in range(d)])
        else:
            out.append([c] * d)
    return out


def _check_image(x: torch.Tensor, in_chans: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"x: expected an image batch [B, {in_chans}, H, W], got shape {tuple(x.shape)}"
        )


# ----------------------------------------------------------------------------------------------
# attention


class AgentAttention(nn.Module):
    """Agent attention over a whole ``[B, H, W, C]`` map (fused qkv, official parameter names).

    Biases are sized for ``bias_size`` (the stage map at the training resolution) and resized
    to the running map when it differs. ``agent_shape`` (the official downstream
    ``downstream_agent_shape``): agents pooled onto this grid instead of the ``agent_num``
    grid, the biases (still stored for ``agent_num`` agents) bilinearly resized along their
    agent axis at every forward, as the official detection / segmentation backbone does.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias_size: tuple[int, int],
        agent_num: int = 49,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        agent_shape: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide dim {dim}")
        self.num_heads = num_heads
        self.agent_num = agent_num
        self.grid = _agent.agent_grid(agent_num)
        self.agent_shape = self.grid if agent_shape is None else tuple(agent_shape)
        self.scale = (dim // num_heads) ** -0.5  # the official agent blocks ignore qk_scale
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        _agent.init_agent_biases(self, num_heads, agent_num, bias_size, bias_size)

    def forward(
        self, x: torch.Tensor, biases: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``biases``: this module's ``map_biases`` for the running map when the caller built
        them (the stage builds its blocks' together); else built here."""
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H * W, 3, C).unbind(2)
        agents = _agent.pool_agents(q, (H, W), self.agent_shape)
        if biases is None:
            biases = _agent.map_biases(self, (H, W), (H, W), q.dtype, self.agent_shape)
        key_bias, query_bias = biases
        nh = self.num_heads
        out = _agent.agent_attention(
            _agent.split_heads(q, nh),
            _agent.split_heads(k, nh),
            _agent.split_heads(v, nh),
            _agent.split_heads(agents, nh),
            key_bias,
            query_bias,
            scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        x = _agent.merge_heads(out) + _agent.dwc_tokens(v, (H, W), self.dwc)
        return self.proj_drop(self.proj(x)).view(B, H, W, C)

    def extra_repr(self) -> str:
        shape = "" if self.agent_shape == self.grid else f", agent_shape={self.agent_shape}"
        return f"num_heads={self.num_heads}, agent_num={self.agent_num}{shape}"


def _shift_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Swin's shifted-window mask as na2d ``attn_bias [1, 1, Hp, Wp, window, window]``: -100
    between a query and a window key from another region of the rolled map, else 0."""

    def regions(n: int) -> torch.Tensor:
        pos = torch.arange(n, device=device)
        return (pos >= n - window).long() + (pos >= n - shift).long()

    region = regions(hp)[:, None] * 3 + regions(wp)[None, :]  # [Hp, Wp]
    tiles = region.view(hp // window, window, wp // window, window).permute(0, 2, 1, 3)
    keys = tiles.repeat_interleave(window, 0).repeat_interleave(window, 1)  # [Hp, Wp, w, w]
    mask = (keys != region[:, :, None, None]).float() * -100.0
    return mask[None, None]


class WindowAttention(nn.Module):
    """Swin (shifted) window attention with relative position bias on ``na2d``.

    ``relative_position_bias_table [(2w-1)^2, heads]`` keeps the official layout (indexed by
    ``query - key``); it is handed to na2d as ``rpb [heads, 2w-1, 2w-1]`` indexed by
    ``key - query`` (the same table, flipped), so no ``[heads, w^2, w^2]`` bias is built.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int = 0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide dim {dim}")
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size: must be in [0, {window_size}), got {shift_size}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        n = 2 * window_size - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n * n, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def _mask(self, hp: int, wp: int, device: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _shift_mask(hp, wp, self.window_size, self.shift_size, device)
        key = (hp, wp, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = _shift_mask(hp, wp, self.window_size, self.shift_size, device)
        return self._mask_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        w, s = self.window_size, self.shift_size
        pad_h, pad_w = (-H) % w, (-W) % w
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = H + pad_h, W + pad_w
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        nh = self.num_heads
        q, k, v = self.qkv(x).view(B, hp, wp, 3, nh, C // nh).unbind(3)
        n = 2 * w - 1
        rpb = self.relative_position_bias_table.view(n, n, nh).permute(2, 0, 1).flip(1, 2)
        bias = self._mask(hp, wp, x.device).to(q.dtype) if s else None
        x = na2d(q, k, v, w, stride=w, rpb=rpb, attn_bias=bias, scale=self.scale)
        x = x.reshape(B, hp, wp, C)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        if pad_h or pad_w:
            x = x[:, :H, :W]
        return self.proj_drop(self.proj(x))

    def _apply(self, fn, *args, **kwargs):
        self._mask_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, window_size={self.window_size}, "
            f"shift_size={self.shift_size}"
        )


# ----------------------------------------------------------------------------------------------
# blocks and stages


class AgentSwinBlock(nn.Module):
    """Pre-norm block: agent (``"A"``) or window (``"B"``) attention, then MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: tuple[int, int],
        attn_type: str,
        window_size: int,
        shift_size: int,
        agent_num: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        agent_shape: tuple[int, int] | None = None,
        downstream_windows: bool = False,
    ) -> None:
        super().__init__()
        # the official classification rule: a map that fits in the window is one unshifted
        # window; the official downstream backbone drops it for window blocks (they keep their
        # window and shift at every size, the map padded to the window)
        if min(resolution) <= window_size and not (downstream_windows and attn_type == "B"):
            shift_size, window_size = 0, min(resolution)
        self.norm1 = _agent.AutocastLayerNorm(dim)
        if attn_type == "A":
            self.attn: nn.Module = AgentAttention(
                dim, num_heads, (window_size, window_size), agent_num, qkv_bias, attn_drop,
                proj_drop, agent_shape,
            )  # fmt: skip
        elif attn_type == "B":
            if attn_drop:
                raise ValueError(
                    f"attn_drop_rate: the window-attention kernel has no attention dropout; "
                    f"use 0 (every official model does), got {attn_drop}"
                )
            self.attn = WindowAttention(
                dim, num_heads, window_size, shift_size, qkv_bias, qk_scale, proj_drop
            )
        else:
            raise ValueError(f"attn_type: must be 'A' or 'B', got {attn_type!r}")
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _agent.AutocastLayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, biases: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``biases``: the agent attention's prebuilt biases (ignored by window blocks)."""
        y = self.norm1(x)
        y = self.attn(y, biases) if isinstance(self.attn, AgentAttention) else self.attn(y)
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """``patch_size`` conv patchify (image zero-padded to a multiple of it) and optional
    LayerNorm, ``[B, C, H, W] -> [B, H/p, W/p, D]``."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, norm: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        # plain LayerNorm: its float32 output starts the residual stream, as in the official model
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.in_chans)
        p = self.patch_size
        ph, pw = (-x.shape[2]) % p, (-x.shape[3]) % p
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin patch merging on ``[B, H, W, C]`` (odd maps zero-padded): the 2x2 neighbours
    concatenated in the official order (row-offset fastest), LayerNorm, linear to ``2C``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = _agent.AutocastLayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # official concat order x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5)
        return self.reduction(self.norm(x.reshape(B, H // 2, W // 2, 4 * C)))


class AgentSwinStage(nn.Module):
    """Optional patch merging (from the previous stage), then the stage's blocks."""

    def __init__(
        self,
        dim: int,
        downsample: bool,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        attn_types: Sequence[str],
        window_size: int,
        agent_num: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        proj_drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        agent_shape: tuple[int, int] | None = None,
        downstream_windows: bool = False,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
        blocks = []
        for i in range(depth):
            win = window_size if attn_types[i] == "A" else max(7, window_size // 8)
            blocks.append(
                AgentSwinBlock(
                    dim,
                    num_heads,
                    resolution,
                    attn_types[i],
                    win,
                    0 if i % 2 == 0 else win // 2,
                    agent_num,
                    mlp_ratio,
                    qkv_bias,
                    qk_scale,
                    proj_drop,
                    attn_drop,
                    drop_path[i],
                    agent_shape,
                    downstream_windows,
                )  # fmt: skip
            )
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        attns = [b.attn if isinstance(b.attn, AgentAttention) else None for b in self.blocks]
        first = next((a for a in attns if a is not None), None)
        size = tuple(x.shape[1:3])
        biases = _agent.map_biases_group(
            attns, size, size, _agent.autocast_dtype(x), first and first.agent_shape
        )
        return _agent.run_blocks(self.blocks, x, biases, checkpointing=self.grad_checkpointing)


# ----------------------------------------------------------------------------------------------
# model


def _init_weights(module: nn.Module) -> None:
    # official init: truncated-normal linears with zero bias, unit LayerNorms, default convs
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class AgentSwinTransformer(nn.Module):
    """Agent-Swin.

    Args:
        img_size: training resolution; sizes the agent biases and the window/shift choice of
            every block (any input size runs, see the module docstring).
        patch_size: patch embedding size.
        in_chans: image channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: ``"avg"`` or ``""``.
        embed_dim: channels of the first stage, doubled at every later stage.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: official ``window_size`` (agent blocks use it, window blocks
            ``max(7, window_size // 8)``; both capped at the stage map).
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias in the qkv projections.
        qk_scale: window-attention scale (default ``head_dim ** -0.5``; agent blocks always
            use the default, as the official code does).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention projections and in the MLP (official
            ``drop_rate``).
        attn_drop_rate: attention-weight dropout of the agent blocks (window blocks need 0).
        drop_path_rate: stochastic depth, linear over all blocks.
        patch_norm: LayerNorm after the patch embedding.
        agent_num: agent tokens per stage (perfect squares).
        attn_type: per-stage attention letters, see :func:`parse_attn_types`.
        downstream_agent_shapes: the official detection / segmentation backbone's
            ``downstream_agent_shapes``, one ``(gh, gw)`` per stage (entries of stages without
            agent blocks are unused): agents are pooled onto this grid and the agent biases,
            stored for ``agent_num`` agents as in classification (so classification and
            official downstream checkpoints load unchanged), are bilinearly resized along the
            agent axis at every forward. None: the ``agent_num`` grids (classification).
        downstream_windows: the official detection / segmentation backbone's window blocks:
            ``max(7, window_size // 8)`` windows whose odd blocks shift by half a window at
            every map size. False: the classification rule (a stage whose ``img_size`` map fits
            in the window is one unshifted window).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 56,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        patch_norm: bool = True,
        agent_num: Sequence[int] = (9, 16, 49, 49),
        attn_type: str = "AAAB",
        downstream_agent_shapes: Sequence[tuple[int, int]] | None = None,
        downstream_windows: bool = False,
    ) -> None:
        super().__init__()
        n = len(depths)
        for name, seq in (("num_heads", num_heads), ("agent_num", agent_num)):
            if len(seq) != n:
                raise ValueError(f"{name}: needs one entry per stage ({n}), got {list(seq)}")
        types = parse_attn_types(attn_type, depths)
        agent_shapes = _agent.check_agent_shapes(downstream_agent_shapes, n) or [None] * n
        img = to_2tuple(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.embed_dim = embed_dim
        dims = [int(embed_dim * 2**i) for i in range(n)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, norm=patch_norm)
        self.pos_drop = nn.Dropout(proj_drop_rate)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.Sequential()
        self.feature_info: list[dict[str, Any]] = []
        for i in range(n):
            res = (img[0] // patch_size // 2**i, img[1] // patch_size // 2**i)
            self.stages.append(
                AgentSwinStage(
                    dims[i],
                    i > 0,
                    res,
                    depths[i],
                    num_heads[i],
                    types[i],
                    window_size,
                    int(agent_num[i]),
                    mlp_ratio,
                    qkv_bias,
                    qk_scale,
                    proj_drop_rate,
                    attn_drop_rate,
                    rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    agent_shapes[i],
                    downstream_windows,
                )  # fmt: skip
            )
            self.feature_info.append(
                dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"stages.{i}")
            )
        self.norm = _agent.AutocastLayerNorm(self.num_features)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
            input_fmt="NHWC",
        )  # fmt: skip
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # the official optimizer exempts the relative position bias tables (and 1-d params)
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^patch_embed",
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
        """Stage outputs (before the next patch merging) and, unless ``intermediates_only``,
        the normalized final map ``[B, H, W, C]``.

        ``indices``: last n stages if int, all if None, else the given stage indices. ``norm``
        applies the final norm to the last stage's output. ``output_fmt``: ``"NCHW"`` or
        ``"NHWC"`` for the intermediates.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt: must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        intermediates = []
        x = self.pos_drop(self.patch_embed(x))
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
        x = self.pos_drop(self.patch_embed(x))
        return self.norm(self.stages(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# official checkpoints


def _official(img: int, embed: int, depths: list[int], heads: list[int], window: int,
              attn: str, dpr: float) -> dict[str, Any]:  # fmt: skip
    return dict(
        img_size=img, patch_size=4, in_chans=3, num_classes=1000, embed_dim=embed,
        depths=depths, num_heads=heads, window_size=window, mlp_ratio=4.0, qkv_bias=True,
        qk_scale=None, drop_rate=0.0, drop_path_rate=dpr, ape=False, patch_norm=True,
        use_checkpoint=False, agent_num=["9", "16", "49", "49"], attn_type=attn,
    )  # fmt: skip


# official variant -> official constructor kwargs (cfgs/agent_swin_*.yaml via build.py)
OFFICIAL_VARIANTS: dict[str, dict[str, Any]] = {
    "agent_swin_tiny": _official(224, 96, [2, 2, 6, 2], [3, 6, 12, 24], 56, "AAAB", 0.2),
    "agent_swin_small": _official(224, 96, [2, 2, 18, 2], [3, 6, 12, 24], 56, "AABB", 0.3),
    "agent_swin_small_288": _official(288, 96, [2, 2, 18, 2], [3, 6, 12, 24], 72, "AABB", 0.3),
    "agent_swin_base": _official(224, 128, [2, 2, 18, 2], [4, 8, 16, 32], 56, "AAMB2", 0.5),
    "agent_swin_base_384": _official(384, 128, [2, 2, 18, 2], [4, 8, 16, 32], 96, "AAMB2", 0.5),
}

# official downstream kwargs: the same architecture as the classification variant
_DOWNSTREAM_ONLY = ("downstream_agent_shapes", "downstream_windows")

_KWARG_MAP = {
    "img_size": "img_size", "patch_size": "patch_size", "in_chans": "in_chans",
    "num_classes": "num_classes", "embed_dim": "embed_dim", "depths": "depths",
    "num_heads": "num_heads", "window_size": "window_size", "mlp_ratio": "mlp_ratio",
    "qkv_bias": "qkv_bias", "qk_scale": "qk_scale", "drop_rate": "proj_drop_rate",
    "attn_drop_rate": "attn_drop_rate", "drop_path_rate": "drop_path_rate",
    "patch_norm": "patch_norm", "agent_num": "agent_num", "attn_type": "attn_type",
    "downstream_agent_shapes": "downstream_agent_shapes",
}  # fmt: skip


def _ours_from_official_kwargs(official_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Our constructor kwargs for the official ``AgentSwinTransformer`` kwargs."""
    out: dict[str, Any] = {}
    for key, value in official_kwargs.items():
        if key == "ape":
            if value:
                raise ValueError("official_kwargs: ape=True (absolute position embedding) is "
                                 "not supported; no official Agent-Swin uses it")  # fmt: skip
        elif key in ("use_checkpoint", "norm_layer"):
            if key == "norm_layer" and "LayerNorm" not in str(value):
                raise ValueError(f"official_kwargs: norm_layer must be LayerNorm, got {value!r}")
        elif key in _KWARG_MAP:
            out[_KWARG_MAP[key]] = list(value) if isinstance(value, tuple) else value
        else:
            raise ValueError(
                f"official_kwargs: {key!r} is not an argument of the official "
                f"AgentSwinTransformer (known: {sorted(_KWARG_MAP)})"
            )
    if "agent_num" in out:
        out["agent_num"] = [int(a) for a in out["agent_num"]]
    if "downstream_agent_shapes" in official_kwargs:
        out["downstream_windows"] = True  # only the official downstream class takes them
    if isinstance(out.get("img_size"), (list, tuple)):
        out["img_size"] = tuple(out["img_size"])
    return out


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from visionattn.convert import unwrap_state_dict

    sd = unwrap_state_dict(checkpoint)
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def _convert_key(key: str) -> str | None:
    """Our key for one official key; ``""`` for official buffers we recompute (relative
    position index, shift masks); None for unknown keys."""
    if key.endswith((".relative_position_index", ".attn_mask")):
        return ""
    if key.startswith("patch_embed.") or key.startswith("norm."):
        return key
    if key.startswith("head."):
        return "head.fc." + key[len("head.") :]
    m = re.fullmatch(r"layers\.(\d+)\.(downsample|blocks)\.(.+)", key)
    if m is None:
        return None
    i, part, rest = int(m.group(1)), m.group(2), m.group(3)
    if part == "downsample":
        return f"stages.{i + 1}.downsample.{rest}"
    return f"stages.{i}.blocks.{rest}"


def convert_official_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename an official Agent-Swin state dict to our keys (every key must be known)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in _unwrap(state_dict).items():
        new = _convert_key(k)
        if new is None:
            unknown.append(k)
        elif new:
            out[new] = v
    if unknown:
        raise ValueError(f"state_dict: official Agent-Swin keys not recognized: {unknown[:10]}")
    return out


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Official Agent-Swin checkpoints (bare or wrapped, DDP prefix or not) or our own into
    ``model``'s keys. Agent biases trained at another resolution are bilinearly resized."""
    sd = _unwrap(state_dict)
    if not any(k.startswith("stages.") for k in sd):
        sd = convert_official_state_dict(sd)
    return _agent.fit_agent_biases(sd, model.state_dict())


def official_model_args(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "agent_swin",
) -> tuple[str, dict[str, Any]]:
    """Registered model name and kwargs that build our counterpart of an official Agent-Swin.

    ``official_kwargs``: the official constructor's kwargs; without them ``variant`` (an
    official config name such as ``"agent_swin_tiny"``) supplies them. ``num_classes`` follows
    the checkpoint's head.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: must be one of {FAMILIES}, got {family!r}")
    return official_variant_args(
        _unwrap(state_dict), official_kwargs, variant, label="Agent-Swin",
        variants=OFFICIAL_VARIANTS, to_ours=_ours_from_official_kwargs, default="agent_swin_tiny",
        model_cls=AgentSwinTransformer, skip=(*TRAINING_ONLY_KWARGS, *_DOWNSTREAM_ONLY),
    )  # fmt: skip


def from_official(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "agent_swin",
) -> nn.Module:
    """Our model built from an official Agent-Swin checkpoint, weights loaded strictly, eval
    mode. ``official_kwargs``: the official constructor kwargs (e.g. a parity vector's
    ``constructor_kwargs``); without them ``variant`` names an official config. The returned
    model's ``model_args`` rebuild it from its registered name."""
    name, args = official_model_args(state_dict, official_kwargs, variant=variant, family=family)
    return build_converted(name, args, lambda m: checkpoint_filter_fn(state_dict, m))


# ----------------------------------------------------------------------------------------------
# pretrained configs and registration


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return _agent.agent_cfg("patch_embed.proj", "head.fc", url=url, **kwargs)


_URL = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"
# official README checkpoint links; TEST.CROP False at 288 / 384 (plain resize)
_WEIGHTS: dict[str, tuple[str, dict[str, Any]]] = {
    "agent_swin_tiny.in1k": ("a2ddc1190c224f768a41", {}),
    "agent_swin_small.in1k": ("f607172c9fea4d6e99bb", {}),
    "agent_swin_small_288.in1k": (
        "09760394e93b4046a25e", dict(input_size=(3, 288, 288), pool_size=(9, 9), crop_pct=1.0)),
    "agent_swin_base.in1k": ("4fcd2d0114bb490483c3", {}),
    "agent_swin_base_384.in1k": (
        "bb84ee9058954706a557", dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)),
}  # fmt: skip

default_cfgs = generate_default_cfgs(
    {
        **{
            tag: _cfg(hf_hub_id=f"visionattn/{tag}", origin_url=_URL.format(fid), **extra)
            for tag, (fid, extra) in _WEIGHTS.items()
        },
        "test_agent_swin.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
    }
)

# tiny configuration for tests: stage 1 is "M" (an agent block, then a shifted 7x7 window
# block on the 8x8 map, padded to 14x14)
_TEST_ARGS = dict(
    img_size=64, embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], window_size=16,
    mlp_ratio=2.0, agent_num=[4, 4, 9, 4], attn_type="AMAB1", drop_path_rate=0.0,
)  # fmt: skip


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    if variant in OFFICIAL_VARIANTS:
        args = _ours_from_official_kwargs(OFFICIAL_VARIANTS[variant])
    else:
        args = dict(_TEST_ARGS)
    args.update(kwargs)
    out_indices = args.pop("out_indices", tuple(range(len(args.get("depths", (0,) * 4)))))
    return build_model_with_cfg(
        AgentSwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **args,
    )


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-T (29M params, 224px, attn AAAB)."""
    return _create("agent_swin_tiny", pretrained, **kwargs)


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-S (50M params, 224px, attn AABB)."""
    return _create("agent_swin_small", pretrained, **kwargs)


@register_model
def agent_swin_small_288(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-S at 288px (window 72)."""
    return _create("agent_swin_small_288", pretrained, **kwargs)


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-B (88M params, 224px, attn AAMB2: stage 3 has 2 agent then window blocks)."""
    return _create("agent_swin_base", pretrained, **kwargs)


@register_model
def agent_swin_base_384(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-B at 384px (window 96)."""
    return _create("agent_swin_base_384", pretrained, **kwargs)


@register_model
def test_agent_swin(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Tiny Agent-Swin for tests (untrained)."""
    return _create("test_agent_swin", pretrained, **kwargs)

"""Agent-PVT: Pyramid Vision Transformer with agent attention.

Paper: `Agent Attention: On the Integration of Softmax and Linear Attention`
(Han, Ye, Han, Xia, Pan, Wan, Song, Huang; ECCV 2024) - https://arxiv.org/abs/2312.08874
Official code and checkpoints: https://github.com/LeapLabTHU/Agent-Attention
(``agent_transformer/models/agent_pvt.py``, configs ``cfgs/agent_pvt_*.yaml``). This is an
independent implementation whose weights are interchangeable with the official ones
(``checkpoint_filter_fn``, ``from_official``).

Architecture (PVT v1): per stage a strided-conv patch embedding with LayerNorm, a learned
position embedding, and pre-norm blocks; no final norm, the classifier sees the mean token.
Each stage's attention comes from ``attn_type`` (one letter per stage): ``A`` agent attention
(``visionattn.backbones._agent``, SDPA) whose keys/values are spatially reduced by
``agent_sr_ratios`` (all 1 in the official configs), ``B`` PVT spatial-reduction attention
(``sr_ratios``) on SDPA. Every official config is ``"AAAA"`` with agents 9-16-49-49.

Input sizes: the position embeddings and the agent biases are bilinearly resized to the
running stage map (the official classification code resizes the position embeddings, its
detection / segmentation backbones the agent biases); at the official resolution nothing is
resized and the outputs equal the official model's. Patch embeddings are strided convs
(``floor(size / stride)`` per axis, as the official model).

Detection / segmentation: ``downstream_agent_shapes`` (one ``(gh, gw)`` per stage, e.g.
``[(12, 12), (16, 16), (28, 28), (28, 28)]`` in the official configs) pools the agents onto
those grids and resizes the agent biases along the agent axis at every forward (bilinear,
after their resize to the running map), as the official ``downstream/`` backbones do; the
stored biases keep their classification shapes. Like there, agent stages then need
``agent_sr_ratios`` 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import (
    ClassifierHead,
    DropPath,
    Mlp,
    resample_abs_pos_embed,
    to_2tuple,
    trunc_normal_,
)
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

__all__ = [
    "FAMILIES",
    "OFFICIAL_FAMILIES",
    "OFFICIAL_VARIANTS",
    "AgentPVT",
    "checkpoint_filter_fn",
    "from_official",
    "official_model_args",
]

FAMILIES = ("agent_pvt",)
# official family names visionattn.convert.from_official routes here
OFFICIAL_FAMILIES = ("agent_pvt",)


def _tokens_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, H*W, C]`` tokens -> ``[B, C, H, W]`` view (channels-last memory)."""
    return x.unflatten(1, size).permute(0, 3, 1, 2)


class _SpatialReduction(nn.Module):
    """Keys/values input: ``sr x sr`` stride-``sr`` conv then LayerNorm (official ``sr`` /
    ``norm``), ``[B, H*W, C] -> [B, (H/sr)*(W/sr), C]`` and the reduced map size."""

    def __init__(self, dim: int, sr_ratio: int) -> None:
        super().__init__()
        self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
        self.norm = _agent.AutocastLayerNorm(dim)

    def forward(
        self, x: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        y = self.sr(_tokens_map(x, size).contiguous(memory_format=torch.channels_last))
        hk, wk = y.shape[2:]
        return self.norm(y.permute(0, 2, 3, 1).reshape(x.shape[0], hk * wk, -1)), (hk, wk)


class AgentAttention(nn.Module):
    """Agent attention on ``[B, H*W, C]`` tokens (official ``q`` / ``kv`` / ``dwc`` / bias
    names). With ``sr_ratio`` 1 the q and kv projections run as one GEMM. ``agent_shape``: the
    official downstream agent grid (agents pooled onto it, biases resized along the agent
    axis at every forward); None: the ``agent_num`` grid."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias_size: tuple[int, int],
        agent_num: int = 49,
        sr_ratio: int = 1,
        qkv_bias: bool = False,
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
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reduce = _SpatialReduction(dim, sr_ratio) if sr_ratio > 1 else None
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        key_size = (bias_size[0] // sr_ratio, bias_size[1] // sr_ratio)
        _agent.init_agent_biases(self, num_heads, agent_num, key_size, bias_size)

    def key_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The key map size for a ``size`` query map (``sr x sr`` stride-``sr`` reduction)."""
        if self.reduce is None:
            return size
        return (size[0] // self.sr_ratio, size[1] // self.sr_ratio)

    def forward(
        self,
        x: torch.Tensor,
        size: tuple[int, int],
        biases: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``biases``: this module's ``map_biases`` for the running size when the caller built
        them (the stage builds its blocks' together); else built here."""
        B, N, C = x.shape
        if self.reduce is None:
            w = torch.cat([self.q.weight, self.kv.weight])
            b = None if self.q.bias is None else torch.cat([self.q.bias, self.kv.bias])
            q, k, v = F.linear(x, w, b).view(B, N, 3, C).unbind(2)
            key_size = size
        else:
            q = self.q(x)
            kv, key_size = self.reduce(x, size)
            k, v = self.kv(kv).view(B, -1, 2, C).unbind(2)
        agents = _agent.pool_agents(q, size, self.agent_shape)
        if biases is None:
            biases = _agent.map_biases(self, key_size, size, q.dtype, self.agent_shape)
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
        if self.reduce is not None:
            # the official model upsamples the reduced values before the depthwise conv
            vm = F.interpolate(_tokens_map(v, key_size), size=size, mode="bilinear")
            v = vm.permute(0, 2, 3, 1).reshape(B, N, C)
        x = _agent.merge_heads(out) + _agent.dwc_tokens(v, size, self.dwc)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        shape = "" if self.agent_shape == self.grid else f", agent_shape={self.agent_shape}"
        return (
            f"num_heads={self.num_heads}, agent_num={self.agent_num}, sr_ratio={self.sr_ratio}"
            f"{shape}"
        )


class SRAttention(nn.Module):
    """PVT spatial-reduction attention on SDPA (official ``q`` / ``kv`` / ``sr`` / ``norm``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide dim {dim}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = _agent.AutocastLayerNorm(dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        kv_in = x
        if self.sr_ratio > 1:
            y = self.sr(_tokens_map(x, size))
            kv_in = self.norm(y.flatten(2).transpose(1, 2))
        k, v = self.kv(kv_in).view(B, -1, 2, C).unbind(2)
        nh = self.num_heads
        out = F.scaled_dot_product_attention(
            _agent.split_heads(self.q(x), nh),
            _agent.split_heads(k, nh),
            _agent.split_heads(v, nh),
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        return self.proj_drop(self.proj(_agent.merge_heads(out)))


class AgentPVTBlock(nn.Module):
    """Pre-norm block (LayerNorm eps 1e-6): agent or spatial-reduction attention, MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_type: str,
        bias_size: tuple[int, int],
        agent_num: int,
        sr_ratio: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        agent_shape: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = _agent.AutocastLayerNorm(dim, eps=1e-6)
        if attn_type == "A":
            self.attn: nn.Module = AgentAttention(
                dim, num_heads, bias_size, agent_num, sr_ratio, qkv_bias, attn_drop, proj_drop,
                agent_shape,
            )  # fmt: skip
        elif attn_type == "B":
            self.attn = SRAttention(
                dim, num_heads, sr_ratio, qkv_bias, qk_scale, attn_drop, proj_drop
            )
        else:
            raise ValueError(f"attn_type: stage letters must be 'A' or 'B', got {attn_type!r}")
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _agent.AutocastLayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        size: tuple[int, int],
        biases: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``biases``: the agent attention's prebuilt biases (ignored by SR attention)."""
        y = self.norm1(x)
        y = (
            self.attn(y, size, biases)
            if isinstance(self.attn, AgentAttention)
            else self.attn(y, size)
        )
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Strided-conv patch embedding + LayerNorm, ``[B, C, H, W] -> [B, H/p, W/p, D]``."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        # plain LayerNorm: its float32 output starts the stage's residual stream, as officially
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def _resample_pos(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """``[1, H*W, C]`` position embedding bilinearly resized from ``old`` to ``new`` (the
    official downstream PVT's rule; timm's resampler without its default antialiasing)."""
    return resample_abs_pos_embed(
        pos, list(new), list(old), num_prefix_tokens=0, interpolation="bilinear", antialias=False
    )


class AgentPVTStage(nn.Module):
    """Patch embedding, position embedding (resized to the running map), blocks; maps are
    ``[B, H, W, C]`` in and out (the image ``[B, C, H, W]`` for the first stage)."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        patch_size: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        attn_type: str,
        agent_num: int,
        sr_ratio: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        proj_drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        first: bool,
        agent_shape: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.first = first
        self.resolution = resolution
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, resolution[0] * resolution[1], dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(proj_drop)
        self.blocks = nn.ModuleList(
            AgentPVTBlock(
                dim,
                num_heads,
                attn_type,
                resolution,
                agent_num,
                sr_ratio,
                mlp_ratio,
                qkv_bias,
                qk_scale,
                proj_drop,
                attn_drop,
                drop_path[j],
                agent_shape,
            )  # fmt: skip
            for j in range(depth)
        )

    def _pos(self, size: tuple[int, int]) -> torch.Tensor:
        if size == self.resolution:
            return self.pos_embed
        return _resample_pos(self.pos_embed, self.resolution, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x if self.first else x.permute(0, 3, 1, 2))
        B, H, W, C = x.shape
        x = self.pos_drop(x.reshape(B, H * W, C) + self._pos((H, W)))
        attns = [b.attn if isinstance(b.attn, AgentAttention) else None for b in self.blocks]
        first = next((a for a in attns if a is not None), None)
        biases = [None] * len(attns)
        if first is not None:
            biases = _agent.map_biases_group(
                attns, first.key_size((H, W)), (H, W), _agent.autocast_dtype(x), first.agent_shape
            )
        x = _agent.run_blocks(self.blocks, x, biases, (H, W), checkpointing=self.grad_checkpointing)
        return x.view(B, H, W, C)


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


def _stage_letters(value: str, n: int, name: str, allowed: str) -> str:
    if not isinstance(value, str) or len(value) != n or any(c not in allowed for c in value):
        raise ValueError(f"{name}: needs {n} characters from {allowed!r}, got {value!r}")
    return value


class AgentPVT(nn.Module):
    """Agent-PVT.

    Args:
        img_size: training resolution; sizes the position embeddings and agent biases (any
            input size runs, see the module docstring).
        patch_size: first stage's patch size (later stages use 2).
        in_chans: image channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: ``"avg"`` or ``""``.
        embed_dims: channels per stage.
        num_heads: attention heads per stage.
        mlp_ratios: MLP hidden width / channels per stage.
        qkv_bias: bias in the q / kv projections.
        qk_scale: spatial-reduction attention scale (agent blocks always use the default).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after position embeddings, attention projections and in the
            MLP (official ``drop_rate``).
        attn_drop_rate: attention-weight dropout.
        drop_path_rate: stochastic depth, linear over all blocks.
        depths: blocks per stage.
        sr_ratios: key/value reduction of ``B`` (spatial-reduction attention) stages.
        agent_sr_ratios: key/value reduction of ``A`` (agent) stages, one digit per stage.
        agent_num: agent tokens per stage (perfect squares).
        attn_type: ``A`` or ``B`` per stage.
        downstream_agent_shapes: the official detection / segmentation backbone's
            ``downstream_agent_shapes``, one ``(gh, gw)`` per stage (entries of ``B`` stages
            are unused): agents are pooled onto this grid and the agent biases, stored for
            ``agent_num`` agents as in classification (so classification and official
            downstream checkpoints load unchanged), are bilinearly resized along the agent
            axis at every forward. Needs ``agent_sr_ratios`` 1 in ``A`` stages (the official
            downstream agent attention has no key/value reduction). None: the ``agent_num``
            grids (classification).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        depths: Sequence[int] = (2, 2, 2, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        agent_sr_ratios: str = "1111",
        agent_num: Sequence[int] = (9, 16, 49, 49),
        attn_type: str = "AAAA",
        downstream_agent_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        n = len(depths)
        for name, seq in (
            ("embed_dims", embed_dims), ("num_heads", num_heads), ("mlp_ratios", mlp_ratios),
            ("sr_ratios", sr_ratios), ("agent_num", agent_num),
        ):  # fmt: skip
            if len(seq) != n:
                raise ValueError(f"{name}: needs one entry per stage ({n}), got {list(seq)}")
        attn_type = _stage_letters(attn_type, n, "attn_type", "AB")
        agent_sr_ratios = _stage_letters(str(agent_sr_ratios), n, "agent_sr_ratios", "123456789")
        agent_shapes = _agent.check_agent_shapes(downstream_agent_shapes, n)
        if agent_shapes is not None and any(
            t == "A" and r != "1" for t, r in zip(attn_type, agent_sr_ratios)
        ):
            raise ValueError(
                f"downstream_agent_shapes: the official downstream agent attention has no "
                f"key/value reduction; needs agent_sr_ratios 1 in agent stages, got "
                f"agent_sr_ratios={agent_sr_ratios!r} with attn_type={attn_type!r}"
            )
        agent_shapes = agent_shapes or [None] * n
        img = to_2tuple(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = int(embed_dims[-1])
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.Sequential()
        self.feature_info: list[dict[str, Any]] = []
        res = img
        for i in range(n):
            p = patch_size if i == 0 else 2
            res = (res[0] // p, res[1] // p)
            sr = sr_ratios[i] if attn_type[i] == "B" else int(agent_sr_ratios[i])
            self.stages.append(
                AgentPVTStage(
                    in_chans if i == 0 else embed_dims[i - 1],
                    embed_dims[i],
                    p,
                    res,
                    depths[i],
                    num_heads[i],
                    attn_type[i],
                    int(agent_num[i]),
                    sr,
                    mlp_ratios[i],
                    qkv_bias,
                    qk_scale,
                    proj_drop_rate,
                    attn_drop_rate,
                    rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    first=i == 0,
                    agent_shape=agent_shapes[i],
                )  # fmt: skip
            )
            self.feature_info.append(
                dict(num_chs=embed_dims[i], reduction=patch_size * 2**i, module=f"stages.{i}")
            )
        self.norm = nn.Identity()  # PVT's classifier has no final norm
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
            input_fmt="NHWC",
        )  # fmt: skip
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # the official recipe decays everything but 1-d params (handled by timm's optimizer
        # factory) and its (absent) cls_token
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stages\.0\.(patch_embed|pos_embed)",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.(patch_embed|pos_embed)", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
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
        """Stage outputs and, unless ``intermediates_only``, the final map ``[B, H, W, C]``.

        ``indices``: last n stages if int, all if None, else the given stage indices. ``norm``
        has no effect (the model has no final norm). ``output_fmt``: ``"NCHW"`` or ``"NHWC"``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt: must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        _check_image(x, self.stages[0].patch_embed.proj.in_channels)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(
                    x.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x
                )
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W] -> [B, H/32, W/32, num_features]`` (channels-last)."""
        _check_image(x, self.stages[0].patch_embed.proj.in_channels)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_image(x: torch.Tensor, in_chans: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"x: expected an image batch [B, {in_chans}, H, W], got shape {tuple(x.shape)}"
        )


# ----------------------------------------------------------------------------------------------
# official checkpoints


def _official(depths: list[int], dpr: float, img: int = 224) -> dict[str, Any]:
    # models/agent_pvt.py factories + cfgs/agent_pvt_*.yaml through models/build.py
    return dict(
        patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8],
        mlp_ratios=[8, 8, 4, 4], qkv_bias=True,
        norm_layer="functools.partial(<class 'torch.nn.modules.normalization.LayerNorm'>, "
        "eps=1e-06)",
        depths=depths, sr_ratios=[8, 4, 2, 1], img_size=img, drop_path_rate=dpr,
        agent_num=["9", "16", "49", "49"], attn_type="AAAA", agent_sr_ratios="1111",
    )  # fmt: skip


OFFICIAL_VARIANTS: dict[str, dict[str, Any]] = {
    "agent_pvt_tiny": _official([2, 2, 2, 2], 0.1),
    "agent_pvt_small": _official([3, 4, 6, 3], 0.1),
    "agent_pvt_medium": _official([3, 4, 18, 3], 0.3),
    "agent_pvt_medium_256": _official([3, 4, 18, 3], 0.3, img=256),
    "agent_pvt_large": _official([3, 8, 27, 3], 0.3),
}

# official downstream kwargs: the same architecture as the classification variant
_DOWNSTREAM_ONLY = ("downstream_agent_shapes", "downstream_windows")

_KWARG_MAP = {
    "img_size": "img_size", "patch_size": "patch_size", "in_chans": "in_chans",
    "num_classes": "num_classes", "embed_dims": "embed_dims", "num_heads": "num_heads",
    "mlp_ratios": "mlp_ratios", "qkv_bias": "qkv_bias", "qk_scale": "qk_scale",
    "drop_rate": "proj_drop_rate", "attn_drop_rate": "attn_drop_rate",
    "drop_path_rate": "drop_path_rate", "depths": "depths", "sr_ratios": "sr_ratios",
    "agent_sr_ratios": "agent_sr_ratios", "agent_num": "agent_num", "attn_type": "attn_type",
    "downstream_agent_shapes": "downstream_agent_shapes",
}  # fmt: skip


def _ours_from_official_kwargs(official_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Our constructor kwargs for the official ``PyramidVisionTransformer`` kwargs."""
    out: dict[str, Any] = {}
    for key, value in official_kwargs.items():
        if key == "norm_layer":
            if "LayerNorm" not in str(value) or "1e-06" not in str(value):
                raise ValueError(
                    f"official_kwargs: norm_layer must be LayerNorm(eps=1e-6), got {value!r}"
                )
        elif key == "num_stages":
            if value != len(official_kwargs.get("depths", [0] * 4)):
                raise ValueError(f"official_kwargs: num_stages={value!r} must equal len(depths)")
        elif key in _KWARG_MAP:
            out[_KWARG_MAP[key]] = list(value) if isinstance(value, tuple) else value
        else:
            raise ValueError(
                f"official_kwargs: {key!r} is not an argument of the official Agent-PVT "
                f"(known: {sorted(_KWARG_MAP)})"
            )
    if "agent_num" in out:
        out["agent_num"] = [int(a) for a in out["agent_num"]]
    if "agent_sr_ratios" in out:
        out["agent_sr_ratios"] = str(out["agent_sr_ratios"])
    if out.get("attn_type") is None:
        out.pop("attn_type", None)  # the official default 'AAAA'
    return out


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from visionattn.convert import unwrap_state_dict

    sd = unwrap_state_dict(checkpoint)
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def _convert_key(key: str) -> str | None:
    """Our key for one official key (None if unknown)."""
    if key.startswith("head."):
        return "head.fc." + key[len("head.") :]
    m = re.fullmatch(r"(patch_embed|pos_embed|block)(\d+)(\..+)?", key)
    if m is None:
        return None
    kind, i, rest = m.group(1), int(m.group(2)) - 1, m.group(3) or ""
    if kind == "block":
        # the agent blocks' reduction conv/norm live in a submodule here
        rest = re.sub(r"^(\.\d+\.attn)\.(sr|norm)\.", r"\1.reduce.\2.", rest)
        return f"stages.{i}.blocks{rest}"
    return f"stages.{i}.{kind}{rest}"


def convert_official_state_dict(
    state_dict: Mapping[str, Any], model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Rename an official Agent-PVT state dict to our keys (every key must be known).

    Spatial-reduction convs of ``B`` blocks keep the official ``attn.sr`` / ``attn.norm``
    names; those of agent blocks move to ``attn.reduce.*`` (decided from the block type:
    agent blocks carry ``an_bias``)."""
    sd = _unwrap(state_dict)
    agent_blocks = {k.rsplit(".attn.", 1)[0] for k in sd if k.endswith(".attn.an_bias")}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in sd.items():
        new = _convert_key(k)
        if new is None:
            unknown.append(k)
            continue
        if ".attn.reduce." in new and k.rsplit(".attn.", 1)[0] not in agent_blocks:
            new = new.replace(".attn.reduce.", ".attn.")
        out[new] = v
    if unknown:
        raise ValueError(f"state_dict: official Agent-PVT keys not recognized: {unknown[:10]}")
    return out


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Official Agent-PVT checkpoints (bare or wrapped, DDP prefix or not) or our own into
    ``model``'s keys. Position embeddings and agent biases trained at another resolution are
    bilinearly resized."""
    sd = _unwrap(state_dict)
    if not any(k.startswith("stages.") for k in sd):
        sd = convert_official_state_dict(sd)
    target = model.state_dict()
    for k, v in list(sd.items()):
        if k not in target or target[k].shape == v.shape:
            continue
        if k.endswith(".pos_embed"):
            s_old, s_new = math.isqrt(v.shape[1]), math.isqrt(target[k].shape[1])
            sd[k] = _resample_pos(v, (s_old, s_old), (s_new, s_new))
    return _agent.fit_agent_biases(sd, target)


def official_model_args(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "agent_pvt",
) -> tuple[str, dict[str, Any]]:
    """Registered model name and kwargs that build our counterpart of an official Agent-PVT.

    ``official_kwargs``: the official constructor's kwargs; without them ``variant`` (an
    official config name such as ``"agent_pvt_tiny"``) supplies them. ``num_classes`` follows
    the checkpoint's head.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: must be one of {FAMILIES}, got {family!r}")
    return official_variant_args(
        _unwrap(state_dict), official_kwargs, variant, label="Agent-PVT",
        variants=OFFICIAL_VARIANTS, to_ours=_ours_from_official_kwargs, default="agent_pvt_tiny",
        model_cls=AgentPVT, skip=(*TRAINING_ONLY_KWARGS, *_DOWNSTREAM_ONLY),
    )  # fmt: skip


def from_official(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "agent_pvt",
) -> nn.Module:
    """Our model built from an official Agent-PVT checkpoint, weights loaded strictly, eval
    mode. ``official_kwargs``: the official constructor kwargs (e.g. a parity vector's
    ``constructor_kwargs``); without them ``variant`` names an official config. The returned
    model's ``model_args`` rebuild it from its registered name."""
    name, args = official_model_args(state_dict, official_kwargs, variant=variant, family=family)
    return build_converted(name, args, lambda m: checkpoint_filter_fn(state_dict, m))


# ----------------------------------------------------------------------------------------------
# pretrained configs and registration


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return _agent.agent_cfg("stages.0.patch_embed.proj", "head.fc", url=url, **kwargs)


_URL = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"
# official README checkpoint links
_WEIGHTS: dict[str, tuple[str, dict[str, Any]]] = {
    "agent_pvt_tiny.in1k": ("13fdf0e0a7c5498c934f", {}),
    "agent_pvt_small.in1k": ("36b8be9a8863456685a3", {}),
    "agent_pvt_medium.in1k": ("4d00ecacf18b45f9b88c", {}),
    "agent_pvt_medium_256.in1k": (
        "654df734121643b19c52", dict(input_size=(3, 256, 256), pool_size=(8, 8))),
    "agent_pvt_large.in1k": ("040cfe0cfbbe4762ad09", {}),
}  # fmt: skip

default_cfgs = generate_default_cfgs(
    {
        **{
            tag: _cfg(hf_hub_id=f"visionattn/{tag}", origin_url=_URL.format(fid), **extra)
            for tag, (fid, extra) in _WEIGHTS.items()
        },
        "test_agent_pvt.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
    }
)

# tiny configuration for tests: agent stages and a spatial-reduction attention stage; agent_sr
# 1 as in every official config, so the official downstream agent shapes apply to it (the
# reduced-key agent path is tested on the attention module)
_TEST_ARGS = dict(
    img_size=64, embed_dims=[16, 32, 40, 64], num_heads=[1, 2, 5, 4], mlp_ratios=[2, 2, 2, 2],
    depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], agent_sr_ratios="1111",
    agent_num=[4, 4, 4, 4], attn_type="AABA", drop_path_rate=0.0,
)  # fmt: skip


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    if variant in OFFICIAL_VARIANTS:
        args = _ours_from_official_kwargs(OFFICIAL_VARIANTS[variant])
    else:
        args = dict(_TEST_ARGS)
    args.update(kwargs)
    out_indices = args.pop("out_indices", tuple(range(len(args.get("depths", (0,) * 4)))))
    return build_model_with_cfg(
        AgentPVT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **args,
    )


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """Agent-PVT-T (11.6M params, 224px)."""
    return _create("agent_pvt_tiny", pretrained, **kwargs)


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """Agent-PVT-S (20.6M params, 224px)."""
    return _create("agent_pvt_small", pretrained, **kwargs)


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """Agent-PVT-M (35.9M params, 224px)."""
    return _create("agent_pvt_medium", pretrained, **kwargs)


@register_model
def agent_pvt_medium_256(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """Agent-PVT-M at 256px."""
    return _create("agent_pvt_medium_256", pretrained, **kwargs)


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """Agent-PVT-L (48.7M params, 224px; official config agent_pvt_b.yaml)."""
    return _create("agent_pvt_large", pretrained, **kwargs)


@register_model
def test_agent_pvt(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """Tiny Agent-PVT for tests (untrained)."""
    return _create("test_agent_pvt", pretrained, **kwargs)

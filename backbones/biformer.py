"""BiFormer: Vision Transformer with Bi-Level Routing Attention.

Paper: "BiFormer: Vision Transformer with Bi-Level Routing Attention", Lei Zhu, Xinjiang Wang,
Zhanghan Ke, Wayne Zhang, Rynson Lau, CVPR 2023 (https://arxiv.org/abs/2303.08810).
Official code: https://github.com/rayleizhu/BiFormer (models/biformer.py, ops/bra_legacy.py).

A four-stage convolutional-stem hierarchy. Each block adds a depth-wise conv position embedding,
then runs attention and an MLP (pre-norm). In the first three stages attention is bi-level
routing attention (BRA): the map is split into an ``n_win x n_win`` grid of regions, every
region picks its ``topk`` most related regions from region-mean queries and keys, and its
tokens attend to all tokens of those regions. The last stage attends globally.

Computation follows the official model exactly, including its choices that differ from the
usual conventions:

* BRA scales logits (and routing logits) by ``qk_dim ** -0.5`` -- the full query width of the
  layer, not the per-head width.
* BRA's local context term (LePE) is a depth-wise conv of the *values*; the global last stage
  (official ``topk=-2``) applies its LePE conv to the block's normalized *input*, uses 8 heads
  whatever ``head_dim`` says, ``(dim // 8) ** -0.5`` as scale and no qkv bias.
* With ``auto_pad`` (the official detection/segmentation setting) each BRA layer zero-pads its
  normalized input at the bottom/right to a multiple of ``n_win``; padded tokens go through the
  qkv projection (so they carry its bias), take part in region means, routing and attention,
  and are cropped after the output projection.

Attention runs on ``visionattn.kernels``: BRA on the routed block-sparse kernel (no gathered
copies of keys/values), the global stage on ``scaled_dot_product_attention``.

Numerics: in float32 a converted official checkpoint reproduces the official logits and stage
features to ~1e-6 (summation order inside the fused kernels differs). Routing is a hard top-k
on region affinities, so where two regions' affinities are closer than the rounding error
(~1e-6 in float32, ~1e-2 relative in bfloat16 autocast) the chosen regions may differ from the
official ones; that choice is equally arbitrary in the official code (its own float32 and
bfloat16 runs disagree there too) and cannot be made identical without its exact kernels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, LayerNorm2d, LayerScale, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from visionattn.backbones._convert import build_converted
from visionattn.backbones._layers import AutocastLayerNorm
from visionattn.kernels.routed import routed_attention
from visionattn.kernels.routing import bra_route, crop_from_grid, pad_to_grid

# official family names visionattn.convert.from_official routes here
OFFICIAL_FAMILIES = ("biformer",)

__all__ = [
    "FAMILIES",
    "OFFICIAL_DEFAULTS",
    "OFFICIAL_VARIANTS",
    "BiFormer",
    "BiLevelRoutingAttention",
    "GlobalAttention",
    "checkpoint_filter_fn",
    "from_official",
    "official_model_args",
    "official_to_ours_kwargs",
]

FAMILIES = ("biformer",)


# --------------------------------------------------------------------------------------------
# layers


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention on an NHWC map, as the official ``BiLevelRoutingAttention``.

    Args:
        dim: channels of the input and of the values.
        num_heads: attention heads (``qk_dim`` and ``dim`` must divide by it).
        n_win: regions per side; the map is split into ``n_win x n_win`` regions.
        topk: regions each region attends to (``1 <= topk <= n_win ** 2``).
        qk_dim: query/key width (defaults to ``dim``).
        qk_scale: logit scale; the official default is ``qk_dim ** -0.5``.
        side_dwconv: kernel of the depth-wise LePE conv on the values (0 disables it).
        out_proj: output projection (official ``param_attention="qkvo"``) or none (``"qkv"``).
        auto_pad: pad the map to a multiple of ``n_win`` (else such a map is refused).

    Input and output: ``[B, H, W, dim]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win: int,
        topk: int,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
        out_proj: bool = True,
        auto_pad: bool = False,
    ) -> None:
        super().__init__()
        qk_dim = qk_dim or dim
        if qk_dim % num_heads or dim % num_heads:
            raise ValueError(
                f"num_heads: {num_heads} must divide qk_dim ({qk_dim}) and dim ({dim})"
            )
        if not 1 <= topk <= n_win * n_win:
            raise ValueError(f"topk: {topk} must be in [1, n_win ** 2 = {n_win * n_win}]")
        self.dim = dim
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.scale = qk_scale or qk_dim**-0.5
        self.auto_pad = auto_pad
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
            if side_dwconv > 0
            else None
        )
        self.proj = nn.Linear(dim, dim) if out_proj else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H_in, W_in = x.shape[1], x.shape[2]
        if self.auto_pad:
            # official auto_pad: zeros before the qkv projection, so padded tokens carry its bias
            x, pad = pad_to_grid(x, self.n_win)
        elif H_in % self.n_win or W_in % self.n_win:
            raise ValueError(
                f"input: a {H_in}x{W_in} feature map is not divisible by n_win={self.n_win}; "
                "build the model with auto_pad=True to pad it as the official detection and "
                "segmentation backbones do, or feed an input whose stage maps divide by n_win"
            )
        else:
            pad = (0, 0)
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        q = q.unflatten(-1, (self.num_heads, -1))
        k = k.unflatten(-1, (self.num_heads, -1))
        # routing on the full-width region means of detached q/k, as the official router
        idx = bra_route(q, k, self.n_win, self.topk, self.scale)
        out = routed_attention(
            q,
            k,
            v.unflatten(-1, (self.num_heads, -1)),
            idx,
            n_win=self.n_win,
            scale=self.scale,
            check_indices=False,
        ).flatten(-2)
        if self.lepe is not None:
            out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return crop_from_grid(self.proj(out), pad)


class GlobalAttention(nn.Module):
    """Global multi-head attention on an NHWC map, as the official last stage.

    ``lepe=True`` is the official ``AttentionLePE`` (``topk=-2``): a depth-wise conv of the
    attention's *input* is added before the output projection; ``lepe=False`` is the official
    ``Attention`` (``topk=-1``). The official layers use 8 heads, ``(dim // heads) ** -0.5`` and
    no qkv bias. Input and output: ``[B, H, W, dim]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        lepe: bool = True,
        side_dwconv: int = 5,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide dim ({dim})")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
            if lepe and side_dwconv > 0
            else None
        )
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = (
            self.qkv(x)
            .reshape(B, H * W, 3, self.num_heads, C // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        if self.lepe is not None:
            out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class Mlp(nn.Module):
    """Linear -> (depth-wise 3x3 conv) -> GELU -> Linear on an NHWC map."""

    def __init__(self, dim: int, hidden: int, dwconv: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden) if dwconv else None
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.dwconv is not None:
            x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(self.act(x))


# --------------------------------------------------------------------------------------------
# blocks and stages


class BiFormerBlock(nn.Module):
    """Conv position embedding, then attention and MLP residual branches; NHWC in and out.

    ``topk > 0`` selects bi-level routing attention, ``-1`` global attention and ``-2`` global
    attention with LePE (official semantics).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win: int,
        topk: int,
        mlp_ratio: float = 3.0,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
        before_attn_dwconv: int = 3,
        layer_scale_init_value: float | None = None,
        pre_norm: bool = True,
        mlp_dwconv: bool = False,
        out_proj: bool = True,
        dense_num_heads: int = 8,
        auto_pad: bool = False,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if before_attn_dwconv not in (0, 3):
            # the official block pads this conv by 1 whatever its kernel, so only 3 keeps
            # the map size
            raise ValueError(f"before_attn_dwconv: {before_attn_dwconv} must be 0 or 3")
        self.pos_embed = (
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if before_attn_dwconv else None
        )
        # pre-norm outputs feed a linear only, so they may come out in the autocast dtype;
        # post-norm outputs are the residual stream and stay nn.LayerNorm (float32)
        norm = AutocastLayerNorm if pre_norm else nn.LayerNorm
        self.norm1 = norm(dim, eps=1e-6)
        if topk > 0:
            self.attn: nn.Module = BiLevelRoutingAttention(
                dim,
                num_heads,
                n_win,
                topk,
                qk_dim=qk_dim,
                qk_scale=qk_scale,
                side_dwconv=side_dwconv,
                out_proj=out_proj,
                auto_pad=auto_pad,
            )
        elif topk in (-1, -2):
            self.attn = GlobalAttention(
                dim, dense_num_heads, lepe=topk == -2, side_dwconv=side_dwconv
            )
        else:
            raise ValueError(
                f"topk: {topk} is not supported (> 0 routed, -1 global, -2 global with LePE)"
            )
        self.norm2 = norm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), dwconv=mlp_dwconv)
        use_ls = layer_scale_init_value is not None and layer_scale_init_value > 0
        self.ls1 = LayerScale(dim, layer_scale_init_value) if use_ls else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale_init_value) if use_ls else nn.Identity()
        self.pre_norm = pre_norm
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            # x + dwconv(x) as one conv: the identity joins the kernel's centre tap, which
            # saves a full pass over the map (same function, same weights and gradients)
            pe = self.pos_embed
            w = pe.weight + F.pad(pe.weight.new_ones(1, 1, 1, 1), (1, 1, 1, 1))
            x = F.conv2d(x.permute(0, 3, 1, 2), w, pe.bias, padding=1, groups=pe.groups)
            x = x.permute(0, 2, 3, 1)
        if self.pre_norm:
            x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
            x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        else:
            x = self.norm1(x + self.drop_path(self.ls1(self.attn(x))))
            x = self.norm2(x + self.drop_path(self.ls2(self.mlp(x))))
        return x


class Stem(nn.Module):
    """Two stride-2 3x3 convs with BatchNorm and GELU between: /4, NCHW."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(dim // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class Downsample(nn.Module):
    """Stride-2 3x3 conv + BatchNorm, NCHW."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class BiFormerStage(nn.Module):
    """Optional down-sampling then blocks; NCHW in and out (blocks run NHWC)."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# model


class BiFormer(nn.Module):
    """BiFormer backbone and classifier.

    Args:
        in_chans: input channels.
        num_classes: classes of the head (0: no classifier).
        global_pool: head pooling type (official: ``"avg"``).
        depths: blocks per stage.
        embed_dims: channels per stage.
        mlp_ratios: MLP expansion per stage.
        head_dim: per-head width of routed attention (heads = ``qk_dims[i] // head_dim``).
        qk_dims: query/key width per stage (defaults to ``embed_dims``).
        qk_scale: logit scale of routed attention (official default ``qk_dim ** -0.5``).
        n_win: regions per side for routed attention (official: 7 for classification at 224,
            16 for detection, 8 for segmentation).
        topks: per stage, regions attended (> 0), or -1 / -2 for global attention without /
            with LePE.
        side_dwconv: LePE conv kernel.
        before_attn_dwconv: position-embedding conv kernel (0 or 3).
        layer_scale_init_value: layer-scale init (None or <= 0: no layer scale).
        pre_norm: pre-norm (official default) or post-norm residual branches.
        mlp_dwconv: depth-wise 3x3 conv inside the MLP.
        attn_out_proj: output projection in routed attention (official ``param_attention``
            ``"qkvo"``; ``False`` is ``"qkv"``).
        dense_num_heads: heads of the global stages (the official layers fix 8).
        auto_pad: pad feature maps to a multiple of ``n_win`` in routed attention (the official
            detection/segmentation setting); without it such inputs are refused.
        dense_norms: the official detection/segmentation backbone layout: a LayerNorm2d on
            every stage output (applied to the features of ``forward_intermediates``) and no
            final BatchNorm.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear over blocks.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (2, 2, 8, 2),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        mlp_ratios: Sequence[float] = (3, 3, 3, 3),
        head_dim: int = 32,
        qk_dims: Sequence[int] | None = None,
        qk_scale: float | None = None,
        n_win: int = 7,
        topks: Sequence[int] = (1, 4, 16, -2),
        side_dwconv: int = 5,
        before_attn_dwconv: int = 3,
        layer_scale_init_value: float | None = None,
        pre_norm: bool = True,
        mlp_dwconv: bool = False,
        attn_out_proj: bool = True,
        dense_num_heads: int = 8,
        auto_pad: bool = True,
        dense_norms: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        for name, seq in (("embed_dims", embed_dims), ("mlp_ratios", mlp_ratios), ("topks", topks)):
            if len(seq) != 4:
                raise ValueError(f"{name}: needs 4 entries (one per stage), got {len(seq)}")
        if len(depths) != 4:
            raise ValueError(f"depths: needs 4 entries (one per stage), got {len(depths)}")
        if n_win < 1:
            raise ValueError(f"n_win: {n_win} must be >= 1")
        qk_dims = tuple(qk_dims) if qk_dims is not None else tuple(embed_dims)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.n_win = n_win
        self.auto_pad = auto_pad
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, embed_dims[0])
        n_blocks = sum(depths)
        # a plain-Python linspace keeps construction possible on the meta device
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        stages = []
        self.feature_info = []
        cur = 0
        for i in range(4):
            if qk_dims[i] % head_dim:
                raise ValueError(f"head_dim: {head_dim} must divide qk_dims[{i}] ({qk_dims[i]})")
            blocks = [
                BiFormerBlock(
                    embed_dims[i],
                    qk_dims[i] // head_dim,
                    n_win,
                    topks[i],
                    mlp_ratio=mlp_ratios[i],
                    qk_dim=qk_dims[i],
                    qk_scale=qk_scale,
                    side_dwconv=side_dwconv,
                    before_attn_dwconv=before_attn_dwconv,
                    layer_scale_init_value=layer_scale_init_value,
                    pre_norm=pre_norm,
                    mlp_dwconv=mlp_dwconv,
                    out_proj=attn_out_proj,
                    dense_num_heads=dense_num_heads,
                    auto_pad=auto_pad,
                    drop_path=dpr[cur + j],
                )
                for j in range(depths[i])
            ]
            down = nn.Identity() if i == 0 else Downsample(embed_dims[i - 1], embed_dims[i])
            stages.append(BiFormerStage(down, blocks))
            self.feature_info.append(
                dict(num_chs=embed_dims[i], reduction=2 ** (i + 2), module=f"stages.{i}")
            )
            cur += depths[i]
        self.stages = nn.Sequential(*stages)
        if dense_norms:
            self.dense_norms: nn.ModuleList | None = nn.ModuleList(
                LayerNorm2d(d) for d in embed_dims
            )
            self.norm: nn.Module = nn.Identity()
        else:
            self.dense_norms = None
            self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # official init: truncated normal Linear weights, zero Linear bias; convs keep
        # PyTorch's default init
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
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
        """Stage outputs (NCHW) and optionally the final features.

        Args:
            x: input images ``[B, C, H, W]``.
            indices: stages to return (int: the last n; list: these; None: all).
            norm: apply the final norm to the last stage's feature when it is taken.
            stop_early: stop after the last stage requested.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of features.

        With ``dense_norms`` every returned feature goes through its stage's LayerNorm2d, as
        the official detection/segmentation backbone returns them.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt: {output_fmt!r} is not supported (only 'NCHW')")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        last_idx = len(self.stages) - 1
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        x = self.stem(x)
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                if self.dense_norms is not None:
                    intermediates.append(self.dense_norms[feat_idx](x))
                elif norm and feat_idx == last_idx:
                    intermediates.append(self.norm(x))
                else:
                    intermediates.append(x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and optionally norm/head) not needed for ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if self.dense_norms is not None:
            self.dense_norms = self.dense_norms[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# official checkpoints


# Constructor defaults of the official ``models.biformer.BiFormer`` (commit 1697bbb).
OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    depth=[3, 4, 8, 3],
    in_chans=3,
    num_classes=1000,
    embed_dim=[64, 128, 320, 512],
    head_dim=64,
    qk_scale=None,
    representation_size=None,
    drop_path_rate=0.0,
    drop_rate=0.0,
    use_checkpoint_stages=[],
    n_win=7,
    kv_downsample_mode="ada_avgpool",
    kv_per_wins=[2, 2, -1, -1],
    topks=[8, 8, -1, -1],
    side_dwconv=5,
    layer_scale_init_value=-1,
    qk_dims=[None, None, None, None],
    param_routing=False,
    diff_routing=False,
    soft_routing=False,
    pre_norm=True,
    pe=None,
    pe_stages=[0],
    before_attn_dwconv=3,
    auto_pad=False,
    kv_downsample_kernels=[4, 2, 1, 1],
    kv_downsample_ratios=[4, 2, 1, 1],
    mlp_ratios=[4, 4, 4, 4],
    param_attention="qkvo",
    mlp_dwconv=False,
)

_OFFICIAL_COMMON: dict[str, Any] = dict(
    mlp_ratios=[3, 3, 3, 3],
    n_win=7,
    kv_downsample_mode="identity",
    kv_per_wins=[-1, -1, -1, -1],
    topks=[1, 4, 16, -2],
    side_dwconv=5,
    before_attn_dwconv=3,
    layer_scale_init_value=-1,
    head_dim=32,
    param_routing=False,
    diff_routing=False,
    soft_routing=False,
    pre_norm=True,
    pe=None,
)

# The official factories' kwargs (models/biformer.py ``biformer_tiny/small/base``).
OFFICIAL_VARIANTS: dict[str, dict[str, Any]] = {
    "biformer_tiny": dict(
        depth=[2, 2, 8, 2],
        embed_dim=[64, 128, 256, 512],
        qk_dims=[64, 128, 256, 512],
        **_OFFICIAL_COMMON,
    ),
    "biformer_small": dict(
        depth=[4, 4, 18, 4],
        embed_dim=[64, 128, 256, 512],
        qk_dims=[64, 128, 256, 512],
        **_OFFICIAL_COMMON,
    ),
    "biformer_base": dict(
        depth=[4, 4, 18, 4],
        embed_dim=[96, 192, 384, 768],
        qk_dims=[96, 192, 384, 768],
        use_checkpoint_stages=[],
        **_OFFICIAL_COMMON,
    ),
}

# Official kwargs that change only training, memory or loading, never the computed function.
_OFFICIAL_IGNORED = {
    "use_checkpoint_stages",
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "norm_eval",
    "disable_bn_grad",
    "init_cfg",
}


def official_to_ours_kwargs(official_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Translate official ``BiFormer`` constructor kwargs to ours.

    Unknown names and settings no released model uses (kv down-sampling, learned or soft
    routing, extra position encodings, a representation layer) raise ``ValueError``.
    """
    unknown = set(official_kwargs) - set(OFFICIAL_DEFAULTS) - _OFFICIAL_IGNORED
    if unknown:
        raise ValueError(f"official_kwargs: unknown official BiFormer arguments {sorted(unknown)}")
    o = {**OFFICIAL_DEFAULTS, **official_kwargs}
    if o["kv_downsample_mode"] != "identity":
        raise ValueError(
            f"official_kwargs: kv_downsample_mode={o['kv_downsample_mode']!r} is not supported "
            "(only 'identity', which every released BiFormer uses)"
        )
    for name in ("param_routing", "diff_routing", "soft_routing"):
        if o[name]:
            raise ValueError(f"official_kwargs: {name}=True is not supported (only False)")
    if o["pe"] is not None:
        raise ValueError(f"official_kwargs: pe={o['pe']!r} is not supported (only None)")
    if o["representation_size"]:
        raise ValueError("official_kwargs: representation_size is not supported (only None)")
    if o["param_attention"] not in ("qkvo", "qkv"):
        raise ValueError(
            f"official_kwargs: param_attention={o['param_attention']!r} must be 'qkvo' or 'qkv'"
        )
    qk_dims = list(o["qk_dims"])
    if any(d is None for d in qk_dims):
        raise ValueError(
            "official_kwargs: qk_dims must be given (the official model cannot be built "
            "without them)"
        )
    ls = o["layer_scale_init_value"]
    return dict(
        in_chans=o["in_chans"],
        num_classes=o["num_classes"],
        depths=tuple(o["depth"]),
        embed_dims=tuple(o["embed_dim"]),
        mlp_ratios=tuple(o["mlp_ratios"]),
        head_dim=o["head_dim"],
        qk_dims=tuple(qk_dims),
        qk_scale=o["qk_scale"],
        n_win=o["n_win"],
        topks=tuple(o["topks"]),
        side_dwconv=o["side_dwconv"],
        before_attn_dwconv=o["before_attn_dwconv"],
        layer_scale_init_value=ls if ls is not None and ls > 0 else None,
        pre_norm=o["pre_norm"],
        mlp_dwconv=o["mlp_dwconv"],
        attn_out_proj=o["param_attention"] == "qkvo",
        auto_pad=o["auto_pad"],
        drop_rate=o["drop_rate"],
        drop_path_rate=o["drop_path_rate"],
    )


def _rename_official_key(k: str) -> str | None:
    """Official key -> ours (None: a key that carries no weight of ours)."""
    parts = k.split(".")
    if parts[0] == "downsample_layers":
        i, j, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
        if i == 0:
            name = {0: "conv1", 1: "norm1", 3: "conv2", 4: "norm2"}[j]
            return f"stem.{name}.{rest}"
        return f"stages.{i}.downsample.{({0: 'conv', 1: 'norm'})[j]}.{rest}"
    if parts[0] == "stages":
        i, j, sub = parts[1], parts[2], ".".join(parts[3:])
        pre = f"stages.{i}.blocks.{j}."
        for old, new in (
            ("attn.qkv.qkv.", "attn.qkv."),  # routed attention wraps its Linear
            ("attn.wo.", "attn.proj."),
            ("mlp.0.", "mlp.fc1."),
            ("mlp.1.dwconv.", "mlp.dwconv."),
            ("mlp.3.", "mlp.fc2."),
        ):
            if sub.startswith(old):
                return pre + new + sub[len(old) :]
        if sub == "gamma1":
            return pre + "ls1.gamma"
        if sub == "gamma2":
            return pre + "ls2.gamma"
        return pre + sub
    if parts[0] == "extra_norms":
        return "dense_norms." + ".".join(parts[1:])
    if parts[0] == "head":
        return "head.fc." + ".".join(parts[1:])
    return k  # norm.*


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key of an official (classification or mm-backbone) state dict to ours."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        nk = _rename_official_key(k)
        if nk is not None:
            out[nk] = v
    return out


def _strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    sd: Mapping[str, Any] = state_dict
    for key in ("model", "model_ema", "state_dict"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("backbone.") for k in sd):
        # an mmdet/mmseg checkpoint: keep the backbone, drop neck and heads
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: BiFormer) -> dict[str, torch.Tensor]:
    """Official BiFormer checkpoints (classification ``{"model": ...}``, mmdet/mmseg
    ``{"state_dict": {"backbone.*": ...}}``, ``module.`` prefixes) and our own timm-style
    checkpoints -> our keys for ``model``."""
    sd = _strip_wrappers(state_dict)
    if not any(k.startswith("downsample_layers.") for k in sd):
        return sd  # already ours
    out = convert_official_state_dict(sd)
    if model.dense_norms is None:
        out = {k: v for k, v in out.items() if not k.startswith("dense_norms.")}
    if isinstance(model.head.fc, nn.Identity):
        out = {k: v for k, v in out.items() if not k.startswith("head.fc.")}
    return out


def official_model_args(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "biformer",
) -> tuple[str, dict[str, Any]]:
    """Registered model name and kwargs that build our counterpart of an official model.

    ``timm.create_model(name, **kwargs)`` builds it (``kwargs`` is what a Hub ``config.json``
    stores as ``model_args``). ``official_kwargs`` are the official ``BiFormer`` constructor's
    arguments (official names); when None, ``variant`` (``"biformer_tiny"``, ``"_small"``,
    ``"_base"``) supplies them. ``num_classes`` follows the checkpoint's head (0 without one);
    an mm-backbone checkpoint (``extra_norms`` present) gives ``dense_norms=True``.
    """
    if family != "biformer":
        raise ValueError(f"family: {family!r} is not handled here (only 'biformer')")
    if variant is not None and variant not in OFFICIAL_VARIANTS:
        raise ValueError(
            f"variant: {variant!r} is not one of {sorted(OFFICIAL_VARIANTS)}; "
            "give official_kwargs instead"
        )
    if official_kwargs is None:
        if variant is None:
            raise ValueError("official_kwargs: give the official constructor kwargs or variant")
        official_kwargs = OFFICIAL_VARIANTS[variant]
    kwargs = official_to_ours_kwargs(official_kwargs)
    sd = _strip_wrappers(state_dict)
    if any(k.startswith("extra_norms.") for k in sd):
        kwargs["dense_norms"] = True
    head = sd.get("head.weight")
    kwargs["num_classes"] = 0 if head is None else int(head.shape[0])
    if variant is None:
        # name the official variant with the same layers, else the smallest (the kwargs
        # fully determine the model either way)
        layout = ("depths", "embed_dims", "qk_dims")
        variant = next(
            (
                n
                for n, kw in OFFICIAL_VARIANTS.items()
                if all(official_to_ours_kwargs(kw)[f] == kwargs[f] for f in layout)
            ),
            "biformer_tiny",
        )
    return variant, {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def from_official(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "biformer",
) -> BiFormer:
    """Build our BiFormer from an official checkpoint and load it (strict).

    Args:
        state_dict: official state dict or checkpoint (classification or mmdet/mmseg
            backbone; wrapper keys and ``module.``/``backbone.`` prefixes are removed).
        official_kwargs: the official ``BiFormer`` constructor kwargs (official names); when
            None, those of ``variant``.
        variant: ``"biformer_tiny"``, ``"biformer_small"`` or ``"biformer_base"``.
        family: must be ``"biformer"``.

    Returns the model in eval mode, built with ``timm.create_model`` (so it carries a
    ``pretrained_cfg``); ``model.model_args`` holds the kwargs that rebuild it. See
    :func:`official_model_args` for how the configuration follows the checkpoint.
    """
    name, kwargs = official_model_args(state_dict, official_kwargs, variant=variant, family=family)
    sd = _strip_wrappers(state_dict)
    return build_converted(name, kwargs, lambda m: convert_official_state_dict(sd))


# --------------------------------------------------------------------------------------------
# registry


def _create_biformer(variant: str, pretrained: bool = False, **kwargs: Any) -> BiFormer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        BiFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    # official evaluation: resize 256 bicubic, center crop 224, ImageNet mean/std
    # (datasets.py build_transform)
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "biformer_tiny.in1k": _cfg(hf_hub_id="visionattn/biformer_tiny.in1k"),
        "biformer_small.in1k": _cfg(hf_hub_id="visionattn/biformer_small.in1k"),
        "biformer_base.in1k": _cfg(hf_hub_id="visionattn/biformer_base.in1k"),
        "test_biformer.untrained": _cfg(
            hf_hub_id="visionattn/test_biformer.untrained",
            input_size=(3, 64, 64),
            pool_size=(2, 2),
        ),
    }
)


def _official_variant_kwargs(variant: str) -> dict[str, Any]:
    kw = official_to_ours_kwargs(OFFICIAL_VARIANTS[variant])
    # registered models pad by default, so any input size runs (identical output whenever
    # the official classifier could run without padding)
    kw["auto_pad"] = True
    return kw


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-T (13.1M params), n_win 7, top-k (1, 4, 16, global)."""
    return _create_biformer(
        "biformer_tiny", pretrained, **{**_official_variant_kwargs("biformer_tiny"), **kwargs}
    )


@register_model
def biformer_small(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-S (25.5M params), n_win 7, top-k (1, 4, 16, global)."""
    return _create_biformer(
        "biformer_small", pretrained, **{**_official_variant_kwargs("biformer_small"), **kwargs}
    )


@register_model
def biformer_base(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-B (56.8M params), n_win 7, top-k (1, 4, 16, global)."""
    return _create_biformer(
        "biformer_base", pretrained, **{**_official_variant_kwargs("biformer_base"), **kwargs}
    )


@register_model
def test_biformer(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """Tiny BiFormer for tests: every block type at a few thousand parameters."""
    model_args = dict(
        depths=(1, 1, 1, 1),
        embed_dims=(16, 24, 32, 48),
        qk_dims=(16, 24, 32, 48),
        head_dim=8,
        mlp_ratios=(2, 2, 2, 2),
        n_win=2,
        topks=(1, 2, 3, -2),
        dense_num_heads=4,
        auto_pad=True,
    )
    return _create_biformer("test_biformer", pretrained, **{**model_args, **kwargs})

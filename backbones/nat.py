"""Neighborhood Attention Transformer (NAT) and Dilated Neighborhood Attention Transformer (DiNAT).

Papers:
    `Neighborhood Attention Transformer` - https://arxiv.org/abs/2204.07143 (CVPR 2023)
    `Dilated Neighborhood Attention Transformer` - https://arxiv.org/abs/2209.15001

Official code and checkpoints: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer
(MIT). This is an independent implementation on ``visionattn.kernels.na2d`` whose weights are
interchangeable with the official ones (``checkpoint_filter_fn``, ``from_official``).

Three official architectures live here:

* NAT / DiNAT (``nat_*``, ``dinat_*``): a tokenizer of two overlapping 3x3 stride-2 convs,
  four stages of neighborhood-attention blocks with relative position bias, 3x3 stride-2 conv
  downsampling between stages, optional layer scale. DiNAT is NAT with a per-block dilation
  schedule (1 alternating with ``stage size // kernel size`` at the training resolution).
* DiNAT-s (``dinat_s_*``): the Swin-like variant, 4x4 patch embedding and Swin patch merging.
* isotropic NAT / DiNAT (``*_isotropic_*``): 16x16 patches, one stage whose blocks alternate
  dilation 1 and ``dilation``.

Input sizes. Every stage accepts any map size:

* Neighborhood attention needs ``kernel_size * dilation <= size`` along each axis.
  With ``dilation_policy="adapt"`` (default) a block whose dilation does not fit a map axis
  uses, along that axis, the largest dilation that fits, ``max(1, size // kernel_size)``
  (never more than configured). This is the rule DiNAT's own schedules follow (dilation =
  stage size // kernel at the training resolution) and that the official detection and
  segmentation configs apply when they raise dilations for larger inputs; at the official
  training resolutions no dilation changes. A map smaller than the kernel itself is
  zero-padded at the bottom/right up to ``kernel_size`` and the output cropped, which is what
  the official models do on such inputs (NATTEN <= 0.15 ``NeighborhoodAttention2D`` pads the
  normalized tokens with zeros before the qkv projection, so padded keys carry the qkv bias
  and stay in the softmax).
* ``dilation_policy="pad"`` keeps every dilation and pads any axis shorter than
  ``kernel_size * dilation`` that way, reproducing the official models' outputs exactly at
  every input size.
* Strided stems and downsamplers take any size (``ceil(size / 2)`` per conv); the patch
  embeddings of DiNAT-s / isotropic pad the image to a multiple of the patch size and Swin
  patch merging pads odd maps, as the official code does.

The larger dilations of the official detection / segmentation configs are constructor
arguments: ``timm.create_model("dinat_mini", dilations=[[1, 28, 1], ...])``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, LayerScale, Mlp, trunc_normal_
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs, register_model
from torch import nn

import visionattn.kernels as _kernels
from visionattn.backbones._convert import build_converted
from visionattn.backbones._layers import AutocastLayerNorm

# official family names visionattn.convert.from_official routes here
OFFICIAL_FAMILIES = ("nat", "dinat")

__all__ = [
    "FAMILIES",
    "NAT",
    "NATIsotropic",
    "OFFICIAL_VARIANTS",
    "checkpoint_filter_fn",
    "from_official",
    "official_model_args",
]

FAMILIES = ("nat", "dinat")

_DILATION_POLICIES = ("adapt", "pad")


def _fit_axis(size: int, kernel_size: int, dilation: int, policy: str) -> tuple[int, int]:
    """Dilation to use and bottom/right padding needed along one axis of ``size`` tokens."""
    if policy == "adapt":
        dilation = max(1, min(dilation, size // kernel_size))
    return dilation, max(0, kernel_size * dilation - size)


# ----------------------------------------------------------------------------------------------
# layers


class NeighborhoodAttention2d(nn.Module):
    """2-D neighborhood attention with relative position bias on ``[B, H, W, C]`` tokens.

    A fused qkv projection feeds ``visionattn.kernels.na2d`` (heads-last views, no copies);
    each query attends to its ``kernel_size x kernel_size`` (dilated) neighborhood, clamped
    inside the map. See the module docstring for how ``dilation_policy`` handles maps too small
    for ``kernel_size * dilation``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        rel_pos_bias: bool = True,
        dilation_policy: str = "adapt",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads: {num_heads} must divide dim {dim}")
        if kernel_size < 2 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: must be an odd integer > 1, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"dilation: must be >= 1, got {dilation}")
        if dilation_policy not in _DILATION_POLICIES:
            raise ValueError(
                f"dilation_policy: must be one of {_DILATION_POLICIES}, got {dilation_policy!r}"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.dilation_policy = dilation_policy
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(
                torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1)
            )
            trunc_normal_(self.rpb, std=0.02)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        k = self.kernel_size
        dil_h, pad_h = _fit_axis(H, k, self.dilation, self.dilation_policy)
        dil_w, pad_w = _fit_axis(W, k, self.dilation, self.dilation_policy)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        q, key, v = self.qkv(x).view(B, Hp, Wp, 3, self.num_heads, self.head_dim).unbind(3)
        x = _kernels.na2d(
            q,
            key,
            v,
            kernel_size=k,
            dilation=dil_h if dil_h == dil_w else (dil_h, dil_w),
            rpb=self.rpb,
            scale=self.scale,
        )
        x = x.reshape(B, Hp, Wp, C)
        if pad_h or pad_w:
            x = x[:, :H, :W]
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, dilation_policy={self.dilation_policy!r}, "
            f"rel_pos_bias={self.rpb is not None}"
        )


class NATBlock(nn.Module):
    """Pre-norm transformer block: neighborhood attention and MLP, optional layer scale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        rel_pos_bias: bool = True,
        dilation_policy: str = "adapt",
    ) -> None:
        super().__init__()
        # block norms feed a linear only: fused, autocast-dtype output on CUDA
        self.norm1 = AutocastLayerNorm(dim)
        self.attn = NeighborhoodAttention2d(
            dim,
            num_heads,
            kernel_size=kernel_size,
            dilation=dilation,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            proj_drop=proj_drop,
            rel_pos_bias=rel_pos_bias,
            dilation_policy=dilation_policy,
        )
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = AutocastLayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class ConvStem(nn.Module):
    """Overlapping tokenizer of NAT / DiNAT: two 3x3 stride-2 convs (no activation), LayerNorm.

    ``[B, C_in, H, W] -> [B, ceil(H/4), ceil(W/4), dim]``.
    """

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.in_chans)
        return self.norm(self.conv2(self.conv1(x)).permute(0, 2, 3, 1))


class PatchStem(nn.Module):
    """Non-overlapping patch embedding of DiNAT-s / isotropic models.

    The image is zero-padded at the bottom/right to a multiple of ``patch_size`` (as the
    official code does). ``[B, C_in, H, W] -> [B, ceil(H/p), ceil(W/p), dim]``.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int, norm: bool = True) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.in_chans)
        p = self.patch_size
        pad_h, pad_w = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsample(nn.Module):
    """NAT downsampler: 3x3 stride-2 conv (no bias) then LayerNorm, channels-last in and out."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin patch merging (DiNAT-s): 2x2 neighbors concatenated, LayerNorm, linear 4C -> 2C.

    Odd maps are zero-padded at the bottom/right first. Channel order of the concatenation is
    (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1), as in the official code.
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # [B, H/2, row, W/2, col, C] -> [B, H/2, W/2, col, row, C]: col-major over the 2x2
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


def _check_image(x: torch.Tensor, in_chans: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"x: expected an image batch [B, {in_chans}, H, W], got shape {tuple(x.shape)}"
        )


# ----------------------------------------------------------------------------------------------
# stages and models


class NATStage(nn.Module):
    """Optional downsampling (from the previous stage) followed by ``depth`` NAT blocks."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        downsample: str | None,
        kernel_size: int,
        dilations: Sequence[int],
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        proj_drop: float,
        drop_path: Sequence[float],
        layer_scale: float | None,
        rel_pos_bias: bool,
        dilation_policy: str,
    ) -> None:
        super().__init__()
        if downsample == "conv":
            self.downsample: nn.Module = ConvDownsample(dim, out_dim)
        elif downsample == "merge":
            self.downsample = PatchMerging(dim, out_dim)
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[
                NATBlock(
                    out_dim,
                    num_heads,
                    kernel_size=kernel_size,
                    dilation=dilations[i],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    proj_drop=proj_drop,
                    drop_path=drop_path[i],
                    layer_scale=layer_scale,
                    rel_pos_bias=rel_pos_bias,
                    dilation_policy=dilation_policy,
                )
                for i in range(depth)
            ]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _init_weights(module: nn.Module) -> None:
    # Official init: truncated-normal linears with zero bias; convs keep PyTorch's default.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _drop_path_rates(rate: float, n: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to ``rate`` over ``n`` blocks."""
    return [rate * i / max(n - 1, 1) for i in range(n)]


def _check_drop(attn_drop_rate: float) -> None:
    if attn_drop_rate:
        raise ValueError(
            f"attn_drop_rate: the fused neighborhood-attention kernel has no attention-weight "
            f"dropout; use 0 (every official model does), got {attn_drop_rate}"
        )


class NAT(nn.Module):
    """Hierarchical NAT / DiNAT / DiNAT-s.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: ``"avg"`` or ``""`` (no pooling).
        embed_dim: channels of the first stage; doubled at every later stage.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        mlp_ratio: MLP hidden width / channels.
        kernel_size: neighborhood size (odd).
        dilations: per stage, one dilation per block (None: all 1, i.e. NAT).
        layer_scale: layer-scale init value, None for none.
        qkv_bias: bias in the qkv projection.
        qk_scale: attention scale (default ``head_dim ** -0.5``).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the stem, attention projection and MLP (official
            ``drop_rate``).
        attn_drop_rate: must be 0 (the fused kernel has no attention dropout).
        drop_path_rate: stochastic depth, linear over all blocks.
        stem_type: ``"conv"`` (NAT tokenizer) or ``"patch"`` (DiNAT-s patch embedding).
        downsample_type: ``"conv"`` (NAT) or ``"merge"`` (DiNAT-s patch merging).
        patch_size: patch size of the ``"patch"`` stem.
        patch_norm: LayerNorm after the ``"patch"`` stem.
        rel_pos_bias: learn a relative position bias per block.
        dilation_policy: ``"adapt"`` or ``"pad"`` (module docstring).
        dense_norms: the official detection/segmentation backbone layout: a LayerNorm on
            every stage's output (official ``norm0``..``norm3``), applied to the features
            ``forward_intermediates`` / ``features_only`` return, and no final norm. Official
            mmdet/mmseg NAT/DiNAT checkpoints load into this layout.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: Sequence[int] = (3, 4, 6, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratio: float = 3.0,
        kernel_size: int = 7,
        dilations: Sequence[Sequence[int]] | None = None,
        layer_scale: float | None = None,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        stem_type: str = "conv",
        downsample_type: str = "conv",
        patch_size: int = 4,
        patch_norm: bool = True,
        rel_pos_bias: bool = True,
        dilation_policy: str = "adapt",
        dense_norms: bool = False,
    ) -> None:
        super().__init__()
        _check_drop(attn_drop_rate)
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(
                f"num_heads: needs one entry per stage ({num_stages}), got {list(num_heads)}"
            )
        if dilations is None:
            dilations = [[1] * d for d in depths]
        if len(dilations) != num_stages or any(len(dl) != d for dl, d in zip(dilations, depths)):
            raise ValueError(
                f"dilations: needs one list per stage with one dilation per block "
                f"(depths {list(depths)}), got {dilations}"
            )
        if stem_type not in ("conv", "patch"):
            raise ValueError(f"stem_type: must be 'conv' or 'patch', got {stem_type!r}")
        if downsample_type not in ("conv", "merge"):
            raise ValueError(f"downsample_type: must be 'conv' or 'merge', got {downsample_type!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        dims = [int(embed_dim * 2**i) for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.embed_dim = embed_dim

        if stem_type == "conv":
            self.stem: nn.Module = ConvStem(in_chans, embed_dim)
        else:
            self.stem = PatchStem(in_chans, embed_dim, patch_size, norm=patch_norm)
        self.stem_drop = nn.Dropout(proj_drop_rate)
        stem_reduction = 4 if stem_type == "conv" else patch_size

        rates = _drop_path_rates(drop_path_rate, sum(depths))
        dpr = [rates[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(num_stages)]
        self.stages = nn.Sequential()
        self.feature_info: list[dict[str, Any]] = []
        for i in range(num_stages):
            self.stages.append(
                NATStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    downsample=None if i == 0 else downsample_type,
                    kernel_size=kernel_size,
                    dilations=list(dilations[i]),
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    proj_drop=proj_drop_rate,
                    drop_path=dpr[i],
                    layer_scale=layer_scale,
                    rel_pos_bias=rel_pos_bias,
                    dilation_policy=dilation_policy,
                )
            )
            self.feature_info.append(
                dict(num_chs=dims[i], reduction=stem_reduction * 2**i, module=f"stages.{i}")
            )
        if dense_norms:
            self.dense_norms: nn.ModuleList | None = nn.ModuleList(nn.LayerNorm(d) for d in dims)
            self.norm: nn.Module = nn.Identity()
        else:
            self.dense_norms = None
            self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
            input_fmt="NHWC",
        )  # fmt: skip
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # The official recipes exempt the relative position biases from weight decay.
        return {n for n, _ in self.named_parameters() if n.endswith(".rpb")}

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

        ``indices``: last n stages if int, all if None, else the given stage indices.
        ``norm`` applies the final norm to the last stage's output. ``output_fmt``: ``"NCHW"``
        or ``"NHWC"`` for the intermediates. With ``dense_norms`` every intermediate goes
        through its stage's norm, as the official detection/segmentation backbone returns it.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt: must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        intermediates = []
        x = self.stem_drop(self.stem(x))
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                if self.dense_norms is not None:
                    y = self.dense_norms[i](x)
                else:
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
        if self.dense_norms is not None:
            self.dense_norms = self.dense_norms[: max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W] -> [B, H/32, W/32, num_features]`` (normalized, channels-last)."""
        x = self.stem_drop(self.stem(x))
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class NATIsotropic(nn.Module):
    """Isotropic NAT / DiNAT: 16x16 patch embedding and one stage of NAT blocks whose
    dilation alternates between 1 (even blocks) and ``dilation`` (odd blocks).

    Args as :class:`NAT`, with ``depth`` (blocks), ``num_heads`` (int) and ``dilation``.
    Unlike the official model (fixed ``img_size``), any input size works.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        kernel_size: int = 7,
        dilation: int = 1,
        patch_size: int = 16,
        patch_norm: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        rel_pos_bias: bool = True,
        dilation_policy: str = "adapt",
    ) -> None:
        super().__init__()
        _check_drop(attn_drop_rate)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.stem = PatchStem(in_chans, embed_dim, patch_size, norm=patch_norm)
        self.stem_drop = nn.Dropout(proj_drop_rate)
        dpr = _drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(
            *[
                NATBlock(
                    embed_dim,
                    num_heads,
                    kernel_size=kernel_size,
                    dilation=1 if i % 2 == 0 else dilation,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    proj_drop=proj_drop_rate,
                    drop_path=dpr[i],
                    rel_pos_bias=rel_pos_bias,
                    dilation_policy=dilation_policy,
                )
                for i in range(depth)
            ]
        )
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}")
            for i in range(depth)
        ]
        self.grad_checkpointing = False
        self.norm = nn.LayerNorm(embed_dim)
        self.head = ClassifierHead(
            embed_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC"
        )
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(".rpb")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^stem", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

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
        """Block outputs (``indices`` as in :meth:`NAT.forward_intermediates`); ``norm``
        applies the final norm to every intermediate (all share its width)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt: must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks if not stop_early else self.blocks[: max_index + 1]
        intermediates = []
        x = self.stem_drop(self.stem(x))
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(
                    y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y
                )
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks (and norm/head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W] -> [B, H/16, W/16, embed_dim]`` (normalized, channels-last)."""
        x = self.stem_drop(self.stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# official variants and checkpoint conversion

_MINI = dict(depths=[3, 4, 6, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3)
_TINY = dict(depths=[3, 4, 18, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3)
_SMALL = dict(depths=[3, 4, 18, 5], num_heads=[3, 6, 12, 24], embed_dim=96, mlp_ratio=2)
_BASE = dict(depths=[3, 4, 18, 5], num_heads=[4, 8, 16, 32], embed_dim=128, mlp_ratio=2)
_LARGE = dict(depths=[3, 4, 18, 5], num_heads=[6, 12, 24, 48], embed_dim=192, mlp_ratio=2)


def _alternate(depth: int, d: int) -> list[int]:
    """DiNAT schedule within a stage: 1, d, 1, d, ..."""
    return [1 if i % 2 == 0 else d for i in range(depth)]


def _dinat_dilations(depths: Sequence[int], ds: Sequence[int]) -> list[list[int]]:
    return [_alternate(n, d) for n, d in zip(depths, ds)]


_D224 = (8, 4, 2, 1)  # stage size // 7 at 224 px (56, 28, 14, 7)
_D384 = (13, 6, 3, 1)  # stage size // 7 at 384 px (96, 48, 24, 12)

# Official factory name -> (architecture, the official constructor's kwargs), from
# classification/{nat,dinat,dinats,isotropic}.py at commit d334f5b of the official repo.
OFFICIAL_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "nat_mini": ("nat", dict(_MINI, drop_path_rate=0.2, kernel_size=7)),
    "nat_tiny": ("nat", dict(_TINY, drop_path_rate=0.2, kernel_size=7)),
    "nat_small": ("nat", dict(_SMALL, drop_path_rate=0.3, layer_scale=1e-5, kernel_size=7)),
    "nat_base": ("nat", dict(_BASE, drop_path_rate=0.5, layer_scale=1e-5, kernel_size=7)),
    "dinat_mini": ("nat", dict(_MINI, drop_path_rate=0.2, kernel_size=7)),
    "dinat_tiny": ("nat", dict(_TINY, drop_path_rate=0.2, kernel_size=7)),
    "dinat_small": ("nat", dict(_SMALL, drop_path_rate=0.3, kernel_size=7)),
    "dinat_base": ("nat", dict(_BASE, drop_path_rate=0.5, layer_scale=1e-5, kernel_size=7)),
    "dinat_large": ("nat", dict(_LARGE, drop_path_rate=0.35, kernel_size=7)),
    "dinat_large_384": ("nat", dict(_LARGE, drop_path_rate=0.35, kernel_size=7)),
    "dinat_large_384_11x11": ("nat", dict(_LARGE, drop_path_rate=0.35, kernel_size=11)),
    "dinat_large_21k": ("nat", dict(_LARGE, drop_path_rate=0.2, kernel_size=7)),
    "dinat_large_21k_11x11": ("nat", dict(_LARGE, drop_path_rate=0.2, kernel_size=11)),
    "dinat_s_tiny": (
        "dinats",
        dict(depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], embed_dim=96, mlp_ratio=4,
             drop_path_rate=0.2, kernel_size=7),
    ),
    "dinat_s_small": (
        "dinats",
        dict(depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], embed_dim=96, mlp_ratio=4,
             drop_path_rate=0.3, kernel_size=7),
    ),
    "dinat_s_base": (
        "dinats",
        dict(depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], embed_dim=128, mlp_ratio=4,
             drop_path_rate=0.5, kernel_size=7),
    ),
    "dinat_s_large": (
        "dinats",
        dict(depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], embed_dim=192, mlp_ratio=4,
             drop_path_rate=0.35, kernel_size=7),
    ),
    "dinat_s_large_384": (
        "dinats",
        dict(depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], embed_dim=192, mlp_ratio=4,
             drop_path_rate=0.35, kernel_size=7),
    ),
    "dinat_s_large_21k": (
        "dinats",
        dict(depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], embed_dim=192, mlp_ratio=4,
             drop_path_rate=0.2, kernel_size=7),
    ),
}  # fmt: skip
for _name, (_arch, _kw) in list(OFFICIAL_VARIANTS.items()):
    if _name.startswith("dinat"):
        _kw["dilations"] = _dinat_dilations(
            _kw["depths"], _D384 if "_384" in _name and "11x11" not in _name else _D224
        )
for _size, _dim, _heads, _dpr in (("small", 384, 12, 0.1), ("base", 768, 24, 0.4)):
    for _prefix, _dil in (("nat", 1), ("dinat", 2)):
        OFFICIAL_VARIANTS[f"{_prefix}_isotropic_{_size}"] = (
            "isotropic",
            dict(img_size=224, patch_size=16, in_chans=3, embed_dim=_dim, depth=12,
                 num_heads=_heads, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, kernel_size=7,
                 dilation=_dil, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=_dpr,
                 patch_norm=True),
        )  # fmt: skip

# official kwarg name -> ours, per architecture (identical names are listed as themselves)
_KWARG_MAP: dict[str, dict[str, str]] = {
    "nat": {
        "embed_dim": "embed_dim", "mlp_ratio": "mlp_ratio", "depths": "depths",
        "num_heads": "num_heads", "drop_path_rate": "drop_path_rate", "in_chans": "in_chans",
        "kernel_size": "kernel_size", "dilations": "dilations", "num_classes": "num_classes",
        "qkv_bias": "qkv_bias", "qk_scale": "qk_scale", "drop_rate": "proj_drop_rate",
        "attn_drop_rate": "attn_drop_rate", "layer_scale": "layer_scale",
    },
    "dinats": {
        "patch_size": "patch_size", "in_chans": "in_chans", "num_classes": "num_classes",
        "embed_dim": "embed_dim", "depths": "depths", "num_heads": "num_heads",
        "kernel_size": "kernel_size", "dilations": "dilations", "mlp_ratio": "mlp_ratio",
        "qkv_bias": "qkv_bias", "qk_scale": "qk_scale", "drop_rate": "proj_drop_rate",
        "attn_drop_rate": "attn_drop_rate", "drop_path_rate": "drop_path_rate",
        "patch_norm": "patch_norm",
    },
    "isotropic": {
        "patch_size": "patch_size", "in_chans": "in_chans", "num_classes": "num_classes",
        "embed_dim": "embed_dim", "depth": "depth", "num_heads": "num_heads",
        "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias", "qk_scale": "qk_scale",
        "kernel_size": "kernel_size", "dilation": "dilation", "drop_rate": "proj_drop_rate",
        "attn_drop_rate": "attn_drop_rate", "drop_path_rate": "drop_path_rate",
        "patch_norm": "patch_norm",
    },
}  # fmt: skip
# our constructor defaults that differ per architecture and are not official kwargs
_ARCH_ARGS: dict[str, dict[str, Any]] = {
    "nat": dict(stem_type="conv", downsample_type="conv"),
    "dinats": dict(stem_type="patch", downsample_type="merge", patch_size=4),
    "isotropic": {},
}


def _ours_from_official_kwargs(arch: str, official_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Our constructor kwargs for an official architecture's constructor kwargs."""
    names = _KWARG_MAP[arch]
    out = dict(_ARCH_ARGS[arch])
    for key, value in official_kwargs.items():
        if key == "norm_layer":
            if "LayerNorm" not in str(value):
                raise ValueError(f"official_kwargs: norm_layer must be LayerNorm, got {value!r}")
        elif key == "layer" and arch == "isotropic":
            if "NATransformerLayer" not in str(value):
                raise ValueError(
                    f"official_kwargs: layer={value!r} is not supported (only the "
                    "neighborhood-attention NATransformerLayer; ViT-RPB is not converted)"
                )
        elif key == "img_size" and arch == "isotropic":
            continue  # the official model is fixed to img_size; ours takes any size
        elif key in ("pretrained", "type"):
            continue  # a weights path / the mmdet registry name: not architecture
        elif key == "frozen_stages" and arch != "isotropic":
            if value != -1:
                raise ValueError(
                    f"official_kwargs: frozen_stages={value!r} is a training setting of the "
                    "mmdet backbone; freeze parameters yourself (only -1 is accepted)"
                )
        elif key == "out_indices" and arch != "isotropic":
            if sorted(value) != list(range(len(official_kwargs.get("depths", value)))):
                raise ValueError(
                    f"official_kwargs: out_indices={value!r}: only every stage is supported "
                    "(take a subset with features_only=True, out_indices=...)"
                )
        elif key in names:
            out[names[key]] = list(value) if isinstance(value, tuple) else value
        else:
            raise ValueError(
                f"official_kwargs: {key!r} is not an argument of the official {arch} constructor "
                f"(known: {sorted(names)})"
            )
    if out.get("dilations") is not None:
        out["dilations"] = [list(d) for d in out["dilations"]]
    return out


def _detect_arch(state_dict: Mapping[str, Any]) -> str:
    """Official architecture of an official state dict, from its key layout."""
    if any(k.startswith("levels.") for k in state_dict):
        return "nat"
    if any(k.startswith("layers.") and ".blocks." in k for k in state_dict):
        return "dinats"
    if any(k.startswith("layers.") for k in state_dict):
        return "isotropic"
    raise ValueError(
        "state_dict: not an official NAT/DiNAT/DiNAT-s/isotropic checkpoint (no 'levels.*' or "
        f"'layers.*' keys); first keys: {list(state_dict)[:5]}"
    )


def _is_ours(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(("stem.", "stages.", "blocks.")) for k in state_dict)


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Tensor state dict inside a checkpoint (bare, or under a training script's wrapper key),
    without any DDP ``module.`` prefix."""
    sd: Mapping[str, Any] = checkpoint
    for _ in range(3):
        if any(isinstance(v, torch.Tensor) for v in sd.values()):
            break
        for key in ("state_dict_ema", "model_ema", "state_dict", "model", "module"):
            if isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
        else:
            raise ValueError(f"state_dict: no tensors found; top-level keys {list(sd)[:10]}")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("backbone.") for k in sd):
        # an mmdet/mmseg checkpoint: keep the backbone, drop neck and heads
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def _convert_key(key: str, arch: str) -> str | None:
    """Our key for one official key (None if the official key is unknown)."""
    parts = key.split(".")
    if arch != "isotropic" and len(parts) == 2 and re.fullmatch(r"norm\d+", parts[0]):
        return f"dense_norms.{parts[0][4:]}.{parts[1]}"  # detection/segmentation out norms
    if parts[0] in ("norm", "head"):
        if parts[0] == "head" and len(parts) == 2:
            return "head.fc." + parts[1]
        return key if len(parts) == 2 else None
    if parts[0] == "patch_embed":
        rest = ".".join(parts[1:])
        if arch == "nat":
            rest = {"proj.0.weight": "conv1.weight", "proj.0.bias": "conv1.bias",
                    "proj.1.weight": "conv2.weight", "proj.1.bias": "conv2.bias"}.get(rest, rest)  # fmt: skip
            if rest.startswith("proj."):
                return None
        return "stem." + rest
    if arch == "isotropic":
        if parts[0] == "layers" and len(parts) >= 3:
            return ".".join(["blocks", parts[1], *parts[2:]])
        return None
    level = "levels" if arch == "nat" else "layers"
    if parts[0] != level or len(parts) < 4:
        return None
    i = int(parts[1])
    if parts[2] == "downsample":
        return ".".join(["stages", str(i + 1), "downsample", *parts[3:]])
    if parts[2] == "blocks" and len(parts) >= 5:
        name = {"gamma1": "ls1.gamma", "gamma2": "ls2.gamma"}.get(parts[4], ".".join(parts[4:]))
        return ".".join(["stages", str(i), "blocks", parts[3], name])
    return None


def convert_official_state_dict(
    state_dict: Mapping[str, Any], arch: str | None = None
) -> dict[str, torch.Tensor]:
    """Rename an official NAT/DiNAT/DiNAT-s/isotropic state dict to our keys.

    Every official key must be recognized (``ValueError`` listing the others), so a complete
    official checkpoint converts completely. ``arch`` is detected from the keys when None.
    """
    sd = _unwrap(state_dict)
    arch = arch or _detect_arch(sd)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in sd.items():
        new = _convert_key(k, arch)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise ValueError(f"state_dict: official {arch} keys not recognized: {unknown[:10]}")
    return out


def _resize_rpb(rpb: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of a ``[heads, 2k-1, 2k-1]`` bias table to ``[heads, size, size]`` (how the
    official 11x11 checkpoints were made from the 7x7 ones)."""
    return F.interpolate(rpb.float()[None], size=(size, size), mode="bicubic", align_corners=False)[
        0
    ].to(rpb.dtype)


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Official NAT/DiNAT/DiNAT-s/isotropic checkpoints (bare or wrapped under ``model`` /
    ``state_dict`` / ``state_dict_ema``, DDP prefix or not), or timm-style checkpoints of these
    models, into ``model``'s keys. Relative-position-bias tables of another kernel size are
    resized bicubically."""
    sd = _unwrap(state_dict)
    if not _is_ours(sd):
        sd = convert_official_state_dict(sd)
    target = model.state_dict()
    for k, v in sd.items():
        if k.endswith(".rpb") and k in target and target[k].shape != v.shape:
            sd[k] = _resize_rpb(v, target[k].shape[-1])
    if getattr(model, "dense_norms", None) is None:
        sd = {k: v for k, v in sd.items() if not k.startswith("dense_norms.")}
    elif not any(k.startswith("dense_norms.") for k in sd):
        # A classification checkpoint into the detection layout: the official detection
        # training starts the same way (non-strict load, fresh out norms, no final norm/head).
        sd = {k: v for k, v in sd.items() if not k.startswith(("norm.", "head."))}
        sd |= {k: v.clone() for k, v in target.items() if k.startswith("dense_norms.")}
    return sd


def _default_name(arch: str, ours: Mapping[str, Any]) -> str:
    if arch == "nat":
        dil = ours.get("dilations")
        return "dinat_mini" if dil and any(d != 1 for s in dil for d in s) else "nat_mini"
    if arch == "dinats":
        return "dinat_s_tiny"
    return "dinat_isotropic_small" if ours.get("dilation", 1) != 1 else "nat_isotropic_small"


def official_model_args(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "nat",
) -> tuple[str, dict[str, Any]]:
    """Registered model name and kwargs that build our counterpart of an official model.

    ``timm.create_model(name, **kwargs)`` builds it (``kwargs`` is what a Hub ``config.json``
    stores as ``model_args``). ``official_kwargs`` are the official constructor's arguments
    (official names); without them ``variant`` (an official factory name such as
    ``"dinat_mini"``) supplies them. ``num_classes`` follows the checkpoint's head.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: must be one of {FAMILIES}, got {family!r}")
    sd = _unwrap(state_dict)
    arch = _detect_arch(sd)
    if official_kwargs is None:
        if variant is None:
            raise ValueError("official_kwargs: give the official constructor kwargs or variant")
        if variant not in OFFICIAL_VARIANTS:
            raise ValueError(
                f"variant: {variant!r} is not an official NAT/DiNAT variant "
                f"(known: {sorted(OFFICIAL_VARIANTS)})"
            )
        official_kwargs = OFFICIAL_VARIANTS[variant][1]
    if (
        variant is not None
        and variant in OFFICIAL_VARIANTS
        and OFFICIAL_VARIANTS[variant][0] != arch
    ):
        raise ValueError(
            f"variant: {variant!r} is a {OFFICIAL_VARIANTS[variant][0]} model but the state "
            f"dict has the {arch} layout"
        )
    ours = _ours_from_official_kwargs(arch, official_kwargs)
    head = sd.get("head.weight")
    n_cls = 0 if head is None else int(head.shape[0])
    if "num_classes" in ours and ours["num_classes"] != n_cls:
        raise ValueError(
            f"official_kwargs: num_classes={ours['num_classes']} but the checkpoint's head has "
            f"{n_cls} outputs"
        )
    ours["num_classes"] = n_cls
    layout = dict(ours)
    if any(re.fullmatch(r"norm\d+\.weight", k) for k in sd):
        ours["dense_norms"] = True  # an mmdet/mmseg backbone checkpoint
    if variant in OFFICIAL_VARIANTS:
        name = variant
    else:
        matches = [
            n for n, (a, kw) in OFFICIAL_VARIANTS.items()
            if a == arch and _ours_from_official_kwargs(a, kw) | {"num_classes": n_cls} == layout
        ]  # fmt: skip
        name = matches[0] if matches else _default_name(arch, ours)
    return name, ours


def from_official(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "nat",
) -> nn.Module:
    """Our model built from an official checkpoint, with its converted weights loaded (strict).

    ``state_dict``: an official NAT/DiNAT/DiNAT-s/isotropic state dict (or a checkpoint
    wrapping it). ``official_kwargs``: the official constructor's kwargs (official names, e.g.
    a parity vector's ``constructor_kwargs``); without them ``variant`` names an official
    factory (``"nat_mini"``, ``"dinat_large_384"``, ``"dinat_s_tiny"``, ...).
    Returns the model in eval mode; ``model.model_args`` holds the kwargs that rebuild it
    from its registered name (what a Hub ``config.json`` stores).
    """
    name, args = official_model_args(state_dict, official_kwargs, variant=variant, family=family)
    return build_converted(name, args, lambda m: convert_official_state_dict(_unwrap(state_dict)))


# ----------------------------------------------------------------------------------------------
# pretrained configs and registration


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        # the official validation used timm's defaults: bicubic, crop 0.875, ImageNet mean/std
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "license": "mit",
        **kwargs,
    }


_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/"
_DINAT_URL = "https://shi-labs.com/projects/dinat/checkpoints/"
_NAT_PAPER = dict(paper_ids="arXiv:2204.07143", paper_name="Neighborhood Attention Transformer")
_DINAT_PAPER = dict(
    paper_ids="arXiv:2209.15001", paper_name="Dilated Neighborhood Attention Transformer"
)
_AT384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
_IN22K = dict(num_classes=21841)
_PATCH = dict(first_conv="stem.proj")

# model.tag -> (official checkpoint file, cfg overrides); hf_hub_id is visionattn/<model.tag>
_WEIGHTS: dict[str, tuple[str, dict[str, Any]]] = {
    "nat_mini.in1k": (_NAT_URL + "nat_mini.pth", _NAT_PAPER),
    "nat_tiny.in1k": (_NAT_URL + "nat_tiny.pth", _NAT_PAPER),
    "nat_small.in1k": (_NAT_URL + "nat_small.pth", _NAT_PAPER),
    "nat_base.in1k": (_NAT_URL + "nat_base.pth", _NAT_PAPER),
    "dinat_mini.in1k": (_DINAT_URL + "imagenet1k/dinat_mini_in1k_224.pth", _DINAT_PAPER),
    "dinat_tiny.in1k": (_DINAT_URL + "imagenet1k/dinat_tiny_in1k_224.pth", _DINAT_PAPER),
    "dinat_small.in1k": (_DINAT_URL + "imagenet1k/dinat_small_in1k_224.pth", _DINAT_PAPER),
    "dinat_base.in1k": (_DINAT_URL + "imagenet1k/dinat_base_in1k_224.pth", _DINAT_PAPER),
    "dinat_large.in22k_ft_in1k": (
        _DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_224.pth", _DINAT_PAPER),
    "dinat_large_384.in22k_ft_in1k": (
        _DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_384.pth", dict(_DINAT_PAPER, **_AT384)),
    "dinat_large_384_11x11.in22k_ft_in1k": (
        _DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_384_11x11.pth",
        dict(_DINAT_PAPER, **_AT384)),
    "dinat_large_21k.in22k": (
        _DINAT_URL + "imagenet22k/dinat_large_in22k_224.pth", dict(_DINAT_PAPER, **_IN22K)),
    "dinat_large_21k_11x11.in22k": (
        _DINAT_URL + "imagenet22k/dinat_large_in22k_224_11x11interp.pth",
        dict(_DINAT_PAPER, **_IN22K)),
    "dinat_s_tiny.in1k": (
        _DINAT_URL + "imagenet1k/dinat_s_tiny_in1k_224.pth", dict(_DINAT_PAPER, **_PATCH)),
    "dinat_s_small.in1k": (
        _DINAT_URL + "imagenet1k/dinat_s_small_in1k_224.pth", dict(_DINAT_PAPER, **_PATCH)),
    "dinat_s_base.in1k": (
        _DINAT_URL + "imagenet1k/dinat_s_base_in1k_224.pth", dict(_DINAT_PAPER, **_PATCH)),
    "dinat_s_large.in22k_ft_in1k": (
        _DINAT_URL + "imagenet1k/dinat_s_large_in1k_224.pth", dict(_DINAT_PAPER, **_PATCH)),
    "dinat_s_large_384.in22k_ft_in1k": (
        _DINAT_URL + "imagenet1k/dinat_s_large_in1k_384.pth",
        dict(_DINAT_PAPER, **_PATCH, **_AT384)),
    "dinat_s_large_21k.in22k": (
        _DINAT_URL + "imagenet22k/dinat_s_large_in22k_224.pth",
        dict(_DINAT_PAPER, **_PATCH, **_IN22K)),
    "nat_isotropic_small.in1k": (
        _DINAT_URL + "isotropic/nat_isotropic_small_in1k_224.pth",
        dict(_DINAT_PAPER, **_PATCH, pool_size=(14, 14))),
    "nat_isotropic_base.in1k": (
        _DINAT_URL + "isotropic/nat_isotropic_base_in1k_224.pth",
        dict(_DINAT_PAPER, **_PATCH, pool_size=(14, 14))),
    "dinat_isotropic_small.in1k": (
        _DINAT_URL + "isotropic/dinat_isotropic_small_in1k_224.pth",
        dict(_DINAT_PAPER, **_PATCH, pool_size=(14, 14))),
    "dinat_isotropic_base.in1k": (
        _DINAT_URL + "isotropic/dinat_isotropic_base_in1k_224.pth",
        dict(_DINAT_PAPER, **_PATCH, pool_size=(14, 14))),
}  # fmt: skip


def _weights_cfg(tag: str, url: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    # Weights are converted from the official checkpoints (``url`` keeps their origin) and
    # served from the Hub id; the official files are not fetched directly.
    return _cfg(hf_hub_id=f"visionattn/{tag}", origin_url=url, **extra)


default_cfgs = generate_default_cfgs(
    {
        **{tag: _weights_cfg(tag, url, extra) for tag, (url, extra) in _WEIGHTS.items()},
        "test_nat.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
        "test_dinat.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
        "test_dinat_s.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), **_PATCH),
        "test_dinat_isotropic.untrained": _cfg(input_size=(3, 64, 64), pool_size=(4, 4), **_PATCH),
    }
)

# tiny configurations for tests (no official counterpart)
_TEST_ARGS: dict[str, tuple[str, dict[str, Any]]] = {
    "test_nat": (
        "nat",
        dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], mlp_ratio=2,
             kernel_size=3, drop_path_rate=0.0),
    ),
    "test_dinat": (
        "nat",
        dict(embed_dim=16, depths=[2, 2, 1, 1], num_heads=[1, 2, 2, 4], mlp_ratio=2,
             kernel_size=3, dilations=[[1, 5], [1, 2], [1], [1]], layer_scale=1e-5,
             drop_path_rate=0.0),
    ),
    "test_dinat_s": (
        "dinats",
        dict(embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], mlp_ratio=2,
             kernel_size=3, dilations=[[2], [1, 2], [1], [1]], drop_path_rate=0.0),
    ),
    "test_dinat_isotropic": (
        "isotropic",
        dict(embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, kernel_size=3, dilation=2,
             drop_path_rate=0.0),
    ),
}  # fmt: skip


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    if variant in OFFICIAL_VARIANTS:
        arch, official = OFFICIAL_VARIANTS[variant]
        args = _ours_from_official_kwargs(arch, official)
    else:
        arch, args = _TEST_ARGS[variant]
        args = dict(_ARCH_ARGS[arch], **args)
    args.update(kwargs)
    if arch == "isotropic":
        cls: type[nn.Module] = NATIsotropic
        n_feat = args.get("depth", 12)
        args.pop("stem_type", None)
    else:
        cls = NAT
        n_feat = len(args.get("depths", (3, 4, 6, 5)))
    out_indices = kwargs.pop("out_indices", tuple(range(n_feat)))
    args.pop("out_indices", None)
    return build_model_with_cfg(
        cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **args,
    )


@register_model
def nat_mini(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Mini (20M params, kernel 7)."""
    return _create("nat_mini", pretrained, **kwargs)


@register_model
def nat_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Tiny (28M)."""
    return _create("nat_tiny", pretrained, **kwargs)


@register_model
def nat_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Small (51M, layer scale 1e-5)."""
    return _create("nat_small", pretrained, **kwargs)


@register_model
def nat_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Base (90M, layer scale 1e-5)."""
    return _create("nat_base", pretrained, **kwargs)


@register_model
def dinat_mini(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Mini (20M, dilations 8/4/2/1)."""
    return _create("dinat_mini", pretrained, **kwargs)


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Tiny (28M)."""
    return _create("dinat_tiny", pretrained, **kwargs)


@register_model
def dinat_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Small (51M; no layer scale, unlike NAT-Small)."""
    return _create("dinat_small", pretrained, **kwargs)


@register_model
def dinat_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Base (90M, layer scale 1e-5)."""
    return _create("dinat_base", pretrained, **kwargs)


@register_model
def dinat_large(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large (200M), ImageNet-22k pre-trained, 224 px."""
    return _create("dinat_large", pretrained, **kwargs)


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large at 384 px (dilations 13/6/3/1)."""
    return _create("dinat_large_384", pretrained, **kwargs)


@register_model
def dinat_large_384_11x11(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large at 384 px with 11x11 neighborhoods (dilations 8/4/2/1)."""
    return _create("dinat_large_384_11x11", pretrained, **kwargs)


@register_model
def dinat_large_21k(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large with its ImageNet-22k classifier."""
    return _create("dinat_large_21k", pretrained, **kwargs)


@register_model
def dinat_large_21k_11x11(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large, ImageNet-22k classifier, 11x11 neighborhoods (bicubic-resized biases)."""
    return _create("dinat_large_21k_11x11", pretrained, **kwargs)


@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-s-Tiny (Swin-like layout, 28M)."""
    return _create("dinat_s_tiny", pretrained, **kwargs)


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-s-Small (50M)."""
    return _create("dinat_s_small", pretrained, **kwargs)


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-s-Base (88M)."""
    return _create("dinat_s_base", pretrained, **kwargs)


@register_model
def dinat_s_large(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-s-Large (197M), ImageNet-22k pre-trained, 224 px."""
    return _create("dinat_s_large", pretrained, **kwargs)


@register_model
def dinat_s_large_384(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-s-Large at 384 px (dilations 13/6/3/1)."""
    return _create("dinat_s_large_384", pretrained, **kwargs)


@register_model
def dinat_s_large_21k(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-s-Large with its ImageNet-22k classifier."""
    return _create("dinat_s_large_21k", pretrained, **kwargs)


@register_model
def nat_isotropic_small(pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    """Isotropic NAT-Small (22M, 16x16 patches)."""
    return _create("nat_isotropic_small", pretrained, **kwargs)


@register_model
def nat_isotropic_base(pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    """Isotropic NAT-Base (86M)."""
    return _create("nat_isotropic_base", pretrained, **kwargs)


@register_model
def dinat_isotropic_small(pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    """Isotropic DiNAT-Small (dilation 2 on odd blocks)."""
    return _create("dinat_isotropic_small", pretrained, **kwargs)


@register_model
def dinat_isotropic_base(pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    """Isotropic DiNAT-Base."""
    return _create("dinat_isotropic_base", pretrained, **kwargs)


@register_model
def test_nat(pretrained: bool = False, **kwargs: Any) -> NAT:
    """Tiny NAT for tests."""
    return _create("test_nat", pretrained, **kwargs)


@register_model
def test_dinat(pretrained: bool = False, **kwargs: Any) -> NAT:
    """Tiny DiNAT (dilations, layer scale) for tests."""
    return _create("test_dinat", pretrained, **kwargs)


@register_model
def test_dinat_s(pretrained: bool = False, **kwargs: Any) -> NAT:
    """Tiny DiNAT-s for tests."""
    return _create("test_dinat_s", pretrained, **kwargs)


@register_model
def test_dinat_isotropic(pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    """Tiny isotropic DiNAT for tests."""
    return _create("test_dinat_isotropic", pretrained, **kwargs)

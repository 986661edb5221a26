"""LITv2: Fast Vision Transformers with HiLo Attention.

Paper: `Fast Vision Transformers with HiLo Attention` - https://arxiv.org/abs/2205.13213
(Pan, Cai, Zhuang, NeurIPS 2022).

Official code and checkpoints: https://github.com/ziplab/LITv2 (Apache-2.0). This is an
independent implementation whose weights are interchangeable with the official ones
(``checkpoint_filter_fn``, ``from_official``).

Architecture (all tokens kept channels-last, ``[B, H, W, C]``):

* patch embedding: 4x4 stride-4 conv + LayerNorm;
* early stages (``has_msa = 0``): ConvFFN blocks, ``x + MLP(LN(x))`` where the MLP is
  ``fc1 -> 3x3 depthwise conv -> GELU -> fc2``;
* later stages: the same MLP after HiLo attention, ``x + HiLo(LN(x))``. HiLo splits the heads:
  ``int(heads * alpha)`` Lo-Fi heads attend from every token to the ``window x window``
  average-pooled map (``F.scaled_dot_product_attention``), the other heads (Hi-Fi) attend
  inside non-overlapping ``window x window`` windows (``visionattn.kernels.na2d`` with
  ``kernel_size = stride = window``). Each path has its own output projection; the result is
  ``[Hi-Fi, Lo-Fi]`` concatenated along channels. A window of 1 makes every head Lo-Fi over
  the full-resolution map (plain multi-head self-attention);
* between stages: deformable token merging (DTM), a 2x2 stride-2 deformable convolution
  (offsets from a plain 2x2 stride-2 conv) + BatchNorm + GELU, with no custom CUDA extension:
  by default as bilinear ``grid_sample`` + a plain conv (the same function; under autocast
  the conv runs in the autocast dtype like every other conv, the sampling in float32), or on
  ``torchvision.ops.deform_conv2d`` in float32 (``deform_impl="torchvision"``, as the official
  apex-wrapped DCN ran). On the H200 (bf16 training, batch 128) torchvision's float32
  backward took ~2 ms per DTM (three per step) in a profile; litv2_small trained at 2910
  against 2797 img/s with ``deform_impl="torchvision"`` in the same run.

Input sizes. The image is zero-padded at the bottom/right to a multiple of the patch size, and
HiLo zero-pads its (normalized) input to a multiple of the window and crops the output, both
as the official detection/segmentation backbones do; DTM gives ``floor(size / 2)`` like the
official deformable conv. Maps smaller than 2 before a DTM are zero-padded to 2 (the official
code fails there). The official classification model only runs at its training resolution.

``dense_norms=True`` is the official detection/segmentation layout (out norms ``norm1..3`` on
stages 1-3, none on stage 0); official mmdet/mmseg checkpoints load into it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, trunc_normal_
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs, register_model
from torch import nn
from torchvision.ops import deform_conv2d

import visionattn.kernels as _kernels
from visionattn.backbones._convert import (
    TRAINING_ONLY_KWARGS,
    build_converted,
    official_variant_args,
)
from visionattn.backbones._layers import AutocastLayerNorm
from visionattn.backbones._layers import inplace_act as _act
from visionattn.backbones._layers import linear_tokens as _linear

# official family names visionattn.convert.from_official routes here
OFFICIAL_FAMILIES = ("litv2",)

__all__ = [
    "DeformableTokenMerging",
    "FAMILIES",
    "HiLo",
    "LITv2",
    "OFFICIAL_VARIANTS",
    "checkpoint_filter_fn",
    "convert_official_state_dict",
    "from_official",
    "official_model_args",
]

FAMILIES = ("litv2",)

_DEFORM_IMPLS = ("torchvision", "sample")


# ----------------------------------------------------------------------------------------------
# layers


class HiLo(nn.Module):
    """HiLo attention on ``[B, H, W, C]`` tokens (see the module docstring).

    Head split as the official code: ``l_heads = int(num_heads * alpha)`` Lo-Fi heads,
    ``num_heads - l_heads`` Hi-Fi heads, all ``dim // num_heads`` wide; ``window_size == 1``
    makes all heads Lo-Fi. Parameter names follow the official module (``l_q``, ``l_kv``,
    ``l_proj``, ``h_qkv``, ``h_proj``); a path with no heads has no parameters.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 2,
        alpha: float = 0.5,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"num_heads: must be >= 1 and divide dim {dim}, got {num_heads}")
        if window_size < 1:
            raise ValueError(f"window_size: must be >= 1 for a HiLo stage, got {window_size}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: must be in [0, 1], got {alpha}")
        self.dim = dim
        self.head_dim = dim // num_heads
        self.ws = window_size
        self.l_heads = num_heads if window_size == 1 else int(num_heads * alpha)
        self.h_heads = num_heads - self.l_heads
        self.l_dim = self.l_heads * self.head_dim
        self.h_dim = self.h_heads * self.head_dim
        self.scale = qk_scale or self.head_dim**-0.5
        if self.l_heads:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * self.l_dim, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)
        if self.h_heads:
            self.h_qkv = nn.Linear(dim, 3 * self.h_dim, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)

    def _hifi(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = self.h_qkv(x).view(B, H, W, 3, self.h_heads, self.head_dim).unbind(3)
        # kernel_size == stride == window on a map that is a multiple of it: every query sees
        # exactly the non-overlapping window it lies in
        y = _kernels.na2d(q, k, v, kernel_size=self.ws, stride=self.ws, scale=self.scale)
        return self.h_proj(y.reshape(B, H, W, self.h_dim))

    def _lofi(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q = self.l_q(x).view(B, H * W, self.l_heads, self.head_dim).transpose(1, 2)
        if self.ws > 1:
            # window means as one reduction over a view of the tokens (measured on H200: the
            # channels-last avg_pool2d kernel reads at a fraction of the bandwidth)
            s = self.ws
            pooled = x.view(B, H // s, s, W // s, s, C).mean(dim=(2, 4))
        else:
            pooled = x
        n = pooled.shape[1] * pooled.shape[2]
        k, v = self.l_kv(pooled).view(B, n, 2, self.l_heads, self.head_dim).unbind(2)
        y = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), scale=self.scale
        )
        return self.l_proj(y.transpose(1, 2).reshape(B, H, W, self.l_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        pad_h, pad_w = (-H) % self.ws, (-W) % self.ws
        if pad_h or pad_w:
            # the official detection/segmentation HiLo: zero tokens (after the norm), so the
            # pooled Lo-Fi keys of border windows average in zeros and padded Hi-Fi keys
            # (qkv bias only) stay in the window softmax
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        if not self.h_heads:
            y = self._lofi(x)
        elif not self.l_heads:
            y = self._hifi(x)
        else:
            y = torch.cat((self._hifi(x), self._lofi(x)), dim=-1)
        if pad_h or pad_w:
            y = y[:, :H, :W]
        return y

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, head_dim={self.head_dim}, window_size={self.ws}, "
            f"hifi_heads={self.h_heads}, lofi_heads={self.l_heads}"
        )


class ConvMlp(nn.Module):
    """LITv2 MLP on ``[B, H, W, C]``: ``fc1 -> 3x3 depthwise conv -> GELU -> fc2`` (dropout
    after the GELU and after fc2, as the official ``DWMlp``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _linear(x, self.fc1)
        # the depthwise conv reads a channels-last NCHW view of the tokens (no copy)
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = self.drop1(_act(self.act, x))
        return self.drop2(_linear(x, self.fc2))


class ConvFFNBlock(nn.Module):
    """Early-stage block without attention: ``x + drop_path(mlp(norm2(x)))``."""

    def __init__(
        self, dim: int, mlp_ratio: float = 4.0, proj_drop: float = 0.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm2 = AutocastLayerNorm(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))


class HiLoBlock(nn.Module):
    """Pre-norm block: ``x + HiLo(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        alpha: float,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = AutocastLayerNorm(dim)
        self.attn = HiLo(dim, num_heads, window_size, alpha, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = AutocastLayerNorm(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _sampled_deform_conv(
    x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Deformable conv with ``kernel_size == stride == k``, no padding/dilation/groups, as
    bilinear sampling + a plain strided conv.

    Kernel point ``(a, b)`` of output ``(i, j)`` samples ``x`` at
    ``(k*i + a + dy, k*j + b + dx)`` (offset channels ``2*(a*k + b)`` = dy, ``+1`` = dx, as
    torchvision); corners outside the map contribute zero. The samples, laid out so that point
    ``(a, b)`` of output ``(i, j)`` sits at pixel ``(k*i + a, k*j + b)``, form an image on
    which the deformable conv is an ordinary ``k x k`` stride-``k`` conv.
    """
    B, _, H, W = x.shape
    k = weight.shape[-1]
    Ho, Wo = offset.shape[-2:]
    # sampling positions in at least float32 (a half-precision coordinate near pixel 50 is
    # only good to 0.25 px); the image is sampled in the same precision, as torchvision does
    ct = torch.promote_types(torch.promote_types(x.dtype, offset.dtype), torch.float32)
    off = offset.to(ct).view(B, k, k, 2, Ho, Wo).permute(0, 4, 1, 5, 2, 3)
    off = off.reshape(B, Ho * k, Wo * k, 2)
    rows = torch.arange(Ho * k, device=x.device, dtype=ct).view(1, -1, 1)
    cols = torch.arange(Wo * k, device=x.device, dtype=ct).view(1, 1, -1)
    # align_corners=True maps -1/1 to the first/last pixel centre: pixel p -> 2p/(size-1) - 1
    gx = (off[..., 1] + cols) * (2.0 / (W - 1)) - 1.0
    gy = (off[..., 0] + rows) * (2.0 / (H - 1)) - 1.0
    grid = torch.stack((gx, gy), dim=-1)
    samples = F.grid_sample(
        x.to(ct), grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    # the conv follows autocast like any conv; outside autocast it runs in x's dtype
    if not torch.is_autocast_enabled(x.device.type):
        samples = samples.to(x.dtype)
    return F.conv2d(samples, weight, bias, stride=k)


class DeformConv2x2(nn.Module):
    """2x2 stride-2 deformable conv with its offset predictor (official ``DeformConv2dPack``
    parameter names: ``weight``, ``bias``, ``conv_offset``).

    ``impl``: ``"torchvision"`` runs ``torchvision.ops.deform_conv2d``; ``"sample"`` computes
    the same function as ``grid_sample`` + ``conv2d`` (:func:`_sampled_deform_conv`).
    """

    def __init__(self, dim: int, out_dim: int, impl: str = "sample") -> None:
        super().__init__()
        if impl not in _DEFORM_IMPLS:
            raise ValueError(f"deform_impl: must be one of {_DEFORM_IMPLS}, got {impl!r}")
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(out_dim, dim, 2, 2))
        self.bias = nn.Parameter(torch.empty(out_dim))
        self.conv_offset = nn.Conv2d(dim, 8, kernel_size=2, stride=2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # official init: PyTorch's conv default for the kernel, zero offsets (a plain conv)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.conv_offset(x)
        if self.impl == "sample" and x.shape[-2] > 1 and x.shape[-1] > 1:
            return _sampled_deform_conv(x, offset, self.weight, self.bias)
        # At least float32 with autocast off, as the official extension ran (apex
        # float_function); torchvision has no CPU autocast rule nor a bfloat16 CPU kernel.
        ct = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            y = deform_conv2d(
                x.to(ct), offset.to(ct), self.weight.to(ct), self.bias.to(ct), stride=2
            )
        return y.to(x.dtype)


class DeformableTokenMerging(nn.Module):
    """DTM: ``[B, H, W, C] -> [B, H//2, W//2, out_dim]`` by a 2x2 stride-2 deformable conv,
    BatchNorm and GELU. Maps with a side below 2 are zero-padded to 2 first."""

    def __init__(self, dim: int, out_dim: int, deform_impl: str = "sample") -> None:
        super().__init__()
        self.dconv = DeformConv2x2(dim, out_dim, impl=deform_impl)
        self.norm = nn.BatchNorm2d(out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        if x.shape[-2] < 2 or x.shape[-1] < 2:
            x = F.pad(x, (0, max(0, 2 - x.shape[-1]), 0, max(0, 2 - x.shape[-2])))
        x = self.act(self.norm(self.dconv(x)))
        return x.permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: the image zero-padded at the bottom/right to a
    multiple of ``patch_size`` (as the official dense-prediction code), conv, LayerNorm.
    ``[B, C_in, H, W] -> [B, ceil(H/p), ceil(W/p), dim]``."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, norm: bool = True) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"x: expected an image batch [B, {self.in_chans}, H, W], got {tuple(x.shape)}"
            )
        p = self.patch_size
        pad_h, pad_w = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


# ----------------------------------------------------------------------------------------------
# stages and model


class LITStage(nn.Module):
    """Optional DTM from the previous stage, then ``depth`` ConvFFN or HiLo blocks."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        has_msa: bool,
        window_size: int,
        alpha: float,
        downsample: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        proj_drop: float,
        drop_path: Sequence[float],
        deform_impl: str,
    ) -> None:
        super().__init__()
        self.downsample = (
            DeformableTokenMerging(dim, out_dim, deform_impl) if downsample else nn.Identity()
        )
        if has_msa:
            blocks: list[nn.Module] = [
                HiLoBlock(out_dim, num_heads, window_size, alpha, mlp_ratio, qkv_bias, qk_scale,
                          proj_drop, drop_path[i])
                for i in range(depth)
            ]  # fmt: skip
        else:
            blocks = [
                ConvFFNBlock(out_dim, mlp_ratio, proj_drop, drop_path[i]) for i in range(depth)
            ]
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _init_weights(module: nn.Module) -> None:
    # Official init: truncated-normal linears with zero bias, unit LayerNorms, the MLP's
    # depthwise conv He-normal over its fan-out with zero bias; other convs keep PyTorch's.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, ConvMlp):
        conv = module.dwconv
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(conv.bias)


class LITv2(nn.Module):
    """LITv2 (HiLo attention) with timm's model contract.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: ``"avg"`` or ``""``.
        embed_dim: channels of the first stage; doubled at every later stage.
        depths: blocks per stage.
        num_heads: attention heads per stage (HiLo stages).
        has_msa: per stage, 1 for HiLo blocks, 0 for ConvFFN blocks (official default
            ``[0, 0, 1, 1]``).
        local_ws: per stage, the HiLo window (``s`` in the paper; 1: all heads Lo-Fi over the
            full map). Ignored for ConvFFN stages.
        alpha: fraction of heads (rounded down) that are Lo-Fi.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias in the q/kv/qkv projections.
        qk_scale: attention scale (default ``head_dim ** -0.5``).
        patch_size: patch embedding stride.
        patch_norm: LayerNorm after the patch embedding.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout inside the MLPs (official ``drop_rate``).
        drop_path_rate: stochastic depth, linear over all blocks.
        deform_impl: ``"sample"`` (default; ``grid_sample`` + ``conv2d``) or
            ``"torchvision"`` (``torchvision.ops.deform_conv2d`` in float32), the same function
            for the DTM convolutions (module docstring).
        dense_norms: official detection/segmentation layout (module docstring).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        has_msa: Sequence[int] = (0, 0, 1, 1),
        local_ws: Sequence[int] = (0, 0, 2, 1),
        alpha: float = 0.9,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        patch_size: int = 4,
        patch_norm: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        deform_impl: str = "sample",
        dense_norms: bool = False,
    ) -> None:
        super().__init__()
        n = len(depths)
        for arg, val in (("num_heads", num_heads), ("has_msa", has_msa), ("local_ws", local_ws)):
            if len(val) != n:
                raise ValueError(f"{arg}: needs one entry per stage ({n}), got {list(val)}")
        for i in range(n):
            if has_msa[i] and local_ws[i] < 1:
                raise ValueError(
                    f"local_ws: stage {i} has HiLo blocks and needs a window >= 1, "
                    f"got {local_ws[i]}"
                )
        if deform_impl not in _DEFORM_IMPLS:
            raise ValueError(f"deform_impl: must be one of {_DEFORM_IMPLS}, got {deform_impl!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        dims = [int(embed_dim * 2**i) for i in range(n)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.embed_dim = embed_dim

        self.stem = PatchEmbed(in_chans, embed_dim, patch_size, norm=patch_norm)
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        self.stages = nn.Sequential()
        self.feature_info: list[dict[str, Any]] = []
        for i in range(n):
            self.stages.append(
                LITStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    has_msa=bool(has_msa[i]),
                    window_size=local_ws[i],
                    alpha=alpha,
                    downsample=i > 0,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    proj_drop=proj_drop_rate,
                    drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    deform_impl=deform_impl,
                )
            )
            self.feature_info.append(
                dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"stages.{i}")
            )
        if dense_norms:
            # the official dense-prediction backbone normalizes stages 1..n-1 only
            self.dense_norms: nn.ModuleList | None = nn.ModuleList(
                nn.LayerNorm(d) if i else nn.Identity() for i, d in enumerate(dims)
            )
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
        # the official optimizer exempts 1-D parameters and biases by shape/name, not this set
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
        """Stage outputs (before the next DTM) and, unless ``intermediates_only``, the
        normalized final map ``[B, H, W, C]``.

        ``indices``: last n stages if int, all if None, else the given stage indices.
        ``norm`` applies the final norm to the last stage's output. ``output_fmt``: ``"NCHW"``
        or ``"NHWC"``. With ``dense_norms`` every intermediate goes through its stage's out
        norm, as the official detection/segmentation backbone returns it.
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
        """``[B, C_in, H, W] -> [B, H', W', num_features]`` (normalized, channels-last)."""
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# official variants and checkpoint conversion

# Official variant -> the official constructor's kwargs, from classification/configs/*.yaml
# (via models/build.py) of ziplab/LITv2 at commit 7501c86.
_S = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])
_M = dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24])
_B = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])
_COMMON = dict(
    patch_size=4, in_chans=3, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
    ape=False, patch_norm=True, alpha=0.9, local_ws=[0, 0, 2, 1],
)  # fmt: skip
OFFICIAL_VARIANTS: dict[str, dict[str, Any]] = {
    "litv2_small": dict(_COMMON, **_S, img_size=224, drop_path_rate=0.2),
    "litv2_medium": dict(_COMMON, **_M, img_size=224, drop_path_rate=0.3),
    "litv2_base": dict(_COMMON, **_B, img_size=224, drop_path_rate=0.5),
    "litv2_base_384": dict(_COMMON, **_B, img_size=384, drop_path_rate=0.5),
}

# official kwarg name -> ours
_KWARG_MAP = {
    "patch_size": "patch_size", "in_chans": "in_chans", "num_classes": "num_classes",
    "embed_dim": "embed_dim", "depths": "depths", "num_heads": "num_heads",
    "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias", "qk_scale": "qk_scale",
    "drop_rate": "proj_drop_rate", "drop_path_rate": "drop_path_rate",
    "patch_norm": "patch_norm", "has_msa": "has_msa", "alpha": "alpha", "local_ws": "local_ws",
}  # fmt: skip
# official kwargs that do not change the computed function: the classification model's fixed
# input size (ours takes any), the attention dropout and absolute position embedding that the
# official model accepts but never uses, and training switches
_IGNORED = (
    "img_size", "pretrain_img_size", "attn_drop_rate", "ape", "use_checkpoint", "window_size",
    "pretrained", "type", "init_cfg",
)  # fmt: skip


# the official constructor's defaults (classification/models/litv2.py; ``local_ws`` has no
# usable default there, every config and the dense-prediction backbone use [0, 0, 2, 1])
_OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=[2, 2, 6, 2],
    num_heads=[3, 6, 12, 24], mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
    drop_path_rate=0.1, patch_norm=True, has_msa=[0, 0, 1, 1], alpha=0.5, local_ws=[0, 0, 2, 1],
)  # fmt: skip


def _ours_from_official_kwargs(official_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Our constructor kwargs for the official ``LITv2`` constructor's kwargs (official
    defaults filled in for the ones not given)."""
    given = {**_OFFICIAL_DEFAULTS, **official_kwargs}
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key == "norm_layer":
            if "LayerNorm" not in str(value):
                raise ValueError(f"official_kwargs: norm_layer must be LayerNorm, got {value!r}")
        elif key in _IGNORED:
            continue
        elif key == "frozen_stages":
            if value != -1:
                raise ValueError(
                    f"official_kwargs: frozen_stages={value!r} is a training setting of the "
                    "mmdet backbone; freeze parameters yourself (only -1 is accepted)"
                )
        elif key == "out_indices":
            if sorted(value) != list(range(len(given["depths"]))):
                raise ValueError(
                    f"official_kwargs: out_indices={value!r}: only every stage is supported "
                    "(take a subset with features_only=True, out_indices=...)"
                )
        elif key in _KWARG_MAP:
            out[_KWARG_MAP[key]] = list(value) if isinstance(value, tuple) else value
        else:
            raise ValueError(
                f"official_kwargs: {key!r} is not an argument of the official LITv2 constructor "
                f"(known: {sorted([*_KWARG_MAP, *_IGNORED, 'norm_layer'])})"
            )
    return out


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Tensor state dict inside a checkpoint (bare or under a training script's wrapper key),
    without a DDP ``module.`` prefix; of an mmdet/mmseg checkpoint, the backbone only."""
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
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def _is_ours(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(("stem.", "stages.")) for k in state_dict)


def _convert_key(key: str) -> str | None:
    """Our key for one official key (None if the official key is unknown)."""
    parts = key.split(".")
    if len(parts) == 2 and re.fullmatch(r"norm\d+", parts[0]):
        return f"dense_norms.{parts[0][4:]}.{parts[1]}"  # detection/segmentation out norms
    if parts[0] == "norm" and len(parts) == 2:
        return key
    if parts[0] == "head" and len(parts) == 2:
        return "head.fc." + parts[1]
    if parts[0] == "patch_embed" and len(parts) == 3 and parts[1] in ("proj", "norm"):
        return "stem." + ".".join(parts[1:])
    if parts[0] != "layers" or len(parts) < 4 or not parts[1].isdigit():
        return None
    i = int(parts[1])
    if parts[2] == "downsample":
        rest = ".".join(parts[3:])
        if rest.startswith("norm_layer."):
            rest = "norm." + rest[len("norm_layer.") :]
        elif not rest.startswith("dconv."):
            return None
        return f"stages.{i + 1}.downsample.{rest}"
    if parts[2] == "blocks" and len(parts) >= 6 and parts[3].isdigit():
        rest = ".".join(parts[4:]).replace("mlp.dwconv.dwconv.", "mlp.dwconv.")
        return f"stages.{i}.blocks.{parts[3]}.{rest}"
    return None


def convert_official_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename an official LITv2 state dict (classification or detection/segmentation backbone)
    to our keys. Every official key must be recognized (``ValueError`` listing the others)."""
    sd = _unwrap(state_dict)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in sd.items():
        new = _convert_key(k)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise ValueError(f"state_dict: official LITv2 keys not recognized: {unknown[:10]}")
    return out


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Official LITv2 checkpoints (bare or wrapped under ``model`` / ``state_dict``, DDP prefix
    or not, classification or mmdet/mmseg backbone) or timm-style checkpoints of these models,
    into ``model``'s keys."""
    sd = _unwrap(state_dict)
    if not _is_ours(sd):
        sd = convert_official_state_dict(sd)
    target = model.state_dict()
    if getattr(model, "dense_norms", None) is None:
        sd = {k: v for k, v in sd.items() if not k.startswith("dense_norms.")}
    elif not any(k.startswith("dense_norms.") for k in sd):
        # a classification checkpoint into the detection layout: fresh out norms, no final
        # norm/head, as the official detection training starts (non-strict load)
        sd = {k: v for k, v in sd.items() if not k.startswith(("norm.", "head."))}
        sd |= {k: v.clone() for k, v in target.items() if k.startswith("dense_norms.")}
    return sd


def official_model_args(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "litv2",
) -> tuple[str, dict[str, Any]]:
    """Registered model name and kwargs that build our counterpart of an official LITv2.

    ``official_kwargs``: the official constructor's kwargs (official names, e.g. a parity
    vector's ``constructor_kwargs``); without them ``variant`` (``"litv2_small"``, ...)
    supplies them. ``num_classes`` follows the checkpoint's head.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: must be one of {FAMILIES}, got {family!r}")
    sd = _unwrap(state_dict)
    if not any(k.startswith(("layers.", "patch_embed.")) for k in sd):
        raise ValueError(
            "state_dict: not an official LITv2 checkpoint (no 'layers.*' / 'patch_embed.*' "
            f"keys); first keys: {list(sd)[:5]}"
        )

    def arch(kw: Mapping[str, Any]) -> Any:
        # our kwargs drop the input size, which still tells litv2_base_384 from litv2_base
        layout = {
            k: v for k, v in _ours_from_official_kwargs(kw).items() if k not in TRAINING_ONLY_KWARGS
        }
        return layout, kw.get("img_size", kw.get("pretrain_img_size", 224))

    name, ours = official_variant_args(
        sd, official_kwargs, variant, label="LITv2", variants=OFFICIAL_VARIANTS,
        to_ours=_ours_from_official_kwargs, default="litv2_small", arch=arch,
    )  # fmt: skip
    if any(re.fullmatch(r"norm\d+\.weight", k) for k in sd):
        ours["dense_norms"] = True  # an mmdet/mmseg backbone checkpoint
    return name, ours


def from_official(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "litv2",
) -> nn.Module:
    """Our model built from an official LITv2 checkpoint, its converted weights loaded
    (strict), in eval mode; ``model.model_args`` rebuilds it from its registered name."""
    name, args = official_model_args(state_dict, official_kwargs, variant=variant, family=family)
    return build_converted(name, args, lambda m: convert_official_state_dict(state_dict))


# ----------------------------------------------------------------------------------------------
# pretrained configs and registration


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        # official evaluation (classification/data/build.py): bicubic resize to 256/224 of the
        # size then centre crop, ImageNet mean/std
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj",
        "classifier": "head.fc",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2205.13213",
        "paper_name": "Fast Vision Transformers with HiLo Attention",
        **kwargs,
    }


_URL = "https://github.com/ziplab/LITv2/releases/download/v1.0/"

# model.tag -> (official checkpoint file, cfg overrides); hf_hub_id is visionattn/<model.tag>
_WEIGHTS: dict[str, tuple[str, dict[str, Any]]] = {
    "litv2_small.in1k": (_URL + "litv2_s.pth", {}),
    "litv2_medium.in1k": (_URL + "litv2_m.pth", {}),
    "litv2_base.in1k": (_URL + "litv2_b.pth", {}),
    # the 384 fine-tune is evaluated without a crop (TEST.CROP False): resize to 384 directly
    "litv2_base_384.in1k": (
        _URL + "litv2_b_384.pth", dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
    ),
}  # fmt: skip

default_cfgs = generate_default_cfgs(
    {
        **{
            tag: _cfg(hf_hub_id=f"visionattn/{tag}", origin_url=url, **extra)
            for tag, (url, extra) in _WEIGHTS.items()
        },
        "test_litv2.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
    }
)

# tiny configuration for tests (no official counterpart): one ConvFFN stage, a HiLo stage
# with Hi-Fi and Lo-Fi heads (window 2), a window-1 stage
_TEST_ARGS = dict(
    embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 4], has_msa=[0, 1, 1, 1],
    local_ws=[0, 2, 2, 1], alpha=0.5, mlp_ratio=2.0, drop_path_rate=0.0,
)  # fmt: skip


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> LITv2:
    if variant in OFFICIAL_VARIANTS:
        args = _ours_from_official_kwargs(OFFICIAL_VARIANTS[variant])
    else:
        args = dict(_TEST_ARGS)
    args.update(kwargs)
    out_indices = args.pop("out_indices", tuple(range(len(args.get("depths", (2, 2, 6, 2))))))
    return build_model_with_cfg(
        LITv2,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **args,
    )


@register_model
def litv2_small(pretrained: bool = False, **kwargs: Any) -> LITv2:
    """LITv2-S (28M params, 3.7 GMACs at 224)."""
    return _create("litv2_small", pretrained, **kwargs)


@register_model
def litv2_medium(pretrained: bool = False, **kwargs: Any) -> LITv2:
    """LITv2-M (49M)."""
    return _create("litv2_medium", pretrained, **kwargs)


@register_model
def litv2_base(pretrained: bool = False, **kwargs: Any) -> LITv2:
    """LITv2-B (87M)."""
    return _create("litv2_base", pretrained, **kwargs)


@register_model
def litv2_base_384(pretrained: bool = False, **kwargs: Any) -> LITv2:
    """LITv2-B fine-tuned at 384 px."""
    return _create("litv2_base_384", pretrained, **kwargs)


@register_model
def test_litv2(pretrained: bool = False, **kwargs: Any) -> LITv2:
    """Tiny LITv2 for tests (ConvFFN, HiLo window 2 and window 1 stages)."""
    return _create("test_litv2", pretrained, **kwargs)

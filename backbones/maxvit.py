"""MaxViT on visionattn's kernel layer, weight-compatible with timm's TF-ported MaxViT.

Paper: `MaxViT: Multi-Axis Vision Transformer` - https://arxiv.org/abs/2204.01697
(Tu, Talebi, Zhang, Yang, Milanfar, Bovik, Li; ECCV 2022).

timm already ships these models (``timm.models.maxxvit``, ``maxvit_*_tf_*``, weights ported from
the official TensorFlow release). The models here use the same parameter names and shapes, so
timm's Hub weights load through a cheap key filter, but both attention axes run on
``visionattn.kernels.na2d`` instead of partition copies + dense attention:

* block (window) attention = ``na2d(kernel_size=window, stride=window)``: every query attends
  to the non-overlapping ``window x window`` tile it lies in;
* grid attention = ``na2d(kernel_size=grid, dilation=H // grid)``: every query attends to the
  ``grid x grid`` tokens spaced ``H // grid`` apart that share its offset, which is exactly
  MaxViT's grid partition.

The relative position bias table ``[heads, 2p-1, 2p-1]`` (``RelPosBiasTf`` in timm) is handed
to the kernel as ``rpb``, indexed by ``key - query + p - 1`` in partition coordinates, the same
index timm's one-hot einsum lookup produces; no ``[heads, p^2, p^2]`` bias is materialised.

Inputs whose feature maps are not multiples of the partition size (timm rejects them) are
zero-padded after ``norm1`` to the next multiple, the padded tokens take part in attention as
Swin's downstream code does, and the output is cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    BatchNormAct2d,
    ClassifierHead,
    Conv2dSame,
    DropPath,
    LayerScale,
    Mlp,
    NormMlpClassifierHead,
    create_attn,
    create_conv2d,
    create_pool2d,
    get_act_layer,
    get_norm_act_layer,
    get_norm_layer,
    make_divisible,
    resize_rel_pos_bias_table,
    to_2tuple,
    trunc_normal_tf_,
)
from timm.layers.conv2d_same import conv2d_same
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    register_model,
)
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq, named_apply
from torch import nn

from visionattn.backbones._convert import build_converted, head_classes
from visionattn.backbones._layers import (
    AutocastLayerNorm,
    clear_memos,
    fold_bn,
    fold_enabled,
    module_memo,
    tensors_key,
)
from visionattn.backbones._layers import inplace_act as _act
from visionattn.backbones._layers import linear_tokens as _linear
from visionattn.kernels import na2d
from visionattn.kernels._common import NAParams, window_tables

# timm model-name prefixes visionattn.convert.from_timm routes here
TIMM_PREFIXES = ("maxvit_",)

__all__ = [
    "FAMILIES",
    "MaxVit",
    "MaxVitCfg",
    "MaxVitConvCfg",
    "MaxVitTransformerCfg",
    "checkpoint_filter_fn",
    "from_timm",
]

FAMILIES = ("maxvit",)


class _Mlp(Mlp):
    """timm's ``Mlp`` (same parameters) with :func:`_linear` / :func:`_act`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(_act(self.act, _linear(x, self.fc1)))
        return self.drop2(_linear(self.norm(x), self.fc2))


# --------------------------------------------------------------------------------------------
# Config (field names follow timm's MaxxVit*Cfg so the same `transformer_*` / `conv_*` keyword
# overrides build the same network in both libraries)
# --------------------------------------------------------------------------------------------


@dataclass
class MaxVitTransformerCfg:
    """Partition-attention block settings."""

    dim_head: int = 32
    head_first: bool = True  # qkv channels [heads, 3, dim_head] (True) or [3, heads, dim_head]
    expand_ratio: float = 4.0
    attn_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    partition_ratio: int = 32
    window_size: tuple[int, int] | None = None
    grid_size: tuple[int, int] | None = None
    init_values: float | None = None
    act_layer: str = "gelu"
    norm_layer: str = "layernorm2d"
    norm_layer_cl: str = "layernorm"
    norm_eps: float = 1e-6
    rel_pos_type: str = "bias_tf"

    def __post_init__(self) -> None:
        if self.rel_pos_type != "bias_tf":
            raise ValueError(
                f"transformer_cfg.rel_pos_type: only 'bias_tf' is supported, got {self.rel_pos_type!r}"
            )
        if self.attn_drop:
            raise ValueError("transformer_cfg.attn_drop: the fused kernel has no attention dropout")
        if self.grid_size is not None:
            self.grid_size = to_2tuple(self.grid_size)
        if self.window_size is not None:
            self.window_size = to_2tuple(self.window_size)
            if self.grid_size is None:
                self.grid_size = self.window_size


@dataclass
class MaxVitConvCfg:
    """MBConv block settings (TF MaxViT flavour: expansion from the output width, dw stride)."""

    expand_ratio: float = 4.0
    kernel_size: int = 3
    group_size: int = 1  # 1 == depthwise
    pre_norm_act: bool = False
    output_bias: bool = True
    pool_type: str = "avg2"
    padding: str = ""
    attn_layer: str = "se"
    attn_act_layer: str = "silu"
    attn_ratio: float = 0.25
    act_layer: str = "gelu"
    norm_layer: str = "batchnorm2d"
    norm_eps: float = 1e-5


@dataclass
class MaxVitCfg:
    """Whole-network settings."""

    embed_dim: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (2, 3, 5, 2)
    stem_width: int | tuple[int, int] = 64
    stem_bias: bool = False
    conv_cfg: MaxVitConvCfg = field(default_factory=MaxVitConvCfg)
    transformer_cfg: MaxVitTransformerCfg = field(default_factory=MaxVitTransformerCfg)
    head_hidden_size: int | None = None


def _tf_cfg(
    embed_dim: tuple[int, ...], depths: tuple[int, ...], stem_width: int, head_hidden_size: int
) -> MaxVitCfg:
    """The configuration of timm's TF-ported ``maxvit_*_tf`` models."""
    return MaxVitCfg(
        embed_dim=embed_dim,
        depths=depths,
        stem_width=stem_width,
        stem_bias=True,
        head_hidden_size=head_hidden_size,
        conv_cfg=MaxVitConvCfg(norm_eps=1e-3, act_layer="gelu_tanh", padding="same"),
        transformer_cfg=MaxVitTransformerCfg(
            norm_eps=1e-5, act_layer="gelu_tanh", head_first=False, rel_pos_type="bias_tf"
        ),
    )


model_cfgs: dict[str, MaxVitCfg] = dict(
    maxvit_tiny_tf=_tf_cfg((64, 128, 256, 512), (2, 2, 5, 2), 64, 512),
    maxvit_small_tf=_tf_cfg((96, 192, 384, 768), (2, 2, 5, 2), 64, 768),
    maxvit_base_tf=_tf_cfg((96, 192, 384, 768), (2, 6, 14, 2), 64, 768),
    maxvit_large_tf=_tf_cfg((128, 256, 512, 1024), (2, 6, 14, 2), 128, 1024),
    maxvit_xlarge_tf=_tf_cfg((192, 384, 768, 1536), (2, 6, 14, 2), 192, 1536),
    # tiny test network: TF flavour at a few hundred k parameters
    test_va_maxvit=_tf_cfg((16, 24, 32, 48), (1, 1, 1, 1), 16, 48),
)
model_cfgs["test_va_maxvit"].transformer_cfg.dim_head = 8


def _overlay_kwargs(cfg: MaxVitCfg, **kwargs: Any) -> MaxVitCfg:
    """Apply ``transformer_*`` / ``conv_*`` / plain keyword overrides, as timm does."""
    t_kw, c_kw, base_kw = {}, {}, {}
    for k, v in kwargs.items():
        if k.startswith("transformer_"):
            t_kw[k[len("transformer_") :]] = v
        elif k.startswith("conv_"):
            c_kw[k[len("conv_") :]] = v
        else:
            base_kw[k] = v
    return replace(
        cfg,
        transformer_cfg=replace(cfg.transformer_cfg, **t_kw),
        conv_cfg=replace(cfg.conv_cfg, **c_kw),
        **base_kw,
    )


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class Downsample2d(nn.Module):
    """2x2 average-pool downsample, then a 1x1 conv when the width changes."""

    def __init__(
        self, dim: int, dim_out: int, pool_type: str = "avg2", padding: str = "", bias: bool = True
    ) -> None:
        super().__init__()
        if pool_type != "avg2":
            raise ValueError(f"pool_type: only 'avg2' is supported, got {pool_type!r}")
        self.pool = create_pool2d("avg", 2, padding=padding or 0)
        self.expand = nn.Conv2d(dim, dim_out, 1, bias=bias) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.pool(x))


class MbConvBlock(nn.Module):
    """Pre-norm inverted bottleneck: BN - 1x1 - BN-act - dw kxk (stride) - BN-act - SE - 1x1."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        cfg: MaxVitConvCfg = MaxVitConvCfg(),
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        norm_act_layer = partial(
            get_norm_act_layer(cfg.norm_layer, cfg.act_layer), eps=cfg.norm_eps
        )
        mid_chs = make_divisible(out_chs * cfg.expand_ratio)
        groups = mid_chs // cfg.group_size if cfg.group_size else 1
        if stride == 2:
            self.shortcut = Downsample2d(
                in_chs, out_chs, pool_type=cfg.pool_type, bias=cfg.output_bias, padding=cfg.padding
            )
        elif stride == 1 and in_chs == out_chs:
            self.shortcut = nn.Identity()
        else:
            raise ValueError("stride: MbConvBlock needs stride 2, or 1 with in_chs == out_chs")
        self.pre_norm = norm_act_layer(in_chs, apply_act=cfg.pre_norm_act)
        self.conv1_1x1 = create_conv2d(in_chs, mid_chs, 1)
        self.norm1 = norm_act_layer(mid_chs)
        self.conv2_kxk = create_conv2d(
            mid_chs, mid_chs, cfg.kernel_size, stride=stride, groups=groups, padding=cfg.padding
        )
        self.norm2 = norm_act_layer(mid_chs)
        self.se = create_attn(
            cfg.attn_layer,
            mid_chs,
            act_layer=cfg.attn_act_layer,
            rd_channels=int(cfg.attn_ratio * out_chs),
        )
        self.conv3_1x1 = create_conv2d(mid_chs, out_chs, 1, bias=cfg.output_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        c1 = self.conv1_1x1
        bns = (self.pre_norm, self.norm1, self.norm2)
        self._can_fold = (
            all(isinstance(n, BatchNormAct2d) and n.affine and n.track_running_stats for n in bns)
            and type(c1) is nn.Conv2d
            and c1.kernel_size == (1, 1) and c1.stride == (1, 1) and c1.padding == (0, 0)
            and c1.groups == 1
            and type(self.conv2_kxk) in (nn.Conv2d, Conv2dSame)
        )  # fmt: skip
        # the pre-norm folds into the 1x1 conv's input side only without an activation
        self._fold_pre = isinstance(self.pre_norm.act, nn.Identity)

    def init_weights(self) -> None:
        named_apply(_init_conv, self)

    def _folded(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(1x1 weight, bias, kxk weight, bias) with pre-norm, norm1 and norm2 folded in."""
        mods = (self.pre_norm, self.conv1_1x1, self.norm1, self.conv2_kxk, self.norm2)
        tensors = [t for m in mods for t in (*m.parameters(False), *m.buffers(False))]
        key = (dtype, self._fold_pre, *tensors_key(*tensors))

        def build() -> tuple[torch.Tensor, ...]:
            c1, pre = self.conv1_1x1, self.pre_norm
            w1, b1 = c1.weight, c1.bias
            if self._fold_pre:
                # conv(x * s + t) = conv_{w * s}(x) + w @ t (exact for a 1x1 conv)
                s0 = pre.weight * torch.rsqrt(pre.running_var + pre.eps)
                shift = w1.flatten(1) @ (pre.bias - pre.running_mean * s0)
                b1 = shift if b1 is None else b1 + shift
                w1 = w1 * s0.view(1, -1, 1, 1)
            w1, b1 = fold_bn(w1, self.norm1, b1)
            w2, b2 = fold_bn(self.conv2_kxk.weight, self.norm2, self.conv2_kxk.bias)
            return tuple(t.to(dtype) for t in (w1, b1, w2, b2))

        return module_memo(self, "_fold_cache", key, build)

    def _apply(self, fn, *args, **kwargs):
        clear_memos(self, recurse=False)
        return super()._apply(fn, *args, **kwargs)

    def _conv12_folded(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = self._folded(x.dtype)
        if not self._fold_pre:
            x = self.pre_norm(x)
        n1, n2, c2 = self.norm1, self.norm2, self.conv2_kxk
        x = n1.act(n1.drop(F.conv2d(x, w1, b1)))
        if type(c2) is Conv2dSame:
            x = conv2d_same(x, w2, b2, c2.stride, c2.padding, c2.dilation, c2.groups)
        else:
            x = F.conv2d(x, w2, b2, c2.stride, c2.padding, c2.dilation, c2.groups)
        return n2.act(n2.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        if self._can_fold and x.device.type == "cpu" and fold_enabled(self):
            # CPU inference: three BatchNorm passes folded into the two convs (on CUDA the
            # folded convs measured slower for HaloNet, so GPUs keep conv + BN)
            x = self._conv12_folded(x)
        else:
            x = self.norm1(self.conv1_1x1(self.pre_norm(x)))
            x = self.norm2(self.conv2_kxk(x))
        if self.se is not None:
            x = self.se(x)
        x = self.conv3_1x1(x)
        return self.drop_path(x) + shortcut


class RelPosBiasTable(nn.Module):
    """Learned relative position bias ``[heads, 2p_h-1, 2p_w-1]`` over a ``p_h x p_w`` partition.

    Entry ``[h, dy + p_h - 1, dx + p_w - 1]`` is added to the logit of a query and a key that
    lie ``(dy, dx) = key - query`` apart in partition coordinates (timm's ``RelPosBiasTf``).
    """

    def __init__(self, window_size: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.window_size = to_2tuple(window_size)
        self.num_heads = num_heads
        shape = (num_heads, 2 * self.window_size[0] - 1, 2 * self.window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.empty(shape))
        nn.init.normal_(self.relative_position_bias_table, std=0.02)


class PartitionAttn(nn.Module):
    """Multi-head self-attention within MaxViT block or grid partitions, on ``na2d``.

    Input and output are channels-last ``[B, H, W, C]`` with ``H, W`` multiples of the
    partition size. ``qkv`` / ``proj`` are the Linear layers of timm's ``AttentionCl``.
    """

    def __init__(
        self,
        dim: int,
        partition_size: tuple[int, int],
        partition_block: bool,
        dim_head: int = 32,
        bias: bool = True,
        head_first: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % dim_head:
            raise ValueError(f"dim_head: {dim_head} must divide the attention width {dim}")
        self.num_heads = dim // dim_head
        self.dim_head = dim_head
        self.head_first = head_first
        self.partition_size = to_2tuple(partition_size)
        self.partition_block = partition_block
        self.qkv = nn.Linear(dim, dim * 3, bias=bias)
        self.rel_pos = RelPosBiasTable(self.partition_size, self.num_heads)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _cpu_bias(
        self, H: int, W: int, stride: tuple[int, int], dilation: tuple[int, int]
    ) -> torch.Tensor:
        """``rpb`` as na2d's ``attn_bias`` ``[1, heads, H, W, ph, pw]`` (same values)."""
        t = self.rel_pos.relative_position_bias_table
        ph, pw = self.partition_size

        def build() -> torch.Tensor:
            p = NAParams((ph, pw), stride, dilation, (False, False), False, 1.0)
            rel = window_tables((H, W), p)[3]  # [N, K] index into the flattened table
            return t.detach().reshape(self.num_heads, -1)[:, rel].view(1, -1, H, W, ph, pw)

        key = (H, W, stride, dilation, *tensors_key(t), t.dtype)
        return module_memo(self, "_bias_cache", key, build)

    def _apply(self, fn, *args, **kwargs):
        clear_memos(self, recurse=False)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = _linear(x, self.qkv)
        # Both channel orders are heads-last views of the fused projection: no copies.
        if self.head_first:
            qkv = qkv.view(B, H, W, self.num_heads, 3, self.dim_head)
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        else:
            q, k, v = qkv.view(B, H, W, 3, self.num_heads, self.dim_head).unbind(3)
        ph, pw = self.partition_size
        rpb = self.rel_pos.relative_position_bias_table
        if self.partition_block:
            stride, dilation = (ph, pw), (1, 1)
        else:
            stride, dilation = (1, 1), (H // ph, W // pw)
        eager = not torch.compiler.is_compiling()
        if eager and x.device.type == "cpu" and not torch.is_grad_enabled():
            # CPU inference: the table gathered into na2d's per-query bias once (cached while
            # the table is unchanged), not on every call
            bias = self._cpu_bias(H, W, stride, dilation)
            x = na2d(q, k, v, (ph, pw), stride, dilation, attn_bias=bias)
        else:
            x = na2d(q, k, v, (ph, pw), stride, dilation, rpb=rpb)
        x = _linear(x.reshape(B, H, W, C), self.proj)
        return self.proj_drop(x)


class PartitionAttention(nn.Module):
    """Pre-norm block/grid attention + MLP on channels-last maps (timm's PartitionAttentionCl)."""

    def __init__(
        self,
        dim: int,
        partition_type: str = "block",
        cfg: MaxVitTransformerCfg = MaxVitTransformerCfg(),
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if partition_type not in ("block", "grid"):
            raise ValueError(f"partition_type: must be 'block' or 'grid', got {partition_type!r}")
        # timm's "layernorm" is nn.LayerNorm with its keys: the fused norm on CUDA instead
        cl_norm = AutocastLayerNorm if cfg.norm_layer_cl == "layernorm" else None
        norm_layer = partial(cl_norm or get_norm_layer(cfg.norm_layer_cl), eps=cfg.norm_eps)
        act_layer = get_act_layer(cfg.act_layer)
        self.partition_block = partition_type == "block"
        self.partition_size = to_2tuple(cfg.window_size if self.partition_block else cfg.grid_size)
        self.norm1 = norm_layer(dim)
        self.attn = PartitionAttn(
            dim,
            self.partition_size,
            self.partition_block,
            dim_head=cfg.dim_head,
            bias=cfg.attn_bias,
            head_first=cfg.head_first,
            proj_drop=cfg.proj_drop,
        )
        self.ls1 = (
            LayerScale(dim, init_values=cfg.init_values) if cfg.init_values else nn.Identity()
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = _Mlp(dim, int(dim * cfg.expand_ratio), act_layer=act_layer, drop=cfg.proj_drop)
        self.ls2 = (
            LayerScale(dim, init_values=cfg.init_values) if cfg.init_values else nn.Identity()
        )
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _partition_attn(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1], x.shape[2]
        pad_h = (self.partition_size[0] - H % self.partition_size[0]) % self.partition_size[0]
        pad_w = (self.partition_size[1] - W % self.partition_size[1]) % self.partition_size[1]
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        x = self.attn(x)
        if pad_h or pad_w:
            x = x[:, :H, :W].contiguous()
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self._partition_attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class MaxVitBlock(nn.Module):
    """MBConv, then block attention + MLP, then grid attention + MLP."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        stride: int = 1,
        conv_cfg: MaxVitConvCfg = MaxVitConvCfg(),
        transformer_cfg: MaxVitTransformerCfg = MaxVitTransformerCfg(),
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv = MbConvBlock(dim, dim_out, stride=stride, cfg=conv_cfg, drop_path=drop_path)
        self.attn_block = PartitionAttention(dim_out, "block", transformer_cfg, drop_path)
        self.attn_grid = PartitionAttention(dim_out, "grid", transformer_cfg, drop_path)

    def init_weights(self) -> None:
        named_apply(_init_transformer, self.attn_block)
        named_apply(_init_transformer, self.attn_grid)
        named_apply(_init_conv, self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        # In channels_last memory format this permute is a free view.
        x = x.permute(0, 2, 3, 1)
        x = self.attn_grid(self.attn_block(x))
        return x.permute(0, 3, 1, 2)


class MaxVitStage(nn.Module):
    """A stage of MaxViT blocks, the first one striding by 2."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        conv_cfg: MaxVitConvCfg,
        transformer_cfg: MaxVitTransformerCfg,
        drop_path: list[float],
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(
            *[
                MaxVitBlock(
                    in_chs if i == 0 else out_chs,
                    out_chs,
                    stride=2 if i == 0 else 1,
                    conv_cfg=conv_cfg,
                    transformer_cfg=transformer_cfg,
                    drop_path=drop_path[i],
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class Stem(nn.Module):
    """3x3 stride-2 conv, BN-act, 3x3 conv."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int | tuple[int, int],
        padding: str = "",
        bias: bool = False,
        act_layer: str = "gelu",
        norm_layer: str = "batchnorm2d",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        out_chs = to_2tuple(out_chs) if isinstance(out_chs, int) else tuple(out_chs)
        norm_act_layer = partial(get_norm_act_layer(norm_layer, act_layer), eps=norm_eps)
        self.out_chs = out_chs[-1]
        self.stride = 2
        self.conv1 = create_conv2d(in_chs, out_chs[0], 3, stride=2, padding=padding, bias=bias)
        self.norm1 = norm_act_layer(out_chs[0])
        self.conv2 = create_conv2d(out_chs[0], out_chs[1], 3, stride=1, padding=padding, bias=bias)

    def init_weights(self) -> None:
        named_apply(_init_conv, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


def _init_transformer(module: nn.Module, name: str) -> None:
    # timm's default "vit_eff" scheme for MaxViT, so from-scratch training behaves the same.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            if "mlp" in name:
                nn.init.normal_(module.bias, std=1e-6)
            else:
                nn.init.zeros_(module.bias)


def _init_conv(module: nn.Module, name: str) -> None:
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        fan_out //= module.groups
        nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class MaxVit(nn.Module):
    """MaxViT with block and grid attention on ``visionattn.kernels.na2d``.

    Args:
        cfg: network configuration (see ``model_cfgs``).
        img_size: input size the partition size is derived from (``img_size // partition_ratio``
            unless ``transformer_window_size`` is given); other input sizes work too, feature
            maps are padded to partition multiples inside the attention blocks.
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate: as in timm.
        device, dtype: where and how to create the parameters (``"meta"`` builds no storage).
        **kwargs: ``transformer_*`` / ``conv_*`` / top-level config overrides, as in timm.
    """

    def __init__(
        self,
        cfg: MaxVitCfg,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        with torch.device(device if device is not None else torch.get_default_device()):
            self._build(
                cfg,
                img_size,
                in_chans,
                num_classes,
                global_pool,
                drop_rate,
                drop_path_rate,
                **kwargs,
            )
        if dtype is not None:
            self.to(dtype)

    def _build(
        self,
        cfg: MaxVitCfg,
        img_size: int | tuple[int, int],
        in_chans: int,
        num_classes: int,
        global_pool: str,
        drop_rate: float,
        drop_path_rate: float,
        **kwargs: Any,
    ) -> None:
        img_size = to_2tuple(img_size)
        if kwargs:
            cfg = _overlay_kwargs(cfg, **kwargs)
        tcfg = cfg.transformer_cfg
        if tcfg.window_size is None:
            ps = (img_size[0] // tcfg.partition_ratio, img_size[1] // tcfg.partition_ratio)
            if min(ps) < 1:
                raise ValueError(
                    f"img_size: {img_size} is smaller than partition_ratio {tcfg.partition_ratio}"
                )
            tcfg = replace(tcfg, window_size=ps, grid_size=ps)
        if len(cfg.depths) != len(cfg.embed_dim):
            raise ValueError("depths: needs one entry per embed_dim entry")
        self.img_size = img_size
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.embed_dim = cfg.embed_dim[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.feature_info: list[dict[str, Any]] = []

        self.stem = Stem(
            in_chans,
            cfg.stem_width,
            padding=cfg.conv_cfg.padding,
            bias=cfg.stem_bias,
            act_layer=cfg.conv_cfg.act_layer,
            norm_layer=cfg.conv_cfg.norm_layer,
            norm_eps=cfg.conv_cfg.norm_eps,
        )
        stride = self.stem.stride
        self.feature_info += [dict(num_chs=self.stem.out_chs, reduction=2, module="stem")]
        dpr = [
            x.tolist()
            for x in torch.linspace(0, drop_path_rate, sum(cfg.depths), device="cpu").split(
                list(cfg.depths)
            )
        ]
        in_chs = self.stem.out_chs
        stages = []
        for i, (dim, depth) in enumerate(zip(cfg.embed_dim, cfg.depths)):
            stages.append(MaxVitStage(in_chs, dim, depth, cfg.conv_cfg, tcfg, dpr[i]))
            stride *= 2
            in_chs = dim
            self.feature_info += [dict(num_chs=dim, reduction=stride, module=f"stages.{i}")]
        self.stages = nn.Sequential(*stages)

        final_norm = partial(get_norm_layer(tcfg.norm_layer), eps=tcfg.norm_eps)
        if cfg.head_hidden_size:
            self.norm = nn.Identity()
            self.head = NormMlpClassifierHead(
                self.num_features,
                num_classes,
                hidden_size=cfg.head_hidden_size,
                pool_type=global_pool,
                drop_rate=drop_rate,
                norm_layer=final_norm,
            )
        else:
            self.norm = final_norm(self.num_features)
            self.head = ClassifierHead(
                self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate
            )
        self.head_hidden_size = self.head.num_features

        for m in self.modules():
            if hasattr(m, "init_weights"):
                m.init_weights()
        if isinstance(self.head, NormMlpClassifierHead):
            trunc_normal_tf_(self.head.pre_logits.fc.weight, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {k for k, _ in self.named_parameters() if "relative_position_bias_table" in k}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^stem", blocks=[(r"^stages\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        if global_pool is not None:
            self.global_pool = global_pool

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last makes the NCHW <-> NHWC switches around the attention blocks free views
        # and is cuDNN's fast layout for the MBConv convolutions on GPU.
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stem(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Features of the stem (index 0) and each stage (1..4), NCHW.

        Args:
            x: input images ``[B, C, H, W]``.
            indices: last n taps if int, all if None, else the listed tap indices.
            norm: apply the final norm to the last stage's tap (when the model has one).
            stop_early: stop after the last requested tap.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the taps.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt: only 'NCHW' is supported, got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        x = self._stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        last_idx = len(self.stages)
        stages = self.stages if not stop_early else self.stages[:max_index]
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if len(stages) == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and head) past the last tap in ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        self.stages = self.stages[:max_index]
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.head = ClassifierHead(self.feature_info[max_index]["num_chs"], 0, pool_type="")
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self._stem(x))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# Checkpoints and conversion
# --------------------------------------------------------------------------------------------


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: MaxVit
) -> dict[str, torch.Tensor]:
    """Map a timm ``maxvit_*_tf_*`` state dict onto ``model``.

    The parameter names are timm's, so this only unwraps a ``model``/``state_dict`` wrapper,
    drops entries the model has no slot for (timm's non-persistent lookup buffers, if a
    checkpoint saved them) and resizes relative-position tables to the model's partition size
    (a 224 checkpoint into a 384 model), as timm's own filter does.
    """
    for key in ("state_dict", "model"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k not in own:
            continue
        if k.endswith("relative_position_bias_table") and v.shape != own[k].shape:
            m = model.get_submodule(k.rsplit(".", 1)[0])
            v = resize_rel_pos_bias_table(
                v, new_window_size=m.window_size, new_bias_shape=own[k].shape
            )
        out[k] = v
    return out


def _create_maxvit(
    variant: str, cfg_variant: str, pretrained: bool = False, **kwargs: Any
) -> MaxVit:
    # The partition size follows img_size (img_size // 32), so each variant builds at its
    # pretrained input size unless told otherwise (timm gets this from fixed_input_size).
    kwargs.setdefault("img_size", tuple(get_pretrained_cfg(variant).input_size[-2:]))
    return build_model_with_cfg(
        MaxVit,
        variant,
        pretrained,
        model_cfg=model_cfgs[cfg_variant],
        feature_cfg=dict(flatten_sequential=True),
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


_TIMM_NAMES = tuple(
    f"maxvit_{size}_tf_{res}"
    for size in ("tiny", "small", "base", "large", "xlarge")
    for res in (224, 384, 512)
)


def from_timm(
    timm_model_name: str, state_dict: Mapping[str, torch.Tensor], **kwargs: Any
) -> MaxVit:
    """Build ``va_<timm_model_name>`` and load a timm state dict into it (strict).

    Args:
        timm_model_name: one of timm's ``maxvit_{tiny,small,base,large,xlarge}_tf_{224,384,512}``
            (a ``.tag`` suffix is ignored).
        state_dict: the timm model's state dict.
        **kwargs: extra model arguments, the same overrides the timm model was built with
            (``embed_dim=...``, ``transformer_dim_head=...``, ``img_size=...``).

    Returns:
        Our model in eval mode. ``num_classes`` follows the checkpoint's classifier.
    """
    base = timm_model_name.split(".", 1)[0]
    if base not in _TIMM_NAMES:
        raise ValueError(
            f"timm_model_name: {timm_model_name!r} is not a TF-ported MaxViT; supported: "
            f"{', '.join(_TIMM_NAMES)}"
        )
    kwargs.setdefault("num_classes", head_classes(state_dict, "head.fc.weight"))
    return build_converted(f"va_{base}", kwargs, lambda m: checkpoint_filter_fn(state_dict, m))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.95,
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "fixed_input_size": False,
        "license": "apache-2.0",
        **kwargs,
    }


def _tf(timm_name: str, res: int, **kwargs: Any) -> dict[str, Any]:
    """Pretrained cfg of ``va_<timm_name>`` pointing at timm's Hub weights."""
    size = dict(input_size=(3, res, res), pool_size=(res // 32, res // 32))
    if res == 224:
        extra = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        if "in21k" in timm_name and "ft" not in timm_name:
            extra = dict(num_classes=21843)
    else:
        extra = dict(crop_pct=1.0, crop_mode="squash")
    return _cfg(hf_hub_id=f"timm/{timm_name}", **size, **extra, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        f"va_{name}": _tf(name, int(name.split(".")[0].rsplit("_", 1)[1]))
        for name in (
            "maxvit_tiny_tf_224.in1k",
            "maxvit_tiny_tf_384.in1k",
            "maxvit_tiny_tf_512.in1k",
            "maxvit_small_tf_224.in1k",
            "maxvit_small_tf_384.in1k",
            "maxvit_small_tf_512.in1k",
            "maxvit_base_tf_224.in1k",
            "maxvit_base_tf_384.in1k",
            "maxvit_base_tf_512.in1k",
            "maxvit_large_tf_224.in1k",
            "maxvit_large_tf_384.in1k",
            "maxvit_large_tf_512.in1k",
            "maxvit_base_tf_224.in21k",
            "maxvit_base_tf_384.in21k_ft_in1k",
            "maxvit_base_tf_512.in21k_ft_in1k",
            "maxvit_large_tf_224.in21k",
            "maxvit_large_tf_384.in21k_ft_in1k",
            "maxvit_large_tf_512.in21k_ft_in1k",
            "maxvit_xlarge_tf_224.in21k",
            "maxvit_xlarge_tf_384.in21k_ft_in1k",
            "maxvit_xlarge_tf_512.in21k_ft_in1k",
        )
    }
    | {"test_va_maxvit.untrained": _cfg(input_size=(3, 96, 96), pool_size=(3, 3))}
)


@register_model
def va_maxvit_tiny_tf_224(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Tiny 224px (TF port), timm weights ``timm/maxvit_tiny_tf_224``."""
    return _create_maxvit(
        "va_maxvit_tiny_tf_224", "maxvit_tiny_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_tiny_tf_384(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Tiny 384px (TF port), timm weights ``timm/maxvit_tiny_tf_384``."""
    return _create_maxvit(
        "va_maxvit_tiny_tf_384", "maxvit_tiny_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_tiny_tf_512(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Tiny 512px (TF port), timm weights ``timm/maxvit_tiny_tf_512``."""
    return _create_maxvit(
        "va_maxvit_tiny_tf_512", "maxvit_tiny_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_small_tf_224(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Small 224px (TF port), timm weights ``timm/maxvit_small_tf_224``."""
    return _create_maxvit(
        "va_maxvit_small_tf_224", "maxvit_small_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_small_tf_384(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Small 384px (TF port), timm weights ``timm/maxvit_small_tf_384``."""
    return _create_maxvit(
        "va_maxvit_small_tf_384", "maxvit_small_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_small_tf_512(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Small 512px (TF port), timm weights ``timm/maxvit_small_tf_512``."""
    return _create_maxvit(
        "va_maxvit_small_tf_512", "maxvit_small_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_base_tf_224(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Base 224px (TF port), timm weights ``timm/maxvit_base_tf_224``."""
    return _create_maxvit(
        "va_maxvit_base_tf_224", "maxvit_base_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_base_tf_384(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Base 384px (TF port), timm weights ``timm/maxvit_base_tf_384``."""
    return _create_maxvit(
        "va_maxvit_base_tf_384", "maxvit_base_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_base_tf_512(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Base 512px (TF port), timm weights ``timm/maxvit_base_tf_512``."""
    return _create_maxvit(
        "va_maxvit_base_tf_512", "maxvit_base_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_large_tf_224(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Large 224px (TF port), timm weights ``timm/maxvit_large_tf_224``."""
    return _create_maxvit(
        "va_maxvit_large_tf_224", "maxvit_large_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_large_tf_384(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Large 384px (TF port), timm weights ``timm/maxvit_large_tf_384``."""
    return _create_maxvit(
        "va_maxvit_large_tf_384", "maxvit_large_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_large_tf_512(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Large 512px (TF port), timm weights ``timm/maxvit_large_tf_512``."""
    return _create_maxvit(
        "va_maxvit_large_tf_512", "maxvit_large_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_xlarge_tf_224(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Xlarge 224px (TF port), timm weights ``timm/maxvit_xlarge_tf_224``."""
    return _create_maxvit(
        "va_maxvit_xlarge_tf_224", "maxvit_xlarge_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_xlarge_tf_384(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Xlarge 384px (TF port), timm weights ``timm/maxvit_xlarge_tf_384``."""
    return _create_maxvit(
        "va_maxvit_xlarge_tf_384", "maxvit_xlarge_tf", pretrained=pretrained, **kwargs
    )


@register_model
def va_maxvit_xlarge_tf_512(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """MaxViT-Xlarge 512px (TF port), timm weights ``timm/maxvit_xlarge_tf_512``."""
    return _create_maxvit(
        "va_maxvit_xlarge_tf_512", "maxvit_xlarge_tf", pretrained=pretrained, **kwargs
    )


@register_model
def test_va_maxvit(pretrained: bool = False, **kwargs: Any) -> MaxVit:
    """Tiny TF-flavour MaxViT for fast tests (random weights)."""
    return _create_maxvit("test_va_maxvit", "test_va_maxvit", pretrained=pretrained, **kwargs)

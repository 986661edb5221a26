"""EfficientViT (MSRA): cascaded group attention on the visionattn kernel layer.

Paper: `EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention`
- https://arxiv.org/abs/2305.07027 (Liu et al., CVPR 2023).

The model computes what timm's ``efficientvit_m*`` models compute, with the same parameter
names, so timm's weights load unchanged (official microsoft/Cream keys are mapped by
``checkpoint_filter_fn``). The differences are in how it runs:

* activations stay ``[B, H, W, C]`` (channels-last) inside every stage; 1x1 conv + BN pairs
  are GEMMs, spatial/depthwise convs read the same memory through channels-last NCHW views;
* each head's window attention is one fused :func:`visionattn.kernels.na2d` call on the whole
  (padded) map with ``kernel_size = stride = window``; the learned bias over absolute offsets
  ``(|dy|, |dx|)`` is gathered into the symmetric relative-position table the kernel takes.
  No window partition of the features is needed: only each head's query goes through a
  per-window depthwise conv (zero padding at window borders, as the original computes it);
* in eval mode without autograd, conv + BN pairs run as one conv with folded weights (and
  the residual of a depthwise conv folds into its centre tap); the folded weights are cached
  and recomputed whenever a parameter or BN statistic changes (in-place updates included).

Stage outputs are NCHW tensors in channels-last memory, so ``features_only`` and
``forward_intermediates`` return what timm returns. The cascade (head ``i`` reads head
``i - 1``'s output) is inherently sequential, so heads run one after the other.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    SelectAdaptivePool2d,
    SqueezeExcite,
    resize_rel_pos_bias_table_levit,
    to_2tuple,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionattn.backbones._convert import build_converted, head_classes, registered_variant
from visionattn.backbones._layers import (
    autocast_dtype,
    clear_memos,
    fold_bn,
    fold_enabled,
    module_memo,
    pointwise,
    tensors_key,
)
from visionattn.kernels import na2d

# official family names visionattn.convert.from_official routes here
OFFICIAL_FAMILIES = ("efficientvit",)
# timm model-name prefixes visionattn.convert.from_timm routes here
TIMM_PREFIXES = ("efficientvit_m",)

__all__ = [
    "FAMILIES",
    "EfficientVitMsra",
    "checkpoint_filter_fn",
    "from_official",
    "from_timm",
]

FAMILIES = ("efficientvit",)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class ConvNorm(nn.Module):
    """Conv (no bias) + BatchNorm on ``[B, H, W, C]`` activations (timm's ``ConvNorm`` keys)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        ks: int = 1,
        stride: int = 1,
        pad: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, ks, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        self.pointwise = ks == 1 and stride == 1 and pad == 0 and groups == 1
        # x + conv(x) folds into the weights for same-shape depthwise/pointwise convs
        self.can_fold_identity = (
            in_chs == out_chs and stride == 1 and ks % 2 == 1 and pad == ks // 2
            and groups in (1, in_chs)
        )  # fmt: skip

    def _apply_conv(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, nchw_in: bool = False
    ) -> torch.Tensor:
        if self.pointwise and not nchw_in:
            # any leading dims; w is [out, in] (folded) or the conv's [out, in, 1, 1]
            return pointwise(x, w, b)
        c = self.conv
        if nchw_in:
            # a channels-last weight makes the conv write channels-last output straight from
            # the NCHW image, with no channels-last copy of the (fp32) input
            w = w.contiguous(memory_format=torch.channels_last)
        else:
            x = _nchw(x)
        return _nhwc(F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups))

    def _folded_params(
        self, dtype: torch.dtype, identity: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = (
            self.conv.weight,
            self.bn.weight,
            self.bn.bias,
            self.bn.running_mean,
            self.bn.running_var,
        )
        key = (dtype, identity, *tensors_key(*tensors))
        return module_memo(self, "_fold_cache", key, lambda: self._fold(dtype, identity))

    def _fold(self, dtype: torch.dtype, identity: bool) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = fold_bn(self.conv.weight, self.bn)
        if identity:
            w = w.clone()
            centre = w.shape[-1] // 2
            if self.conv.groups == 1:
                idx = torch.arange(w.shape[0], device=w.device)
                w[idx, idx, centre, centre] += 1.0
            else:
                w[:, 0, centre, centre] += 1.0
        if self.pointwise:
            w = w.flatten(1)
        else:
            w = w.contiguous(memory_format=torch.channels_last)
        return w.to(dtype), b.to(dtype)

    def _batch_norm(self, y: torch.Tensor) -> torch.Tensor:
        """BatchNorm2d semantics on channels-last ``[..., C]``, as one flat ``[M, C]`` call."""
        bn = self.bn
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        use_batch_stats = bn.training or bn.running_mean is None
        out = F.batch_norm(
            y.reshape(-1, y.shape[-1]),
            bn.running_mean if not bn.training or bn.track_running_stats else None,
            bn.running_var if not bn.training or bn.track_running_stats else None,
            bn.weight,
            bn.bias,
            use_batch_stats,
            momentum,
            bn.eps,
        )
        return out.view(y.shape)

    def forward(
        self, x: torch.Tensor, identity: bool = False, nchw_in: bool = False
    ) -> torch.Tensor:
        """``x``: ``[B, H, W, C_in]`` -> ``[B, H', W', C_out]``; ``identity`` adds ``x``.

        Pointwise convs accept any leading dims; ``nchw_in`` takes an NCHW ``x`` (the image).
        """
        if nchw_in and identity:
            raise ValueError("identity: not supported with nchw_in")
        if fold_enabled(self):
            w, b = self._folded_params(autocast_dtype(x), identity and self.can_fold_identity)
            y = self._apply_conv(x, w, b, nchw_in)
            if identity and not self.can_fold_identity:
                y = x + y
            return y
        y = self._batch_norm(self._apply_conv(x, self.conv.weight, None, nchw_in))
        return x + y if identity else y

    def _apply(self, fn, *args, **kwargs):
        clear_memos(self, recurse=False)
        return super()._apply(fn, *args, **kwargs)


class ResidualDrop(nn.Module):
    """``x + m(x)`` (timm's ``ResidualDrop`` keys; its drop rate is always 0 in EfficientViT)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.m, ConvNorm):
            return self.m(x, identity=True)
        return x + self.m(x)


class ConvMlp(nn.Module):
    """Pointwise FFN: ConvNorm -> ReLU -> ConvNorm."""

    def __init__(self, ed: int, h: int) -> None:
        super().__init__()
        self.pw1 = ConvNorm(ed, h)
        self.act = nn.ReLU()
        self.pw2 = ConvNorm(h, ed, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))


class PatchMerging(nn.Module):
    """Inverted-residual stride-2 downsample with squeeze-excite, on ``[B, H, W, C]``."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        hid_dim = int(dim * 4)
        self.conv1 = ConvNorm(dim, hid_dim, 1, 1, 0)
        self.act = nn.ReLU()
        self.conv2 = ConvNorm(hid_dim, hid_dim, 3, 2, 1, groups=hid_dim)
        self.se = SqueezeExcite(hid_dim, 0.25)
        self.conv3 = ConvNorm(hid_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv2(self.act(self.conv1(x))))
        x = _nhwc(self.se(_nchw(x)))
        return self.conv3(x)


def _window_bias_index(h: int, w: int, ws: int) -> torch.Tensor:
    """``[h, w, ws, ws]`` index into a bias over absolute offsets ``|dy| * ws + |dx|``.

    Entry ``[y, x, ky, kx]``: query ``(y, x)`` against the key at window position ``(ky, kx)``
    of its (non-overlapping, ``ws``-aligned) window, i.e. na2d's ``attn_bias`` layout for
    ``kernel_size = stride = ws``.
    """
    ly = torch.arange(h) % ws
    lx = torch.arange(w) % ws
    k = torch.arange(ws)
    dy = (ly[:, None, None, None] - k[None, None, :, None]).abs()
    dx = (lx[None, :, None, None] - k[None, None, None, :]).abs()
    return dy * ws + dx


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention over non-overlapping ``resolution``-sized windows.

    Head ``i`` projects (its channel chunk + head ``i-1``'s output) to q, k, v; q goes through
    a per-window depthwise conv; attention inside each window adds a learned bias over the
    absolute offset between query and key.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 4,
        resolution: int = 14,
        kernels: Sequence[int] = (5, 5, 5, 5),
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide dim {dim}")
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        if self.val_dim != dim // num_heads:
            raise ValueError(
                f"attn_ratio: value dim {self.val_dim} must equal dim / num_heads = "
                f"{dim // num_heads} for the cascade"
            )
        self.resolution = resolution
        self.qkvs = nn.ModuleList(
            ConvNorm(dim // num_heads, key_dim * 2 + self.val_dim) for _ in range(num_heads)
        )
        self.dws = nn.ModuleList(
            ConvNorm(key_dim, key_dim, kernels[i], 1, kernels[i] // 2, groups=key_dim)
            for i in range(num_heads)
        )
        self.proj = nn.Sequential(
            nn.ReLU(), ConvNorm(self.val_dim * num_heads, dim, bn_weight_init=0.0)
        )
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        # per padded map size: bias index (device) and, in eval, the gathered bias
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def _window_bias(self, h: int, w: int) -> torch.Tensor:
        """na2d ``attn_bias`` ``[1, heads, h, w, ws, ws]`` gathered from the offset bias.

        One differentiable gather per forward serves every head (cached in eval while the
        bias parameter is unchanged), so the kernel gets a plain view per head.
        """
        ab = self.attention_biases
        ikey = (h, w, ab.device)
        idx = self._index_cache.get(ikey)
        if idx is None:
            idx = _window_bias_index(h, w, self.resolution).to(ab.device)
            if not torch.compiler.is_compiling():
                self._index_cache[ikey] = idx
        if not fold_enabled(self):
            return ab[:, idx].unsqueeze(0)
        key = (h, w, *tensors_key(ab), ab.device)
        return module_memo(self, "_bias_cache", key, lambda: ab[:, idx].unsqueeze(0))

    def _apply(self, fn, *args, **kwargs):
        self._index_cache = {}
        clear_memos(self, recurse=False)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, H, W, C]``, ``H`` and ``W`` multiples of the window -> same shape."""
        B, H, W, C = x.shape
        ws = self.resolution
        nh, nw = H // ws, W // ws
        if nh * nw == 1:
            return self._forward_map(x)
        # Every op of the block is pointwise or stays inside a window (the q conv pads at
        # window borders), so the windows move to the batch once, instead of each head's q
        # conv and attention copying them out and back.
        x = x.view(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(B * nh * nw, ws, ws, C)
        y = self._forward_map(x)
        return y.view(B, nh, nw, ws, ws, C).transpose(2, 3).reshape(B, H, W, C)

    def _forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """The block on ``[B, ws, ws, C]`` maps that are one window each."""
        B, H, W, C = x.shape
        ws = self.resolution
        # unbind, not per-head slices: its backward stacks the head gradients in one op, where
        # each slice's backward would write a zero-filled full-size gradient
        biases = self._window_bias(H, W).unbind(1)
        # [B, H, W, heads=1, C]: q/k/v and head outputs are na2d-shaped views, no copies
        feats_in = x.reshape(B, H, W, 1, C).chunk(self.num_heads, dim=-1)
        feats_out = []
        feat = feats_in[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feats_in[i] + feat
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], dim=-1)
            feat = na2d(
                dw(q.reshape(B, H, W, self.key_dim)).view(B, H, W, 1, self.key_dim),
                k,
                v,
                kernel_size=ws,
                stride=ws,
                attn_bias=biases[i].unsqueeze(1),
                scale=self.scale,
            )
            feats_out.append(feat)
        return self.proj(torch.cat(feats_out, dim=-1)).view(B, H, W, C)


class LocalWindowAttention(nn.Module):
    """Pads the map to a multiple of the window, runs cascaded group attention, crops."""

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 4,
        resolution: int = 14,
        window_resolution: int = 7,
        kernels: Sequence[int] = (5, 5, 5, 5),
    ) -> None:
        super().__init__()
        if window_resolution <= 0:
            raise ValueError(f"window_resolution: must be positive, got {window_resolution}")
        self.window_resolution = window_resolution
        self.resolution = resolution
        self.attn = CascadedGroupAttention(
            dim,
            key_dim,
            num_heads,
            attn_ratio=attn_ratio,
            resolution=min(window_resolution, resolution),
            kernels=kernels,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, H, W, C]`` -> same shape."""
        _, H, W, _ = x.shape
        ws = self.attn.resolution
        pad_b, pad_r = (-H) % ws, (-W) % ws
        if pad_b or pad_r:
            # zeros enter the qkv projection, as in timm and the official model
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        x = self.attn(x)
        if pad_b or pad_r:
            x = x[:, :H, :W]
        return x


class EfficientVitBlock(nn.Module):
    """dw conv -> FFN -> window attention -> dw conv -> FFN, each residual."""

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 4,
        resolution: int = 14,
        window_resolution: int = 7,
        kernels: Sequence[int] = (5, 5, 5, 5),
    ) -> None:
        super().__init__()
        self.dw0 = ResidualDrop(ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0))
        self.ffn0 = ResidualDrop(ConvMlp(dim, int(dim * 2)))
        self.mixer = ResidualDrop(
            LocalWindowAttention(
                dim,
                key_dim,
                num_heads,
                attn_ratio=attn_ratio,
                resolution=resolution,
                window_resolution=window_resolution,
                kernels=kernels,
            )
        )
        self.dw1 = ResidualDrop(ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0))
        self.ffn1 = ResidualDrop(ConvMlp(dim, int(dim * 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class EfficientVitStage(nn.Module):
    """Optional subsample (residual dw/FFN, patch merging, residual dw/FFN) + blocks.

    NCHW in and out (channels-last memory); ``[B, H, W, C]`` inside.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        downsample: tuple[str, int] = ("", 1),
        num_heads: int = 8,
        attn_ratio: float = 4,
        resolution: int = 14,
        window_resolution: int = 7,
        kernels: Sequence[int] = (5, 5, 5, 5),
        depth: int = 1,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        if downsample[0] == "subsample":
            self.resolution = (resolution - 1) // downsample[1] + 1
            self.downsample = nn.Sequential(
                OrderedDict(
                    res1=nn.Sequential(
                        ResidualDrop(ConvNorm(in_dim, in_dim, 3, 1, 1, groups=in_dim)),
                        ResidualDrop(ConvMlp(in_dim, int(in_dim * 2))),
                    ),
                    patchmerge=PatchMerging(in_dim, out_dim),
                    res2=nn.Sequential(
                        ResidualDrop(ConvNorm(out_dim, out_dim, 3, 1, 1, groups=out_dim)),
                        ResidualDrop(ConvMlp(out_dim, int(out_dim * 2))),
                    ),
                )
            )
        else:
            if in_dim != out_dim:
                raise ValueError(f"embed_dim: a stage without subsample keeps {in_dim} channels")
            self.resolution = resolution
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[
                EfficientVitBlock(
                    out_dim,
                    key_dim,
                    num_heads,
                    attn_ratio,
                    self.resolution,
                    window_resolution,
                    kernels,
                )
                for _ in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(_nhwc(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return _nchw(x)


class PatchEmbedding(nn.Module):
    """Four 3x3/s2 ConvNorm + ReLU layers (stride 16); NCHW in, NCHW (channels-last) out."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_chans, dim // 8, 3, 2, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = ConvNorm(dim // 8, dim // 4, 3, 2, 1)
        self.relu2 = nn.ReLU()
        self.conv3 = ConvNorm(dim // 4, dim // 2, 3, 2, 1)
        self.relu3 = nn.ReLU()
        self.conv4 = ConvNorm(dim // 2, dim, 3, 2, 1)
        self.patch_size = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x, nchw_in=True))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return _nchw(self.conv4(x))


class NormLinear(nn.Module):
    """BatchNorm1d -> dropout -> linear classifier (timm's ``NormLinear`` keys)."""

    def __init__(self, in_features: int, out_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features)
        trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(x)))


class EfficientVitMsra(nn.Module):
    """EfficientViT (MSRA) with timm's interface and parameter names."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: Sequence[int] = (64, 128, 192),
        key_dim: Sequence[int] = (16, 16, 16),
        depth: Sequence[int] = (1, 2, 3),
        num_heads: Sequence[int] = (4, 4, 4),
        window_size: Sequence[int] = (7, 7, 7),
        kernels: Sequence[int] = (5, 5, 5, 5),
        down_ops: Sequence[tuple[str, int]] = (("", 1), ("subsample", 2), ("subsample", 2)),
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        """
        Args:
            img_size: design input size; its smaller side sets each stage's window
                (``min(window_size, feature resolution)``), as in timm. Any input size runs.
            in_chans: input channels. num_classes: classes (0: no classifier).
            embed_dim, key_dim, depth, num_heads, window_size: per-stage widths, q/k head
                dim, blocks, heads and attention windows.
            kernels: per-head depthwise kernel on the queries.
            down_ops: per-stage ``("subsample", 2)`` or ``("", 1)``.
            global_pool: head pooling type. drop_rate: head dropout.
        """
        super().__init__()
        n = len(embed_dim)
        for name, seq in (
            ("key_dim", key_dim),
            ("depth", depth),
            ("num_heads", num_heads),
            ("window_size", window_size),
            ("down_ops", down_ops),
        ):
            if len(seq) != n:
                raise ValueError(f"{name}: needs one entry per stage ({n}), got {len(seq)}")
        if len(kernels) < max(num_heads):
            raise ValueError(f"kernels: needs one entry per head ({max(num_heads)})")
        self.grad_checkpointing = False
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        self.patch_embed = PatchEmbedding(in_chans, embed_dim[0])
        stride = self.patch_embed.patch_size
        self.img_size = min(to_2tuple(img_size))
        resolution = self.img_size // stride
        attn_ratio = [embed_dim[i] / (key_dim[i] * num_heads[i]) for i in range(n)]

        self.feature_info: list[dict[str, Any]] = []
        stages = []
        pre_ed = embed_dim[0]
        for i in range(n):
            stage = EfficientVitStage(
                in_dim=pre_ed,
                out_dim=embed_dim[i],
                key_dim=key_dim[i],
                downsample=tuple(down_ops[i]),
                num_heads=num_heads[i],
                attn_ratio=attn_ratio[i],
                resolution=resolution,
                window_resolution=window_size[i],
                kernels=kernels,
                depth=depth[i],
            )
            pre_ed = embed_dim[i]
            if down_ops[i][0] == "subsample" and i != 0:
                stride *= down_ops[i][1]
            resolution = stage.resolution
            stages.append(stage)
            self.feature_info.append(
                dict(num_chs=embed_dim[i], reduction=stride, module=f"stages.{i}")
            )
        self.stages = nn.Sequential(*stages)
        self.num_features = embed_dim[-1]
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        if num_classes > 0 and not global_pool:
            raise ValueError("global_pool: a classifier needs pooled features")
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head = (
            NormLinear(self.head_hidden_size, num_classes, drop=drop_rate)
            if num_classes > 0
            else nn.Identity()
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {k for k in self.state_dict() if "attention_biases" in k}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+).downsample", (0,)), (r"^stages\.(\d+)\.\w+\.(\d+)", None)],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.linear if isinstance(self.head, NormLinear) else self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(
                pool_type=global_pool, flatten=bool(global_pool)
            )
        if num_classes > 0 and not self.global_pool.pool_type:
            raise ValueError("global_pool: a classifier needs pooled features")
        self.num_classes = num_classes
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        p = next(self.parameters())
        self.head = (
            NormLinear(self.head_hidden_size, num_classes, drop=self.drop_rate).to(
                device=p.device, dtype=p.dtype
            )
            if num_classes > 0
            else nn.Identity()
        )
        self.head.train(self.training)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (``indices`` as timm: last n if int, all if None) and the final map.

        ``output_fmt``: ``'NCHW'`` or ``'NHWC'``; ``norm`` is accepted for API parity (the
        model has no final norm).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt: must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        intermediates = []
        x = self.patch_embed(x)
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(_nhwc(x) if output_fmt == "NHWC" else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop stages (and the head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, in_chans, H, W]`` -> ``[B, C, ~H/64, ~W/64]`` (channels-last memory)."""
        return self.stages(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------- checkpoint conversion


def _convert_official(
    state_dict: Mapping[str, torch.Tensor], model: EfficientVitMsra
) -> dict[str, torch.Tensor]:
    """microsoft/Cream keys -> ours.

    Official: ``patch_embed.{0,2,4,6}`` (ReLUs between), ``Conv2d_BN`` children ``c``/``bn``,
    head ``BN_Linear`` children ``bn``/``l``, and flat ``blocks{1,2,3}`` where the subsample
    into stage ``s`` (3 modules: residual dw/FFN, patch merging, residual dw/FFN) opens
    ``blocks{s+1}`` before that stage's blocks.
    """
    if any(k.startswith("head_dist.") for k in state_dict):
        raise ValueError(
            "state_dict: distillation checkpoints (head_dist) are not supported; "
            "drop the head_dist entries to load the classifier head only"
        )
    has_down = [not isinstance(s.downsample, nn.Identity) for s in model.stages]
    out = {}
    for k, v in state_dict.items():
        if k.endswith("attention_bias_idxs"):
            continue
        k = re.sub(r"\.c\.(weight)$", r".conv.\1", k)
        k = re.sub(r"^head\.l\.", "head.linear.", k)
        m = re.match(r"^patch_embed\.(\d+)\.(.*)$", k)
        if m:
            k = f"patch_embed.conv{int(m[1]) // 2 + 1}.{m[2]}"
        m = re.match(r"^blocks(\d+)\.(\d+)\.(.*)$", k)
        if m:
            s, j, rest = int(m[1]) - 1, int(m[2]), m[3]
            if has_down[s]:
                if j < 3:
                    k = f"stages.{s}.downsample.{('res1', 'patchmerge', 'res2')[j]}.{rest}"
                else:
                    k = f"stages.{s}.blocks.{j - 3}.{rest}"
            else:
                k = f"stages.{s}.blocks.{j}.{rest}"
        out[k] = v
    return out


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: EfficientVitMsra
) -> dict[str, torch.Tensor]:
    """Map timm or official EfficientViT weights onto ``model`` (bias tables resized if needed)."""
    if "model" in state_dict and not isinstance(state_dict["model"], torch.Tensor):
        state_dict = state_dict["model"]
    if any(k.startswith("blocks1.") for k in state_dict):
        state_dict = _convert_official(state_dict, model)
    target = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k.endswith("attention_bias_idxs"):
            continue
        if k.endswith("attention_biases") and k in target and v.shape != target[k].shape:
            v = resize_rel_pos_bias_table_levit(v.T, target[k].shape[::-1]).T.contiguous()
        out[k] = v
    return out


# ------------------------------------------------------------------------- configs

_TIMM_ARGS: dict[str, dict[str, Any]] = {
    "efficientvit_m0": dict(
        embed_dim=(64, 128, 192), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(5, 5, 5, 5)
    ),
    "efficientvit_m1": dict(
        embed_dim=(128, 144, 192), depth=(1, 2, 3), num_heads=(2, 3, 3), kernels=(7, 5, 3, 3)
    ),
    "efficientvit_m2": dict(
        embed_dim=(128, 192, 224), depth=(1, 2, 3), num_heads=(4, 3, 2), kernels=(7, 5, 3, 3)
    ),
    "efficientvit_m3": dict(
        embed_dim=(128, 240, 320), depth=(1, 2, 3), num_heads=(4, 3, 4), kernels=(5, 5, 5, 5)
    ),
    "efficientvit_m4": dict(
        embed_dim=(128, 256, 384), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(7, 5, 3, 3)
    ),
    "efficientvit_m5": dict(
        embed_dim=(192, 288, 384), depth=(1, 3, 4), num_heads=(3, 3, 4), kernels=(7, 5, 3, 3)
    ),
}

# official variant (model/build.py ``EfficientViT_m*``) -> official constructor kwargs
OFFICIAL_VARIANTS: dict[str, dict[str, Any]] = {
    f"EfficientViT_M{i}": dict(
        img_size=224,
        patch_size=16,
        embed_dim=list(a["embed_dim"]),
        depth=list(a["depth"]),
        num_heads=list(a["num_heads"]),
        window_size=[7, 7, 7],
        kernels=list(a["kernels"]),
    )
    for i, a in enumerate(_TIMM_ARGS.values())
}


def official_to_model_args(official_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Translate the official ``EfficientViT(...)`` keyword arguments into ours.

    The official ``down_ops`` list the subsample *after* each stage; ours list it at the start
    of the next stage, as timm does.
    """
    kw = dict(official_kwargs)
    if kw.pop("patch_size", 16) != 16:
        raise ValueError("official_kwargs: patch_size must be 16")
    if kw.pop("distillation", False):
        raise ValueError("official_kwargs: distillation=True is not supported")
    stages = kw.pop("stages", ["s", "s", "s"])
    if any(s != "s" for s in stages):
        raise ValueError(f"official_kwargs: stages must all be 's', got {stages}")
    down = kw.pop("down_ops", [["subsample", 2], ["subsample", 2], [""]])
    ours_down = [("", 1)] + [
        ("subsample", int(d[1])) if d and d[0] == "subsample" else ("", 1) for d in down[:-1]
    ]
    args: dict[str, Any] = dict(
        img_size=kw.pop("img_size", 224),
        in_chans=kw.pop("in_chans", 3),
        embed_dim=tuple(kw.pop("embed_dim", (64, 128, 192))),
        key_dim=tuple(kw.pop("key_dim", (16, 16, 16))),
        depth=tuple(kw.pop("depth", (1, 2, 3))),
        num_heads=tuple(kw.pop("num_heads", (4, 4, 4))),
        window_size=tuple(kw.pop("window_size", (7, 7, 7))),
        kernels=tuple(kw.pop("kernels", (5, 5, 5, 5))),
        down_ops=tuple(ours_down),
    )
    if "num_classes" in kw:
        args["num_classes"] = kw.pop("num_classes")
    if kw:
        raise ValueError(f"official_kwargs: unsupported EfficientViT arguments {sorted(kw)}")
    return args


def from_timm(timm_model_name: str, state_dict: Mapping[str, torch.Tensor]) -> EfficientVitMsra:
    """Our counterpart of timm's ``efficientvit_m*`` model, with its weights loaded (strict)."""
    base = timm_model_name.split(".", 1)[0]
    if base not in _TIMM_ARGS:
        raise ValueError(f"timm_model_name: {timm_model_name!r} is not one of {sorted(_TIMM_ARGS)}")
    args = {"num_classes": head_classes(state_dict, "head.linear.weight")}
    return build_converted("va_" + base, args, lambda m: checkpoint_filter_fn(state_dict, m))


def from_official(
    state_dict: Mapping[str, torch.Tensor],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "efficientvit",
) -> EfficientVitMsra:
    """Our model from an official microsoft/Cream EfficientViT checkpoint, loaded strictly.

    ``official_kwargs`` are the official constructor's arguments; without them ``variant``
    (``"EfficientViT_M0"`` .. ``"EfficientViT_M5"``, or ``"efficientvit_m0"`` ..) supplies them.
    """
    if family != "efficientvit":
        raise ValueError(f"family: this module converts 'efficientvit', got {family!r}")
    if official_kwargs is None:
        names = {k.lower(): k for k in OFFICIAL_VARIANTS}
        if variant is None or variant.lower() not in names:
            raise ValueError(f"variant: {variant!r} is not one of {sorted(OFFICIAL_VARIANTS)}")
        official_kwargs = OFFICIAL_VARIANTS[names[variant.lower()]]
    args = official_to_model_args(official_kwargs)
    args["num_classes"] = head_classes(state_dict, "head.l.weight")
    name = registered_variant(EfficientVitMsra, _TIMM_ARGS, args)
    return build_converted(name, args, lambda m: checkpoint_filter_fn(state_dict, m))


# --------------------------------------------------------------------- registration


def _cfg(hf_hub_id: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "hf_hub_id": hf_hub_id,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (4, 4),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv1.conv",
        "classifier": "head.linear",
        "license": "mit",
        **kwargs,
    }


# our tags point at timm's Hub weights (same keys)
default_cfgs = generate_default_cfgs(
    {
        **{f"va_{n}.r224_in1k": _cfg(f"timm/{n}.r224_in1k") for n in _TIMM_ARGS},
        "test_va_efficientvit.untrained": _cfg(
            "visionattn/test_va_efficientvit.untrained", input_size=(3, 64, 64), pool_size=(1, 1)
        ),
    }
)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> EfficientVitMsra:
    out_indices = kwargs.pop("out_indices", (0, 1, 2))
    return build_model_with_cfg(
        EfficientVitMsra,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _make(timm_name: str, pretrained: bool, kwargs: dict[str, Any]) -> EfficientVitMsra:
    return _create("va_" + timm_name, pretrained, **dict(_TIMM_ARGS[timm_name], **kwargs))


@register_model
def va_efficientvit_m0(pretrained: bool = False, **kwargs: Any) -> EfficientVitMsra:
    """EfficientViT-M0 (2.3M params)."""
    return _make("efficientvit_m0", pretrained, kwargs)


@register_model
def va_efficientvit_m1(pretrained: bool = False, **kwargs: Any) -> EfficientVitMsra:
    """EfficientViT-M1 (3.0M params)."""
    return _make("efficientvit_m1", pretrained, kwargs)


@register_model
def va_efficientvit_m2(pretrained: bool = False, **kwargs: Any) -> EfficientVitMsra:
    """EfficientViT-M2 (4.2M params)."""
    return _make("efficientvit_m2", pretrained, kwargs)


@register_model
def va_efficientvit_m3(pretrained: bool = False, **kwargs: Any) -> EfficientVitMsra:
    """EfficientViT-M3 (6.9M params)."""
    return _make("efficientvit_m3", pretrained, kwargs)


@register_model
def va_efficientvit_m4(pretrained: bool = False, **kwargs: Any) -> EfficientVitMsra:
    """EfficientViT-M4 (8.8M params)."""
    return _make("efficientvit_m4", pretrained, kwargs)


@register_model
def va_efficientvit_m5(pretrained: bool = False, **kwargs: Any) -> EfficientVitMsra:
    """EfficientViT-M5 (12.4M params)."""
    return _make("efficientvit_m5", pretrained, kwargs)


@register_model
def test_va_efficientvit(pretrained: bool = False, **kwargs: Any) -> EfficientVitMsra:
    """Tiny EfficientViT for fast tests: windows 2, padding and per-window q convs exercised."""
    args = dict(
        img_size=64,
        embed_dim=(16, 24, 32),
        key_dim=(4, 4, 4),
        depth=(1, 1, 1),
        num_heads=(2, 2, 2),
        window_size=(3, 2, 2),
        kernels=(3, 3),
    )
    return _create("test_va_efficientvit", pretrained, **dict(args, **kwargs))

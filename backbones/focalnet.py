"""FocalNet: focal modulation networks, channels-last, weight-compatible with timm and official.

Paper: `Focal Modulation Networks` - https://arxiv.org/abs/2203.11926 (Yang et al., NeurIPS 2022).

The model computes what timm's ``focalnet_*`` models compute, with the same parameter names,
but keeps activations as ``[B, H, W, C]`` inside every stage: the pointwise projections are
``nn.Linear`` (cuBLAS GEMMs, no NCHW<->NHWC transposes), the norms are plain last-dim
``LayerNorm``, and the depthwise focal convolutions run on the same memory through a
channels-last NCHW view. Stage outputs are NCHW tensors in channels-last memory, so
``features_only`` and ``forward_intermediates`` return what timm returns. Focal modulation
needs no attention kernel.

Weights: ``checkpoint_filter_fn`` maps timm's keys (1x1 conv weights reshaped to linear) and
the official repository's keys (microsoft/FocalNet ``classification/focalnet.py``) onto ours;
``from_timm`` and ``from_official`` build the matching model and load them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    LayerScale,
    Mlp,
    SelectAdaptivePool2d,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionattn.backbones._convert import build_converted, head_classes, registered_variant
from visionattn.backbones._layers import AutocastLayerNorm
from visionattn.backbones._layers import inplace_act as _act
from visionattn.backbones._layers import linear_tokens as _linear

# official family names visionattn.convert.from_official routes here
OFFICIAL_FAMILIES = ("focalnet",)
# timm model-name prefixes visionattn.convert.from_timm routes here
TIMM_PREFIXES = ("focalnet_",)

__all__ = [
    "FAMILIES",
    "FocalNet",
    "checkpoint_filter_fn",
    "from_official",
    "from_timm",
]

FAMILIES = ("focalnet",)


class _Mlp(Mlp):
    """timm's ``Mlp`` (same parameters) with :func:`_linear` projections."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(_act(self.act, _linear(x, self.fc1)))
        return self.drop2(_linear(self.norm(x), self.fc2))


class FocalModulation(nn.Module):
    """Focal modulation on ``[B, H, W, C]`` tokens.

    ``f`` projects to query, context and ``L + 1`` gates; ``L`` depthwise conv + GELU levels
    (kernel ``focal_factor * l + focal_window``) aggregate context hierarchically, a global
    average adds level ``L``; the gated sum goes through ``h`` and modulates the query.
    """

    def __init__(
        self,
        dim: int,
        focal_window: int,
        focal_level: int,
        focal_factor: int = 2,
        bias: bool = True,
        use_post_norm: bool = False,
        normalize_modulator: bool = False,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.focal_level = focal_level
        self.normalize_modulator = normalize_modulator
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1, bias=bias)
        self.h = nn.Linear(dim, dim, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.kernel_sizes = [focal_factor * k + focal_window for k in range(focal_level)]
        self.focal_layers = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size=ks, groups=dim, padding=ks // 2, bias=False),
                nn.GELU(),
            )
            for ks in self.kernel_sizes
        )
        self.norm = norm_layer(dim) if use_post_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        C, L = self.dim, self.focal_level
        # one split (its backward is one concat, where three slices would each zero-fill and
        # copy a full-width gradient)
        q, ctx, gates = _linear(x, self.f).split([C, C, L + 1], dim=-1)
        # NCHW views of channels-last memory for the depthwise convs and the gating
        ctx = ctx.permute(0, 3, 1, 2)
        gates = gates.permute(0, 3, 1, 2)
        ctx_all = None
        for level, focal_layer in enumerate(self.focal_layers):
            ctx = _act(focal_layer[1], focal_layer[0](ctx))
            g = gates[:, level : level + 1]
            ctx_all = ctx * g if ctx_all is None else torch.addcmul(ctx_all, ctx, g)
        ctx_global = self.act(ctx.mean((2, 3), keepdim=True))
        ctx_all = torch.addcmul(ctx_all, ctx_global, gates[:, L:])
        if self.normalize_modulator:
            ctx_all = ctx_all / (L + 1)
        modulator = _linear(ctx_all.permute(0, 2, 3, 1), self.h)
        x = self.norm(q * modulator)
        return self.proj_drop(_linear(x, self.proj))


class FocalNetBlock(nn.Module):
    """Pre-norm (or post-norm) focal modulation + MLP block on ``[B, H, W, C]``."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        focal_level: int = 1,
        focal_window: int = 3,
        use_post_norm: bool = False,
        use_post_norm_in_modulation: bool = False,
        normalize_modulator: bool = False,
        layerscale_value: float | None = 1e-4,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = nn.Identity() if use_post_norm else norm_layer(dim)
        self.modulation = FocalModulation(
            dim,
            focal_window=focal_window,
            focal_level=focal_level,
            use_post_norm=use_post_norm_in_modulation,
            normalize_modulator=normalize_modulator,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
        )
        self.norm1_post = norm_layer(dim) if use_post_norm else nn.Identity()
        self.ls1 = LayerScale(dim, layerscale_value) if layerscale_value is not None else None
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.Identity() if use_post_norm else norm_layer(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.norm2_post = norm_layer(dim) if use_post_norm else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale_value) if layerscale_value is not None else None
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @staticmethod
    def _residual(
        shortcut: torch.Tensor, y: torch.Tensor, ls: LayerScale | None, drop_path: nn.Module
    ) -> torch.Tensor:
        if ls is None:
            return shortcut + drop_path(y)
        if isinstance(drop_path, nn.Identity):
            # one kernel for the layer-scaled residual
            return torch.addcmul(shortcut, y, ls.gamma)
        return shortcut + drop_path(ls(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, H, W, C]`` -> same shape."""
        y = self.norm1_post(self.modulation(self.norm1(x)))
        x = self._residual(x, y, self.ls1, self.drop_path1)
        y = self.norm2_post(self.mlp(self.norm2(x)))
        return self._residual(x, y, self.ls2, self.drop_path2)


class Downsample(nn.Module):
    """Strided conv patch embedding + norm; NCHW in, NCHW (channels-last memory) out."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 4,
        overlap: bool = False,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        kernel_size, padding = stride, 0
        if overlap:
            if stride not in (2, 4):
                raise ValueError(f"stride: overlapping downsample needs 2 or 4, got {stride}")
            kernel_size, padding = (7, 2) if stride == 4 else (3, 1)
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding)
        self.norm = norm_layer(out_chs) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a channels-last weight gives channels-last output even from an NCHW image, without
        # a channels-last copy of the (fp32) input
        w = self.proj.weight.contiguous(memory_format=torch.channels_last)
        x = F.conv2d(x, w, self.proj.bias, self.proj.stride, self.proj.padding)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FocalNetStage(nn.Module):
    """Optional stride-2 downsample then ``depth`` blocks; NCHW (channels-last memory) in/out."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        mlp_ratio: float = 4.0,
        downsample: bool = True,
        focal_level: int = 1,
        focal_window: int = 1,
        use_overlap_down: bool = False,
        use_post_norm: bool = False,
        use_post_norm_in_modulation: bool = False,
        normalize_modulator: bool = False,
        layerscale_value: float | None = 1e-4,
        proj_drop: float = 0.0,
        drop_path: float | Sequence[float] = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = (
            Downsample(dim, out_dim, stride=2, overlap=use_overlap_down, norm_layer=norm_layer)
            if downsample
            else None
        )
        dpr = list(drop_path) if isinstance(drop_path, Sequence) else [drop_path] * depth
        self.blocks = nn.ModuleList(
            FocalNetBlock(
                out_dim,
                mlp_ratio=mlp_ratio,
                focal_level=focal_level,
                focal_window=focal_window,
                use_post_norm=use_post_norm,
                use_post_norm_in_modulation=use_post_norm_in_modulation,
                normalize_modulator=normalize_modulator,
                layerscale_value=layerscale_value,
                proj_drop=proj_drop,
                drop_path=dpr[i],
                norm_layer=norm_layer,
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: NCHW -> NCHW (a permuted view of ``[B, H, W, C]`` memory)."""
        if self.downsample is not None:
            x = self.downsample(x)
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x.permute(0, 3, 1, 2)


class FocalHead(nn.Module):
    """Global pool + dropout + linear classifier over NCHW features."""

    def __init__(
        self, in_features: int, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.drop_rate = drop_rate
        self.reset(num_classes, pool_type)

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        """Replace the classifier (``num_classes=0``: identity) and optionally the pooling."""
        dd: dict[str, Any] = {}
        if hasattr(self, "fc") and isinstance(self.fc, nn.Linear):
            dd = {"device": self.fc.weight.device, "dtype": self.fc.weight.dtype}
        if pool_type is not None or not hasattr(self, "global_pool"):
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type or "", flatten=True)
        if num_classes > 0 and not self.global_pool.pool_type:
            raise ValueError("global_pool: a classifier needs pooled features, got ''")
        self.num_features = self.in_features * self.global_pool.feat_mult()
        self.drop = nn.Dropout(self.drop_rate)
        self.fc = (
            nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        )

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)


class FocalNet(nn.Module):
    """Focal Modulation Network (timm's ``FocalNet`` interface and parameter names)."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        mlp_ratio: float = 4.0,
        focal_levels: Sequence[int] = (2, 2, 2, 2),
        focal_windows: Sequence[int] = (3, 3, 3, 3),
        use_overlap_down: bool = False,
        use_post_norm: bool = False,
        use_post_norm_in_modulation: bool = False,
        normalize_modulator: bool = False,
        head_init_scale: float = 1.0,
        layerscale_value: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-5,
    ) -> None:
        """
        Args:
            in_chans: input image channels.
            num_classes: classifier classes (0: no classifier).
            global_pool: pooling type for the head (``'avg'``, ``'max'``, ``'avgmax'``, ...).
            embed_dim: stage-0 width; stage ``i`` has ``embed_dim * 2**i`` channels.
            depths: blocks per stage.
            mlp_ratio: MLP hidden width / channels.
            focal_levels: focal levels per stage (excluding the global level).
            focal_windows: first-level kernel size per stage.
            use_overlap_down: 7x7/s4 stem and 3x3/s2 downsamples instead of patchify convs.
            use_post_norm: norm after modulation/MLP instead of before.
            use_post_norm_in_modulation: norm inside the modulation, before ``proj``.
            normalize_modulator: divide the aggregated context by ``focal_level + 1``.
            head_init_scale: scale for the classifier's initial weights.
            layerscale_value: LayerScale init (``None``: no LayerScale).
            drop_rate: head dropout. proj_drop_rate: dropout after projections.
            drop_path_rate: stochastic depth rate, linearly increasing over blocks.
            norm_eps: LayerNorm epsilon.
        """
        super().__init__()
        n = len(depths)
        if not (len(focal_levels) == len(focal_windows) == n):
            raise ValueError(
                f"focal_levels/focal_windows: need one entry per stage ({n}), got "
                f"{len(focal_levels)} and {len(focal_windows)}"
            )
        dims = [embed_dim * 2**i for i in range(n)]
        norm_layer = _norm_factory(norm_eps)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dim = dims
        self.num_features = dims[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = Downsample(
            in_chans, dims[0], stride=4, overlap=use_overlap_down, norm_layer=norm_layer
        )
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages = []
        self.feature_info: list[dict[str, Any]] = []
        in_dim = dims[0]
        for i in range(n):
            stages.append(
                FocalNetStage(
                    in_dim,
                    dims[i],
                    depths[i],
                    mlp_ratio=mlp_ratio,
                    downsample=i > 0,
                    focal_level=focal_levels[i],
                    focal_window=focal_windows[i],
                    use_overlap_down=use_overlap_down,
                    use_post_norm=use_post_norm,
                    use_post_norm_in_modulation=use_post_norm_in_modulation,
                    normalize_modulator=normalize_modulator,
                    layerscale_value=layerscale_value,
                    proj_drop=proj_drop_rate,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    norm_layer=norm_layer,
                )
            )
            in_dim = dims[i]
            self.feature_info.append(
                dict(num_chs=dims[i], reduction=4 * 2**i, module=f"layers.{i}")
            )
        self.layers = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head = FocalHead(self.num_features, num_classes, global_pool, drop_rate)
        self.head_hidden_size = self.head.num_features
        self._init_weights(head_init_scale)

    def _init_weights(self, head_init_scale: float) -> None:
        for name, m in self.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if name == "head.fc":
                    m.weight.data.mul_(head_init_scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=[(r"^layers\.(\d+)", None), (r"^norm", (99999,))]
            if coarse
            else [
                (r"^layers\.(\d+).downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.in_features = self.num_features
        self.head.reset(num_classes, global_pool)
        self.head_hidden_size = self.head.num_features

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, nn.Identity):
            return x
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (``indices`` as timm: last n if int, all if None), and the final map.

        ``norm`` applies the final norm to the last stage's intermediate; ``output_fmt`` is
        ``'NCHW'`` or ``'NHWC'``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt: must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        stages = self.layers if not stop_early else self.layers[: max_index + 1]
        last_idx = len(self.layers) - 1
        intermediates = []
        x = self.stem(x)
        feat_idx = -1
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                y = self._final_norm(x) if norm and feat_idx == last_idx else x
                intermediates.append(y.permute(0, 2, 3, 1) if output_fmt == "NHWC" else y)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self._final_norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop stages (and norm/head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.layers = self.layers[: max_index + 1]
        if prune_end:
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, in_chans, H, W]`` -> normed final map ``[B, C, H/32, W/32]``."""
        x = self.stem(x)
        x = self.layers(x)
        return self._final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _norm_factory(eps: float) -> Callable[[int], nn.Module]:
    def make(dim: int) -> nn.Module:
        # nn.LayerNorm's keys; the fused norm on CUDA (see AutocastLayerNorm)
        return AutocastLayerNorm(dim, eps=eps)

    return make


# ---------------------------------------------------------------- checkpoint conversion

# our parameters that timm stores as 1x1 conv weights
_LINEAR_FROM_CONV = re.compile(r"\.(modulation\.(f|h|proj)|mlp\.fc1|mlp\.fc2)\.weight$")


def _convert_official(
    state_dict: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"gamma_([12])$", r"ls\1.gamma", k)
        k = k.replace("patch_embed.", "stem.", 1) if k.startswith("patch_embed.") else k
        # the official downsample ends stage i; ours starts stage i + 1
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", k)
        k = k.replace(".modulation.ln.", ".modulation.norm.")
        if k not in target:
            # post-norm blocks apply norm1/norm2 after the branch
            k = re.sub(r"\.norm([12])\.", r".norm\1_post.", k)
        if k.startswith("head."):
            k = "head.fc." + k[len("head.") :]
        out[k] = v
    return out


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: FocalNet
) -> dict[str, torch.Tensor]:
    """Map a timm or official FocalNet state dict onto ``model``'s keys and shapes."""
    if "model" in state_dict and not isinstance(state_dict["model"], torch.Tensor):
        state_dict = state_dict["model"]
    target = model.state_dict()
    if "stem.proj.weight" not in state_dict and "patch_embed.proj.weight" in state_dict:
        state_dict = _convert_official(state_dict, target)
    out = {}
    for k, v in state_dict.items():
        if _LINEAR_FROM_CONV.search(k) and v.ndim == 4:
            v = v.flatten(1)  # 1x1 conv [out, in, 1, 1] -> linear [out, in]
        out[k] = v
    return out


# ------------------------------------------------------------------------- configs

# timm's model name -> its FocalNet constructor arguments (ours takes the same)
_TIMM_ARGS: dict[str, dict[str, Any]] = {
    "focalnet_tiny_srf": dict(depths=(2, 2, 6, 2), embed_dim=96),
    "focalnet_small_srf": dict(depths=(2, 2, 18, 2), embed_dim=96),
    "focalnet_base_srf": dict(depths=(2, 2, 18, 2), embed_dim=128),
    "focalnet_tiny_lrf": dict(depths=(2, 2, 6, 2), embed_dim=96, focal_levels=(3, 3, 3, 3)),
    "focalnet_small_lrf": dict(depths=(2, 2, 18, 2), embed_dim=96, focal_levels=(3, 3, 3, 3)),
    "focalnet_base_lrf": dict(depths=(2, 2, 18, 2), embed_dim=128, focal_levels=(3, 3, 3, 3)),
    "focalnet_large_fl3": dict(
        depths=(2, 2, 18, 2), embed_dim=192, focal_levels=(3,) * 4, focal_windows=(5,) * 4,
        use_post_norm=True, use_overlap_down=True, layerscale_value=1e-4,
    ),
    "focalnet_large_fl4": dict(
        depths=(2, 2, 18, 2), embed_dim=192, focal_levels=(4,) * 4,
        use_post_norm=True, use_overlap_down=True, layerscale_value=1e-4,
    ),
    "focalnet_xlarge_fl3": dict(
        depths=(2, 2, 18, 2), embed_dim=256, focal_levels=(3,) * 4, focal_windows=(5,) * 4,
        use_post_norm=True, use_overlap_down=True, layerscale_value=1e-4,
    ),
    "focalnet_xlarge_fl4": dict(
        depths=(2, 2, 18, 2), embed_dim=256, focal_levels=(4,) * 4,
        use_post_norm=True, use_overlap_down=True, layerscale_value=1e-4,
    ),
    "focalnet_huge_fl3": dict(
        depths=(2, 2, 18, 2), embed_dim=352, focal_levels=(3,) * 4, focal_windows=(3,) * 4,
        use_post_norm=True, use_post_norm_in_modulation=True, use_overlap_down=True,
        layerscale_value=1e-4,
    ),
    "focalnet_huge_fl4": dict(
        depths=(2, 2, 18, 2), embed_dim=352, focal_levels=(4,) * 4,
        use_post_norm=True, use_post_norm_in_modulation=True, use_overlap_down=True,
        layerscale_value=1e-4,
    ),
}  # fmt: skip

# official variant -> official constructor kwargs (classification/configs/*.yaml + builders)
OFFICIAL_VARIANTS: dict[str, dict[str, Any]] = {
    "focalnet_tiny_srf": dict(embed_dim=96, depths=[2, 2, 6, 2], focal_levels=[2] * 4),
    "focalnet_small_srf": dict(embed_dim=96, depths=[2, 2, 18, 2], focal_levels=[2] * 4),
    "focalnet_base_srf": dict(embed_dim=128, depths=[2, 2, 18, 2], focal_levels=[2] * 4),
    "focalnet_tiny_lrf": dict(embed_dim=96, depths=[2, 2, 6, 2], focal_levels=[3] * 4),
    "focalnet_small_lrf": dict(embed_dim=96, depths=[2, 2, 18, 2], focal_levels=[3] * 4),
    "focalnet_base_lrf": dict(embed_dim=128, depths=[2, 2, 18, 2], focal_levels=[3] * 4),
    "focalnet_large_fl3": dict(
        embed_dim=192, depths=[2, 2, 18, 2], focal_levels=[3] * 4, focal_windows=[5] * 4,
        use_conv_embed=True, use_postln=True, use_layerscale=True, num_classes=21842,
    ),
    "focalnet_large_fl4": dict(
        embed_dim=192, depths=[2, 2, 18, 2], focal_levels=[4] * 4, focal_windows=[3] * 4,
        use_conv_embed=True, use_postln=True, use_layerscale=True, normalize_modulator=True,
        num_classes=21842,
    ),
    "focalnet_xlarge_fl3": dict(
        embed_dim=256, depths=[2, 2, 18, 2], focal_levels=[3] * 4, focal_windows=[5] * 4,
        use_conv_embed=True, use_postln=True, use_layerscale=True, num_classes=21842,
    ),
    "focalnet_xlarge_fl4": dict(
        embed_dim=256, depths=[2, 2, 18, 2], focal_levels=[4] * 4, focal_windows=[3] * 4,
        use_conv_embed=True, use_postln=True, use_layerscale=True, num_classes=21842,
    ),
    "focalnet_huge_fl3": dict(
        embed_dim=352, depths=[2, 2, 18, 2], focal_levels=[3] * 4, focal_windows=[3] * 4,
        use_conv_embed=True, use_postln=True, use_layerscale=True,
        use_postln_in_modulation=True, num_classes=21842,
    ),
    "focalnet_huge_fl4": dict(
        embed_dim=352, depths=[2, 2, 18, 2], focal_levels=[4] * 4, focal_windows=[3] * 4,
        use_conv_embed=True, use_postln=True, use_layerscale=True,
        use_postln_in_modulation=True, num_classes=21842,
    ),
}  # fmt: skip

# official constructor arguments that do not change the computation at inference
_OFFICIAL_IGNORED = {"img_size", "drop_rate", "drop_path_rate", "use_checkpoint", "norm_layer"}


def official_to_model_args(official_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Translate the official ``FocalNet(...)`` keyword arguments into ours."""
    kw = dict(official_kwargs)
    if kw.pop("patch_size", 4) != 4:
        raise ValueError("official_kwargs: patch_size must be 4 (isotropic FocalNets unsupported)")
    if not kw.pop("patch_norm", True):
        raise ValueError("official_kwargs: patch_norm=False is not supported")
    use_ls = kw.pop("use_layerscale", False)
    ls_value = kw.pop("layerscale_value", 1e-4)
    args: dict[str, Any] = dict(
        embed_dim=kw.pop("embed_dim", 96),
        depths=tuple(kw.pop("depths", (2, 2, 6, 2))),
        mlp_ratio=kw.pop("mlp_ratio", 4.0),
        focal_levels=tuple(kw.pop("focal_levels", (2, 2, 2, 2))),
        focal_windows=tuple(kw.pop("focal_windows", (3, 3, 3, 3))),
        use_overlap_down=kw.pop("use_conv_embed", False),
        use_post_norm=kw.pop("use_postln", False),
        use_post_norm_in_modulation=kw.pop("use_postln_in_modulation", False),
        normalize_modulator=kw.pop("normalize_modulator", False),
        layerscale_value=ls_value if use_ls else None,
        in_chans=kw.pop("in_chans", 3),
    )
    if "num_classes" in kw:
        args["num_classes"] = kw.pop("num_classes")
    unknown = set(kw) - _OFFICIAL_IGNORED
    if unknown:
        raise ValueError(f"official_kwargs: unsupported FocalNet arguments {sorted(unknown)}")
    return args


def from_timm(timm_model_name: str, state_dict: Mapping[str, torch.Tensor]) -> FocalNet:
    """Our counterpart of timm's ``timm_model_name`` (e.g. ``focalnet_tiny_srf``), weights loaded."""
    base = timm_model_name.split(".", 1)[0]
    if base not in _TIMM_ARGS:
        raise ValueError(f"timm_model_name: {timm_model_name!r} is not one of {sorted(_TIMM_ARGS)}")
    args = {"num_classes": head_classes(state_dict, "head.fc.weight")}
    return build_converted("va_" + base, args, lambda m: checkpoint_filter_fn(state_dict, m))


def from_official(
    state_dict: Mapping[str, torch.Tensor],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "focalnet",
) -> FocalNet:
    """Our model from an official FocalNet checkpoint (microsoft/FocalNet keys), loaded strictly.

    ``official_kwargs`` are the official constructor's arguments; without them ``variant``
    (e.g. ``"focalnet_tiny_srf"``, ``"focalnet_large_fl4"``) supplies the official config.
    The class count is read from the checkpoint's head.
    """
    if family != "focalnet":
        raise ValueError(f"family: this module converts 'focalnet', got {family!r}")
    if official_kwargs is None:
        if variant not in OFFICIAL_VARIANTS:
            raise ValueError(f"variant: {variant!r} is not one of {sorted(OFFICIAL_VARIANTS)}")
        official_kwargs = OFFICIAL_VARIANTS[variant]
    args = official_to_model_args(official_kwargs)
    args["num_classes"] = head_classes(state_dict, "head.weight")
    name = registered_variant(FocalNet, _TIMM_ARGS, args)
    return build_converted(name, args, lambda m: checkpoint_filter_fn(state_dict, m))


# --------------------------------------------------------------------- registration


def _cfg(hf_hub_id: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "hf_hub_id": hf_hub_id,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj",
        "classifier": "head.fc",
        "license": "mit",
        **kwargs,
    }


_IN22K = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, num_classes=21842)

# our tags point at timm's Hub weights; checkpoint_filter_fn maps their keys
default_cfgs = generate_default_cfgs(
    {
        "va_focalnet_tiny_srf.ms_in1k": _cfg("timm/focalnet_tiny_srf.ms_in1k"),
        "va_focalnet_small_srf.ms_in1k": _cfg("timm/focalnet_small_srf.ms_in1k"),
        "va_focalnet_base_srf.ms_in1k": _cfg("timm/focalnet_base_srf.ms_in1k"),
        "va_focalnet_tiny_lrf.ms_in1k": _cfg("timm/focalnet_tiny_lrf.ms_in1k"),
        "va_focalnet_small_lrf.ms_in1k": _cfg("timm/focalnet_small_lrf.ms_in1k"),
        "va_focalnet_base_lrf.ms_in1k": _cfg("timm/focalnet_base_lrf.ms_in1k"),
        "va_focalnet_large_fl3.ms_in22k": _cfg("timm/focalnet_large_fl3.ms_in22k", **_IN22K),
        "va_focalnet_large_fl4.ms_in22k": _cfg("timm/focalnet_large_fl4.ms_in22k", **_IN22K),
        "va_focalnet_xlarge_fl3.ms_in22k": _cfg("timm/focalnet_xlarge_fl3.ms_in22k", **_IN22K),
        "va_focalnet_xlarge_fl4.ms_in22k": _cfg("timm/focalnet_xlarge_fl4.ms_in22k", **_IN22K),
        "va_focalnet_huge_fl3.ms_in22k": _cfg("timm/focalnet_huge_fl3.ms_in22k", num_classes=21842),
        "va_focalnet_huge_fl4.ms_in22k": _cfg("timm/focalnet_huge_fl4.ms_in22k", num_classes=0),
        "test_va_focalnet.untrained": _cfg(
            "visionattn/test_va_focalnet.untrained", input_size=(3, 64, 64), pool_size=(2, 2)
        ),
    }
)


def _create_focalnet(variant: str, pretrained: bool = False, **kwargs: Any) -> FocalNet:
    depths = kwargs.get("depths", (2, 2, 6, 2))
    out_indices = kwargs.pop("out_indices", tuple(range(len(depths))))
    return build_model_with_cfg(
        FocalNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _make(timm_name: str, pretrained: bool, kwargs: dict[str, Any]) -> FocalNet:
    return _create_focalnet("va_" + timm_name, pretrained, **dict(_TIMM_ARGS[timm_name], **kwargs))


@register_model
def va_focalnet_tiny_srf(pretrained: bool = False, **kwargs: Any) -> FocalNet:
    """FocalNet-T, small receptive field (2 levels)."""
    return _make("focalnet_tiny_srf", pretrained, kwargs)


@register_model
def va_focalnet_small_srf(pretrained: bool = False, **kwargs: Any) -> FocalNet:
    """FocalNet-S, small receptive field (2 levels)."""
    return _make("focalnet_small_srf", pretrained, kwargs)


@register_model
def va_focalnet_base_srf(pretrained: bool = False, **kwargs: Any) -> FocalNet:
    """FocalNet-B, small receptive field (2 levels)."""
    return _make("focalnet_base_srf", pretrained, kwargs)


@register_model
def va_focalnet_tiny_lrf(pretrained: bool = False, **kwargs: Any) -> FocalNet:
    """FocalNet-T, large receptive field (3 levels)."""
    return _make("focalnet_tiny_lrf", pretrained, kwargs)


@register_model
def va_focalnet_small_lrf(pretrained: bool = False, **kwargs: Any) -> FocalNet:
    """FocalNet-S, large receptive field (3 levels)."""
    return _make("focalnet_small_lrf", pretrained, kwargs)


@register_model
def va_focalnet_base_lrf(pretrained: bool = False, **kwargs: Any) -> FocalNet:
    """FocalNet-B, large receptive field (3 levels)."""
    return _make("focalnet_base_lrf", pretrained, kwargs)


@register_model
def va_focalnet_large_fl3(pretrained: bool = False, **kwargs: Any) -> FocalNet:
    """FocalNet-L, 3 levels, ImageNet-22k."""
    return _make("focalnet_large_fl3", pretrained, kwargs)


@register_model
def va_focalnet_large_fl4(pretrained: bool = False, **kwargs: Any) -> FocalNet:
    """FocalNet-L, 4 levels, ImageNet-22k (timm's config: no modulator normalization)."""
    return _make("focalnet_large_fl4", pretrained, kwargs)


@register_model
def va_focalnet_xlarge_fl3(pretrained: bool = False, **kwargs: Any) -> FocalNet:
    """FocalNet-XL, 3 levels, ImageNet-22k."""
    return _make("focalnet_xlarge_fl3", pretrained, kwargs)


@register_model
def va_focalnet_xlarge_fl4(pretrained: bool = False, **kwargs: Any) -> FocalNet:
    """FocalNet-XL, 4 levels, ImageNet-22k."""
    return _make("focalnet_xlarge_fl4", pretrained, kwargs)


@register_model
def va_focalnet_huge_fl3(pretrained: bool = False, **kwargs: Any) -> FocalNet:
    """FocalNet-H, 3 levels, ImageNet-22k."""
    return _make("focalnet_huge_fl3", pretrained, kwargs)


@register_model
def va_focalnet_huge_fl4(pretrained: bool = False, **kwargs: Any) -> FocalNet:
    """FocalNet-H, 4 levels (timm's weights carry no classifier)."""
    return _make("focalnet_huge_fl4", pretrained, kwargs)


@register_model
def test_va_focalnet(pretrained: bool = False, **kwargs: Any) -> FocalNet:
    """Tiny FocalNet for fast tests (~0.1M parameters)."""
    args = dict(
        depths=(1, 1, 2, 1),
        embed_dim=16,
        focal_levels=(2, 2, 3, 2),
        focal_windows=(3, 3, 3, 3),
        mlp_ratio=2.0,
    )
    return _create_focalnet("test_va_focalnet", pretrained, **dict(args, **kwargs))

"""Small inference helpers shared by the family files (one place for each trick)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, ConvNormAct, GELUTanh
from torch import nn

import visionattn.kernels as _kernels

__all__ = [
    "AutocastLayerNorm",
    "FoldedConvNormAct",
    "clear_memos",
    "fold_bn",
    "fold_enabled",
    "inplace_act",
    "linear_tokens",
    "module_memo",
    "pointwise",
    "tensors_key",
    "use_folded_conv_norm",
]


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` over the last (channel) dim of a contiguous token tensor.

    CPU inference with more than one thread runs it as a 1x1 convolution over a channels-last
    NCHW view of the same memory (same math, output in ``x``'s layout): oneDNN's convolution
    scales with threads where the BLAS GEMM behind ``F.linear`` barely does (2 threads: ~2x
    faster on the project's CPU box). With one thread PyTorch runs a 1x1 conv on its slower
    native path, so ``F.linear`` stays; training, GPUs and torch.compile take ``F.linear`` too.
    """
    if (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and x.dim() >= 2
        and x.is_contiguous()
        and torch.get_num_threads() > 1
    ):
        w = weight if weight.dim() == 2 else weight.flatten(1)
        x4 = x.reshape(x.shape[0], -1, 1, x.shape[-1]).permute(0, 3, 1, 2)
        y = F.conv2d(x4, w.view(*w.shape, 1, 1), bias).permute(0, 2, 3, 1)
        return y.reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, weight if weight.dim() == 2 else weight.flatten(1), bias)


def linear_tokens(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` through :func:`pointwise` (channels-last ``[..., C]`` tokens)."""
    return pointwise(x, layer.weight, layer.bias)


def inplace_act(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)``; in inference a GELU overwrites ``x`` (a fresh activation nobody else holds),
    saving the allocation of the block's largest tensor."""
    if not torch.is_grad_enabled():
        if isinstance(act, GELUTanh):
            return torch.ops.aten.gelu_(x, approximate="tanh")
        if isinstance(act, nn.GELU):
            return torch.ops.aten.gelu_(x, approximate=act.approximate)
    return act(x)


# Below this many elements a training-mode norm stays on PyTorch's kernel: the fused kernel's
# Python autograd.Function adds ~70 us of host time per forward + backward on the lent H200
# machine (289 vs 220 us for one small norm), more than its GPU saving on small maps, and the
# small models are host-bound. Measured there, alternating in one process: Agent-DeiT-T
# (4.8M-element norms) 57-65 ms per step with plain norms, 63-70 with all norms fused;
# LITv2-S (39M-element stage-1 norms) 45 instead of 50 ms with the fused kernel.
FUSED_NORM_TRAIN_MIN_NUMEL = 1 << 23


class AutocastLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state-dict keys) that, on CUDA, writes its output
    in the autocast dtype instead of autocast's float32 policy for norms, saving the float32
    output and the cast before the next linear (which casts anyway).

    It runs :func:`visionattn.kernels.layer_norm` (float32 tokens read as they are, float32
    statistics and affine, output in the autocast dtype, the float32 gradient written by the
    backward) for inference and for training on tensors of at least
    ``FUSED_NORM_TRAIN_MIN_NUMEL`` elements. Smaller training-mode norms, and every norm on
    other devices, are plain ``nn.LayerNorm`` (under autocast: float32 output). Outside
    autocast the output keeps the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" or len(self.normalized_shape) != 1:
            return super().forward(x)
        dt = autocast_dtype(x)
        w, b = self.weight, self.bias
        training = torch.is_grad_enabled() and (
            x.requires_grad
            or (w is not None and w.requires_grad)
            or (b is not None and b.requires_grad)
        )
        if not training or x.numel() >= FUSED_NORM_TRAIN_MIN_NUMEL:
            return _kernels.layer_norm(x, w, b, self.eps, dt)
        # fewest host ops: one native norm (float32 output under autocast)
        return super().forward(x)


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul or convolution of ``x`` runs in: the autocast dtype when autocast is
    on for ``x``'s device and ``x`` is a floating tensor other than float64 (the ones autocast
    casts), else ``x``'s own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return x.dtype


def tensors_key(*tensors: torch.Tensor | None) -> tuple:
    """Cache key of values derived from ``tensors``: it changes when any of them is updated in
    place (version counter) or replaced (storage), e.g. by an optimizer step or
    ``load_state_dict``. ``None`` entries are skipped."""
    return tuple((t._version, t.data_ptr()) for t in tensors if t is not None)


# slot names module_memo has used, so clear_memos can find every memoised value
_MEMO_SLOTS: set[str] = set()


def module_memo(module: nn.Module, slot: str, key: tuple, build: Callable[[], Any]) -> Any:
    """``build()``, kept on ``module`` under ``slot`` and returned again while ``key`` is
    unchanged (one entry per slot). ``key`` should hold the sizes/dtype/device the value
    depends on and :func:`tensors_key` of every tensor ``build`` reads, so an optimizer step,
    ``load_state_dict`` or ``.to()`` rebuilds it. The caller decides when memoising is valid
    (e.g. :func:`fold_enabled`)."""
    hit = module.__dict__.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    val = build()
    _MEMO_SLOTS.add(slot)
    module.__dict__[slot] = (key, val)
    return val


def clear_memos(model: nn.Module, recurse: bool = True) -> int:
    """Drop every value :func:`module_memo` keeps on ``model`` (and its submodules); returns
    how many. Needed when tensors change without their version counters moving, which is what
    a replayed CUDA graph does to the parameters its optimizer step updates."""
    n = 0
    for m in model.modules() if recurse else (model,):
        for slot in _MEMO_SLOTS:
            n += m.__dict__.pop(slot, None) is not None
    return n


def fold_enabled(module: nn.Module) -> bool:
    """Whether inference folding applies: eval mode, no autograd, not tracing (a compiled
    graph fuses the normalisation by itself)."""
    return not (module.training or torch.is_grad_enabled() or torch.compiler.is_compiling())


def fold_bn(
    weight: torch.Tensor, bn: nn.BatchNorm2d, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv (weight ``[out, ...]``, optional bias) and eval-mode BatchNorm as one conv:
    ``(weight', bias')`` with ``conv(x, weight') + bias' == bn(conv(x, weight) + bias)``."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    w = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    mean = bn.running_mean if bias is None else bn.running_mean - bias
    return w, bn.bias - mean * scale


class FoldedConvNormAct(ConvNormAct):
    """timm's ``ConvNormAct`` whose CPU inference (see :func:`fold_enabled`) runs the conv with
    the BatchNorm folded into its weights: one conv instead of conv + a full pass of
    normalisation (a fifth of HaloNet's CPU inference time). Same parameters, buffers and state_dict;
    training and autograd take timm's path. The folded weights are cached per dtype while the
    conv and BN tensors are unchanged."""

    @staticmethod
    def can_fold(m: nn.Module) -> bool:
        """A plain (static-padding) conv followed by an affine BatchNormAct2d with running
        statistics and no anti-aliasing layer."""
        bn = getattr(m, "bn", None)
        return (
            isinstance(m, ConvNormAct)
            and type(m.conv) is nn.Conv2d
            and isinstance(bn, BatchNormAct2d)
            and bn.affine
            and bn.track_running_stats
            and getattr(m, "aa", None) is None
        )

    def _folded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        conv, bn = self.conv, self.bn
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = (dtype, *tensors_key(*tensors))

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            w, b = fold_bn(conv.weight, bn, conv.bias)
            return w.to(dtype), b.to(dtype)

        return module_memo(self, "_fold_cache", key, build)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CPU only: on the H200 (cuDNN, bf16, channels-last) the folded conv measured slower
        # than conv + BN (halonet50ts inference 6650 vs 7250 img/s, same process), with the
        # weights in either memory format and with the bias added separately
        if x.device.type != "cpu" or not fold_enabled(self):
            return super().forward(x)
        w, b = self._folded(autocast_dtype(x))
        c = self.conv
        x = F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)
        return self.bn.act(self.bn.drop(x))

    def _apply(self, fn, *args, **kwargs):
        clear_memos(self, recurse=False)
        return super()._apply(fn, *args, **kwargs)


def use_folded_conv_norm(model: nn.Module) -> int:
    """Give every foldable ``ConvNormAct`` of ``model`` (built by timm's code, e.g. ByobNet) the
    :class:`FoldedConvNormAct` behaviour; returns how many. Only the class changes: the module
    keeps its parameters, buffers, hooks and state_dict keys."""
    n = 0
    for m in model.modules():
        if type(m) is ConvNormAct and FoldedConvNormAct.can_fold(m):
            m.__class__ = FoldedConvNormAct
            n += 1
    return n

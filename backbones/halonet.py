"""HaloNet on visionattn's kernel layer, weight-compatible with timm's halo-attention networks.

Paper: `Scaling Local Self-Attention for Parameter Efficient Visual Backbones`
- https://arxiv.org/abs/2103.12731 (Vaswani, Ramachandran, Srinivas, Parmar, Hechtman, Shlens;
CVPR 2021).

timm ships HaloNets as configurations of its Bring-Your-Own-Blocks network
(``timm.models.byoanet``: ``halonet26t``, ``halonet50ts``, ``sehalonet33ts``, ...) with
``timm.layers.HaloAttn`` as the self-attention layer. The models here are the same
``ByobNet`` configurations with :class:`HaloAttn` below plugged in as the self-attention layer,
so parameter names and shapes are timm's and timm's Hub weights load unchanged.

Halo attention as timm computes it: the map is cut into ``block x block`` query blocks; each
block attends to the ``(block + 2 * halo)^2`` window around it, with keys and values
zero-padded at the border (zero keys stay in the softmax); the logits get "relative logits"
``q . (height_rel[ky - qy + win - 1] + width_rel[kx - qx + win - 1])`` where ``qy, qx`` is the
query's position in its block and ``ky, kx`` the key's position in the window. Here that is
one ``na2d(kernel_size=block + 2 * halo, stride=block, border="zero")`` call with the relative
logits passed as ``attn_bias``: no unfold copies of the keys and values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import make_divisible, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.byoanet import model_cfgs as byoanet_cfgs
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg, interleave_blocks
from torch import nn

from visionattn.backbones._convert import build_converted, head_classes
from visionattn.backbones._layers import use_folded_conv_norm
from visionattn.kernels import na2d

# timm model-name prefixes visionattn.convert.from_timm routes here
TIMM_PREFIXES = (
    "halonet",
    "sehalonet",
    "halo2botnet",
    "eca_halonext",
    "haloregnetz",
    "lamhalobotnet",
)

__all__ = ["FAMILIES", "HaloAttn", "HaloNet", "checkpoint_filter_fn", "from_timm"]

FAMILIES = ("halonet",)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class PosEmbedRel(nn.Module):
    """Relative logits of halo attention: per-axis embeddings dotted with the query.

    ``height_rel`` / ``width_rel`` are ``[2 * win - 1, dim_head]``. For a query at position
    ``(qy, qx)`` inside its (possibly downsampled) block and a key at ``(ky, kx)`` inside the
    ``win x win`` window, the logit gains ``q . height_rel[ky - qy + win - 1] +
    q . width_rel[kx - qx + win - 1]`` (timm's indexing).
    """

    def __init__(
        self, block_size: int, win_size: int, dim_head: int, scale: float, device=None, dtype=None
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.block_size = block_size
        self.win_size = win_size
        self.dim_head = dim_head
        self.height_rel = nn.Parameter(torch.empty(win_size * 2 - 1, dim_head, **dd))
        self.width_rel = nn.Parameter(torch.empty(win_size * 2 - 1, dim_head, **dd))
        trunc_normal_(self.height_rel, std=scale)
        trunc_normal_(self.width_rel, std=scale)

    def _axis_table(self, rel: torch.Tensor, length: int, period: int, step: int) -> torch.Tensor:
        """``[length, win, dim_head]``: the embedding each position's query uses per window slot.

        A position ``i`` sits at ``(i % period) // step`` inside its block (``step`` > 1 when the
        queries are a strided subset of the map).
        """
        pos = (torch.arange(length, device=rel.device) % period) // step
        slot = torch.arange(self.win_size, device=rel.device)
        return rel[slot[None, :] - pos[:, None] + self.win_size - 1]

    def axis_logits(
        self, q: torch.Tensor, period: int, step: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two per-axis terms ``[B, heads, H, W, win]`` of the relative logits."""
        H, W = q.shape[1], q.shape[2]
        th = self._axis_table(self.height_rel, H, period, step).to(q.dtype)
        tw = self._axis_table(self.width_rel, W, period, step).to(q.dtype)
        rh = torch.einsum("byxnd,yjd->bnyxj", q, th)
        rw = torch.einsum("byxnd,xjd->bnyxj", q, tw)
        return rh, rw

    def forward(self, q: torch.Tensor, period: int, step: int = 1) -> torch.Tensor:
        """Relative logits ``[B, heads, H, W, win, win]`` for queries ``q [B, H, W, heads, d]``."""
        rh, rw = self.axis_logits(q, period, step)
        return rh[..., :, None] + rw[..., None, :]


class HaloAttn(nn.Module):
    """Halo attention (drop-in for ``timm.layers.HaloAttn``, same arguments and parameters).

    Input ``[B, dim, H, W]``, output ``[B, dim_out, H / stride, W / stride]``. Unlike timm's
    layer, ``H`` and ``W`` need not be multiples of ``block_size``: the last partial blocks see
    the same zero-padded halo windows, i.e. the result equals timm's on a zero-padded map
    (``qkv_bias=False``), cropped.

    Args:
        dim: input channels.
        dim_out: output channels (``dim`` if None); value width per head ``dim_out // num_heads``.
        feat_size: unused (argument compatibility with the other ByobNet self-attn layers).
        stride: 1 or 2; with 2 the queries are the even positions (a strided query projection),
            or, when ``block_size`` is odd or ``avg_down``, the output is average-pooled.
        num_heads: attention heads.
        dim_head: query/key width per head (default ``dim_out * qk_ratio`` split over heads).
        block_size: query block size.
        halo_size: halo around each block; the key window is ``block_size + 2 * halo_size``.
        qk_ratio: query/key width relative to ``dim_out`` when ``dim_head`` is not given.
        qkv_bias: bias in the q and kv projections.
        avg_down: downsample by average pooling instead of strided queries.
        scale_pos_embed: scale the relative logits by ``dim_head ** -0.5`` too.
        device, dtype: where and how to create the parameters.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        feat_size: tuple[int, int] | None = None,
        stride: int = 1,
        num_heads: int = 8,
        dim_head: int | None = None,
        block_size: int = 8,
        halo_size: int = 3,
        qk_ratio: float = 1.0,
        qkv_bias: bool = False,
        avg_down: bool = False,
        scale_pos_embed: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide dim_out {dim_out}")
        if stride not in (1, 2):
            raise ValueError(f"stride: must be 1 or 2, got {stride}")
        if block_size < 1 or halo_size < 0:
            raise ValueError(
                f"block_size/halo_size: need >= 1 / >= 0, got {block_size}/{halo_size}"
            )
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = num_heads * self.dim_head_v
        self.scale = self.dim_head_qk**-0.5
        self.scale_pos_embed = scale_pos_embed
        self.block_size = self.block_size_ds = block_size
        self.halo_size = halo_size
        self.win_size = block_size + halo_size * 2
        self.block_stride = 1
        use_avg_pool = False
        if stride > 1:
            use_avg_pool = avg_down or block_size % stride != 0
            self.block_stride = 1 if use_avg_pool else stride
            self.block_size_ds = block_size // self.block_stride
        self.q = nn.Conv2d(dim, self.dim_out_qk, 1, stride=self.block_stride, bias=qkv_bias, **dd)
        self.kv = nn.Conv2d(dim, self.dim_out_qk + self.dim_out_v, 1, bias=qkv_bias, **dd)
        self.pos_embed = PosEmbedRel(
            self.block_size_ds, self.win_size, self.dim_head_qk, self.scale
        )
        self.pool = nn.AvgPool2d(2, 2) if use_avg_pool else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.q.weight.shape[1] ** -0.5  # fan-in
        trunc_normal_(self.q.weight, std=std)
        trunc_normal_(self.kv.weight, std=std)
        trunc_normal_(self.pos_embed.height_rel, std=self.scale)
        trunc_normal_(self.pos_embed.width_rel, std=self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        nh, dqk, dv = self.num_heads, self.dim_head_qk, self.dim_head_v
        one_block = H <= self.block_size and W <= self.block_size
        if self.block_stride == 2 and self.halo_size % 2 == 0 and not one_block:
            out = self._strided(x)
        else:
            # Strided queries here: the kernel computes full-resolution queries and the even
            # ones are kept, which equals timm's stride-2 1x1 query conv.
            q = F.conv2d(x, self.q.weight, self.q.bias)
            kv = self.kv(x)
            # NCHW -> heads-last views; free when x is channels_last (the model runs that way
            # on GPU).
            q = q.permute(0, 2, 3, 1).view(B, H, W, nh, dqk)
            kv = kv.permute(0, 2, 3, 1).view(B, H, W, nh, dqk + dv)
            k, v = kv[..., :dqk], kv[..., dqk:]
            rh, rw = self.pos_embed.axis_logits(q, self.block_size, self.block_stride)
            if self.scale_pos_embed:
                rh, rw = rh * self.scale, rw * self.scale
            if one_block and (H < self.win_size or W < self.win_size):
                out = self._single_block(q, k, v, rh, rw)
            else:
                bias = rh[..., :, None] + rw[..., None, :]
                out = self._blocks(q, k, v, bias, self.win_size, self.block_size)
            out = out[:, : H : self.block_stride, : W : self.block_stride]
        out = out.reshape(B, out.shape[1], out.shape[2], self.dim_out_v).permute(0, 3, 1, 2)
        if not x.is_contiguous(memory_format=torch.channels_last):
            # keep the network's layout: channels-last output in an NCHW network sends every
            # following conv, norm and residual add through layout conversions
            out = out.contiguous()
        return self.pool(out)

    def _strided(self, x: torch.Tensor) -> torch.Tensor:
        """Stride-2 queries (even positions, as timm's strided query conv), even halo.

        The full-resolution keys split into four parity maps (even/odd rows x columns), each
        the size of the query map. With an even halo, the keys of parity ``(py, px)`` in a
        block's window are exactly an ``na2d`` zero-border window of ``win / 2`` keys with
        stride ``block / 2`` on that parity map, window slot ``2 * t + p`` of the full window;
        the four parity maps run as one batched ``na2d`` call and their partial softmaxes
        merge by their log-sum-exps. Queries and logits are those of timm's layer (a quarter
        of the full-resolution work), no query is computed and dropped.
        """
        B, _, H, W = x.shape
        nh, dqk, dv = self.num_heads, self.dim_head_qk, self.dim_head_v
        hq, wq = -(-H // 2), -(-W // 2)
        kp, bd = self.win_size // 2, self.block_size_ds
        q = F.conv2d(x, self.q.weight, self.q.bias, stride=2)
        q = q.permute(0, 2, 3, 1).view(B, hq, wq, nh, dqk)
        kv = self.kv(x)
        if H % 2 or W % 2:  # past the map the window holds zero keys
            kv = F.pad(kv, (0, W % 2, 0, H % 2))
        c = kv.shape[1]
        # [4 parities x B, hq, wq, heads, dqk + dv]: one copy of the keys and values
        kv = kv.view(B, c, hq, 2, wq, 2).permute(3, 5, 0, 2, 4, 1)
        kv = kv.reshape(4 * B, hq, wq, nh, dqk + dv)
        q4 = q.unsqueeze(0).expand(4, *q.shape).reshape(4 * B, hq, wq, nh, dqk)
        bias = self.pos_embed(q, bd)
        if self.scale_pos_embed:
            bias = bias * self.scale
        bias = bias.view(B, nh, hq, wq, kp, 2, kp, 2).permute(5, 7, 0, 1, 2, 3, 4, 6)
        bias = bias.reshape(4 * B, nh, hq, wq, kp, kp)
        out, lse = self._blocks(
            q4, kv[..., :dqk], kv[..., dqk:], bias, kp, bd, return_lse=True
        )  # fmt: skip
        w = torch.softmax(lse.view(4, B, hq, wq, nh), dim=0).unsqueeze(-1)
        return (out.view(4, B, hq, wq, nh, dv) * w.to(out.dtype)).sum(0)

    def _blocks(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        kernel: int,
        stride: int,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Zero-border halo windows over a map of one or more blocks: one ``na2d`` call."""
        H, W = q.shape[1], q.shape[2]
        # Zero-border windows never depend on the map size, so a map smaller than the window is
        # zero-padded up to it (identical result) to satisfy the kernel's size check.
        ph, pw = max(0, kernel - H), max(0, kernel - W)
        if ph or pw:
            q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pw, 0, ph)) for t in (q, k, v))
            bias = F.pad(bias, (0, 0, 0, 0, 0, pw, 0, ph))
        out = na2d(
            q, k, v, kernel_size=kernel, stride=stride, attn_bias=bias, scale=self.scale,
            border="zero", return_lse=return_lse,
        )  # fmt: skip
        if return_lse:
            return out[0][:, :H, :W], out[1][:, :H, :W]
        return out[:, :H, :W]

    def _single_block(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor
    ) -> torch.Tensor:
        """Halo attention when the whole map is one query block (deep stages).

        The block's window is the map itself plus zero keys around it (slots ``halo ..
        halo + H`` hold the map). Attention over the map runs on ``na2d`` (one window,
        ``H x W`` queries, no padded queries); the zero keys add nothing to the weighted values
        and only their logits (the relative logits alone) to the softmax normaliser, so the
        result is the map-only attention scaled by ``sigmoid(lse_map - lse_zero_keys)``.
        The relative logits are ``rh[y] + rw[x]`` over window slots, so the zero keys' lse
        splits exactly into per-axis lses over (rows off the map x all columns) and (map
        rows x columns off the map): no ``win x win`` logit block is built.
        """
        H, W = q.shape[1], q.shape[2]
        h0 = self.halo_size
        inner = rh[..., h0 : h0 + H, None] + rw[..., None, h0 : h0 + W]
        out, lse = na2d(
            q, k, v, kernel_size=(H, W), stride=(H, W), attn_bias=inner, scale=self.scale,
            return_lse=True,
        )  # fmt: skip
        rh, rw = rh.to(lse.dtype), rw.to(lse.dtype)
        h_in = rh[..., h0 : h0 + H]
        h_out = torch.cat([rh[..., :h0], rh[..., h0 + H :]], dim=-1)
        w_out = torch.cat([rw[..., :h0], rw[..., h0 + W :]], dim=-1)
        lse_zero = torch.logaddexp(
            torch.logsumexp(h_out, -1) + torch.logsumexp(rw, -1),
            torch.logsumexp(h_in, -1) + torch.logsumexp(w_out, -1),
        )  # [B, heads, H, W]
        gate = torch.sigmoid(lse - lse_zero.permute(0, 2, 3, 1))  # [B, H, W, heads]
        return out * gate.unsqueeze(-1).to(out.dtype)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class HaloNet(ByobNet):
    """timm's ``ByobNet`` running HaloNet configurations with :class:`HaloAttn`.

    On CUDA the input is switched to channels_last so every conv runs in cuDNN's fast layout and
    the attention layers' heads-last views of the q/kv projections are contiguous.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # ByobNet builds timm's ConvNormAct; at inference ours run conv and BN as one conv
        use_folded_conv_norm(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # timm's HaloNets decay every parameter its optimizer factory does not exempt (it
        # exempts 1-D ones itself); keep training identical to theirs.
        return set()

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features(self._prep(x))

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return super().forward_intermediates(self._prep(x), *args, **kwargs)


def _with_our_halo(cfg: ByoModelCfg) -> ByoModelCfg:
    """timm's network config with its "halo" self-attention layers swapped for ours."""

    def swap(layer: Any) -> Any:
        return HaloAttn if layer == "halo" else layer

    def block(b: ByoBlockCfg | tuple) -> ByoBlockCfg | tuple:
        if isinstance(b, tuple):  # an interleaved group
            return tuple(block(x) for x in b)
        return dataclasses.replace(b, self_attn_layer=swap(b.self_attn_layer))

    return dataclasses.replace(
        cfg,
        blocks=tuple(block(b) for b in cfg.blocks),
        self_attn_layer=swap(cfg.self_attn_layer),
    )


# The same networks as timm.models.byoanet (one definition: timm's), halo layers ours.
_TIMM_CFG_KEYS = (
    "halonet_h1", "halonet26t", "sehalonet33ts", "halonet50ts", "eca_halonext26ts",
    "haloregnetz_b", "lamhalobotnet50ts", "halo2botnet50ts",
)  # fmt: skip
model_cfgs: dict[str, ByoModelCfg] = {k: _with_our_halo(byoanet_cfgs[k]) for k in _TIMM_CFG_KEYS}
model_cfgs.update(
    dict(
        # Tiny network for fast tests: strided halo layers (stride-2 queries), windows larger
        # than the map (4 px stages at 64 px input) and a q/k width different from v.
        test_va_halonet=ByoModelCfg(
            blocks=(
                ByoBlockCfg(type="bottle", d=1, c=32, s=1, gs=0, br=0.25),
                ByoBlockCfg(type="self_attn", d=1, c=32, s=2, gs=0, br=0.5),
                interleave_blocks(
                    types=("bottle", "self_attn"),
                    d=2,
                    c=48,
                    s=2,
                    gs=0,
                    br=0.5,
                    self_attn_kwargs=dict(block_size=2, halo_size=2, num_heads=2, qk_ratio=0.5),
                ),  # fmt: skip
                ByoBlockCfg(type="self_attn", d=1, c=64, s=2, gs=0, br=0.5),
            ),
            stem_chs=16,
            stem_type="tiered",
            stem_pool="maxpool",
            act_layer="silu",
            self_attn_layer=HaloAttn,
            self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=2),
        ),
    )
)

# our name -> (timm name, cfg key)
_TIMM_NAMES: dict[str, str] = {
    "halonet_h1": "halonet_h1",
    "halonet26t": "halonet26t",
    "sehalonet33ts": "sehalonet33ts",
    "halonet50ts": "halonet50ts",
    "eca_halonext26ts": "eca_halonext26ts",
    "haloregnetz_b": "haloregnetz_b",
    "lamhalobotnet50ts_256": "lamhalobotnet50ts",
    "halo2botnet50ts_256": "halo2botnet50ts",
}


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Map a timm HaloNet state dict onto ``model``.

    The parameter names are timm's, so this only unwraps a ``model``/``state_dict`` wrapper.
    """
    for key in ("state_dict", "model"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
    return dict(state_dict)


def _create_halonet(
    variant: str, cfg_variant: str, pretrained: bool = False, **kwargs: Any
) -> HaloNet:
    return build_model_with_cfg(
        HaloNet,
        variant,
        pretrained,
        model_cfg=model_cfgs[cfg_variant],
        feature_cfg=dict(flatten_sequential=True),
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


def from_timm(
    timm_model_name: str, state_dict: Mapping[str, torch.Tensor], **kwargs: Any
) -> HaloNet:
    """Build ``va_<timm_model_name>`` and load a timm state dict into it (strict).

    Args:
        timm_model_name: one of timm's halo networks (``halonet26t``, ``halonet50ts``,
            ``sehalonet33ts``, ``halonet_h1``, ``eca_halonext26ts``, ``haloregnetz_b``,
            ``lamhalobotnet50ts_256``, ``halo2botnet50ts_256``); a ``.tag`` suffix is ignored.
        state_dict: the timm model's state dict.
        **kwargs: extra model arguments, the same overrides the timm model was built with
            (e.g. ``width_factor=0.25``, ``img_size=...``).

    Returns:
        Our model in eval mode. ``num_classes`` follows the checkpoint's classifier.
    """
    base = timm_model_name.split(".", 1)[0]
    if base not in _TIMM_NAMES:
        raise ValueError(
            f"timm_model_name: {timm_model_name!r} is not a timm halo network; supported: "
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
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1.conv",
        "classifier": "head.fc",
        "fixed_input_size": False,
        "min_input_size": (3, 224, 224),
        "license": "apache-2.0",
        **kwargs,
    }


_S256 = dict(input_size=(3, 256, 256), pool_size=(8, 8))

default_cfgs = generate_default_cfgs(
    {
        "va_halonet_h1.untrained": _cfg(**_S256, min_input_size=(3, 256, 256)),
        "va_halonet26t.a1h_in1k": _cfg(
            hf_hub_id="timm/halonet26t.a1h_in1k", **_S256, min_input_size=(3, 256, 256)
        ),
        "va_sehalonet33ts.ra2_in1k": _cfg(
            hf_hub_id="timm/sehalonet33ts.ra2_in1k",
            **_S256,
            min_input_size=(3, 256, 256),
            crop_pct=0.94,
        ),
        "va_halonet50ts.a1h_in1k": _cfg(
            hf_hub_id="timm/halonet50ts.a1h_in1k",
            **_S256,
            min_input_size=(3, 256, 256),
            crop_pct=0.94,
        ),
        "va_eca_halonext26ts.c1_in1k": _cfg(
            hf_hub_id="timm/eca_halonext26ts.c1_in1k",
            **_S256,
            min_input_size=(3, 256, 256),
            crop_pct=0.94,
        ),
        "va_haloregnetz_b.ra3_in1k": _cfg(
            hf_hub_id="timm/haloregnetz_b.ra3_in1k",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            first_conv="stem.conv",
            crop_pct=0.94,
        ),
        # global bottleneck attention in the last stage fixes these two to their input size
        "va_lamhalobotnet50ts_256.a1h_in1k": _cfg(
            hf_hub_id="timm/lamhalobotnet50ts_256.a1h_in1k", **_S256, fixed_input_size=True
        ),
        "va_halo2botnet50ts_256.a1h_in1k": _cfg(
            hf_hub_id="timm/halo2botnet50ts_256.a1h_in1k", **_S256, fixed_input_size=True
        ),
        "test_va_halonet.untrained": _cfg(
            input_size=(3, 64, 64), pool_size=(2, 2), min_input_size=(3, 32, 32)
        ),
    }
)


@register_model
def va_halonet_h1(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H1: halo attention in every stage, as in the paper (no trained weights)."""
    return _create_halonet("va_halonet_h1", "halonet_h1", pretrained=pretrained, **kwargs)


@register_model
def va_halonet26t(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet with a ResNet26-T body, halo attention in the last two stages."""
    return _create_halonet("va_halonet26t", "halonet26t", pretrained=pretrained, **kwargs)


@register_model
def va_sehalonet33ts(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet with a ResNet33-T body, SE in the conv blocks, SiLU."""
    return _create_halonet("va_sehalonet33ts", "sehalonet33ts", pretrained=pretrained, **kwargs)


@register_model
def va_halonet50ts(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet with a ResNet50-T body, SiLU, halo attention in the last three stages."""
    return _create_halonet("va_halonet50ts", "halonet50ts", pretrained=pretrained, **kwargs)


@register_model
def va_eca_halonext26ts(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet with a ResNeXt26-T body (group size 16), ECA, SiLU."""
    return _create_halonet(
        "va_eca_halonext26ts", "eca_halonext26ts", pretrained=pretrained, **kwargs
    )


@register_model
def va_haloregnetz_b(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """RegNetZ-B body with halo attention in the last two stages."""
    return _create_halonet("va_haloregnetz_b", "haloregnetz_b", pretrained=pretrained, **kwargs)


@register_model
def va_lamhalobotnet50ts_256(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """Lambda (stage 2) + halo (stage 3) + bottleneck attention (stage 4), ResNet50-T body."""
    return _create_halonet(
        "va_lamhalobotnet50ts_256", "lamhalobotnet50ts", pretrained=pretrained, **kwargs
    )


@register_model
def va_halo2botnet50ts_256(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """Halo (stages 2-3) + bottleneck attention (stage 4), ResNet50-T body."""
    return _create_halonet(
        "va_halo2botnet50ts_256", "halo2botnet50ts", pretrained=pretrained, **kwargs
    )


@register_model
def test_va_halonet(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """Tiny HaloNet for fast tests (random weights)."""
    return _create_halonet("test_va_halonet", "test_va_halonet", pretrained=pretrained, **kwargs)

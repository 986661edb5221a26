"""mmdet 3.x / mmseg 1.x backbone adapter for every visionattn model.

Load it from a config with ``custom_imports = dict(imports=["visionattn.mm"])``; it registers
:class:`VisionAttnBackbone` in mmdet's and mmseg's ``MODELS`` registries (each only when that
library is installed; mmengine is required)::

    backbone = dict(
        type="VisionAttnBackbone",
        model_name="dinat_mini",
        downstream="det",            # the official detection settings (DOWNSTREAM_KWARGS)
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type="Pretrained", checkpoint="timm:dinat_mini.in1k"),
    )

The backbone builds ``timm.create_model(model_name, **model_kwargs)``, keeps the layers the
requested outputs need (``prune_intermediate_layers``) and returns the NCHW feature maps of
``out_indices`` (indices into the model's ``feature_info``) from ``forward_intermediates``.

Per-output norms: the official detection/segmentation backbones of NAT/DiNAT, BiFormer, LITv2,
FocalNet and Agent-Swin normalize the returned maps with their own LayerNorms (and drop the
classifier's final norm). NAT/DiNAT, BiFormer and LITv2 build those norms themselves
(``dense_norms=True``, set by ``downstream``); for FocalNet and Agent-Swin the adapter adds them
(``out_norms``, parameters ``out_norms.<i>``). Families without an official downstream backbone return the raw stage maps
unless ``out_norms=True``.

Pretrained weights: ``init_cfg=dict(type="Pretrained", checkpoint=...)`` where ``checkpoint``
is a local file (``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``, or
``.safetensors``), an ``http(s)://`` URL (downloaded to torch's hub cache), or a timm/visionattn
pretrained tag ``"timm:<model>.<tag>"`` (e.g. ``"timm:nat_mini.in1k"``; an optional
``pretrained_cfg_overlay`` in the init_cfg is passed to timm, e.g. ``dict(file=...)`` for a local
copy). The checkpoint may be a classification checkpoint in the official, timm or visionattn
layout, or an mmdet/mmseg checkpoint (its ``backbone.*`` part): the family's
``checkpoint_filter_fn`` maps it, relative-position tables and depth-wise focal kernels are
resized where the downstream model's sizes differ, and every key is accounted for -- each
checkpoint tensor is either loaded or dropped as not part of the backbone (classifier head,
final norm, stages after the last output), each backbone tensor is either loaded or one of the
per-output norms, which start fresh as in the official recipes. Anything else raises
``ValueError``; ``backbone.load_report`` lists the four groups.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import visionattn  # noqa: F401  (registers the models with timm)
from visionattn.registry import model_family

try:
    from mmengine.logging import print_log
    from mmengine.model import BaseModule
except ImportError as e:  # pragma: no cover - exercised only without the mm extra
    raise ImportError(
        "visionattn.mm needs mmengine (and mmdet and/or mmsegmentation); install the `mm` "
        "extra with `make setup-mm` (README, 'Detection and segmentation')"
    ) from e

__all__ = [
    "DOWNSTREAM_KWARGS",
    "TransposedFPN",
    "VisionAttnBackbone",
    "downstream_kwargs",
    "load_checkpoint_file",
    "resize_kernel",
]

# ----------------------------------------------------------------------------------------------
# official downstream settings

_DINAT_DET_DIL = {  # SHI-Labs/Neighborhood-Attention-Transformer detection/configs/dinat*/
    (3, 4, 6, 5): [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3, 1, 3, 1]],
    (3, 4, 18, 5): [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7] * 3, [1, 3, 1, 3, 1]],
    (2, 2, 6, 2): [[1, 28], [1, 14], [1, 3, 1, 5, 1, 7], [1, 3]],
    (2, 2, 18, 2): [[1, 28], [1, 14], [1, 3, 1, 5, 1, 7] * 3, [1, 3]],
}
_DINAT_SEG_DIL = {  # ... segmentation/configs/dinat*/ (512x512 crops)
    (3, 4, 6, 5): [[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4], [1, 2, 1, 2, 1]],
    (3, 4, 18, 5): [[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4] * 3, [1, 2, 1, 2, 1]],
    (2, 2, 6, 2): [[1, 16], [1, 8], [1, 2, 1, 3, 1, 4], [1, 2]],
    (2, 2, 18, 2): [[1, 16], [1, 8], [1, 2, 1, 3, 1, 4] * 3, [1, 2]],
}
_DINAT_DEPTHS = {
    "dinat_mini": (3, 4, 6, 5),
    "dinat_tiny": (3, 4, 18, 5),
    "dinat_small": (3, 4, 18, 5),
    "dinat_base": (3, 4, 18, 5),
    "dinat_s_tiny": (2, 2, 6, 2),
    "dinat_s_small": (2, 2, 18, 2),
    "dinat_s_base": (2, 2, 18, 2),
}

#: family -> task ("det" / "seg") -> model kwargs of the official downstream backbone
#: (DiNAT's dilations depend on the variant: see :func:`downstream_kwargs`).
DOWNSTREAM_KWARGS: dict[str, dict[str, dict[str, Any]]] = {
    # NAT / DiNAT: a LayerNorm per output, no final norm (official norm0..norm3).
    "nat": {"det": dict(dense_norms=True), "seg": dict(dense_norms=True)},
    "dinat": {"det": dict(dense_norms=True), "seg": dict(dense_norms=True)},
    # BiFormer (rayleizhu/BiFormer object_detection / semantic_segmentation configs):
    # 16 regions per side for ~800x1333 detection, 8 for 512x512 segmentation, auto_pad, and
    # the LayerNorm2d per output ("extra_norms").
    "biformer": {
        "det": dict(n_win=16, auto_pad=True, dense_norms=True),
        "seg": dict(n_win=8, auto_pad=True, dense_norms=True),
    },
    # FocalNet (microsoft/FocalNet detection / segmentation configs): first focal kernel 9
    # (kernels 9, 11[, 13]) instead of the classification 3; norm{i} per output (adapter).
    "focalnet": {
        "det": dict(focal_windows=(9, 9, 9, 9)),
        "seg": dict(focal_windows=(9, 9, 9, 9)),
    },
    # EfficientViT (microsoft/Cream EfficientViT/downstream): the classification model as is.
    "efficientvit": {"det": {}, "seg": {}},
    # LITv2 (ziplab/LITv2 detection / segmentation): the classification settings (alpha,
    # local windows; HiLo pads to its window by itself) with out norms on stages 1-3.
    "litv2": {"det": dict(dense_norms=True), "seg": dict(dense_norms=True)},
    # Agent attention (LeapLabTHU/Agent-Attention downstream/detection|segmentation configs):
    # more agents for the larger maps -- pooled onto these grids per stage, the classification
    # biases resized along the agent axis at every forward (the stored biases keep their
    # shapes, so classification checkpoints load unchanged). Agent-Swin adds norm{i} per output
    # (adapter), Agent-PVT none. (The segmentation Agent-Swin-S config lists (7, 7) for stage 3,
    # a window-attention stage where the entry is unused.) The official downstream Agent-Swin
    # also keeps 7x7 windows with shifted odd blocks in every window stage however small the
    # map (downstream_windows), where classification makes a map that fits one window.
    "agent_swin": {
        "det": dict(
            downstream_agent_shapes=[(9, 9), (12, 12), (14, 14), (7, 7)], downstream_windows=True
        ),
        "seg": dict(
            downstream_agent_shapes=[(9, 9), (12, 12), (14, 14), (7, 7)], downstream_windows=True
        ),
    },
    "agent_pvt": {
        "det": dict(downstream_agent_shapes=[(12, 12), (16, 16), (28, 28), (28, 28)]),
        "seg": dict(downstream_agent_shapes=[(12, 12), (16, 16), (28, 28), (28, 28)]),
    },
    # No official downstream backbone: the classification model as is.
    "agent_cswin": {"det": {}, "seg": {}},
    "maxvit": {"det": {}, "seg": {}},
    "halonet": {"det": {}, "seg": {}},
}

# families whose official downstream backbone adds a norm per output in the adapter
_ADAPTER_OUT_NORMS = {"focalnet", "agent_swin"}
# model-built per-output norms (module name inside the model)
_MODEL_OUT_NORMS = "dense_norms"


def downstream_kwargs(model_name: str, task: str) -> dict[str, Any]:
    """Model kwargs the official detection (``task="det"``) or segmentation (``"seg"``)
    backbone of ``model_name``'s family uses (empty for families without one)."""
    if task not in ("det", "seg"):
        raise ValueError(f"task: must be 'det' or 'seg', got {task!r}")
    family = model_family(model_name)
    # a deep copy: callers may edit the lists (agent shapes) without touching the table
    out = copy.deepcopy(dict(DOWNSTREAM_KWARGS.get(family, {}).get(task, {})))
    if family == "dinat":
        depths = _DINAT_DEPTHS.get(model_name)
        if depths is not None:
            table = _DINAT_DET_DIL if task == "det" else _DINAT_SEG_DIL
            out["dilations"] = [list(d) for d in table[depths]]
    return out


# ----------------------------------------------------------------------------------------------
# checkpoint loading


def load_checkpoint_file(
    checkpoint: str, pretrained_cfg_overlay: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """State dict (possibly still wrapped) from a local file, an http(s) URL or a
    ``"timm:<model>.<tag>"`` pretrained tag. Tensors only are loaded (``weights_only``)."""
    if not isinstance(checkpoint, str) or not checkpoint:
        raise TypeError(f"checkpoint: must be a non-empty string, got {checkpoint!r}")
    if checkpoint.startswith("timm:"):
        tag = checkpoint[len("timm:") :]
        model = timm.create_model(
            tag, pretrained=True, pretrained_cfg_overlay=dict(pretrained_cfg_overlay or {})
        )
        return model.state_dict()
    if pretrained_cfg_overlay:
        raise ValueError("pretrained_cfg_overlay: only used with a 'timm:<model>.<tag>' checkpoint")
    if checkpoint.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(
            checkpoint, map_location="cpu", weights_only=True, check_hash=False
        )
    path = os.path.expanduser(checkpoint)
    if not os.path.isfile(path):
        raise ValueError(
            f"checkpoint: {checkpoint!r} is not a file, an http(s) URL or a 'timm:<model>.<tag>' "
            "pretrained tag"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def resize_kernel(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Depth-wise conv kernel ``[C, 1, kh, kw]`` to ``size`` by centred zero padding or centred
    cropping (FocalNet's rule for its focal kernels: a larger kernel whose centre is the
    pretrained one computes the same map)."""
    kh, kw = weight.shape[-2:]
    th, tw = size
    if (th - kh) % 2 or (tw - kw) % 2:
        raise ValueError(f"size: {size} and the kernel {(kh, kw)} must differ by even amounts")
    if th >= kh and tw >= kw:
        ph, pw = (th - kh) // 2, (tw - kw) // 2
        return F.pad(weight, (pw, pw, ph, ph))
    if th <= kh and tw <= kw:
        ch, cw = (kh - th) // 2, (kw - tw) // 2
        return weight[..., ch : ch + th, cw : cw + tw].contiguous()
    raise ValueError(f"size: {size} grows one axis and shrinks the other of kernel {(kh, kw)}")


def _resize_table(table: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Bicubic resize of a ``[heads, a, b]`` relative-position table to ``shape``."""
    out = F.interpolate(table.float()[None], size=tuple(shape[-2:]), mode="bicubic")[0]
    return out.to(table.dtype)


def _square_table(v: torch.Tensor, t: torch.Tensor) -> bool:
    return (
        v.shape[1] == t.shape[1]
        and math.isqrt(v.shape[0]) ** 2 == v.shape[0]
        and math.isqrt(t.shape[0]) ** 2 == t.shape[0]
    )


_TABLE_KEYS = re.compile(r"(^|\.)(rpb|relative_position_bias_table)$")


def _fit_shapes(
    sd: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Resize relative-position tables and depth-wise kernels whose size differs from the
    model's; any other shape difference raises ``ValueError``."""
    bad = []
    for k, v in list(sd.items()):
        if k not in target or target[k].shape == v.shape:
            continue
        t = target[k]
        if _TABLE_KEYS.search(k) and v.ndim == t.ndim == 3 and v.shape[0] == t.shape[0]:
            sd[k] = _resize_table(v, t.shape)
        elif _TABLE_KEYS.search(k) and v.ndim == t.ndim == 2 and _square_table(v, t):
            # Swin's layout: [(2w-1)^2, heads], row-major over (dy, dx)
            h, n_in, n_out = v.shape[1], math.isqrt(v.shape[0]), math.isqrt(t.shape[0])
            grid = _resize_table(v.t().reshape(h, n_in, n_in), torch.Size((h, n_out, n_out)))
            sd[k] = grid.reshape(h, n_out * n_out).t().contiguous()
        elif v.ndim == t.ndim == 4 and v.shape[:2] == t.shape[:2] and v.shape[1] == 1:
            sd[k] = resize_kernel(v, tuple(t.shape[-2:]))
        else:
            bad.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(t.shape)}")
    if bad:
        raise ValueError("checkpoint: shapes that cannot be adapted: " + "; ".join(bad[:10]))
    return sd


# ----------------------------------------------------------------------------------------------
# the backbone


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (the official per-output ``norm{i}``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _default_out_indices(model: nn.Module) -> tuple[int, ...]:
    # the levels a detection/segmentation neck takes: every feature at stride >= 4
    return tuple(i for i, f in enumerate(model.feature_info) if f["reduction"] >= 4)


class VisionAttnBackbone(BaseModule):
    """Any visionattn (or timm) model as an mmdet/mmseg backbone.

    Args:
        model_name: registered timm name (``"dinat_mini"``, ``"va_focalnet_tiny_srf"``, ...).
        out_indices: indices into the model's ``feature_info`` to return (default: every level
            at stride >= 4, i.e. the four strides 4..32 of a hierarchical model).
        model_kwargs: constructor kwargs for ``timm.create_model`` (override ``downstream``).
        downstream: ``"det"``/``"seg"`` to start from the official downstream settings of the
            family (:func:`downstream_kwargs`), None for the classification settings.
        out_norms: add a channel LayerNorm per output; None (default) follows the official
            downstream backbone (only FocalNet needs the adapter's; NAT/DiNAT/BiFormer have
            ``dense_norms``).
        frozen_stages: -1 trains everything; 0 freezes the stem; ``k >= 1`` freezes the stem and
            everything up to the output of level ``k - 1`` (frozen parts stay in eval mode).
        norm_eval: keep every BatchNorm in eval mode while training (small per-GPU batches).
        with_cp: gradient checkpointing (``model.set_grad_checkpointing``).
        init_cfg: mmengine init config; ``dict(type="Pretrained", checkpoint=...)`` loads weights
            as the module docstring describes.
    """

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        downstream: str | None = None,
        out_norms: bool | None = None,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        init_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(model_name, str) or not timm.is_model(model_name):
            raise ValueError(f"model_name: {model_name!r} is not a registered timm model")
        kwargs = downstream_kwargs(model_name, downstream) if downstream is not None else {}
        kwargs.update(model_kwargs or {})
        for bad in ("pretrained", "features_only", "num_classes"):
            if bad in kwargs:
                raise ValueError(
                    f"model_kwargs: {bad!r} is set by the adapter (use init_cfg for weights)"
                )
        self.model_name = model_name
        self.model_kwargs = kwargs
        net = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
        n_levels = len(net.feature_info)
        if out_indices is None:
            out_indices = _default_out_indices(net)
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or any(not 0 <= i < n_levels for i in out_indices):
            raise ValueError(f"out_indices: must be in [0, {n_levels}), got {out_indices}")
        if list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"out_indices: must be strictly increasing, got {out_indices}")
        self.out_indices = out_indices
        self.out_channels = [net.feature_info[i]["num_chs"] for i in out_indices]
        self.strides = [net.feature_info[i]["reduction"] for i in out_indices]
        self._levels = [f["module"] for f in net.feature_info]
        self._first_level = _default_out_indices(net)[0] if _default_out_indices(net) else 0
        net.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
        self.model = net
        family = _family_or_none(model_name)
        if out_norms is None:
            out_norms = family in _ADAPTER_OUT_NORMS
        self.out_norms = (
            nn.ModuleList(_ChannelNorm(c) for c in self.out_channels) if out_norms else None
        )
        if not -1 <= frozen_stages <= n_levels - self._first_level:
            raise ValueError(f"frozen_stages: must be -1 or a level count, got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        if with_cp:
            net.set_grad_checkpointing(True)
        self.load_report: dict[str, list[str]] | None = None
        self._freeze()

    # -- training state -----------------------------------------------------------------------

    def _frozen_param_names(self) -> list[str]:
        if self.frozen_stages < 0:
            return []
        names = [n for n, _ in self.model.named_parameters()]
        if self.frozen_stages == 0:
            first = self._levels[self._first_level]
            stop = next(i for i, n in enumerate(names) if n.startswith(first + "."))
        else:
            last = self._levels[self._first_level + self.frozen_stages - 1]
            idx = [i for i, n in enumerate(names) if n.startswith(last + ".")]
            if not idx:
                raise ValueError(f"frozen_stages: level {last!r} has no parameters to freeze")
            stop = idx[-1] + 1
        return names[:stop]

    def _freeze(self) -> None:
        frozen = set(self._frozen_param_names())
        for n, p in self.model.named_parameters():
            if n in frozen:
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> VisionAttnBackbone:
        super().train(mode)
        if mode and self.frozen_stages >= 0:
            for m in self.model.modules():
                params = list(m.parameters())
                if params and not any(p.requires_grad for p in params):
                    m.eval()
        if mode and self.norm_eval:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[B, 3, H, W]`` -> one NCHW map per ``out_indices`` entry."""
        feats = self.model.forward_intermediates(
            x, indices=list(self.out_indices), intermediates_only=True, output_fmt="NCHW"
        )
        if self.out_norms is not None:
            feats = [norm(f) for norm, f in zip(self.out_norms, feats)]
        return tuple(feats)

    # -- weights ------------------------------------------------------------------------------

    def init_weights(self) -> None:
        cfg = self.init_cfg
        # The timm model initialised itself when built (its own init scheme); only a
        # Pretrained init_cfg changes anything.
        if cfg is not None:
            if not isinstance(cfg, Mapping) or cfg.get("type") != "Pretrained":
                raise ValueError(f"init_cfg: only dict(type='Pretrained', ...) or None, got {cfg}")
            extra = set(cfg) - {"type", "checkpoint", "pretrained_cfg_overlay"}
            if extra:
                raise ValueError(f"init_cfg: unsupported keys {sorted(extra)} for Pretrained")
            self.load_pretrained(cfg["checkpoint"], cfg.get("pretrained_cfg_overlay"))
        self._is_init = True

    def load_pretrained(
        self, checkpoint: str, pretrained_cfg_overlay: Mapping[str, Any] | None = None
    ) -> dict[str, list[str]]:
        """Load a checkpoint (see the module docstring) with every key accounted for.

        The family's ``checkpoint_filter_fn`` maps it onto the whole model (same kwargs); it
        must then hold every tensor the backbone keeps (per-output norms may be new) and
        nothing the whole model has no place for. Returns (and stores as ``load_report``)
        ``loaded`` (backbone tensors taken from the checkpoint), ``new`` (per-output norms not
        in the checkpoint: fresh init), ``dropped`` (checkpoint tensors outside the backbone:
        classifier head, final norm, stages after the last output) and ``resized``
        (relative-position tables / depth-wise kernels adapted in size).
        """
        raw = _unwrap(load_checkpoint_file(checkpoint, pretrained_cfg_overlay))
        own_norms = {
            k[len("out_norms.") :]: v for k, v in raw.items() if k.startswith("out_norms.")
        }
        if own_norms:  # a checkpoint of this adapter (an mmdet/mmseg model's backbone)
            raw = {k.removeprefix("model."): v for k, v in raw.items() if k.startswith("model.")}
        net = self.model
        target = net.state_dict()
        # the whole classification model the checkpoint is mapped onto (keys and shapes)
        torch_state = torch.random.get_rng_state()
        full = timm.create_model(self.model_name, pretrained=False, **self.model_kwargs)
        torch.random.set_rng_state(torch_state)
        full_sd = full.state_dict()
        module = importlib.import_module(type(full).__module__)
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        sd = dict(filter_fn(dict(raw), full) if filter_fn is not None else raw)
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        before = {k: tuple(v.shape) for k, v in sd.items()}
        sd = _fit_shapes(sd, {k: v for k, v in target.items()})
        resized = sorted(k for k, v in sd.items() if tuple(v.shape) != before[k])

        norms = _MODEL_OUT_NORMS + "."
        # A filter may fill per-output norms a classification checkpoint lacks from the model
        # itself (NAT's does): values equal to the model's own init count as new, not loaded.
        fresh = {
            k for k in full_sd
            if k.startswith(norms) and k in sd and torch.equal(sd[k], full_sd[k])
        }  # fmt: skip
        classifier = _classifier_prefixes(full)
        # what the backbone needs: every tensor it keeps (the parts pruned away -- classifier,
        # final norm, later stages -- may be absent, e.g. from a detection checkpoint)
        missing = [k for k in target if k not in sd and not k.startswith(norms)]
        extra = [k for k in sd if k not in full_sd]
        if len(set(raw) & set(full_sd)) * 2 >= len(raw):
            # a checkpoint in the model's own naming: what the filter discarded is accounted
            # for by name too (a classifier, a replaced final norm, a recomputed buffer)
            extra += [k for k in raw if k not in sd]
        if self.model_kwargs.get(_MODEL_OUT_NORMS):
            # The family filter maps a classification checkpoint into the per-output-norm
            # layout by leaving out its classifier and final norm; map it into the
            # classification layout too, so that those are accounted for (as dropped).
            cls_kwargs = {k: v for k, v in self.model_kwargs.items() if k != _MODEL_OUT_NORMS}
            torch_state = torch.random.get_rng_state()
            full_cls = timm.create_model(self.model_name, pretrained=False, **cls_kwargs)
            torch.random.set_rng_state(torch_state)
            cls_sd = filter_fn(dict(raw), full_cls) if filter_fn is not None else raw
            extra += [k for k in cls_sd if k not in sd and k not in extra]
        dropped_extra = [k for k in extra if _droppable(k, full, full_sd, classifier)]
        unknown = sorted(set(extra) - set(dropped_extra))
        if missing or unknown:
            raise ValueError(
                f"checkpoint: {checkpoint!r} does not match {self.model_name} "
                f"(model tensors not in the checkpoint: {missing[:10]}; checkpoint tensors "
                f"the model does not have: {unknown[:10]})"
            )
        load = {k: v for k, v in sd.items() if k in target and k not in fresh}
        result = net.load_state_dict(load, strict=False)
        assert not result.unexpected_keys
        new = sorted(result.missing_keys)
        if any(not k.startswith(norms) for k in new):
            raise ValueError(
                f"checkpoint: backbone tensors missing from {checkpoint!r}: {new[:10]}"
            )
        if self.out_norms is not None:
            if own_norms:
                self.out_norms.load_state_dict(own_norms)
            else:
                new += [f"out_norms.{k}" for k in self.out_norms.state_dict()]
        loaded = sorted(load) + [f"out_norms.{k}" for k in own_norms]
        dropped = sorted({k for k in sd if k not in target} | set(dropped_extra))
        self.load_report = dict(loaded=loaded, new=new, dropped=dropped, resized=resized)
        print_log(
            f"VisionAttnBackbone({self.model_name}): loaded {len(loaded)} tensors from "
            f"{checkpoint}; new {len(new)} (per-output norms), dropped {len(dropped)} "
            f"(outside the backbone), resized {len(resized)}",
            logger="current",
        )
        return self.load_report


def _family_or_none(name: str) -> str | None:
    try:
        return model_family(name)
    except ValueError:
        return None  # a timm model that is not ours


def _unwrap(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The tensor dict inside a checkpoint (training-script wrappers, DDP ``module.``
    prefixes, and the ``backbone.`` part of an mmdet/mmseg checkpoint)."""
    sd: Mapping[str, Any] = raw
    for _ in range(3):
        if any(isinstance(v, torch.Tensor) for v in sd.values()):
            break
        for key in ("state_dict", "model", "state_dict_ema", "model_ema", "module"):
            if isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
        else:
            raise ValueError(f"checkpoint: no tensors found; top-level keys {list(sd)[:10]}")
    out = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in out):
        out = {k[len("backbone.") :]: v for k, v in out.items() if k.startswith("backbone.")}
    return out


def _droppable(key: str, full: nn.Module, full_sd: Mapping[str, Any], classifier: tuple) -> bool:
    """A checkpoint tensor the backbone may leave out although ``full`` has no slot for it: a
    classifier, the final ``norm`` of a model whose per-output norms replace it, or a buffer
    the model recomputes (non-persistent in ``full``)."""
    if key.startswith(classifier):
        return True
    if key.startswith("norm.") and not any(k.startswith("norm.") for k in full_sd):
        return True
    parent, _, name = key.rpartition(".")
    try:
        module = full.get_submodule(parent)
    except AttributeError:
        return False
    return name in getattr(module, "_non_persistent_buffers_set", ()) or (
        hasattr(module, name) and not isinstance(getattr(module, name), nn.Module)
        and key not in full_sd
    )  # fmt: skip


def _classifier_prefixes(net: nn.Module) -> tuple[str, ...]:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(n + "." for n in names)


def _transposed_fpn_class() -> type | None:
    """``TransposedFPN``: mmdet's FPN plus finer levels made by stride-2 transposed convs.

    EfficientViT's detection neck (microsoft/Cream ``EfficientViT/downstream/efficientvit_fpn.py``,
    ``EfficientViTFPN``): its backbone ends at strides 16/32/64, so the FPN adds
    ``num_extra_trans_convs`` levels above its finest one: each is a 2x2 stride-2 transposed conv
    of the previous (starting from the finest lateral after the top-down pass), followed by its
    own 3x3 output conv; they come first in the output tuple. ``num_outs`` counts them.
    Defined only when mmdet is installed.
    """
    try:
        from mmcv.cnn import ConvModule
        from mmdet.models.necks import FPN
    except ImportError:
        return None

    class TransposedFPN(FPN):
        def __init__(
            self,
            in_channels: list[int],
            out_channels: int,
            num_outs: int,
            num_extra_trans_convs: int = 0,
            **kwargs: Any,
        ) -> None:
            if not 0 <= num_extra_trans_convs < num_outs:
                raise ValueError(
                    f"num_extra_trans_convs: must be in [0, num_outs={num_outs}), "
                    f"got {num_extra_trans_convs}"
                )
            if kwargs.get("norm_cfg") is not None:
                raise ValueError("norm_cfg: TransposedFPN supports only None (as published)")
            super().__init__(in_channels, out_channels, num_outs - num_extra_trans_convs, **kwargs)
            self.num_extra_trans_convs = num_extra_trans_convs
            self.trans_convs = nn.ModuleList(
                nn.ConvTranspose2d(out_channels, out_channels, 2, stride=2)
                for _ in range(num_extra_trans_convs)
            )
            self.trans_fpn_convs = nn.ModuleList(
                ConvModule(out_channels, out_channels, 3, padding=1, act_cfg=None, inplace=False)
                for _ in range(num_extra_trans_convs)
            )

        def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            if len(inputs) != len(self.in_channels):
                raise ValueError(
                    f"inputs: expected {len(self.in_channels)} maps, got {len(inputs)}"
                )
            lat = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
            for i in range(len(lat) - 1, 0, -1):  # top-down pathway
                if "scale_factor" in self.upsample_cfg:
                    up = F.interpolate(lat[i], **self.upsample_cfg)
                else:
                    up = F.interpolate(lat[i], size=lat[i - 1].shape[2:], **self.upsample_cfg)
                lat[i - 1] = lat[i - 1] + up
            finer = []
            x = lat[0]
            for conv in self.trans_convs:
                x = conv(x)
                finer.insert(0, x)
            outs = [self.fpn_convs[i](lat[i]) for i in range(len(lat))]
            n = len(lat)
            if self.num_outs > n:  # coarser extra levels, as mmdet's FPN makes them
                if not self.add_extra_convs:
                    outs += [F.max_pool2d(outs[-1], 1, stride=2) for _ in range(self.num_outs - n)]
                else:
                    src = {
                        "on_input": inputs[self.backbone_end_level - 1],
                        "on_lateral": lat[-1],
                        "on_output": outs[-1],
                    }[self.add_extra_convs]
                    outs.append(self.fpn_convs[n](src))
                    for i in range(n + 1, self.num_outs):
                        prev = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                        outs.append(self.fpn_convs[i](prev))
            extra = [conv(f) for conv, f in zip(self.trans_fpn_convs, finer)]
            return tuple(extra + outs)

    return TransposedFPN


TransposedFPN = _transposed_fpn_class()


def _register() -> list[str]:
    """Register the backbone in mmdet's and mmseg's MODELS (those installed)."""
    done = []
    for lib in ("mmdet", "mmseg"):
        try:
            registry = importlib.import_module(f"{lib}.registry").MODELS
        except ImportError:
            continue
        registry.register_module(module=VisionAttnBackbone, force=True)
        if lib == "mmdet" and TransposedFPN is not None:
            registry.register_module(module=TransposedFPN, force=True)
        done.append(lib)
    return done


REGISTERED_IN = _register()

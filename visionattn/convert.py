"""Checkpoint conversion: official repositories' and timm's weights into visionattn models.

Each family module in ``visionattn.backbones`` that supports conversion provides

- ``from_official(state_dict, official_kwargs=None, *, variant=None, family=...)`` -> model
  (official constructor argument names in ``official_kwargs``; a named official ``variant``
  supplies them when not given), and/or
- ``from_timm(timm_model_name, state_dict)`` -> model, for families timm already ships.

This module only routes a request to the family that owns it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
from torch import nn

__all__ = ["OFFICIAL_FAMILIES", "TIMM_PREFIXES", "from_official", "from_timm", "unwrap_state_dict"]


def _declared(attr: str) -> dict[str, str]:
    """``attr`` entries the family modules declare -> the module declaring them.

    A family module lists the official family names it converts in ``OFFICIAL_FAMILIES`` and
    the timm model-name prefixes it converts in ``TIMM_PREFIXES``; adding a family is adding
    its file, with no second list here to keep in sync.
    """
    from visionattn.backbones import family_modules

    out: dict[str, str] = {}
    for module_name, mod in family_modules().items():
        for key in getattr(mod, attr, ()):
            if key in out:
                raise RuntimeError(
                    f"{attr}: {key!r} is declared by both {out[key]} and {module_name}"
                )
            out[key] = module_name
    return out


# official family name -> family module in visionattn.backbones
OFFICIAL_FAMILIES: dict[str, str] = _declared("OFFICIAL_FAMILIES")

# timm model-name prefix -> family module in visionattn.backbones
TIMM_PREFIXES: dict[str, str] = _declared("TIMM_PREFIXES")

# keys official training scripts wrap their weights in
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module", "model_state")


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Return the tensor state dict inside an official checkpoint.

    Accepts a bare state dict or one nested under a wrapper key (``model``, ``state_dict``,
    ...), and strips a DDP ``module.`` prefix.
    """
    sd: Mapping[str, Any] = checkpoint
    for _ in range(3):
        if any(isinstance(v, torch.Tensor) for v in sd.values()):
            break
        for key in _WRAPPER_KEYS:
            if isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
        else:
            raise ValueError(
                "checkpoint: found no tensors at the top level nor under any of "
                f"{_WRAPPER_KEYS}; top-level keys are {list(sd)[:10]}"
            )
    out = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise ValueError("checkpoint: contains no tensors")
    return out


def _family_module(module_name: str) -> ModuleType:
    return importlib.import_module(f"visionattn.backbones.{module_name}")


def from_official(
    family: str,
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
) -> nn.Module:
    """Build our model from an official checkpoint and load its converted weights.

    Args:
        family: one of ``OFFICIAL_FAMILIES`` (``"nat"``, ``"dinat"``, ``"biformer"``, ...).
        state_dict: the official state dict, or a checkpoint wrapping it.
        official_kwargs: the official constructor's own keyword arguments; when omitted,
            ``variant`` (an official variant name such as ``"dinat_mini"``) supplies them.
        variant: official variant name, used when ``official_kwargs`` is not given.

    Returns:
        Our model in eval mode with every official weight loaded (strict).
    """
    if family not in OFFICIAL_FAMILIES:
        raise ValueError(f"family: {family!r} is not one of {sorted(OFFICIAL_FAMILIES)}")
    if official_kwargs is None and variant is None:
        raise ValueError("official_kwargs: give the official constructor kwargs or a variant name")
    mod = _family_module(OFFICIAL_FAMILIES[family])
    fn = getattr(mod, "from_official", None)
    if fn is None:
        raise ValueError(f"family: {family!r} has no official-checkpoint converter yet")
    model = fn(
        unwrap_state_dict(state_dict),
        None if official_kwargs is None else dict(official_kwargs),
        variant=variant,
        family=family,
    )
    return model.eval()


def timm_family(timm_model_name: str) -> str:
    """Family module that converts the given timm model's weights."""
    base = timm_model_name.split(".", 1)[0]
    for prefix, module_name in TIMM_PREFIXES.items():
        if base.startswith(prefix):
            return module_name
    raise ValueError(
        f"timm_model_name: {timm_model_name!r} is not a timm model visionattn converts "
        f"(known prefixes: {sorted(TIMM_PREFIXES)})"
    )


def from_timm(timm_model_name: str, state_dict: Mapping[str, Any]) -> nn.Module:
    """Build our counterpart of a timm model and load that timm model's weights into it."""
    mod = _family_module(timm_family(timm_model_name))
    model = mod.from_timm(timm_model_name.split(".", 1)[0], unwrap_state_dict(state_dict))
    return model.eval()

"""What every family's converter ends with: build the registered model, load the converted
weights strictly, remember the build arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["build_converted", "head_classes", "registered_variant"]


def build_converted(
    name: str,
    args: Mapping[str, Any],
    convert: Callable[[nn.Module], Mapping[str, torch.Tensor]],
) -> nn.Module:
    """``timm.create_model(name, **args)`` with ``convert(model)`` loaded strictly, in eval mode.

    Built through timm so the model carries its ``pretrained_cfg``; ``model.model_args`` keeps
    ``args``, which is what rebuilds it (a Hub ``config.json``'s ``model_args``).
    """
    import timm  # deferred: create_model needs the family modules' registrations done

    model = timm.create_model(name, pretrained=False, **args)
    model.load_state_dict(convert(model), strict=True)
    model.model_args = dict(args)
    return model.eval()


def head_classes(state_dict: Mapping[str, torch.Tensor], key: str) -> int:
    """Number of classes of a checkpoint's classifier weight ``key`` (0 when headless)."""
    return int(state_dict[key].shape[0]) if key in state_dict else 0


def registered_variant(
    model_cls: type, variants: Mapping[str, Mapping[str, Any]], args: Mapping[str, Any]
) -> str:
    """Name (``va_`` + key) of the registered variant whose config ``args`` reproduces.

    Only a label for the rebuilt model: ``args`` are always passed in full, so a config that
    matches no variant still builds correctly under the first variant's name.
    """

    def norm(v: Any) -> Any:
        return tuple(norm(x) for x in v) if isinstance(v, (list, tuple)) else v

    defaults = {
        k: p.default
        for k, p in inspect.signature(model_cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    for name, cfg in variants.items():
        full = {**defaults, **cfg}
        if all(
            norm(v) == norm(full[k]) for k, v in args.items() if k in full and k != "num_classes"
        ):
            return "va_" + name
    return "va_" + next(iter(variants))

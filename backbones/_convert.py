"""What every family's converter ends with: build the registered model, load the converted
weights strictly, remember the build arguments."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["build_converted"]


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

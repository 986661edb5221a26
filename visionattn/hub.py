"""Hub-format export: a folder timm loads (``config.json`` + ``model.safetensors``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models import load_checkpoint
from timm.models._hub import save_for_hf
from torch import nn

__all__ = ["save_hub_folder", "load_weights"]


def save_hub_folder(
    model: nn.Module,
    directory: str | Path,
    *,
    model_args: dict[str, Any] | None = None,
    pretrained_tag: str | None = None,
) -> Path:
    """Write ``model`` as a timm Hub folder and return its path.

    ``model_args`` are the keyword arguments that rebuild the model from its registered name
    (``timm.create_model(architecture, **model_args)``); give them when the model was built
    with a non-default configuration, so ``timm.create_model("local-dir:<dir>")`` rebuilds it.
    """
    if not hasattr(model, "pretrained_cfg"):
        raise TypeError("model: needs a timm pretrained_cfg (build it with timm.create_model)")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory: {directory} exists and is not a folder")
    cfg = dict(model.pretrained_cfg)
    if pretrained_tag is not None:
        cfg["tag"] = pretrained_tag
    model.pretrained_cfg = cfg
    save_for_hf(model, str(directory), model_args=model_args or None, safe_serialization=True)
    return directory


def load_weights(model: nn.Module, file: str | Path, strict: bool = True) -> nn.Module:
    """Load a ``.safetensors``/``.pth`` file of ours into ``model`` (timm's loader)."""
    path = Path(file)
    if not path.is_file():
        raise ValueError(f"file: {path} does not exist")
    load_checkpoint(model, str(path), strict=strict)
    return model

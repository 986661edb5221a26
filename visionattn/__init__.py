"""visionattn: efficient-attention vision backbones for timm on one shared kernel layer.

``import visionattn`` registers every model with timm, so ``timm.create_model(name)`` works
for every name in :func:`list_models`.
"""

from __future__ import annotations

from visionattn import backbones as _backbones  # noqa: F401  (registers the models)
from visionattn.registry import list_families, list_models, model_family

__version__ = "0.1.0"

__all__ = ["__version__", "list_families", "list_models", "model_family"]

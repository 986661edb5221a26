"""Backbone families, one module per family, each registering its models with timm.

Importing this package imports every family module found in it, so adding a family is
adding a file: nothing here lists them by hand.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["family_modules"]


def _import_families() -> dict[str, ModuleType]:
    mods: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        mods[info.name] = importlib.import_module(f"{__name__}.{info.name}")
    return mods


_FAMILY_MODULES = _import_families()


def family_modules() -> dict[str, ModuleType]:
    """Family module name -> imported module, for every family in this package."""
    return dict(_FAMILY_MODULES)

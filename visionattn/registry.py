"""Which timm models are ours, and which family each belongs to.

Derived from timm's registry (a model is ours when its entrypoint lives in
``visionattn.backbones.*``), so there is no second list to keep in sync.
"""

from __future__ import annotations

import fnmatch

import timm
from timm.models import get_pretrained_cfg, is_model
from timm.models._registry import _model_entrypoints

from visionattn.backbones import family_modules

_PREFIX = "visionattn.backbones."


def _families_of_module(module_name: str) -> tuple[str, ...]:
    mod = family_modules()[module_name]
    return tuple(getattr(mod, "FAMILIES", (module_name,)))


def model_family(name: str) -> str:
    """Family of a registered visionattn model (e.g. ``"dinat"`` for ``"dinat_mini"``).

    A family module may declare ``FAMILIES``; the longest of them found in the model name
    wins (``dinat`` over ``nat``), else the module's first family.
    """
    if not is_model(name):
        raise ValueError(f"name: {name!r} is not a registered model")
    module = _model_entrypoints[name].__module__
    if not module.startswith(_PREFIX):
        raise ValueError(f"name: {name!r} is registered by {module}, not by visionattn")
    fams = _families_of_module(module[len(_PREFIX) :])
    bare = name.removeprefix("test_").removeprefix("va_")
    hits = [f for f in fams if f in bare]
    return max(hits, key=len) if hits else fams[0]


def list_models(filter: str = "*", family: str | None = None) -> list[str]:
    """Every model visionattn registers, sorted; ``filter`` is a wildcard on the name."""
    names = [
        n
        for n, fn in _model_entrypoints.items()
        if fn.__module__.startswith(_PREFIX) and fnmatch.fnmatch(n, filter)
    ]
    if family is not None:
        if family not in list_families():
            raise ValueError(f"family: {family!r} is not one of {list_families()}")
        names = [n for n in names if model_family(n) == family]
    return sorted(names)


def list_families() -> list[str]:
    """Every family visionattn provides."""
    fams: set[str] = set()
    for module_name in family_modules():
        fams.update(_families_of_module(module_name))
    return sorted(fams)


def pretrained_tags(name: str) -> list[str]:
    """Pretrained tags timm knows for a model, e.g. ``["in1k"]``."""
    return sorted(
        n.split(".", 1)[1] for n in timm.list_pretrained(f"{name}.*") if n.split(".")[0] == name
    )


def default_input_size(name: str) -> tuple[int, int, int] | None:
    cfg = get_pretrained_cfg(name)
    return tuple(cfg.input_size) if cfg is not None else None

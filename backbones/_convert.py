"""What every family's converter ends with: build the registered model, load the converted
weights strictly, remember the build arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["build_converted", "head_classes", "official_variant_args", "registered_variant"]


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


# our kwargs that do not tell one variant's architecture from another's
TRAINING_ONLY_KWARGS = (
    "num_classes", "drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate", "dense_norms",
)  # fmt: skip


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


def official_variant_args(
    state_dict: Mapping[str, torch.Tensor],
    official_kwargs: Mapping[str, Any] | None,
    variant: str | None,
    *,
    label: str,
    variants: Mapping[str, Mapping[str, Any]],
    to_ours: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    default: str,
    model_cls: type | None = None,
    arch: Callable[[Mapping[str, Any]], Any] | None = None,
    aliases: Mapping[str, str] | None = None,
    head_key: str = "head.weight",
    skip: Sequence[str] = TRAINING_ONLY_KWARGS,
) -> tuple[str, dict[str, Any]]:
    """Registered name and our kwargs for an official checkpoint of a family whose official
    variants are listed in ``variants`` (registered name -> official constructor kwargs).

    ``official_kwargs`` (official names) win; without them ``variant`` (a registered name, or
    one of ``aliases``) supplies them. ``num_classes`` follows the checkpoint's head
    (``head_key``; 0 when headless), and an explicit official ``num_classes`` that disagrees
    with the head is an error. Without ``variant`` the name is the first variant with the same
    architecture: ``arch(official kwargs)`` when given, else our kwargs (on top of
    ``model_cls``'s defaults) minus ``skip``; ``default`` when none matches. The name only
    labels the model: the kwargs are always passed in full.
    """
    aliases = aliases or {}
    if variant is not None:
        variant = aliases.get(variant, variant)
        if variant not in variants:
            raise ValueError(
                f"variant: {variant!r} is not an official {label} variant "
                f"(known: {sorted(variants) + sorted(aliases)})"
            )
    if official_kwargs is None:
        if variant is None:
            raise ValueError("official_kwargs: give the official constructor kwargs or a variant")
        official_kwargs = variants[variant]
    ours = dict(to_ours(official_kwargs))
    n_cls = head_classes(state_dict, head_key)
    if head_key in state_dict and int(official_kwargs.get("num_classes", n_cls)) != n_cls:
        raise ValueError(
            f"official_kwargs: num_classes={official_kwargs['num_classes']} but the checkpoint's "
            f"head has {n_cls} outputs"
        )
    ours["num_classes"] = n_cls
    if variant is not None:
        return variant, ours
    defaults = {}
    if model_cls is not None:
        defaults = {
            k: p.default
            for k, p in inspect.signature(model_cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }

    def layout(kw: Mapping[str, Any]) -> Any:
        full = {**defaults, **to_ours(kw)}
        return {k: _plain(v) for k, v in full.items() if k not in skip}

    key = arch or layout
    mine = key(official_kwargs)
    return next((n for n, kw in variants.items() if key(kw) == mine), default), ours

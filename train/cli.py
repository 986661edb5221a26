"""Entry points of ``visionattn train``, ``visionattn validate`` and ``visionattn bench models``.

Each takes the argument list after its sub-command (``None``: ``sys.argv[1:]``), parses it
itself and returns a process exit code. ``python -m visionattn.train`` runs
:func:`train_main`, which is what ``accelerate launch -m visionattn.train ...`` starts on
every process.
"""

from __future__ import annotations

import argparse
import sys

from visionattn.train.bench import bench_models_main
from visionattn.train.validate import validate_main

__all__ = ["bench_models_main", "build_train_parser", "train_main", "validate_main"]


def build_train_parser() -> argparse.ArgumentParser:
    from visionattn.train.config import add_config_args

    p = argparse.ArgumentParser(
        prog="visionattn train",
        description="Train or fine-tune a timm/visionattn model for image classification. "
        "With no arguments: the embedded default (a tiny model on scikit-learn's handwritten "
        "digits, on the CPU, a few minutes). Data: --data-dir ROOT with ROOT/train/<class>/ "
        "and ROOT/val/<class>/ (ImageNet layout). Recipes: --recipe NAME (configs/NAME.yaml) "
        "or --config FILE, then any key as a flag. Several GPUs: "
        "`accelerate launch --multi_gpu --num_processes N -m visionattn.train ...`.",
    )
    add_config_args(p)
    p.add_argument("--list-recipes", action="store_true", help="print the shipped recipes")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    return p


def train_main(argv: list[str] | None = None) -> int:
    """``visionattn train``: resolve the recipe, check it, train; returns an exit code."""
    import yaml

    from visionattn.train.config import config_from_args, list_recipes

    parser = build_train_parser()
    ns = parser.parse_args(argv)
    if ns.list_recipes:
        print("\n".join(list_recipes()))
        return 0
    try:
        cfg = config_from_args(ns)
        if ns.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        from visionattn.train.trainer import train

        train(cfg)
    except ValueError as e:
        print(f"visionattn train: error: {e}", file=sys.stderr)
        return 2
    return 0

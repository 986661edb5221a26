"""Top-1/top-5 evaluation of a model on an image folder (or the embedded digits)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from visionattn.train.checkpoint import load_weights

__all__ = ["build_validate_parser", "validate", "validate_main"]


def validate(
    model_name: str | None = None,
    *,
    checkpoint: str | None = None,
    pretrained: bool = False,
    data_dir: str | None = None,
    split: str = "val",
    img_size: int | None = None,
    batch_size: int = 128,
    workers: int = 4,
    amp: str = "no",
    channels_last: bool = False,
    num_classes: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    cpu: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint (``.safetensors`` or our ``.pt``) or a pretrained tag.

    ``model_name`` may carry a pretrained tag (``"nat_mini.in1k"``); with ``checkpoint`` it
    may be omitted when the file records its model. ``data_dir=None`` evaluates on the
    embedded digits split. Returns ``{"top1", "top5", "loss", "count", ...}`` (percent).
    """
    import timm
    from timm.data import create_transform, resolve_data_config

    import visionattn  # noqa: F401  (registers our models)
    from visionattn.train.config import AMP_MODES
    from visionattn.train.data import (
        EpochBatchSampler,
        SeededTransformDataset,
        eval_dataset,
        make_loader,
    )
    from visionattn.train.trainer import evaluate, make_accelerator

    if amp not in AMP_MODES:
        raise ValueError(f"amp: must be one of {AMP_MODES}, got {amp!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if checkpoint is None and not pretrained:
        raise ValueError("checkpoint: give --checkpoint PATH or --pretrained (with a model tag)")
    if checkpoint is not None and pretrained:
        raise ValueError("pretrained: give either --checkpoint or --pretrained, not both")

    meta: dict[str, Any] = {}
    sd = None
    if checkpoint is not None:
        sd, meta = load_weights(checkpoint)
    name = model_name or meta.get("model")
    if not name:
        raise ValueError(f"model: {checkpoint!r} does not record its model; pass --model NAME")
    if not timm.is_model(name.split(".", 1)[0]):
        raise ValueError(f"model: {name!r} is not a registered timm/visionattn model")

    saved_cfg = meta.get("config") or {}
    digits_size = int(meta.get("digits_size") or saved_cfg.get("digits_size") or 32)
    dataset, classes = eval_dataset(data_dir, split, digits_size)
    if meta.get("classes") is not None and list(meta["classes"]) != list(classes):
        raise ValueError(
            f"data_dir: the folder's {len(classes)} classes do not match the "
            f"{len(meta['classes'])} classes the checkpoint was trained on"
        )
    n_cls = num_classes or meta.get("num_classes")
    kwargs: dict[str, Any] = {}
    if n_cls is not None:
        kwargs["num_classes"] = int(n_cls)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if sd is not None:
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint: weights do not fit {name} (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}); pass the right --model / --num-classes"
            )
    out_classes = model.num_classes if hasattr(model, "num_classes") else None
    if out_classes is not None and len(classes) > out_classes:
        raise ValueError(
            f"data_dir: {len(classes)} classes but the model predicts only {out_classes}"
        )

    dc = dict(resolve_data_config(model=model))
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct"):
        if meta.get(key) is not None:
            dc[key] = tuple(meta[key]) if isinstance(meta[key], list) else meta[key]
    if img_size is not None:
        dc["input_size"] = (3, img_size, img_size)
    if crop_pct is not None:
        dc["crop_pct"] = crop_pct
    if interpolation:
        dc["interpolation"] = interpolation
    tf = create_transform(
        dc["input_size"],
        is_training=False,
        interpolation=dc["interpolation"],
        mean=dc["mean"],
        std=dc["std"],
        crop_pct=dc.get("crop_pct"),
        crop_mode=dc.get("crop_mode"),
    )
    accelerator = make_accelerator(mixed_precision=amp, cpu=cpu)
    sampler = EpochBatchSampler(
        len(dataset),
        batch_size,
        shuffle=False,
        seed=0,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        drop_last=False,
    )
    loader = make_loader(
        SeededTransformDataset(dataset, tf, 0), sampler, workers, accelerator.device.type == "cuda"
    )
    model = model.to(accelerator.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    m = evaluate(
        model,
        loader,
        accelerator,
        channels_last=channels_last,
        progress=progress and accelerator.is_local_main_process,
    )
    return {
        "model": name,
        "checkpoint": checkpoint,
        "data_dir": data_dir or "embedded:digits",
        "split": split,
        "input_size": list(dc["input_size"]),
        **m,
    }


def build_validate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="visionattn validate",
        description="Top-1/top-5 accuracy of a checkpoint or pretrained model on an image "
        "folder (ImageFolder layout: <data-dir>/<split>/<class>/*.jpg).",
    )
    p.add_argument("--model", "-m", default=None, help="model name, optionally with a tag")
    p.add_argument("--checkpoint", default=None, help=".safetensors or training .pt file")
    p.add_argument("--pretrained", action="store_true", help="use the model's pretrained tag")
    p.add_argument("--data-dir", default=None, help="dataset root; default: embedded digits")
    p.add_argument("--split", default="val")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--interpolation", default=None)
    p.add_argument("--batch-size", "-b", type=int, default=128)
    p.add_argument("--workers", "-j", type=int, default=4)
    p.add_argument("--amp", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def validate_main(argv: list[str] | None = None) -> int:
    """``visionattn validate``: prints top-1/top-5; returns the process exit code."""
    import sys

    args = build_validate_parser().parse_args(argv)
    try:
        res = validate(
            args.model,
            checkpoint=args.checkpoint,
            pretrained=args.pretrained,
            data_dir=args.data_dir,
            split=args.split,
            img_size=args.img_size,
            batch_size=args.batch_size,
            workers=args.workers,
            amp=args.amp,
            channels_last=args.channels_last,
            num_classes=args.num_classes,
            crop_pct=args.crop_pct,
            interpolation=args.interpolation,
            cpu=args.cpu,
            progress=args.progress,
        )
    except ValueError as e:
        print(f"visionattn validate: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{res['model']} on {res['data_dir']}/{res['split']} ({res['count']} images): "
        f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0

"""Training curves: loss, accuracy and learning rate of a run, as one PNG."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from visionattn.train.checkpoint import atomic_write

__all__ = ["plot_history"]


def plot_history(
    history: Mapping[str, list[dict[str, Any]]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Draw ``history`` (the trainer's ``{"steps": [...], "epochs": [...]}``) to ``path``.

    Three panels: training loss per logged step and validation loss per epoch; top-1/top-5
    (and EMA top-1) per epoch; the learning rate per logged step. Written atomically with
    matplotlib's Agg backend, so it works without a display.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = history.get("steps", [])
    epochs = history.get("epochs", [])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_loss, ax_acc, ax_lr = axes

    if steps:
        ax_loss.plot([s["epoch"] for s in steps], [s["loss"] for s in steps], label="train (steps)")
    tl = [(e["epoch"], e["train_loss"]) for e in epochs if e.get("train_loss") is not None]
    if tl:
        ax_loss.plot(*zip(*tl, strict=True), "o-", label="train (epoch mean)")
    for key, label in (("val_loss", "val"), ("ema_val_loss", "val (EMA)")):
        pts = [(e["epoch"], e[key]) for e in epochs if e.get(key) is not None]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), "s--", label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")

    for key, label in (("top1", "top-1"), ("top5", "top-5"), ("ema_top1", "top-1 (EMA)")):
        pts = [(e["epoch"], e[key]) for e in epochs if e.get(key) is not None]
        if pts:
            ax_acc.plot(*zip(*pts, strict=True), "o-", label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("validation accuracy")

    if steps:
        ax_lr.plot([s["epoch"] for s in steps], [s["lr"] for s in steps])
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("learning rate")

    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    suffix = out.suffix.lstrip(".") or "png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format=suffix))
    plt.close(fig)
    return out

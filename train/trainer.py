"""The classification training loop, on accelerate.

:func:`train` runs one recipe (:class:`~visionattn.train.config.TrainConfig`) on one process
or, under ``accelerate launch``, on several: accelerate owns the process group, device
placement, DDP wrapping, mixed precision, gradient accumulation and gradient clipping.
Everything else comes from timm: the model registry, data transforms, Mixup/CutMix,
optimizers, LR schedules, EMA and losses.

A run folder holds ``last.pt`` (resumable), ``last.safetensors``/``best.safetensors``
(weights), ``config.yaml``, ``metrics.csv``, ``steps.csv``, ``metrics.json``,
``curves.png`` and, when TensorBoard is installed, ``tb/``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from visionattn.train.checkpoint import (
    atomic_write,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
    save_safetensors,
)
from visionattn.train.config import TrainConfig, config_from_dict, resolve_lr, validate_config
from visionattn.train.data import (
    EpochBatchSampler,
    SeededTransformDataset,
    build_datasets,
    make_loader,
    sample_seed,
)
from visionattn.train.graphed import (
    FlatGradients,
    GraphedTrainStep,
    broadcast_buffers,
    graph_optimizer_kwargs,
)

__all__ = ["RESUME_MUTABLE_KEYS", "build_model", "evaluate", "resolve_data", "train"]

# keys that may differ between a checkpoint's recipe and the resumed run without changing
# the numbers the run computes
RESUME_MUTABLE_KEYS = frozenset(
    {
        "resume",
        "stop_after",
        "progress",
        "workers",
        "pin_memory",
        "tensorboard",
        "data_dir",
        "output",
        "run_name",
        "checkpoint_every",
        "log_every",
        "initial_checkpoint",
        "pretrained",
    }
)

EPOCH_FIELDS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "top1",
    "top5",
    "ema_val_loss",
    "ema_top1",
    "ema_top5",
    "epoch_time_s",
    "train_img_per_s",
)
STEP_FIELDS = ("step", "epoch", "loss", "lr", "img_per_s")
TIMING_FIELDS = ("epoch_time_s", "train_img_per_s", "img_per_s")


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """``timm.create_model`` for the recipe, with its initial checkpoint loaded if given."""
    import timm

    import visionattn  # noqa: F401  (registers our models)

    kwargs = dict(cfg.model_kwargs)
    # only pass regularisation kwargs that are on, so models without them still build
    if cfg.drop_rate:
        kwargs["drop_rate"] = cfg.drop_rate
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    model = timm.create_model(
        cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, **kwargs
    )
    if cfg.initial_checkpoint:
        sd, _ = load_weights(cfg.initial_checkpoint)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"initial_checkpoint: weights do not match {cfg.model} with {num_classes} "
                f"classes (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
    return model


def resolve_data(cfg: TrainConfig, model: nn.Module) -> dict[str, Any]:
    """The model's data config (size, mean/std, interpolation, crop) with recipe overrides."""
    from timm.data import resolve_data_config

    dc = dict(resolve_data_config(model=model))
    if cfg.img_size is not None:
        dc["input_size"] = (3, cfg.img_size, cfg.img_size)
    elif cfg.data_dir is None:
        dc["input_size"] = (3, cfg.digits_size, cfg.digits_size)
    if cfg.interpolation:
        dc["interpolation"] = cfg.interpolation
    if cfg.mean is not None:
        dc["mean"] = tuple(cfg.mean) * (3 if len(cfg.mean) == 1 else 1)
    if cfg.std is not None:
        dc["std"] = tuple(cfg.std) * (3 if len(cfg.std) == 1 else 1)
    if cfg.crop_pct is not None:
        dc["crop_pct"] = cfg.crop_pct
    return dc


def _transforms(cfg: TrainConfig, dc: Mapping[str, Any]) -> tuple[Any, Any]:
    from timm.data import create_transform

    train_tf = create_transform(
        dc["input_size"],
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        vflip=cfg.vflip,
        color_jitter=cfg.color_jitter if cfg.color_jitter > 0 else None,
        auto_augment=cfg.aa,
        interpolation=cfg.train_interpolation or dc["interpolation"],
        mean=dc["mean"],
        std=dc["std"],
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )
    eval_tf = create_transform(
        dc["input_size"],
        is_training=False,
        interpolation=dc["interpolation"],
        mean=dc["mean"],
        std=dc["std"],
        crop_pct=dc.get("crop_pct"),
        crop_mode=dc.get("crop_mode"),
    )
    return train_tf, eval_tf


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    accelerator: Any,
    *,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "val",
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (percent) of ``model`` over ``loader``.

    Each process evaluates its own shard; the sums are reduced over processes, so every
    sample counts exactly once.
    """
    from tqdm.auto import tqdm

    model.eval()
    device = accelerator.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hit = topk == y[:, None]
        sums[0] += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        sums[1] += hit[:, :1].sum()
        sums[2] += hit.any(dim=-1).sum()
        sums[3] += y.numel()
    sums = accelerator.reduce(sums, reduction="sum")
    n = max(sums[3].item(), 1.0)
    return {
        "loss": sums[0].item() / n,
        "top1": 100.0 * sums[1].item() / n,
        "top5": 100.0 * sums[2].item() / n,
        "count": int(sums[3].item()),
    }


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: tuple[str, ...]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    data = buf.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_text(data))


def _write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=2, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(data))


class _TensorBoard:
    """TensorBoard scalars when ``tensorboard`` is installed, else nothing."""

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except (ImportError, ModuleNotFoundError):
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: Mapping[str, Any], step: int, prefix: str) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("step",):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _check_resume_config(cfg: TrainConfig, saved: Mapping[str, Any]) -> None:
    mine = cfg.to_dict()
    diffs = [
        (k, saved.get(k), v)
        for k, v in mine.items()
        if k not in RESUME_MUTABLE_KEYS and saved.get(k) != v
    ]
    if diffs:
        text = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, a, b in diffs[:6])
        raise ValueError(
            f"resume: the recipe differs from the checkpoint's ({text}); an exact resume needs "
            "the same recipe (pass only --resume, or change only run-control keys: "
            f"{sorted(RESUME_MUTABLE_KEYS)})"
        )


def make_accelerator(**kwargs: Any) -> Any:
    """An ``Accelerator``; in a single, non-launched process any earlier one is discarded.

    accelerate keeps its state in process-wide singletons, so a second run in the same
    python process (a notebook, the tests) with another precision would otherwise fail.
    Under ``accelerate launch``/``torchrun`` (``WORLD_SIZE`` > 1) the state is left alone.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(**kwargs)


def _fresh_accumulators(device: torch.device, keep_interval: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "epoch_loss": torch.zeros((), dtype=torch.float64, device=device),
        "epoch_count": 0,
        "train_time": 0.0,
    }
    if keep_interval is None:
        out["interval_loss"] = torch.zeros((), dtype=torch.float64, device=device)
        out["interval_count"] = 0
    return out


def _restore_accumulators(
    saved: list[dict[str, Any]], rank: int, world: int, device: torch.device
) -> dict[str, Any]:
    """This process's loss sums from a checkpoint's per-process list.

    With the same process count each process gets its own; otherwise the first process
    takes the totals and the others start from zero, so the reduced epoch mean stays right.
    """
    if len(saved) == world:
        mine = saved[rank]
    elif rank == 0:
        mine = dict(saved[0])
        for key in ("epoch_loss", "epoch_count", "interval_loss", "interval_count"):
            mine[key] = sum(s[key] for s in saved)
    else:
        return _fresh_accumulators(device)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in mine.items()}


def _run_dir(cfg: TrainConfig) -> Path:
    if cfg.resume:
        return find_checkpoint(cfg.resume).parent
    name = cfg.run_name or f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.output) / name


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) one run; returns a summary (run folder, best and final metrics).

    Raises ``ValueError`` before any work when the recipe, the data folder, the model name
    or a resumed checkpoint does not fit.
    """
    import timm
    from accelerate.utils import gather_object, set_seed
    from timm.data import Mixup
    from timm.loss import (
        BinaryCrossEntropy,
        LabelSmoothingCrossEntropy,
        SoftTargetCrossEntropy,
    )
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, adaptive_clip_grad
    from tqdm.auto import tqdm

    from visionattn.backbones._layers import clear_memos

    validate_config(cfg)
    resume_state: dict[str, Any] | None = None
    if cfg.resume:
        resume_state = load_checkpoint(cfg.resume)
        _check_resume_config(cfg, config_from_dict(resume_state["config"]).to_dict())

    train_base, val_base, classes = build_datasets(
        cfg.data_dir, cfg.train_split, cfg.val_split, cfg.digits_size
    )
    num_classes = cfg.num_classes or len(classes)
    if num_classes < len(classes):
        raise ValueError(
            f"num_classes: {num_classes} is fewer than the dataset's {len(classes)} classes"
        )
    if resume_state is not None and list(resume_state["classes"]) != list(classes):
        old, new = list(resume_state["classes"]), list(classes)
        diff = sorted(set(old) ^ set(new))[:10]
        raise ValueError(
            f"resume: the dataset's classes do not match the checkpoint's ({len(old)} in the "
            f"checkpoint, {len(new)} now; differing: {diff or 'same names, other order'})"
        )

    acc_kwargs: dict[str, Any] = {}
    if cfg.cuda_graph:
        from accelerate.utils import AutocastKwargs

        # a cached weight cast would be made once at capture and outlive it
        acc_kwargs["kwargs_handlers"] = [AutocastKwargs(cache_enabled=False)]
    accelerator = make_accelerator(
        mixed_precision=cfg.amp,
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=cfg.cpu,
        step_scheduler_with_optimizer=False,
        **acc_kwargs,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.cuda_graph and accelerator.device.type != "cuda":
        raise ValueError(f"cuda_graph: needs a CUDA device, running on {accelerator.device}")
    # several processes with cuda_graph: no DDP wrapper; the captured backward fills one flat
    # gradient buffer that a single all-reduce averages between two captured graphs
    graph_ddp = cfg.cuda_graph and world > 1
    is_main = accelerator.is_main_process
    set_seed(cfg.seed, device_specific=True)

    model = build_model(cfg, num_classes)
    dc = resolve_data(cfg, model)
    train_tf, eval_tf = _transforms(cfg, dc)
    train_ds = SeededTransformDataset(train_base, train_tf, cfg.seed)
    val_ds = SeededTransformDataset(val_base, eval_tf, cfg.seed)
    train_sampler = EpochBatchSampler(
        len(train_ds),
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        rank=rank,
        world=world,
        drop_last=True,
        multiple_of=cfg.grad_accum,
        repeats=cfg.epoch_repeats,
    )
    micro_per_epoch = len(train_sampler)
    if micro_per_epoch == 0:
        raise ValueError(
            f"batch_size: {len(train_ds)} training images are too few for batch_size "
            f"{cfg.batch_size} x {world} processes x grad_accum {cfg.grad_accum}"
        )
    updates_per_epoch = micro_per_epoch // cfg.grad_accum
    val_sampler = EpochBatchSampler(
        len(val_ds),
        cfg.val_batch_size or 2 * cfg.batch_size,
        shuffle=False,
        seed=cfg.seed,
        rank=rank,
        world=world,
        drop_last=False,
    )
    pin = cfg.pin_memory and accelerator.device.type == "cuda"
    train_loader = make_loader(train_ds, train_sampler, cfg.workers, pin)
    val_loader = make_loader(val_ds, val_sampler, cfg.workers, pin)

    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
    raw_model = model

    global_batch = cfg.batch_size * world * cfg.grad_accum
    lr = resolve_lr(cfg, global_batch)
    opt_kwargs: dict[str, Any] = {}
    if cfg.opt_eps is not None:
        opt_kwargs["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        opt_kwargs["betas"] = tuple(cfg.opt_betas)
    if cfg.cuda_graph:
        opt_kwargs.update(graph_optimizer_kwargs(cfg.opt))
    optimizer = create_optimizer_v2(
        raw_model,
        opt=cfg.opt,
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        layer_decay=cfg.layer_decay,
        **opt_kwargs,
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs - cfg.cooldown_epochs,
        cooldown_epochs=cfg.cooldown_epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        decay_epochs=cfg.decay_epochs,
        decay_milestones=list(cfg.decay_milestones),
        decay_rate=cfg.decay_rate,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )

    fwd_model: nn.Module = raw_model
    if cfg.compile:
        fwd_model = torch.compile(raw_model, mode=cfg.compile_mode)
    if graph_ddp:
        import torch.distributed as dist

        raw_model.to(accelerator.device)
        with torch.no_grad():  # DDP's start: every process from rank 0's weights
            for t in (*raw_model.parameters(), *raw_model.buffers()):
                dist.broadcast(t, src=0)
        optimizer = accelerator.prepare(optimizer)
        train_model = fwd_model
    else:
        train_model, optimizer = accelerator.prepare(fwd_model, optimizer)
    # validation runs on the un-wrapped module: DDP's buffer broadcast in forward would hang
    # when processes hold different numbers of validation batches
    eval_model = fwd_model

    ema = None
    if cfg.ema:
        ema = ModelEmaV3(raw_model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None:
        mixup_fn = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            cutmix_minmax=cfg.cutmix_minmax,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode=cfg.mixup_mode,
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )
    if cfg.bce_loss:
        # mixup already smooths its soft targets
        loss_fn: nn.Module = BinaryCrossEntropy(
            smoothing=0.0 if mixup_fn is not None else cfg.smoothing,
            target_threshold=cfg.bce_target_thresh,
        )
    elif mixup_fn is not None:
        loss_fn = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()

    def clip_gradients() -> None:
        if cfg.clip_grad is None:
            return
        if cfg.clip_mode == "norm":
            accelerator.clip_grad_norm_(train_model.parameters(), cfg.clip_grad)
        elif cfg.clip_mode == "value":
            accelerator.clip_grad_value_(train_model.parameters(), cfg.clip_grad)
        else:
            accelerator.unscale_gradients()
            adaptive_clip_grad(raw_model.parameters(), cfg.clip_grad)

    graphed: GraphedTrainStep | None = None
    if cfg.cuda_graph:
        # the eager step below without accelerate's per-step bookkeeping (no accumulation);
        # everything captured stays on the device
        inner_optimizer = getattr(optimizer, "optimizer", optimizer)
        flat_grads = FlatGradients(raw_model.parameters()) if graph_ddp else None

        def forward_backward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if flat_grads is not None:
                flat_grads.zero()
            with accelerator.autocast():
                loss = loss_fn(train_model(x), y)
            loss.backward()
            return loss.detach()

        def update() -> None:
            clip_gradients()
            inner_optimizer.step()

        def reduce() -> None:
            assert flat_grads is not None
            flat_grads.all_reduce()
            # every process keeps rank 0's BatchNorm statistics, as under DDP
            broadcast_buffers(raw_model)

        graphed = GraphedTrainStep(
            forward_backward, update, inner_optimizer, reduce=reduce if graph_ddp else None
        )

    # ---- state that a checkpoint carries
    start_epoch, start_micro, num_updates = 0, 0, 0
    history: dict[str, list[dict[str, Any]]] = {"epochs": [], "steps": []}
    best: dict[str, Any] = {"top1": None, "epoch": None}
    device = accelerator.device
    # loss sums stay float64 tensors (no per-step host sync) and are saved as such, so a
    # resumed run adds the same numbers in the same order as an uninterrupted one
    acc: dict[str, Any] = _fresh_accumulators(device)
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(resume_state["ema"])
        if resume_state.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(resume_state["scaler"])
        start_epoch = resume_state["epoch"]
        start_micro = resume_state["micro_step"]
        num_updates = resume_state["num_updates"]
        history = resume_state["history"]
        best = resume_state["best"]
        acc = _restore_accumulators(resume_state["acc"], rank, world, device)

    run_dir = _run_dir(cfg)
    tb = _TensorBoard(run_dir / "tb", cfg.tensorboard and is_main)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(cfg_text))
        n_params = sum(p.numel() for p in raw_model.parameters())
        accelerator.print(
            f"visionattn train: {cfg.model} ({n_params / 1e6:.2f}M params, {num_classes} "
            f"classes) on {world} x {accelerator.device.type}, amp={cfg.amp}, global batch "
            f"{global_batch}, lr {lr:.3g}, {cfg.epochs} epochs x {updates_per_epoch} steps, "
            f"input {tuple(dc['input_size'])} -> {run_dir}"
        )

    weights_meta = {
        "model": cfg.model,
        "num_classes": num_classes,
        "classes": list(classes),
        "input_size": list(dc["input_size"]),
        "mean": list(dc["mean"]),
        "std": list(dc["std"]),
        "interpolation": dc["interpolation"],
        "crop_pct": dc.get("crop_pct"),
        "timm_version": timm.__version__,
        "digits_size": cfg.digits_size if cfg.data_dir is None else None,
        "config": cfg.to_dict(),
    }

    def result_weights() -> dict[str, torch.Tensor]:
        return (ema.module if ema is not None else raw_model).state_dict()

    def save(epoch: int, micro_step: int) -> None:
        """Resumable checkpoint at an optimizer-step boundary (all processes must call)."""
        # every process's RNG streams and loss sums: a resume restores each one
        local = {
            "rng": capture_rng_state(),
            "acc": {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in acc.items()},
            # EMA buffers (BatchNorm statistics) follow each process's own batches
            "ema_buffers": (
                {k: b.detach().cpu() for k, b in ema.module.named_buffers()}
                if ema is not None
                else None
            ),
        }
        per_rank = gather_object([local]) if world > 1 else [local]
        if not is_main:
            accelerator.wait_for_everyone()
            return
        state = {
            "config": cfg.to_dict(),
            "classes": list(classes),
            "num_classes": num_classes,
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "epoch": epoch,
            "micro_step": micro_step,
            "num_updates": num_updates,
            "history": history,
            "best": best,
            "acc": [r["acc"] for r in per_rank],
            "rng": [r["rng"] for r in per_rank],
            "ema_buffers": [r["ema_buffers"] for r in per_rank],
            "world_size": world,
            "weights_meta": weights_meta,
            "versions": {"torch": torch.__version__, "timm": timm.__version__},
        }
        save_checkpoint(state, run_dir / "last.pt")
        accelerator.wait_for_everyone()

    def write_logs() -> None:
        if not is_main:
            return
        from visionattn.train.plot import plot_history

        _write_csv(run_dir / "metrics.csv", history["epochs"], EPOCH_FIELDS)
        _write_csv(run_dir / "steps.csv", history["steps"], STEP_FIELDS)
        _write_json(
            run_dir / "metrics.json",
            {
                "model": cfg.model,
                "classes": list(classes),
                "best": best,
                "epochs": history["epochs"],
                "steps": history["steps"],
                "config": cfg.to_dict(),
                "env": {
                    "torch": torch.__version__,
                    "timm": timm.__version__,
                    "python": platform.python_version(),
                    "device": str(accelerator.device),
                    "processes": world,
                },
            },
        )
        plot_history(history, run_dir / "curves.png", title=f"{cfg.model} - {run_dir.name}")

    if resume_state is not None:
        # after every setup step that might consume random numbers
        saved_rng = resume_state["rng"]
        if resume_state.get("world_size", 1) == world:
            restore_rng_state(saved_rng[rank])
            ema_buffers = (resume_state.get("ema_buffers") or [None] * world)[rank]
            if ema is not None and ema_buffers:
                with torch.no_grad():
                    for k, b in ema.module.named_buffers():
                        b.copy_(ema_buffers[k])
        elif is_main:
            accelerator.print(
                "resume: process count changed, RNG streams restart (the run stays valid "
                "but is no longer bit-identical to an uninterrupted one)"
            )

    progress = cfg.progress and accelerator.is_local_main_process
    epoch_bar = tqdm(
        total=cfg.epochs,
        initial=start_epoch,
        desc="epochs",
        disable=not progress,
        dynamic_ncols=True,
        position=0,
    )
    stopped = False
    t_run = time.perf_counter()
    last_log_t, last_log_step = time.perf_counter(), num_updates

    for epoch in range(start_epoch, cfg.epochs):
        skip = start_micro if epoch == start_epoch else 0
        train_sampler.set_epoch(epoch, skip=skip)
        if mixup_fn is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        train_model.train()
        step_bar = tqdm(
            total=micro_per_epoch // cfg.grad_accum,
            initial=skip // cfg.grad_accum,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not progress,
            dynamic_ncols=True,
            position=1,
        )
        t_epoch = time.perf_counter()
        # step-log rates cover training only, not the validation and saving before this
        last_log_t, last_log_step = t_epoch, num_updates
        micro = skip
        for x, y in train_loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if mixup_fn is not None:
                # Mixup draws from numpy's global RNG: seed it from the step's position so
                # the draw is the same in a resumed run and independent of the data workers
                np.random.seed(sample_seed(cfg.seed + 7919 * (rank + 1), epoch, micro))
                x, y = mixup_fn(x, y)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if graphed is not None:
                loss = graphed(x, y)
            else:
                with accelerator.accumulate(train_model):
                    with accelerator.autocast():
                        out = train_model(x)
                        loss = loss_fn(out, y)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        clip_gradients()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            micro += 1
            loss_d = loss.detach().double()
            acc["epoch_loss"] += loss_d
            acc["interval_loss"] += loss_d
            acc["epoch_count"] += 1
            acc["interval_count"] += 1
            if graphed is None and not accelerator.sync_gradients:
                continue
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(raw_model, step=num_updates)
            step_bar.update(1)
            cur_lr = optimizer.param_groups[0]["lr"]
            at_end = micro == micro_per_epoch
            if num_updates % cfg.log_every == 0 or at_end:
                now = time.perf_counter()
                mean_loss = acc["interval_loss"].item() / max(acc["interval_count"], 1)
                seen = (num_updates - last_log_step) * global_batch
                ips = seen / max(now - last_log_t, 1e-9)
                rec = {
                    "step": num_updates,
                    "epoch": epoch + micro / micro_per_epoch,
                    "loss": mean_loss,
                    "lr": cur_lr,
                    "img_per_s": ips,
                }
                history["steps"].append(rec)
                tb.scalars(rec, num_updates, "train")
                step_bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{cur_lr:.2e}", ips=f"{ips:.0f}")
                acc["interval_loss"].zero_()
                acc["interval_count"] = 0
                last_log_t, last_log_step = now, num_updates
            stop_now = cfg.stop_after is not None and num_updates >= cfg.stop_after
            ckpt_now = cfg.checkpoint_every and num_updates % cfg.checkpoint_every == 0
            if (stop_now or ckpt_now) and not at_end:
                acc["train_time"] += time.perf_counter() - t_epoch
                t_epoch = time.perf_counter()
                save(epoch, micro)
                write_logs()
            if stop_now and not at_end:
                stopped = True
                break
        step_bar.close()
        if stopped:
            break

        acc["train_time"] += time.perf_counter() - t_epoch
        loss_tot = torch.stack(
            [
                acc["epoch_loss"],
                torch.tensor(float(acc["epoch_count"]), dtype=torch.float64, device=device),
            ]
        )
        loss_tot = accelerator.reduce(loss_tot, reduction="sum")
        train_time = acc["train_time"]
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": num_updates,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_tot[0].item() / max(loss_tot[1].item(), 1.0),
            "epoch_time_s": train_time,
            "train_img_per_s": micro_per_epoch * cfg.batch_size * world / max(train_time, 1e-9),
        }
        if graphed is not None:
            # replayed optimizer steps leave the parameters' version counters alone, so
            # inference memos keyed on them would serve the weights of the capture step
            clear_memos(raw_model)
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            m = evaluate(eval_model, val_loader, accelerator, channels_last=cfg.channels_last)
            rec.update(val_loss=m["loss"], top1=m["top1"], top5=m["top5"])
            score = m["top1"]
            if ema is not None:
                me = evaluate(ema.module, val_loader, accelerator, channels_last=cfg.channels_last)
                rec.update(ema_val_loss=me["loss"], ema_top1=me["top1"], ema_top5=me["top5"])
                score = me["top1"]
            if best["top1"] is None or score > best["top1"]:
                best = {"top1": score, "epoch": epoch + 1}
                if is_main:
                    save_safetensors(
                        result_weights(),
                        run_dir / "best.safetensors",
                        {**weights_meta, "epoch": epoch + 1, "top1": score},
                    )
        history["epochs"].append(rec)
        tb.scalars(rec, epoch + 1, "epoch")
        if is_main:
            save_safetensors(
                result_weights(),
                run_dir / "last.safetensors",
                {**weights_meta, "epoch": epoch + 1, "top1": rec.get("ema_top1", rec.get("top1"))},
            )
        acc.update(_fresh_accumulators(device, keep_interval=acc))
        stop_now = cfg.stop_after is not None and num_updates >= cfg.stop_after
        save(epoch + 1, 0)
        write_logs()
        epoch_bar.update(1)
        shown = {k: round(v, 4) for k, v in rec.items() if isinstance(v, float)}
        epoch_bar.set_postfix(top1=shown.get("ema_top1", shown.get("top1")))
        if not progress:
            accelerator.print(f"epoch {epoch + 1}/{cfg.epochs}: {shown}")
        if stop_now:
            stopped = epoch + 1 < cfg.epochs
            break
    epoch_bar.close()
    tb.close()
    accelerator.wait_for_everyone()
    final = history["epochs"][-1] if history["epochs"] else {}
    summary = {
        "run_dir": str(run_dir),
        "stopped_early": stopped,
        "num_updates": num_updates,
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "final": final,
        "wall_s": time.perf_counter() - t_run,
    }
    accelerator.end_training()
    if is_main and not stopped:
        top1 = final.get("ema_top1", final.get("top1"))
        if top1 is not None and not math.isnan(top1):
            accelerator.print(
                f"done: top-1 {top1:.2f}% (best {best['top1']:.2f}% at epoch {best['epoch']}); "
                f"weights {run_dir / 'best.safetensors'}, curves {run_dir / 'curves.png'}"
            )
    return summary

"""Training recipe: one dataclass, YAML recipes, command-line overrides and validation.

A run's configuration is built in three layers, later ones winning:

1. the defaults of :class:`TrainConfig`;
2. a recipe (``--recipe nat`` names ``configs/nat.yaml`` shipped in ``visionattn.configs``,
   ``--config path.yaml`` any file);
3. command-line flags (``--lr 1e-3``, ``--no-ema``, ``--set key=value``).

Every key is checked before any work starts: an unknown key, a value of the wrong type or
out of range, an unknown model, optimizer or scheduler raises ``ValueError`` naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "TrainConfig",
    "add_config_args",
    "config_from_args",
    "list_recipes",
    "load_recipe",
    "recipe_path",
    "resolve_lr",
    "validate_config",
]

AMP_MODES = ("no", "bf16", "fp16")
SCHEDULES = ("cosine", "tanh", "poly", "step", "multistep")


@dataclass
class TrainConfig:
    """Every setting of a classification training run (the keys a recipe YAML may hold)."""

    # --- model
    model: str = "test_nat"  # any timm model name (ours after `import visionattn`)
    pretrained: bool = False  # start from the model's pretrained weights
    initial_checkpoint: str | None = None  # weights (.safetensors or our .pt) to start from
    num_classes: int | None = None  # None: the dataset's class count
    drop_rate: float = 0.0  # classifier dropout
    drop_path: float = 0.0  # stochastic depth rate
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra create_model kwargs

    # --- data
    data_dir: str | None = None  # ImageFolder root with train/ and val/; None: embedded digits
    train_split: str = "train"
    val_split: str = "val"
    img_size: int | None = None  # None: the model's pretrained_cfg input size
    digits_size: int = 32  # pixel size the embedded 8x8 digits are upscaled to
    interpolation: str = ""  # "": the model's default
    train_interpolation: str = ""  # "": same as interpolation; "random" picks per image
    mean: list[float] | None = None  # None: the model's default
    std: list[float] | None = None
    crop_pct: float | None = None  # eval center-crop fraction; None: the model's default
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area
    ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    aa: str | None = None  # timm auto-augment string, e.g. "rand-m9-mstd0.5-inc1" (RandAugment)
    reprob: float = 0.0  # random erasing probability
    remode: str = "pixel"
    recount: int = 1
    epoch_repeats: int = 1  # visit each training image this many times per epoch
    workers: int = 4  # dataloader worker processes per device
    pin_memory: bool = True

    # --- mixup / cutmix / label smoothing
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    cutmix_minmax: list[float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0  # turn mixup off from this epoch on (0: never)
    smoothing: float = 0.1  # label smoothing
    bce_loss: bool = False  # binary cross-entropy (ResNet-strikes-back recipes)
    bce_target_thresh: float | None = None  # binarize soft BCE targets at this value

    # --- optimizer
    opt: str = "adamw"
    lr: float | None = None  # absolute lr; None: lr_base * global_batch / lr_base_size
    lr_base: float = 1e-3
    lr_base_size: int = 1024  # the global batch size lr_base was published for
    weight_decay: float = 0.05
    momentum: float = 0.9
    opt_eps: float | None = None
    opt_betas: list[float] | None = None
    layer_decay: float | None = None
    clip_grad: float | None = None  # None: no clipping
    clip_mode: str = "norm"  # "norm", "value" or "agc" (adaptive, clip_grad is the factor)

    # --- schedule
    sched: str = "cosine"
    epochs: int = 300
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 0  # the last epochs, at min_lr (counted within `epochs`)
    decay_epochs: float = 90.0  # "step" schedule period
    decay_milestones: list[float] = field(default_factory=lambda: [90.0, 180.0, 270.0])
    decay_rate: float = 0.1  # "step"/"multistep" factor

    # --- batch
    batch_size: int = 128  # per device, per micro-batch
    val_batch_size: int | None = None  # None: 2 * batch_size
    grad_accum: int = 1  # micro-batches per optimizer step

    # --- EMA of the weights
    ema: bool = False
    ema_decay: float = 0.9998
    ema_warmup: bool = False

    # --- precision and speed
    amp: str = "no"  # "no", "bf16" or "fp16" (accelerate mixed precision)
    channels_last: bool = False
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune"
    cuda_graph: bool = False  # capture the training step once, replay it (train/graphed.py)
    cpu: bool = False  # force the CPU even when a GPU is present

    # --- run
    seed: int = 42
    output: str = "output/train"  # runs are created under this folder
    run_name: str | None = None  # None: "<model>-<timestamp>"
    resume: str | None = None  # checkpoint file (or its run folder) to continue exactly
    checkpoint_every: int = 0  # also save a resumable checkpoint every N optimizer steps
    val_every: int = 1  # validate every N epochs (and always after the last)
    log_every: int = 50  # optimizer steps between step-log records
    stop_after: int | None = None  # stop (after saving) at this optimizer step, as a preemption
    progress: bool = True  # tqdm progress bars
    tensorboard: bool = True  # also log to TensorBoard when it is installed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
# resolved annotations (the module uses postponed evaluation)
_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) for ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(key: str, value: Any) -> Any:
    """Check and convert one recipe value to the field's type; ValueError names the key."""
    tp, optional = _unwrap_optional(_TYPES[key])
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key}: may not be null (expected {tp.__name__})")
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key}: expected a list of numbers, got {value!r}")
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a list of numbers, got {value!r}") from None
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _check_keys(data: dict[str, Any], source: str) -> None:
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(
            f"{source}: unknown recipe key(s) {unknown}; valid keys are {sorted(_FIELDS)}"
        )


def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``visionattn.configs`` (``default``, ``nat``, ...)."""
    root = importlib.resources.files("visionattn.configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """Path of a recipe given its shipped name (``"nat"``) or a YAML file path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ValueError(f"recipe: file {str(p)!r} does not exist")
        return p
    root = importlib.resources.files("visionattn.configs")
    cand = root / f"{name_or_path}.yaml"
    if not cand.is_file():
        raise ValueError(f"recipe: {name_or_path!r} is not a file nor one of {list_recipes()}")
    return Path(str(cand))


def load_recipe(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe YAML (a flat mapping of :class:`TrainConfig` keys), checked and typed."""
    path = recipe_path(name_or_path)
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe: {str(path)!r} must hold a mapping of keys to values")
    _check_keys(data, f"recipe {str(path)!r}")
    return {k: _coerce(k, v) for k, v in data.items()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--recipe``, ``--config``, ``--set`` and one flag per :class:`TrainConfig` field.

    Field flags default to "not given" so that only what the user types overrides the recipe.
    """
    parser.add_argument(
        "--recipe",
        "--config",
        "-c",
        dest="_recipe",
        default=None,
        metavar="NAME_OR_YAML",
        help="recipe name (one of the shipped ones) or YAML path; default 'default' (the "
        "embedded digits run). Shipped recipes live in visionattn/configs.",
    )
    parser.add_argument(
        "--set",
        dest="_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any recipe key, value parsed as YAML (repeatable)",
    )
    group = parser.add_argument_group("recipe keys (override the recipe)")
    for name, f in _FIELDS.items():
        tp, _ = _unwrap_optional(_TYPES[name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"(default {default!r})"
        if tp is bool:
            group.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif typing.get_origin(tp) is list:
            group.add_argument(
                _flag(name), dest=name, nargs="+", default=argparse.SUPPRESS, help=help_text
            )
        elif typing.get_origin(tp) is dict:
            group.add_argument(
                _flag(name),
                dest=name,
                nargs="+",
                default=argparse.SUPPRESS,
                metavar="KEY=VALUE",
                help=help_text,
            )
        else:
            group.add_argument(
                _flag(name), dest=name, default=argparse.SUPPRESS, metavar="V", help=help_text
            )


def _parse_kv(items: list[str], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{what}: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """Build the config from parsed args: defaults < recipe < ``--set`` < field flags.

    With ``--resume`` and no ``--recipe``, the checkpoint's own recipe is the base.
    """
    values: dict[str, Any] = {}
    resume = getattr(ns, "resume", None)
    if resume and ns._recipe is None:
        # continuing a run: its own recipe is the base, flags may change run-control keys
        from visionattn.train.checkpoint import load_checkpoint

        saved = load_checkpoint(resume)["config"]
        _check_keys(saved, f"checkpoint {resume!r}")
        values.update({k: _coerce(k, v) for k, v in saved.items()})
        values["stop_after"] = None  # a one-off stop of the earlier invocation
    else:
        values.update(load_recipe(ns._recipe or "default"))
    sets = _parse_kv(ns._set, "--set")
    _check_keys(sets, "--set")
    values.update({k: _coerce(k, v) for k, v in sets.items()})
    for name in _FIELDS:
        if hasattr(ns, name):
            raw = getattr(ns, name)
            if name == "model_kwargs":
                raw = _parse_kv(raw, "--model-kwargs")
            elif isinstance(raw, str) and raw.lower() in ("none", "null"):
                raw = None
            values[name] = _coerce(name, raw)
    cfg = TrainConfig(**values)
    return cfg


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Config from a mapping of keys (e.g. one stored in a checkpoint), checked and typed."""
    _check_keys(data, "config")
    return TrainConfig(**{k: _coerce(k, v) for k, v in data.items()})


def resolve_lr(cfg: TrainConfig, global_batch: int) -> float:
    """The absolute learning rate: ``cfg.lr`` if set, else linearly scaled ``lr_base``."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.lr_base * global_batch / cfg.lr_base_size


def _model_exists(name: str) -> bool:
    import timm

    import visionattn  # noqa: F401  (registers our models with timm)

    base = name.split(".", 1)[0]
    return timm.is_model(base)


def validate_config(cfg: TrainConfig) -> None:
    """Check a config before any work starts; ValueError names the bad key and constraint."""
    import timm.optim
    import timm.scheduler  # noqa: F401

    if not _model_exists(cfg.model):
        import difflib

        import timm

        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=6, cutoff=0.6)
        raise ValueError(
            f"model: {cfg.model!r} is not a registered timm/visionattn model"
            + (f" (close names: {close})" if close else "")
            + "; see `visionattn list` or timm.list_models()"
        )
    positive_int = (
        "batch_size",
        "grad_accum",
        "epochs",
        "val_every",
        "log_every",
        "digits_size",
        "epoch_repeats",
    )
    for key in positive_int:
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}: must be >= 1, got {getattr(cfg, key)}")
    for key in ("workers", "warmup_epochs", "cooldown_epochs", "checkpoint_every", "recount"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key}: must be >= 0, got {getattr(cfg, key)}")
    for key in ("num_classes", "img_size", "val_batch_size", "stop_after"):
        v = getattr(cfg, key)
        if v is not None and v < 1:
            raise ValueError(f"{key}: must be >= 1 or null, got {v}")
    for key in ("hflip", "vflip", "reprob", "mixup_prob", "mixup_switch_prob", "drop_path"):
        v = getattr(cfg, key)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{key}: must be in [0, 1], got {v}")
    if not 0.0 <= cfg.drop_rate < 1.0:
        raise ValueError(f"drop_rate: must be in [0, 1), got {cfg.drop_rate}")
    if not 0.0 <= cfg.smoothing < 1.0:
        raise ValueError(f"smoothing: must be in [0, 1), got {cfg.smoothing}")
    if cfg.mixup < 0 or cfg.cutmix < 0:
        raise ValueError(f"mixup/cutmix: alphas must be >= 0, got {cfg.mixup}/{cfg.cutmix}")
    if (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax) and cfg.batch_size % 2:
        raise ValueError(f"batch_size: mixup/cutmix needs an even batch, got {cfg.batch_size}")
    if cfg.mixup_mode not in ("batch", "pair", "elem"):
        raise ValueError(f"mixup_mode: must be batch, pair or elem, got {cfg.mixup_mode!r}")
    if cfg.amp not in AMP_MODES:
        raise ValueError(f"amp: must be one of {AMP_MODES}, got {cfg.amp!r}")
    if cfg.clip_mode not in ("norm", "value", "agc"):
        raise ValueError(f"clip_mode: must be 'norm', 'value' or 'agc', got {cfg.clip_mode!r}")
    if cfg.clip_grad is not None and cfg.clip_grad <= 0:
        raise ValueError(f"clip_grad: must be > 0 or null, got {cfg.clip_grad}")
    for key in ("lr", "lr_base"):
        v = getattr(cfg, key)
        if v is not None and v <= 0:
            raise ValueError(f"{key}: must be > 0, got {v}")
    if cfg.lr_base_size < 1:
        raise ValueError(f"lr_base_size: must be >= 1, got {cfg.lr_base_size}")
    if cfg.weight_decay < 0:
        raise ValueError(f"weight_decay: must be >= 0, got {cfg.weight_decay}")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ValueError(f"ema_decay: must be in (0, 1), got {cfg.ema_decay}")
    if cfg.warmup_epochs + cfg.cooldown_epochs > cfg.epochs:
        raise ValueError(
            f"warmup_epochs + cooldown_epochs: must not exceed epochs ({cfg.epochs}), got "
            f"{cfg.warmup_epochs} + {cfg.cooldown_epochs}"
        )
    if cfg.amp == "fp16" and (cfg.cpu or not _cuda_available()):
        raise ValueError("amp: 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on the CPU")
    for key in ("scale", "ratio"):
        v = getattr(cfg, key)
        if len(v) != 2 or not 0 < v[0] <= v[1]:
            raise ValueError(f"{key}: must be two numbers 0 < lo <= hi, got {v}")
    if cfg.scale[1] > 1.0:
        raise ValueError(f"scale: the area fraction must be <= 1, got {cfg.scale}")
    for key in ("mean", "std"):
        v = getattr(cfg, key)
        if v is not None and len(v) not in (1, 3):
            raise ValueError(f"{key}: must have 1 or 3 values, got {v}")
    if cfg.std is not None and any(s <= 0 for s in cfg.std):
        raise ValueError(f"std: values must be > 0, got {cfg.std}")
    if cfg.crop_pct is not None and not 0 < cfg.crop_pct <= 1.0:
        raise ValueError(f"crop_pct: must be in (0, 1], got {cfg.crop_pct}")
    if cfg.layer_decay is not None and not 0 < cfg.layer_decay <= 1.0:
        raise ValueError(f"layer_decay: must be in (0, 1], got {cfg.layer_decay}")
    opt_name = cfg.opt.lower().split("_")[-1]
    if opt_name not in timm.optim.list_optimizers():
        raise ValueError(f"opt: {cfg.opt!r} is not a timm optimizer (timm.optim.list_optimizers())")
    from visionattn.train.graphed import check_graph_config

    check_graph_config(cfg)
    if cfg.sched not in SCHEDULES:
        raise ValueError(
            f"sched: must be one of {SCHEDULES} (stepped per optimizer update), got {cfg.sched!r}"
        )
    if cfg.data_dir is not None:
        check_image_folder(cfg.data_dir, cfg.train_split, "data_dir")
        check_image_folder(cfg.data_dir, cfg.val_split, "data_dir")
    if cfg.initial_checkpoint is not None and not os.path.isfile(cfg.initial_checkpoint):
        raise ValueError(f"initial_checkpoint: file {cfg.initial_checkpoint!r} does not exist")
    if cfg.resume is not None and not os.path.exists(cfg.resume):
        raise ValueError(f"resume: {cfg.resume!r} does not exist")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def check_image_folder(root: str, split: str | None, what: str) -> list[str]:
    """Check ``root/split`` is an ImageFolder (class sub-folders holding images).

    Returns the sorted class names. Raises ValueError naming ``what`` when the folder is
    missing, has no class folders, or a class folder holds no image.
    """
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"{what}: folder {str(base)!r} does not exist")
    folder = base / split if split else base
    if not folder.is_dir():
        have = sorted(p.name for p in base.iterdir() if p.is_dir())[:10]
        raise ValueError(
            f"{what}: split folder {str(folder)!r} does not exist (sub-folders of {root!r}: {have})"
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{what}: {str(folder)!r} has no class sub-folders (ImageFolder layout)")
    empty = []
    for c in classes:
        has_img = any(
            f.suffix.lower() in IMG_EXTENSIONS for f in (folder / c).rglob("*") if f.is_file()
        )
        if not has_img:
            empty.append(c)
    if len(empty) == len(classes):
        raise ValueError(f"{what}: {str(folder)!r} holds no images in any class folder")
    return classes

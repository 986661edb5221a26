"""Checkpoints: atomic writes, exact-resume state, and timm-loadable safetensors weights.

Files a run writes beside its metrics:

- ``last.pt``: everything needed to continue exactly (model, optimizer, scheduler, EMA,
  grad scaler, the RNG states of every process, the epoch and the micro-batch position
  inside it, the metrics history);
- ``last.safetensors`` / ``best.safetensors``: the weights alone (EMA weights when EMA is
  on, as those are what the run validates as its result), keyed exactly as the timm model's
  ``state_dict`` so that ``timm.create_model(name, pretrained=True, num_classes=K,
  pretrained_cfg_overlay=dict(file=path, num_classes=K))`` loads them.

Every file is written to a temporary name in the same folder, flushed to disk and moved
over the old one with :func:`os.replace`, so a kill at any moment leaves either the old or
the new file, never a torn one.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_write",
    "capture_rng_state",
    "find_checkpoint",
    "load_checkpoint",
    "load_weights",
    "restore_rng_state",
    "save_checkpoint",
    "save_safetensors",
]

CHECKPOINT_VERSION = 1


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``write(tmp_path)`` then fsync and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # make the rename itself durable
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Atomically ``torch.save`` a resumable training state."""
    state = dict(state)
    state.setdefault("version", CHECKPOINT_VERSION)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a ``last.pt`` written by :func:`save_checkpoint` onto the CPU."""
    path = find_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"resume: could not read checkpoint {str(path)!r}: {e}") from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"resume: {str(path)!r} is not a visionattn training checkpoint")
    return state


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file for ``path``: the file itself, or ``last.pt`` in a run folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise ValueError(f"resume: no checkpoint at {str(p)!r}")
    return p


def _plain_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; tensors sharing storage are cloned (safetensors forbids sharing)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in sd.items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[k] = t
    return out


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Atomically save weights as safetensors; ``metadata`` values are stored as JSON strings."""
    from safetensors.torch import save_file

    tensors = _plain_state_dict(state_dict)
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) from a ``.safetensors`` file or one of our ``.pt`` checkpoints.

    For a ``.pt`` training checkpoint the weights are its EMA weights when it has them
    (matching what ``best/last.safetensors`` hold), and the metadata carries ``model``,
    ``num_classes``, ``classes`` and ``config``.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint: file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            raw_meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        meta: dict[str, Any] = {}
        for k, v in raw_meta.items():
            try:
                meta[k] = json.loads(v)
            except (json.JSONDecodeError, TypeError):
                meta[k] = v
        return sd, meta
    state = torch.load(p, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "model" in state and "config" in state:
        sd = state["ema"] if state.get("ema") is not None else state["model"]
        meta = dict(state.get("weights_meta") or {})
        meta.update(
            model=state["config"]["model"],
            num_classes=state.get("num_classes"),
            classes=state.get("classes"),
            config=state["config"],
        )
        return dict(sd), meta
    from visionattn.convert import unwrap_state_dict

    return unwrap_state_dict(state), {}


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU and CUDA RNG states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.set_rng_state(cuda_states[torch.cuda.current_device() % len(cuda_states)])

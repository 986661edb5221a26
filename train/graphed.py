"""Training steps captured in a CUDA graph (recipe key ``cuda_graph: true``).

Small models at ImageNet batch sizes are host-bound in eager PyTorch: EfficientViT-M5 at batch
128 needs ~14 ms of GPU work per step but ~90 ms of Python and dispatch (see
``kernels/NOTES.md``, "where small models' training time goes"). :class:`GraphedTrainStep`
records one whole micro-step (forward, loss, backward, gradient clipping, optimizer step) once
and replays it for every later batch, so the host only copies the batch in and launches the
graph.

What a captured step needs, checked by :func:`check_graph_config` and the trainer:

* one CUDA process, no gradient accumulation, no ``torch.compile``;
* ``amp`` "no" or "bf16" (fp16's loss scaler decides on the host whether to skip a step);
* an optimizer whose step runs inside a graph with a learning rate that changes every step:
  Adam/AdamW with ``capturable=True`` or SGD with ``fused=True`` (:data:`GRAPH_OPTIMIZERS`),
  each group's rate held in a device tensor that :meth:`GraphedTrainStep.__call__` refreshes
  from the scheduler's value before each step;
* batches of one shape (the trainer's sampler drops the last partial batch).

The first ``warmup`` steps run eagerly on a side stream (real training steps: they create the
optimizer state and compile the kernels); the next one is captured and replayed. Eager and
replayed steps run the same kernels on the same tensors, so a run's numbers do not depend on
where capture happened (a resumed run captures again after its own warm-up).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["GRAPH_OPTIMIZERS", "GraphedTrainStep", "check_graph_config", "graph_optimizer_kwargs"]

# timm optimizer name -> the constructor kwargs that make its step capturable with a tensor lr
GRAPH_OPTIMIZERS: Mapping[str, Mapping[str, Any]] = {
    "adam": {"capturable": True},
    "adamw": {"capturable": True},
    "sgd": {"fused": True},
    "momentum": {"fused": True},
    "nesterov": {"fused": True},
}


def _opt_name(opt: str) -> str:
    return opt.lower().split("_")[-1]


def check_graph_config(cfg: Any) -> None:
    """ValueError naming the recipe key that rules out ``cuda_graph`` (static checks only)."""
    if not cfg.cuda_graph:
        return
    if cfg.cpu:
        raise ValueError("cuda_graph: needs a CUDA device, but cpu is set")
    if cfg.grad_accum != 1:
        raise ValueError(f"cuda_graph: needs grad_accum 1, got {cfg.grad_accum}")
    if cfg.amp not in ("no", "bf16"):
        raise ValueError(
            f"cuda_graph: needs amp 'no' or 'bf16' (fp16's loss scaler skips steps on the "
            f"host), got {cfg.amp!r}"
        )
    if cfg.compile:
        raise ValueError("cuda_graph: not with compile (use compile_mode 'reduce-overhead')")
    if _opt_name(cfg.opt) not in GRAPH_OPTIMIZERS:
        raise ValueError(
            f"cuda_graph: opt must be one of {sorted(GRAPH_OPTIMIZERS)} (a step that runs "
            f"inside a graph with a changing learning rate), got {cfg.opt!r}"
        )


def graph_optimizer_kwargs(opt: str) -> dict[str, Any]:
    """Constructor kwargs that make ``opt``'s step capturable (see :data:`GRAPH_OPTIMIZERS`)."""
    return dict(GRAPH_OPTIMIZERS[_opt_name(opt)])


class GraphedTrainStep:
    """``step(x, y) -> loss`` run eagerly ``warmup`` times, then captured once and replayed.

    ``step`` must do the whole micro-step: forward and loss under autocast with
    ``cache_enabled=False`` (a cached weight cast would outlive the capture), ``backward``,
    clipping and ``optimizer.step()``, with no host synchronisation. Gradients are set to None
    before each eager step and before capture; replays overwrite them in place.

    Calling returns the loss tensor; after a replay it is the graph's output buffer, which
    the next call overwrites (read or accumulate it before then).
    """

    def __init__(
        self,
        step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        warmup: int = 3,
    ) -> None:
        if warmup < 1:
            raise ValueError(
                f"warmup: must be >= 1 (optimizer state exists before capture), got {warmup}"
            )
        self.step = step
        self.optimizer = optimizer
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: torch.Tensor | None = None
        self.static_y: torch.Tensor | None = None
        self.static_loss: torch.Tensor | None = None
        self._lr: list[torch.Tensor] = []

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _set_lr(self, device: torch.device) -> list[float]:
        """Point every group's ``lr`` at its device tensor, refreshed from the scheduler's
        float; returns the floats so they can be put back after the step."""
        groups = self.optimizer.param_groups
        if not self._lr:
            self._lr = [torch.zeros((), dtype=torch.float32, device=device) for _ in groups]
        values = []
        for g, t in zip(groups, self._lr, strict=True):
            v = g["lr"]
            v = float(v.item()) if torch.is_tensor(v) else float(v)
            t.fill_(v)
            g["lr"] = t
            values.append(v)
        return values

    def _restore_lr(self, values: list[float]) -> None:
        # outside the step the groups hold floats again, as schedulers, loggers and
        # state_dict expect
        for g, v in zip(self.optimizer.param_groups, values, strict=True):
            g["lr"] = v

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            raise ValueError(f"x: a captured step needs CUDA tensors, got {x.device}")
        lrs = self._set_lr(x.device)
        try:
            if self.graph is None and self.calls < self.warmup:
                loss = self._eager(x, y)
            else:
                loss = self._replay(x, y)
        finally:
            self._restore_lr(lrs)
        self.calls += 1
        return loss

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            loss = self.step(x, y)
        torch.cuda.current_stream(x.device).wait_stream(side)
        return loss

    def _replay(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            self.static_x, self.static_y = x.clone(), y.clone()
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_loss = self.step(self.static_x, self.static_y)
            self.graph = graph  # capture records the work; the replay below runs it
        else:
            for name, new, old in (("x", x, self.static_x), ("y", y, self.static_y)):
                if new.shape != old.shape or new.dtype != old.dtype:
                    raise ValueError(
                        f"{name}: a captured step needs the batch it was captured with, "
                        f"shape {tuple(old.shape)} {old.dtype}; got {tuple(new.shape)} {new.dtype}"
                    )
            self.static_x.copy_(x)
            self.static_y.copy_(y)
        self.graph.replay()
        return self.static_loss

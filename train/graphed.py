"""Training steps captured in a CUDA graph (recipe key ``cuda_graph: true``).

Small models at ImageNet batch sizes are host-bound in eager PyTorch: EfficientViT-M5 at batch
128 needs ~14 ms of GPU work per step but ~90 ms of Python and dispatch (see
``kernels/NOTES.md``, "where small models' training time goes"). :class:`GraphedTrainStep`
records one whole micro-step (forward, loss, backward, gradient clipping, optimizer step) once
and replays it for every later batch, so the host only copies the batch in and launches the
graph.

What a captured step needs, checked by :func:`check_graph_config` and the trainer:

* CUDA, no gradient accumulation, no ``torch.compile``; with several processes there is no
  DDP wrapper: backward fills one flat gradient buffer (:class:`FlatGradients`) and one
  all-reduce averages it between two graphs (forward + backward, then clipping + update),
  where rank 0's buffers are also broadcast (:func:`broadcast_buffers`);
* ``amp`` "no" or "bf16" (fp16's loss scaler decides on the host whether to skip a step);
* an optimizer whose step runs inside a graph with a learning rate that changes every step:
  Adam/AdamW with ``capturable=True`` or SGD with ``fused=True`` (:data:`GRAPH_OPTIMIZERS`),
  each group's rate held in a device tensor that :meth:`GraphedTrainStep.__call__` refreshes
  from the scheduler's value before each step;
* batches of one shape (the trainer's sampler drops the last partial batch).

The first ``warmup`` steps run eagerly on a side stream (real training steps: they create the
optimizer state and compile the kernels); the next one is captured and replayed. Eager and
replayed steps run the same kernels on the same tensors, so a run's numbers do not depend on
where capture happened (a resumed run captures again after its own warm-up), up to kernels
that are nondeterministic in eager runs too (atomic accumulation in some backward passes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "GRAPH_OPTIMIZERS",
    "WARMUP_STEPS",
    "FlatGradients",
    "GraphedTrainStep",
    "broadcast_buffers",
    "check_graph_config",
    "graph_optimizer_kwargs",
]

# timm optimizer name -> the constructor kwargs that make its step capturable with a tensor lr
GRAPH_OPTIMIZERS: Mapping[str, Mapping[str, Any]] = {
    "adam": {"capturable": True},
    "adamw": {"capturable": True},
    "sgd": {"fused": True},
    "momentum": {"fused": True},
    "nesterov": {"fused": True},
}


# eager steps before the capture (optimizer state, kernel compilation, allocator warm-up)
WARMUP_STEPS = 3

# The DataLoader's pin-memory thread allocates page-locked memory while the main thread
# captures; in the default "global" mode any thread's such call invalidates the capture.
_CAPTURE_MODE = "thread_local"


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
    if cfg.grad_checkpointing:
        raise ValueError(
            "cuda_graph: not with grad_checkpointing (not supported: its recomputation saves "
            "and restores the CUDA RNG state inside the captured step)"
        )
    if _opt_name(cfg.opt) not in GRAPH_OPTIMIZERS:
        raise ValueError(
            f"cuda_graph: opt must be one of {sorted(GRAPH_OPTIMIZERS)} (a step that runs "
            f"inside a graph with a changing learning rate), got {cfg.opt!r}"
        )


def graph_optimizer_kwargs(opt: str) -> dict[str, Any]:
    """Constructor kwargs that make ``opt``'s step capturable (see :data:`GRAPH_OPTIMIZERS`)."""
    return dict(GRAPH_OPTIMIZERS[_opt_name(opt)])


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill exactly ``t.numel()`` consecutive slots in some dim order."""
    expected = 1
    dims = sorted(((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


class FlatGradients:
    """The gradients of ``params`` as views into one flat buffer, so that one collective
    averages all of them (what DDP's gradient buckets do, without DDP in the captured step).

    The first :meth:`all_reduce` lays the buffer out over the parameters that got a gradient
    (unused ones keep ``None``, so optimizers skip them as in eager training); from then on
    :meth:`zero` clears it in place and backward accumulates into the views.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.flat: torch.Tensor | None = None

    def zero(self) -> None:
        if self.flat is None:
            for p in self.params:
                p.grad = None
        else:
            self.flat.zero_()

    def _lay_out(self) -> torch.Tensor:
        used = [p for p in self.params if p.grad is not None]
        dtypes = {p.grad.dtype for p in used}
        if len(dtypes) != 1:
            raise ValueError(f"params: gradients of one dtype needed for one buffer, got {dtypes}")
        flat = torch.empty(sum(p.numel() for p in used), dtype=dtypes.pop(), device=used[0].device)
        offset = 0
        for p in used:
            n = p.numel()
            # the param's own strides (e.g. channels-last convs) over a dense slice
            view = flat[offset : offset + n].as_strided(p.shape, p.stride())
            view.copy_(p.grad)
            p.grad = view
            offset += n
        return flat

    def all_reduce(self) -> None:
        """Average the gradients over the default process group."""
        import torch.distributed as dist

        if self.flat is None:
            for p in self.params:
                if p.grad is not None and not _dense(p):
                    raise ValueError("params: every parameter must be dense to share one buffer")
            self.flat = self._lay_out()
        dist.all_reduce(self.flat)  # a sum: gloo has no AVG
        self.flat.div_(dist.get_world_size())


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Every process takes rank ``src``'s buffers (BatchNorm statistics), one collective per
    buffer dtype: what DDP does before each forward, here done once per step."""
    import torch.distributed as dist

    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        groups.setdefault(b.dtype, []).append(b)
    with torch.no_grad():
        for bufs in groups.values():
            flat = torch.cat([b.reshape(-1) for b in bufs])
            dist.broadcast(flat, src=src)
            parts = flat.split([b.numel() for b in bufs])
            torch._foreach_copy_(bufs, [t.view_as(b) for t, b in zip(parts, bufs, strict=True)])


class GraphedTrainStep:
    """A training micro-step run eagerly ``warmup`` times, then captured once and replayed.

    ``forward_backward(x, y) -> loss`` runs forward and loss under autocast with
    ``cache_enabled=False`` (a cached weight cast would outlive the capture) and ``backward``;
    ``update()`` clips and steps the optimizer. Neither may synchronise with the host.

    Without ``reduce`` the whole step is one graph and gradients are set to None before each
    eager step and before capture (replays then overwrite them in place). With ``reduce`` (an
    eager call between the two parts, e.g. :meth:`FlatGradients.all_reduce` across processes)
    the parts are two graphs and ``forward_backward`` owns the gradients (zeroes them itself).

    Calling returns the loss tensor; after a replay it is the graph's output buffer, which
    the next call overwrites (read or accumulate it before then).
    """

    def __init__(
        self,
        forward_backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        update: Callable[[], None],
        optimizer: torch.optim.Optimizer,
        warmup: int = WARMUP_STEPS,
        reduce: Callable[[], None] | None = None,
    ) -> None:
        if warmup < 1:
            raise ValueError(
                f"warmup: must be >= 1 (optimizer state exists before capture), got {warmup}"
            )
        self.forward_backward = forward_backward
        self.update = update
        self.reduce = reduce
        self.optimizer = optimizer
        self.warmup = warmup
        self.calls = 0
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.static_x: torch.Tensor | None = None
        self.static_y: torch.Tensor | None = None
        self.static_loss: torch.Tensor | None = None
        self._lr: list[torch.Tensor] = []

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

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
            if not self.graphs and self.calls < self.warmup:
                loss = self._eager(x, y)
            else:
                loss = self._replay(x, y)
        finally:
            self._restore_lr(lrs)
        self.calls += 1
        return loss

    def _on_side_stream(self, fn: Callable[[], Any], device: torch.device) -> Any:
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream(device).wait_stream(side)
        return out

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.reduce is None:
            self.optimizer.zero_grad(set_to_none=True)
        loss = self._on_side_stream(lambda: self.forward_backward(x, y), x.device)
        if self.reduce is not None:
            self.reduce()
        self._on_side_stream(self.update, x.device)
        return loss

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static_x, self.static_y = x.clone(), y.clone()
        if self.reduce is None:
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode=_CAPTURE_MODE):
                self.static_loss = self.forward_backward(self.static_x, self.static_y)
                self.update()
            self.graphs = [graph]
        else:
            first, second = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(first, capture_error_mode=_CAPTURE_MODE):
                self.static_loss = self.forward_backward(self.static_x, self.static_y)
            with torch.cuda.graph(second, pool=first.pool(), capture_error_mode=_CAPTURE_MODE):
                self.update()
            self.graphs = [first, second]
        # capture records the work; the replay that follows runs it

    def _replay(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.graphs:
            self._capture(x, y)
        else:
            for name, new, old in (("x", x, self.static_x), ("y", y, self.static_y)):
                if new.shape != old.shape or new.dtype != old.dtype:
                    raise ValueError(
                        f"{name}: a captured step needs the batch it was captured with, "
                        f"shape {tuple(old.shape)} {old.dtype}; got {tuple(new.shape)} {new.dtype}"
                    )
            self.static_x.copy_(x)
            self.static_y.copy_(y)
        self.graphs[0].replay()
        if self.reduce is not None:
            self.reduce()
            self.graphs[1].replay()
        return self.static_loss

"""Training throughput with and without host overhead: eager steps and CUDA-graph replays.

Small backbones at batch 128 are host-bound on the lent H200 machine: PyTorch's per-op
dispatch, autograd and launch costs take longer than the GPU work (EfficientViT-M5, session 8
profiles: 54-81 ms of host time against 28 ms of kernels per step for timm's model, 93-97
against 14 ms for ours). Eager img/s then measures the host, and
both implementations' rates drift with its speed from run to run. Capturing the whole
training step (forward, cross-entropy, backward, optimizer step) in one CUDA graph and
replaying it removes the host from the step, so the replay rate measures the GPU work.

For each ``impl:model`` entry, in one process, interleaved over ``--rounds``:

* ``eager``: the usual step, ``torch.autocast(bf16)``, fused SGD with momentum;
* ``graphed``: the same step through the trainer's ``GraphedTrainStep`` (what
  ``visionattn train --cuda-graph`` runs: eager warm-up on a side stream, one capture, then
  replays with the batch copied in); a replayed step must change the weights.

``impl`` is ``timm`` (timm's model of that name), ``ours`` (``va_<name>`` where visionattn
registers a same-named drop-in, else ``<name>``) or ``official`` (the Agent-Attention or
LITv2 code, see ``bench_agent.py`` and ``bench_litv2.py``). Both implementations get the same
recipe: the graphed column is the remedy any user of either can apply, and the ratio between
the graphed rates is the one the kernels decide.

    source tools/gpu_env.sh; python3 benchmarks/bench_graphed.py --out-dir $OUT

Prints a table; writes ``graphed_<gpu>.json`` into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

import visionattn  # noqa: F401  (registers our models)
from visionattn.train.graphed import GraphedTrainStep, graph_optimizer_kwargs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_agent  # noqa: E402  (the official Agent builders and the commit lookup)
import bench_litv2  # noqa: E402  (the official LITv2 builder)

DEFAULT_RUNS = (
    "timm:efficientvit_m5,ours:efficientvit_m5,"
    "official:agent_pvt_tiny,ours:agent_pvt_tiny,"
    "official:agent_deit_tiny,ours:agent_deit_tiny"
)


def build(impl: str, name: str) -> nn.Module:
    """The model of one ``impl:name`` entry (random weights)."""
    if impl == "timm":
        return timm.create_model(name)
    if impl == "ours":
        return timm.create_model(f"va_{name}" if timm.is_model(f"va_{name}") else name)
    if impl == "official":
        if name.startswith("litv2"):
            return bench_litv2.build("official", name)
        return bench_agent.build("official", name)
    raise ValueError(f"impl: must be timm, ours or official, got {impl!r}")


def _sync_time(fn: Callable[[], None], iters: int) -> float:
    """Seconds per call: ``iters`` calls between two synchronisations."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


class Trainer:
    """One model's training step at a fixed batch, run eagerly or through the trainer's
    :class:`~visionattn.train.graphed.GraphedTrainStep` (captured once, then replayed; the
    batch is copied into the captured buffers and the learning rate refreshed on every call,
    as in ``visionattn train --cuda-graph``). Fused SGD with momentum in both modes."""

    def __init__(
        self, model: nn.Module, batch: int, size: int, device: torch.device, graphed: bool
    ) -> None:
        self.model = model.to(device).train()
        self.x = torch.randn(batch, 3, size, size, device=device)
        self.y = torch.randint(0, 1000, (batch,), device=device)
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=1e-4, momentum=0.9, **graph_optimizer_kwargs("momentum")
        )
        self.runner = (
            GraphedTrainStep(self._forward_backward, self.opt.step, self.opt) if graphed else None
        )
        self.loss = torch.zeros((), device=device)

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # a weight cast cached by autocast would outlive the capture
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=self.runner is None):
            loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        return loss.detach()

    def __call__(self) -> None:
        if self.runner is None:
            self.opt.zero_grad(set_to_none=True)
            self.loss = self._forward_backward(self.x, self.y)
            self.opt.step()
        else:
            self.loss = self.runner(self.x, self.y)

    def warm_up(self) -> None:
        """Eager steps, or the runner's warm-up and its capture."""
        for _ in range(self.runner.warmup + 1 if self.runner is not None else 3):
            self()
        torch.cuda.synchronize()

    def step_check(self) -> str:
        """'' when one more step leaves a finite loss and moves the weights, else why not."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        self()
        torch.cuda.synchronize()
        if not bool(torch.isfinite(self.loss).item()):
            return f"loss not finite ({self.loss.item()})"
        if all(torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True)):
            return "no weight changed"
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated impl:model entries")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=400.0, help="skip entries past this")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    args = ap.parse_args()
    if args.batch < 1 or args.iters < 1 or args.rounds < 1:
        raise SystemExit("--batch, --iters and --rounds: must be positive")
    if not torch.cuda.is_available():
        raise SystemExit("bench_graphed: needs a CUDA GPU (CUDA graphs)")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    runs = [tuple(r.split(":", 1)) for r in args.runs.split(",") if r]
    t0 = time.time()

    trainers: dict[tuple, tuple[Trainer, Trainer]] = {}
    errors: dict[str, str] = {}
    for impl, name in runs:
        key = f"{impl}:{name}"
        if time.time() - t0 > args.budget_s:
            errors[key] = "skipped: budget"
            continue
        try:
            # separate models: an eager step frees the gradients a captured graph writes into
            models = [build(impl, name) for _ in range(2)]
            cfg = getattr(models[0], "pretrained_cfg", None) or {}
            size = cfg.get("input_size", (3, 224, 224))[-1]  # official models: 224
            eager, graphed = (
                Trainer(m, args.batch, size, device, graphed=g)
                for m, g in zip(models, (False, True))
            )
            for mode, t in (("eager", eager), ("graphed", graphed)):
                t.warm_up()
                bad = t.step_check()
                if bad:
                    raise RuntimeError(f"{mode} step: {bad}")
            trainers[(impl, name)] = (eager, graphed)
        except Exception as e:  # keep the other entries
            errors[key] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            torch.cuda.empty_cache()

    rates: dict[tuple, dict[str, list[float]]] = {k: {"eager": [], "graphed": []} for k in trainers}
    for _ in range(args.rounds):
        for k, (eager, graphed) in trainers.items():
            for mode, fn in (("eager", eager), ("graphed", graphed)):
                sec = _sync_time(fn, args.iters)
                rates[k][mode].append(args.batch / sec)

    gpu = torch.cuda.get_device_name(0)
    results = []
    for (impl, name), r in rates.items():
        results.append(
            dict(
                impl=impl,
                model=name,
                eager_img_s=round(max(r["eager"]), 1),
                graphed_img_s=round(max(r["graphed"]), 1),
                eager_rounds=[round(v, 1) for v in r["eager"]],
                graphed_rounds=[round(v, 1) for v in r["graphed"]],
            )
        )
    payload = dict(
        env=dict(
            device=gpu,
            torch=torch.__version__,
            timm=timm.__version__,
            commit=bench_agent._commit(),
            batch=args.batch,
            iters=args.iters,
            rounds=args.rounds,
            step="bf16 autocast forward + cross-entropy + backward + fused SGD(momentum) step; "
            "graphed = visionattn.train.graphed.GraphedTrainStep",
        ),
        results=results,
        errors=errors,
    )
    out = Path(args.out_dir) / f"graphed_{gpu.split()[-1].lower()}.json"
    out.write_text(json.dumps(payload, indent=1))

    print(f"\n{gpu} | torch {torch.__version__} | batch {args.batch}, best of {args.rounds} rounds")
    print(f"{'impl':9s} {'model':18s} {'eager img/s':>12s} {'graphed img/s':>14s}")
    for row in results:
        print(
            f"{row['impl']:9s} {row['model']:18s} {row['eager_img_s']:12.1f} "
            f"{row['graphed_img_s']:14.1f}"
        )
    for k, e in errors.items():
        print(f"{k}: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

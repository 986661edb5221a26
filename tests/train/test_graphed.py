"""CUDA-graph training steps (``cuda_graph: true``): recipe checks everywhere, and on the GPU
the captured step against the eager one, the trainer end to end and its exact resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from visionattn.train.checkpoint import load_checkpoint
from visionattn.train.config import TrainConfig, validate_config
from visionattn.train.graphed import GraphedTrainStep, check_graph_config, graph_optimizer_kwargs
from visionattn.train.trainer import train

TINY = dict(
    model="test_va_efficientvit",
    data_dir=None,
    digits_size=32,
    img_size=32,
    crop_pct=1.0,
    hflip=0.0,
    color_jitter=0.0,
    workers=0,
    batch_size=32,
    epochs=2,
    warmup_epochs=1,
    lr=2e-3,
    log_every=5,
    progress=False,
    tensorboard=False,
    seed=5,
    cuda_graph=True,
)


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "output": str(tmp_path), **kw})


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(cpu=True), "cuda_graph: needs a CUDA device"),
        (dict(grad_accum=2), "cuda_graph: needs grad_accum 1"),
        (dict(amp="fp16"), "cuda_graph: needs amp 'no' or 'bf16'"),
        (dict(compile=True), "cuda_graph: not with compile"),
        (dict(grad_checkpointing=True), "cuda_graph: not with grad_checkpointing"),
        (dict(opt="lamb"), "cuda_graph: opt must be one of"),
    ],
)
def test_recipe_checks_name_the_key(tmp_path: Path, change: dict, match: str) -> None:
    cfg = _cfg(tmp_path, **change)
    with pytest.raises(ValueError, match=match):
        check_graph_config(cfg)
    if change != dict(amp="fp16") or torch.cuda.is_available():
        with pytest.raises(ValueError, match=match):
            validate_config(cfg)
    check_graph_config(dataclasses.replace(cfg, cuda_graph=False))  # off: nothing to check


def test_optimizer_kwargs_make_the_step_capturable() -> None:
    from timm.optim import create_optimizer_v2

    m = torch.nn.Linear(3, 3)
    for opt, flag in (("adamw", "capturable"), ("adam", "capturable"), ("sgd", "fused")):
        o = create_optimizer_v2(m, opt=opt, lr=0.1, **graph_optimizer_kwargs(opt))
        assert o.defaults[flag] is True, opt


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_trainer_refuses_without_a_gpu(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cuda_graph: needs a CUDA device, running on cpu"):
        train(_cfg(tmp_path, run_name="nogpu"))
    assert not any(tmp_path.rglob("last.pt"))


def test_step_refuses_cpu_tensors() -> None:
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    step = GraphedTrainStep(lambda x, y: m(x).sum(), opt.step, opt)
    with pytest.raises(ValueError, match="x: a captured step needs CUDA tensors"):
        step(torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="warmup: must be >= 1"):
        GraphedTrainStep(lambda x, y: m(x).sum(), opt.step, opt, warmup=0)


def test_flat_gradients_share_one_buffer_and_average(tmp_path: Path) -> None:
    """Gradients become views of one buffer (channels-last weights keep their strides, unused
    parameters keep None); later backwards accumulate into it; the all-reduce averages."""
    import torch.distributed as dist

    from visionattn.train.graphed import FlatGradients

    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    lin = torch.nn.Linear(4, 2)
    unused = torch.nn.Parameter(torch.ones(3))
    params = [*conv.parameters(), *lin.parameters(), unused]

    def loss(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
        return lin(conv(x).mean((2, 3))).square().sum()

    def backward(seed: int) -> list:
        loss(seed).backward()
        return [None if p.grad is None else p.grad.clone() for p in params]

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        flat = FlatGradients(params)
        flat.zero()
        first = backward(0)
        flat.all_reduce()
        assert flat.flat is not None and flat.flat.numel() == sum(p.numel() for p in params[:-1])
        assert unused.grad is None
        lo = flat.flat.data_ptr()
        hi = lo + flat.flat.numel() * flat.flat.element_size()
        for p, g in zip(params[:-1], first[:-1], strict=True):
            assert lo <= p.grad.data_ptr() < hi and p.grad.stride() == p.stride()
            assert torch.equal(p.grad, g)
        flat.zero()
        assert all(p.grad is None or not p.grad.any() for p in params)
        expected = torch.autograd.grad(loss(1), params[:-1])
        backward(1)
        flat.all_reduce()  # one process: the average is the gradient itself
        for p, g in zip(params[:-1], expected, strict=True):
            torch.testing.assert_close(p.grad, g)
            assert lo <= p.grad.data_ptr() < hi

        from visionattn.train.graphed import broadcast_buffers

        bn = torch.nn.BatchNorm2d(4).train()
        bn(torch.randn(2, 4, 3, 3))
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        broadcast_buffers(bn)  # float and int64 buffers, one group each; rank 0 keeps its own
        assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- GPU


def _run_steps(name: str, graphed: bool, opt: str, amp: bool, steps: int = 7) -> tuple:
    """``steps`` AdamW (norm clipping) or SGD (adaptive clipping) steps with a changing
    learning rate, all eager or replayed after 2 eager ones; returns (losses, initial and
    final state dicts)."""
    import timm
    from timm.optim import create_optimizer_v2
    from timm.utils import adaptive_clip_grad

    import visionattn  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).cuda().train()
    initial = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    size = model.pretrained_cfg["input_size"]
    optimizer = create_optimizer_v2(
        model, opt=opt, lr=1e-3, weight_decay=0.05, **graph_optimizer_kwargs(opt)
    )
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [
        (
            torch.randn(8, *size, device="cuda", generator=gen),
            torch.randint(0, 10, (8,), device="cuda", generator=gen),
        )
        for _ in range(steps)
    ]

    def forward_backward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    def update() -> None:
        if opt == "adamw":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:  # the EfficientViT recipe's adaptive clipping
            adaptive_clip_grad(model.parameters(), 0.02)
        optimizer.step()

    # the eager reference is the same runner never reaching capture: the same device-tensor
    # learning rate (a Python-float rate rounds AdamW's update differently)
    runner = GraphedTrainStep(
        forward_backward, update, optimizer, warmup=2 if graphed else steps + 1
    )
    losses = []
    for i, (x, y) in enumerate(batches):
        for g in optimizer.param_groups:
            g["lr"] = 1e-3 * (1.0 + i)  # what a scheduler does: a new float every step
        losses.append(runner(x, y).clone())
    assert runner.captured == graphed and runner.calls == steps
    assert all(isinstance(g["lr"], float) for g in optimizer.param_groups)
    final = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return torch.stack(losses).cpu(), initial, final


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name",
    ["test_va_efficientvit", "test_agent_deit", "test_biformer", "test_nat", "test_litv2",
     "test_va_maxvit", "test_va_halonet", "test_va_focalnet"],
)  # fmt: skip
@pytest.mark.parametrize("opt, amp", [("adamw", True), ("sgd", False)])
def test_graphed_steps_equal_eager_steps(name: str, opt: str, amp: bool) -> None:
    """Replays run the kernels the eager steps run, on the same tensors: the losses and the
    trained weights agree (the learning rate changes every step, so a captured rate would
    show)."""
    le, s0, se = _run_steps(name, False, opt, amp)
    lg, _, sg = _run_steps(name, True, opt, amp)
    assert le.isfinite().all()
    # fp32 + SGD: equal to rounding. bf16 + AdamW: backward kernels that accumulate with
    # atomics (likely torchvision's deform conv and index_add_ of bias gradients) can make
    # even two eager runs differ in the last bit; bf16 casts turn that into 1-ulp loss
    # differences, and AdamW's normalised update moves a weight whose gradient is ~0 by up to
    # ~lr either way.
    if not amp:
        torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-5)
        for k in se:
            torch.testing.assert_close(sg[k], se[k], rtol=1e-5, atol=1e-5, msg=k)
        return
    torch.testing.assert_close(lg, le, rtol=0.0, atol=1e-2)
    # the graphed run's weights differ from the eager run's by far less than training moved them
    keys = [k for k in se if se[k].is_floating_point()]
    moved = torch.cat([(se[k] - s0[k]).abs().flatten() for k in keys]).mean()
    apart = torch.cat([(sg[k] - se[k]).abs().flatten() for k in keys]).mean()
    assert apart <= 0.05 * moved, (apart, moved)


@pytest.mark.gpu
def test_trainer_graphed_run_validates_fresh_weights_and_resumes_exactly(
    tmp_path: Path, strip_timing
) -> None:
    from visionattn.train.validate import validate

    # loader workers + pinned memory: a pin-memory thread runs beside the capture
    kw = dict(amp="bf16", clip_grad=1.0, drop_rate=0.1, mixup=0.2, workers=2, pin_memory=True)
    full = train(_cfg(tmp_path, run_name="full", **kw))
    run = Path(full["run_dir"])
    # the recorded validation is the trained weights', not memos left from the capture step
    final = full["final"]
    res = validate(checkpoint=str(run / "last.safetensors"), batch_size=64, workers=0, amp="bf16")
    assert res["top1"] == pytest.approx(final["top1"], abs=1e-9)
    assert res["loss"] == pytest.approx(final["val_loss"], rel=1e-5)

    part = train(_cfg(tmp_path, run_name="part", stop_after=5, **kw))
    assert part["stopped_early"]
    resumed = train(_cfg(tmp_path, run_name="part", resume=part["run_dir"], **kw))
    a = load_checkpoint(run / "last.pt")
    b = load_checkpoint(Path(resumed["run_dir"]) / "last.pt")
    assert a["num_updates"] == b["num_updates"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert strip_timing(a["history"]["epochs"]) == strip_timing(b["history"]["epochs"])

    # the same recipe eagerly (non-capturable optimizer: other rounding, same training)
    eager = train(_cfg(tmp_path, run_name="eager", cuda_graph=False, **kw))
    assert eager["final"]["train_loss"] == pytest.approx(final["train_loss"], rel=0.02)


ARGS_2GPU = (
    "--model test_va_efficientvit --digits-size 32 --img-size 32 --crop-pct 1.0 --hflip 0 "
    "--color-jitter 0 --batch-size 32 --epochs 2 --warmup-epochs 1 --lr 2e-3 --workers 0 "
    "--amp bf16 --clip-grad 1.0 --drop-rate 0.1 --mixup 0.2 --ema --ema-decay 0.9 "
    "--log-every 5 --no-progress --no-tensorboard"
).split()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpu_graphed_run_resumes_exactly_and_tracks_ddp(
    tmp_path: Path, launch_two_processes, two_process_resume
) -> None:
    """Two processes, no DDP wrapper: flat gradients averaged between the two graphs, rank 0's
    buffers broadcast; a stopped and resumed run ends bit-identical, and an eager DDP run of
    the same recipe lands on the same training loss."""
    # full vs stopped-and-resumed: same weights, EMA and epoch history (conftest)
    a, _ = two_process_resume(tmp_path, *ARGS_2GPU, "--cuda-graph")

    launch_two_processes(*ARGS_2GPU, "--output", str(tmp_path), "--run-name", "ddp")
    d = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    ga, gd = a["history"]["epochs"][-1], d["history"]["epochs"][-1]
    assert ga["train_loss"] == pytest.approx(gd["train_loss"], rel=0.03)
    assert abs(ga["top1"] - gd["top1"]) < 5.0


def _gloo_run(rank: int, graphed: bool, steps: int = 6) -> dict:
    from visionattn.train.graphed import FlatGradients, broadcast_buffers

    torch.manual_seed(0)  # the same initial weights on both ranks
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **graph_optimizer_kwargs("adamw"))
    flat = FlatGradients(model.parameters())

    def forward_backward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        flat.zero()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    def reduce() -> None:
        flat.all_reduce()
        broadcast_buffers(model)

    runner = GraphedTrainStep(
        forward_backward, opt.step, opt, warmup=2 if graphed else steps + 1, reduce=reduce
    )
    gen = torch.Generator(device="cuda").manual_seed(100 + rank)  # each rank its own data
    for i in range(steps):
        for g in opt.param_groups:
            g["lr"] = 1e-2 / (1 + i)
        x = torch.randn(4, 3, 8, 8, device="cuda", generator=gen)
        y = torch.randint(0, 5, (4,), device="cuda", generator=gen)
        runner(x, y)
    assert runner.captured == graphed
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _gloo_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {graphed: _gloo_run(rank, graphed) for graphed in (False, True)}
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.gpu
def test_two_process_graphed_step_on_one_gpu(tmp_path: Path) -> None:
    """The distributed path's mechanics (two graphs, eager all-reduce of the flat gradients
    and buffer broadcast between them) on one GPU with two gloo processes: replays equal the
    eager steps, and both ranks hold the same weights and BatchNorm statistics."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "res")
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}") for r in range(2))
    for k in r0[True]:
        torch.testing.assert_close(r0[True][k], r0[False][k], rtol=1e-5, atol=1e-6, msg=k)
        assert torch.equal(r0[True][k], r1[True][k]), k


def test_bench_models_cuda_graph_refusals(capsys) -> None:
    from visionattn.train.bench import bench_models_main

    argv = ["test_nat", "--batch-size", "2", "--steps", "1", "--cuda-graph"]
    assert bench_models_main([*argv, "--device", "cpu"]) == 2
    assert "cuda_graph: needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_models_cuda_graph_row(tmp_path: Path) -> None:
    from visionattn.train.bench import bench_model

    row = bench_model("test_va_efficientvit", batch_size=8, steps=3, warmup=0, cuda_graph=True)
    assert row["cuda_graph"] and row["train_img_per_s"] > 0 and row["infer_img_per_s"] > 0
    assert "train_error" not in row

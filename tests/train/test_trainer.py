"""The training loop: outputs, exact resume, atomic checkpoints, bad input, validate, bench.

Runs use timm's tiny ``test_efficientnet`` (BatchNorm buffers, drop path) on the embedded
digits at 16 px, so that each training run takes seconds on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from visionattn.train.checkpoint import load_checkpoint, save_checkpoint
from visionattn.train.config import TrainConfig
from visionattn.train.trainer import train

TINY = dict(
    model="test_efficientnet",
    data_dir=None,
    digits_size=16,
    img_size=16,
    crop_pct=1.0,
    hflip=0.0,
    color_jitter=0.0,
    scale=[0.6, 1.0],
    workers=0,
    batch_size=64,
    epochs=2,
    warmup_epochs=1,
    lr=3e-3,
    log_every=5,
    progress=False,
    tensorboard=False,
    seed=3,
)


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "output": str(tmp_path), **kw})


def test_run_writes_checkpoints_logs_plot_and_timm_loadable_weights(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import load_file

    out = train(_cfg(tmp_path, run_name="run", epochs=1, warmup_epochs=0))
    run = Path(out["run_dir"])
    for name in ("last.pt", "last.safetensors", "best.safetensors", "config.yaml"):
        assert (run / name).is_file(), name
    for name in ("metrics.csv", "steps.csv", "metrics.json", "curves.png"):
        assert (run / name).stat().st_size > 0, name
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    metrics = json.loads((run / "metrics.json").read_text())
    (rec,) = metrics["epochs"]
    assert rec["epoch"] == 1 and 0.0 <= rec["top1"] <= 100.0 and rec["train_loss"] > 0
    assert metrics["steps"] and metrics["steps"][-1]["step"] == rec["step"]
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "top1" in header and "lr" in header

    # the safetensors file is the model's own state dict: timm loads it as pretrained weights
    path = str(run / "best.safetensors")
    model = timm.create_model(
        "test_efficientnet",
        pretrained=True,
        num_classes=10,
        pretrained_cfg_overlay=dict(file=path, num_classes=10),
    )
    sd = load_file(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_resume_mid_epoch_reproduces_the_uninterrupted_run_bit_for_bit(
    tmp_path: Path, strip_timing
) -> None:
    # every piece of state a resume must restore: EMA, mixup/cutmix (numpy RNG), drop path
    # (torch RNG), random erasing, label smoothing, accumulation, clipping, BatchNorm buffers
    kw = dict(
        ema=True,
        ema_decay=0.9,
        mixup=0.4,
        cutmix=1.0,
        reprob=0.25,
        drop_path=0.1,
        grad_accum=2,
        clip_grad=1.0,
        checkpoint_every=0,
    )
    full = train(_cfg(tmp_path, run_name="full", **kw))
    part = train(_cfg(tmp_path, run_name="part", stop_after=3, **kw))
    assert part["stopped_early"] and part["num_updates"] == 3
    stopped = load_checkpoint(Path(part["run_dir"]) / "last.pt")
    assert stopped["epoch"] == 0 and stopped["micro_step"] == 6  # mid-epoch, 2 micro per step
    # the command line resumes from the checkpoint's own recipe: only --resume is needed
    from visionattn.train.cli import build_train_parser
    from visionattn.train.config import config_from_args

    ns = build_train_parser().parse_args(["--resume", part["run_dir"]])
    cfg = config_from_args(ns)
    assert cfg == _cfg(tmp_path, run_name="part", resume=part["run_dir"], **kw)
    resumed = train(cfg)
    assert not resumed["stopped_early"]

    a = load_checkpoint(Path(full["run_dir"]) / "last.pt")
    b = load_checkpoint(Path(resumed["run_dir"]) / "last.pt")
    assert a["num_updates"] == b["num_updates"] == 2 * 11
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    assert strip_timing(a["history"]["epochs"]) == strip_timing(b["history"]["epochs"])
    assert strip_timing(a["history"]["steps"]) == strip_timing(b["history"]["steps"])
    assert a["best"] == b["best"]


def test_kill_during_save_leaves_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {"step": 1}}, path)
    before = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # half-written file, then the process "dies"
            fh.truncate(os.path.getsize(f) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {"step": 2}}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def _image_folder(root: Path, classes: list[str], per_class: int = 4) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                px = (torch.rand(12, 12, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(px).save(d / f"{i}.png")
    return root


def test_image_folder_run_and_resume_class_mismatch(tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "data", ["cat", "dog", "fox"])
    cfg = _cfg(
        tmp_path,
        run_name="folder",
        data_dir=str(data),
        batch_size=4,
        epochs=1,
        warmup_epochs=0,
        img_size=16,
    )
    out = train(cfg)
    ckpt = load_checkpoint(Path(out["run_dir"]))
    assert ckpt["classes"] == ["cat", "dog", "fox"] and ckpt["num_classes"] == 3

    other = _image_folder(tmp_path / "other", ["cat", "dog", "emu"])
    bad = dataclasses.replace(cfg, data_dir=str(other), resume=out["run_dir"])
    with pytest.raises(ValueError, match="classes do not match the checkpoint"):
        train(bad)
    # a changed recipe is refused too, before any work
    with pytest.raises(ValueError, match=r"recipe differs from the checkpoint's \(lr"):
        train(dataclasses.replace(cfg, lr=0.5, resume=out["run_dir"]))


def test_bad_input_fails_before_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model: 'nope_model'"):
        train(_cfg(tmp_path, model="nope_model"))
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        train(_cfg(tmp_path, data_dir=str(empty)))
    with pytest.raises(ValueError, match="resume: 'missing.pt' does not exist"):
        train(_cfg(tmp_path, resume="missing.pt"))
    with pytest.raises(ValueError, match="too few"):
        train(_cfg(tmp_path, batch_size=2000))
    assert not any(tmp_path.rglob("last.pt"))


def test_validate_reproduces_training_metrics(tmp_path: Path, capsys) -> None:
    from visionattn.train.validate import validate, validate_main

    out = train(_cfg(tmp_path, run_name="v", epochs=1, warmup_epochs=0))
    final = out["final"]
    run = Path(out["run_dir"])
    # same batch size as the run's validation: CPU kernels may round differently per batch
    res = validate(checkpoint=str(run / "last.safetensors"), batch_size=128, workers=0)
    assert res["count"] == 364
    assert res["top1"] == pytest.approx(final["top1"], abs=1e-9)
    assert res["top5"] == pytest.approx(final["top5"], abs=1e-9)
    res_pt = validate(checkpoint=str(run / "last.pt"), batch_size=128, workers=0)
    assert res_pt["top1"] == pytest.approx(final["top1"], abs=1e-9)
    js = tmp_path / "val.json"
    code = validate_main(
        ["--checkpoint", str(run / "best.safetensors"), "--workers", "0", "--json", str(js)]
    )
    assert code == 0 and "top-1" in capsys.readouterr().out
    assert json.loads(js.read_text())["count"] == 364
    assert validate_main(["--model", "test_efficientnet"]) == 2  # neither checkpoint nor tag
    assert "give --checkpoint" in capsys.readouterr().err


def test_bench_models_table_and_json(tmp_path: Path, capsys) -> None:
    from visionattn.train.bench import bench_models_main

    js = tmp_path / "bench.json"
    argv = ["test_efficientnet", "test_nat", "--batch-size", "2", "--img-size", "32"]
    argv += ["--steps", "1", "--warmup", "0", "--amp", "no", "--json", str(js)]
    assert bench_models_main(argv) == 0
    text = capsys.readouterr().out
    assert "train img/s" in text and "test_nat" in text
    rows = json.loads(js.read_text())["results"]
    assert [r["model"] for r in rows] == ["test_efficientnet", "test_nat"]
    for r in rows:
        assert r["infer_img_per_s"] > 0 and r["train_img_per_s"] > 0
    assert bench_models_main(["not_a_model_zz"]) == 2


def test_speed_switches_train_together(tmp_path: Path) -> None:
    # channels_last, gradient checkpointing, accumulation over 3 micro-batches, value
    # clipping and EMA in one short run. fp32: on the CPU, torch's bf16 convolution backward
    # now and then returns NaN weight gradients for 1x1/2x2 maps (seen about 1 run in 8,
    # not reproducible on replay), so bf16 is exercised on the GPU runs instead.
    out = train(
        _cfg(
            tmp_path,
            run_name="sw",
            amp="no",
            channels_last=True,
            grad_checkpointing=True,
            grad_accum=3,
            clip_grad=0.5,
            clip_mode="value",
            ema=True,
            batch_size=32,
            stop_after=3,
        )
    )
    assert out["stopped_early"] and out["num_updates"] == 3
    state = load_checkpoint(Path(out["run_dir"]))
    assert state["micro_step"] == 9
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not v.isfinite().all()]
    assert not bad, bad


@pytest.mark.slow
def test_torch_compile_run(tmp_path: Path) -> None:
    out = train(_cfg(tmp_path, run_name="c", compile=True, epochs=1, warmup_epochs=0))
    assert out["final"]["top1"] > 20.0

"""timm's model contract as executable checks.

Every model visionattn registers is run through these by ``tests/visionattn/test_contract.py``;
a new family gets covered by registering its models. Each check builds the model by name
through ``timm.create_model`` and raises ``AssertionError`` naming the contract item it
broke, so the same checks serve third-party models too::

    from visionattn.contract import run_contract
    run_contract("my_model")
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

__all__ = [
    "CHECKS",
    "check_backward",
    "check_compile",
    "check_default_cfg",
    "check_features_only",
    "check_forward",
    "check_forward_head",
    "check_forward_intermediates",
    "check_grad_checkpointing",
    "check_input_sizes",
    "check_reset_classifier",
    "run_contract",
]

Size = tuple[int, int]


def model_sizes(name: str) -> tuple[Size, ...]:
    """Input sizes a check uses for ``name``: its fixed size if the cfg declares one, else a
    square size at or above ``min_input_size`` (64 by default) and a non-square one whose
    sides are neither multiples of 8 nor of 7."""
    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size:
        return (tuple(cfg.input_size[1:]),)
    m = 64
    if cfg is not None and cfg.min_input_size:
        m = max(m, *cfg.min_input_size[1:])
    return ((m, m), (m + 8, m + 36))


def _size(name: str, size: Size | None) -> Size:
    return model_sizes(name)[0] if size is None else size


def _build(name: str, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def _x(size: Size, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-4) -> None:
    assert a.shape == b.shape, f"{what}: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= atol * max(1.0, b.abs().max().item()), f"{what}: max abs diff {err:.3g}"


def check_default_cfg(name: str) -> None:
    """pretrained_cfg is complete and agrees with the built model."""
    cfg = get_pretrained_cfg(name)
    assert cfg is not None, "default_cfg: no pretrained_cfg registered"
    cfg = cfg.to_dict()
    for key in (
        "input_size",
        "mean",
        "std",
        "interpolation",
        "crop_pct",
        "first_conv",
        "classifier",
    ):
        assert cfg.get(key) is not None, f"default_cfg: missing {key!r}"
    # an architecture nobody has trained (timm's own tag "untrained") has no weights to point at
    if cfg.get("tag") != "untrained":
        assert cfg.get("hf_hub_id"), "default_cfg: missing 'hf_hub_id'"
    with torch.device("meta"):
        model = timm.create_model(name)
    sd = model.state_dict()
    first = cfg["first_conv"]
    for f in [first] if isinstance(first, str) else first:
        assert f + ".weight" in sd, f"default_cfg: first_conv {f!r} has no weight in the model"
    cls = cfg["classifier"] if cfg["num_classes"] else []  # headless cfg (e.g. in22k trunk)
    for c in [cls] if isinstance(cls, str) else cls:
        assert c + ".weight" in sd, f"default_cfg: classifier {c!r} has no weight in the model"
        assert sd[c + ".weight"].shape[0] == cfg["num_classes"], (
            f"default_cfg: classifier {c!r} has {sd[c + '.weight'].shape[0]} outputs, "
            f"cfg num_classes {cfg['num_classes']}"
        )
    assert isinstance(getattr(model, "num_features", None), int), "default_cfg: num_features"
    hidden = getattr(model, "head_hidden_size", model.num_features)
    clf = model.get_classifier()
    if isinstance(clf, nn.Linear):
        assert clf.in_features == hidden, (
            f"default_cfg: classifier in_features {clf.in_features} != head_hidden_size {hidden}"
        )
    pool = cfg.get("pool_size")
    if pool is not None:
        h, w = cfg["input_size"][1:]
        red = model.feature_info[-1]["reduction"]
        assert tuple(pool) == (math.ceil(h / red), math.ceil(w / red)), (
            f"default_cfg: pool_size {pool} != input_size/{red}"
        )
    assert isinstance(model.no_weight_decay(), set), "no_weight_decay: must return a set"
    gm = model.group_matcher()
    assert isinstance(gm, dict) and "stem" in gm and "blocks" in gm, "group_matcher: stem/blocks"


def check_forward(name: str, size: Size | None = None) -> None:
    """forward gives finite (B, num_classes) logits."""
    size = _size(name, size)
    model = _build(name)
    x = _x(size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, model.num_classes), f"forward: output shape {tuple(out.shape)}"
    assert torch.isfinite(out).all(), "forward: non-finite logits"


def check_input_sizes(name: str, sizes: Sequence[Size] | None = None) -> None:
    """forward runs on every size, non-square and non-divisible included (see model_sizes)."""
    sizes = model_sizes(name) if sizes is None else sizes
    model = _build(name)
    for size in sizes:
        with torch.no_grad():
            try:
                out = model(_x(size))
            except Exception as e:  # report which size broke, not just the traceback
                raise AssertionError(
                    f"input_size {size}: forward raised {type(e).__name__}: {e}"
                ) from e
        assert out.shape == (2, model.num_classes), f"input_size {size}: shape {tuple(out.shape)}"
        assert torch.isfinite(out).all(), f"input_size {size}: non-finite logits"


def check_backward(name: str, size: Size | None = None) -> None:
    """Every parameter receives a finite gradient."""
    size = _size(name, size)
    model = _build(name).train()
    out = model(_x(size))
    out.float().square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"backward: no gradient for {missing[:8]}"
    bad = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    assert not bad, f"backward: non-finite gradient for {bad[:8]}"


def check_reset_classifier(name: str, size: Size | None = None) -> None:
    """reset_classifier(0) gives pooled features; reset_classifier(n) gives n logits."""
    size = _size(name, size)
    model = _build(name)
    x = _x(size)
    hidden = getattr(model, "head_hidden_size", model.num_features)
    model.reset_classifier(0)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, hidden), (
        f"reset_classifier(0): output {tuple(out.shape)}, want (2, {hidden})"
    )
    model.reset_classifier(7)
    assert model.num_classes == 7, "reset_classifier(7): num_classes not updated"
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7), f"reset_classifier(7): output {tuple(out.shape)}"
    clf = model.get_classifier()
    assert isinstance(clf, nn.Module), "get_classifier: must return a module"


def check_forward_head(name: str, size: Size | None = None) -> None:
    """forward_head(pre_logits=True) gives (B, head_hidden_size); the rest equals forward."""
    size = _size(name, size)
    model = _build(name)
    x = _x(size)
    hidden = getattr(model, "head_hidden_size", model.num_features)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        full = model(x)
    assert pre.shape == (2, hidden), (
        f"forward_head(pre_logits): {tuple(pre.shape)}, want (2, {hidden})"
    )
    _close(logits, full, "forward_head: forward_head(forward_features(x)) vs forward(x)")


def check_features_only(name: str, size: Size | None = None) -> None:
    """features_only: >= 3 NCHW levels whose channels and strides match feature_info."""
    size = _size(name, size)
    model = _build(name, features_only=True)
    info = model.feature_info
    chans, reds = info.channels(), info.reduction()
    assert len(chans) >= 3, f"features_only: {len(chans)} levels, want >= 3"
    with torch.no_grad():
        feats = model(_x(size))
    assert len(feats) == len(chans), (
        f"features_only: {len(feats)} outputs, feature_info has {len(chans)}"
    )
    for i, (f, c, r) in enumerate(zip(feats, chans, reds)):
        assert f.ndim == 4 and f.shape[1] == c, (
            f"features_only[{i}]: shape {tuple(f.shape)}, channels {c}"
        )
        for dim, n in zip(f.shape[2:], size):
            assert dim in (n // r, math.ceil(n / r)), (
                f"features_only[{i}]: spatial {tuple(f.shape[2:])} != input {size} / reduction {r}"
            )


def check_forward_intermediates(name: str, size: Size | None = None) -> None:
    """forward_intermediates matches forward_features; indices and stop_early are honoured."""
    size = _size(name, size)
    model = _build(name)
    x = _x(size)
    n = len(model.feature_info)
    with torch.no_grad():
        ref = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
        _close(final, ref, "forward_intermediates: final vs forward_features")
        assert len(inter) == n, f"forward_intermediates: {len(inter)} intermediates, want {n}"
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert len(last) == 1, "forward_intermediates: indices=1 must give the last one only"
        _close(last[0], inter[-1], "forward_intermediates: indices=1 vs full")
        first = model.forward_intermediates(
            x, indices=[0], intermediates_only=True, stop_early=True
        )
        assert len(first) == 1, "forward_intermediates: indices=[0] must give one"
        _close(first[0], inter[0], "forward_intermediates: stop_early result vs full")
        for i, (t, c) in enumerate(zip(inter, model.feature_info)):
            assert t.shape[1] == c["num_chs"], f"forward_intermediates[{i}]: channels {t.shape[1]}"
    pruned = copy.deepcopy(model)
    pruned.prune_intermediate_layers(indices=[0, 1], prune_norm=True, prune_head=True)
    with torch.no_grad():
        kept = pruned.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert len(kept) == 2, "prune_intermediate_layers: pruned model lost requested intermediates"
    for i in range(2):
        _close(kept[i], inter[i], f"prune_intermediate_layers: intermediate {i} changed")


def check_grad_checkpointing(name: str, size: Size | None = None) -> None:
    """set_grad_checkpointing(True) leaves outputs and gradients unchanged.

    Compared in eval mode (gradients still flow) so dropout/drop-path randomness cannot
    differ between the two runs.
    """
    size = _size(name, size)
    model = _build(name)
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    x = _x(size)
    outs = []
    for m in (model, ckpt):
        y = m(x)
        y.square().mean().backward()
        outs.append(
            (y.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        )
    _close(outs[1][0], outs[0][0], "set_grad_checkpointing: output changed")
    assert outs[1][1].keys() == outs[0][1].keys(), "set_grad_checkpointing: gradient set changed"
    for k in outs[0][1]:
        _close(outs[1][1][k], outs[0][1][k], f"set_grad_checkpointing: grad of {k}", atol=1e-3)


def check_compile(name: str, size: Size | None = None) -> None:
    """torch.compile(fullgraph=True) traces forward and backward with no graph break.

    The ``aot_eager`` backend traces exactly what inductor would see (Dynamo + AOTAutograd,
    fake impls of our ops) without spending CI minutes on C++ codegen.
    """
    size = _size(name, size)
    torch._dynamo.reset()
    model = _build(name)  # eval: no dropout randomness between compiled and eager runs
    x = _x(size)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    try:
        out = compiled(x)
        out.square().mean().backward()
    except Exception as e:
        raise AssertionError(f"compile: fullgraph tracing failed: {type(e).__name__}: {e}") from e
    with torch.no_grad():
        ref = model(x)
    _close(out.detach(), ref, "compile: compiled vs eager output")


CHECKS: dict[str, Callable[..., None]] = {
    "default_cfg": check_default_cfg,
    "forward": check_forward,
    "backward": check_backward,
    "reset_classifier": check_reset_classifier,
    "forward_head": check_forward_head,
    "features_only": check_features_only,
    "forward_intermediates": check_forward_intermediates,
    "grad_checkpointing": check_grad_checkpointing,
    "input_sizes": check_input_sizes,
    "compile": check_compile,
}


def run_contract(name: str, checks: Sequence[str] | None = None) -> None:
    """Run the named checks (all by default) on a registered model; raise on the first failure."""
    for key in checks or list(CHECKS):
        if key not in CHECKS:
            raise ValueError(f"checks: unknown check {key!r}; known: {sorted(CHECKS)}")
        CHECKS[key](name)

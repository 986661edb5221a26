"""The contract suite must fail loudly: a toy model that honours timm's contract passes every
check, and each deliberately broken copy fails the check for the item it breaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from visionattn.contract import CHECKS, run_contract

WINDOW = 4


class ToyNet(nn.Module):
    """Stem (stride 4) + three conv stages (stride 1, 2, 2) with windowed mixing + head.

    ``broken`` names one contract item to violate.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, broken: str = "", **kwargs):
        super().__init__()
        self.broken = broken
        self.num_classes = num_classes
        dims = (8, 16, 24)
        self.stem = nn.Conv2d(in_chans, dims[0], 4, stride=4)
        self.stages = nn.ModuleList()
        self.feature_info = []
        prev, red = dims[0], 4
        for i, d in enumerate(dims):
            stride = 1 if i == 0 else 2
            red *= stride
            self.stages.append(nn.Conv2d(prev, d, 3, stride=stride, padding=1))
            self.feature_info.append(
                dict(
                    num_chs=d,
                    reduction=red * (2 if broken == "reduction" and i == 2 else 1),
                    module=f"stages.{i}",
                )
            )
            prev = d
        self.unused = nn.Linear(3, 3) if broken == "unused_param" else None
        self.num_features = self.head_hidden_size = prev
        self.head = ClassifierHead(prev, num_classes)
        self.grad_checkpointing = False

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.stages[i](x))
        if self.broken == "divisible":
            h, w = x.shape[-2:]
            if h % WINDOW or w % WINDOW:
                raise RuntimeError(f"map {h}x{w} not divisible by window {WINDOW}")
        if self.broken == "grad_ckpt" and self.grad_checkpointing:
            x = x * 1.5
        if self.broken == "graph_break":
            torch._dynamo.graph_break()
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(len(self.stages)):
            x = self._stage(i, x)
        return x

    def forward_intermediates(
        self,
        x,
        indices=None,
        norm=False,
        stop_early=False,
        output_fmt="NCHW",
        intermediates_only=False,
    ):
        take, max_index = feature_take_indices(len(self.stages), indices)
        inter = []
        x = self.stem(x)
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        for i in range(len(stages)):
            x = self._stage(i, x)
            if i in take:
                inter.append(x)
        if intermediates_only:
            return inter
        if self.broken == "intermediates":
            x = x + 1
        return x, inter

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)")

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool=None):
        if self.broken == "reset_classifier":
            return
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits and self.broken == "pre_logits":
            return x
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# broken item -> (check that must fail, start of its message)
BREAKS = {
    "": (None, None),
    "unused_param": ("backward", "backward: no gradient for"),
    "reset_classifier": ("reset_classifier", "reset_classifier"),
    "pre_logits": ("forward_head", "forward_head"),
    "reduction": ("features_only", "features_only"),
    "intermediates": ("forward_intermediates", "forward_intermediates: final"),
    "grad_ckpt": ("grad_checkpointing", "set_grad_checkpointing: output changed"),
    "divisible": ("input_sizes", r"input_size \(72, 100\)"),
    "graph_break": ("compile", "compile: fullgraph"),
    "no_classifier_cfg": ("default_cfg", "default_cfg: classifier"),
}


def _cfg(broken: str) -> dict:
    cfg = dict(
        num_classes=10,
        input_size=(3, 64, 64),
        pool_size=None,
        crop_pct=0.9,
        interpolation="bicubic",
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        first_conv="stem",
        classifier="head.fc",
        hf_hub_id="visionattn/toy",
    )
    if broken == "no_classifier_cfg":
        cfg["classifier"] = "head.missing"
    return cfg


def _register(broken: str) -> str:
    name = f"_va_contract_toy_{broken or 'ok'}"

    def fn(pretrained: bool = False, **kwargs):
        return build_model_with_cfg(
            ToyNet,
            name,
            pretrained,
            broken=broken,
            feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2)),
            **kwargs,
        )

    fn.__name__ = name
    fn.__module__ = __name__
    register_model(fn)
    return name


# timm reads a module's default_cfgs when a model function of that module is registered
default_cfgs = generate_default_cfgs({f"_va_contract_toy_{b or 'ok'}": _cfg(b) for b in BREAKS})
NAMES = {b: _register(b) for b in BREAKS}


@pytest.mark.parametrize("check", list(CHECKS))
def test_honest_toy_passes_every_check(check: str) -> None:
    run_contract(NAMES[""], [check])


@pytest.mark.parametrize("broken", [b for b in BREAKS if b])
def test_broken_toy_fails_its_check(broken: str) -> None:
    check, message = BREAKS[broken]
    with pytest.raises(AssertionError, match=message):
        run_contract(NAMES[broken], [check])


@pytest.mark.parametrize("broken", [b for b in BREAKS if b])
def test_broken_toy_fails_the_full_contract(broken: str) -> None:
    with pytest.raises(AssertionError):
        run_contract(NAMES[broken])

"""BiFormer: official parity, checkpoint conversion, padding semantics and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import visionattn  # noqa: F401  (registers the models)
from visionattn.backbones import biformer as bf


def _official_sd(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = "state_dict."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


@pytest.fixture(scope="module")
def parity(parity_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    stem = parity_path / "biformer_tiny_reduced"
    if not stem.with_suffix(".json").exists():
        pytest.skip(f"parity vector missing: {stem}.json")
    return load_file(str(stem.with_suffix(".safetensors"))), json.loads(
        stem.with_suffix(".json").read_text()
    )


def test_parity_logits_and_stage_features(parity) -> None:
    tensors, meta = parity
    model = bf.from_official(_official_sd(tensors), meta["constructor_kwargs"])
    x = tensors[meta["input_key"]]
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert logits.shape == tensors["output"].shape
    assert (logits - tensors["output"]).abs().max().item() <= 1e-4
    assert len(feats) == len(meta["features"]) == 4
    for f, spec in zip(feats, meta["features"]):
        assert spec["layout"] == "NCHW"
        ref = tensors[spec["key"]]
        assert f.shape == ref.shape, spec["module"]
        assert (f - ref).abs().max().item() <= 1e-4, spec["module"]


def test_parity_through_convert_entry_point(parity) -> None:
    from visionattn import convert

    tensors, meta = parity
    # an official training checkpoint wraps the weights under "model"
    model = convert.from_official(
        "biformer", {"model": _official_sd(tensors)}, meta["constructor_kwargs"]
    )
    with torch.no_grad():
        logits = model(tensors[meta["input_key"]])
    assert (logits - tensors["output"]).abs().max().item() <= 1e-4


def test_parity_timm_loading_path(parity) -> None:
    """checkpoint_filter_fn maps an official checkpoint onto a timm-built model."""
    tensors, meta = parity
    kw = bf.official_to_ours_kwargs(meta["constructor_kwargs"])
    model = timm.create_model("biformer_tiny", **kw).eval()
    sd = bf.checkpoint_filter_fn({"model": _official_sd(tensors)}, model)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        logits = model(tensors[meta["input_key"]])
    assert (logits - tensors["output"]).abs().max().item() <= 1e-4


def _manifests(parity_path: Path) -> list[Path]:
    found = sorted((parity_path / "manifests").glob("biformer_*.json"))
    if not found:
        pytest.skip(f"no BiFormer manifests under {parity_path / 'manifests'}")
    return found


def test_manifests_convert_completely(parity_path: Path) -> None:
    names = []
    for path in _manifests(parity_path):
        man = json.loads(path.read_text())
        shapes = {k: tuple(v) for k, v in man["state_dict_shapes"].items()}
        kwargs = bf.official_to_ours_kwargs(man["constructor_kwargs"])
        with torch.device("meta"):
            model = bf.BiFormer(**kwargs)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        converted = bf.checkpoint_filter_fn(fake, model)
        # every official key is used (one-to-one renaming), every key of ours is filled
        assert len(converted) == len(shapes), path.name
        assert set(converted) == set(ours), (
            path.name,
            sorted(set(converted) ^ set(ours))[:10],
        )
        for k, v in converted.items():
            assert tuple(v.shape) == ours[k], (path.name, k)
        assert sum(v.numel() for v in model.parameters()) == man["num_parameters"]
        names.append(man["variant"])
    assert {"biformer_tiny", "biformer_small", "biformer_base"} <= set(names)


def test_named_variant_kwargs_match_manifests(parity_path: Path) -> None:
    for path in _manifests(parity_path):
        man = json.loads(path.read_text())
        assert bf.OFFICIAL_VARIANTS[man["variant"]] == man["constructor_kwargs"]


def _ours_to_official(model: bf.BiFormer) -> dict[str, torch.Tensor]:
    """Our state dict under official key names (test helper: the inverse renaming)."""
    out = {}
    for k, v in model.state_dict().items():
        p = k.split(".")
        if p[0] == "stem":
            j = {"conv1": 0, "norm1": 1, "conv2": 3, "norm2": 4}[p[1]]
            ok = f"downsample_layers.0.{j}." + ".".join(p[2:])
        elif p[0] == "stages" and p[2] == "downsample":
            j = {"conv": 0, "norm": 1}[p[3]]
            ok = f"downsample_layers.{p[1]}.{j}." + ".".join(p[4:])
        elif p[0] == "stages":
            routed = isinstance(
                model.stages[int(p[1])].blocks[int(p[3])].attn, bf.BiLevelRoutingAttention
            )
            rest = ".".join(p[4:])
            for a, b in (("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.3."), ("ls1.gamma", "gamma1")):
                rest = rest.replace(a, b)
            if routed:
                rest = rest.replace("attn.qkv.", "attn.qkv.qkv.").replace("attn.proj.", "attn.wo.")
            ok = f"stages.{p[1]}.{p[3]}." + rest
        elif p[0] == "dense_norms":
            ok = "extra_norms." + ".".join(p[1:])
        elif p[0] == "head":
            ok = "head." + p[-1]
        else:
            ok = k
        assert bf._rename_official_key(ok) == k, (ok, k)
        out[ok] = v
    return out


def test_from_official_by_variant_name() -> None:
    torch.manual_seed(0)
    src = timm.create_model("biformer_tiny", auto_pad=False).eval()
    model = bf.from_official(_ours_to_official(src), variant="biformer_tiny")
    assert model.num_classes == 1000 and not model.auto_pad
    x = torch.randn(1, 3, 112, 112)  # stage maps 28, 14, 7: divisible by n_win=7
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_mm_backbone_checkpoint_gives_dense_layout() -> None:
    """An mmdet/mmseg checkpoint (backbone.* keys, extra_norms, no head/norm) converts."""
    torch.manual_seed(0)
    src = timm.create_model(
        "test_biformer", dense_norms=True, num_classes=0, dense_num_heads=8
    ).eval()
    for n in src.dense_norms:
        torch.nn.init.normal_(n.weight)
    ckpt = {
        "meta": {"epoch": 12},
        "state_dict": {
            **{"backbone." + k: v for k, v in _ours_to_official(src).items()},
            "neck.lateral_convs.0.conv.weight": torch.zeros(1),
        },
    }
    official_kwargs = {
        "depth": [1, 1, 1, 1],
        "embed_dim": [16, 24, 32, 48],
        "qk_dims": [16, 24, 32, 48],
        "head_dim": 8,
        "mlp_ratios": [2, 2, 2, 2],
        "n_win": 2,
        "topks": [1, 2, 3, -2],
        "kv_downsample_mode": "identity",
        "auto_pad": True,
        "num_classes": 80,
        "norm_eval": True,
    }
    model = bf.from_official(ckpt, official_kwargs)
    assert model.dense_norms is not None and model.num_classes == 0
    x = torch.randn(1, 3, 70, 50)
    with torch.no_grad():
        a = model.forward_intermediates(x, intermediates_only=True)
        b = src.forward_intermediates(x, intermediates_only=True)
    for fa, fb in zip(a, b):
        assert torch.equal(fa, fb)


def test_own_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_biformer", num_classes=10).eval()
    sd = model.state_dict()
    other = timm.create_model("test_biformer", num_classes=10).eval()
    other.load_state_dict(bf.checkpoint_filter_fn({"model": sd}, other), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


# --------------------------------------------------------------------------------------------
# padding semantics


def _official_bra(attn: bf.BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """The official algorithm, restated plainly: pad, split regions, route on region means,
    gather the top-k regions' keys/values, dense attention, LePE on values, project, crop."""
    n = attn.n_win
    B, H0, W0, C = x.shape
    x = F.pad(x, (0, 0, 0, (-W0) % n, 0, (-H0) % n))
    H, W = x.shape[1:3]
    h, w = H // n, W // n
    q, k, v = attn.qkv(x).split([attn.qk_dim, attn.qk_dim, attn.dim], -1)

    def regions(t):  # [B, H, W, c] -> [B, n*n, h*w, c]
        return t.reshape(B, n, h, n, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, n * n, h * w, -1)

    qr, kr, vr = regions(q), regions(k), regions(v)
    logits = (qr.mean(2) * attn.scale) @ kr.mean(2).transpose(-1, -2)
    idx = logits.topk(attn.topk, dim=-1).indices  # [B, n*n, topk]
    m = attn.num_heads
    out = torch.empty(B, n * n, h * w, C)
    for b in range(B):
        for r in range(n * n):
            ks = kr[b, idx[b, r]].reshape(-1, m, C // m).transpose(0, 1)
            vs = vr[b, idx[b, r]].reshape(-1, m, C // m).transpose(0, 1)
            qs = qr[b, r].reshape(-1, m, C // m).transpose(0, 1)
            a = ((qs * attn.scale) @ ks.transpose(-1, -2)).softmax(-1) @ vs
            out[b, r] = a.transpose(0, 1).reshape(-1, C)
    out = out.reshape(B, n, n, h, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    out = out + attn.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return attn.proj(out)[:, :H0, :W0]


@pytest.mark.parametrize("size", [(9, 13), (12, 8), (5, 7)])
def test_auto_pad_matches_official_padding(size: tuple[int, int]) -> None:
    torch.manual_seed(1)
    attn = bf.BiLevelRoutingAttention(16, 2, n_win=3, topk=2, auto_pad=True).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, *size, 16)
    with torch.no_grad():
        ours, ref = attn(x), _official_bra(attn, x)
    assert ours.shape == (2, *size, 16)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_any_input_size_runs_with_auto_pad() -> None:
    model = timm.create_model("test_biformer", num_classes=5)
    for size in [(67, 93), (96, 40), (33, 31)]:
        x = torch.randn(1, 3, *size, requires_grad=True)
        y = model(x)
        assert y.shape == (1, 5)
        feats = model.forward_intermediates(x, intermediates_only=True)
        hw = [-(-s // 4) for s in size]  # stride-2 convs with padding 1 round up
        for f in feats:
            assert list(f.shape[-2:]) == hw
            hw = [-(-s // 2) for s in hw]
        y.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_features_only() -> None:
    model = timm.create_model("test_biformer", features_only=True, out_indices=(1, 3))
    assert model.feature_info.channels() == [24, 48]
    assert model.feature_info.reduction() == [8, 32]
    outs = model(torch.randn(1, 3, 80, 72))
    assert [tuple(o.shape) for o in outs] == [(1, 24, 10, 9), (1, 48, 3, 3)]


# --------------------------------------------------------------------------------------------
# errors


def test_non_divisible_input_refused_without_auto_pad() -> None:
    model = timm.create_model("test_biformer", auto_pad=False)
    model(torch.randn(1, 3, 64, 96))  # 16x24, 8x12, 4x6: all divide by n_win=2
    with pytest.raises(ValueError, match="n_win=2.*auto_pad=True"):
        model(torch.randn(1, 3, 68, 64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(topks=(5, 2, 3, -2)), "topk: 5 must be in"),
        (dict(topks=(1, 2, 3, 0)), "topk: 0 is not supported"),
        (dict(head_dim=5), "head_dim: 5 must divide"),
        (dict(n_win=0), "n_win"),
        (dict(depths=(1, 1, 1)), "depths"),
        (dict(before_attn_dwconv=5), "before_attn_dwconv"),
        (dict(qk_dims=(16, 20, 32, 48)), "head_dim: 8 must divide"),
    ],
)
def test_bad_constructor_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        timm.create_model("test_biformer", **kwargs)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (dict(kv_downsample_mode="ada_avgpool"), "kv_downsample_mode"),
        (dict(soft_routing=True), "soft_routing"),
        (dict(pe="sum"), "pe="),
        (dict(not_an_arg=1), "unknown official"),
        (dict(qk_dims=[None, None, None, None]), "qk_dims"),
    ],
)
def test_bad_official_kwargs(override: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bf.official_to_ours_kwargs({**bf.OFFICIAL_VARIANTS["biformer_tiny"], **override})


def test_bad_from_official_arguments() -> None:
    with pytest.raises(ValueError, match="variant"):
        bf.from_official({}, variant="biformer_huge")
    with pytest.raises(ValueError, match="family"):
        bf.from_official({}, variant="biformer_tiny", family="nat")


@pytest.mark.gpu
def test_cuda_matches_cpu_reference_fp32_and_bf16(cuda_matches_cpu) -> None:
    """The model on the GPU kernels (routed Triton, SDPA) against the CPU reference path
    (``cuda_matches_cpu`` in conftest.py)."""
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", n_win=8, num_classes=10).eval()
    cuda_matches_cpu(model, torch.randn(2, 3, 200, 232))  # auto_pad in every routed stage


def test_cli_convert_writes_a_hub_folder_timm_reloads(parity, parity_path: Path, tmp_path) -> None:
    from visionattn.cli import main

    tensors, meta = parity
    ckpt = tmp_path / "official.pth"
    torch.save({"model": _official_sd(tensors)}, ckpt)
    out = tmp_path / "hub"
    kwargs = "@" + str(parity_path / "biformer_tiny_reduced.json")
    assert main(["convert", "--family", "biformer", str(ckpt), str(out), "--kwargs", kwargs]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        logits = model(tensors[meta["input_key"]])
    assert (logits - tensors["output"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("pre_norm", [True, False])
def test_block_norm_kind_follows_pre_norm(pre_norm: bool) -> None:
    """Pre-norm outputs feed linears only and take the fused norm; post-norm outputs are the
    residual stream and stay nn.LayerNorm (float32 under autocast). Same keys either way."""
    from visionattn.backbones._layers import AutocastLayerNorm

    block = bf.BiFormerBlock(64, num_heads=2, n_win=7, topk=1, pre_norm=pre_norm)
    for norm in (block.norm1, block.norm2):
        assert isinstance(norm, torch.nn.LayerNorm)
        assert isinstance(norm, AutocastLayerNorm) is pre_norm
    assert {"norm1.weight", "norm2.bias"} <= set(block.state_dict())

"""NAT / DiNAT / DiNAT-s / isotropic: official parity, checkpoint conversion, input sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import visionattn  # noqa: F401  (registers the models)
import visionattn.kernels as kernels
from visionattn import convert
from visionattn.backbones import nat

PARITY_STEMS = ("nat_mini_reduced", "dinat_mini_reduced")
TOL = 1e-4


def _load_vector(parity_path: Path, stem: str):
    from safetensors.torch import load_file

    st, js = parity_path / f"{stem}.safetensors", parity_path / f"{stem}.json"
    if not st.is_file():
        pytest.skip(f"parity vector {st} not found")
    t = load_file(str(st))
    meta = json.loads(js.read_text())
    sd = {k[len("state_dict.") :]: v for k, v in t.items() if k.startswith("state_dict.")}
    return t, meta, sd


@pytest.mark.parametrize("stem", PARITY_STEMS)
def test_parity_official(parity_path: Path, stem: str) -> None:
    t, meta, sd = _load_vector(parity_path, stem)
    family = "dinat" if stem.startswith("dinat") else "nat"
    model = convert.from_official(family, sd, meta["constructor_kwargs"])
    assert not model.training
    with torch.no_grad():
        final, feats = model.forward_intermediates(t["input"], output_fmt="NHWC")
        logits = model.forward_head(final)
        logits_direct = model(t["input"])
    assert logits.shape == t["output"].shape
    assert (logits - t["output"]).abs().max().item() <= TOL
    assert torch.equal(logits, logits_direct)
    assert len(feats) == len(meta["features"])
    for f, fm in zip(feats, meta["features"]):
        assert fm["layout"] == "NHWC"
        ref = t[fm["key"]]
        assert f.shape == ref.shape, fm["module"]
        assert (f - ref).abs().max().item() <= TOL, fm["module"]


def test_parity_via_timm_pretrained_file(parity_path: Path, tmp_path: Path) -> None:
    """An official .pth (wrapped like a training checkpoint) loads through timm's own
    pretrained path: checkpoint_filter_fn converts it."""
    t, meta, sd = _load_vector(parity_path, "dinat_mini_reduced")
    path = tmp_path / "official.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    name, args = nat.official_model_args(sd, meta["constructor_kwargs"])
    assert name == "dinat_mini"
    model = timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=100),
        **args,
    ).eval()
    with torch.no_grad():
        assert (model(t["input"]) - t["output"]).abs().max().item() <= TOL


def test_parity_through_hub_folder(parity_path: Path, tmp_path: Path) -> None:
    """from_official -> Hub folder (config.json + model.safetensors) -> timm rebuilds it."""
    from visionattn import hub

    t, meta, sd = _load_vector(parity_path, "nat_mini_reduced")
    model = nat.from_official(sd, meta["constructor_kwargs"])
    out = hub.save_hub_folder(model, tmp_path / "hub", model_args=model.model_args)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert (loaded(t["input"]) - t["output"]).abs().max().item() <= TOL


def test_cli_convert_official_file(parity_path: Path, tmp_path: Path) -> None:
    """`visionattn convert --family dinat <official .pth> <out> --kwargs @vector.json`."""
    from visionattn.cli import main

    t, meta, sd = _load_vector(parity_path, "dinat_mini_reduced")
    ckpt = tmp_path / "dinat_official.pth"
    torch.save({"model": sd}, ckpt)
    out = tmp_path / "hub"
    kwargs = f"@{parity_path / 'dinat_mini_reduced.json'}"
    assert main(["convert", "--family", "dinat", str(ckpt), str(out), "--kwargs", kwargs]) == 0
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert (loaded(t["input"]) - t["output"]).abs().max().item() <= TOL


def _manifests(parity_dir: Path | None) -> list[Path]:
    if parity_dir is None:
        return []
    return sorted(
        p
        for p in (parity_dir / "manifests").glob("*.json")
        if p.stem.startswith(("nat_", "dinat_"))
    )


def test_manifests_present(parity_path: Path) -> None:
    names = {p.stem for p in _manifests(parity_path)}
    assert {"nat_mini", "nat_base", "dinat_large_384_11x11", "dinat_s_tiny"} <= names
    assert names <= set(nat.OFFICIAL_VARIANTS), names - set(nat.OFFICIAL_VARIANTS)


def test_manifests_convert_completely(parity_path: Path) -> None:
    """Every official variant: every official key used, every one of ours filled, shapes equal,
    and the official kwargs resolve to the variant's own registered model."""
    manifests = _manifests(parity_path)
    assert manifests
    for path in manifests:
        man = json.loads(path.read_text())
        shapes = man["state_dict_shapes"]
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        name, args = nat.official_model_args(sd, man["constructor_kwargs"])
        assert name == man["variant"], path.stem
        with torch.device("meta"):
            model = timm.create_model(name, **args)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        conv = {k: tuple(v.shape) for k, v in nat.convert_official_state_dict(sd).items()}
        assert len(conv) == len(shapes), path.stem  # no two official keys collapse
        assert conv == ours, (path.stem, set(conv) ^ set(ours))
        assert sum(v.numel() for v in model.parameters()) == man["num_parameters"], path.stem
        # a named variant's kwargs are known without them
        assert nat.official_model_args(sd, variant=man["variant"])[0] == name


@pytest.mark.parametrize("name", ["test_nat", "test_dinat", "test_dinat_s", "test_dinat_isotropic"])
@pytest.mark.parametrize("size", [(61, 93), (37, 50), (8, 8)])
def test_any_input_size(name: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        y = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    red = [f["reduction"] for f in model.feature_info]
    for f, r, info in zip(feats, red, model.feature_info):
        # strided convs and padded patches both give ceil(size / reduction)
        assert f.shape == (2, info["num_chs"], -(-size[0] // r), -(-size[1] // r))
    # batch elements are independent (padding never mixes samples)
    with torch.no_grad():
        assert torch.allclose(model(x[1:]), y[1:], atol=1e-5)


def _record_na2d(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    calls: list[dict] = []
    real = kernels.na2d

    def spy(q, k, v, **kw):
        calls.append(dict(shape=tuple(q.shape[1:3]), dilation=kw["dilation"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(kernels, "na2d", spy)
    return calls


def test_dilation_adapts_to_small_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rule: per axis, dilation = max(1, min(configured, size // kernel_size)); maps smaller
    than the kernel are padded to it. At the configured resolution nothing changes."""
    model = timm.create_model("test_dinat").eval()  # kernel 3, dilations [[1, 5], [1, 2], ...]
    calls = _record_na2d(monkeypatch)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))  # stage maps 16, 8, 4, 2
    assert [c["dilation"] for c in calls] == [1, 5, 1, 2, 1, 1]
    assert calls[-1]["shape"] == (3, 3)  # 2x2 map padded to the kernel
    calls.clear()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 64))  # stage 0: 8 x 16 -> dilation 2 rows, 5 cols
    assert [c["dilation"] for c in calls][:4] == [1, (2, 5), 1, (1, 2)]
    assert calls[0]["shape"] == (8, 16)


def test_dilation_policy_pad_matches_official_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    """policy "pad": the official behaviour, normalized tokens zero-padded bottom/right to
    kernel * dilation before qkv (padded keys carry the qkv bias), output cropped."""
    torch.manual_seed(0)
    attn = nat.NeighborhoodAttention2d(16, 2, kernel_size=3, dilation=4, dilation_policy="pad")
    attn.qkv.bias.data.normal_()
    x = torch.randn(2, 5, 14, 16)  # 5 < 12 rows, 14 >= 12 cols
    with torch.no_grad():
        y = attn(x)
        xp = F.pad(x, (0, 0, 0, 0, 0, 7))
        q, k, v = attn.qkv(xp).view(2, 12, 14, 3, 2, 8).unbind(3)
        ref = kernels.na2d(q, k, v, kernel_size=3, dilation=4, rpb=attn.rpb)
        ref = attn.proj(ref.reshape(2, 12, 14, 16)[:, :5])
    assert torch.allclose(y, ref, atol=1e-6)
    adapt = nat.NeighborhoodAttention2d(16, 2, kernel_size=3, dilation=4)
    adapt.load_state_dict(attn.state_dict())
    calls = _record_na2d(monkeypatch)
    with torch.no_grad():
        adapt(x)
    assert calls == [dict(shape=(5, 14), dilation=(1, 4))]


def test_detection_dilations_are_constructor_args(monkeypatch: pytest.MonkeyPatch) -> None:
    dil = [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3, 1, 3, 1]]
    with torch.device("meta"):
        model = timm.create_model("dinat_mini", dilations=dil, num_classes=0)
    got = [[b.attn.dilation for b in s.blocks] for s in model.stages]
    assert got == dil


def test_timm_style_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = timm.create_model("test_dinat", num_classes=7).eval()
    for p in src.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "ours.pth"
    torch.save(src.state_dict(), path)
    dst = timm.create_model(
        "test_dinat", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=7)
    ).eval()
    x = torch.randn(1, 3, 48, 56)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    # a different kernel size gets bicubically resized relative-position biases
    dst5 = timm.create_model(
        "test_dinat",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=7),
        kernel_size=5,
    )
    assert dst5.stages[0].blocks[0].attn.rpb.shape == (1, 9, 9)


def _official_merge(x: torch.Tensor) -> torch.Tensor:
    """The official DiNAT-s PatchMerging concatenation (four strided slices), for the test."""
    x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
    parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
    return torch.cat(parts, -1)


def test_patch_merging_matches_official_order() -> None:
    torch.manual_seed(0)
    pm = nat.PatchMerging(6, 12)
    x = torch.randn(2, 7, 9, 6)
    with torch.no_grad():
        assert torch.allclose(pm(x), pm.reduction(pm.norm(_official_merge(x))), atol=1e-6)


def test_dinat_s_and_isotropic_conversion_round_trip() -> None:
    """Official-layout keys (as the manifests list them) load into the right modules: an
    official-key state dict made from our model converts back to the identical model."""
    for name in ("test_dinat_s", "test_dinat_isotropic", "test_nat"):
        ours = timm.create_model(name).eval()
        sd = ours.state_dict()
        official = {_to_official(k, name): v for k, v in sd.items()}
        assert nat.convert_official_state_dict(official) == sd


def _to_official(key: str, name: str) -> str:
    # inverse renaming written independently of the converter, from the official module names
    parts = key.split(".")
    if parts[0] == "head":
        return "head." + parts[-1]
    if parts[0] == "stem":
        if name == "test_nat":
            conv = {"conv1": "proj.0", "conv2": "proj.1"}
            return "patch_embed." + ".".join([conv.get(parts[1], parts[1]), *parts[2:]])
        return "patch_embed." + ".".join(parts[1:])
    if parts[0] == "blocks":
        return "layers." + ".".join(parts[1:])
    if parts[0] == "stages":
        lvl = "levels" if name == "test_nat" else "layers"
        i = int(parts[1])
        if parts[2] == "downsample":
            return f"{lvl}.{i - 1}.downsample." + ".".join(parts[3:])
        rest = ".".join(parts[4:]).replace("ls1.gamma", "gamma1").replace("ls2.gamma", "gamma2")
        return f"{lvl}.{i}.blocks.{parts[3]}.{rest}"
    return key


def test_features_only_and_grads() -> None:
    for name in ("test_nat", "test_dinat_s", "test_dinat_isotropic"):
        fm = timm.create_model(name, features_only=True, out_indices=(0, 1))
        outs = fm(torch.randn(1, 3, 64, 64))
        assert [o.shape[1] for o in outs] == fm.feature_info.channels()
        model = timm.create_model(name, num_classes=3)
        model(torch.randn(2, 3, 40, 56)).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, (name, missing)


def test_bad_inputs() -> None:
    model = timm.create_model("test_nat")
    with pytest.raises(ValueError, match="x: expected an image batch"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="x: expected an image batch"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        model.stem(None)
    with pytest.raises(ValueError, match="attn_drop_rate"):
        timm.create_model("test_nat", attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="dilations"):
        timm.create_model("test_nat", dilations=[[1], [1]])
    with pytest.raises(ValueError, match="kernel_size"):
        timm.create_model("test_nat", kernel_size=4)
    with pytest.raises(ValueError, match="dilation_policy"):
        timm.create_model("test_nat", dilation_policy="grow")
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NLC")
    sd = {k: torch.empty(0) for k in ("levels.0.blocks.0.norm1.weight", "head.weight")}
    with pytest.raises(ValueError, match="official_kwargs: 'window_size'"):
        nat.official_model_args(sd, dict(window_size=7))
    with pytest.raises(ValueError, match="variant"):
        nat.official_model_args(sd, variant="nat_huge")
    with pytest.raises(ValueError, match="variant: 'dinat_s_tiny'"):
        nat.official_model_args(sd, variant="dinat_s_tiny")
    with pytest.raises(ValueError, match="state_dict: not an official"):
        nat.from_official({"foo.weight": torch.zeros(1)}, variant="nat_mini")
    with pytest.raises(ValueError, match="not recognized"):
        nat.convert_official_state_dict(
            {"levels.0.blocks.0.norm1.weight": torch.zeros(1), "levels.9": torch.zeros(1)}
        )
    with pytest.raises(ValueError, match="family"):
        nat.official_model_args(sd, variant="nat_mini", family="swin")


@pytest.mark.gpu
@pytest.mark.parametrize("stem", PARITY_STEMS)
def test_parity_official_cuda(
    parity_path: Path, stem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same parity on the GPU kernels: float32 within 1e-4, bf16 autocast close."""
    t, meta, sd = _load_vector(parity_path, stem)
    model = nat.from_official(sd, meta["constructor_kwargs"]).cuda()
    x = t["input"].cuda()
    # cuDNN convs default to TF32 (1e-3 error): float32 parity needs IEEE convs
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, output_fmt="NHWC")
        logits = model.forward_head(final).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits_bf16 = model(x).float().cpu()
    err = (logits - t["output"]).abs().max().item()
    errs = [(f.cpu() - t[fm["key"]]).abs().max().item() for f, fm in zip(feats, meta["features"])]
    assert err <= TOL and max(errs) <= TOL, (err, errs)
    scale = t["output"].abs().max().item()
    assert (logits_bf16 - t["output"]).abs().max().item() <= 0.05 * scale + 1e-2


def _mmdet_checkpoint(sd: dict, n_stages: int, seed: int = 0) -> tuple[dict, list]:
    """An official mmdet/mmseg-style checkpoint made from a classification state dict: the
    backbone under ``backbone.`` with out norms ``norm0..`` (no final norm/head), plus a neck."""
    g = torch.Generator().manual_seed(seed)
    body = {k: v for k, v in sd.items() if not k.startswith(("norm.", "head."))}
    norms = []
    for i in range(n_stages):
        c = sd[f"levels.{i}.blocks.0.norm1.weight"].shape[0]
        w, b = 1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
        body[f"norm{i}.weight"], body[f"norm{i}.bias"] = w, b
        norms.append((w, b))
    state = {f"backbone.{k}": v for k, v in body.items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.randn(8, 4, 1, 1, generator=g)
    return {"meta": {"epoch": 36}, "state_dict": state}, norms


def test_parity_detection_checkpoint(parity_path: Path) -> None:
    """An official detection/segmentation backbone checkpoint (``backbone.*`` keys with the
    per-stage out norms ``norm0..3``) converts into ``dense_norms=True`` and returns the
    official features: each stage's official output through its out norm."""
    t, meta, sd = _load_vector(parity_path, "dinat_mini_reduced")
    n = len(meta["features"])
    ckpt, norms = _mmdet_checkpoint(sd, n)
    kwargs = {k: v for k, v in meta["constructor_kwargs"].items() if k != "num_classes"}
    kwargs |= {"out_indices": list(range(n)), "frozen_stages": -1, "type": "DiNAT"}
    model = convert.from_official("dinat", ckpt, kwargs)
    assert model.dense_norms is not None and model.num_classes == 0
    with torch.no_grad():
        feats = model.forward_intermediates(t["input"], intermediates_only=True)
    for f, fm, (w, b) in zip(feats, meta["features"], norms):
        ref = F.layer_norm(t[fm["key"]], (w.numel(),), w, b).permute(0, 3, 1, 2)
        assert (f - ref).abs().max().item() <= TOL, fm["module"]
    with pytest.raises(ValueError, match="frozen_stages"):
        convert.from_official("dinat", ckpt, kwargs | {"frozen_stages": 1})


def test_dense_norms_features_and_classification_start(tmp_path: Path) -> None:
    """``features_only`` with ``dense_norms`` normalizes every level; a classification
    checkpoint loads into that layout with fresh out norms (the official detection start)."""
    src = timm.create_model("test_nat").eval()
    path = tmp_path / "cls.pth"
    torch.save(src.state_dict(), path)
    model = timm.create_model(
        "test_nat", features_only=True, dense_norms=True, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        feats = model(x)
        ref = src.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
    assert len(feats) == len(ref)
    for f, r in zip(feats, ref):
        assert (f - F.layer_norm(r, r.shape[-1:]).permute(0, 3, 1, 2)).abs().max() <= TOL


def test_block_norms_use_the_fused_layer_norm() -> None:
    """Block norms (inputs of the attention's and MLP's linears) are the fused norm, with
    nn.LayerNorm's keys; the stem/downsampler norms (the residual stream) stay plain."""
    from visionattn.backbones._layers import AutocastLayerNorm

    model = timm.create_model("nat_mini")
    blocks = [m for m in model.modules() if isinstance(m, nat.NATBlock)]
    assert blocks and all(isinstance(b.norm1, AutocastLayerNorm) for b in blocks)
    assert all(isinstance(b.norm2, AutocastLayerNorm) for b in blocks)
    fused = {id(b.norm1) for b in blocks} | {id(b.norm2) for b in blocks}
    others = [
        m for m in model.modules() if isinstance(m, torch.nn.LayerNorm) and id(m) not in fused
    ]
    assert others and not any(isinstance(m, AutocastLayerNorm) for m in others)
    assert "stages.0.blocks.0.norm1.weight" in model.state_dict()

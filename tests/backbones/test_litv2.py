"""LITv2: official parity, checkpoint conversion, HiLo / DTM semantics, input sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import visionattn  # noqa: F401  (registers the models)
from visionattn import convert
from visionattn.backbones import litv2

STEM = "litv2_small_reduced"
TOL = 1e-4


def _load_vector(parity_path: Path, stem: str = STEM):
    from safetensors.torch import load_file

    st, js = parity_path / f"{stem}.safetensors", parity_path / f"{stem}.json"
    if not st.is_file():
        pytest.skip(f"parity vector {st} not found")
    t = load_file(str(st))
    meta = json.loads(js.read_text())
    sd = {k[len("state_dict.") :]: v for k, v in t.items() if k.startswith("state_dict.")}
    return t, meta, sd


def _set_deform_impl(model: torch.nn.Module, impl: str) -> None:
    for m in model.modules():
        if isinstance(m, litv2.DeformConv2x2):
            m.impl = impl


@pytest.mark.parametrize("impl", ["torchvision", "sample"])
def test_parity_official(parity_path: Path, impl: str) -> None:
    t, meta, sd = _load_vector(parity_path)
    model = convert.from_official("litv2", sd, meta["constructor_kwargs"])
    assert not model.training
    _set_deform_impl(model, impl)
    with torch.no_grad():
        final, feats = model.forward_intermediates(t["input"], output_fmt="NHWC")
        logits = model.forward_head(final)
        logits_direct = model(t["input"])
    assert logits.shape == t["output"].shape
    assert (logits - t["output"]).abs().max().item() <= TOL
    assert torch.equal(logits, logits_direct)
    assert len(feats) == len(meta["features"]) == 4
    for f, fm in zip(feats, meta["features"]):
        assert fm["layout"] == "NHWC"
        ref = t[fm["key"]]
        assert f.shape == ref.shape, fm["module"]
        assert (f - ref).abs().max().item() <= TOL, fm["module"]


def test_parity_structure(parity_path: Path) -> None:
    """The reduced vector's block types and head split are what the json says."""
    _, meta, sd = _load_vector(parity_path)
    model = litv2.from_official(sd, meta["constructor_kwargs"])
    kinds = [type(s.blocks[0]).__name__ for s in model.stages]
    assert kinds == ["ConvFFNBlock", "ConvFFNBlock", "HiLoBlock", "HiLoBlock"]
    a2, a3 = model.stages[2].blocks[0].attn, model.stages[3].blocks[0].attn
    assert (a2.l_heads, a2.h_heads, a2.ws) == (3, 1, 2)  # int(4 * 0.9) Lo-Fi heads
    assert (a3.l_heads, a3.h_heads, a3.ws) == (8, 0, 1)  # window 1: all Lo-Fi


def test_parity_via_timm_pretrained_file(parity_path: Path, tmp_path: Path) -> None:
    """An official .pth (wrapped like the official training checkpoint, DDP prefix) loads
    through timm's own pretrained path: checkpoint_filter_fn converts it."""
    t, meta, sd = _load_vector(parity_path)
    path = tmp_path / "official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    name, args = litv2.official_model_args(sd, meta["constructor_kwargs"])
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=100), **args
    ).eval()
    with torch.no_grad():
        assert (model(t["input"]) - t["output"]).abs().max().item() <= TOL


def test_parity_detection_checkpoint(parity_path: Path) -> None:
    """An official mmdet/mmseg backbone checkpoint (``backbone.*`` keys, out norms
    ``norm1..3``, none on stage 0) converts into ``dense_norms=True`` and returns each stage's
    official output through its out norm."""
    t, meta, sd = _load_vector(parity_path)
    g = torch.Generator().manual_seed(0)
    state = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith(("norm.", "head."))}
    norms = {}
    for i in (1, 2, 3):
        c = meta["features"][i]["shape"][-1]
        w, b = 1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
        state[f"backbone.norm{i}.weight"], state[f"backbone.norm{i}.bias"] = w, b
        norms[i] = (w, b)
    state["neck.fpn_convs.0.conv.weight"] = torch.randn(4, 4, 1, 1, generator=g)
    kwargs = {k: v for k, v in meta["constructor_kwargs"].items() if k != "num_classes"}
    kwargs |= {"out_indices": [0, 1, 2, 3], "frozen_stages": -1, "type": "LITv2"}
    model = convert.from_official("litv2", {"state_dict": state, "meta": {}}, kwargs)
    assert model.dense_norms is not None and model.num_classes == 0
    with torch.no_grad():
        feats = model.forward_intermediates(t["input"], intermediates_only=True)
    for i, (f, fm) in enumerate(zip(feats, meta["features"])):
        ref = t[fm["key"]]
        if i in norms:
            ref = F.layer_norm(ref, ref.shape[-1:], *norms[i])
        assert (f - ref.permute(0, 3, 1, 2)).abs().max().item() <= TOL, fm["module"]


def _manifests(parity_dir: Path) -> list[Path]:
    return sorted((parity_dir / "manifests").glob("litv2_*.json"))


def test_manifests_convert_completely(parity_path: Path) -> None:
    """Every official variant: every official key used, every one of ours filled, shapes
    equal, parameter count equal, and the kwargs resolve to the variant's registered name."""
    manifests = _manifests(parity_path)
    assert {p.stem for p in manifests} == set(litv2.OFFICIAL_VARIANTS)
    for path in manifests:
        man = json.loads(path.read_text())
        shapes = man["state_dict_shapes"]
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        name, args = litv2.official_model_args(sd, man["constructor_kwargs"])
        assert name == man["variant"], path.stem
        with torch.device("meta"):
            model = timm.create_model(name, **args)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        conv = {k: tuple(v.shape) for k, v in litv2.convert_official_state_dict(sd).items()}
        assert len(conv) == len(shapes), path.stem  # no two official keys collapse
        assert conv == ours, (path.stem, set(conv) ^ set(ours))
        assert sum(v.numel() for v in model.parameters()) == man["num_parameters"], path.stem
        # the registered model itself has the official layout, and the name alone suffices
        with torch.device("meta"):
            plain = timm.create_model(name)
        assert {k: tuple(v.shape) for k, v in plain.state_dict().items()} == ours, path.stem
        assert litv2.official_model_args(sd, variant=name) == (name, args)


# ---------------------------------------------------------------------------- HiLo semantics


def _hilo_reference(attn: litv2.HiLo, x: torch.Tensor) -> torch.Tensor:
    """HiLo written out with explicit window partitions and softmax (independent of the
    module's kernels): zero-pad to the window, Hi-Fi window attention, Lo-Fi attention to the
    pooled map, [Hi-Fi, Lo-Fi] concatenated, cropped."""
    B, H, W, C = x.shape
    s, hd = attn.ws, attn.head_dim
    xp = F.pad(x, (0, 0, 0, (-W) % s, 0, (-H) % s))
    Hp, Wp = xp.shape[1:3]
    outs = []
    if attn.h_heads:
        nh = attn.h_heads
        qkv = attn.h_qkv(xp).reshape(B, Hp // s, s, Wp // s, s, 3, nh, hd)
        qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B, Hp // s, Wp // s, nh, s * s, hd)
        q, k, v = qkv
        a = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1) @ v
        a = a.reshape(B, Hp // s, Wp // s, nh, s, s, hd).permute(0, 1, 4, 2, 5, 3, 6)
        outs.append(attn.h_proj(a.reshape(B, Hp, Wp, nh * hd)))
    if attn.l_heads:
        nh = attn.l_heads
        q = attn.l_q(xp).reshape(B, Hp * Wp, nh, hd).transpose(1, 2)
        pooled = xp.reshape(B, Hp // s, s, Wp // s, s, C).mean((2, 4)).reshape(B, -1, C)
        k, v = attn.l_kv(pooled).reshape(B, -1, 2, nh, hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1) @ v
        outs.append(attn.l_proj(a.transpose(1, 2).reshape(B, Hp, Wp, nh * hd)))
    return torch.cat(outs, -1)[:, :H, :W]


@pytest.mark.parametrize(
    "heads,alpha,ws,size,split",
    [
        (4, 0.9, 2, (6, 8), (3, 1)),  # litv2 default: int(4 * 0.9) = 3 Lo-Fi heads
        (5, 0.5, 2, (7, 5), (2, 3)),  # odd map: zero-padded to the window, then cropped
        (3, 0.5, 3, (8, 10), (1, 2)),  # window 3, padded both ways
        (4, 0.9, 1, (5, 7), (4, 0)),  # window 1: every head Lo-Fi over the full map
        (2, 0.0, 2, (4, 6), (0, 2)),  # alpha 0: Hi-Fi only
        (2, 1.0, 2, (5, 4), (2, 0)),  # alpha 1: Lo-Fi only (pooled keys)
    ],
)
def test_hilo_matches_explicit_reference(heads, alpha, ws, size, split) -> None:
    torch.manual_seed(0)
    attn = litv2.HiLo(heads * 8, heads, window_size=ws, alpha=alpha)
    for p in attn.parameters():
        p.data.normal_(0, 0.2)
    assert (attn.l_heads, attn.h_heads) == split
    x = torch.randn(2, *size, heads * 8, requires_grad=True)
    y = attn(x)
    ref = _hilo_reference(attn, x)
    assert y.shape == x.shape
    assert (y - ref).abs().max().item() <= 1e-5
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert (gx - gr).abs().max().item() <= 1e-5


def test_hilo_hifi_only_touches_its_window() -> None:
    """A Hi-Fi head's output at a token depends only on the tokens of its window."""
    torch.manual_seed(0)
    attn = litv2.HiLo(16, 2, window_size=2, alpha=0.0)
    x = torch.randn(1, 4, 4, 16, requires_grad=True)
    attn(x)[0, 0, 0].sum().backward()
    touched = x.grad[0].abs().sum(-1) > 0
    expect = torch.zeros(4, 4, dtype=torch.bool)
    expect[:2, :2] = True
    assert torch.equal(touched, expect)


# ---------------------------------------------------------------------------- DTM


@pytest.mark.parametrize("hw", [(10, 12), (7, 9), (2, 3)])
def test_deform_impls_agree(hw: tuple[int, int]) -> None:
    """``"sample"`` (grid_sample + conv) computes torchvision's deformable conv, values and
    gradients, with offsets large enough to sample outside the map."""
    torch.manual_seed(0)
    tv = litv2.DeformConv2x2(6, 10, impl="torchvision")
    tv.conv_offset.weight.data.normal_(0, 1.0)
    tv.conv_offset.bias.data.normal_(0, 2.0)
    sm = litv2.DeformConv2x2(6, 10, impl="sample")
    sm.load_state_dict(tv.state_dict())
    x = torch.randn(2, 6, *hw)
    outs = []
    for m in (tv, sm):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, [p.grad for p in m.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    assert y0.shape == (2, 10, hw[0] // 2, hw[1] // 2)
    assert (y0 - y1).abs().max().item() <= 1e-4
    assert (gx0 - gx1).abs().max().item() <= 1e-3
    for a, b in zip(gp0, gp1):
        assert (a - b).abs().max().item() <= 1e-3 * max(1.0, a.abs().max().item())


def test_deform_impls_under_bf16_autocast() -> None:
    """Under autocast both paths sample at float32 positions (a bf16 coordinate near pixel 60
    is only good to 0.25 px): outputs stay within bf16 conv rounding of the float32 result."""
    torch.manual_seed(0)
    tv = litv2.DeformConv2x2(8, 16)
    tv.conv_offset.weight.data.normal_(0, 0.3)
    sm = litv2.DeformConv2x2(8, 16, impl="sample")
    sm.load_state_dict(tv.state_dict())
    x = torch.randn(1, 8, 64, 64)
    with torch.no_grad():
        ref = tv(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [tv(x), sm(x)]
    scale = ref.abs().max().item()
    for y in outs:
        assert y.shape == ref.shape
        assert (y.float() - ref).abs().max().item() <= 0.02 * scale


def test_dtm_zero_offsets_is_a_plain_conv() -> None:
    """Freshly built (official init: zero offsets) DTM conv equals a 2x2 stride-2 conv."""
    torch.manual_seed(0)
    m = litv2.DeformConv2x2(4, 8)
    x = torch.randn(1, 4, 6, 7)
    with torch.no_grad():
        assert torch.allclose(m(x), F.conv2d(x, m.weight, m.bias, stride=2), atol=1e-5)


# ---------------------------------------------------------------------------- sizes and API


@pytest.mark.parametrize("size", [(61, 93), (37, 50), (20, 20)])
def test_any_input_size(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_litv2", num_classes=5).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        y = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    h, w = math.ceil(size[0] / 4), math.ceil(size[1] / 4)  # padded patches
    for i, f in enumerate(feats):
        assert f.shape[2:] == (h, w), (i, f.shape)
        h, w = max(h, 2) // 2, max(w, 2) // 2  # DTM: floor, maps below 2 padded to 2
    with torch.no_grad():  # batch elements are independent
        assert torch.allclose(model(x[1:]), y[1:], atol=1e-5)


def test_features_only_and_grads() -> None:
    fm = timm.create_model("test_litv2", features_only=True, out_indices=(1, 3))
    outs = fm(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == fm.feature_info.channels() == [32, 128]
    model = timm.create_model("test_litv2", num_classes=3, deform_impl="sample")
    model(torch.randn(2, 3, 40, 56)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_full_variants_layout() -> None:
    with torch.device("meta"):
        m = timm.create_model("litv2_base_384")
    assert m.pretrained_cfg["input_size"] == (3, 384, 384)
    assert m.pretrained_cfg["crop_pct"] == 1.0
    assert m.pretrained_cfg["hf_hub_id"] == "visionattn/litv2_base_384.in1k"
    attn = m.stages[2].blocks[0].attn
    assert (attn.l_heads, attn.h_heads, attn.head_dim) == (14, 2, 32)  # int(16 * 0.9)
    assert [type(s.blocks[0]).__name__ for s in m.stages] == [
        "ConvFFNBlock", "ConvFFNBlock", "HiLoBlock", "HiLoBlock",
    ]  # fmt: skip


def test_bad_inputs() -> None:
    model = timm.create_model("test_litv2")
    with pytest.raises(ValueError, match="x: expected an image batch"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        model.stem(None)
    with pytest.raises(ValueError, match="local_ws"):
        timm.create_model("test_litv2", local_ws=[0, 0, 2, 1], has_msa=[0, 1, 1, 1])
    with pytest.raises(ValueError, match="num_heads"):
        timm.create_model("test_litv2", num_heads=[1, 2])
    with pytest.raises(ValueError, match="deform_impl"):
        timm.create_model("test_litv2", deform_impl="cuda")
    with pytest.raises(ValueError, match="alpha"):
        litv2.HiLo(8, 2, alpha=1.5)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NLC")
    sd = {"layers.0.blocks.0.norm2.weight": torch.empty(0), "head.weight": torch.empty(10, 4)}
    with pytest.raises(ValueError, match="official_kwargs: 'window'"):
        litv2.official_model_args(sd, dict(window=7))
    with pytest.raises(ValueError, match="variant"):
        litv2.official_model_args(sd, variant="litv2_huge")
    with pytest.raises(ValueError, match="num_classes"):
        litv2.official_model_args(sd, dict(num_classes=5))
    with pytest.raises(ValueError, match="state_dict: not an official"):
        litv2.from_official({"foo.weight": torch.zeros(1)}, variant="litv2_small")
    with pytest.raises(ValueError, match="not recognized"):
        litv2.convert_official_state_dict({"layers.0.foo.bar.baz": torch.zeros(1)})
    with pytest.raises(ValueError, match="family"):
        litv2.official_model_args(sd, variant="litv2_small", family="lit")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torchvision", "sample"])
def test_parity_official_cuda(
    parity_path: Path, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same parity on the GPU (Triton Hi-Fi windows, flash/SDPA Lo-Fi): float32 within
    1e-4, bf16 autocast close."""
    t, meta, sd = _load_vector(parity_path)
    model = litv2.from_official(sd, meta["constructor_kwargs"]).cuda()
    _set_deform_impl(model, impl)
    x = t["input"].cuda()
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


def test_dense_norms_from_classification_checkpoint(tmp_path: Path) -> None:
    """A classification checkpoint loads into the detection layout with fresh out norms on
    stages 1-3 (stage 0 has none, as the official dense-prediction backbone)."""
    src = timm.create_model("test_litv2").eval()
    path = tmp_path / "cls.pth"
    torch.save(src.state_dict(), path)
    model = timm.create_model(
        "test_litv2", features_only=True, dense_norms=True, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        feats = model(x)
        ref = src.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
    assert len(feats) == len(ref) == 4
    for i, (f, r) in enumerate(zip(feats, ref)):
        want = r if i == 0 else F.layer_norm(r, r.shape[-1:])
        assert (f - want.permute(0, 3, 1, 2)).abs().max() <= TOL

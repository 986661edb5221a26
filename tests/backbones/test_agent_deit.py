"""Agent-DeiT: official parity, checkpoint conversion, agent attention at other grids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import visionattn  # noqa: F401  (registers the models)
from visionattn import convert
from visionattn.backbones import agent_deit

STEM = "agent_deit_tiny_reduced"
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


def test_parity_official(parity_path: Path) -> None:
    t, meta, sd = _load_vector(parity_path)
    model = convert.from_official("agent_deit", sd, meta["constructor_kwargs"])
    assert isinstance(model, agent_deit.AgentDeiT) and not model.training
    assert all(isinstance(b.attn, agent_deit.AgentAttention) for b in model.blocks)
    with torch.no_grad():
        final, feats = model.forward_intermediates(
            t["input"], output_fmt="NLC", return_prefix_tokens=True
        )
        logits = model.forward_head(final)
        direct = model(t["input"])
    assert (logits - t["output"]).abs().max().item() <= TOL
    assert torch.equal(logits, direct)
    assert len(feats) == len(meta["features"]) == 4
    for (patches, cls), fm in zip(feats, meta["features"]):
        assert fm["layout"] == "NLC"
        ref = t[fm["key"]]  # class token first, then the patch tokens row-major
        got = torch.cat([cls, patches], dim=1)
        assert got.shape == ref.shape, fm["module"]
        assert (got - ref).abs().max().item() <= TOL, fm["module"]


def test_parity_via_timm_pretrained_file(parity_path: Path, tmp_path: Path) -> None:
    """An official training checkpoint (``model`` key, DDP prefix) loads through timm's
    pretrained path with checkpoint_filter_fn."""
    t, meta, sd = _load_vector(parity_path)
    path = tmp_path / "official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, path)
    name, args = agent_deit.official_model_args(sd, meta["constructor_kwargs"])
    assert name == "agent_deit_tiny"
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=100), **args
    ).eval()
    with torch.no_grad():
        assert (model(t["input"]) - t["output"]).abs().max().item() <= TOL


def test_manifests_convert_completely(parity_path: Path) -> None:
    """Every official variant: every official key used, every one of ours filled, equal shapes
    and parameter count; the official kwargs resolve to the variant's registered name."""
    manifests = sorted((parity_path / "manifests").glob("agent_deit_*.json"))
    assert {p.stem for p in manifests} >= set(agent_deit.OFFICIAL_VARIANTS)
    for path in manifests:
        man = json.loads(path.read_text())
        shapes = man["state_dict_shapes"]
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        name, args = agent_deit.official_model_args(sd, man["constructor_kwargs"])
        assert name == man["variant"] == path.stem
        with torch.device("meta"):
            model = timm.create_model(name, **args)
            default = timm.create_model(name)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        conv = {k: tuple(v.shape) for k, v in agent_deit.convert_official_state_dict(sd).items()}
        assert conv == ours, (path.stem, set(conv) ^ set(ours))
        assert sum(p.numel() for p in model.parameters()) == man["num_parameters"], path.stem
        assert {k: tuple(v.shape) for k, v in default.state_dict().items()} == ours
        assert agent_deit.official_model_args(sd, variant=man["variant"])[0] == name
    base = json.loads((parity_path / "manifests" / "agent_deit_base.json").read_text())
    with torch.device("meta"):
        model = timm.create_model("agent_deit_base")
    kinds = [type(b.attn).__name__ for b in model.blocks]
    assert kinds == ["AgentAttention"] * 4 + ["Attention"] * 8
    assert base["constructor_kwargs"]["agent_layer"] == 4


def test_official_kwargs_errors() -> None:
    sd = {"head.weight": torch.empty(10, 8)}
    with pytest.raises(ValueError, match="official_kwargs"):
        agent_deit.official_model_args(sd, {"bogus": 1})
    with pytest.raises(ValueError, match="representation_size"):
        agent_deit.official_model_args(sd, {"representation_size": 768})
    with pytest.raises(ValueError, match="num_classes"):
        agent_deit.official_model_args(sd, {"num_classes": 5})
    with pytest.raises(ValueError, match="variant"):
        agent_deit.official_model_args(sd, variant="agent_deit_huge")
    with pytest.raises(ValueError, match="state_dict"):
        agent_deit.convert_official_state_dict({"dist_token": torch.zeros(1, 1, 8)})
    with pytest.raises(ValueError, match="num_agents"):
        agent_deit.AgentDeiT(agent_num=50)
    with pytest.raises(ValueError, match="agent_layer"):
        agent_deit.AgentDeiT(depth=2, agent_layer=3)


def _official_agent_attention(attn, x, h, w):
    """The official AgentAttention forward written out (explicit softmaxes, biases repeated
    per image), with the official downstream rule at another grid: ``an/na`` bilinearly
    resized to the grid, ``ah + aw`` / ``ha + wa`` resized jointly (bilinear)."""
    b, n, c = x.shape
    nh, a = attn.num_heads, attn.agent_num
    g = int(a**0.5)
    q, k, v = attn.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    agents = F.adaptive_avg_pool2d(q[:, 1:].reshape(b, h, w, c).permute(0, 3, 1, 2), (g, g))
    agents = agents.reshape(b, c, a).permute(0, 2, 1)
    heads = lambda t: t.reshape(b, t.shape[1], nh, -1).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v, agents = heads(q), heads(k), heads(v), heads(agents)
    pb1 = F.interpolate(attn.an_bias, size=(h, w), mode="bilinear").reshape(1, nh, a, h * w)
    pb2 = F.interpolate((attn.ah_bias + attn.aw_bias)[0], size=(h, w), mode="bilinear")
    pb = torch.cat([attn.ac_bias, pb1 + pb2.reshape(1, nh, a, h * w)], -1).repeat(b, 1, 1, 1)
    agent_v = ((agents * attn.scale) @ k.transpose(-2, -1) + pb).softmax(-1) @ v
    ab1 = F.interpolate(attn.na_bias, size=(h, w), mode="bilinear").reshape(1, nh, a, h * w)
    ab2 = (attn.ha_bias + attn.wa_bias)[0].permute(0, 3, 1, 2)  # [nh, a, h0, w0]
    ab2 = F.interpolate(ab2, size=(h, w), mode="bilinear").reshape(1, nh, a, h * w)
    ab = torch.cat([attn.ca_bias, (ab1 + ab2).transpose(-1, -2)], -2).repeat(b, 1, 1, 1)
    out = ((q * attn.scale) @ agents.transpose(-2, -1) + ab).softmax(-1) @ agent_v
    out = out.transpose(1, 2).reshape(b, n, c)
    vmap = v[:, :, 1:].transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    out[:, 1:] = out[:, 1:] + attn.dwc(vmap).permute(0, 2, 3, 1).reshape(b, n - 1, c)
    return attn.proj(out)


@pytest.mark.parametrize("grid", [(4, 4), (3, 6), (7, 5)])
def test_agent_attention_matches_official_formula(grid: tuple[int, int]) -> None:
    """At the trained grid (4x4) and at others: the biases follow the running grid."""
    torch.manual_seed(0)
    attn = agent_deit.AgentAttention(16, 2, agent_num=4, window=4).eval()
    h, w = grid
    x = torch.randn(2, 1 + h * w, 16)
    with torch.no_grad():
        got = attn(x, grid)
        ref = _official_agent_attention(attn, x, h, w)
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", [(61, 93), (37, 50), (16, 16)])
def test_any_input_size(size: tuple[int, int]) -> None:
    """Padded patches, position embedding resampled as timm's ViTs (dynamic_img_size)."""
    torch.manual_seed(0)
    model = timm.create_model("test_agent_deit", num_classes=5).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        y = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
        tokens, grid = model._embed(x)
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    h, w = -(-size[0] // 16), -(-size[1] // 16)
    assert grid == (h, w) and all(f.shape == (2, 32, h, w) for f in feats)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=64, embed_dim=32, depth=1, num_heads=2,
        dynamic_img_size=True, dynamic_img_pad=True, num_classes=0,
    ).eval()  # fmt: skip
    emb = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
    vit.load_state_dict({k: model.state_dict()[k] for k in emb}, strict=False)
    with torch.no_grad():
        ref = vit._pos_embed(vit.patch_embed(x))
    assert torch.allclose(tokens, ref, atol=1e-6)
    with torch.no_grad():  # batch elements are independent
        assert torch.allclose(model(x[1:]), y[1:], atol=1e-5)


def test_checkpoint_filter_resizes_to_img_size(parity_path: Path) -> None:
    """224 px weights into a model built for 320 px (how agent_deit_small_448 was fine-tuned):
    position embedding resampled, ah/aw/ha/wa biases resized linearly along their map axis."""
    t, meta, sd = _load_vector(parity_path)
    _, args = agent_deit.official_model_args(sd, meta["constructor_kwargs"])
    model = timm.create_model("agent_deit_tiny", **dict(args, img_size=320))
    out = agent_deit.checkpoint_filter_fn({"model": sd}, model)
    model.load_state_dict(out)
    assert out["pos_embed"].shape == (1, 401, 96)
    assert torch.equal(out["pos_embed"][:, 0], sd["pos_embed"][:, 0])
    ref = F.interpolate(
        sd["blocks.0.attn.wa_bias"][0, :, 0].transpose(1, 2), size=20, mode="linear"
    )
    assert torch.allclose(out["blocks.0.attn.wa_bias"][0, :, 0], ref.transpose(1, 2))
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 3, 320, 320))).all()

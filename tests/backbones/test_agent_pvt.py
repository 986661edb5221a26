"""Agent-PVT: official parity, manifests, reduced-key agent attention, other input sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import visionattn  # noqa: F401  (registers the models)
from visionattn import convert
from visionattn.backbones import agent_pvt

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


def test_parity_official(parity_path: Path) -> None:
    t, meta, sd = _load_vector(parity_path, "agent_pvt_tiny_reduced")
    model = convert.from_official("agent_pvt", sd, meta["constructor_kwargs"])
    assert not model.training
    with torch.no_grad():
        final, feats = model.forward_intermediates(t["input"], output_fmt="NHWC")
        logits = model.forward_head(final)
        assert torch.equal(logits, model(t["input"]))
    assert logits.shape == t["output"].shape
    assert (logits - t["output"]).abs().max().item() <= TOL
    assert len(feats) == len(meta["features"])
    for f, fm in zip(feats, meta["features"]):
        assert fm["layout"] == "NHWC"
        ref = t[fm["key"]]
        assert f.shape == ref.shape, fm["module"]
        assert (f - ref).abs().max().item() <= TOL, fm["module"]


def test_parity_via_timm_pretrained_file(parity_path: Path, tmp_path: Path) -> None:
    """A wrapped official .pth loads through timm's pretrained path (checkpoint_filter_fn)."""
    t, meta, sd = _load_vector(parity_path, "agent_pvt_tiny_reduced")
    path = tmp_path / "official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, path)
    name, args = agent_pvt.official_model_args(sd, meta["constructor_kwargs"])
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=100), **args
    ).eval()
    with torch.no_grad():
        assert (model(t["input"]) - t["output"]).abs().max().item() <= TOL


def test_every_manifest_converts_completely(parity_path: Path) -> None:
    paths = sorted((parity_path / "manifests").glob("agent_pvt_*.json"))
    assert len(paths) == 5, [p.name for p in paths]
    for path in paths:
        man = json.loads(path.read_text())
        sd = {k: torch.empty(s) for k, s in man["state_dict_shapes"].items()}
        name, args = agent_pvt.official_model_args(sd, man["constructor_kwargs"])
        assert name == man["variant"], path.name
        with torch.device("meta"):
            model = timm.create_model(name, **args)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        conv = {k: tuple(v.shape) for k, v in agent_pvt.convert_official_state_dict(sd).items()}
        assert conv == ours, path.name
        assert sum(p.numel() for p in model.parameters()) == man["num_parameters"], path.name
        with torch.device("meta"):
            plain = timm.create_model(name)
        assert {k: tuple(v.shape) for k, v in plain.state_dict().items()} == ours, path.name


def _naive_agent_sr(attn: agent_pvt.AgentAttention, x: torch.Tensor, H: int, W: int):
    """The official formulation with reduced keys: repeated biases, explicit softmaxes."""
    b, n, c = x.shape
    nh, sr, na = attn.num_heads, attn.sr_ratio, attn.agent_num
    q = attn.q(x)
    y = attn.reduce.sr(x.transpose(1, 2).reshape(b, c, H, W)).reshape(b, c, -1).transpose(1, 2)
    k, v = attn.kv(attn.reduce.norm(y)).reshape(b, -1, 2, c).permute(2, 0, 1, 3)
    g = int(na**0.5)
    agents = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(b, c, H, W), g)
    agents = agents.reshape(b, c, -1).transpose(1, 2)

    def heads(t):
        return t.reshape(b, -1, nh, c // nh).transpose(1, 2)

    q, k, v, agents = heads(q), heads(k), heads(v), heads(agents)
    hk, wk = H // sr, W // sr
    pb = F.interpolate(attn.an_bias, size=(hk, wk), mode="bilinear").reshape(1, nh, na, -1)
    pb = pb + (attn.ah_bias + attn.aw_bias).reshape(1, nh, na, -1)
    agent_v = ((agents * attn.scale) @ k.transpose(-2, -1) + pb).softmax(-1) @ v
    ab = F.interpolate(attn.na_bias, size=(H, W), mode="bilinear").reshape(1, nh, na, -1)
    ab = ab.transpose(-2, -1) + (attn.ha_bias + attn.wa_bias).reshape(1, nh, -1, na)
    out = ((q * attn.scale) @ agents.transpose(-2, -1) + ab).softmax(-1) @ agent_v
    out = out.transpose(1, 2).reshape(b, n, c)
    vm = v.transpose(1, 2).reshape(b, hk, wk, c).permute(0, 3, 1, 2)
    vm = F.interpolate(vm, size=(H, W), mode="bilinear")
    out = out + attn.dwc(vm).permute(0, 2, 3, 1).reshape(b, n, c)
    return attn.proj(out)


def test_agent_attention_with_reduced_keys_matches_official_formula() -> None:
    torch.manual_seed(0)
    attn = agent_pvt.AgentAttention(12, 3, (8, 8), agent_num=4, sr_ratio=2, qkv_bias=True)
    attn = attn.double()
    x = torch.randn(2, 64, 12, dtype=torch.float64)
    torch.testing.assert_close(attn(x, (8, 8)), _naive_agent_sr(attn, x, 8, 8))


def test_other_input_size_resizes_embeddings_and_biases(parity_path: Path) -> None:
    t, meta, sd = _load_vector(parity_path, "agent_pvt_tiny_reduced")
    model = convert.from_official("agent_pvt", sd, meta["constructor_kwargs"])
    with torch.no_grad():
        feats = model.forward_intermediates(
            torch.randn(1, 3, 200, 260), intermediates_only=True, output_fmt="NHWC"
        )
    assert [tuple(f.shape[1:3]) for f in feats] == [(50, 65), (25, 32), (12, 16), (6, 8)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="attn_type"):
        agent_pvt.AgentPVT(attn_type="AAXA")
    with pytest.raises(ValueError, match="num_agents"):
        agent_pvt.AgentPVT(agent_num=(9, 16, 48, 49))

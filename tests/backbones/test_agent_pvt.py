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


# ----------------------------------------------------------------------------------------------
# downstream_agent_shapes (official downstream/{detection,segmentation} AgentPVT)


def _official_downstream_agent_attention(
    attn: agent_pvt.AgentAttention, x: torch.Tensor, H: int, W: int, shape: tuple[int, int]
) -> torch.Tensor:
    """The official downstream rule (no key reduction), written out: agents are the query map
    average-pooled (adaptively) onto ``shape``; each bias table is bilinearly resized to the
    running map, then -- with the map positions as channels and the classification agent grid
    as the image -- bilinearly resized to ``shape``; the two steps are summed separately."""
    B, n, C = x.shape
    nh, d = attn.num_heads, C // attn.num_heads
    g = attn.grid[0]
    m = shape[0] * shape[1]
    q = attn.q(x)
    k, v = attn.kv(x).chunk(2, dim=-1)
    agents = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(B, C, H, W), shape)
    agents = agents.reshape(B, nh, d, m).transpose(-2, -1)
    q, k, vh = (t.reshape(B, n, nh, d).transpose(1, 2) for t in (q, k, v))

    def to_agents(table: torch.Tensor) -> torch.Tensor:  # [nh, g*g, h, w] -> [nh, m, n]
        t = F.interpolate(table, size=(H, W), mode="bilinear")
        t = t.reshape(nh, g, g, n).permute(0, 3, 1, 2)
        return F.interpolate(t, size=shape, mode="bilinear").reshape(nh, n, m).transpose(1, 2)

    key_bias = to_agents(attn.an_bias) + to_agents((attn.ah_bias + attn.aw_bias)[0])
    query_bias = to_agents(attn.na_bias) + to_agents(
        (attn.ha_bias + attn.wa_bias)[0].permute(0, 3, 1, 2)
    )
    s = attn.scale
    agent_v = ((agents * s) @ k.transpose(-2, -1) + key_bias[None]).softmax(-1) @ vh
    out = ((q * s) @ agents.transpose(-2, -1) + query_bias.transpose(1, 2)[None]).softmax(-1)
    out = (out @ agent_v).transpose(1, 2).reshape(B, n, C)
    out = out + attn.dwc(v.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
    return attn.proj(out)


@pytest.mark.parametrize(
    ("agent_num", "shape", "size"),
    [(9, (12, 12), (9, 13)), (16, (3, 5), (16, 16)), (4, (7, 7), (5, 6))],
)
def test_downstream_agent_attention_matches_official_rule(agent_num, shape, size) -> None:
    torch.manual_seed(0)
    attn = agent_pvt.AgentAttention(
        12, 3, (8, 8), agent_num=agent_num, qkv_bias=True, agent_shape=shape
    ).double()
    for p in (attn.an_bias, attn.na_bias, attn.ah_bias, attn.aw_bias, attn.ha_bias, attn.wa_bias):
        torch.nn.init.normal_(p)  # O(1) biases, so a wrong resize shows
    x = torch.randn(2, size[0] * size[1], 12, dtype=torch.float64)
    torch.testing.assert_close(
        attn(x, size), _official_downstream_agent_attention(attn, x, *size, shape)
    )


def test_downstream_model_loads_classification_checkpoint_strictly() -> None:
    torch.manual_seed(0)
    shapes = [(3, 5), (4, 4), (6, 6), (5, 5)]
    cls = timm.create_model("test_agent_pvt").eval()
    down = timm.create_model("test_agent_pvt", downstream_agent_shapes=shapes).eval()
    # the biases keep their classification shapes: the checkpoint loads strictly, unchanged
    assert {k: v.shape for k, v in down.state_dict().items()} == {
        k: v.shape for k, v in cls.state_dict().items()
    }
    down.load_state_dict(cls.state_dict(), strict=True)
    agent_blocks = [m for m in down.modules() if isinstance(m, agent_pvt.AgentAttention)]
    assert [m.agent_shape for m in agent_blocks] == [(3, 5), (4, 4), (5, 5)]  # stage 3 is "B"
    x = torch.randn(1, 3, 61, 75)  # odd sizes: strided-conv embeddings floor the maps
    with torch.no_grad():
        a = down.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
        b = cls.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
        stage = down.stages[0]
        y = stage.patch_embed(x)
        h, w = y.shape[1:3]
        y = y.reshape(1, h * w, -1) + stage._pos((h, w))
        blk = stage.blocks[0]
        torch.testing.assert_close(
            blk.attn(blk.norm1(y), (h, w)),
            _official_downstream_agent_attention(blk.attn, blk.norm1(y), h, w, (3, 5)),
        )
    assert [tuple(f.shape[1:3]) for f in a] == [(15, 18), (7, 9), (3, 4), (1, 2)]
    assert all(torch.isfinite(f).all() for f in a)
    assert not torch.allclose(a[0], b[0])  # other agents, other features
    # the classification grids as "downstream" shapes: the classification model exactly
    same = timm.create_model("test_agent_pvt", downstream_agent_shapes=[(2, 2)] * 4).eval()
    same.load_state_dict(cls.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(same(x), cls(x))


def test_official_downstream_kwargs_convert() -> None:
    kw = dict(agent_pvt.OFFICIAL_VARIANTS["agent_pvt_tiny"])
    kw["downstream_agent_shapes"] = [(12, 12), (16, 16), (28, 28), (28, 28)]
    ours = agent_pvt._ours_from_official_kwargs(kw)
    with torch.device("meta"):
        model = timm.create_model("agent_pvt_tiny", **ours)
    shapes = [m.agent_shape for m in model.modules() if isinstance(m, agent_pvt.AgentAttention)]
    assert shapes == [(12, 12)] * 2 + [(16, 16)] * 2 + [(28, 28)] * 4


@pytest.mark.parametrize(
    ("bad", "extra"),
    [
        ([(12, 12), (16, 16), (28, 28)], {}),  # one per stage
        ([(12, 12), (16, 16), (28, 28), (28, 28, 28)], {}),
        ([(12, 12), (-1, 16), (28, 28), (28, 28)], {}),
        ("12-16-28-28", {}),
        ([(12, 12)] * 4, dict(agent_sr_ratios="2111")),  # official downstream: no reduction
    ],
)
def test_bad_downstream_agent_shapes_are_refused(bad, extra) -> None:
    with pytest.raises(ValueError, match="downstream_agent_shapes"):
        timm.create_model("test_agent_pvt", downstream_agent_shapes=bad, **extra)

"""Agent-Swin: official parity, manifests, shifted-window attention, other input sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import visionattn  # noqa: F401  (registers the models)
from visionattn import convert
from visionattn.backbones import agent_swin

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
    t, meta, sd = _load_vector(parity_path, "agent_swin_tiny_reduced")
    model = convert.from_official("agent_swin", sd, meta["constructor_kwargs"])
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
    t, meta, sd = _load_vector(parity_path, "agent_swin_tiny_reduced")
    path = tmp_path / "official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, path)
    name, args = agent_swin.official_model_args(sd, meta["constructor_kwargs"])
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=100), **args
    ).eval()
    with torch.no_grad():
        assert (model(t["input"]) - t["output"]).abs().max().item() <= TOL


def _manifests(parity_path: Path) -> list[Path]:
    return sorted((parity_path / "manifests").glob("agent_swin_*.json"))


def test_every_manifest_converts_completely(parity_path: Path) -> None:
    paths = _manifests(parity_path)
    assert len(paths) == 5, [p.name for p in paths]
    for path in paths:
        man = json.loads(path.read_text())
        sd = {k: torch.empty(s) for k, s in man["state_dict_shapes"].items()}
        name, args = agent_swin.official_model_args(sd, man["constructor_kwargs"])
        assert name == man["variant"], path.name
        with torch.device("meta"):
            model = timm.create_model(name, **args)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        conv = {k: tuple(v.shape) for k, v in agent_swin.convert_official_state_dict(sd).items()}
        assert conv == ours, path.name
        n_params = sum(p.numel() for p in model.parameters())
        assert n_params == man["num_parameters"], path.name
        # the registered name alone builds the same architecture
        with torch.device("meta"):
            plain = timm.create_model(name)
        assert {k: tuple(v.shape) for k, v in plain.state_dict().items()} == ours, path.name


def _naive_window_attention(attn: agent_swin.WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Official Swin formulation: roll, partition, dense attention + table bias + -100 mask."""
    B, H, W, C = x.shape
    w, s, nh = attn.window_size, attn.shift_size, attn.num_heads
    x = F.pad(x, (0, 0, 0, (-W) % w, 0, (-H) % w))
    hp, wp = x.shape[1:3]
    x = torch.roll(x, (-s, -s), (1, 2))
    win = x.view(B, hp // w, w, wp // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
    qkv = attn.qkv(win).view(win.shape[0], w * w, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    idx = rel[..., 0] * (2 * w - 1) + rel[..., 1]
    logits = q @ k.transpose(-2, -1) + attn.relative_position_bias_table[idx].permute(2, 0, 1)
    reg = torch.zeros(hp, wp)
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            reg[hs, ws] = cnt
            cnt += 1
    rw = reg.view(hp // w, w, wp // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
    mask = (rw[:, None, :] != rw[:, :, None]).float() * -100.0
    logits = logits.view(B, -1, nh, w * w, w * w) + mask[None, :, None]
    out = (logits.view(-1, nh, w * w, w * w).softmax(-1) @ v).transpose(1, 2).reshape(-1, w, w, C)
    out = out.view(B, hp // w, wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, hp, wp, C)
    out = torch.roll(out, (s, s), (1, 2))[:, :H, :W]
    return attn.proj(out)


@pytest.mark.parametrize("size", [(14, 14), (8, 11)])
def test_shifted_window_attention_matches_swin(size) -> None:
    torch.manual_seed(0)
    attn = agent_swin.WindowAttention(dim=12, num_heads=3, window_size=7, shift_size=3).double()
    x = torch.randn(2, *size, 12, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _naive_window_attention(attn, x))


def test_parse_attn_types() -> None:
    assert agent_swin.parse_attn_types("AAMB2", [2, 2, 4, 2]) == [
        ["A", "A"], ["A", "A"], ["A", "A", "B", "B"], ["B", "B"],
    ]  # fmt: skip
    with pytest.raises(ValueError, match="attn_type"):
        agent_swin.parse_attn_types("AAMB", [2, 2, 4, 2])
    with pytest.raises(ValueError, match="attn_type"):
        agent_swin.parse_attn_types("AXAB", [1, 1, 1, 1])


def test_other_input_size_resizes_agent_biases(parity_path: Path) -> None:
    """At another size the agent biases are resized (not refused) and the map is padded."""
    t, meta, sd = _load_vector(parity_path, "agent_swin_tiny_reduced")
    model = convert.from_official("agent_swin", sd, meta["constructor_kwargs"])
    with torch.no_grad():
        feats = model.forward_intermediates(
            torch.randn(1, 3, 200, 260), intermediates_only=True, output_fmt="NHWC"
        )
    assert [tuple(f.shape[1:3]) for f in feats] == [(50, 65), (25, 33), (13, 17), (7, 9)]
    assert all(torch.isfinite(f).all() for f in feats)


# ----------------------------------------------------------------------------------------------
# downstream_agent_shapes (official downstream/{detection,segmentation} AgentSwinTransformer)


def _official_downstream_agent_attention(
    attn: agent_swin.AgentAttention, x: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """The official downstream rule, written out: agents are the query map average-pooled
    (adaptively) onto ``shape``; each bias table is bilinearly resized to the running map, then
    -- with the map positions as channels and the classification agent grid as the image --
    bilinearly resized to ``shape``; the two steps are summed separately and repeated per image."""
    B, H, W, C = x.shape
    nh, d, n = attn.num_heads, C // attn.num_heads, H * W
    g = attn.grid[0]
    m = shape[0] * shape[1]
    q, k, v = attn.qkv(x.reshape(B, n, C)).chunk(3, dim=-1)
    agents = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(B, C, H, W), shape)
    agents = agents.reshape(B, nh, d, m).transpose(-2, -1)
    q, k, vh = (t.reshape(B, n, nh, d).transpose(1, 2) for t in (q, k, v))

    def to_agents(table: torch.Tensor) -> torch.Tensor:  # [nh, g*g, H, W] -> [nh, m, n]
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
    vm = v.transpose(1, 2).reshape(B, C, H, W)
    out = out + attn.dwc(vm).flatten(2).transpose(1, 2)
    return attn.proj(out).reshape(B, H, W, C)


@pytest.mark.parametrize(
    ("agent_num", "shape", "size"),
    [(9, (5, 7), (9, 13)), (16, (3, 3), (16, 16)), (4, (9, 9), (5, 6))],
)
def test_downstream_agent_attention_matches_official_rule(agent_num, shape, size) -> None:
    torch.manual_seed(0)
    attn = agent_swin.AgentAttention(12, 3, (8, 8), agent_num=agent_num, agent_shape=shape)
    attn = attn.double()
    for p in (attn.an_bias, attn.na_bias, attn.ah_bias, attn.aw_bias, attn.ha_bias, attn.wa_bias):
        torch.nn.init.normal_(p)  # O(1) biases, so a wrong resize shows
    x = torch.randn(2, *size, 12, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _official_downstream_agent_attention(attn, x, shape))


_SHAPES = [(5, 5), (3, 4), (4, 4), (2, 2)]


def test_downstream_model_loads_classification_checkpoint_strictly() -> None:
    torch.manual_seed(0)
    cls = timm.create_model("test_agent_swin").eval()
    down = timm.create_model("test_agent_swin", downstream_agent_shapes=_SHAPES).eval()
    # the biases keep their classification shapes: the checkpoint loads strictly, unchanged
    assert {k: v.shape for k, v in down.state_dict().items()} == {
        k: v.shape for k, v in cls.state_dict().items()
    }
    down.load_state_dict(cls.state_dict(), strict=True)
    agent_blocks = [m for m in down.modules() if isinstance(m, agent_swin.AgentAttention)]
    assert [m.agent_shape for m in agent_blocks] == [(5, 5), (3, 4), (4, 4)]
    x = torch.randn(1, 3, 61, 75)  # odd sizes: padded patches, odd maps, padded windows
    with torch.no_grad():
        a = down.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
        b = cls.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
        # per block, the official rule at the running map
        blk = down.stages[0].blocks[0]
        y = down.patch_embed(x)
        torch.testing.assert_close(
            blk.attn(blk.norm1(y)),
            _official_downstream_agent_attention(blk.attn, blk.norm1(y), (5, 5)),
        )
    assert [tuple(f.shape[1:3]) for f in a] == [(16, 19), (8, 10), (4, 5), (2, 3)]
    assert all(torch.isfinite(f).all() for f in a)
    assert not torch.allclose(a[0], b[0])  # other agents, other features
    # the classification grids as "downstream" shapes: the classification model exactly
    same = timm.create_model(
        "test_agent_swin", downstream_agent_shapes=[(2, 2), (2, 2), (3, 3), (2, 2)]
    ).eval()
    same.load_state_dict(cls.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(same(x), cls(x))


def test_official_downstream_kwargs_convert() -> None:
    kw = dict(agent_swin.OFFICIAL_VARIANTS["agent_swin_tiny"])
    kw["downstream_agent_shapes"] = [(9, 9), (12, 12), (14, 14), (7, 7)]
    ours = agent_swin._ours_from_official_kwargs(kw)
    assert ours["downstream_agent_shapes"] == [(9, 9), (12, 12), (14, 14), (7, 7)]
    with torch.device("meta"):
        model = timm.create_model("agent_swin_tiny", **ours)
    shapes = [m.agent_shape for m in model.modules() if isinstance(m, agent_swin.AgentAttention)]
    assert shapes == [(9, 9)] * 2 + [(12, 12)] * 2 + [(14, 14)] * 6


@pytest.mark.parametrize(
    "bad",
    [
        [(9, 9), (12, 12), (14, 14)],  # one per stage
        [(9, 9), (12, 12), (14, 14), (7,)],
        [(9, 9), (12, 12), (14, 0), (7, 7)],
        [(9, 9), (12, 12), (14, 14.0), (7, 7)],
        "9-12-14-7",
        (9, 12, 14, 7),
    ],
)
def test_bad_downstream_agent_shapes_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="downstream_agent_shapes"):
        timm.create_model("test_agent_swin", downstream_agent_shapes=bad)


def test_downstream_windows_keep_shifted_windows_in_small_maps() -> None:
    # agent_swin_tiny's last stage is a 7x7 map at 224: one unshifted window in
    # classification, 7x7 windows with a shifted odd block in the official downstream backbone
    kw = dict(depths=[1, 1, 1, 2], num_heads=[1, 1, 1, 1], embed_dim=8, num_classes=0)
    cls = agent_swin.AgentSwinTransformer(**kw).eval()
    det = agent_swin.AgentSwinTransformer(**kw, downstream_windows=True).eval()
    assert [b.attn.shift_size for b in cls.stages[3].blocks] == [0, 0]
    assert [(b.attn.window_size, b.attn.shift_size) for b in det.stages[3].blocks] == [
        (7, 0),
        (7, 3),
    ]
    det.load_state_dict(cls.state_dict(), strict=True)  # same parameters, other windows
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a, b = cls.forward_features(x), det.forward_features(x)
    assert a.shape == b.shape and not torch.allclose(a, b)
    # the official downstream kwargs select it
    official = dict(agent_swin.OFFICIAL_VARIANTS["agent_swin_tiny"])
    official["downstream_agent_shapes"] = [(9, 9)] * 4
    _, args = agent_swin.official_model_args({"head.weight": torch.zeros(1000, 768)}, official)
    assert args["downstream_windows"] is True

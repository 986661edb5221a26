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

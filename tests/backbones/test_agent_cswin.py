"""Agent-CSwin: official parity, checkpoint conversion, stripe attention, input sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import visionattn  # noqa: F401  (registers the models)
from visionattn import convert
from visionattn.backbones import agent_cswin

STEM = "agent_cswin_tiny_reduced"
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
    model = convert.from_official("agent_cswin", sd, meta["constructor_kwargs"])
    assert isinstance(model, agent_cswin.AgentCSWin) and not model.training
    # the reduced vector keeps every block type: whole-map agent, LePE stripes, whole-map LePE
    blocks = [s.blocks[0] for s in model.stages]
    assert [b.attn_type for b in blocks] == ["A", "A", "B", "B"]
    assert [len(b.attns) for b in blocks] == [1, 1, 2, 1]
    with torch.no_grad():
        final, feats = model.forward_intermediates(t["input"], output_fmt="NHWC")
        logits = model.forward_head(final)
        direct = model(t["input"])
    assert (logits - t["output"]).abs().max().item() <= TOL
    assert torch.equal(logits, direct)
    assert len(feats) == len(meta["features"]) == 4
    for f, fm in zip(feats, meta["features"]):
        assert fm["layout"] == "NHWC"
        ref = t[fm["key"]]
        assert f.shape == ref.shape, fm["module"]
        assert (f - ref).abs().max().item() <= TOL, fm["module"]


def test_parity_via_timm_pretrained_file(parity_path: Path, tmp_path: Path) -> None:
    """An official training checkpoint (``model`` + ``state_dict_ema``, DDP prefix) loads
    through timm's pretrained path; checkpoint_filter_fn converts it."""
    t, meta, sd = _load_vector(parity_path)
    path = tmp_path / "official.pth"
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    torch.save({"model": wrapped, "state_dict_ema": wrapped, "epoch": 3}, path)
    name, args = agent_cswin.official_model_args(sd, meta["constructor_kwargs"])
    assert name == "agent_cswin_tiny"  # reduced widths: built under the tiny name, full args
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=100), **args
    ).eval()
    with torch.no_grad():
        assert (model(t["input"]) - t["output"]).abs().max().item() <= TOL


def _manifests(parity_dir: Path) -> list[Path]:
    return sorted((parity_dir / "manifests").glob("Agent_CSWin_*.json"))


def test_manifests_convert_completely(parity_path: Path) -> None:
    """Every official variant: every official key used, every one of ours filled, equal shapes
    and parameter count; the official kwargs resolve to the variant's registered name."""
    manifests = _manifests(parity_path)
    assert {p.stem for p in manifests} >= {
        "Agent_CSWin_tiny", "Agent_CSWin_small", "Agent_CSWin_base", "Agent_CSWin_base_384"
    }  # fmt: skip
    for path in manifests:
        man = json.loads(path.read_text())
        shapes = man["state_dict_shapes"]
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        name, args = agent_cswin.official_model_args(sd, man["constructor_kwargs"])
        assert name == path.stem.lower(), path.stem
        with torch.device("meta"):
            model = timm.create_model(name, **args)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        conv = {k: tuple(v.shape) for k, v in agent_cswin.convert_official_state_dict(sd).items()}
        assert len(conv) == len(shapes), path.stem
        assert conv == ours, (path.stem, set(conv) ^ set(ours))
        assert sum(p.numel() for p in model.parameters()) == man["num_parameters"], path.stem
        # the registered model's own defaults are the official variant
        with torch.device("meta"):
            default = timm.create_model(name)
        assert {k: tuple(v.shape) for k, v in default.state_dict().items()} == ours
        assert agent_cswin.official_model_args(sd, variant=man["variant"])[0] == name


def test_official_kwargs_errors() -> None:
    sd = {"head.weight": torch.empty(10, 8)}
    with pytest.raises(ValueError, match="official_kwargs"):
        agent_cswin.official_model_args(sd, {"bogus": 1})
    with pytest.raises(ValueError, match="num_classes"):
        agent_cswin.official_model_args(sd, {"num_classes": 5})
    with pytest.raises(ValueError, match="variant"):
        agent_cswin.official_model_args(sd, variant="cswin_huge")
    with pytest.raises(ValueError, match="state_dict"):
        agent_cswin.convert_official_state_dict({"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="attn_type"):
        agent_cswin.AgentCSWin(attn_type="AAXB")
    with pytest.raises(ValueError, match="num_agents"):
        agent_cswin.AgentCSWin(agent_num=[8, 16, 49, 49])


def _lepe_reference(attn, q, k, v):
    """The official segmentation backbone's LePE branch: symmetric zero padding, window
    partition, explicit softmax, per-window depthwise conv, crop."""
    B, H, W, nh, hd = q.shape
    C = nh * hd
    sh, sw = {-1: (H, W), 0: (H, attn.split_size), 1: (attn.split_size, W)}[attn.branch]
    ph, pw = (-H) % sh, (-W) % sw
    t, lft = ph // 2, pw // 2
    pad = lambda x: F.pad(x.reshape(B, H, W, C), (0, 0, lft, pw - lft, t, ph - t))  # noqa: E731
    q, k, v = pad(q), pad(k), pad(v)
    Hp, Wp = H + ph, W + pw

    def part(x):
        x = x.reshape(B, Hp // sh, sh, Wp // sw, sw, C).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, sh * sw, C)

    qw, kw, vw = part(q), part(k), part(v)
    heads = lambda x: x.reshape(x.shape[0], -1, nh, hd).transpose(1, 2)  # noqa: E731
    a = (heads(qw) * attn.scale) @ heads(kw).transpose(-1, -2)
    out = (a.softmax(-1) @ heads(vw)).transpose(1, 2).reshape(-1, sh * sw, C)
    lepe = attn.get_v(vw.transpose(1, 2).reshape(-1, C, sh, sw)).flatten(2).transpose(1, 2)
    out = out + lepe
    out = out.reshape(B, Hp // sh, Wp // sw, sh, sw, C).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(B, Hp, Wp, C)[:, t : t + H, lft : lft + W]


@pytest.mark.parametrize("branch", [-1, 0, 1])
@pytest.mark.parametrize("size", [(6, 6), (5, 7)])
def test_lepe_stripes_match_official_padding(branch: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    attn = agent_cswin.LePEStripeAttention(8, 2, branch=branch, split_size=3, qk_scale=None)
    q, k, v = (torch.randn(2, *size, 2, 4) for _ in range(3))
    with torch.no_grad():
        got = attn(q, k, v)
        ref = _lepe_reference(attn, q, k, v)
    assert got.shape == ref.shape == (2, *size, 8)
    assert (got - ref).abs().max().item() <= 1e-5


def test_agent_biases_follow_running_size(parity_path: Path) -> None:
    """At img_size nothing is resized; at another size the agent biases are resized to the
    running map and the model runs on non-square inputs."""
    t, meta, sd = _load_vector(parity_path)
    model = agent_cswin.from_official(sd, meta["constructor_kwargs"])
    attn = model.stages[0].blocks[0].attns[0]
    seen = []
    real = agent_cswin._agent.agent_key_bias

    def spy(an, ah, aw, size):
        seen.append(tuple(size))
        return real(an, ah, aw, size)

    agent_cswin._agent.agent_key_bias = spy
    try:
        with torch.no_grad():
            y = model(torch.randn(1, 3, 160, 200))
    finally:
        agent_cswin._agent.agent_key_bias = real
    assert y.shape == (1, 100) and torch.isfinite(y).all()
    assert seen == [(40, 50), (20, 25)]  # the two whole-map agent stages
    assert attn.ah_bias.shape[3] == 56  # parameters keep their training size


def test_checkpoint_filter_resizes_agent_biases(parity_path: Path) -> None:
    """A 224 px checkpoint into a model built for 256 px: ah/aw/ha/wa biases are resized
    linearly along their map axis (the official fine-tuning load), the rest is unchanged."""
    t, meta, sd = _load_vector(parity_path)
    _, args = agent_cswin.official_model_args(sd, meta["constructor_kwargs"])
    args.update(img_size=256, la_split_size=[64, 32, 16, 8])
    model = timm.create_model("agent_cswin_tiny", **args)
    out = agent_cswin.checkpoint_filter_fn({"model": sd}, model)
    model.load_state_dict(out)
    key = "stages.0.blocks.0.attns.0.ah_bias"
    assert out[key].shape == (1, 2, 9, 64, 1)
    ref = F.interpolate(sd["stage1.0.attns.0.ah_bias"][0, :, :, :, 0], size=64, mode="linear")
    assert torch.allclose(out[key][0, :, :, :, 0], ref)


@pytest.mark.parametrize("size", [(61, 93), (37, 50)])
def test_any_input_size(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_agent_cswin", num_classes=5).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        y = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    h, w = (size[0] + 1) // 4, (size[1] + 1) // 4  # 7x7 stride-4 stem, padding 2
    for i, f in enumerate(feats):
        assert f.shape[2:] == (h, w), i
        h, w = -(-h // 2), -(-w // 2)
    with torch.no_grad():  # batch elements are independent (padding never mixes samples)
        assert torch.allclose(model(x[1:]), y[1:], atol=1e-5)


@pytest.mark.parametrize("size,paired", [(64, True), (72, False), ((64, 96), False)])
def test_lepe_branch_pair_equals_branch_by_branch(size, paired: bool, monkeypatch) -> None:
    """In training, two-branch LePE blocks on a square map without padding run both branches
    as one problem (horizontal stripes as vertical stripes of the transposed map); outputs and
    every gradient equal running the branches one by one. Other maps, and inference, take the
    per-branch path."""
    ac = agent_cswin
    torch.manual_seed(0)
    model = timm.create_model("test_agent_cswin", num_classes=5).double().train()
    hw = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    taken = []
    pair = ac._lepe_pair

    def spy(*args):
        out = pair(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(ac, "_lepe_pair", spy)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters()}

    out, grads = run()
    assert taken and any(taken) == paired
    monkeypatch.setattr(ac, "_PAIR_LEPE", False)
    ref, ref_grads = run()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=0, atol=1e-12, msg=n)
    conv = [n for n in grads if n.endswith("get_v.weight")]
    assert conv and all(grads[n].abs().sum() > 0 for n in conv)
    monkeypatch.setattr(ac, "_PAIR_LEPE", True)
    taken.clear()
    with torch.no_grad():  # inference keeps the per-branch path (no transposed copy)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-12)
    assert taken and not any(taken)

"""Model cards: one markdown file per registered model, generated from what the code knows.

Everything in a card comes from the model itself (built on the meta device), its timm
pretrained config, and the family facts below; nothing is typed in per model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg

from visionattn.registry import list_models, model_family, pretrained_tags

__all__ = ["FAMILY_INFO", "render_card", "write_cards"]

# paper, official code and its license, per family (sources: the papers' arXiv pages and
# the official repositories' LICENSE files)
FAMILY_INFO: dict[str, dict[str, str]] = {
    "nat": dict(
        paper="Neighborhood Attention Transformer (Hassani et al., CVPR 2023)",
        arxiv="2204.07143",
        code="https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
        license="MIT",
        attention="`visionattn.kernels.na2d` (clamped neighborhood attention with RPB)",
    ),
    "dinat": dict(
        paper="Dilated Neighborhood Attention Transformer (Hassani & Shi, 2022)",
        arxiv="2209.15001",
        code="https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
        license="MIT",
        attention="`visionattn.kernels.na2d` (clamped, dilated neighborhood attention with RPB)",
    ),
    "biformer": dict(
        paper="BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023)",
        arxiv="2303.08810",
        code="https://github.com/rayleizhu/BiFormer",
        license="MIT",
        attention="`visionattn.kernels.routed_attention` (top-k routed tiles read in place)",
    ),
    "maxvit": dict(
        paper="MaxViT: Multi-Axis Vision Transformer (Tu et al., ECCV 2022)",
        arxiv="2204.01697",
        code="https://github.com/google-research/maxvit",
        license="Apache-2.0",
        attention="`visionattn.kernels.na2d` (block: kernel=stride=window; grid: dilated)",
    ),
    "halonet": dict(
        paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones (Vaswani et al., CVPR 2021)",
        arxiv="2103.12731",
        code="https://github.com/huggingface/pytorch-image-models",
        license="Apache-2.0",
        attention='`visionattn.kernels.na2d` (border="zero" halo windows, relative logits)',
    ),
    "efficientvit": dict(
        paper="EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention (Liu et al., CVPR 2023)",
        arxiv="2305.07027",
        code="https://github.com/microsoft/Cream/tree/main/EfficientViT",
        license="MIT",
        attention="`visionattn.kernels.na2d` (non-overlapping windows with a bias table)",
    ),
    "focalnet": dict(
        paper="Focal Modulation Networks (Yang et al., NeurIPS 2022)",
        arxiv="2203.11926",
        code="https://github.com/microsoft/FocalNet",
        license="MIT",
        attention="none (focal modulation: depth-wise convolutions and gating)",
    ),
    "agent_deit": dict(
        paper="Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024), DeiT backbone",
        arxiv="2312.08874",
        code="https://github.com/LeapLabTHU/Agent-Attention",
        license="unknown (the official repository has no LICENSE file)",
        attention="agent blocks: agent aggregation and broadcast on `F.scaled_dot_product_attention` with bias masks; other blocks softmax attention on SDPA",
    ),
    "agent_pvt": dict(
        paper="Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024), PVT backbone",
        arxiv="2312.08874",
        code="https://github.com/LeapLabTHU/Agent-Attention",
        license="unknown (the official repository has no LICENSE file)",
        attention="agent stages on `F.scaled_dot_product_attention` with bias masks; spatial-reduction stages on SDPA",
    ),
    "agent_swin": dict(
        paper="Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024), Swin backbone",
        arxiv="2312.08874",
        code="https://github.com/LeapLabTHU/Agent-Attention",
        license="unknown (the official repository has no LICENSE file)",
        attention="agent stages on `F.scaled_dot_product_attention` with bias masks; shifted-window stages on `visionattn.kernels.na2d` (kernel=stride=window, RPB, shift mask as attn_bias)",
    ),
    "agent_cswin": dict(
        paper="Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024), CSWin backbone",
        arxiv="2312.08874",
        code="https://github.com/LeapLabTHU/Agent-Attention",
        license="unknown (the official repository has no LICENSE file)",
        attention="agent branches on `F.scaled_dot_product_attention` with bias masks; cross-shaped stripes on `visionattn.kernels.na2d` (kernel=stride=stripe) with LePE",
    ),
    "litv2": dict(
        paper="Fast Vision Transformers with HiLo Attention (Pan et al., NeurIPS 2022)",
        arxiv="2205.13213",
        code="https://github.com/ziplab/LITv2",
        license="Apache-2.0",
        attention="HiLo: Hi-Fi windows on `visionattn.kernels.na2d` (kernel=stride=window), "
        "Lo-Fi on `F.scaled_dot_product_attention` over pooled keys",
    ),
}


def _describe(name: str) -> dict[str, Any]:
    with torch.device("meta"):
        model = timm.create_model(name)
    cfg = get_pretrained_cfg(name).to_dict()
    return dict(
        params=sum(p.numel() for p in model.parameters()),
        feature_info=[(f["module"], f["num_chs"], f["reduction"]) for f in model.feature_info],
        num_features=model.num_features,
        cfg=cfg,
    )


def render_card(name: str) -> str:
    """Markdown model card for a registered visionattn model."""
    fam = model_family(name)
    info = FAMILY_INFO.get(fam, {})
    d = _describe(name)
    cfg = d["cfg"]
    tags = pretrained_tags(name)
    hub = cfg.get("hf_hub_id") or "-"
    lines = [
        "---",
        "library_name: timm",
        f"license: {cfg.get('license') or info.get('license', 'unknown').lower()}",
        "tags: [image-classification, timm, visionattn]",
        "---",
        f"# {name}",
        "",
        f"Family **{fam}**: {info.get('paper', '')}"
        + (
            f" ([arXiv:{info['arxiv']}](https://arxiv.org/abs/{info['arxiv']}))"
            if info.get("arxiv")
            else ""
        ),
        "",
        f"Attention path: {info.get('attention', '-')}.",
        "",
        "## Model details",
        "",
        "| | |",
        "| --- | --- |",
        f"| parameters | {d['params'] / 1e6:.2f} M |",
        f"| input size | {'x'.join(map(str, cfg['input_size']))} |",
        f"| crop_pct / interpolation | {cfg.get('crop_pct')} / {cfg.get('interpolation')} |",
        f"| mean / std | {tuple(cfg['mean'])} / {tuple(cfg['std'])} |",
        f"| classes | {cfg.get('num_classes')} |",
        f"| pooled features | {d['num_features']} |",
        f"| pretrained tags | {', '.join(tags) or '-'} |",
        f"| weights (Hub id) | `{hub}` |",
        f"| official code | {info.get('code', '-')} |",
        "",
        "## Feature maps (`features_only=True`)",
        "",
        "| module | channels | stride |",
        "| --- | --- | --- |",
        *[f"| `{m}` | {c} | {r} |" for m, c, r in d["feature_info"]],
        "",
        "## Usage",
        "",
        "```python",
        "import timm",
        "import visionattn  # registers the model",
        "",
        f'model = timm.create_model("{name}", pretrained=True).eval()',
        f'backbone = timm.create_model("{name}", pretrained=True, features_only=True)',
        "```",
        "",
        "Weights converted from official or timm checkpoints reproduce the source model's logits",
        "and per-stage features (float32, max abs diff <= 1e-4), checked by the test suite.",
        "",
    ]
    if hub.startswith("visionattn/"):
        # our own namespace: nothing is uploaded there yet, so say how to get the weights
        lines += [
            "**Weights:** not yet published under this Hub id. Convert the official checkpoint",
            "locally and load the folder offline:",
            "",
            "```bash",
            f"visionattn convert --family {fam} --variant {name} official_checkpoint.pth {name}/",
            "```",
            "",
            f'then `timm.create_model("local-dir:{name}/", pretrained=True)`.',
            "",
        ]
    return "\n".join(lines)


def write_cards(out_dir: str | Path, pattern: str = "*", include_tiny: bool = False) -> list[Path]:
    """Write ``<out_dir>/<model>.md`` for every matching model; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in list_models(pattern):
        if name.startswith("test_") and not include_tiny:
            continue
        p = out / f"{name}.md"
        p.write_text(render_card(name))
        paths.append(p)
    return paths

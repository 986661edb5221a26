"""Agent-DeiT: DeiT with agent attention.

Papers:
    `Agent Attention: On the Integration of Softmax and Linear Attention`
    - https://arxiv.org/abs/2312.08874 (Han et al., ECCV 2024)
    `Training data-efficient image transformers & distillation through attention`
    - https://arxiv.org/abs/2012.12877 (Touvron et al., ICML 2021)

Official code and checkpoints: https://github.com/LeapLabTHU/Agent-Attention
(``agent_transformer/models/agent_deit.py`` and ``models/deit.py``, commit 207ce3e). This is
an independent implementation whose parameter names are the official ones, so official
checkpoints load directly (``checkpoint_filter_fn``, ``from_official``).

Architecture. A DeiT (16x16 patches, class token, learned absolute position embedding,
pre-norm blocks with LayerNorm eps 1e-6, class-token head). The first ``agent_layer`` blocks
(all of them for tiny/small, 4 of 12 for base) replace softmax self-attention with agent
attention: ``agent_num`` agent tokens average-pooled from the patch queries on a
``sqrt(agent_num)``-square grid attend to all keys (class token included, its logit biased by
``ac_bias``), then every query (class token included, ``ca_bias``) attends to the agents; the
patch tokens add a depthwise 3x3 conv of their values. Both softmaxes run through
``F.scaled_dot_product_attention`` with the official position biases as additive masks
(``backbones/_agent.py``); the remaining blocks are plain softmax attention on SDPA.

Agent counts follow the official grouping: ``agent_num`` lists four counts, block ``i`` uses
``agent_num[{0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3}[i // 2]]`` (every official variant uses one
count throughout: 49, or 81 for base).

Input sizes. Any input size works: the image is zero-padded at the bottom/right to a multiple
of the patch size, the position embedding is resampled (bicubic) to the running patch grid as
timm's ViTs do with ``dynamic_img_size``, and the agent position biases are resized to the
running grid (bilinear, as the official downstream backbones do). At ``img_size`` nothing is
resized.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionattn.backbones import _agent
from visionattn.backbones._convert import (
    TRAINING_ONLY_KWARGS,
    build_converted,
    official_variant_args,
)

# official family names visionattn.convert.from_official routes here
OFFICIAL_FAMILIES = ("agent_deit",)

__all__ = [
    "FAMILIES",
    "OFFICIAL_VARIANTS",
    "AgentDeiT",
    "checkpoint_filter_fn",
    "convert_official_state_dict",
    "from_official",
    "official_model_args",
]

FAMILIES = ("agent_deit",)

# block index // 2 -> entry of the four agent counts (official VisionTransformer.__init__)
_AGENT_GROUP = {0: 0, 1: 1, 2: 2, 3: 2, 4: 2}


def block_agent_nums(agent_num: int | Sequence[int], n_blocks: int) -> list[int]:
    """Agent tokens of each of ``n_blocks`` agent blocks: an int for all, or the official four
    counts grouped by block pairs (pairs from the sixth on use the last count)."""
    if isinstance(agent_num, int):
        return [agent_num] * n_blocks
    counts = [int(a) for a in agent_num]
    if len(counts) != 4:
        raise ValueError(f"agent_num: an int or the official four counts, got {agent_num!r}")
    return [counts[_AGENT_GROUP.get(i // 2, 3)] for i in range(n_blocks)]


# ----------------------------------------------------------------------------------------------
# layers


class AgentAttention(nn.Module):
    """Agent attention over ``[B, 1 + H*W, C]`` tokens (class token first).

    ``window`` is the patch grid side the position biases are trained for; ``forward(x, grid)``
    resizes them to the running ``grid = (H, W)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        agent_num: int = 49,
        window: int = 14,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide dim {dim}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.agent_num = agent_num
        self.grid = _agent.agent_grid(agent_num)
        self.window = window
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        _agent.init_agent_biases(self, num_heads, agent_num, window, window)
        # class-token biases: agents -> class key, class query -> agents
        self.ac_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1))
        self.ca_bias = nn.Parameter(torch.zeros(1, num_heads, 1, agent_num))
        trunc_normal_(self.ac_bias, std=0.02)
        trunc_normal_(self.ca_bias, std=0.02)

    def forward(
        self,
        x: torch.Tensor,
        grid: tuple[int, int],
        biases: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``biases``: this module's ``map_biases(self, grid, grid, dtype, class_token=True)``
        when the caller built them (the model builds all blocks' together); else built here."""
        B, N, C = x.shape
        nh = self.num_heads
        q, k, v = self.qkv(x).view(B, N, 3, C).unbind(2)
        agents = _agent.pool_agents(q, grid, self.grid, skip=1)
        if biases is None:
            biases = _agent.map_biases(self, grid, grid, q.dtype, class_token=True)
        key_bias, query_bias = biases
        x = _agent.agent_attention(
            _agent.split_heads(q, nh),
            _agent.split_heads(k, nh),
            _agent.split_heads(v, nh),
            _agent.split_heads(agents, nh),
            key_bias,
            query_bias,
            scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        # the depthwise-conv term covers the patch tokens only (zero-padded over the class
        # token: its gradient is then a view, where slicing x would zero-fill a copy)
        dwc = _agent.dwc_tokens(v[:, 1:], grid, self.dwc)
        x = _agent.merge_heads(x) + F.pad(dwc, (0, 0, 1, 0))
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, agent_num={self.agent_num}, window={self.window}"


class Attention(nn.Module):
    """Multi-head softmax self-attention (DeiT) through ``F.scaled_dot_product_attention``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide dim {dim}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int] | None = None, biases: None = None
    ) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6) with agent or softmax attention.

    ``forward(x, grid, biases=None)``: ``x [B, 1 + H*W, C]``, ``grid = (H, W)`` the patch grid,
    ``biases`` the agent attention's prebuilt biases (see :meth:`AgentAttention.forward`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        agent_num: int | None,
        window: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = _agent.AutocastLayerNorm(dim, eps=1e-6)
        if agent_num is None:
            self.attn: nn.Module = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        else:
            self.attn = AgentAttention(
                dim, num_heads, agent_num, window, qkv_bias, attn_drop, proj_drop
            )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = _agent.AutocastLayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        grid: tuple[int, int],
        biases: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid, biases))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------------------------
# model


def _init_weights(module: nn.Module) -> None:
    # Official (timm 0.4 ViT) init: truncated-normal linears with zero bias, unit LayerNorms;
    # convs keep PyTorch's default.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class AgentDeiT(nn.Module):
    """Agent-DeiT.

    Args:
        img_size: training resolution (position-embedding grid and agent-bias size).
        patch_size: patch size.
        in_chans: image channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: ``"token"`` (class token, official), ``"avg"`` (mean of the patch
            tokens) or ``""``.
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / embed_dim.
        qkv_bias: bias in the qkv projections.
        agent_num: agent tokens per agent block: an int, or the official four counts (module
            docstring).
        agent_layer: blocks ``[0, agent_layer)`` use agent attention; ``<= 0`` means all
            (official semantics).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the position embedding, the attention projection and in
            the MLP (official ``drop_rate``).
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth, linear over the blocks.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        agent_num: int | Sequence[int] = (49, 49, 49, 49),
        agent_layer: int = -1,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool: must be 'token', 'avg' or '', got {global_pool!r}")
        if not isinstance(img_size, int) or img_size < patch_size:
            raise ValueError(f"img_size: must be an int >= patch_size, got {img_size!r}")
        n_agent = depth if agent_layer <= 0 else agent_layer
        if n_agent > depth:
            raise ValueError(f"agent_layer: must be <= depth ({depth}), got {agent_layer}")
        agent_nums = block_agent_nums(agent_num, n_agent)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            flatten=False, output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True,
        )  # fmt: skip
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, embed_dim))
        self.pos_drop = nn.Dropout(proj_drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim, num_heads, agent_nums[i] if i < n_agent else None,
                window=img_size // patch_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
            )
            for i in range(depth)
        )  # fmt: skip
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size)
            for i in range(depth)
        ]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool: must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image -> ``[B, 1 + H*W, C]`` tokens with position embedding, and the grid."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(
                f"x: expected an image batch [B, {self.patch_embed.proj.in_channels}, H, W], "
                f"got {tuple(x.shape)}"
            )
        x = self.patch_embed(x)
        B, H, W, C = x.shape
        pos = self.pos_embed
        if (H, W) != tuple(self.patch_embed.grid_size):
            pos = resample_abs_pos_embed(
                pos, (H, W), old_size=self.patch_embed.grid_size, num_prefix_tokens=1
            )
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, H * W, C)], dim=1)
        return self.pos_drop(x + pos), (H, W)

    def _block_biases(
        self, blocks: Sequence[nn.Module], x: torch.Tensor, grid: tuple[int, int]
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Every agent block's attention biases, built together (``map_biases_group``) in the
        dtype its queries will have (the autocast dtype under autocast)."""
        attns = [b.attn if isinstance(b.attn, AgentAttention) else None for b in blocks]
        return _agent.map_biases_group(
            attns, grid, grid, _agent.autocast_dtype(x), class_token=True
        )

    def _run_block(
        self,
        blk: nn.Module,
        x: torch.Tensor,
        grid: tuple[int, int],
        biases: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, grid, biases, use_reentrant=False)
        return blk(x, grid, biases)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """Block outputs as timm's ViTs return them, and (unless ``intermediates_only``) the
        normalized final tokens ``[B, 1 + H*W, C]``.

        ``indices``: last n blocks if int, all if None, else the given block indices. ``norm``
        applies the final norm to each intermediate. ``output_fmt``: ``"NCHW"`` patch maps or
        ``"NLC"`` patch tokens; the class token is dropped from both unless
        ``return_prefix_tokens``, which gives ``(patch_features, class_token [B, 1, C])`` pairs.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt: must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, (H, W) = self._embed(x)
        blocks = self.blocks if not stop_early else self.blocks[: max_index + 1]
        biases = self._block_biases(blocks, x, (H, W))
        intermediates: list[Any] = []
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x, (H, W), biases[i])
            if i in take_indices:
                y = self.norm(x) if norm else x
                prefix, y = y[:, :1], y[:, 1:]
                if output_fmt == "NCHW":
                    y = y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append((y, prefix) if return_prefix_tokens else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks (and norm/head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W] -> [B, 1 + H/16 * W/16, embed_dim]`` normalized tokens."""
        x, grid = self._embed(x)
        biases = self._block_biases(self.blocks, x, grid)
        for blk, b in zip(self.blocks, biases):
            x = self._run_block(blk, x, grid, b)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, 1:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# official variants and checkpoint conversion

# Our registered name -> the official constructor kwargs: agent_transformer/models/
# agent_deit.py factories + cfgs/agent_deit_{t,s,s_448,b}.yaml via models/build.py (img size,
# drop path, agent counts), commit 207ce3e.
OFFICIAL_VARIANTS: dict[str, dict[str, Any]] = {
    "agent_deit_tiny": dict(
        patch_size=16, embed_dim=192, depth=12, num_heads=3, img_size=224, drop_path_rate=0.0,
        agent_num=["49", "49", "49", "49"]),
    "agent_deit_small": dict(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, img_size=224, drop_path_rate=0.1,
        agent_num=["49", "49", "49", "49"]),
    "agent_deit_small_448": dict(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, img_size=448, drop_path_rate=0.1,
        agent_num=["49", "49", "49", "49"]),
    "agent_deit_base": dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, agent_layer=4, img_size=224,
        drop_path_rate=0.3, agent_num=["81", "81", "81", "81"]),
}  # fmt: skip

# official kwarg -> ours (same meaning)
_KWARG_MAP = {
    "img_size": "img_size", "patch_size": "patch_size", "in_chans": "in_chans",
    "num_classes": "num_classes", "embed_dim": "embed_dim", "depth": "depth",
    "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias",
    "drop_rate": "proj_drop_rate", "attn_drop_rate": "attn_drop_rate",
    "drop_path_rate": "drop_path_rate", "agent_layer": "agent_layer", "agent_num": "agent_num",
}  # fmt: skip
_IGNORED = {"weight_init", "pretrained"}


def official_to_ours_kwargs(official_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Our :class:`AgentDeiT` kwargs for the official ``VisionTransformer`` kwargs."""
    out: dict[str, Any] = {}
    for key, value in official_kwargs.items():
        if key in _IGNORED:
            continue
        if key == "representation_size":
            if value:
                raise ValueError("official_kwargs: representation_size (pre-logits) unsupported")
        elif key == "distilled":
            if value:
                raise ValueError("official_kwargs: distilled (distillation token) unsupported")
        elif key in ("embed_layer", "norm_layer", "act_layer"):
            if value is not None:
                raise ValueError(f"official_kwargs: only the default {key} is supported")
        elif key == "agent_num":
            try:
                out["agent_num"] = (
                    int(value) if isinstance(value, (int, str)) else [int(a) for a in value]
                )
            except (TypeError, ValueError):
                raise ValueError(
                    f"official_kwargs: agent_num must be integers, got {value!r}"
                ) from None
        elif key in _KWARG_MAP:
            out[_KWARG_MAP[key]] = value
        else:
            raise ValueError(
                f"official_kwargs: {key!r} is not an argument of the official Agent-DeiT "
                f"VisionTransformer (known: {sorted(_KWARG_MAP) + ['representation_size']})"
            )
    return out


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Tensor state dict of a checkpoint: bare, or under the official script's ``model`` key."""
    from visionattn.convert import unwrap_state_dict

    return unwrap_state_dict(checkpoint)


def convert_official_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """An official Agent-DeiT state dict in our keys (the names are the official ones); every
    key must be one of the official model's (``ValueError`` listing the others)."""
    sd = _unwrap(state_dict)
    known = ("cls_token", "pos_embed", "patch_embed.proj.", "blocks.", "norm.", "head.")
    unknown = [k for k in sd if not (k in known or k.startswith(known))]
    if unknown:
        raise ValueError(f"state_dict: official Agent-DeiT keys not recognized: {unknown[:10]}")
    return dict(sd)


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Official Agent-DeiT checkpoints (bare or wrapped) into ``model``.

    For a model built at another ``img_size`` the position embedding is resampled (bicubic)
    and the ``ah/aw/ha/wa`` agent biases are resized linearly along their map axis, as the
    official fine-tuning script does.
    """
    sd = convert_official_state_dict(state_dict)
    target = model.state_dict()
    pe = sd.get("pos_embed")
    if pe is not None and "pos_embed" in target and pe.shape != target["pos_embed"].shape:
        old = int(round((pe.shape[1] - 1) ** 0.5))
        sd["pos_embed"] = resample_abs_pos_embed(
            pe, tuple(model.patch_embed.grid_size), old_size=(old, old), num_prefix_tokens=1
        )
    return _agent.fit_agent_biases(sd, target)


def official_model_args(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Registered model name and kwargs that build our counterpart of an official model.

    ``official_kwargs``: the official constructor's kwargs (e.g. a parity vector's
    ``constructor_kwargs``); without them ``variant`` (``"agent_deit_tiny"``, ...,
    ``"agent_deit_small_448"``) supplies them. ``num_classes`` follows the checkpoint's head.
    """
    defaults = {
        k: p.default
        for k, p in inspect.signature(AgentDeiT.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }

    def arch(kw: Mapping[str, Any]) -> dict[str, Any]:
        # per-block agent counts and the agent-layer count, however the config spells them
        full = {**defaults, **official_to_ours_kwargs(kw)}
        full["agent_num"] = block_agent_nums(full["agent_num"], full["depth"])
        full["agent_layer"] = max(full["agent_layer"], 0) or full["depth"]
        return {k: v for k, v in full.items() if k not in TRAINING_ONLY_KWARGS}

    return official_variant_args(
        _unwrap(state_dict), official_kwargs, variant, label="Agent-DeiT",
        variants=OFFICIAL_VARIANTS, to_ours=official_to_ours_kwargs, default="agent_deit_tiny",
        arch=arch,
    )  # fmt: skip


def from_official(
    state_dict: Mapping[str, Any],
    official_kwargs: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    family: str = "agent_deit",
) -> nn.Module:
    """Our model built from an official Agent-DeiT checkpoint, weights loaded (strict).

    ``official_kwargs``: the official ``VisionTransformer`` kwargs (official names, e.g.
    ``agent_num=["49", "49", "49", "49"]``); without them ``variant`` names an official
    variant. Returns the model in eval mode; ``model.model_args`` rebuilds it from its name.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: must be one of {FAMILIES}, got {family!r}")
    name, args = official_model_args(state_dict, official_kwargs, variant=variant)
    return build_converted(name, args, lambda m: convert_official_state_dict(state_dict))


# ----------------------------------------------------------------------------------------------
# pretrained configs and registration


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return _agent.agent_cfg("patch_embed.proj", "head", pool_size=None, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        **{
            f"{n}.in1k": _cfg(
                hf_hub_id=f"visionattn/{n}.in1k",
                **(dict(input_size=(3, 448, 448)) if n.endswith("_448") else {}),
            )
            for n in OFFICIAL_VARIANTS
        },
        "test_agent_deit.untrained": _cfg(input_size=(3, 64, 64)),
    }
)

# tiny configuration for tests: two agent blocks (agent counts 4 and 1), one softmax block
_TEST_ARGS = dict(
    img_size=64, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, agent_num=[4, 1, 4, 4],
    agent_layer=2,
)  # fmt: skip


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentDeiT:
    if variant in OFFICIAL_VARIANTS:
        args = official_to_ours_kwargs(OFFICIAL_VARIANTS[variant])
    else:
        args = dict(_TEST_ARGS)
    args.update(kwargs)
    out_indices = args.pop("out_indices", 3)
    return build_model_with_cfg(
        AgentDeiT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **args,
    )


@register_model
def agent_deit_tiny(pretrained: bool = False, **kwargs: Any) -> AgentDeiT:
    """Agent-DeiT-T (6.0M params, 74.9% top-1 at 224 px; agent_transformer/README.md)."""
    return _create("agent_deit_tiny", pretrained, **kwargs)


@register_model
def agent_deit_small(pretrained: bool = False, **kwargs: Any) -> AgentDeiT:
    """Agent-DeiT-S (22.7M, 80.5%)."""
    return _create("agent_deit_small", pretrained, **kwargs)


@register_model
def agent_deit_small_448(pretrained: bool = False, **kwargs: Any) -> AgentDeiT:
    """Agent-DeiT-S at 448 px (23.1M, 83.1%)."""
    return _create("agent_deit_small_448", pretrained, **kwargs)


@register_model
def agent_deit_base(pretrained: bool = False, **kwargs: Any) -> AgentDeiT:
    """Agent-DeiT-B (87.2M, 82.0%; agent attention in the first 4 of 12 blocks)."""
    return _create("agent_deit_base", pretrained, **kwargs)


@register_model
def test_agent_deit(pretrained: bool = False, **kwargs: Any) -> AgentDeiT:
    """Tiny Agent-DeiT for tests."""
    return _create("test_agent_deit", pretrained, **kwargs)

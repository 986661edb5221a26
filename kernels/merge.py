"""Merge attention results computed over disjoint key sets using their log-sum-exps.

If ``out_i = softmax(s_i) @ v_i`` and ``lse_i = logsumexp(s_i)`` for key sets ``i``, attention
over the union of the key sets is ``sum_i exp(lse_i - lse) * out_i`` with
``lse = logsumexp_i(lse_i)``. This combines e.g. neighbourhood attention (``return_lse=True``)
with attention to a few extra global tokens (``F.scaled_dot_product_attention`` plus its lse,
or a manual softmax). Differentiable in every input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["merge_attentions"]


def merge_attentions(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge partial attentions.

    Args:
        outs: tensors ``[..., heads, head_dim]`` of one shape (e.g. ``[B, *spatial, heads, d]``).
        lses: matching natural-log sum-exps ``[..., heads]`` (``outs[i].shape[:-1]``).

    Returns:
        ``(out, lse)``: the merged output (dtype of ``outs[0]``) and its float32 lse
        (computed in at least float32).
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(
            f"outs and lses must be non-empty and of equal length, got {len(outs)} and {len(lses)}"
        )
    shape = outs[0].shape
    for i, (o, s) in enumerate(zip(outs, lses)):
        if not isinstance(o, Tensor) or not isinstance(s, Tensor):
            raise TypeError(f"outs[{i}] and lses[{i}] must be tensors")
        if o.shape != shape:
            raise ValueError(
                f"outs[{i}] shape {tuple(o.shape)} differs from outs[0] {tuple(shape)}"
            )
        if s.shape != shape[:-1]:
            raise ValueError(
                f"lses[{i}] shape {tuple(s.shape)} must equal outs shape without head_dim "
                f"{tuple(shape[:-1])}"
            )
        if o.device != outs[0].device or s.device != outs[0].device:
            raise ValueError(f"outs[{i}]/lses[{i}] must be on {outs[0].device}")
    ct = torch.promote_types(outs[0].dtype, torch.float32)
    lse_stack = torch.stack([s.to(ct) for s in lses])
    lse = torch.logsumexp(lse_stack, dim=0)
    # A set whose lse is -inf (no keys) gets weight 0 rather than NaN.
    w = torch.exp(lse_stack - lse.unsqueeze(0)).nan_to_num(0.0)
    out = sum(w[i].unsqueeze(-1) * o.to(ct) for i, o in enumerate(outs))
    return out.to(outs[0].dtype), lse.float()

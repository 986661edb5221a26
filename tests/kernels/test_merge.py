"""merge_attentions: exactness against one softmax over the union, -inf sets, errors."""

from __future__ import annotations

import pytest
import torch

from visionattn.kernels import merge_attentions


def _attend(q, k, v):
    logits = torch.einsum("nhd,mhd->nhm", q, k)
    return torch.einsum("nhm,mhd->nhd", logits.softmax(-1), v), logits.logsumexp(-1)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_merge_equals_union(parts):
    gen = torch.Generator().manual_seed(parts)
    q = torch.randn(5, 2, 8, dtype=torch.float64, generator=gen)
    k = torch.randn(12, 2, 8, dtype=torch.float64, generator=gen)
    v = torch.randn(12, 2, 4, dtype=torch.float64, generator=gen)
    splits = torch.tensor_split(torch.arange(12), parts)
    outs, lses = zip(*[_attend(q, k[i], v[i]) for i in splits])
    out, lse = merge_attentions(list(outs), list(lses))
    ref, ref_lse = _attend(q, k, v)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)
    assert lse.dtype == torch.float32 and out.dtype == torch.float64


def test_merge_empty_set_and_half():
    gen = torch.Generator().manual_seed(0)
    o1 = torch.randn(3, 2, 4, generator=gen).half()
    l1 = torch.randn(3, 2, generator=gen)
    o2 = torch.randn(3, 2, 4, generator=gen).half()
    l2 = torch.full((3, 2), float("-inf"))  # a key set with no keys contributes nothing
    out, lse = merge_attentions([o1, o2], [l1, l2])
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, o1)
    torch.testing.assert_close(lse, l1)


def test_merge_errors():
    o = torch.randn(3, 2, 4)
    lse = torch.randn(3, 2)
    with pytest.raises(ValueError, match="equal length"):
        merge_attentions([o, o], [lse])
    with pytest.raises(ValueError, match="outs\\[1\\] shape"):
        merge_attentions([o, o[:2]], [lse, lse])
    with pytest.raises(ValueError, match="lses\\[0\\] shape"):
        merge_attentions([o], [lse[:, :1]])
    with pytest.raises(TypeError, match="tensors"):
        merge_attentions([o], [1.0])

"""Shared inference helpers: same results as the plain modules on every path."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import GELUTanh
from torch import nn

from visionattn.backbones import _layers
from visionattn.backbones._layers import inplace_act, linear_tokens, pointwise


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(2, 5, 7, 12), (3, 9, 12), (4, 12)])
def test_pointwise_matches_linear(threads: int, shape: tuple) -> None:
    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layer = nn.Linear(12, 6)
        x = torch.randn(shape)
        ref = layer(x)
        with torch.no_grad():  # the CPU-inference route (1x1 conv with > 1 thread)
            y = linear_tokens(x, layer)
            y4 = pointwise(x, layer.weight[:, :, None, None], layer.bias)  # conv-shaped weight
        assert y.shape == ref.shape and y.is_contiguous()
        assert torch.allclose(y, ref, atol=1e-6) and torch.allclose(y4, ref, atol=1e-6)
        g = linear_tokens(x.requires_grad_(), layer)  # with grad: plain F.linear
        assert g.requires_grad and torch.allclose(g, ref, atol=1e-6)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), GELUTanh(), nn.ReLU()])
def test_inplace_act(act: nn.Module) -> None:
    x = torch.randn(3, 8)
    ref = act(x.clone())
    with torch.no_grad():
        y = inplace_act(act, x.clone())
    assert torch.allclose(y, ref, atol=1e-7)
    z = inplace_act(act, x.clone().requires_grad_())  # training: out of place, differentiable
    assert z.requires_grad and torch.allclose(z, ref, atol=1e-7)


def test_autocast_layer_norm_is_layer_norm_outside_cuda_autocast() -> None:
    torch.manual_seed(5)
    ln = _layers.AutocastLayerNorm(8, eps=1e-6)
    ref = torch.nn.LayerNorm(8, eps=1e-6)
    ref.load_state_dict(ln.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(ln(x), ref(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # only CUDA autocast changes it
        assert torch.equal(ln(x), ref(x))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "rows, grad, fused",
    [(40, False, True), (40, True, False), ((1 << 23) // 64, True, True)],
)
def test_autocast_layer_norm_on_cuda(rows: int, grad: bool, fused: bool) -> None:
    """Inference and large training-mode norms write the autocast dtype (fused kernel); small
    training-mode norms are plain LayerNorm (float32 under autocast). Values and gradients
    match the float32 norm either way."""
    torch.manual_seed(6)
    ln = _layers.AutocastLayerNorm(64).cuda()
    ref = torch.nn.LayerNorm(64).cuda()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ref.load_state_dict(ln.state_dict())
    x = torch.randn(rows, 64, device="cuda", requires_grad=grad)
    with torch.set_grad_enabled(grad), torch.autocast("cuda", dtype=torch.bfloat16):
        y = ln(x)
    assert y.dtype == (torch.bfloat16 if fused else torch.float32)
    want = ref(x)
    torch.testing.assert_close(y.float(), want, atol=3e-2, rtol=2e-2)
    if grad:
        dy = torch.randn_like(want)
        got = torch.autograd.grad(y, (x, ln.weight, ln.bias), dy.to(y.dtype))
        exp = torch.autograd.grad(want, (x, ref.weight, ref.bias), dy)
        for a, b in zip(got, exp, strict=True):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=3e-2 * max(1.0, b.abs().max().item()), rtol=2e-2)


@pytest.mark.parametrize("conv_bias", [False, True])
def test_folded_conv_norm_act_matches_timm(conv_bias: bool) -> None:
    """Inference with the folded conv equals conv + BN + act; training is timm's path; the
    folded weights follow in-place updates of the conv and BN tensors."""
    from timm.layers import ConvNormAct

    from visionattn.backbones._layers import FoldedConvNormAct, use_folded_conv_norm

    torch.manual_seed(0)
    seq = nn.Sequential(
        ConvNormAct(6, 8, 3, stride=2, padding=1, bias=conv_bias, act_layer=nn.SiLU),
        ConvNormAct(8, 8, 1, apply_act=False),
    )
    for m in seq:
        bn = m.bn
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    ref = copy.deepcopy(seq).eval()
    assert use_folded_conv_norm(seq) == 2
    assert all(type(m) is FoldedConvNormAct for m in seq)
    assert seq.state_dict().keys() == ref.state_dict().keys()
    seq.eval()
    x = torch.randn(2, 6, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), ref(x), atol=1e-5, rtol=1e-5)
        seq[0].bn.running_mean.add_(0.5)  # in-place update: the cache must notice
        ref[0].bn.running_mean.add_(0.5)
        torch.testing.assert_close(seq(x), ref(x), atol=1e-5, rtol=1e-5)
    # with autograd (and in training) the module is timm's conv + BN
    torch.testing.assert_close(seq(x), ref(x), atol=0, rtol=0)
    seq.train()
    ref.train()
    torch.testing.assert_close(seq(x), ref(x), atol=0, rtol=0)


def test_use_folded_conv_norm_skips_unfoldable() -> None:
    from timm.layers import ConvNormAct

    from visionattn.backbones._layers import use_folded_conv_norm

    no_norm = ConvNormAct(4, 4, 1, apply_norm=False)
    assert use_folded_conv_norm(nn.Sequential(no_norm)) == 0
    assert type(no_norm) is ConvNormAct


def test_module_memo_reuses_until_the_key_changes() -> None:
    """One entry per slot: the same key returns the stored value without building; a
    parameter update (tensors_key in the key) or another key rebuilds and replaces it."""
    module_memo, tensors_key = _layers.module_memo, _layers.tensors_key
    m = nn.Linear(2, 2)
    calls = []

    def build():
        calls.append(1)
        return m.weight.detach() * 2

    a = module_memo(m, "_x", (3, *tensors_key(m.weight)), build)
    assert module_memo(m, "_x", (3, *tensors_key(m.weight)), build) is a and len(calls) == 1
    with torch.no_grad():
        m.weight.add_(1.0)
    b = module_memo(m, "_x", (3, *tensors_key(m.weight)), build)
    assert len(calls) == 2 and torch.equal(b, m.weight.detach() * 2)
    module_memo(m, "_x", (4, *tensors_key(m.weight)), build)
    assert len(calls) == 3 and m.__dict__["_x"][0][0] == 4
    assert "_x" not in m.state_dict()


@pytest.mark.parametrize(
    "name", ["test_va_efficientvit", "test_va_maxvit", "test_va_halonet", "test_agent_deit"]
)
def test_clear_memos_drops_values_a_silent_update_left_stale(name: str) -> None:
    """A replayed CUDA graph updates parameters without moving their version counters; the
    inference memos (fold caches, gathered biases, agent biases) then go stale until
    clear_memos drops them, after which eval output equals the unmemoised path again."""
    import timm

    import visionattn  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        before = model(x)
    held = sum(slot in m.__dict__ for m in model.modules() for slot in _layers._MEMO_SLOTS)
    assert held > 0, "the eval forward memoised nothing"
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))  # .data: the version counter does not move
    for b in model.buffers():
        if b.is_floating_point():
            b.data.mul_(1.1)
    with torch.enable_grad():
        fresh = model(x).detach()  # eval with autograd: no memo is read
    assert not torch.allclose(before, fresh, atol=1e-4), "the update did not change the output"
    with torch.no_grad():
        stale = model(x)  # the memoised parts still hold the old weights
    assert not torch.allclose(stale, fresh, atol=1e-4), "no memo went stale"
    assert _layers.clear_memos(model) == held
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh, atol=1e-4, rtol=1e-4)


def test_autocast_dtype_follows_what_autocast_casts() -> None:
    """The dtype a matmul of ``x`` runs in, checked against autocast itself on the CPU."""
    w = torch.randn(3, 3)
    for dtype in (torch.float32, torch.float16, torch.float64):
        x = torch.randn(2, 3).to(dtype)
        assert _layers.autocast_dtype(x) == dtype  # autocast off
        with torch.autocast("cpu", torch.bfloat16):
            expect = torch.nn.functional.linear(x, w.to(dtype)).dtype
            assert _layers.autocast_dtype(x) == expect, dtype
    assert expect == torch.float64  # float64 is never cast

"""backbones/_agent.py: the shared agent-attention pieces against naive formulations."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import visionattn  # noqa: F401  (registers the models)
from visionattn.backbones import _agent


def _naive_softmax_attn(q, k, v, bias, scale):
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1) @ v


@pytest.mark.parametrize("size,grid", [((7, 7), (3, 3)), ((10, 6), (4, 4)), ((5, 9), (2, 2))])
def test_pool_agents_matches_adaptive_avg_pool(size, grid) -> None:
    g = torch.Generator().manual_seed(0)
    B, C = 2, 6
    h, w = size
    qkv = torch.randn(B, h * w, 3 * C, generator=g, dtype=torch.float64)
    q = qkv[..., :C]  # strided view, as from a fused projection
    got = _agent.pool_agents(q, size, grid)
    ref = F.adaptive_avg_pool2d(q.reshape(B, h, w, C).permute(0, 3, 1, 2), grid)
    ref = ref.flatten(2).transpose(1, 2)
    assert got.shape == (B, grid[0] * grid[1], C)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_pool_agents_half_precision_matches_float64() -> None:
    """bfloat16 tokens (autocast's dtype) pool through the per-dtype cached matrix: the bin
    sums come out of a bf16 matmul, the division by the bin size happens in float32."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 10 * 6, 8, generator=g, dtype=torch.float64)
    ref = _agent.pool_agents(tokens, (10, 6), (4, 4))
    got = _agent.pool_agents(tokens.bfloat16(), (10, 6), (4, 4))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)
    m16, inv16 = _agent._pool_matrix((10, 6), (4, 4), tokens.device, torch.bfloat16)
    assert m16.dtype == torch.bfloat16 and inv16.dtype == torch.float32


def test_pool_agents_skips_leading_tokens() -> None:
    """``skip`` leading tokens (a class token) take no part: the agents and every gradient
    equal pooling the slice that leaves them out, and theirs is zero."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 2 + 7 * 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    got = _agent.pool_agents(tokens, (7, 5), (3, 2), skip=2)
    ref = _agent.pool_agents(tokens[:, 2:], (7, 5), (3, 2))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * w).sum(), tokens)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), tokens)
    torch.testing.assert_close(g_got, g_ref, rtol=0, atol=1e-12)
    assert g_got[:, :2].abs().sum() == 0 and g_got[:, 2:].abs().sum() > 0


def test_pool_agents_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="tokens"):
        _agent.pool_agents(torch.zeros(1, 10, 4), (3, 3), (2, 2))
    with pytest.raises(ValueError, match="tokens"):
        _agent.pool_agents(torch.zeros(1, 9, 4), (3, 3), (2, 2), skip=1)
    with pytest.raises(ValueError, match="skip"):
        _agent.pool_agents(torch.zeros(1, 9, 4), (3, 3), (2, 2), skip=-1)
    with pytest.raises(ValueError, match="num_agents"):
        _agent.agent_grid(10)
    with pytest.raises(ValueError, match="num_heads"):
        _agent.split_heads(torch.zeros(1, 4, 6), 4)


def test_agent_attention_matches_naive_softmax_forward_and_grad() -> None:
    g = torch.Generator().manual_seed(1)
    B, nh, N, M, A, d = 2, 3, 20, 12, 4, 5
    q, k, v = (torch.randn(B, nh, n, d, generator=g, dtype=torch.float64) for n in (N, M, M))
    agents = torch.randn(B, nh, A, d, generator=g, dtype=torch.float64)
    ab = torch.randn(nh, A, M, generator=g, dtype=torch.float64)
    qb = torch.randn(nh, N, A, generator=g, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v, agents, ab, qb)]
    scale = 0.37
    got = _agent.agent_attention(q, k, v, agents, ab, qb, scale=scale)
    ref = _naive_softmax_attn(q, agents, _naive_softmax_attn(agents, k, v, ab, scale), qb, scale)
    torch.testing.assert_close(got, ref)
    w = torch.randn_like(ref)
    g_got = torch.autograd.grad((got * w).sum(), leaves)
    g_ref = torch.autograd.grad((ref * w).sum(), leaves)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)
    # default scale is head_dim ** -0.5
    torch.testing.assert_close(
        _agent.agent_aggregate(agents, k, v),
        _naive_softmax_attn(agents, k, v, None, d**-0.5),
    )


def test_split_merge_heads_roundtrip() -> None:
    x = torch.randn(2, 7, 12)
    h = _agent.split_heads(x, 3)
    assert h.shape == (2, 3, 7, 4)
    assert h.data_ptr() == x.data_ptr()
    assert torch.equal(_agent.merge_heads(h), x)


def _official_style_biases(m: nn.Module, size: tuple[int, int]):
    """The official downstream construction: (ah + aw) and (ha + wa) resized jointly."""
    nh, na = m.an_bias.shape[:2]
    kb = F.interpolate(m.an_bias, size=size, mode="bilinear")
    kb = kb + F.interpolate((m.ah_bias + m.aw_bias)[0], size=size, mode="bilinear")
    qb = F.interpolate(m.na_bias, size=size, mode="bilinear").reshape(nh, na, -1).transpose(1, 2)
    hw = (m.ha_bias + m.wa_bias)[0].permute(0, 3, 1, 2)
    hw = F.interpolate(hw, size=size, mode="bilinear").reshape(nh, na, -1).transpose(1, 2)
    return kb.reshape(nh, na, -1), qb + hw


@pytest.mark.parametrize("size", [(6, 5), (6, 6), (11, 9), (3, 4)])
def test_bias_construction_matches_joint_resize(size) -> None:
    torch.manual_seed(2)
    m = nn.Module()
    _agent.init_agent_biases(m, num_heads=2, num_agents=4, key_size=(6, 5), query_size=(6, 5))
    assert m.ah_bias.shape == (1, 2, 4, 6, 1) and m.wa_bias.shape == (1, 2, 1, 5, 4)
    kb = _agent.agent_key_bias(m.an_bias, m.ah_bias, m.aw_bias, size)
    qb = _agent.query_agent_bias(m.na_bias, m.ha_bias, m.wa_bias, size)
    rk, rq = _official_style_biases(m, size)
    assert kb.shape == (2, 4, size[0] * size[1]) and qb.shape == (2, size[0] * size[1], 4)
    torch.testing.assert_close(kb, rk, rtol=0, atol=1e-6)
    torch.testing.assert_close(qb, rq, rtol=0, atol=1e-6)


def test_bias_at_trained_size_is_plain_sum() -> None:
    torch.manual_seed(3)
    m = nn.Module()
    _agent.init_agent_biases(m, 2, 9, key_size=(4, 4), query_size=(8, 8))
    kb = _agent.agent_key_bias(m.an_bias, m.ah_bias, m.aw_bias, (4, 4))
    ref = F.interpolate(m.an_bias, size=(4, 4), mode="bilinear") + (m.ah_bias + m.aw_bias)[0]
    torch.testing.assert_close(kb, ref.reshape(2, 9, 16), rtol=0, atol=1e-7)


def test_dwc_tokens_matches_nchw_conv() -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    B, h, w = 2, 5, 7
    qkv = torch.randn(B, h * w, 18)
    v = qkv[..., 12:]
    got = _agent.dwc_tokens(v, (h, w), conv)
    ref = conv(v.transpose(1, 2).reshape(B, 6, h, w)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("fn", ["agent_aggregate", "agent_broadcast"])
def test_math_path_matches_sdpa_path_with_bias_gradient(fn, monkeypatch) -> None:
    torch.manual_seed(7)
    B, h, A, N, d = 2, 3, 9, 20, 8
    small = torch.randn(B, h, A, d)
    big_k, big_v = torch.randn(B, h, N, d), torch.randn(B, h, N, d)
    if fn == "agent_aggregate":
        args, bias_shape = (small, big_k, big_v), (h, A, N)
    else:
        args, bias_shape = (big_k, small, torch.randn(B, h, A, d)), (h, N, A)
    bias = torch.randn(bias_shape)
    results = {}
    for mode in ("sdpa", "math"):
        monkeypatch.setenv("VISIONATTN_AGENT_ATTN", mode)
        leaves = [t.clone().requires_grad_(True) for t in (*args, bias)]
        out = getattr(_agent, fn)(*leaves[:3], leaves[3], scale=0.3)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        results[mode] = (out, *grads)
    for a, b in zip(results["sdpa"], results["math"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("VISIONATTN_AGENT_ATTN", "fast")
    with pytest.raises(ValueError, match="VISIONATTN_AGENT_ATTN"):
        getattr(_agent, fn)(*args, bias)


def test_fit_agent_biases_resizes_only_mismatched_map_axes() -> None:
    torch.manual_seed(8)
    ah = torch.randn(1, 2, 9, 7, 1)
    other = torch.randn(2, 9, 7, 7)  # an an_bias: never resized by shape here
    sd = {"blocks.0.attn.ah_bias": ah.clone(), "blocks.0.attn.an_bias": other.clone()}
    target = {"blocks.0.attn.ah_bias": torch.empty(1, 2, 9, 12, 1), "blocks.0.attn.an_bias": other}
    out = _agent.fit_agent_biases(sd, target)
    ref = F.interpolate(ah.reshape(1, 18, 7), size=12, mode="linear").reshape(1, 2, 9, 12, 1)
    torch.testing.assert_close(out["blocks.0.attn.ah_bias"], ref)
    assert torch.equal(out["blocks.0.attn.an_bias"], other)


@pytest.mark.parametrize("name", ["agent_deit_tiny", "agent_pvt_tiny", "agent_swin_tiny"])
def test_eval_bias_memo_follows_parameters_and_sizes(name: str) -> None:
    """In eval without autograd the map biases are built once per (size, dtype) and reused;
    an in-place parameter update (what an optimizer step does), another input size, or
    autograd being on rebuilds them, so outputs always equal a model without the memo."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    attn = next(m for m in model.modules() if hasattr(m, "an_bias"))
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(1, 3, size, size)

    def fresh(inp):  # the same model with every memo dropped before the call
        for m in model.modules():
            m.__dict__.pop("_eval_memo", None)
        return model(inp)

    with torch.no_grad():
        out = model(x)
        first = attn._eval_memo[1]
        assert model(x).equal(out) and attn._eval_memo[1] is first  # reused
        attn.na_bias.add_(0.5)  # in place, like an optimizer step
        out2 = model(x)
        assert attn._eval_memo[1] is not first
        assert out2.equal(fresh(x)) and not out2.equal(out)
        if name != "agent_swin_tiny":  # Swin's window layout fixes its input size
            x2 = torch.randn(1, 3, size + 32, size + 32)
            assert model(x2).equal(fresh(x2))
    attn.__dict__.pop("_eval_memo", None)
    out3 = model(x)  # autograd on: built in the graph, not kept
    assert "_eval_memo" not in attn.__dict__ and out3.requires_grad
    out3.sum().backward()
    assert attn.na_bias.grad is not None and attn.na_bias.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name", ["agent_deit_tiny", "agent_pvt_tiny", "agent_swin_tiny", "agent_cswin_tiny"]
)
def test_cuda_matches_cpu_fp32_and_bf16(name: str, cuda_matches_cpu) -> None:
    """Each family on CUDA (SDPA / math attention, fused norms, the eval bias memo on the
    second call) against the CPU path (``cuda_matches_cpu`` in conftest.py)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    size = model.pretrained_cfg["input_size"][-1]
    cuda_matches_cpu(model, torch.randn(2, 3, size, size))


def _bias_module(heads: int, agents: int, size: tuple[int, int], class_token: bool) -> nn.Module:
    m = nn.Module()
    _agent.init_agent_biases(m, heads, agents, key_size=size, query_size=size)
    m.grid = _agent.agent_grid(agents)
    if class_token:
        m.ac_bias = nn.Parameter(torch.randn(1, heads, agents, 1))
        m.ca_bias = nn.Parameter(torch.randn(1, heads, 1, agents))
    return m


@pytest.mark.parametrize("class_token,agent_shape", [(False, None), (False, (3, 2)), (True, None)])
def test_map_biases_group_equals_per_module(class_token: bool, agent_shape) -> None:
    """Built together (tables concatenated along the heads), every module's biases and their
    gradients equal its own ``map_biases``; modules of another shape form their own group;
    without autograd each module's memo is used."""
    torch.manual_seed(5)
    mods = [_bias_module(2, 4, (6, 5), class_token) for _ in range(3)]
    mods.insert(1, _bias_module(3, 9, (6, 5), class_token))  # another group, one module
    mods.append(_bias_module(3, 9, (6, 5), class_token))  # ... now of two
    args = ((7, 4), (5, 6), torch.float32, agent_shape, class_token)
    weights = None

    def build_and_grads(fn):
        nonlocal weights
        for m in mods:
            m.zero_grad(set_to_none=True)
        pairs = fn()
        if weights is None:
            weights = [(torch.randn_like(k), torch.randn_like(q)) for k, q in pairs]
        loss = sum((k * wk).sum() + (q * wq).sum() for (k, q), (wk, wq) in zip(pairs, weights))
        loss.backward()
        return [(k.detach(), q.detach()) for k, q in pairs], [
            p.grad.clone() for m in mods for p in m.parameters()
        ]

    grouped, g_grads = build_and_grads(lambda: _agent.map_biases_group(mods, *args))
    single, s_grads = build_and_grads(lambda: [_agent.map_biases(m, *args) for m in mods])
    for (kg, qg), (ks, qs) in zip(grouped, single):
        torch.testing.assert_close(kg, ks, rtol=0, atol=1e-6)
        torch.testing.assert_close(qg, qs, rtol=0, atol=1e-6)
    for gg, gs in zip(g_grads, s_grads):
        torch.testing.assert_close(gg, gs, rtol=0, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in g_grads)
    with torch.no_grad():
        memo = _agent.map_biases_group(mods, *args)
        again = [_agent.map_biases(m, *args) for m in mods]
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(memo, again))
    # None entries (blocks without agent attention) stay None, in line with the others
    padded = _agent.map_biases_group([None, *mods[:2], None], *args)
    assert padded[0] is None and padded[3] is None
    torch.testing.assert_close(padded[1][0], grouped[0][0], rtol=0, atol=1e-6)


# depths with several agent blocks per stage (the test configs have one)
_GROUPED = {
    "test_agent_deit": dict(depth=5, agent_layer=4),
    "test_agent_pvt": dict(depths=[2, 1, 1, 1]),
    "test_agent_swin": dict(depths=[2, 2, 1, 1]),
    "test_agent_cswin": dict(depths=[2, 2, 1, 1]),
}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", list(_GROUPED))
def test_models_build_biases_per_group_as_per_module(name: str, checkpointing: bool) -> None:
    """In training each model builds its blocks' biases together; outputs and every gradient
    equal building them per module (the blocks' own path), with and without checkpointing."""
    torch.manual_seed(6)
    model = timm.create_model(name, num_classes=7, **_GROUPED[name]).train()
    model.set_grad_checkpointing(checkpointing)
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(2, 3, size, size)

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same drop-path draws
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters()}

    calls = []
    group = _agent.map_biases_group

    def counted(mods, *a, **k):
        calls.append(sum(m is not None for m in mods))
        return group(mods, *a, **k)

    _agent.map_biases_group = counted
    try:
        out, grads = run()
    finally:
        _agent.map_biases_group = group
    assert calls and max(calls) > 1  # some group of several modules was built together
    per_module = lambda mods, *a, **k: [  # noqa: E731
        None if m is None else _agent.map_biases(m, *a, **k) for m in mods
    ]
    _agent.map_biases_group = per_module
    try:
        ref_out, ref_grads = run()
    finally:
        _agent.map_biases_group = group
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    for n, g in ref_grads.items():
        assert (g is None) == (grads[n] is None), n
        if g is not None:
            torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6, msg=n)
    biased = [n for n in grads if n.endswith("an_bias")]
    assert biased and all(grads[n].abs().sum() > 0 for n in biased)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agents,size", [(16, (28, 28)), (49, (14, 14)), (9, (7, 5)), (4, (4, 4))])
def test_map_biases_layout_suits_sdpa(agents: int, size, dtype) -> None:
    """Both biases come out row-major (last stride 1) with every other stride a multiple of 8
    elements: what SDPA's memory-efficient kernel takes as ``attn_mask`` without a per-call
    pad or its float32 math fallback (the query bias used to come out transposed)."""
    m = _bias_module(2, agents, size, class_token=False)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for bias in _agent.map_biases(m, size, size, dtype):
                assert bias.dtype == dtype and bias.stride(-1) == 1, bias.stride()
                assert all(s % 8 == 0 for s in bias.stride()[:-1]), bias.stride()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name", ["agent_deit_tiny", "agent_pvt_tiny", "agent_swin_tiny", "agent_cswin_tiny"]
)
def test_sdpa_calls_take_the_memory_efficient_kernel(name: str, monkeypatch) -> None:
    """Every biased SDPA call of a bf16 training step is eligible for the memory-efficient
    kernel (none falls back to the float32 math path)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        if attn_mask is not None:
            mask = attn_mask.expand(q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
            params = torch.backends.cuda.SDPAParams(q, k, v, mask, dropout_p, is_causal, False)
            calls.append((tuple(q.shape), tuple(k.shape), attn_mask.stride(),
                          torch.backends.cuda.can_use_efficient_attention(params, False)))  # fmt: skip
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale)  # fmt: skip

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = timm.create_model(name, num_classes=10).cuda().train()
    size = model.pretrained_cfg["input_size"][-1]
    with torch.autocast("cuda", torch.bfloat16):
        model(torch.randn(2, 3, size, size, device="cuda")).sum().backward()
    assert calls and all(ok for *_, ok in calls), [c for c in calls if not c[-1]]

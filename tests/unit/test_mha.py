"""course_lib.MultiHeadAttention: equal to nn.MultiheadAttention, causal no-leak, fully masked rows,
the two attention paths, the KV cache, and clear errors on bad input (before any arithmetic)."""

import io
import tokenize
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import course_lib
from course_lib import KVCache, MultiHeadAttention
from course_lib.masks import causal_mask, combine_masks, padding_mask, to_torch_mha_mask
from course_lib.mha import merge_heads, split_heads

TOL = dict(atol=1e-5, rtol=1e-5)  # float32; the measured differences are ~1e-7


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _pair(d_model=32, heads=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(d_model, heads, batch_first=True, **kwargs).eval()
    if kwargs.get("bias", True):  # torch initialises the in/out biases to 0: make them count
        with torch.no_grad():
            theirs.in_proj_bias.normal_()
            theirs.out_proj.bias.normal_()
    return theirs, MultiHeadAttention.from_torch(theirs).eval()


# ----------------------------------------------------------------------------- equal to nn.MultiheadAttention
CASES = {
    "self": dict(kwargs={}, T=6, S=None, mask=None),
    "cross_longer_keys": dict(kwargs={}, T=5, S=9, mask=None),
    "cross_shorter_keys": dict(kwargs={}, T=7, S=3, mask=None),
    "kdim_vdim": dict(kwargs=dict(kdim=12, vdim=20), T=5, S=8, mask=None),
    "no_bias": dict(kwargs=dict(bias=False), T=6, S=None, mask=None),
    "no_bias_kdim_vdim": dict(kwargs=dict(bias=False, kdim=24, vdim=8), T=4, S=6, mask=None),
    "causal": dict(kwargs={}, T=7, S=None, mask="causal"),
    "padding": dict(kwargs={}, T=6, S=None, mask="padding"),
    "cross_padding": dict(kwargs=dict(kdim=12, vdim=20), T=5, S=8, mask="padding"),
    "causal_and_padding": dict(kwargs={}, T=6, S=None, mask="both"),
}


def _our_and_their_masks(kind, B, T, S):
    """Our mask (True = may attend) and nn.MultiheadAttention's (attn_mask, key_padding_mask) (True = ignore)."""
    if kind is None:
        return None, {}
    lengths = torch.tensor([S, S - 2, 1])[:B]
    pad = padding_mask(lengths, S)  # (B, 1, 1, S)
    causal = causal_mask(T, S)  # (T, S)
    if kind == "causal":
        return causal, {"attn_mask": to_torch_mha_mask(causal)}
    if kind == "padding":
        return pad, {"key_padding_mask": to_torch_mha_mask(pad[:, 0, 0])}
    return combine_masks(pad, causal), {"attn_mask": to_torch_mha_mask(causal),
                                        "key_padding_mask": to_torch_mha_mask(pad[:, 0, 0])}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("need_weights", [False, True])
def test_from_torch_matches_nn_multihead_attention(name, need_weights):
    case = CASES[name]
    theirs, ours = _pair(**case["kwargs"])
    B, T, S = 3, case["T"], case["S"] or case["T"]
    g = _gen(1)
    query = torch.randn(B, T, 32, generator=g)
    key = query if case["S"] is None else torch.randn(B, S, theirs.kdim, generator=g)
    value = query if case["S"] is None else torch.randn(B, S, theirs.vdim, generator=g)
    mask, their_masks = _our_and_their_masks(case["mask"], B, T, S)
    ref_out, ref_w = theirs(query, key, value, need_weights=True, average_attn_weights=False, **their_masks)
    args = () if case["S"] is None else (key, value)
    result = ours(query, *args, attn_mask=mask, need_weights=need_weights)
    out = result[0] if need_weights else result
    assert out.shape == (B, T, 32)
    torch.testing.assert_close(out, ref_out, **TOL)
    if need_weights:
        assert result[1].shape == (B, 4, T, S)  # per head: (B, H, T, S)
        torch.testing.assert_close(result[1], ref_w, **TOL)


def test_is_causal_flag_equals_explicit_causal_mask_and_torch():
    theirs, ours = _pair()
    x = torch.randn(2, 9, 32, generator=_gen(2))
    ref, _ = theirs(x, x, x, attn_mask=to_torch_mha_mask(causal_mask(9)))
    torch.testing.assert_close(ours(x, is_causal=True), ref, **TOL)
    torch.testing.assert_close(ours(x, attn_mask=causal_mask(9)), ref, **TOL)
    torch.testing.assert_close(ours(x, is_causal=True, need_weights=True)[0], ref, **TOL)


def test_polarity_conversion_is_written_out_and_the_wrong_one_is_caught():
    """Ours: True = may attend. nn.MultiheadAttention's bool masks: True = IGNORE."""
    theirs, ours = _pair()
    x = torch.randn(2, 6, 32, generator=_gen(3))
    ours_mask = causal_mask(6)
    theirs_mask = to_torch_mha_mask(ours_mask)
    assert torch.equal(theirs_mask, ~ours_mask) and theirs_mask[0, 1].item() and not theirs_mask[1, 0].item()
    ref, _ = theirs(x, x, x, attn_mask=theirs_mask)
    torch.testing.assert_close(ours(x, attn_mask=ours_mask), ref, **TOL)
    # the trap: our mask handed to torch unconverted masks the past and keeps the future
    wrong, _ = theirs(x, x, x, attn_mask=ours_mask)
    assert not torch.allclose(wrong, ref, atol=1e-3)
    assert torch.isnan(wrong[:, -1]).all()  # the last query may "attend" to nothing: torch gives NaN there


def test_additive_float_mask_equals_boolean_mask():
    _, ours = _pair()
    x = torch.randn(2, 6, 32, generator=_gen(4))
    mask = combine_masks(padding_mask([6, 4], 6), causal_mask(6))
    additive = course_lib.masks.to_additive_mask(mask)
    torch.testing.assert_close(ours(x, attn_mask=additive), ours(x, attn_mask=mask), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- causal: the past never sees the future
@given(T=st.integers(2, 12), t=st.integers(0, 10), seed=st.integers(0, 2**16), need_weights=st.booleans())
def test_perturbing_the_future_leaves_the_past_unchanged(T, t, seed, need_weights):
    t = t % (T - 1)  # a position with at least one future token
    torch.manual_seed(seed)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, T, 16)
    x_perturbed = x.clone()
    x_perturbed[:, t + 1:] += 10 * torch.randn(2, T - t - 1, 16)
    with torch.no_grad():
        a = mha(x, is_causal=True, need_weights=need_weights)
        b = mha(x_perturbed, is_causal=True, need_weights=need_weights)
    a, b = (a[0], b[0]) if need_weights else (a, b)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-3)  # the future itself did change


def test_causal_gradient_of_the_past_wrt_the_future_is_exactly_zero():
    mha = MultiHeadAttention(16, 4, dtype=torch.float64)
    x = torch.randn(1, 7, 16, dtype=torch.float64, requires_grad=True)
    out = mha(x, is_causal=True)
    out[:, :4].sum().backward()
    assert (x.grad[:, 4:] == 0).all() and (x.grad[:, :4] != 0).any()


# ----------------------------------------------------------------------------- fully masked rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("additive", [False, True])
def test_fully_masked_query_row_gives_zero_output_and_zero_weights(dtype, need_weights, additive):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, bias=False, dtype=dtype)
    x = torch.randn(2, 5, 32, dtype=dtype, requires_grad=True)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[0, 0, 3] = False  # query 3 of sequence 0 may attend to nothing
    if additive:
        mask = course_lib.masks.to_additive_mask(mask, dtype)
    result = mha(x, attn_mask=mask, need_weights=need_weights)
    out = result[0] if need_weights else result
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out[0, 3] == 0).all()  # no bias: attention output 0 stays 0 through W_O
    assert (out[0, 2] != 0).any()
    if need_weights:
        assert (result[1][0, :, 3] == 0).all() and torch.isfinite(result[1]).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in mha.parameters())


def test_fully_masked_row_with_bias_returns_exactly_the_output_bias():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4)
    x = torch.randn(1, 4, 32)
    mask = torch.tensor([True, True, False, False])[None, None, None, :].expand(1, 1, 4, 4).clone()
    mask[0, 0, 1] = False
    out = mha(x, attn_mask=mask)
    torch.testing.assert_close(out[0, 1], mha.out_proj.bias, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masking_in_half_precision_with_large_scores_stays_finite(dtype):
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 2, dtype=dtype)
    with torch.no_grad():
        mha.q_proj.weight.mul_(40)  # scores far beyond float16's max of 65504 before scaling
        mha.k_proj.weight.mul_(40)
    x = torch.randn(2, 8, 64, dtype=dtype)
    mask = combine_masks(padding_mask([8, 3], 8), causal_mask(8))
    for need_weights in (False, True):
        r = mha(x, attn_mask=mask, need_weights=need_weights)
        assert torch.isfinite(r[0] if need_weights else r).all()
        if need_weights:
            assert (r[1].masked_select(~mask.expand(2, 2, 8, 8)) == 0).all()


def test_no_large_negative_literal_is_used_as_a_mask_fill_value():
    """-1e9 rounds to -inf in float16 (max 65504) and is not 'minus infinity' in float32 either."""
    assert torch.tensor(-1e9, dtype=torch.float16).item() == float("-inf")
    root = Path(course_lib.__file__).parent
    for path in (root / name for name in ("mha.py", "masks.py", "attention.py", "kv_cache.py")):
        tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
        for prev, tok in zip(tokens, tokens[1:], strict=False):
            if tok.type == tokenize.NUMBER and prev.string == "-" and float(tok.string.replace("_", "")) >= 1e4:
                pytest.fail(f"{path.name}:{tok.start[0]} uses the literal -{tok.string} (as a mask fill value?)")


# ----------------------------------------------------------------------------- the two paths
def test_need_weights_returns_per_head_weights_and_the_fast_path_uses_fused_sdpa(monkeypatch):
    torch.manual_seed(0)
    mha = MultiHeadAttention(48, 6).eval()
    q, kv = torch.randn(2, 5, 48), torch.randn(2, 7, 48)
    mask = padding_mask([7, 4], 7)
    calls = []
    fused = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    fast = mha(q, kv, kv, attn_mask=mask)
    assert calls == [(2, 6, 5, 8)]  # one fused call for all B*H heads
    slow, weights = mha(q, kv, kv, attn_mask=mask, need_weights=True)
    assert len(calls) == 1  # the weights path does not use the fused kernel
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    assert weights.shape == (2, 6, 5, 7) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 6, 5))
    assert (weights[1, :, :, 4:] == 0).all()


def test_loop_over_heads_equals_the_batched_module():
    torch.manual_seed(0)
    mha = MultiHeadAttention(24, 3, dtype=torch.float64)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    q, k, v = mha.q_proj(x), mha.k_proj(x), mha.v_proj(x)
    heads = []
    for h in range(3):
        cols = slice(8 * h, 8 * (h + 1))
        w = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / 8**0.5, dim=-1)  # (B, T, T)
        heads.append(w @ v[..., cols])  # (B, T, d_head)
    expected = mha.out_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(mha(x), expected, atol=1e-12, rtol=0)


def test_split_and_merge_heads_are_inverse_views():
    x = torch.arange(2 * 3 * 12.0).view(2, 3, 12)
    heads = split_heads(x, 4)
    assert heads.shape == (2, 4, 3, 3) and heads.data_ptr() == x.data_ptr()
    assert torch.equal(heads[1, 2, 0], x[1, 0, 6:9])  # head 2 holds features 6..8
    assert torch.equal(merge_heads(heads), x)
    with pytest.raises(ValueError, match="divisible by num_heads=5"):
        split_heads(x, 5)


def test_gradcheck_float64_both_paths_with_a_mask():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, dtype=torch.float64)
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    mask = combine_masks(padding_mask([4, 3], 4), causal_mask(4))
    assert torch.autograd.gradcheck(lambda t: mha(t, attn_mask=mask), (x,))
    assert torch.autograd.gradcheck(lambda t: mha(t, attn_mask=mask, need_weights=True)[0], (x,))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, dropout=0.5)
    x = torch.randn(2, 6, 16)
    assert not torch.allclose(mha(x), mha(x))
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x), atol=0, rtol=0)


def test_autocast_bfloat16_on_cpu_runs_with_float32_weights():
    mha = MultiHeadAttention(16, 2)
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mha(x, is_causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), mha(x, is_causal=True), atol=5e-2, rtol=5e-2)


# ----------------------------------------------------------------------------- KV cache
def test_incremental_decoding_with_a_cache_equals_full_causal_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 7, 16)
    full = mha(x, is_causal=True)
    cache = KVCache()
    steps = [mha(x[:, :3], is_causal=True, cache=cache)]  # prefill 3 tokens
    for t in range(3, 7):
        steps.append(mha(x[:, t:t + 1], is_causal=True, cache=cache))
    assert len(cache) == 7
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=1e-5)


def test_static_cache_for_cross_attention_is_projected_once():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, kdim=10, vdim=10).eval()
    memory, q = torch.randn(2, 5, 10), torch.randn(2, 3, 16)
    cache = KVCache(static=True)
    first = mha(q, memory, memory, cache=cache)
    calls = []
    hook = mha.k_proj.register_forward_hook(lambda *args: calls.append(1))
    second = mha(q, memory, memory, cache=cache)  # the same memory: read from the cache, not projected again
    hook.remove()
    assert calls == []
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    torch.testing.assert_close(first, mha(q, memory, memory), atol=1e-6, rtol=0)


@pytest.mark.parametrize("other", ["same_length", "other_length"])
def test_a_filled_static_cache_refuses_another_memory(other):
    mha = MultiHeadAttention(16, 4).eval()
    memory, q = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    cache = KVCache(static=True)
    mha(q, memory, memory, cache=cache)
    new_memory = memory + 1 if other == "same_length" else torch.randn(2, 7, 16)
    with pytest.raises(ValueError, match="filled from another memory"):
        mha(q, new_memory, new_memory, cache=cache)
    assert cache.source is memory and len(cache) == 5


def test_a_static_cache_is_refused_for_self_attention():
    with pytest.raises(ValueError, match="static KVCache holds cross-attention memory"):
        MultiHeadAttention(16, 4)(torch.randn(1, 3, 16), cache=KVCache(static=True))


def test_a_failed_decoding_step_leaves_the_cache_as_it_was():
    mha = MultiHeadAttention(16, 4).eval()
    cache = KVCache()
    mha(torch.randn(1, 3, 16), is_causal=True, cache=cache)
    key, value = cache.key, cache.value
    with pytest.raises(TypeError, match="fill and extend a cache in one dtype"), torch.autocast("cpu", torch.bfloat16):
        mha(torch.randn(1, 1, 16), is_causal=True, cache=cache)  # autocast after a float32 prefill
    assert cache.key is key and cache.value is value


def test_a_bad_mask_is_refused_before_the_cache_is_touched():
    mha = MultiHeadAttention(16, 4)
    cache = KVCache()
    mha(torch.randn(1, 3, 16), is_causal=True, cache=cache)
    with pytest.raises(ValueError, match="attn_mask"):
        mha(torch.randn(1, 1, 16), attn_mask=torch.ones(1, 3, dtype=torch.bool), cache=cache)  # needs S = 4
    assert len(cache) == 3


# ----------------------------------------------------------------------------- bad input, before any arithmetic
def _mha():
    torch.manual_seed(0)
    return MultiHeadAttention(16, 4, kdim=8, vdim=12)


x16, k8, v12 = torch.randn(2, 5, 16), torch.randn(2, 6, 8), torch.randn(2, 6, 12)
BAD = {
    "d_model_not_divisible": (lambda: MultiHeadAttention(10, 4), ValueError, "d_model=10, num_heads=4"),
    "num_heads_zero": (lambda: MultiHeadAttention(16, 0), ValueError, "num_heads must be a positive int"),
    "dropout_out_of_range": (lambda: MultiHeadAttention(16, 4, dropout=1.5), ValueError, "dropout"),
    "query_last_dim": (lambda: _mha()(torch.randn(2, 5, 15), k8, v12), ValueError, "query must have shape (B, L, 16)"),
    "key_last_dim": (lambda: _mha()(x16, torch.randn(2, 6, 16), v12), ValueError, "key must have shape (B, L, 8)"),
    "value_last_dim": (lambda: _mha()(x16, k8, torch.randn(2, 6, 8)), ValueError, "value must have shape (B, L, 12)"),
    "query_2d": (lambda: MultiHeadAttention(16, 4)(torch.randn(5, 16)), ValueError, "got (5, 16)"),
    "batch_mismatch": (lambda: _mha()(x16, torch.randn(3, 6, 8), torch.randn(3, 6, 12)), ValueError, "batch size"),
    "key_value_length": (lambda: _mha()(x16, k8, torch.randn(2, 4, 12)), ValueError, "same length S"),
    "not_a_tensor": (lambda: MultiHeadAttention(16, 4)(x16.numpy()), TypeError, "query must be a torch.Tensor"),
    "mask_cannot_broadcast": (lambda: _mha()(x16, k8, v12, attn_mask=torch.ones(5, 5, dtype=torch.bool)),
                              ValueError, "cannot broadcast to the attention scores of shape (2, 4, 5, 6)"),
    "mask_batch_wrong": (lambda: _mha()(x16, k8, v12, attn_mask=torch.ones(3, 1, 1, 6, dtype=torch.bool)),
                         ValueError, "(3, 1, 1, 6) cannot broadcast"),
    "mask_3d_ambiguous": (lambda: _mha()(x16, k8, v12, attn_mask=torch.ones(2, 5, 6, dtype=torch.bool)),
                          ValueError, "3-D mask is ambiguous"),
    "mask_int_dtype": (lambda: _mha()(x16, k8, v12, attn_mask=torch.ones(5, 6, dtype=torch.long)),
                       TypeError, "mask.bool()"),
    "mask_with_nan": (lambda: _mha()(x16, k8, v12, attn_mask=torch.tensor(float("nan")).expand(5, 6)),
                      ValueError, "contains NaN"),
    "mask_not_tensor": (lambda: _mha()(x16, k8, v12, attn_mask=[[True]]), TypeError, "attn_mask must be a torch"),
    "is_causal_non_square": (lambda: _mha()(x16, k8, v12, is_causal=True), ValueError, "is ambiguous"),
    "is_causal_not_bool": (lambda: MultiHeadAttention(16, 4)(x16, is_causal="yes"), TypeError, "is_causal must be"),
    "dtype_mismatch": (lambda: MultiHeadAttention(16, 4)(x16.double()), TypeError,
                       "query has dtype torch.float64 but the module's weights are torch.float32"),
    "device_mismatch": (lambda: MultiHeadAttention(16, 4)(x16.to("meta")), ValueError,
                        "query is on meta but the module's weights are on cpu"),
    "mask_device_mismatch": (lambda: MultiHeadAttention(16, 4)(x16, attn_mask=torch.ones(5, 5, dtype=torch.bool,
                                                                                         device="meta")),
                             ValueError, "attn_mask is on meta"),
    "cache_wrong_batch": (lambda: MultiHeadAttention(16, 4)(x16, cache=KVCache(torch.zeros(3, 4, 2, 4),
                                                                                torch.zeros(3, 4, 2, 4))),
                          ValueError, "cache holds keys (3, 4, 2, 4)"),
    "from_torch_wrong_type": (lambda: MultiHeadAttention.from_torch(nn.Linear(4, 4)), TypeError, "MultiheadAttention"),
    "from_hf_bert_wrong_type": (lambda: MultiHeadAttention.from_hf_bert(nn.Linear(4, 4)), TypeError, "BertAttention"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_a_clear_error_before_any_arithmetic(name, monkeypatch):
    make_call, error, words = BAD[name]

    def no_arithmetic(*args, **kwargs):
        raise AssertionError("a projection ran before the input was checked")

    monkeypatch.setattr(F, "linear", no_arithmetic)
    monkeypatch.setattr(F, "scaled_dot_product_attention", no_arithmetic)
    with pytest.raises(error) as info:
        make_call()
    assert words in str(info.value), str(info.value)


# ----------------------------------------------------------------------------- a module made of its projections
def _reference_forward(mha, x):
    """Multi-head self-attention written out from the projection modules."""
    q, k, v = (split_heads(proj(x), mha.num_heads) for proj in (mha.q_proj, mha.k_proj, mha.v_proj))
    return mha.out_proj(merge_heads(torch.nn.functional.scaled_dot_product_attention(q, k, v)))


def test_an_in_place_change_to_a_projection_is_seen_at_once():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = mha(x)
        mha.q_proj.weight.data.mul_(0)  # no weight stack can go stale
        after = mha(x)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, _reference_forward(mha, x), atol=1e-6)


def test_hooks_and_linear_subclasses_on_the_projections_run_in_self_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    calls = []
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        getattr(mha, name).register_forward_hook(lambda mod, args, out, name=name: calls.append(name))
    mha(torch.randn(1, 3, 16))
    assert calls == ["q_proj", "k_proj", "v_proj", "out_proj"]


def test_prune_weight_norm_and_functional_call_work_on_the_projections():
    import torch.nn.utils.prune

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for pruned, normed in (("q_proj", "v_proj"), ("k_proj", "q_proj")):
        mha = MultiHeadAttention(16, 4).eval()
        torch.nn.utils.prune.l1_unstructured(getattr(mha, pruned), "weight", amount=0.5)
        torch.nn.utils.parametrizations.weight_norm(getattr(mha, normed))
        with torch.no_grad():
            assert torch.allclose(mha(x), _reference_forward(mha, x), atol=1e-6)
    plain = MultiHeadAttention(16, 4).eval()
    params = {name: torch.zeros_like(p) for name, p in plain.named_parameters()}
    batched = torch.func.vmap(lambda xi: torch.func.functional_call(plain, params, (xi[None],)))(x)
    assert torch.equal(batched, torch.zeros(2, 1, 5, 16))  # every weight and bias zero: output zero


# ----------------------------------------------------------------------------- one route for the mask
def _count_mask_work(monkeypatch) -> dict[str, int]:
    """Count mask validations, causal folds and NaN scans (a host sync on a GPU) made by one call."""
    import course_lib._mha_checks as checks_module
    import course_lib.attention as attention_module
    import course_lib.masks as masks_module
    import course_lib.mha as mha_module

    counts = {"check_attn_mask": 0, "with_causal": 0, "isnan": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    check, fold, isnan = attention_module.check_attn_mask, masks_module.with_causal, torch.isnan
    for module in (attention_module, mha_module, checks_module):
        monkeypatch.setattr(module, "check_attn_mask", counting("check_attn_mask", check), raising=False)
    for module in (masks_module, attention_module, mha_module):
        monkeypatch.setattr(module, "with_causal", counting("with_causal", fold), raising=False)
    monkeypatch.setattr(torch, "isnan", counting("isnan", isnan))
    return counts


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("additive", [False, True])
def test_mask_is_validated_and_causal_folded_once_per_call(monkeypatch, need_weights, additive):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    mask = course_lib.masks.padding_mask([5, 3], 5)
    if additive:
        mask = course_lib.masks.to_additive_mask(mask)
    counts = _count_mask_work(monkeypatch)
    mha(x, attn_mask=mask, is_causal=True, need_weights=need_weights)
    assert counts == {"check_attn_mask": 1, "with_causal": 1, "isnan": int(additive)}

    cache = KVCache()
    mha(x[:, :3], cache=cache, is_causal=True)
    counts.update(dict.fromkeys(counts, 0))
    mha(x[:, 3:], attn_mask=mask[..., :5], cache=cache, is_causal=True, need_weights=need_weights)  # T=2, S=5
    assert counts == {"check_attn_mask": 1, "with_causal": 1, "isnan": int(additive)}


def test_functional_attention_validates_the_mask_once(monkeypatch):
    from course_lib.attention import scaled_dot_product_attention

    q = torch.randn(2, 4, 5, 8)
    mask = course_lib.masks.to_additive_mask(course_lib.masks.padding_mask([5, 3], 5))
    counts = _count_mask_work(monkeypatch)
    scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=True)
    assert counts == {"check_attn_mask": 1, "with_causal": 1, "isnan": 1}

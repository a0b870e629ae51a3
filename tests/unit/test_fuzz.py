"""Property-based fuzzing of the public entry points (hypothesis).

For any input a call either returns a result that meets the contract (finite where the inputs
are, the same on every path and against the numpy reference, 0 for a row with nothing to
attend to) or raises ValueError/TypeError whose message names the argument; a call that fails
leaves every cache and module exactly as it was.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from course_lib import KVCache, MultiHeadAttention, masks
from course_lib import numpy_ref as nr
from course_lib.attention import scaled_dot_product_attention as sdpa

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLEAN_ERRORS = (ValueError, TypeError)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _refuses_cleanly(call, *names: str) -> bool:
    """True if the call raised ValueError/TypeError naming one of `names`; False if it returned."""
    try:
        call()
    except CLEAN_ERRORS as e:
        assert any(n in str(e) for n in names), f"{type(e).__name__} names none of {names}: {e}"
        return True
    return False


@st.composite
def attention_problems(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    T, S = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    d, d_v = draw(st.integers(1, 8)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, m, generator=g, dtype=torch.float64) for n, m in ((T, d), (S, d), (S, d_v)))
    kind = draw(st.sampled_from(["none", "bool", "additive", "padding"]))
    mask = None
    if kind == "bool":
        mask = torch.rand(B, 1, T, S, generator=g) < 0.6
    elif kind == "additive":
        mask = torch.where(torch.rand(T, S, generator=g) < 0.6, torch.randn(T, S, generator=g), float("-inf"))
    elif kind == "padding" and S:
        mask = masks.padding_mask(torch.randint(0, S + 1, (B,), generator=g), S)
    return q, k, v, mask, draw(st.booleans()), dtype


@FUZZ
@given(problem=attention_problems())
def test_attention_paths_agree_with_the_numpy_reference(problem):
    q, k, v, mask, is_causal, dtype = problem
    T, S = q.shape[-2], k.shape[-2]
    cast = [t.to(dtype) for t in (q, k, v)]
    mask_c = None if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    mask_c = mask if mask_c is None else mask_c
    if is_causal and T != S:
        assert _refuses_cleanly(lambda: sdpa(*cast, attn_mask=mask_c, is_causal=True), "is_causal")
        return
    full = None if mask is None else mask_c
    if is_causal and T:  # T = S = 0: nothing to mask
        full = masks.with_causal(full, T, S)
    ref, _ = nr.scaled_dot_product_attention(*(t.double().numpy() for t in cast),
                                             None if full is None else full.to(torch.float64 if full.dtype != torch.bool
                                                                                   else torch.bool).numpy())
    fused = sdpa(*cast, attn_mask=mask_c, is_causal=is_causal)
    weighted, weights = sdpa(*cast, attn_mask=mask_c, is_causal=is_causal, need_weights=True)
    for out in (fused, weighted):
        assert out.dtype == dtype and out.shape == ref.shape
        assert torch.isfinite(out).all()
        scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
        assert float((out.double() - torch.from_numpy(ref)).abs().max() if ref.size else 0) <= TOL[dtype] * scale
    if full is not None and S:
        nothing = ~(full if full.dtype == torch.bool else torch.isfinite(full)).any(-1)  # rows with no key
        nothing = nothing.expand(ref.shape[:-1])
        assert (fused[nothing] == 0).all() and (weights[nothing.expand(weights.shape[:-1])] == 0).all()


@FUZZ
@given(x=st.one_of(st.none(), st.integers(-2, 4), st.floats(-1, 4), st.text(max_size=2),
                   st.sampled_from([np.int64(3), np.int32(0), True, 2.0])),
       s=st.one_of(st.none(), st.integers(-1, 4), st.sampled_from([np.int64(2), False])))
def test_masks_either_build_or_refuse_naming_the_argument(x, s):
    try:
        m = masks.causal_mask(x, s)
    except CLEAN_ERRORS as e:
        assert "T must" in str(e) or "S must" in str(e)
    else:
        assert m.dtype == torch.bool and m.shape == (int(x), int(x) if s is None else int(s))
    lengths = [x] if not isinstance(x, str) else x
    if not _refuses_cleanly(lambda: masks.padding_mask(lengths, 4 if s is None else s), "lengths", "max_len"):
        assert masks.padding_mask(lengths, 4 if s is None else s).dtype == torch.bool


@st.composite
def module_calls(draw):
    H = draw(st.integers(1, 3))
    d_model = H * draw(st.integers(1, 3))
    B, T = draw(st.integers(1, 2)), draw(st.integers(0, 4))
    bad = draw(st.sampled_from(["none", "shape", "dtype", "mask_shape", "mask_dtype", "mask_3d", "flag", "cache_B"]))
    return H, d_model, B, T, bad, draw(st.integers(0, 2**16))


@FUZZ
@given(case=module_calls())
def test_a_failed_module_call_changes_neither_the_module_nor_the_cache(case):
    H, d_model, B, T, bad, seed = case
    torch.manual_seed(seed)
    mha = MultiHeadAttention(d_model, H).eval()
    cache = KVCache()
    mha(torch.randn(B, 2, d_model), cache=cache, is_causal=True)  # a filled cache of length 2
    state = {k: v.clone() for k, v in mha.state_dict().items()}
    key, value = cache.key, cache.value
    x = torch.randn(B, T, d_model)
    kwargs: dict = {"cache": cache, "is_causal": True}
    if bad == "shape":
        x = torch.randn(B, T, d_model + 1)
    elif bad == "dtype":
        x = x.double()
    elif bad == "mask_shape":
        kwargs["attn_mask"] = torch.ones(T, T + 3, dtype=torch.bool)
    elif bad == "mask_dtype":
        kwargs["attn_mask"] = torch.ones(T, T + 2, dtype=torch.int64)
    elif bad == "mask_3d":
        kwargs["attn_mask"] = torch.ones(B, T, T + 2, dtype=torch.bool)
    elif bad == "flag":
        kwargs["need_weights"] = "yes"
    elif bad == "cache_B":
        x = torch.randn(B + 1, T, d_model)
    names = {"shape": "query", "dtype": "dtype", "mask_shape": "attn_mask", "mask_dtype": "attn_mask",
             "mask_3d": "attn_mask", "flag": "need_weights", "cache_B": "cache"}
    if bad == "none":
        out = mha(x, **kwargs)
        assert out.shape == (B, T, d_model) and torch.isfinite(out).all() and len(cache) == 2 + T
        return
    assert _refuses_cleanly(lambda: mha(x, **kwargs), names[bad])
    assert cache.key is key and cache.value is value
    assert all(torch.equal(v, state[k]) for k, v in mha.state_dict().items())


@FUZZ
@given(shapes=st.lists(st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(0, 3), st.integers(1, 3),
                                 st.integers(1, 3)), min_size=1, max_size=4))
def test_kv_cache_appends_or_refuses_without_a_half_update(shapes):
    cache = KVCache()
    length = 0
    for B, H, S_new, d_k, d_v in shapes:
        key, value = torch.randn(B, H, S_new, d_k), torch.randn(B, H, S_new, d_v)
        before = (cache.key, cache.value)
        try:
            cache.update(key, value)
        except CLEAN_ERRORS as e:
            assert "key" in str(e) or "value" in str(e)
            assert (cache.key, cache.value) == before
        else:
            length += S_new
        assert len(cache) == length


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@FUZZ
@given(seed=st.integers(0, 2**16), T=st.integers(1, 5), S=st.integers(0, 5))
def test_numpy_reference_and_online_softmax_agree(dtype, seed, T, S):
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(T, 4)).astype(dtype), rng.normal(size=(S, 4)).astype(dtype), rng.normal(size=(S, 3))
    mask = rng.random((T, S)) < 0.5
    out, weights = nr.scaled_dot_product_attention(q, k, v, mask)
    assert out.dtype == np.float64 and np.isfinite(out).all()
    assert np.allclose(out[~mask.any(-1)], 0) and np.allclose(weights.sum(-1), mask.any(-1))
    assert np.allclose(nr.online_softmax_attention(q, k, v, mask, block_size=2), out, atol=1e-3)

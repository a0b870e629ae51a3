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
from course_lib.modern import DecoderAttention, MultiHeadLatentAttention
from course_lib.positional import RotaryEmbedding

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


# ----------------------------------------------------------------------------- today's attention (course_lib.modern)
MODERN_FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # the profile's 60 examples


def _chunks(draw, total: int) -> list[int]:
    """Random chunk sizes that add up to `total` (cut at random places); a chunk may be empty (a step with no
    new token)."""
    cuts = [0, *sorted(draw(st.lists(st.integers(0, total), max_size=6))), total]
    return [b - a for a, b in zip(cuts, cuts[1:], strict=False)]


@st.composite
def decoder_attention_setups(draw):
    H = draw(st.sampled_from([1, 2, 4]))
    H_kv = draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]))
    d_head = draw(st.sampled_from([2, 4]))
    window = draw(st.one_of(st.none(), st.integers(1, 6)))
    sink_tokens = 0 if window is None else draw(st.integers(0, 2))
    learned_sink, rotary = draw(st.booleans()), draw(st.booleans())
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**16))
    return H, H_kv, d_head, window, sink_tokens, learned_sink, rotary, B, T, _chunks(draw, T), seed


def _brute_force(module: MultiHeadAttention, x: torch.Tensor, window, sink_tokens: int) -> torch.Tensor:
    """Causal (windowed, with sinks and a learned sink) attention written out: every key of every query by hand."""
    B, T, _ = x.shape
    H, H_kv, d = module.num_heads, module.num_kv_heads, module.d_head
    q = module.q_proj(x).view(B, T, H, d).transpose(1, 2)
    k = module.k_proj(x).view(B, T, H_kv, d).transpose(1, 2)
    v = module.v_proj(x).view(B, T, H_kv, d).transpose(1, 2)
    if module.rotary is not None:
        q, k = module.rotary(q), module.rotary(k)
    k, v = k.repeat_interleave(H // H_kv, dim=1), v.repeat_interleave(H // H_kv, dim=1)  # kv head g -> h // (H/H_kv)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            allowed[i, j] = window is None or i - j < window or j < sink_tokens
    scores = (q @ k.transpose(-2, -1) / d**0.5).masked_fill(~allowed, float("-inf"))  # (B, H, T, T)
    sink = getattr(module, "sink_logits", None)
    if sink is not None:
        scores = torch.cat([scores, sink.view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)
    weights = torch.softmax(scores, dim=-1)[..., :T]  # the sink's column takes weight and gives nothing
    return module.out_proj((weights @ v).transpose(1, 2).reshape(B, T, H * d))


@MODERN_FUZZ
@given(setup=decoder_attention_setups())
def test_decoder_attention_cached_in_chunks_equals_one_pass_and_the_brute_force_mask(setup):
    H, H_kv, d_head, window, sink_tokens, learned_sink, rotary, B, T, chunks, seed = setup
    torch.manual_seed(seed)
    kwargs = {"num_kv_heads": H_kv, "rotary": RotaryEmbedding(d_head) if rotary else None, "dtype": torch.float64}
    if window is None and not learned_sink and seed % 2:
        module = MultiHeadAttention(H * d_head, H, **kwargs).eval()  # the spine's module, same contract
    else:
        module = DecoderAttention(H * d_head, H, window=window, sink_tokens=sink_tokens, learned_sink=learned_sink,
                                  **kwargs).eval()
        if learned_sink:
            with torch.no_grad():
                module.sink_logits.normal_(0.0, 2.0)
    x = torch.randn(B, T, H * d_head, dtype=torch.float64)
    with torch.no_grad():
        full = module(x, is_causal=True)
        torch.testing.assert_close(full, _brute_force(module, x, window, sink_tokens), rtol=1e-10, atol=1e-10)
        out, weights = module(x, is_causal=True, need_weights=True)
        torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)
        assert weights.shape == (B, H, T, T) and (weights.sum(-1) <= 1 + 1e-12).all()
        cache, steps, start = module.new_cache(), [], 0
        for n in chunks:
            steps.append(module(x[:, start:start + n], is_causal=True, cache=cache))
            start += n
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.next_position == T
    if window is not None:  # the cache keeps only what a next token can see
        assert len(cache) == min(T, sink_tokens + window)


@st.composite
def latent_attention_setups(draw):
    sizes = {"kv_rank": draw(st.integers(1, 6)), "d_nope": draw(st.integers(1, 4)),
             "d_rope": draw(st.sampled_from([2, 4])), "d_v": draw(st.integers(1, 4)),
             "q_rank": draw(st.one_of(st.none(), st.integers(1, 5))),
             "rope_interleaved": draw(st.booleans()), "bias": draw(st.booleans())}
    H, d_model = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, 9))
    return H, d_model, sizes, B, T, _chunks(draw, T), draw(st.booleans()), draw(st.integers(0, 2**16))


@MODERN_FUZZ
@given(setup=latent_attention_setups())
def test_latent_attention_absorbed_equals_plain_and_cached_chunks_equal_one_pass(setup):
    H, d_model, sizes, B, T, chunks, absorbed, seed = setup
    torch.manual_seed(seed)
    mla = MultiHeadLatentAttention(d_model, H, **sizes).double().eval()
    x = torch.randn(B, T, d_model, dtype=torch.float64)
    with torch.no_grad():
        full = mla(x)
        torch.testing.assert_close(mla(x, absorbed=True), full, rtol=1e-10, atol=1e-10)
        cache, steps, start = mla.new_cache(), [], 0
        for n in chunks:
            steps.append(mla(x[:, start:start + n], cache=cache, absorbed=absorbed))
            start += n
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.next_position == T and cache.latent.shape == (B, 1, T, sizes["kv_rank"])
    assert cache.rope_key.shape == (B, 1, T, sizes["d_rope"])

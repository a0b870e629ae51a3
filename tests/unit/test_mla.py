"""Multi-head latent attention: the absorbed decoding form equals the plain form; cached decoding equals one
pass; the cache holds only the latent and the rotary key; and both forms equal Hugging Face's DeepSeek-V3
attention (tiny random config, weights copied, float32, 1e-5) over several cached steps."""

import warnings

import numpy as np
import pytest
import torch
from helpers import assert_clear_error

from course_lib import KVCache
from course_lib.modern.mla import MultiHeadLatentAttention

warnings.filterwarnings("ignore")
CHUNKS = [5, 1, 2, 1, 1]


def _mla(q_rank=12, interleaved=True, seed=0):
    torch.manual_seed(seed)
    return MultiHeadLatentAttention(32, 4, kv_rank=16, d_nope=8, d_rope=4, d_v=6, q_rank=q_rank,
                                    rope_interleaved=interleaved).eval()


@pytest.mark.parametrize("q_rank", [None, 12])
def test_absorbed_equals_plain_and_cache_equals_one_pass(q_rank):
    mla = _mla(q_rank)
    x = torch.randn(2, sum(CHUNKS), 32, dtype=torch.float64)
    mla = mla.double()
    with torch.no_grad():
        full = mla(x)
        torch.testing.assert_close(mla(x, absorbed=True), full, rtol=0, atol=1e-12)
        for absorbed in (False, True):
            cache, outs, start = mla.new_cache(), [], 0
            for n in CHUNKS:
                outs.append(mla(x[:, start:start + n], cache=cache, absorbed=absorbed))
                start += n
            torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)
            assert cache.latent.shape == (2, 1, sum(CHUNKS), 16) and cache.rope_key.shape == (2, 1, sum(CHUNKS), 4)
    assert mla.cache_numbers_per_token() == 16 + 4


def test_positions_matter_and_causality_holds():
    mla = _mla()
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        out = mla(x)
        changed = x.clone()
        changed[:, 4:] += 1.0
        torch.testing.assert_close(mla(changed)[:, :4], out[:, :4])  # the future does not leak
        swapped = x[:, [1, 0, 2, 3, 4, 5]]
        assert not torch.allclose(mla(swapped)[:, 5], out[:, 5], atol=1e-4)  # RoPE sees the order


def test_bad_input_refused_and_cache_unchanged():
    mla = _mla()
    assert_clear_error(lambda: mla(torch.randn(1, 3, 16)), ValueError, ["d_model=32"])
    assert_clear_error(lambda: MultiHeadLatentAttention(32, 4, kv_rank=0, d_nope=8, d_rope=4, d_v=6),
                       ValueError, ["kv_rank"])
    assert_clear_error(lambda: mla(torch.randn(1, 3, 32), cache=KVCache()), TypeError, ["LatentCache", "KVCache"])
    cache = mla.new_cache()
    with torch.no_grad():
        mla(torch.randn(1, 3, 32), cache=cache)
    before = cache.latent
    assert_clear_error(lambda: mla(torch.randn(2, 1, 32), cache=cache), ValueError, ["B=2"])
    assert cache.latent is before and cache.next_position == 3


def test_arguments_are_refused_by_their_own_names():
    sizes = {"kv_rank": 16, "d_nope": 8, "d_rope": 4, "d_v": 6}
    # an odd rotary part: the message names d_rope, not RotaryEmbedding's d_head
    for d_rope in (3, 5, np.int64(7)):
        with pytest.raises(ValueError, match=r"^d_rope must be even") as info:
            MultiHeadLatentAttention(32, 4, **{**sizes, "d_rope": d_rope})
        assert "d_head" not in str(info.value)
    assert_clear_error(lambda: MultiHeadLatentAttention(32, 4, **sizes, rope_base=1.0), ValueError, ["rope_base"])
    assert_clear_error(lambda: MultiHeadLatentAttention(32, 4, **sizes, rope_base="1e4"), TypeError, ["rope_base"])
    assert_clear_error(lambda: MultiHeadLatentAttention(32, 4, **sizes, rope_interleaved=1), TypeError,
                       ["rope_interleaved"])
    assert_clear_error(lambda: MultiHeadLatentAttention(32, 4, **sizes, q_rank=2.0), TypeError, ["q_rank"])


def test_numpy_sizes_build_the_same_module():
    torch.manual_seed(0)
    ours = MultiHeadLatentAttention(np.int64(32), np.int32(4), kv_rank=np.int64(16), d_nope=np.int16(8),
                                    d_rope=np.int64(4), d_v=np.uint8(6), q_rank=np.int64(12),
                                    rope_base=np.float32(10000.0)).eval()
    assert all(type(getattr(ours, n)) is int for n in ("d_model", "num_heads", "kv_rank", "q_rank", "d_nope",
                                                        "d_rope", "d_v"))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), _mla(12, seed=0)(x), rtol=0, atol=0)


@pytest.mark.parametrize("absorbed", [False, True])
@pytest.mark.parametrize("q_rank", [None, 12])
def test_a_step_without_tokens_returns_nothing_and_leaves_the_cache_as_it_was(absorbed, q_rank):
    mla = _mla(q_rank)
    empty = torch.randn(2, 0, 32)
    cache = mla.new_cache()
    with torch.no_grad():
        assert mla(empty, cache=cache, absorbed=absorbed).shape == (2, 0, 32)  # like MultiHeadAttention
        assert cache.latent is None and cache.rope_key is None and cache.next_position == 0  # still empty
        x = torch.randn(2, 3, 32)
        first = mla(x, cache=cache, absorbed=absorbed)
        latent, rope_key = cache.latent, cache.rope_key
        out = mla(empty, cache=cache, absorbed=absorbed)
        assert out.shape == (2, 0, 32) and out.dtype == x.dtype
        assert cache.latent is latent and cache.rope_key is rope_key and cache.next_position == 3
        # decoding goes on from position 3 as if the empty step had not happened
        nxt = torch.randn(2, 2, 32)
        torch.testing.assert_close(torch.cat([first, mla(nxt, cache=cache, absorbed=absorbed)], 1),
                                   mla(torch.cat([x, nxt], 1)), atol=1e-5, rtol=1e-5)
        assert mla(empty, absorbed=absorbed).shape == (2, 0, 32)  # no cache either


def _hf_deepseek(rope_scaling=None, *, q_rank=12, interleave=True, max_position_embeddings=8, d_rope=8,
                 rope_theta=100.0, chunks=None):
    """A one-layer Hugging Face DeepSeek-V3 (random weights, made larger so positions matter), its attention, and
    (input, output) of every call as `chunks` of tokens (default LONG_CHUNKS) go through its cache. The defaults
    (rope_theta 100, d_rope 8) make the rotary pairs span fast to slow over 8 positions, for rope_scaling."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=q_rank,
        qk_nope_head_dim=8, qk_rope_head_dim=d_rope, v_head_dim=6, num_hidden_layers=1, first_k_dense_replace=1,
        intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        n_group=1, topk_group=1, vocab_size=50, max_position_embeddings=max_position_embeddings,
        rope_interleave=interleave, attn_implementation="eager",
        **({} if rope_theta is None else {"rope_theta": rope_theta}),
        **({} if rope_scaling is None else {"rope_scaling": rope_scaling}))
    model = transformers.DeepseekV3Model(cfg).eval()
    attn = model.layers[0].self_attn
    with torch.no_grad():
        q_proj = getattr(attn, "q_proj", None) or attn.q_b_proj  # 5.15 has no q_proj when q_lora_rank is set
        for lin in (attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj, q_proj):
            lin.weight.normal_(0.0, 0.3)  # HF's std 0.02 gives near-uniform attention; make positions matter
    seen = []
    hook = attn.register_forward_hook(lambda m, a, kw, out: seen.append((kw["hidden_states"], out[0])),
                                      with_kwargs=True)
    chunks = LONG_CHUNKS if chunks is None else chunks
    ids = torch.randint(0, 50, (2, sum(chunks)), generator=torch.Generator().manual_seed(1))
    hf_cache, start = transformers.DynamicCache(config=cfg), 0
    with torch.no_grad():
        for n in chunks:
            model(input_ids=ids[:, start:start + n], past_key_values=hf_cache, use_cache=True)
            start += n
    hook.remove()
    return attn, seen


@pytest.mark.parametrize("q_rank", [None, 12])
@pytest.mark.parametrize("interleave", [True, False])
def test_equals_hugging_face_deepseek_v3(q_rank, interleave):
    attn, seen = _hf_deepseek(q_rank=q_rank, interleave=interleave, max_position_embeddings=64, d_rope=4,
                              rope_theta=None, chunks=CHUNKS)
    ours = MultiHeadLatentAttention.from_hf_deepseek_v3(attn).eval()
    for absorbed in (False, True):
        cache = ours.new_cache()
        with torch.no_grad():
            for x, ref in seen:
                torch.testing.assert_close(ours(x, cache=cache, absorbed=absorbed), ref, atol=1e-5, rtol=1e-5)
    wrong = MultiHeadLatentAttention.from_hf_deepseek_v3(attn).eval()
    wrong.rotary.interleaved = not interleave  # the other pairing is a different function
    with torch.no_grad():
        assert not torch.allclose(wrong(seen[0][0]), seen[0][1], atol=1e-4)


# ------------------------------------------------------------------ long-context RoPE scaling (DeepSeek-V3: YaRN)
LONG_CHUNKS = [12, 1, 3, 1, 5]  # prefill, then cached steps past original_max_position_embeddings = 8
DEEPSEEK_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 8, "beta_fast": 32,
                 "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # DeepSeek-V3's, but L = 8 (not 4096)
SCALINGS = {
    "deepseek_v3_yarn": DEEPSEEK_YARN,
    "yarn_mscale_ratio": {**DEEPSEEK_YARN, "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.5},
    "yarn_plain": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 8, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
}


def _max_error(ours, seen, absorbed=False):
    cache = ours.new_cache()
    with torch.no_grad():
        return max(float((ours(x, cache=cache, absorbed=absorbed) - ref).abs().max()) for x, ref in seen)


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("q_rank,interleave", [(12, True), (None, False)])
def test_scaled_rope_equals_hugging_face_deepseek_v3(name, q_rank, interleave):
    """Prefill of 12 tokens and cached steps to 22, with original_max_position_embeddings 8, in float32."""
    attn, seen = _hf_deepseek(SCALINGS[name], q_rank=q_rank, interleave=interleave)
    ours = MultiHeadLatentAttention.from_hf_deepseek_v3(attn).eval()
    assert ours.rotary.scaling["rope_type"] == SCALINGS[name]["rope_type"]
    for absorbed in (False, True):
        assert _max_error(ours, seen, absorbed) < 1e-5
    unscaled = MultiHeadLatentAttention.from_hf_deepseek_v3(attn).eval()
    unscaled.rotary.scaling, unscaled.score_multiplier = None, 1.0  # plain RoPE, plain softmax scale
    assert _max_error(unscaled, seen) > 1e-3  # the comparison can fail


def test_deepseek_mscale_all_dim_changes_the_softmax_scale():
    """DeepSeek-V3's YaRN (mscale = mscale_all_dim = 1): cos and sin keep factor 1, and the scores are multiplied
    by (0.1 ln 40 + 1)^2; a copy that ignores it, or that puts it into cos and sin instead, is caught."""
    attn, seen = _hf_deepseek(DEEPSEEK_YARN)
    ours = MultiHeadLatentAttention.from_hf_deepseek_v3(attn).eval()
    m = 0.1 * np.log(40.0) + 1.0
    assert abs(ours.score_multiplier - m * m) < 1e-12
    assert abs(attn.scaling - ours.score_multiplier / (8 + 8) ** 0.5) < 1e-12  # HF's softmax scale
    assert _max_error(ours, seen) < 1e-5
    ignored = MultiHeadLatentAttention.from_hf_deepseek_v3(attn).eval()
    ignored.score_multiplier = 1.0  # mscale_all_dim ignored
    assert _max_error(ignored, seen) > 1e-3
    plain_yarn = MultiHeadLatentAttention.from_hf_deepseek_v3(attn).eval()
    plain_yarn.rotary.scaling = {k: v for k, v in plain_yarn.rotary.scaling.items()
                                 if k not in ("mscale", "mscale_all_dim")}  # cos, sin x (0.1 ln 40 + 1): YaRN's own
    plain_yarn.score_multiplier = 1.0
    assert _max_error(plain_yarn, seen) > 1e-3  # same q.k_rope part, but the no-position part is not scaled


def test_yarn_mscale_is_checked_and_follows_the_paper():
    from course_lib.positional import yarn_mscale
    assert yarn_mscale(1.0) == 1.0 and yarn_mscale(0.5) == 1.0
    assert abs(yarn_mscale(40.0) - (0.1 * np.log(40.0) + 1)) < 1e-15
    assert abs(yarn_mscale(40.0, 0.5) - (0.05 * np.log(40.0) + 1)) < 1e-15
    assert_clear_error(lambda: yarn_mscale(0.0), ValueError, ["factor"])
    assert_clear_error(lambda: yarn_mscale(2.0, "1"), TypeError, ["mscale"])


def test_unsupported_rope_parameters_are_refused_by_name():
    attn, _ = _hf_deepseek(DEEPSEEK_YARN)
    attn.config.rope_parameters = {**attn.config.rope_parameters, "rope_type": "longrope"}
    assert_clear_error(lambda: MultiHeadLatentAttention.from_hf_deepseek_v3(attn), ValueError,
                       ["rope_type", "longrope", "yarn"])
    attn.config.rope_parameters = {**DEEPSEEK_YARN, "rope_theta": 100.0, "partial_rotary_factor": 0.5}
    assert_clear_error(lambda: MultiHeadLatentAttention.from_hf_deepseek_v3(attn), ValueError,
                       ["partial_rotary_factor", "0.5"])
    sizes = {"kv_rank": 16, "d_nope": 8, "d_rope": 4, "d_v": 6}
    assert_clear_error(lambda: MultiHeadLatentAttention(32, 4, **sizes, rope_scaling={"rope_type": "yarn"}),
                       ValueError, ["rope_scaling", "factor"])
    assert_clear_error(lambda: MultiHeadLatentAttention(32, 4, **sizes, rope_scaling=4.0), TypeError,
                       ["rope_scaling"])

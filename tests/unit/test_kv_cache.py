"""KV-cache decoding, token by token, gives the logits of full recomputation at every step
(float32, 1e-5), for batches whose sources have different lengths (padding)."""

import pytest
import torch

from course_lib.blocks import DecoderLayer
from course_lib.kv_cache import KVCache
from course_lib.masks import padding_mask
from course_lib.mha import MultiHeadAttention
from course_lib.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

SRC_LENGTHS = [7, 4, 2]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    config = Seq2SeqConfig(src_vocab_size=20, tgt_vocab_size=25, d_model=32, num_heads=4, d_ff=64,
                           num_encoder_layers=2, num_decoder_layers=2, max_len=32, **kw)
    return Seq2SeqTransformer(config).eval()


def _batch(seed=0, T=9):
    g = torch.Generator().manual_seed(seed)
    B, S = len(SRC_LENGTHS), max(SRC_LENGTHS)
    src = torch.randint(4, 20, (B, S), generator=g)
    for b, n in enumerate(SRC_LENGTHS):
        src[b, n:] = 0  # <pad>
    tgt = torch.randint(3, 25, (B, T), generator=g)
    tgt[:, 0] = 1  # <bos>
    return src, tgt


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_cached_logits_equal_full_recomputation_at_every_step(positional, norm_first):
    model = _model(positional=positional, norm_first=norm_first)
    src, tgt = _batch()
    with torch.no_grad():
        memory, memory_mask = model.encode(src)
        full = model.decode(tgt, memory, memory_mask)  # (B, T, V), one causal pass
        caches = model.new_caches()
        for t in range(tgt.shape[1]):
            step = model.decode(tgt[:, t: t + 1], memory, memory_mask, caches=caches)  # (B, 1, V)
            recomputed = model.decode(tgt[:, : t + 1], memory, memory_mask)[:, -1]  # prefix from scratch
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=0)
            torch.testing.assert_close(step[:, 0], recomputed, atol=1e-5, rtol=0)
            assert len(caches[0][0]) == t + 1 and len(caches[0][1]) == src.shape[1]


def test_padding_in_the_batch_does_not_change_any_sequence():
    model = _model()
    src, tgt = _batch()
    with torch.no_grad():
        memory, mask = model.encode(src)
        batched = model.decode(tgt, memory, mask)
        for b, n in enumerate(SRC_LENGTHS):
            m1, k1 = model.encode(src[b: b + 1, :n])  # the same sentence alone, unpadded
            torch.testing.assert_close(batched[b: b + 1], model.decode(tgt[b: b + 1], m1, k1), atol=1e-5, rtol=0)


def test_layer_level_cache_equals_full_causal_layer():
    torch.manual_seed(3)
    layer = DecoderLayer(16, 4, 32).eval()
    x, memory = torch.randn(3, 6, 16), torch.randn(3, 5, 16)
    mask = padding_mask([5, 3, 1], 5)
    self_cache, cross_cache = KVCache(), KVCache(static=True)
    with torch.no_grad():
        full = layer(x, memory, memory_mask=mask)
        steps = [layer(x[:, t: t + 1], memory, memory_mask=mask, self_cache=self_cache, cross_cache=cross_cache)
                 for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_cross_attention_memory_is_projected_once():
    model = _model()
    src, tgt = _batch()
    calls = {"k": 0}
    hook = model.decoder_layers[0].cross_attn.k_proj.register_forward_hook(
        lambda *_: calls.__setitem__("k", calls["k"] + 1))
    with torch.no_grad():
        memory, mask = model.encode(src)
        caches = model.new_caches()
        for t in range(5):
            model.decode(tgt[:, t: t + 1], memory, mask, caches=caches)
    hook.remove()
    assert calls["k"] == 1


def test_greedy_decode_with_and_without_cache_agree():
    model = _model(seed=5)
    src, _ = _batch(seed=2)
    ids_cached, logits_cached = model.greedy_decode(src, max_new_tokens=12, return_logits=True)
    ids_full, logits_full = model.greedy_decode(src, max_new_tokens=12, use_cache=False, return_logits=True)
    assert torch.equal(ids_cached, ids_full)
    torch.testing.assert_close(logits_cached, logits_full, atol=1e-5, rtol=0)


def test_wrong_number_of_caches_is_rejected():
    model = _model()
    src, tgt = _batch()
    memory, mask = model.encode(src)
    with pytest.raises(ValueError, match="one \\(self, cross\\) pair per decoder layer"):
        model.decode(tgt[:, :1], memory, mask, caches=model.new_caches()[:1])


def test_update_checks_key_and_value_before_writing_either():
    from course_lib import KVCache
    cache = KVCache()
    with pytest.raises(ValueError, match="must share"):
        cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 2, 4))  # first update: 3 keys, 2 values
    assert not cache.is_filled
    cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    key, value = cache.key, cache.value
    with pytest.raises(ValueError, match="new values"):
        cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 5))  # a d_head mismatch in the values only
    assert cache.key is key and cache.value is value and len(cache) == 3


def test_a_cache_that_starts_later_keeps_its_start_through_every_update():
    from course_lib.positional import RotaryEmbedding

    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, rotary=RotaryEmbedding(8)).eval()
    x = torch.randn(1, 6, 16)
    cache = KVCache(seen=3)  # the text's first 3 tokens are gone: these are positions 3, 4, ...
    with torch.no_grad():
        steps = [mha(x[:, :4], is_causal=True, cache=cache)] + [mha(x[:, t:t + 1], is_causal=True, cache=cache)
                                                                 for t in (4, 5)]
        full = mha(x, is_causal=True)  # RoPE scores depend on distances only: positions 0.. give the same
    assert cache.next_position == 3 + 6
    assert cache.key_positions().tolist() == list(range(3, 9))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=0)


def test_sink_tokens_are_refused_for_a_cache_that_starts_later():
    with pytest.raises(ValueError, match="seen=3"):
        KVCache(window=4, sink_tokens=1, seen=3)


def test_key_positions_of_tensors_assigned_directly_count_from_zero():
    cache = KVCache(window=4)
    cache.key = cache.value = torch.zeros(1, 1, 3, 2)  # a cache filled by hand: it has seen what it holds
    assert cache.key_positions().tolist() == [0, 1, 2]


def test_a_windowed_module_decodes_from_a_cache_filled_by_hand():
    from course_lib.modern import DecoderAttention

    torch.manual_seed(0)
    attn = DecoderAttention(8, 2, window=3).eval()
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        full = attn(x, is_causal=True)
        filled = attn.new_cache()
        attn(x[:, :2], is_causal=True, cache=filled)
        by_hand = attn.new_cache()
        by_hand.key, by_hand.value = filled.key, filled.value  # seen left at 0
        steps = [attn(x[:, t:t + 1], is_causal=True, cache=by_hand) for t in range(2, 5)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 2:], atol=1e-6, rtol=0)


def test_causal_cross_attention_through_a_static_cache_is_checked_like_one_without():
    mha = MultiHeadAttention(8, 2)
    x, memory = torch.randn(1, 5, 8), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="is_causal=True with T=5 queries and S=3 keys"):
        mha(x, memory, is_causal=True)
    with pytest.raises(ValueError, match="is_causal=True with T=5 queries and S=3 keys"):
        mha(x, memory, is_causal=True, cache=KVCache(static=True))

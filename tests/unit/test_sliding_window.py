"""Sliding-window attention, a cache that keeps only the window, StreamingLLM's kept first tokens and
gpt-oss's learned sink logit."""

import pytest
import torch
from helpers import assert_clear_error

from course_lib import KVCache, MultiHeadAttention
from course_lib.masks import causal_mask, position_mask, sliding_window_mask
from course_lib.modern import DecoderAttention
from course_lib.positional import RotaryEmbedding


def test_sliding_window_mask_by_hand():
    m = sliding_window_mask(5, window=2)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(m, expected.bool())
    sinks = sliding_window_mask(5, window=2, sink_tokens=1)
    assert sinks[:, 0].all() and torch.equal(sinks[:, 1:], m[:, 1:])
    assert torch.equal(sliding_window_mask(4, 7, window=100), causal_mask(4, 7))  # a wide window is causal
    assert torch.equal(sliding_window_mask(2, 5, window=2), m[3:])  # queries are the last T positions


def test_bad_window_arguments_are_refused():
    assert_clear_error(lambda: sliding_window_mask(3, window=0), ValueError, ["window"])
    assert_clear_error(lambda: position_mask(torch.arange(3), torch.arange(3), window=2, sink_tokens=-1),
                       ValueError, ["sink_tokens"])
    assert_clear_error(lambda: KVCache(sink_tokens=2), ValueError, ["sink_tokens", "window"])
    assert_clear_error(lambda: DecoderAttention(8, 2, sink_tokens=1), ValueError, ["sink_tokens"])
    assert_clear_error(lambda: DecoderAttention(8, 2, window=2)(torch.randn(1, 3, 8)), ValueError, ["is_causal"])
    windowed = DecoderAttention(8, 2, window=4)
    assert_clear_error(lambda: windowed(torch.randn(1, 1, 8), is_causal=True, cache=KVCache(window=2)),
                       ValueError, ["new_cache"])


@pytest.mark.parametrize("sink_tokens", [0, 2])
@pytest.mark.parametrize("rotary", [False, True])
def test_windowed_cache_decoding_equals_one_masked_pass(sink_tokens, rotary):
    torch.manual_seed(0)
    W, T = 3, 11
    mha = DecoderAttention(32, 4, num_kv_heads=2, window=W, sink_tokens=sink_tokens,
                             rotary=RotaryEmbedding(8) if rotary else None).eval()
    x = torch.randn(2, T, 32)
    cache = mha.new_cache()
    sizes = []
    with torch.no_grad():
        full = mha(x, is_causal=True)
        plain = MultiHeadAttention(32, 4, num_kv_heads=2, rotary=mha.rotary).eval()
        plain.load_state_dict(mha.state_dict())
        torch.testing.assert_close(full, plain(x, attn_mask=sliding_window_mask(T, window=W, sink_tokens=sink_tokens)))
        steps = [mha(x[:, :4], is_causal=True, cache=cache)]
        for t in range(4, T):
            steps.append(mha(x[:, t:t + 1], is_causal=True, cache=cache))
            sizes.append(len(cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert max(sizes) == W + sink_tokens  # the cache stops growing
    assert cache.key_positions().tolist() == list(range(sink_tokens)) + list(range(T - W, T))
    assert cache.seen == T


def test_failed_call_leaves_windowed_cache_unchanged():
    mha = DecoderAttention(8, 2, window=2).eval()
    cache = mha.new_cache()
    with torch.no_grad():
        mha(torch.randn(1, 4, 8), is_causal=True, cache=cache)
    before = (cache.key, cache.seen)
    with pytest.raises(ValueError):
        mha(torch.randn(1, 1, 8), is_causal=True, cache=cache, attn_mask=torch.ones(3, 3, dtype=torch.bool))
    assert (cache.key, cache.seen) == before


def test_learned_sink_takes_weight_and_gives_nothing():
    torch.manual_seed(0)
    mha = DecoderAttention(16, 2, learned_sink=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        mha.sink_logits.copy_(torch.tensor([-float("inf"), 3.0]))
        out, w = mha(x, is_causal=True, need_weights=True)
        fast = mha(x, is_causal=True)
    torch.testing.assert_close(out, fast)
    sums = w.sum(-1)  # (B, H, T)
    torch.testing.assert_close(sums[:, 0], torch.ones_like(sums[:, 0]))  # -inf sink: an ordinary softmax
    assert (sums[:, 1] < 1).all()  # the sink took weight
    plain = MultiHeadAttention(16, 2).eval()
    plain.load_state_dict({k: v for k, v in mha.state_dict().items() if k != "sink_logits"})
    with torch.no_grad():
        _, w_plain = plain(x, is_causal=True, need_weights=True)
    torch.testing.assert_close(w[:, 0], w_plain[:, 0])
    # the sink's weight is sigma(sink - logsumexp(scores)): the plain weights scaled by (1 - that weight)
    torch.testing.assert_close(w[:, 1], w_plain[:, 1] * sums[:, 1, :, None])


def test_learned_sink_gets_gradients_and_masked_rows_give_zero():
    mha = DecoderAttention(16, 2, learned_sink=True)
    x = torch.randn(1, 4, 16)
    mha(x, is_causal=True).sum().backward()
    assert mha.sink_logits.grad is not None and mha.sink_logits.grad.abs().sum() > 0
    none = torch.zeros(4, 4, dtype=torch.bool)
    with torch.no_grad():
        out = mha(x, attn_mask=none)
    torch.testing.assert_close(out, mha.out_proj.bias.expand_as(out))  # all weight on the sink: output 0 + bias

"""Rotary position embedding: the two pairing conventions are one rotation up to a fixed permutation of
features; rotations keep norms; scores depend only on m - n; the offset a cache needs; Hugging Face's
rotate_half formula; decoding with a cache equals one causal pass."""

import pytest
import torch
from helpers import assert_clear_error

from course_lib import KVCache, MultiHeadAttention
from course_lib.positional import RotaryEmbedding, interleaved_to_half


@pytest.mark.parametrize("d_head", [2, 8, 64])
def test_conventions_are_one_rotation_up_to_a_permutation(d_head):
    x = torch.randn(2, 3, 7, d_head, dtype=torch.float64)
    perm = interleaved_to_half(d_head)
    half, inter = RotaryEmbedding(d_head), RotaryEmbedding(d_head, interleaved=True)
    torch.testing.assert_close(half(x[..., perm], offset=5), inter(x, offset=5)[..., perm], rtol=0, atol=1e-12)
    q, k = torch.randn(7, d_head, dtype=torch.float64), torch.randn(7, d_head, dtype=torch.float64)
    torch.testing.assert_close(half(q[:, perm]) @ half(k[:, perm]).T, inter(q) @ inter(k).T)  # same scores
    if d_head > 2:  # the conventions do differ on the same features
        assert not torch.allclose(half(x, offset=5), inter(x, offset=5))


def test_rotation_keeps_norms_and_position_zero_is_identity():
    rope = RotaryEmbedding(16)
    x = torch.randn(4, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(rope(x).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rope(x[:, :1]), x[:, :1])


@pytest.mark.parametrize("interleaved", [False, True])
def test_scores_depend_only_on_relative_position(interleaved):
    rope = RotaryEmbedding(32, interleaved=interleaved)
    q, k = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    def score(m, n):
        return float(rope(q.view(1, 32), offset=m) @ rope(k.view(1, 32), offset=n).T)
    for m, n in [(3, 1), (10, 8), (50, 48)]:
        assert score(m, n) == pytest.approx(score(2, 0), abs=1e-10)
    assert abs(score(3, 0) - score(2, 0)) > 1e-3


def test_offset_equals_slicing_a_longer_sequence():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 10, 8)
    torch.testing.assert_close(rope(x)[:, 6:], rope(x[:, 6:], offset=6))


def test_matches_the_rotate_half_formula_of_hugging_face():
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    d, T = 16, 6
    x = torch.randn(1, 2, T, d)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    freqs = torch.arange(3, 3 + T).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    q, _ = modeling_llama.apply_rotary_pos_emb(x, x, emb.cos()[None], emb.sin()[None])
    torch.testing.assert_close(RotaryEmbedding(d)(x, offset=3), q, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_cached_decoding_with_rotary_equals_one_pass(num_kv_heads):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, num_kv_heads=num_kv_heads, rotary=RotaryEmbedding(8)).eval()
    x = torch.randn(2, 8, 32)
    cache = KVCache()
    with torch.no_grad():
        full = mha(x, is_causal=True)
        steps = [mha(x[:, :3], is_causal=True, cache=cache)] + [mha(x[:, t:t + 1], is_causal=True, cache=cache)
                                                                for t in range(3, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.seen == 8


def test_bad_arguments_are_refused_by_name():
    assert_clear_error(lambda: RotaryEmbedding(7), ValueError, ["d_head", "even"])
    assert_clear_error(lambda: RotaryEmbedding(8, base=1), ValueError, ["base"])
    assert_clear_error(lambda: RotaryEmbedding(8)(torch.randn(3, 6)), ValueError, ["d_head=8"])
    assert_clear_error(lambda: RotaryEmbedding(8)(torch.randn(3, 8), offset=-1), ValueError, ["offset"])
    assert_clear_error(lambda: MultiHeadAttention(32, 4, rotary=RotaryEmbedding(16)), ValueError, ["rotary"])
    mha = MultiHeadAttention(32, 4, rotary=RotaryEmbedding(8))
    assert_clear_error(lambda: mha(torch.randn(1, 2, 32), torch.randn(1, 3, 32)), ValueError, ["self-attention"])

"""Grouped-query and multi-query attention (num_kv_heads < num_heads): equal to SDPA's enable_gqa, to
multi-head attention with each key/value head copied into its group, and cached decoding holds only
the key/value heads."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_clear_error

from course_lib import KVCache, MultiHeadAttention
from course_lib.attention import repeat_kv
from course_lib.mha import merge_heads, split_heads

D, H = 32, 8


def _gqa(num_kv_heads, seed=0, bias=True):
    torch.manual_seed(seed)
    return MultiHeadAttention(D, H, num_kv_heads=num_kv_heads, bias=bias).eval()


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("need_weights", [False, True])
def test_equals_sdpa_enable_gqa(num_kv_heads, need_weights):
    mha = _gqa(num_kv_heads)
    x = torch.randn(3, 6, D, generator=torch.Generator().manual_seed(1))
    q = split_heads(mha.q_proj(x), H)  # (B, H, T, d_head)
    k = split_heads(mha.k_proj(x), num_kv_heads)  # (B, H_kv, T, d_head)
    v = split_heads(mha.v_proj(x), num_kv_heads)
    ref = mha.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)))
    with torch.no_grad():
        out = mha(x, is_causal=True, need_weights=need_weights)
    out = out[0] if need_weights else out
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_equals_mha_with_repeated_kv_weights(num_kv_heads):
    """GQA is MHA whose key/value projections are tied inside each group of H / H_kv heads."""
    gqa = _gqa(num_kv_heads)
    mha = MultiHeadAttention(D, H).eval()
    d_head, n_rep = D // H, H // num_kv_heads
    with torch.no_grad():
        mha.load_state_dict({k: v for k, v in gqa.state_dict().items() if k.split(".")[0] in ("q_proj", "out_proj")},
                            strict=False)
        for name in ("k_proj", "v_proj"):
            small, big = getattr(gqa, name), getattr(mha, name)
            big.weight.copy_(small.weight.view(num_kv_heads, d_head, D).repeat_interleave(n_rep, 0).reshape(D, D))
            big.bias.copy_(small.bias.view(num_kv_heads, d_head).repeat_interleave(n_rep, 0).reshape(D))
    x, mem = torch.randn(2, 5, D), torch.randn(2, 7, D)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x, mem), mha(x, mem), atol=1e-5, rtol=1e-5)
        (o1, w1), (o2, w2) = gqa(x, need_weights=True), mha(x, need_weights=True)
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1, w2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_cache_holds_only_kv_heads_and_decoding_matches(num_kv_heads):
    mha = _gqa(num_kv_heads)
    x = torch.randn(2, 9, D)
    cache = KVCache()
    with torch.no_grad():
        full = mha(x, is_causal=True)
        steps = [mha(x[:, :4], is_causal=True, cache=cache)]
        steps += [mha(x[:, t:t + 1], is_causal=True, cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.key.shape == (2, num_kv_heads, 9, D // H) == cache.value.shape


def test_repeat_kv_layout_matches_grouping():
    k = torch.arange(3.0).view(1, 3, 1, 1)
    assert repeat_kv(k, 2).flatten().tolist() == [0, 0, 1, 1, 2, 2]


def test_bad_num_kv_heads_is_refused_by_name():
    assert_clear_error(lambda: MultiHeadAttention(D, H, num_kv_heads=3), ValueError, ["num_kv_heads", "divide"])
    assert_clear_error(lambda: MultiHeadAttention(D, H, num_kv_heads=0), ValueError, ["num_kv_heads"])


def test_cache_of_wrong_head_count_is_refused_and_unchanged():
    mha = _gqa(2)
    cache = KVCache()
    with torch.no_grad():
        MultiHeadAttention(D, H).eval()(torch.randn(1, 3, D), is_causal=True, cache=cache)  # fills 8 heads
    before = cache.key
    assert_clear_error(lambda: mha(torch.randn(1, 1, D), is_causal=True, cache=cache), ValueError, ["H_kv=2"])
    assert cache.key is before


def test_parameter_count_shrinks_with_kv_heads():
    counts = [sum(p.numel() for p in _gqa(g).parameters()) for g in (8, 2, 1)]
    d_head = D // H
    assert counts[0] - counts[1] == 2 * (8 - 2) * d_head * (D + 1)
    assert counts[1] - counts[2] == 2 * (2 - 1) * d_head * (D + 1)


def test_head_ablation_model_takes_kv_heads():
    from course_lib.experiments.head_ablation import GatedSelfAttention, HeadGatedTransformer

    torch.manual_seed(0)
    gated = GatedSelfAttention(D, H, num_kv_heads=2).eval()
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        torch.testing.assert_close(gated(x)[0], gated.mha(x), atol=1e-5, rtol=1e-5)
    model = HeadGatedTransformer(8, 64, 16, d_model=D, num_heads=H, num_kv_heads=1)
    assert model.config["num_kv_heads"] == 1
    assert "num_kv_heads" not in HeadGatedTransformer(8, 64, 16, d_model=D, num_heads=H).config

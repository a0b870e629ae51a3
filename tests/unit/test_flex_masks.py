"""course_lib.modern.flex: every mask the course builds, as a FlexAttention mask_mod, equals course_lib's.

Three independent references: course_lib.masks (the dense masks), torch's own evaluation of a mask_mod
(`create_mask`, through vmap) and torch's FlexAttention against course_lib's attention; ALiBi's slopes and
bias against Hugging Face's BLOOM. Each comparison has a planted wrong mask_mod that it must catch.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention

from course_lib import masks
from course_lib.attention import scaled_dot_product_attention
from course_lib.modern import flex as fx

BOUND = 1e-12  # float64: two exact computations of softmax(q k^T / sqrt d) v differ by rounding only


def _flex(q, k, v, mask_mod, score_mod=None, B=None):
    block_mask = create_block_mask(mask_mod, B, None, q.shape[-2], k.shape[-2], device="cpu")
    with warnings.catch_warnings():  # the uncompiled path warns that it is not fused; it computes the same
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)


def _qkv(B, H, T, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, 8, generator=g, dtype=torch.float64),
            torch.randn(B, H, S, 8, generator=g, dtype=torch.float64),
            torch.randn(B, H, S, 8, generator=g, dtype=torch.float64))


def _document_reference(ids, causal=True):  # (T,) -> (T, T): same document, and not after the query
    same = ids[:, None] == ids[None, :]
    return same & masks.causal_mask(len(ids)) if causal else same


def _prefix_reference(prefix, T):
    return masks.causal_mask(T) | (torch.arange(T) < prefix)[None, :]


CASES = {  # name: (mask_mod, (B, T, S), the dense course_lib mask broadcastable to (B, 1, T, S))
    "causal, T == S": (fx.causal_mod(), (2, 7, 7), masks.causal_mask(7)),
    "causal bottom-right, T < S": (fx.causal_mod(9 - 4), (2, 4, 9), masks.causal_mask(4, 9)),
    "causal top-left (is_causal), T < S": (fx.causal_mod(), (2, 4, 9), torch.ones(4, 9, dtype=torch.bool).tril()),
    "padding": (fx.padding_mod([5, 2]), (2, 6, 5), masks.padding_mask([5, 2], 5)),
    "window 3": (fx.window_mod(3), (1, 10, 10), masks.sliding_window_mask(10, window=3)),
    "window 3 + 2 sinks, cached": (fx.window_mod(3, sink_tokens=2, offset=8), (1, 4, 12),
                                   masks.sliding_window_mask(4, 12, window=3, sink_tokens=2)),
    "document (packed)": (fx.document_mod(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])), (2, 9, 9),
                          _document_reference(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2]))),
    "prefix-LM": (fx.prefix_lm_mod(3), (1, 8, 8), _prefix_reference(3, 8)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_mask_mod_is_the_course_lib_mask_on_every_evaluation(name):
    mask_mod, (B, T, S), reference = CASES[name]
    expected = reference.expand(B, 1, T, S)
    assert torch.equal(fx.dense_mask(mask_mod, B, 1, T, S), expected)
    assert torch.equal(create_mask(mask_mod, B, 1, T, S, device="cpu"), expected)  # torch's vmap evaluation


@pytest.mark.parametrize("name", list(CASES))
def test_flex_attention_with_the_mask_mod_equals_course_lib_attention(name):
    mask_mod, (B, T, S), reference = CASES[name]
    q, k, v = _qkv(B, 2, T, S)
    ours = scaled_dot_product_attention(q, k, v, attn_mask=reference)
    assert (_flex(q, k, v, mask_mod, B=B) - ours).abs().max() <= BOUND


def test_the_comparison_catches_an_off_by_one_window():
    def window_too_wide(b, h, q_idx, kv_idx):  # q - W <= j: W + 1 keys
        return (kv_idx <= q_idx) & (kv_idx >= q_idx - 3)

    q, k, v = _qkv(1, 2, 10, 10)
    ours = scaled_dot_product_attention(q, k, v, attn_mask=masks.sliding_window_mask(10, window=3))
    assert not torch.equal(fx.dense_mask(window_too_wide, 1, 1, 10, 10)[0, 0], masks.sliding_window_mask(10, window=3))
    assert (_flex(q, k, v, window_too_wide) - ours).abs().max() > 1e-3


def test_top_left_and_bottom_right_differ_when_there_are_more_keys():
    q, k, v = _qkv(1, 2, 4, 9)
    bottom_right = scaled_dot_product_attention(q, k, v, attn_mask=masks.causal_mask(4, 9))
    assert (_flex(q, k, v, fx.causal_mod()) - bottom_right).abs().max() > 1e-3


def test_padding_per_batch_element_and_empty_rows_give_zero():
    q, k, v = _qkv(3, 2, 5, 6)
    out = _flex(q, k, v, fx.padding_mod([6, 0, 3]), B=3)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # no key at all: 0, as course_lib
    ours = scaled_dot_product_attention(q, k, v, attn_mask=masks.padding_mask([6, 0, 3], 6))
    assert (out - ours).abs().max() <= BOUND
    swapped = _flex(q, k, v, fx.padding_mod([3, 0, 6]), B=3)  # the lengths of another sentence
    assert (swapped - ours).abs().max() > 1e-3


def test_document_ids_per_batch_element():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    expected = torch.stack([_document_reference(row) for row in ids])[:, None]  # (B, 1, T, T)
    assert torch.equal(fx.dense_mask(fx.document_mod(ids), 2, 1, 6, 6), expected)
    assert torch.equal(create_mask(fx.document_mod(ids), 2, 1, 6, 6, device="cpu"), expected)
    bidirectional = fx.dense_mask(fx.document_mod(ids, causal=False), 2, 1, 6, 6)
    assert torch.equal(bidirectional, torch.stack([_document_reference(row, causal=False) for row in ids])[:, None])


def test_prefix_lm_per_batch_element_and_its_planted_twin():
    mod = fx.prefix_lm_mod([2, 5])
    expected = torch.stack([_prefix_reference(2, 7), _prefix_reference(5, 7)])[:, None]
    assert torch.equal(fx.dense_mask(mod, 2, 1, 7, 7), expected)

    def prefix_off_by_one(b, h, q_idx, kv_idx):  # j <= prefix: one key too many
        return (kv_idx <= q_idx) | (kv_idx <= torch.tensor([2, 5])[b])

    assert not torch.equal(fx.dense_mask(prefix_off_by_one, 2, 1, 7, 7), expected)


# --------------------------------------------------------------------------------------------- ALiBi
def test_alibi_slopes_equal_bloom_for_every_head_count():
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    for H in range(1, 33):
        # BLOOM's public bias for keys 0 and 1 is (0, slope) per head (its private slope helper is not in every release)
        slopes = bloom.build_alibi_tensor(torch.ones(1, 2), H, torch.float64)[:, 0, 1]  # (H,)
        assert torch.allclose(fx.alibi_slopes(H).double(), slopes, rtol=1e-6, atol=0), H
    assert fx.alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]  # the paper's 1/2, 1/4, ..., 1/256


@pytest.mark.parametrize("H", [4, 6])
def test_alibi_score_mod_equals_attention_with_bloom_s_bias(H):
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    T = 9
    q, k, v = _qkv(2, H, T, T)
    # BLOOM adds slope * j (not -slope * (i - j)): the same softmax, shifted by slope * i per row
    bias = bloom.build_alibi_tensor(torch.ones(2, T), H, torch.float64).view(2, H, 1, T)
    ours = scaled_dot_product_attention(q, k, v, attn_mask=bias + masks.to_additive_mask(masks.causal_mask(T),
                                                                                         torch.float64))
    slopes = fx.alibi_slopes(H).double()
    assert (_flex(q, k, v, fx.causal_mod(), fx.alibi_mod(slopes)) - ours).abs().max() <= BOUND
    reversed_slopes = _flex(q, k, v, fx.causal_mod(), fx.alibi_mod(slopes.flip(0)))  # slopes on the wrong heads
    assert (reversed_slopes - ours).abs().max() > 1e-3
    without = _flex(q, k, v, fx.causal_mod())
    assert (without - ours).abs().max() > 1e-3


# --------------------------------------------------------------------------------------- block counts
@pytest.mark.parametrize("T", [1024, 1000, 300])
def test_block_counts_from_the_block_mask_equal_a_count_from_the_dense_mask(T):
    mods = [fx.causal_mod(), fx.window_mod(256), fx.window_mod(100, sink_tokens=4),
            fx.document_mod(torch.arange(T) // 300), fx.prefix_lm_mod(200)]
    for mod in mods:
        block_mask = create_block_mask(mod, None, None, T, T, device="cpu")
        counts = fx.block_counts(block_mask)
        assert counts == fx.dense_block_counts(fx.dense_mask(mod, 1, 1, T, T), 128)
        tiles = -(-T // 128)
        assert counts.total == tiles * tiles
        if T % 128 == 0:  # torch's own percentage (it divides by T * T, not by the padded tiles)
            assert abs(100 * counts.skipped / counts.total - block_mask.sparsity()) < 1e-9


def test_block_counts_of_a_causal_mask_by_hand():
    counts = fx.block_counts(create_block_mask(fx.causal_mod(), None, None, 1024, 1024, device="cpu"))
    assert counts == fx.BlockCounts(full=28, partial=8, skipped=28)  # 8 x 8 tiles: 28 below, 8 on the diagonal
    batched = create_block_mask(fx.padding_mod([1024, 100]), 2, 3, 1024, 1024, device="cpu")
    assert fx.block_counts(batched) == fx.BlockCounts(full=3 * 8 * 8, partial=3 * 8, skipped=3 * 8 * 7)


def test_the_dense_count_sees_a_planted_shift_and_other_block_shapes():
    causal = fx.dense_mask(fx.causal_mod(), 1, 1, 1024, 1024)
    shifted = fx.dense_mask(fx.causal_mod(1), 1, 1, 1024, 1024)  # one key more: the corner of 7 tiles above
    assert fx.dense_block_counts(shifted) == fx.BlockCounts(full=28, partial=15, skipped=21)
    assert fx.dense_block_counts(causal, 1) == fx.BlockCounts(full=1024 * 1025 // 2, partial=0,
                                                              skipped=1024 * 1023 // 2)  # 1 x 1 tiles: entries
    block_mask = create_block_mask(fx.causal_mod(), None, None, 1024, 1024, device="cpu", BLOCK_SIZE=(64, 128))
    assert fx.dense_block_counts(causal, (64, 128)) == fx.block_counts(block_mask)
    assert fx.block_counts(block_mask).total == 16 * 8


# ------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("call, error, name", [
    (lambda: fx.causal_mod(1.5), TypeError, "offset"),
    (lambda: fx.padding_mod([[1, 2]]), ValueError, "lengths"),
    (lambda: fx.padding_mod([1.0, 2.0]), TypeError, "lengths"),
    (lambda: fx.padding_mod([-1]), ValueError, "lengths"),
    (lambda: fx.window_mod(0), ValueError, "window"),
    (lambda: fx.window_mod(3, sink_tokens=-1), ValueError, "sink_tokens"),
    (lambda: fx.document_mod(torch.zeros(2, 2, 2, dtype=torch.long)), ValueError, "document_ids"),
    (lambda: fx.document_mod([0, 1], causal=1), TypeError, "causal"),
    (lambda: fx.prefix_lm_mod(-2), ValueError, "prefix_lengths"),
    (lambda: fx.alibi_slopes(0), ValueError, "num_heads"),
    (lambda: fx.alibi_mod([0.5, 0.25]), TypeError, "slopes"),
    (lambda: fx.dense_mask("causal", 1, 1, 2, 2), TypeError, "mask_mod"),
    (lambda: fx.dense_mask(fx.causal_mod(), 1, 1, 0, 2), ValueError, "T"),
    (lambda: fx.block_counts(torch.ones(2, 2)), TypeError, "block_mask"),
    (lambda: fx.dense_block_counts(torch.ones(4, 4), 2), TypeError, "mask"),
    (lambda: fx.dense_block_counts(torch.ones(4, 4, dtype=torch.bool), 0), ValueError, "block_size"),
])
def test_bad_input_is_refused_by_name(call, error, name):
    with pytest.raises(error, match=name):
        call()


# ------------------------------------------------------------------------------------------ compiled
def _tiles_of(narrower, mask_mod, T, B=None):
    """A BlockMask with the tile tables of `narrower` (fewer tiles) but `mask_mod` for the partial tiles."""
    tables = create_block_mask(narrower, B, None, T, T, device="cpu")
    return BlockMask.from_kv_blocks(tables.kv_num_blocks, tables.kv_indices, tables.full_kv_num_blocks,
                                    tables.full_kv_indices, BLOCK_SIZE=tables.BLOCK_SIZE, mask_mod=mask_mod,
                                    seq_lengths=(T, T))


def _diagonal_tiles_only(mask_mod):  # mask_mod, then only in the tiles on the diagonal (128 x 128)
    return lambda b, h, q_idx, kv_idx: mask_mod(b, h, q_idx, kv_idx) & (q_idx // 128 == kv_idx // 128)


def test_uncompiled_flex_attention_ignores_the_tiles_so_they_are_counted_apart():
    """Uncompiled, flex_attention applies the mask_mod to every score and never reads the BlockMask's tiles:
    its equality with course_lib checks the mask_mod alone (the block counts are checked against the dense
    mask above; the compiled kernel, which skips tiles, below)."""
    q, k, v = _qkv(1, 2, 512, 512)
    prefix = fx.prefix_lm_mod(300)
    ours = scaled_dot_product_attention(q, k, v, attn_mask=_prefix_reference(300, 512))
    too_few = _tiles_of(_diagonal_tiles_only(prefix), prefix, 512)
    assert fx.block_counts(too_few) == fx.BlockCounts(full=2, partial=2, skipped=12)  # prefix-LM itself skips 3
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = flex_attention(q, k, v, block_mask=too_few)
    assert (out - ours).abs().max() <= BOUND  # the diagonal tiles alone, and still every key


DOCUMENTS = torch.stack([torch.arange(512) // 200, torch.arange(512) // 90])  # (2, 512): 3 and 6 documents
COMPILED_CASES = {  # name: (mask_mod, score_mod, the dense course_lib mask or additive bias (B, 1 or H, T, T))
    "causal": (fx.causal_mod(), None, masks.causal_mask(512)),
    "window 64 + 4 sinks": (fx.window_mod(64, sink_tokens=4), None,
                            masks.sliding_window_mask(512, window=64, sink_tokens=4)),
    "documents, per batch element": (fx.document_mod(DOCUMENTS), None,
                                     torch.stack([_document_reference(row) for row in DOCUMENTS])[:, None]),
    "prefix-LM, prefix 300": (fx.prefix_lm_mod(300), None, _prefix_reference(300, 512)),
    "ALiBi + causal": (fx.causal_mod(), fx.alibi_mod(fx.alibi_slopes(2)),
                       masks.to_additive_mask(masks.causal_mask(512), torch.float64)
                       - fx.alibi_slopes(2).double().view(2, 1, 1) * (torch.arange(512)[:, None] - torch.arange(512))),
}


@pytest.mark.maintainer
def test_the_compiled_kernel_uses_the_tiles_and_equals_course_lib():
    """torch.compile(flex_attention): the fused kernel skips the tiles the BlockMask marks empty, so here the
    tile tables matter. Each kind compiles once (T = 512, 4 x 4 tiles); the same kernel, given the tables of
    the diagonal tiles only (its mask_mod unchanged), must miss. On two CPU cores: 44 s cold, 8 s warm."""
    compiled = torch.compile(flex_attention)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 512, 16, generator=g) for _ in range(3))  # float32: the compiled CPU kernel's
    for name, (mask_mod, score_mod, reference) in COMPILED_CASES.items():
        ours = scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=reference)
        block_mask = create_block_mask(mask_mod, 2, None, 512, 512, device="cpu")
        skipped = fx.block_counts(block_mask).skipped
        assert (compiled(q, k, v, score_mod=score_mod, block_mask=block_mask) - ours).abs().max() <= 1e-5, name
        too_few = _tiles_of(_diagonal_tiles_only(mask_mod), mask_mod, 512, B=2)  # same mask_mod, fewer tiles
        assert fx.block_counts(too_few).skipped > skipped, name
        assert (compiled(q, k, v, score_mod=score_mod, block_mask=too_few) - ours).abs().max() > 1e-3, name
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # torch's own causal
    causal = create_block_mask(fx.causal_mod(), None, None, 512, 512, device="cpu")
    assert (compiled(q, k, v, block_mask=causal) - sdpa).abs().max() <= 1e-5

"""course_lib.masks: one convention (True = may attend), the conversions, and fill values per dtype."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from course_lib.masks import (
    causal_mask,
    combine_masks,
    from_key_padding_mask,
    from_torch_mha_mask,
    padding_mask,
    to_additive_mask,
    to_torch_mha_mask,
)


def test_causal_mask_is_the_lower_triangle():
    m = causal_mask(4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    assert torch.equal(m, torch.ones(4, 4).tril().bool())
    assert m[2, 2] and m[2, 0] and not m[2, 3]  # a query sees itself and the past, not the future


@given(T=st.integers(1, 9), extra=st.integers(0, 6))
def test_causal_mask_with_more_keys_is_bottom_right_aligned(T, extra):
    S = T + extra
    m = causal_mask(T, S)
    assert m.shape == (T, S)
    # the T queries are the last T positions: query i sits at position i + extra
    expected = torch.arange(S)[None, :] <= (torch.arange(T)[:, None] + extra)
    assert torch.equal(m, expected)
    assert m[-1].all()  # the newest query sees every key
    assert torch.equal(causal_mask(T, S)[:, extra:], causal_mask(T))


def test_padding_mask_shape_and_values():
    m = padding_mask([3, 1, 4], 4)
    assert m.shape == (3, 1, 1, 4) and m.dtype == torch.bool
    assert m[:, 0, 0].tolist() == [[True, True, True, False], [True, False, False, False], [True] * 4]
    assert padding_mask(torch.tensor([0, 2]), 2)[0].sum() == 0  # an empty sequence masks every key


def test_combined_causal_and_padding_mask_broadcasts_to_scores():
    m = combine_masks(padding_mask([4, 2], 4), causal_mask(4), None)
    assert m.shape == (2, 1, 4, 4)
    assert torch.equal(m[0, 0], causal_mask(4))
    assert m[1, 0].tolist() == [[True, False, False, False], [True, True, False, False],
                                [True, True, False, False], [True, True, False, False]]
    assert combine_masks(None, None) is None


def test_polarity_conversions_round_trip_and_match_torch():
    ours = combine_masks(padding_mask([3, 2], 3), causal_mask(3))
    theirs = to_torch_mha_mask(ours)
    assert torch.equal(theirs, ~ours) and torch.equal(from_torch_mha_mask(theirs), ours)
    kpm = torch.tensor([[False, False, True], [False, True, True]])  # torch: True = padding
    assert torch.equal(from_key_padding_mask(kpm), padding_mask([2, 1], 3))
    # and torch really reads it that way: with key_padding_mask, padded keys get weight 0
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    _, w = mha(x, x, x, key_padding_mask=to_torch_mha_mask(padding_mask([2, 1], 3)[:, 0, 0]),
               average_attn_weights=False)
    assert (w[0, :, :, 2] == 0).all() and (w[1, :, :, 1:] == 0).all() and (w[1, :, :, 0] == 1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_additive_mask_is_zero_or_minus_inf_in_every_dtype(dtype):
    m = causal_mask(3)
    add = to_additive_mask(m, dtype)
    assert add.dtype == dtype
    assert (add[m] == 0).all() and torch.isneginf(add[~m]).all()
    scores = torch.full((3, 3), 6e4, dtype=dtype) if dtype == torch.float16 else torch.randn(3, 3, dtype=dtype)
    p = torch.softmax((scores.float() + add.float()), dim=-1)
    assert torch.isfinite(p).all() and (p[~m] == 0).all()


BAD = {
    "causal_T_zero": (lambda: causal_mask(0), ValueError, "T must be a positive int"),
    "causal_T_float": (lambda: causal_mask(2.5), TypeError, "T must be a positive int"),
    "padding_length_too_long": (lambda: padding_mask([5], 4), ValueError, "lengths must lie in [0, max_len=4]"),
    "padding_lengths_2d": (lambda: padding_mask([[1, 2]], 4), ValueError, "1-D sequence of ints"),
    "padding_lengths_float": (lambda: padding_mask([1.5], 4), ValueError, "1-D sequence of ints"),
    "combine_int": (lambda: combine_masks(causal_mask(2), torch.zeros(2, 2, dtype=torch.int64)), TypeError,
                    "boolean (True = may attend) or floating-point"),
    "combine_3d": (lambda: combine_masks(torch.ones(2, 4, 4, dtype=torch.bool), padding_mask([3, 1], 4)), ValueError,
                   "3-D mask is ambiguous"),
    "combine_list": (lambda: combine_masks([[True]]), TypeError, "mask 0 must be a torch.Tensor"),
    "combine_no_broadcast": (lambda: combine_masks(causal_mask(2), causal_mask(3)), ValueError, "do not broadcast"),
    "polarity_float": (lambda: to_torch_mha_mask(torch.zeros(2, 2)), TypeError, "must be boolean"),
    "polarity_not_tensor": (lambda: to_torch_mha_mask([[True]]), TypeError, "must be a torch.Tensor"),
    "additive_int_dtype": (lambda: to_additive_mask(causal_mask(2), torch.int64), TypeError, "floating-point"),
    "key_padding_3d": (lambda: from_key_padding_mask(torch.zeros(1, 2, 3, dtype=torch.bool)), ValueError, "(B, S)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_a_clear_error(name):
    make_call, error, words = BAD[name]
    with pytest.raises(error) as info:
        make_call()
    assert words in str(info.value), str(info.value)


def test_with_causal_restricts_bool_and_additive_masks_alike():
    from course_lib.masks import causal_mask, to_additive_mask, with_causal

    pad = torch.tensor([[True, True, False, True]])  # (1, S): key 2 is padding
    combined = with_causal(pad, 2, 4)  # queries are the last 2 of 4 positions
    assert combined.tolist() == [[True, True, False, False], [True, True, False, True]]
    additive = with_causal(to_additive_mask(pad), 2, 4)
    assert torch.equal(additive == 0, combined)
    assert torch.equal(with_causal(None, 3, 3), causal_mask(3))


def test_combine_masks_takes_additive_float_masks():
    pad, causal = padding_mask([3, 2], 3), causal_mask(3)
    bias = torch.tensor([[0.0, -1.0, -2.0]] * 3)  # an additive (T, S) bias, e.g. a position bias
    combined = combine_masks(pad, causal, bias)  # (B, 1, T, S) float
    assert combined.dtype == torch.float32 and combined.shape == (2, 1, 3, 3)
    allowed = combine_masks(pad, causal)
    assert torch.equal(torch.isfinite(combined), allowed.expand(2, 1, 3, 3))
    assert torch.equal(combined[allowed.expand(2, 1, 3, 3)], bias.expand(2, 1, 3, 3)[allowed.expand(2, 1, 3, 3)])
    half = combine_masks(to_additive_mask(causal, torch.float16), pad)
    assert half.dtype == torch.float16 and torch.equal(torch.isfinite(half), combine_masks(causal, pad))

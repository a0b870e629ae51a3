"""The notebook-01 checkers accept the reference and reject planted wrong solutions with useful messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from course_lib import checks, numpy_ref


# ----------------------------------------------------------------------------- scaled scores
def ref_scores(q, k):
    return q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])


def test_scaled_scores_accepts_reference():
    result = checks.check_scaled_scores(ref_scores)
    assert result.passed, result
    assert repr(result).startswith("[PASSED]")


def test_scaled_scores_rejects_missing_scaling():
    result = checks.check_scaled_scores(lambda q, k: q @ np.swapaxes(k, -1, -2))
    assert not result.passed
    assert "without the scaling" in result.message and "sqrt(d)" in result.message


def test_scaled_scores_rejects_division_by_d():
    result = checks.check_scaled_scores(lambda q, k: q @ np.swapaxes(k, -1, -2) / q.shape[-1])
    assert not result.passed and "divided by d" in result.message


def test_scaled_scores_rejects_k_q_transposed():
    result = checks.check_scaled_scores(lambda q, k: k @ np.swapaxes(q, -1, -2) / np.sqrt(q.shape[-1]))
    assert not result.passed
    assert "(..., S, T)" in result.message and "(5, 3)" in result.message


def test_scaled_scores_rejects_full_transpose_of_batched_k():
    # k.T reverses all axes: works for 2-D, crashes or mis-shapes for batched inputs
    result = checks.check_scaled_scores(lambda q, k: q @ k.T / np.sqrt(q.shape[-1]))
    assert not result.passed
    assert "raised" in result.message and "swapaxes" in result.message


# ----------------------------------------------------------------------------- softmax
def naive_softmax(x, axis=-1):
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def columns_softmax(x, axis=-1):
    return numpy_ref.softmax(x, axis=0)


def fixed_axis_softmax(x, axis=-1):
    return numpy_ref.softmax(x, axis=1)


def unnormalised_softmax(x, axis=-1):
    return np.exp(x - x.max(axis=axis, keepdims=True))


def test_softmax_accepts_reference():
    result = checks.check_softmax(numpy_ref.softmax)
    assert result.passed, result


def test_softmax_accepts_a_correct_learner_version():
    def mine(x, axis=-1):
        shifted = x - np.max(x, axis=axis, keepdims=True)
        e = np.exp(shifted)
        return e / np.sum(e, axis=axis, keepdims=True)

    assert checks.check_softmax(mine).passed


def test_softmax_rejects_naive_overflow():
    with np.errstate(all="ignore"):
        assert checks.check_softmax(naive_softmax).passed is False
    result = checks.check_softmax(naive_softmax)
    assert "nan" in result.message.lower()
    assert "overflows" in result.message and "row maximum" in result.message


def test_softmax_rejects_wrong_axis():
    result = checks.check_softmax(columns_softmax)
    assert not result.passed
    assert "COLUMN" in result.message and "axis 0" in result.message


def test_softmax_rejects_hard_coded_axis_on_batched_input():
    result = checks.check_softmax(fixed_axis_softmax)
    assert not result.passed
    assert "(2, 3, 4)" in result.message and "axis=-1" in result.message


def test_softmax_rejects_missing_normalisation():
    result = checks.check_softmax(unnormalised_softmax)
    assert not result.passed and "sum to 1" in result.message


def test_softmax_rejects_function_without_axis_argument():
    result = checks.check_softmax(lambda x: numpy_ref.softmax(x))
    assert not result.passed
    assert "TypeError" in result.message and "axis" in result.message


def test_softmax_in_float32_is_rejected_and_the_dtype_named():
    # the exercises compute in float64: float32 keeps ~7 digits, far from the 1e-8 the checkers ask
    result = checks.check_softmax(lambda x, axis=-1: numpy_ref.softmax(x, axis=axis).astype(np.float32))
    assert not result.passed
    assert "float32" in result.message and "compute in float64" in result.message


# ----------------------------------------------------------------------------- attention
def ref_attention(q, k, v):
    return numpy_ref.scaled_dot_product_attention(q, k, v)


def unscaled_attention(q, k, v):
    w = numpy_ref.softmax(q @ np.swapaxes(k, -1, -2))
    return w @ v, w


def transposed_weights_attention(q, k, v):
    out, w = numpy_ref.scaled_dot_product_attention(q, k, v)
    return out, np.swapaxes(w, -1, -2)


def dv_scaled_attention(q, k, v):
    w = numpy_ref.softmax(q @ np.swapaxes(k, -1, -2) / np.sqrt(v.shape[-1]))
    return w @ v, w


def query_axis_attention(q, k, v):
    w = numpy_ref.softmax(q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), axis=-2)
    return w @ v, w


def naive_softmax_attention(q, k, v):
    w = naive_softmax(q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]))
    return w @ v, w


def test_attention_accepts_reference():
    result = checks.check_attention(ref_attention)
    assert result.passed, result


def test_attention_rejects_missing_scaling():
    result = checks.check_attention(unscaled_attention)
    assert not result.passed and "without the scaling" in result.message and "sqrt(d)" in result.message


def test_attention_rejects_transposed_weights():
    result = checks.check_attention(transposed_weights_attention)
    assert not result.passed
    assert "transposed" in result.message and "(5, 3)" in result.message and "(..., T, S)" in result.message


def test_attention_rejects_scaling_by_d_v():
    result = checks.check_attention(dv_scaled_attention)
    assert not result.passed and "sqrt(d_v)" in result.message


def test_attention_rejects_softmax_over_queries():
    result = checks.check_attention(query_axis_attention)
    assert not result.passed and "axis -1" in result.message


def test_attention_rejects_overflowing_softmax():
    result = checks.check_attention(naive_softmax_attention)
    assert not result.passed
    assert "large scores" in result.message and "nan" in result.message.lower() and "overflows" in result.message


def test_attention_rejects_output_only():
    result = checks.check_attention(lambda q, k, v: ref_attention(q, k, v)[0])
    assert not result.passed and "pair (out, weights)" in result.message


def test_attention_rejects_wrong_output():
    result = checks.check_attention(lambda q, k, v: (ref_attention(q, k, v)[0] * 2, ref_attention(q, k, v)[1]))
    assert not result.passed and result.message.startswith("out for")


# ----------------------------------------------------------------------------- masked attention
def ref_masked(q, k, v, mask):
    return numpy_ref.scaled_dot_product_attention(q, k, v, mask)


def inverted_mask(q, k, v, mask):
    return numpy_ref.scaled_dot_product_attention(q, k, v, ~mask)


def plus_one_mask(q, k, v, mask):
    # seed 001's recipe: add the mask (1 where ignored) to the scores
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]) + (~mask).astype(float)
    w = numpy_ref.softmax(scores)
    return w @ v, w


def big_negative_mask(q, k, v, mask):
    scores = np.where(mask, q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), -1e9)
    w = numpy_ref.softmax(scores)
    return w @ v, w


def nan_on_empty_rows(q, k, v, mask):
    scores = np.where(mask, q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), -np.inf)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    w = e / e.sum(axis=-1, keepdims=True)
    return w @ v, w


def scales_q_in_place(q, k, v, mask):
    q /= np.sqrt(q.shape[-1])
    w = numpy_ref.softmax(np.where(mask, q @ np.swapaxes(k, -1, -2), -np.inf))
    return w @ v, w


def test_masked_names_the_softmax_axis_and_the_order_of_the_pair():
    def over_queries(q, k, v, mask):
        s = np.where(mask, q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), -np.inf)
        w = numpy_ref.softmax(s, axis=-2)
        return w @ v, w

    result = checks.check_masked_attention(over_queries)
    assert not result.passed and "your softmax normalised over the queries (axis -2)" in result.message, result
    result = checks.check_masked_attention(lambda q, k, v, mask: ref_masked(q, k, v, mask)[::-1])
    assert not result.passed and "your pair is in the wrong order" in result.message, result


def test_masked_names_an_input_changed_in_place():
    result = checks.check_masked_attention(scales_q_in_place)
    assert not result.passed and result.message.startswith("your function changed its input `q` in place"), result
    assert "np.where" in result.message, result.message


def test_masked_accepts_reference():
    result = checks.check_masked_attention(ref_masked)
    assert result.passed, result


def test_masked_rejects_inverted_polarity():
    result = checks.check_masked_attention(inverted_mask)
    assert not result.passed and "INVERTED" in result.message and "True means 'may attend'" in result.message


def test_masked_rejects_adding_plus_one():
    result = checks.check_masked_attention(plus_one_mask)
    assert not result.passed and "-inf" in result.message and "+1" in result.message


def test_masked_rejects_finite_fill_on_fully_masked_row():
    result = checks.check_masked_attention(big_negative_mask)
    assert not result.passed
    assert "may attend to nothing" in result.message and "-1e9" in result.message


def test_masked_rejects_nan_on_fully_masked_row():
    with np.errstate(all="ignore"):
        result = checks.check_masked_attention(nan_on_empty_rows)
    assert not result.passed
    assert "nan" in result.message.lower() and "all -inf row" in result.message


def masked_after_softmax(q, k, v, mask):
    # softmax of all the scores, then the masked weights set to 0 and no renormalisation
    w = numpy_ref.softmax(q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])) * mask
    return w @ v, w


def test_masked_rejects_masking_after_the_softmax():
    result = checks.check_masked_attention(masked_after_softmax)
    assert not result.passed and "masked after the softmax" in result.message, result.message


# ----------------------------------------------------------------------------- the worked example by hand
def _hand(scale=2.0, soft=True, summed=True):
    scores = np.array([4.0, 0.0, 0.0]) / scale
    w = numpy_ref.softmax(scores) if soft else scores
    products = w * np.array([10.0, 0.0, -10.0])
    return lambda: (w, products.sum() if summed else products)


def test_hand_example_accepts_three_digit_answers():
    assert checks.check_hand_example(_hand()).passed
    assert checks.check_hand_example(lambda: ([0.787, 0.107, 0.107], 6.81)).passed


@pytest.mark.parametrize("wrong, words", [
    (_hand(scale=1.0), "without the scaling"),
    (_hand(scale=4.0), "divided by d_k"),
    (_hand(soft=False), "scaled scores themselves"),
    (_hand(summed=False), "their SUM"),
    (lambda: ([0.787, 0.107, 0.107], 7.0), "out is off by 0.195"),
    (lambda: (6.805, [0.787, 0.107, 0.107]), "your pair is in the wrong order"),
])
def test_hand_example_rejects_planted_mistakes(wrong, words):
    result = checks.check_hand_example(wrong)
    assert not result.passed and words in result.message, result.message


def test_hand_example_never_prints_the_answer_it_asks_for():
    def slip():  # q.k_2 taken as 2 instead of 0
        w = numpy_ref.softmax(np.array([4.0, 2.0, 0.0]) / 2.0)
        return w, float(w @ np.array([10.0, 0.0, -10.0]))

    result = checks.check_hand_example(slip)
    assert not result.passed
    assert result.message.startswith("your weights are a softmax of three scores in which only key k_2's is off"), \
        result
    assert "0.787" not in result.message and "0.107" not in result.message, result.message
    result = checks.check_hand_example(lambda: ([0.6, 0.3, 0.1], 5.0))  # no single slip explains these
    assert not result.passed
    assert result.message.startswith("weights: entries 0 (key k_1), 1 (key k_2), 2 (key k_3) are off, by up to "
                                     "0.193"), result
    result = checks.check_hand_example(lambda: ([0.787, 0.107, 0.107], 7.0))
    assert "6.8" not in result.message, result.message


# ----------------------------------------------------------------------------- score variance
def test_score_variance_accepts_the_product():
    assert checks.check_score_variance(lambda d_k, var_q, var_k: var_q * var_k).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda d_k, a, b: d_k * a * b, "without the scaling"),
    (lambda d_k, a, b: a + b, "PRODUCT"),
    (lambda d_k, a, b: np.sqrt(a * b), "standard deviations"),
    (lambda d_k, a, b: a * b / d_k, "divided by d_k twice"),
    (lambda d_k, a, b: np.sqrt(d_k) * a * b, "SQUARE of that"),
    (lambda d_k, a, b: 1.0, "differs from the reference"),
    (lambda d_k, a, b: np.array([a, b]), "one number"),
])
def test_score_variance_rejects_planted_mistakes(wrong, words):
    result = checks.check_score_variance(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- additive scores
def additive_ref(q, k, W_q, W_k, w):
    return np.tanh((q @ W_q.T)[:, None, :] + (k @ W_k.T)[None, :, :]) @ w


def test_additive_scores_accepts_reference():
    assert checks.check_additive_scores(additive_ref).passed


def _additive_forgot_T(q, k, W_q, W_k, w):
    if W_q.shape[0] != W_q.shape[1]:
        return additive_ref(q, k, W_q, W_k, w)  # right where a forgotten .T would crash
    return np.tanh((q @ W_q)[:, None, :] + (k @ W_k)[None, :, :]) @ w


def _additive_mutating(q, k, W_q, W_k, w):
    W_q *= 0  # changes the learner's copy only: the checker compares with its own reference
    return additive_ref(q, k, W_q, W_k, w)


@pytest.mark.parametrize("wrong, words", [
    (_additive_forgot_T, "ignore the layout of W_q and W_k"),
    (lambda q, k, W_q, W_k, w: torch.from_numpy(additive_ref(q, k, W_q, W_k, w)), "return a numpy array"),
    (lambda q, k, W_q, W_k, w: ((q @ W_q.T)[:, None, :] + (k @ W_k.T)[None, :, :]) @ w, "no tanh"),
    (lambda q, k, W_q, W_k, w: additive_ref(q, k, W_q, W_k, w).T, "(S, T)"),
    (lambda q, k, W_q, W_k, w: np.tanh(q @ W_q.T + k @ W_k.T) @ w, "raised"),
    (_additive_mutating, "differs"),
])
def test_additive_scores_rejects_planted_mistakes(wrong, words):
    result = checks.check_additive_scores(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- a lookup designed by hand
_KEYS = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]


def _design(keys=_KEYS, q_copy=(0.0, 10.0), q_avg=(0.0, -10.0)):
    return lambda: (np.array(keys), np.array(q_copy), np.array(q_avg))


def test_lookup_design_accepts_a_reference_and_lists():
    assert checks.check_lookup_design(_design()).passed
    assert checks.check_lookup_design(lambda: (_KEYS, [0, 8], [0, -6])).passed


@pytest.mark.parametrize("wrong, message", [
    (_design(q_copy=(0.0, 2.0)),
     "q_copy picks the right key, but softly: weights [0.164, 0.673, 0.164]. Its scaled score beats the next one "
     "by only 1.41; a weight of 0.99 needs a gap of about ln(2 * 99) = 5.3. Make the scores larger (longer vectors)."),
    (_design(q_copy=(10.0, 0.0)),
     "q_copy puts its largest weight on key 1 (weights [0.999, 0.001, 0.0]), so it copies v_1, not v_2: its score "
     "with k_2 must be the largest."),
    (_design(q_copy=(10.0, 10.0)),
     "q_copy ties key 2 with key 1 (weights [0.5, 0.5, 0.0]): equal scores share the weight, so it blends v_2 and "
     "v_1. Its score with k_2 must be the largest, by a clear margin."),
    (_design(q_copy=(0.0, 6.0)),
     "q_copy would copy v_2 if the scores were q.k, but attention divides them by sqrt(d_k) = sqrt(2): the gaps "
     "between the scores shrink, and the weights are [0.014, 0.972, 0.014]. Make the scores larger so that they "
     "work after the scaling."),
    (_design(q_avg=(0.0, -5.0)),
     "q_avg would average v_1 and v_3 if the scores were q.k, but attention divides them by sqrt(d_k) = sqrt(2): "
     "the gaps between the scores shrink, and the weights are [0.493, 0.014, 0.493]. Make the scores larger so "
     "that they work after the scaling."),
    (_design(q_avg=(0.0, 0.0)),
     "q_avg gives every key the same weight ([0.333, 0.333, 0.333]): its scores are all equal (a zero query, or one "
     "orthogonal to every key), so it averages ALL three values. Point q_avg towards the key(s) it should pick."),
    (_design(q_avg=(1.0, -10.0)),
     "q_avg gives keys 1 and 3 the weights 0.804 and 0.196: to average their values equally its scores with k_1 "
     "and k_3 must be equal."),
    (_design(q_avg=(0.0, -2.0)),
     "q_avg splits its weight equally between keys 1 and 3, but key 2 still gets 0.108 (weights [0.446, 0.108, "
     "0.446]): its scaled score must be lower than theirs by at least ln(99 / 2) = 3.9 to keep it under 0.01."),
    (_design(keys=np.array(_KEYS).T),
     "keys has shape (2, 3); expected (3, 2): one key per row, three rows of d_k = 2 numbers."),
    (_design(q_copy=(0.0, 10.0, 0.0)), "q_copy has shape (3,); expected (2,): one query of d_k = 2 numbers."),
    (_design(q_copy=(0.0, np.inf)), "q_copy contains inf; choose finite numbers."),
])
def test_lookup_design_names_each_planted_mistake(wrong, message):
    result = checks.check_lookup_design(wrong)
    assert not result.passed and result.message == message, result.message


def test_lookup_design_leaves_the_learners_arrays_alone():
    keys, q_copy, q_avg = np.array(_KEYS), np.array([0.0, 2.0]), np.array([0.0, -10.0])
    assert not checks.check_lookup_design(lambda: (keys, q_copy, q_avg)).passed  # a soft copy stays a soft copy
    assert q_copy.tolist() == [0.0, 2.0]  # and the checker does not change what the learner returned


# ----------------------------------------------------------------------------- mistakes that crash on the first case
_ADDITIVE_SQUARE = "For T=S=4, d_q=d_k=h=4 (square) it runs, and its answer there shows why: "


def _additive_forgot_T_everywhere(q, k, W_q, W_k, w):
    return np.tanh((q @ W_q)[:, None, :] + (k @ W_k)[None, :, :]) @ w  # crashes where W_q is not square


def _additive_diagonal(q, k, W_q, W_k, w):
    return np.tanh(q @ W_q.T + k @ W_k.T) @ w  # crashes where T != S


@pytest.mark.parametrize("wrong, message", [
    (_additive_forgot_T_everywhere,
     "the projections ignore the layout of W_q and W_k: they are stored (out, in) like nn.Linear.weight, one ROW per "
     "output feature, so projecting a row vector multiplies by the transposed matrix (with square matrices the "
     "untransposed product runs, but it computes something else)."),
    (_additive_diagonal,
     "you added q_i's projection to k_i's only, row by row: that scores each query against ONE key (the diagonal "
     "i = j). Broadcast q's projection as (T, 1, h) and k's as (1, S, h) to score every pair."),
])
def test_additive_scores_names_a_mistake_that_crashes_on_the_first_case(wrong, message):
    result = checks.check_additive_scores(wrong)
    assert not result.passed
    assert result.message.startswith("your function raised ValueError: "), result.message
    assert result.message.endswith(". " + _ADDITIVE_SQUARE + message), result.message


def _masked_softmax(scores, mask, v):
    w = numpy_ref.softmax(np.where(mask, scores, -np.inf))
    return w @ v, w


def masked_without_scale(q, k, v, mask):
    return _masked_softmax(q @ np.swapaxes(k, -1, -2), mask, v)


def masked_with_k_T(q, k, v, mask):
    return _masked_softmax(q @ k.T / np.sqrt(q.shape[-1]), mask, v)  # right for 2-D k only


def test_masked_names_a_missing_scale():
    result = checks.check_masked_attention(masked_without_scale)
    assert not result.passed
    assert result.message == ("for causal mask (5, 5), your weights are the masked softmax of q k^T without the "
                              "scaling: divide the scores by sqrt(d) = sqrt(4) before masking and the softmax."), \
        result.message


def test_masked_names_k_T_on_a_batched_k():
    result = checks.check_masked_attention(masked_with_k_T)
    assert not result.passed
    assert result.message.startswith("your function raised ValueError: "), result.message
    assert result.message.endswith(
        ". For a batch whose k is a cube (B = S = d = 3) it runs, and its answer there shows why: k.T reverses ALL "
        "axes of a batched array: k of shape (B, S, d) becomes (d, S, B), not (B, d, S). Transpose only the last "
        "two axes: np.swapaxes(k, -1, -2)."), result.message


def test_masked_crash_on_a_batch_for_another_reason_is_reported_as_it_was():
    def crashes_on_batches(q, k, v, mask):
        if q.ndim > 2:
            raise ValueError("no batches here")
        return ref_masked(q, k, v, mask)
    result = checks.check_masked_attention(crashes_on_batches)
    assert not result.passed and result.message.startswith("your function raised ValueError: no batches here")
    assert "it runs" not in result.message, result.message


def test_the_crash_probes_do_not_see_inputs_a_function_mutated():
    def mutating_k_T(q, k, v, mask):
        out = masked_with_k_T(q, k, v, mask)
        if k.ndim == 3:
            k *= 0  # its own copy only, in the probe (elsewhere a change in place is named)
        return out
    result = checks.check_masked_attention(mutating_k_T)
    assert not result.passed and result.message.endswith("np.swapaxes(k, -1, -2)."), result.message

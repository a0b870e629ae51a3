"""The notebook-01 checkers accept the reference and reject planted wrong solutions with useful messages."""

from __future__ import annotations

import numpy as np

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

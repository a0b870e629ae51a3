"""check_online_softmax_step accepts the reference and explains what is wrong with planted mistakes."""

import numpy as np

from course_lib import checks
from course_lib.numpy_ref import online_softmax_step


def _state(m, scores):
    m_new = np.maximum(m, scores.max(axis=-1, keepdims=True))
    return m_new, np.where(np.isfinite(m_new), m_new, 0.0)


def forgets_to_rescale_acc(m, l, acc, scores, v_block):
    m_new, shift = _state(m, scores)
    p, c = np.exp(scores - shift), np.exp(m - shift)
    return m_new, l * c + p.sum(-1, keepdims=True), acc + p @ v_block


def forgets_to_rescale_l(m, l, acc, scores, v_block):
    m_new, shift = _state(m, scores)
    p, c = np.exp(scores - shift), np.exp(m - shift)
    return m_new, l + p.sum(-1, keepdims=True), acc * c + p @ v_block


def uses_the_block_max_only(m, l, acc, scores, v_block):
    m_new = scores.max(axis=-1, keepdims=True)
    shift = np.where(np.isfinite(m_new), m_new, 0.0)
    p, c = np.exp(scores - shift), np.exp(m - shift)
    return m_new, l * c + p.sum(-1, keepdims=True), acc * c + p @ v_block


def nan_on_fully_masked_rows(m, l, acc, scores, v_block):
    m_new = np.maximum(m, scores.max(axis=-1, keepdims=True))
    with np.errstate(invalid="ignore"):
        p, c = np.exp(scores - m_new), np.exp(m - m_new)
    return m_new, l * c + p.sum(-1, keepdims=True), acc * c + p @ v_block


def test_reference_passes():
    result = checks.check_online_softmax_step(online_softmax_step)
    assert result.passed, repr(result)
    assert "PASSED" in repr(result)


def test_forgetting_to_rescale_the_accumulator_fails_with_a_hint():
    result = checks.check_online_softmax_step(forgets_to_rescale_acc)
    assert not result.passed
    assert "acc_new" in result.message and "rescale" in result.message and "exp(m - m_new)" in result.message


def test_forgetting_to_rescale_the_sum_fails_with_a_hint():
    result = checks.check_online_softmax_step(forgets_to_rescale_l)
    assert not result.passed
    assert "l_new" in result.message and "rescale" in result.message


def test_block_max_instead_of_running_max_fails():
    result = checks.check_online_softmax_step(uses_the_block_max_only)
    assert not result.passed
    assert "m_new" in result.message and "larger of the old max" in result.message


def test_nan_on_fully_masked_rows_is_explained():
    result = checks.check_online_softmax_step(nan_on_fully_masked_rows)
    assert not result.passed
    assert "nan" in result.message.lower() and "-inf" in result.message


def test_wrong_return_type_is_explained():
    result = checks.check_online_softmax_step(lambda m, l, acc, scores, v_block: acc)
    assert not result.passed and "tuple (m_new, l_new, acc_new)" in result.message

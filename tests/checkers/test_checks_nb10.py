"""check_online_softmax_step accepts the reference and explains what is wrong with planted mistakes."""

import numpy as np
import pytest

from course_lib import checks
from course_lib.cost.io_complexity import tiled_attention_io
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


# ----------------------------------------------------------------------------- tiles a causal kernel visits
def tile_reference(i, j, block_q, block_k, T, S):
    return j * block_k <= min((i + 1) * block_q, T) - 1 + S - T


def test_tile_visited_accepts_reference():
    result = checks.check_tile_visited(tile_reference)
    assert result.passed, result


@pytest.mark.parametrize("wrong, words", [
    (lambda i, j, bq, bk, T, S: j * bk <= min((i + 1) * bq, T) - 1, "top-left"),
    (lambda i, j, bq, bk, T, S: min((j + 1) * bk, S) - 1 <= i * bq + S - T, "PARTLY masked"),
    (lambda i, j, bq, bk, T, S: j * bk <= i * bq + S - T, "FIRST query"),
    (lambda i, j, bq, bk, T, S: j * bk < min((i + 1) * bq, T) - 1 + S - T, "off by one"),
    (lambda i, j, bq, bk, T, S: j <= i, "should be"),
    (lambda i, j, bq, bk, T, S: "yes", "should be"),
])
def test_tile_visited_rejects_planted_mistakes(wrong, words):
    result = checks.check_tile_visited(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- merging two partial results
def merge_reference(m1, l1, a1, m2, l2, a2):
    m = np.maximum(m1, m2)
    shift = np.where(np.isfinite(m), m, 0.0)
    c1, c2 = np.exp(m1 - shift), np.exp(m2 - shift)
    return m, c1 * l1 + c2 * l2, c1 * a1 + c2 * a2


def _merge_variant(kind):
    def fn(m1, l1, a1, m2, l2, a2):
        m = np.maximum(m1, m2)
        shift = np.where(np.isfinite(m), m, 0.0)
        with np.errstate(all="ignore"):
            c1, c2 = np.exp(m1 - shift), np.exp(m2 - shift)
            if kind == "no rescaling":
                return m, l1 + l2, a1 + a2
            if kind == "first only":
                return m, c1 * l1 + l2, c1 * a1 + a2
            if kind == "inverted factor":
                return m, l1 / c1 + l2 / c2, a1 / c1 + a2 / c2
            if kind == "normalised":
                l = c1 * l1 + c2 * l2
                return m, l, (c1 * a1 + c2 * a2) / l
            if kind == "nan on empty rows":
                c1, c2 = np.exp(m1 - m), np.exp(m2 - m)
                return m, c1 * l1 + c2 * l2, c1 * a1 + c2 * a2
            if kind == "mutates":
                m1[:] = -np.inf  # its copy only: the answer is then wrong, and the checker's inputs intact
                return merge_reference(m1, l1, a1, m2, l2, a2)
        raise AssertionError(kind)
    return fn


def test_merge_partials_accepts_reference():
    result = checks.check_merge_partials(merge_reference)
    assert result.passed, result


@pytest.mark.parametrize("kind, words", [
    ("no rescaling", "without rescaling"),
    ("first only", "only the first"),
    ("inverted factor", "exp(m_i - m) <= 1"),
    ("normalised", "normalised output"),
    ("nan on empty rows", "row 4"),
    ("mutates", "differs"),
])
def test_merge_partials_rejects_planted_mistakes(kind, words):
    result = checks.check_merge_partials(_merge_variant(kind))
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- traffic of a causal tiled loop
def traffic_reference(T, d, block_q, block_k):
    kv = 0
    for i in range(-(-T // block_q)):
        last_query = min((i + 1) * block_q, T) - 1
        kv += sum(min(block_k, T - s0) for s0 in range(0, T, block_k) if s0 <= last_query)
    return 2 * T * d + 2 * d * kv


def test_causal_tiled_traffic_accepts_reference():
    result = checks.check_causal_tiled_traffic(traffic_reference)
    assert result.passed, result


@pytest.mark.parametrize("wrong, words", [
    (lambda T, d, bq, bk: tiled_attention_io(T, T, d, block_q=bq), "NON-causal"),
    (lambda T, d, bq, bk: 2 * T * d + (tiled_attention_io(T, T, d, block_q=bq) - 2 * T * d) / 2, "halved"),
    (lambda T, d, bq, bk: 2 * T * d + (traffic_reference(T, d, bq, bk) - 2 * T * d) / 2, "value tiles"),
    (lambda T, d, bq, bk: traffic_reference(T, d, bq, bk) - 2 * T * d, "queries and writing the output"),
    (lambda T, d, bq, bk: traffic_reference(T, d, bq, bk) + 1, "Hint"),
])
def test_causal_tiled_traffic_rejects_planted_mistakes(wrong, words):
    result = checks.check_causal_tiled_traffic(wrong)
    assert not result.passed and words in result.message, result.message


def test_causal_tiled_traffic_names_full_size_last_tiles():
    def whole_tiles(T, d, block_q, block_k):
        tiles = sum(1 for i in range(-(-T // block_q)) for s0 in range(0, T, block_k)
                    if s0 <= min((i + 1) * block_q, T) - 1)
        return 2 * T * d + 2 * d * block_k * tiles

    result = checks.check_causal_tiled_traffic(whole_tiles)
    assert not result.passed and "last key tile is shorter" in result.message, result.message


def test_online_softmax_step_rejects_an_answer_that_changes_its_state_in_place():
    def resets_l(m, l, acc, scores, v_block):
        l[:] = 0.0  # its private copy only: the sum of the earlier blocks is lost
        return online_softmax_step(m, l, acc, scores, v_block)

    result = checks.check_online_softmax_step(resets_l)
    assert not result.passed and "l_new" in result.message, result.message

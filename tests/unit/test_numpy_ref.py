"""course_lib.numpy_ref: softmax stability, attention properties, the backward pass, bad input."""

import numpy as np
import pytest
from helpers import assert_clear_error, central_difference
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from course_lib import numpy_ref as nr


# ----------------------------------------------------------------------------- softmax
def test_softmax_is_stable_for_huge_logits():
    x = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4], [1e4, 1e4, 1e4]])
    p = nr.softmax(x)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]], atol=1e-15)


def test_softmax_of_all_minus_inf_row_is_zero_not_nan():
    p = nr.softmax(np.array([[-np.inf, -np.inf], [0.0, -np.inf]]))
    np.testing.assert_array_equal(p, [[0, 0], [1, 0]])


def test_softmax_axis():
    x = np.random.default_rng(0).normal(size=(3, 4))
    np.testing.assert_allclose(nr.softmax(x, axis=0).sum(axis=0), 1.0)
    np.testing.assert_allclose(nr.softmax(x, axis=0), nr.softmax(x.T).T)


@given(
    arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 6)), elements=st.floats(-1e4, 1e4)),
    st.floats(-1e3, 1e3),
)
def test_softmax_rows_sum_to_one_and_shift_invariant(x, c):
    p = nr.softmax(x)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(nr.softmax(x + c), p, atol=1e-12)


# ----------------------------------------------------------------------------- attention properties
@st.composite
def attention_inputs(draw, with_mask=True):
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    T, S, d, d_v = (draw(st.integers(1, 7)) for _ in range(4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(*batch, T, d)), rng.normal(size=(*batch, S, d)), rng.normal(size=(*batch, S, d_v))
    mask = rng.random((*batch, T, S)) < draw(st.floats(0.2, 1.0)) if with_mask and draw(st.booleans()) else None
    return q, k, v, mask


@given(attention_inputs())
def test_weight_rows_sum_to_one_or_zero_when_fully_masked(inputs):
    q, k, v, mask = inputs
    out, w = nr.scaled_dot_product_attention(q, k, v, mask)
    expected = np.ones(w.shape[:-1]) if mask is None else mask.any(-1).astype(float)
    np.testing.assert_allclose(w.sum(-1), expected, atol=1e-12)
    assert np.isfinite(out).all() and np.isfinite(w).all()
    if mask is not None:
        assert (w[~mask] == 0).all()
        np.testing.assert_array_equal(out[~mask.any(-1)], 0.0)


@given(attention_inputs(), st.integers(0, 2**32 - 1))
def test_adding_a_constant_to_a_row_of_logits_changes_nothing(inputs, seed):
    q, k, v, _ = inputs
    row_shift = np.random.default_rng(seed).normal(scale=100.0, size=(*q.shape[:-1], 1))  # (..., T, 1)
    out, w = nr.scaled_dot_product_attention(q, k, v)
    out2, w2 = nr.scaled_dot_product_attention(q, k, v, mask=row_shift)  # a float mask is added to the scores
    np.testing.assert_allclose(w2, w, atol=1e-10)
    np.testing.assert_allclose(out2, out, atol=1e-10)


@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_self_attention_without_positions_is_permutation_equivariant(T, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, d))
    perm = rng.permutation(T)
    out, _ = nr.scaled_dot_product_attention(x, x, x)
    out_perm, _ = nr.scaled_dot_product_attention(x[perm], x[perm], x[perm])
    np.testing.assert_allclose(out_perm, out[perm], atol=1e-12)


@given(attention_inputs(), st.integers(0, 2**32 - 1))
def test_keys_and_values_at_masked_positions_do_not_matter(inputs, seed):
    q, k, v, mask = inputs
    if mask is None:
        return
    rng = np.random.default_rng(seed)
    key_used = mask.any(axis=-2, keepdims=True).swapaxes(-1, -2)  # (..., S, 1): some query may see key s
    k2 = np.where(key_used, k, rng.normal(scale=50.0, size=k.shape))
    v2 = np.where(key_used, v, rng.normal(scale=50.0, size=v.shape))
    out, _ = nr.scaled_dot_product_attention(q, k, v, mask)
    out2, _ = nr.scaled_dot_product_attention(q, k2, v2, mask)
    np.testing.assert_allclose(out2, out, atol=1e-10)


def test_masked_key_changes_only_queries_that_cannot_see_it_nowhere():
    """Changing an *unmasked* key does change the output (the property test above is not vacuous)."""
    rng = np.random.default_rng(1)
    q, k, v = rng.normal(size=(3, 4)), rng.normal(size=(5, 4)), rng.normal(size=(5, 2))
    mask = np.ones((3, 5), bool)
    mask[:, 2] = False
    base, _ = nr.scaled_dot_product_attention(q, k, v, mask)
    v_masked, v_visible = v.copy(), v.copy()
    v_masked[2] += 100
    v_visible[1] += 100
    assert np.allclose(nr.scaled_dot_product_attention(q, k, v_masked, mask)[0], base)
    assert not np.allclose(nr.scaled_dot_product_attention(q, k, v_visible, mask)[0], base)


def test_scaling_matches_the_formula():
    rng = np.random.default_rng(2)
    q, k, v = rng.normal(size=(4, 16)), rng.normal(size=(6, 16)), rng.normal(size=(6, 3))
    s = q @ k.T / 4.0  # sqrt(16)
    w = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    out, weights = nr.scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(weights, w, atol=1e-14)
    np.testing.assert_allclose(out, w @ v, atol=1e-14)


def test_batch_dims_broadcast():
    rng = np.random.default_rng(3)
    q, k, v = rng.normal(size=(2, 1, 4, 8)), rng.normal(size=(3, 5, 8)), rng.normal(size=(3, 5, 2))
    out, w = nr.scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 3, 4, 2) and w.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(out[1, 2], nr.scaled_dot_product_attention(q[1, 0], k[2], v[2])[0], atol=1e-14)


# ----------------------------------------------------------------------------- backward
def _loss(q, k, v, d_out, mask):
    return float(np.sum(nr.scaled_dot_product_attention(q, k, v, mask)[0] * d_out))


def test_backward_sums_over_broadcast_batch_dims():
    rng = np.random.default_rng(5)
    q, k, v = rng.normal(size=(2, 3, 4)), rng.normal(size=(1, 5, 4)), rng.normal(size=(5, 3))
    d_out = rng.normal(size=(2, 3, 3))
    dq, dk, dv = nr.scaled_dot_product_attention_backward(q, k, v, d_out)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    fd = central_difference(lambda: _loss(q, k, v, d_out, None), k)
    np.testing.assert_allclose(dk, fd, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- bad input
rng = np.random.default_rng(7)
Q, K, V = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 6))
BAD_INPUTS = [
    # (description, call, exception, words the message must contain)
    ("q of rank 1", lambda: nr.scaled_dot_product_attention(np.ones(4), K, V), ValueError, ["q", "at least 2", "(4)"]),
    ("k of rank 1", lambda: nr.scaled_dot_product_attention(Q, np.ones(4), V), ValueError, ["k", "at least 2"]),
    (
        "q/k feature size mismatch",
        lambda: nr.scaled_dot_product_attention(Q, K[..., :3], V),
        ValueError,
        ["q and k", "d=4", "d=3"],
    ),
    (
        "k/v length mismatch",
        lambda: nr.scaled_dot_product_attention(Q, K, V[:, :4]),
        ValueError,
        ["k and v", "S=5", "S=4"],
    ),
    (
        "batch dims do not broadcast",
        lambda: nr.scaled_dot_product_attention(Q, np.ones((3, 5, 4)), np.ones((3, 5, 6))),
        ValueError,
        ["batch", "(2, 3, 4)", "(3, 5, 4)"],
    ),
    (
        "mask transposed",
        lambda: nr.scaled_dot_product_attention(Q, K, V, np.ones((5, 3), bool)),
        ValueError,
        ["mask", "(5, 3)", "(2, 3, 5)"],
    ),
    (
        "mask that would enlarge the result",
        lambda: nr.scaled_dot_product_attention(Q, K, V, np.ones((4, 2, 3, 5), bool)),
        ValueError,
        ["mask", "(4, 2, 3, 5)", "cannot broadcast"],
    ),
    (
        "integer mask",
        lambda: nr.scaled_dot_product_attention(Q, K, V, np.ones((3, 5), int)),
        TypeError,
        ["mask", "boolean", "int64"],
    ),
    (
        "float mask with NaN",
        lambda: nr.scaled_dot_product_attention(Q, K, V, np.full((3, 5), np.nan)),
        ValueError,
        ["mask", "NaN"],
    ),
    ("complex q", lambda: nr.scaled_dot_product_attention(Q.astype(complex), K, V), TypeError, ["q", "complex128"]),
    ("object v", lambda: nr.scaled_dot_product_attention(Q, K, V.astype(object)), TypeError, ["v", "object"]),
    ("string k", lambda: nr.scaled_dot_product_attention(Q, np.full((2, 5, 4), "a"), V), TypeError, ["k", "<U1"]),
    (
        "d_out of the wrong shape",
        lambda: nr.scaled_dot_product_attention_backward(Q, K, V, np.ones((2, 3, 4))),
        ValueError,
        ["d_out", "(2, 3, 6)", "(2, 3, 4)"],
    ),
    ("block_size 0", lambda: nr.online_softmax_attention(Q, K, V, block_size=0), ValueError, ["block_size", "0"]),
    ("softmax of strings", lambda: nr.softmax(np.array(["a", "b"])), TypeError, ["x", "<U1"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(case):
    _, call, exc, words = case
    assert_clear_error(call, exc, words)


def test_integer_inputs_are_promoted_not_rejected():
    out, w = nr.scaled_dot_product_attention([[1, 0], [0, 1]], [[1, 0], [0, 1]], [[1, 2], [3, 4]])
    assert out.dtype == np.float64 and w.shape == (2, 2)

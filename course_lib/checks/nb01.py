"""Checkers for the exercises of notebook 01 (attention in numpy).

Each checker calls the learner's function on a few fixed cases, compares with
`course_lib.numpy_ref`, and when something is off tries to say *why* (wrong axis,
missing 1/sqrt(d), overflow, transposed weights, inverted mask) rather than only *that*.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from course_lib import numpy_ref
from course_lib.checks._core import CheckFailure, as_array, call, checker, compare, is_close, unpack

__all__ = ["check_scaled_scores", "check_softmax", "check_attention", "check_masked_attention"]


def _rng() -> np.random.Generator:
    return np.random.default_rng(2024)


def _row(idx: tuple[int, ...]) -> str:
    return str(idx[0]) if len(idx) == 1 else str(idx)


def _unpack_pair(result, what: str) -> tuple:
    """(out, weights) as returned, and as float64 arrays for the diagnosis (compare sees their dtype)."""
    answer = unpack(result, 2, f"{what} must return a pair (out, weights)")
    return answer, (as_array("out", answer[0]), as_array("weights", answer[1]))


# ----------------------------------------------------------------------------------------------
# Exercise 1: scores = q k^T / sqrt(d)
# ----------------------------------------------------------------------------------------------
def _scores_cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = _rng()
    return [
        ("q (3, 4), k (5, 4)", rng.normal(size=(3, 4)), rng.normal(size=(5, 4))),
        ("q (2, 6, 16), k (2, 7, 16)", rng.normal(size=(2, 6, 16)), rng.normal(size=(2, 7, 16))),
        ("q (2, 3, 4, 9), k (2, 3, 6, 9)", rng.normal(size=(2, 3, 4, 9)), rng.normal(size=(2, 3, 6, 9))),
    ]


@checker
def check_scaled_scores(fn: Callable) -> str:
    """Check scaled dot-product scores.

    Your function: `fn(q, k) -> scores`, with q (..., T, d) and k (..., S, d) float64 arrays with
    any number of leading batch axes, returning scores (..., T, S) = q @ k^T / sqrt(d).
    Checks three cases (no batch axis, one, two; T != S) against the formula, and names a missing
    scale, a division by d, k q^T instead of q k^T, and k.T on a batched k (it reverses every axis).
    """
    cases = _scores_cases()
    for label, q, k in cases:
        try:
            answer = call(fn, q.copy(), k.copy())
        except CheckFailure as failure:
            if q.ndim > 2 and "raised" in str(failure):
                raise CheckFailure(f"{failure}. Hint: for batched inputs transpose only the last two axes, "
                                   f"np.swapaxes(k, -1, -2); k.T reverses ALL axes.") from None
            raise
        got = as_array("scores", answer)
        raw = q @ np.swapaxes(k, -1, -2)  # (..., T, S)
        d = q.shape[-1]
        expected = raw / np.sqrt(d)
        T, S = q.shape[-2], k.shape[-2]
        if got.shape == (*q.shape[:-2], S, T) and T != S:
            raise CheckFailure(f"for {label} your scores have shape {got.shape}, i.e. (..., S, T): you computed "
                               f"k q^T. Scores are (..., T, S) = q @ k^T, one row per query.")
        if got.shape != expected.shape:
            raise CheckFailure(f"for {label} your scores have shape {got.shape}, expected (..., T, S) = "
                               f"{expected.shape}. Hint: transpose only the last two axes of k "
                               f"(np.swapaxes(k, -1, -2)); k.T reverses ALL axes of a batched array.")
        if is_close(got, raw):
            raise CheckFailure(f"for {label} your scores equal q @ k^T without the scaling: divide by sqrt(d) = "
                               f"sqrt({d}) so that their variance stays about 1 whatever d is.")
        if is_close(got, raw / d):
            raise CheckFailure(f"for {label} you divided by d = {d}; divide by sqrt(d) = {np.sqrt(d):.3g} instead.")
        compare(f"scores for {label}", answer, expected, hint="scores = q @ swapaxes(k, -1, -2) / sqrt(q.shape[-1])")
    return f"{len(cases)} cases (with and without batch dimensions, T != S) match q k^T / sqrt(d)"


# ----------------------------------------------------------------------------------------------
# Exercise 2: a stable softmax
# ----------------------------------------------------------------------------------------------
def _softmax_sums_to_one_along(got: np.ndarray) -> list[int]:
    with np.errstate(invalid="ignore"):
        return [ax for ax in range(got.ndim) if np.allclose(got.sum(axis=ax), 1.0)]


@checker
def check_softmax(fn: Callable) -> str:
    """Check a numerically stable softmax.

    Your function: `fn(x, axis=-1) -> p`, the softmax of the array x along `axis`, same shape as x.
    Checks an ordinary (3, 5) array, logits of +-1e4 and 1000..1002 (exp overflows unless the row
    maximum is subtracted), a batched (2, 3, 4) array with the default axis, and axis=0 and 1; names
    normalising the wrong axis, rows that do not sum to 1, overflow to NaN and a hard-coded axis.
    """
    rng = _rng()
    ordinary = rng.normal(size=(3, 5))
    answer = call(fn, ordinary.copy())
    got = as_array("softmax(x)", answer)
    expected = numpy_ref.softmax(ordinary)
    if got.shape == expected.shape and not is_close(got, expected):
        if is_close(got, numpy_ref.softmax(ordinary, axis=0)):
            raise CheckFailure("softmax(x) of a (3, 5) array normalised each COLUMN (axis 0). By default it must "
                               "normalise along the last axis: every row (x[i, :]) sums to 1. Hint: "
                               "np.sum(..., axis=axis, keepdims=True).")
        with np.errstate(invalid="ignore"):
            sums = got.sum(axis=-1)
        if np.all(np.isfinite(sums)) and not np.allclose(sums, 1.0):
            raise CheckFailure(f"the rows of softmax(x) should sum to 1; yours sum to {np.round(sums, 4).tolist()}. "
                               f"Hint: divide exp(x) by its sum along the axis.")
    compare("softmax(x) for x of shape (3, 5)", answer, expected, hint="exp(x) / sum(exp(x)) along the last axis")

    extreme = np.array([[1e4, 0.0, -1e4], [1000.0, 1001.0, 1002.0], [-1e4, -1e4 + 1.0, -1e4]])
    with np.errstate(all="ignore"):
        got = call(fn, extreme.copy())
    compare("softmax of large logits [[1e4, 0, -1e4], [1000, 1001, 1002], [-1e4, -1e4+1, -1e4]]",
            got, numpy_ref.softmax(extreme),
            hint="exp(1000) overflows to inf and inf/inf = NaN; exp(-1e4) underflows to 0 and 0/0 = NaN. "
                 "Subtract the row maximum before exp (softmax(x) = softmax(x - max x), the log-sum-exp trick).")

    batched = rng.normal(size=(2, 3, 4)) * 3.0
    answer = call(fn, batched.copy())
    got = as_array("softmax(x)", answer)
    if got.shape == batched.shape and not is_close(got, numpy_ref.softmax(batched)):
        axes = _softmax_sums_to_one_along(got)
        if axes and (batched.ndim - 1) not in axes:
            raise CheckFailure(f"softmax(x) of a (2, 3, 4) array sums to 1 along axis {axes[0]}, not the last axis. "
                               f"Use axis=-1 (not a fixed axis=1) so that batched inputs work.")
    compare("softmax(x) for x of shape (2, 3, 4)", answer, numpy_ref.softmax(batched),
            hint="normalise along the last axis, whatever the number of dimensions")

    for axis in (0, 1):
        got = call(fn, batched.copy(), axis=axis, what=f", axis={axis}")
        compare(f"softmax(x, axis={axis}) for x of shape (2, 3, 4)", got, numpy_ref.softmax(batched, axis=axis),
                hint="use the `axis` argument in both the max and the sum, with keepdims=True")
    return "ordinary, batched and +-1e4 logits match; rows sum to 1; the axis argument works"


# ----------------------------------------------------------------------------------------------
# Exercise 3: scaled dot-product attention
# ----------------------------------------------------------------------------------------------
def _attention_cases() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    rng = _rng()
    cases = []
    for label, q_shape, k_shape, d_v in [
        ("T=3, S=5, d=4, d_v=2", (3, 4), (5, 4), 2),
        ("batch (2, 3), T=4, S=6, d=8, d_v=5", (2, 3, 4, 8), (2, 3, 6, 8), 5),
        ("T=S=7, d=16, d_v=16", (7, 16), (7, 16), 16),
    ]:
        q, k = rng.normal(size=q_shape), rng.normal(size=k_shape)
        v = rng.normal(size=(*k_shape[:-1], d_v))
        cases.append((label, q, k, v))
    # large logits: q.k/sqrt(d) reaches ~1e3, beyond exp's float64 range (exp(710) = inf)
    q, k, v = rng.normal(size=(4, 8)) * 30, rng.normal(size=(6, 8)) * 30, rng.normal(size=(6, 3))
    cases.append(("large scores (|q.k|/sqrt(d) up to ~1e3)", q, k, v))
    return cases


def _diagnose_attention(label: str, q, k, v, answer: tuple, out: np.ndarray, weights: np.ndarray) -> None:
    expected_out, expected_w = numpy_ref.scaled_dot_product_attention(q, k, v)
    T, S = q.shape[-2], k.shape[-2]
    if weights.shape == (*expected_w.shape[:-2], S, T) and S != T:
        raise CheckFailure(f"for {label}, weights have shape {weights.shape} = (..., S, T): they are transposed. "
                           f"weights[..., i, j] is how much query i attends to key j, so the shape is (..., T, S) "
                           f"= {expected_w.shape}, and each row sums to 1.")
    if weights.shape != expected_w.shape:
        raise CheckFailure(f"for {label}, weights have shape {weights.shape}, expected (..., T, S) = "
                           f"{expected_w.shape}.")
    if not np.all(np.isfinite(weights)):
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(weights))[0])
        raise CheckFailure(f"for {label}, weights contain {weights[idx]} at index {idx}: exp of scores this large "
                           f"overflows (exp(710) = inf in float64, exp(89) = inf in float32) and inf/inf = NaN. "
                           f"Use a stable softmax: subtract each row's maximum score before exp.")
    if not is_close(weights, expected_w) and np.all(np.isfinite(weights)):
        raw = q @ np.swapaxes(k, -1, -2)
        with np.errstate(all="ignore"):
            if is_close(weights, numpy_ref.softmax(raw)):
                raise CheckFailure(f"for {label}, your weights are softmax(q k^T) without the scaling: divide the "
                                   f"scores by sqrt(d) = sqrt({q.shape[-1]}) before the softmax.")
            if v.shape[-1] != q.shape[-1] and is_close(weights, numpy_ref.softmax(raw / np.sqrt(v.shape[-1]))):
                raise CheckFailure(f"for {label}, you scaled by sqrt(d_v) = sqrt({v.shape[-1]}); the scale is "
                                   f"sqrt(d) of the query/key size, q.shape[-1] = {q.shape[-1]}.")
            if is_close(weights, numpy_ref.softmax(raw / np.sqrt(q.shape[-1]), axis=-2)):
                raise CheckFailure(f"for {label}, your softmax normalised over the queries (axis -2): each COLUMN "
                                   f"sums to 1. Each query's row must sum to 1: softmax over the keys, axis -1.")
    compare(f"weights for {label}", answer[1], expected_w, hint="weights = softmax(q @ k^T / sqrt(d), axis=-1)")
    if out.shape != expected_out.shape:
        raise CheckFailure(f"for {label}, out has shape {out.shape}, expected (..., T, d_v) = {expected_out.shape}. "
                           f"Hint: out = weights @ v.")
    compare(f"out for {label}", answer[0], expected_out, hint="out = weights @ v (a weighted sum of the value rows)")


@checker
def check_attention(fn: Callable) -> str:
    """Check scaled dot-product attention in numpy.

    Your function: `fn(q, k, v) -> (out, weights)`, with q (..., T, d), k (..., S, d), v (..., S, d_v);
    weights (..., T, S) = softmax(q k^T / sqrt(d)) over the keys, out (..., T, d_v) = weights @ v.
    Checks four cases (batch axes, T != S, d != d_v, scores large enough to overflow exp) against
    numpy_ref; names transposed weights, overflow, a missing scale, scaling by sqrt(d_v) and a softmax
    over the queries.
    """
    cases = _attention_cases()
    for label, q, k, v in cases:
        with np.errstate(all="ignore"):
            result = call(fn, q.copy(), k.copy(), v.copy())
        answer, (out, weights) = _unpack_pair(result, "your attention function")
        _diagnose_attention(label, q, k, v, answer, out, weights)
    return f"{len(cases)} cases (batch dims, T != S, d != d_v, large scores) match numpy_ref"


# ----------------------------------------------------------------------------------------------
# Exercise 4: masked attention (bool mask, True = may attend; fully masked rows -> 0)
# ----------------------------------------------------------------------------------------------
def _masked_cases() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    rng = _rng()
    T = 5
    causal = np.tril(np.ones((T, T), dtype=bool))  # (T, T)
    q, k, v = rng.normal(size=(T, 4)), rng.normal(size=(T, 4)), rng.normal(size=(T, 3))
    cases = [("causal mask (5, 5)", q, k, v, causal)]
    # padding: batch of 2, the second sequence has 3 real keys out of 6; (B, 1, S) broadcasts over queries
    q, k, v = rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 6, 8)), rng.normal(size=(2, 6, 2))
    padding = np.arange(6)[None, None, :] < np.array([6, 3])[:, None, None]  # (2, 1, 6)
    cases.append(("padding mask (2, 1, 6), T=4, S=6", q, k, v, padding))
    # a row with nothing to attend to (query 1 sees no key) must give weights 0 and output 0
    q, k, v = rng.normal(size=(3, 4)), rng.normal(size=(4, 4)), rng.normal(size=(4, 2))
    mask = np.array([[True, True, False, False], [False, False, False, False], [True, False, True, True]])
    cases.append(("mask (3, 4) whose row 1 is all False", q, k, v, mask))
    return cases


@checker
def check_masked_attention(fn: Callable) -> str:
    """Check masked scaled dot-product attention in numpy.

    Your function: `fn(q, k, v, mask) -> (out, weights)` as for check_attention, with a bool mask
    broadcastable to (..., T, S), True = may attend. A query that may attend to nothing gets weights 0
    and output 0. Checks a causal mask, a (B, 1, S) padding mask and a mask with a fully masked row
    against numpy_ref; names an inverted mask, masking by adding a small number, and the uniform
    weights that a finite fill such as -1e9 gives a fully masked row.
    """
    cases = _masked_cases()
    for label, q, k, v, mask in cases:
        with np.errstate(all="ignore"):
            result = call(fn, q.copy(), k.copy(), v.copy(), mask.copy())
        answer, (out, weights) = _unpack_pair(result, "your masked attention function")
        expected_out, expected_w = numpy_ref.scaled_dot_product_attention(q, k, v, mask)
        if weights.shape == expected_w.shape and not is_close(weights, expected_w):
            inverted_w = numpy_ref.scaled_dot_product_attention(q, k, v, ~mask)[1]
            if is_close(weights, inverted_w):
                raise CheckFailure(f"for {label}, your weights are those of the INVERTED mask. In this course "
                                   f"True means 'may attend': keep the scores where mask is True and set them "
                                   f"to -inf where it is False.")
            full = np.broadcast_to(mask, expected_w.shape)
            leaked = (weights > 1e-12) & ~full
            if leaked.any():
                idx = tuple(int(i) for i in np.argwhere(leaked)[0])
                if not full.any(axis=-1)[idx[:-1]]:
                    raise CheckFailure(f"for {label}, query row {_row(idx[:-1])} may attend to nothing, but your "
                                       f"weights there are {np.round(weights[idx[:-1]], 4).tolist()}. A fully "
                                       f"masked row must give weights 0 and output 0 (not a uniform average, "
                                       f"which is what a finite fill value like -1e9 produces).")
                raise CheckFailure(f"for {label}, key {idx[-1]} is masked (mask False) for query {_row(idx[:-1])} but "
                                   f"gets weight {weights[idx]:.4g}. Masked scores must become -inf (exp(-inf) = 0);"
                                   f" adding a small number such as +1 or -1 does not mask anything.")
        compare(f"weights for {label}", answer[1], expected_w,
                hint="scores = np.where(mask, q @ k^T / sqrt(d), -inf), then a softmax that maps an all -inf row "
                     "to zeros")
        compare(f"out for {label}", answer[0], expected_out, hint="out = weights @ v")
    return f"{len(cases)} cases (causal, padding with batch, a fully masked row) match numpy_ref"

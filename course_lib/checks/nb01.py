"""Checkers for the exercises of notebook 01 (attention in numpy).

Each checker calls the learner's function on a few fixed cases, compares with
`course_lib.numpy_ref`, and when something is off tries to say *why* (wrong axis,
missing 1/sqrt(d), overflow, transposed weights, inverted mask) rather than only *that*.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from course_lib import numpy_ref
from course_lib.checks._core import (
    CheckFailure,
    as_array,
    call,
    call_watching,
    checker,
    compare,
    diagnose,
    is_close,
    unpack,
)

__all__ = [
    "check_scaled_scores",
    "check_softmax",
    "check_attention",
    "check_masked_attention",
    "check_hand_example",
    "check_score_variance",
    "check_additive_scores",
    "check_lookup_design",
]


def _rng() -> np.random.Generator:
    return np.random.default_rng(2024)


def _row(idx: tuple[int, ...]) -> str:
    return str(idx[0]) if len(idx) == 1 else str(idx)


def _unpack_pair(result, what: str) -> tuple:
    """(out, weights) as returned, and as float64 arrays for the diagnosis (compare sees their dtype)."""
    answer = unpack(result, 2, f"{what} must return a pair (out, weights)")
    return answer, (as_array("out", answer[0]), as_array("weights", answer[1]))


def _explain_crash(crash: CheckFailure, probes) -> CheckFailure:
    """A crash on one case, explained: `probes` are (label, probe) pairs, each probe running the learner's
    function on inputs where the suspected mistake runs and returning its message if the answer there is
    that mistake's. The first such message joins the crash; without one the crash is returned as it was."""
    for label, probe in probes:
        try:
            message = probe()
        except CheckFailure:
            continue
        if message:
            return CheckFailure(f"{crash}. For {label} it runs, and its answer there shows why: {message}.")
    return crash


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
        compare(f"scores for {label}", answer, expected, hint=("every query meets every key: one dot product per "
                                                                "(query, key) pair, divided by the square root of "
                                                                "the key size; leading batch axes come along "
                                                                "unchanged"))
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
    compare(f"weights for {label}", answer[1], expected_w, hint=("each query's weights are the softmax, over the "
                                                                  "keys, of its scaled dot products with every key"))
    if out.shape != expected_out.shape:
        raise CheckFailure(f"for {label}, out has shape {out.shape}, expected (..., T, d_v) = {expected_out.shape}. "
                           f"Hint: out = weights @ v.")
    compare(f"out for {label}", answer[0], expected_out, hint=("each output row averages the value rows, weighted by "
                                                               "that query's attention weights"))


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


_BATCHED_K_T = ("k.T reverses ALL axes of a batched array: k of shape (B, S, d) becomes (d, S, B), not (B, d, S). "
                "Transpose only the last two axes: np.swapaxes(k, -1, -2)")


def _batched_k_T_probe(fn: Callable) -> str | None:
    """_BATCHED_K_T if fn's weights, on a batch where k is a cube (B = S = d, so that k.T runs), are those of
    scores q @ k.T; else None. Raises CheckFailure if fn crashes there too."""
    rng = np.random.default_rng(7)
    n = 3
    q, k, v = rng.normal(size=(n, 2, n)), rng.normal(size=(n, n, n)), rng.normal(size=(n, n, 2))
    mask = np.arange(n)[None, None, :] < np.array([3, 2, 1])[:, None, None]  # (B, 1, S) padding
    with np.errstate(all="ignore"):
        _, (_, weights) = _unpack_pair(call(fn, q, k, v, mask), "your masked attention function")
    reversed_w = numpy_ref.softmax(np.where(mask, q @ k.T / np.sqrt(n), -np.inf))  # k.T is (d, S, B)
    return _BATCHED_K_T if is_close(weights, reversed_w) else None


_NUMPY_ADVICE = ("Scaling or masking an input with /=, *= or x[...] = ... writes into the caller's array; compute a "
                 "new array from it instead (a plain division or np.where makes one)")


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
    against numpy_ref; names an inverted mask, a missing 1/sqrt(d), k.T on a batched k (it reverses
    every axis), masking by adding a small number, the uniform weights that a finite fill such as
    -1e9 gives a fully masked row, a softmax over the queries, the pair in the wrong order, and an
    input changed in place.
    """
    cases = _masked_cases()
    for label, q, k, v, mask in cases:
        try:
            with np.errstate(all="ignore"):
                result = call_watching(fn, q.copy(), k.copy(), v.copy(), mask.copy(), names=("q", "k", "v", "mask"),
                                       advice=_NUMPY_ADVICE)
        except CheckFailure as crash:
            if "in place" in str(crash):
                raise
            cube = [("a batch whose k is a cube (B = S = d = 3)", lambda: _batched_k_T_probe(fn))]
            raise _explain_crash(crash, cube if k.ndim > 2 else []) from None
        answer, (out, weights) = _unpack_pair(result, "your masked attention function")
        expected_out, expected_w = numpy_ref.scaled_dot_product_attention(q, k, v, mask)
        if is_close(out, expected_w) and is_close(weights, expected_out):
            raise CheckFailure(f"for {label}, your pair is in the wrong order: the output comes first, then the "
                               f"weights, (out, weights), as attention returns them.")
        if weights.shape == expected_w.shape and not is_close(weights, expected_w):
            inverted_w = numpy_ref.scaled_dot_product_attention(q, k, v, ~mask)[1]
            if is_close(weights, inverted_w):
                raise CheckFailure(f"for {label}, your weights are those of the INVERTED mask. In this course "
                                   f"True means 'may attend': keep the scores where mask is True and set them "
                                   f"to -inf where it is False.")
            d = q.shape[-1]
            unscaled_w = numpy_ref.scaled_dot_product_attention(q * np.sqrt(d), k, v, mask)[1]  # softmax(q k^T)
            if is_close(weights, unscaled_w):
                raise CheckFailure(f"for {label}, your weights are the masked softmax of q k^T without the scaling: "
                                   f"divide the scores by sqrt(d) = sqrt({d}) before masking and the softmax.")
            full = np.broadcast_to(mask, expected_w.shape)
            scaled = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])  # (..., T, S)
            with np.errstate(all="ignore"):
                over_queries = numpy_ref.softmax(np.where(full, scaled, -np.inf), axis=-2)
            if is_close(weights, over_queries):
                raise CheckFailure(f"for {label}, your softmax normalised over the queries (axis -2): each COLUMN "
                                   f"sums to 1. Each query's row of weights must sum to 1, over the keys it may "
                                   f"attend to.")
            plain = numpy_ref.softmax(scaled)  # (..., T, S) unmasked
            if is_close(weights, plain * full):
                raise CheckFailure(f"for {label}, you masked after the softmax: the weights are softmax(scores) with "
                                   f"the masked entries set to 0, so the kept weights no longer sum to 1 (row sums "
                                   f"{np.round(weights.sum(-1), 3).ravel()[:4].tolist()}...). Mask the SCORES with "
                                   f"-inf before the softmax (or renormalise the kept weights).")
            leaked = (weights > 1e-12) & ~full
            if leaked.any():
                idx = tuple(int(i) for i in np.argwhere(leaked)[0])
                if not full[idx[:-1]].any():
                    raise CheckFailure(f"for {label}, query row {_row(idx[:-1])} may attend to nothing, but your "
                                       f"weights there are {np.round(weights[idx[:-1]], 4).tolist()}. A fully "
                                       f"masked row must give weights 0 and output 0 (not a uniform average, "
                                       f"which is what a finite fill value like -1e9 produces).")
                raise CheckFailure(f"for {label}, key {idx[-1]} is masked (mask False) for query {_row(idx[:-1])} but "
                                   f"gets weight {weights[idx]:.4g}. Masked scores must become -inf (exp(-inf) = 0);"
                                   f" adding a small number such as +1 or -1 does not mask anything.")
        empty = ~np.broadcast_to(mask, expected_w.shape).any(axis=-1)  # (..., T): query rows with every key masked
        if weights.shape == expected_w.shape and empty.any() and np.isnan(weights[empty]).any():
            raise CheckFailure(f"for {label}, a query row with every key masked gives nan weights: softmax of an all "
                               f"-inf row is exp(-inf) / sum = 0 / 0. Make your softmax return 0 for an all -inf row "
                               f"(course_lib.numpy_ref.softmax does), so that such a row gives weights 0 and output 0.")
        compare(f"weights for {label}", answer[1], expected_w,
                hint=('hide the masked keys before the softmax so that they get weight exactly 0, and decide '
                      'what a row with no key left returns (here: zeros)'))
        compare(f"out for {label}", answer[0], expected_out, hint=("each output row averages the value rows, "
                                                                   "weighted by that query's attention weights"))
    return f"{len(cases)} cases (causal, padding with batch, a fully masked row) match numpy_ref"


# ----------------------------------------------------------------------------------------------
# Exercise: a worked example by hand (pen and paper)
# ----------------------------------------------------------------------------------------------
_HAND_Q = np.array([1.0, 1.0, 1.0, 1.0])  # (d_k,) = (4,)
_HAND_K = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])  # (S, d_k) = (3, 4)
_HAND_V = np.array([10.0, 0.0, -10.0])  # (S,) one number per key


def _one_score_off(weights: np.ndarray, scores: np.ndarray) -> int | None:
    """The key whose score alone is wrong, when `weights` are the softmax of `scores` with one entry changed
    (a slip in one dot product); else None. Scores are known up to a constant, so compare differences."""
    if weights.shape != scores.shape or not np.all(weights > 0) or abs(float(weights.sum()) - 1) > 1e-2:
        return None
    diff = np.log(weights) - scores  # equal entries but one, if a single score is off
    for j in range(len(scores)):
        rest = np.delete(diff, j)
        if np.ptp(rest) < 0.05 and abs(diff[j] - rest.mean()) > 0.05:
            return j
    return None


def _hand_off(name: str, got: np.ndarray, expected: np.ndarray, atol: float, hint: str) -> None:
    """Fail naming the entries of a hand-computed answer that are off and by how much at most, without printing
    the expected numbers: a learner who reads them has nothing left to compute."""
    if not np.all(np.isfinite(got)):
        raise CheckFailure(f"{name} contains {got[~np.isfinite(got)][0]}; every entry is a finite number. "
                           f"Hint: {hint}.")
    off = np.abs(got - expected) > atol
    if not off.any():
        return
    err = float(np.abs(got - expected).max())
    if got.size == 1:
        raise CheckFailure(f"{name} is off by {err:.3g} (it must be within {atol:g}). Hint: {hint}.")
    entries = ", ".join(f"{i} (key k_{i + 1})" for i in np.flatnonzero(off))
    verb = f"entries {entries} are" if off.sum() > 1 else f"entry {entries} is"
    raise CheckFailure(f"{name}: {verb} off, by up to {err:.3g} (each must be within {atol:g}). Hint: {hint}.")


@checker
def check_hand_example(fn: Callable) -> str:
    """Check the worked example computed by hand.

    Your function: `fn() -> (weights, out)`: the three attention weights and the output (one number) of
    the query q = (1, 1, 1, 1) over the keys k_1 = (1, 1, 1, 1), k_2 = (1, 1, -1, -1), k_3 = (0, 0, 0, 0)
    with values 10, 0, -10 and d_k = 4. Names a missing 1/sqrt(d_k), a division by d_k, the weights
    without the softmax, an output that is not the weighted sum, and the pair in the wrong order; otherwise
    says which entries are off and by how much, never the expected numbers.
    """
    answer = unpack(call(fn), 2, "return a pair (weights, out)")
    weights = as_array("weights", answer[0])
    raw = _HAND_K @ _HAND_Q  # (S,) = [4, 0, 0]
    expected_w = numpy_ref.softmax(raw / 2.0)
    if weights.size == 1 and as_array("out", answer[1]).shape == (3,):
        raise CheckFailure("your pair is in the wrong order: the three weights come first, then the output, "
                           "(weights, out)")
    if weights.shape != (3,):
        raise CheckFailure(f"weights should be three numbers, one per key; got shape {weights.shape}")
    wrong = {
        "these are softmax(q.k) without the scaling: divide the dot products 4, 0, 0 by sqrt(d_k) = 2 first":
            numpy_ref.softmax(raw),
        "you divided by d_k = 4; the scale is sqrt(d_k) = 2, so the scores are 2, 0, 0": numpy_ref.softmax(raw / 4),
        "these are the scaled scores themselves; the weights are their softmax, e^s_j / sum_l e^s_l": raw / 2.0,
    }
    for message, w in wrong.items():
        if is_close(weights, w, atol=2e-3, rtol=0):
            raise CheckFailure(message + ".")
    slip = _one_score_off(weights, raw / 2.0)
    if slip is not None:
        raise CheckFailure(f"your weights are a softmax of three scores in which only key k_{slip + 1}'s is off: "
                           f"recompute q.k_{slip + 1} (and its division by sqrt(d_k)); the other two are right.")
    _hand_off("weights", weights, expected_w, 2e-3,
              "compute the three scores q.k_j / sqrt(d) first, then the softmax of those three numbers; three "
              "digits are enough")
    out = as_array("out", answer[1])
    expected_out = float(expected_w @ _HAND_V)
    if out.size == 3 and is_close(out.ravel(), expected_w * _HAND_V, atol=2e-2, rtol=0):
        raise CheckFailure("out is the list of products a_j v_j; the output is their SUM, one number.")
    if out.size != 1:
        raise CheckFailure(f"out should be one number; got shape {out.shape}")
    _hand_off("out", out.reshape(1), np.array([expected_out]), 2e-2,
              "the output mixes the three values with the weights you just computed")
    return f"weights {np.round(expected_w, 3).tolist()} and out {expected_out:.3f} are right"


# ----------------------------------------------------------------------------------------------
# Exercise: Var(q.k / sqrt(d_k)) when the entries' variances are not 1 (a prediction as a formula)
# ----------------------------------------------------------------------------------------------
@checker
def check_score_variance(fn: Callable) -> str:
    """Check a predicted variance of the scaled score.

    Your function: `fn(d_k, var_q, var_k) -> float`, the variance of q.k / sqrt(d_k) when the d_k
    entries of q and of k are independent, with mean 0 and variances var_q and var_k. Checks four
    settings and names a missing 1/sqrt(d_k), a sum of the variances instead of their product,
    standard deviations in place of variances, dividing by d_k twice, and dividing by sqrt(d_k) once.
    """
    cases = [(64, 1.0, 1.0), (64, 1 / 3, 1 / 3), (16, 2.0, 0.5), (256, 0.25, 3.0)]
    for d_k, var_q, var_k in cases:
        got = as_array("the variance", call(fn, d_k, var_q, var_k))
        if got.size != 1:
            raise CheckFailure(f"return one number, the variance; got shape {got.shape}")
        got = got.reshape(())
        label = f"d_k={d_k}, var_q={var_q:.3g}, var_k={var_k:.3g}"
        wrong = {
            "this is Var(q.k) without the scaling: dividing by sqrt(d_k) divides the variance by d_k":
                d_k * var_q * var_k,
            "the variance of a product of independent zero-mean factors is the PRODUCT of their variances, "
            "E[q_i^2] E[k_i^2], not their sum": var_q + var_k,
            "you multiplied standard deviations; Var(q_i k_i) = var_q * var_k, no square root": np.sqrt(var_q * var_k),
            "you divided by d_k twice: the d_k terms add up to d_k var_q var_k, and the scaling divides by d_k once":
                var_q * var_k / d_k,
            "you divided the variance by sqrt(d_k); dividing a score by sqrt(d_k) divides its variance by the "
            "SQUARE of that, as Var(c X) = c^2 Var(X)": np.sqrt(d_k) * var_q * var_k,
        }
        if not is_close(got, var_q * var_k, atol=1e-6, rtol=1e-6):
            for message, value in wrong.items():
                if is_close(got, value, atol=1e-6, rtol=1e-6):
                    raise CheckFailure(f"for {label} you predict {float(got):.4g}: {message}.")
            compare(f"the variance for {label}", got, var_q * var_k, atol=1e-6, rtol=1e-6,
                    hint="sum the variances of the d_k products q_i k_i, then divide by (sqrt(d_k))^2")
    return "Var(q.k / sqrt(d_k)) = var_q * var_k in four settings, whatever d_k is"


# ----------------------------------------------------------------------------------------------
# Exercise: additive (Bahdanau) scores
# ----------------------------------------------------------------------------------------------
def _additive_ref(q, k, W_q, W_k, w):
    hidden = np.tanh((q @ W_q.T)[..., :, None, :] + (k @ W_k.T)[..., None, :, :])  # (..., T, S, h)
    return hidden @ w  # (..., T, S)


def _additive_mistakes(q, k, W_q, W_k, w) -> dict[str, np.ndarray | None]:
    """What each named mistake answers on these inputs; None where it cannot run on their shapes."""
    T, S = q.shape[0], k.shape[0]
    square = W_q.shape[0] == W_q.shape[1] and W_k.shape[0] == W_k.shape[1]
    return {
        "the projections ignore the layout of W_q and W_k: they are stored (out, in) like nn.Linear.weight, one "
        "ROW per output feature, so projecting a row vector multiplies by the transposed matrix (with square "
        "matrices the untransposed product runs, but it computes something else)":
            _additive_ref(q, k, W_q.T, W_k.T, w) if square else None,
        "there is no tanh: without it the score w.W_q q_i + w.W_k k_j splits into a query part plus a key "
        "part, and the softmax over j cancels the query part entirely":
            ((q @ W_q.T)[:, None, :] + (k @ W_k.T)[None, :, :]) @ w,
        "your scores are the transpose: scores[i, j] belongs to query i and key j":
            _additive_ref(q, k, W_q, W_k, w).T if S == T else None,
        "you added q_i's projection to k_i's only, row by row: that scores each query against ONE key (the "
        "diagonal i = j). Broadcast q's projection as (T, 1, h) and k's as (1, S, h) to score every pair":
            np.tanh(q @ W_q.T + k @ W_k.T) @ w if S == T else None,
    }


@checker
def check_additive_scores(fn: Callable) -> str:
    """Check additive (Bahdanau) attention scores.

    Your function: `fn(q, k, W_q, W_k, w) -> scores`, with q (T, d_q), k (S, d_k), W_q (h, d_q) and
    W_k (h, d_k) stored like nn.Linear weights (out_features, in_features), w (h,); returns scores
    (T, S) with scores[i, j] = w . tanh(W_q q_i + W_k k_j). Checks T != S, d_q != d_k, and a case where
    every matrix is square; names a forgotten .T, a missing tanh, scores of shape (S, T), adding
    q_i to k_i only (the diagonal), and a torch tensor returned instead of a numpy array. A mistake that
    crashes on the first case's shapes is named from the square case, where it runs.
    """
    rng = _rng()
    cases = []
    for label, T, S, d_q, d_k, h in [("T=3, S=5, d_q=4, d_k=6, h=7", 3, 5, 4, 6, 7),
                                     ("T=S=4, d_q=d_k=h=4 (square)", 4, 4, 4, 4, 4)]:
        q, k = rng.normal(size=(T, d_q)), rng.normal(size=(S, d_k))
        W_q, W_k, w = rng.normal(size=(h, d_q)), rng.normal(size=(h, d_k)), rng.normal(size=h)
        cases.append((label, (q, k, W_q, W_k, w)))

    def probe(inputs) -> str | None:
        return diagnose(as_array("scores", call(fn, *inputs)), _additive_mistakes(*inputs))

    for label, inputs in cases:
        try:
            answer = call(fn, *inputs)
        except CheckFailure as crash:
            others = [(other, lambda xs=xs: probe(xs)) for other, xs in cases if other != label]
            raise _explain_crash(crash, others) from None
        if isinstance(answer, torch.Tensor):
            raise CheckFailure(f"for {label} your scores are a torch tensor; this notebook works in numpy: return a "
                               f"numpy array, computed from the numpy inputs without converting them to torch.")
        got = as_array("scores", answer)
        expected = _additive_ref(*inputs)
        T, S = expected.shape
        if got.shape == (S, T) and S != T:
            raise CheckFailure(f"for {label} your scores have shape (S, T) = {got.shape}: one row per QUERY, so "
                               f"(T, S); broadcast q's projection as (T, 1, h) and k's as (1, S, h).")
        if not is_close(got, expected):
            message = diagnose(got, _additive_mistakes(*inputs))
            if message:
                raise CheckFailure(f"for {label}: {message}.")
        if got.shape != expected.shape:
            raise CheckFailure(f"for {label} your scores have shape {got.shape}, expected (T, S) = {expected.shape}.")
        compare(f"scores for {label}", answer, expected,
                hint=('additive attention scores each (query, key) pair on its own: project both, add, squash '
                      'with tanh, then take the dot product with w; broadcasting builds all T x S pairs at once'))
    return "additive scores match w . tanh(W_q q_i + W_k k_j) for every query-key pair"


# ----------------------------------------------------------------------------------------------
# Exercise: design a lookup that copies one value, and one that averages two (pen and paper)
# ----------------------------------------------------------------------------------------------
_DESIGN_D = 2  # d_k of the design exercise: the scores are divided by sqrt(2)
_DESIGN_TOL = 0.01  # every entry of the output within 0.01 of the target
_DESIGN_GAP = float(np.log(2 * (1 - _DESIGN_TOL) / _DESIGN_TOL))  # gap over two rivals for a weight of 0.99 (~5.3)
_DESIGN_DROP = float(np.log((1 - _DESIGN_TOL) / (2 * _DESIGN_TOL)))  # gap under two equal winners for < 0.01 (~3.9)


def _design_weights(keys: np.ndarray, query: np.ndarray, scale: float) -> np.ndarray:
    return numpy_ref.softmax(keys @ query / scale)  # (3,) = the output, since the values are one-hot


def _design_array(name: str, got, shape: tuple[int, ...], layout: str) -> np.ndarray:
    arr = as_array(name, got)
    if arr.shape != shape:
        raise CheckFailure(f"{name} has shape {arr.shape}; expected {shape}: {layout}.")
    if not np.all(np.isfinite(arr)):
        raise CheckFailure(f"{name} contains {arr[~np.isfinite(arr)][0]}; choose finite numbers.")
    return arr


def _design_query(name: str, keys: np.ndarray, query: np.ndarray, target: np.ndarray, goal: str) -> None:
    """Fail with the named mistake when attention with `query` over `keys` does not output `target`."""
    weights = _design_weights(keys, query, np.sqrt(_DESIGN_D))
    if np.abs(weights - target).max() <= _DESIGN_TOL:
        return
    shown = np.round(weights, 3).tolist()
    if np.abs(_design_weights(keys, query, 1.0) - target).max() <= _DESIGN_TOL:
        raise CheckFailure(f"{name} would {goal} if the scores were q.k, but attention divides them by sqrt(d_k) = "
                           f"sqrt({_DESIGN_D}): the gaps between the scores shrink, and the weights are {shown}. "
                           f"Make the scores larger so that they work after the scaling.")
    if np.allclose(weights, weights[0], atol=1e-3):
        raise CheckFailure(f"{name} gives every key the same weight ({shown}): its scores are all equal (a zero "
                           f"query, or one orthogonal to every key), so it averages ALL three values. Point "
                           f"{name} towards the key(s) it should pick.")
    wanted = np.flatnonzero(target > 0)
    scores = keys @ query / np.sqrt(_DESIGN_D)  # (3,)
    if len(wanted) == 1:
        best = int(np.argmax(weights))
        if best != wanted[0] and abs(weights[best] - weights[wanted[0]]) < 1e-3:
            raise CheckFailure(f"{name} ties key {wanted[0] + 1} with key {best + 1} (weights {shown}): equal scores "
                               f"share the weight, so it blends v_{wanted[0] + 1} and v_{best + 1}. Its score with "
                               f"k_{wanted[0] + 1} must be the largest, by a clear margin.")
        if best != wanted[0]:
            raise CheckFailure(f"{name} puts its largest weight on key {best + 1} (weights {shown}), so it copies "
                               f"v_{best + 1}, not v_{wanted[0] + 1}: its score with k_{wanted[0] + 1} must be the "
                               f"largest.")
        gap = float(scores[best] - np.delete(scores, best).max())
        raise CheckFailure(f"{name} picks the right key, but softly: weights {shown}. Its scaled score beats the next "
                           f"one by only {gap:.2f}; a weight of 0.99 needs a gap of about ln(2 * 99) = "
                           f"{_DESIGN_GAP:.1f}. Make the scores larger (longer vectors).")
    a, b = weights[wanted]
    if abs(a - b) > 2 * _DESIGN_TOL:
        raise CheckFailure(f"{name} gives keys {wanted[0] + 1} and {wanted[1] + 1} the weights {a:.3f} and {b:.3f}: "
                           f"to average their values equally its scores with k_{wanted[0] + 1} and "
                           f"k_{wanted[1] + 1} must be equal.")
    other = int(np.setdiff1d(np.arange(3), wanted)[0])
    raise CheckFailure(f"{name} splits its weight equally between keys {wanted[0] + 1} and {wanted[1] + 1}, but key "
                       f"{other + 1} still gets {weights[other]:.3f} (weights {shown}): its scaled score must be "
                       f"lower than theirs by at least ln(99 / 2) = {_DESIGN_DROP:.1f} to keep it under 0.01.")


@checker
def check_lookup_design(fn: Callable) -> str:
    """Check a hand-designed lookup: keys and queries that make attention copy one value and average two.

    Your function: `fn() -> (keys, q_copy, q_avg)`: keys (3, 2), one key per row, and two queries (2,).
    The values are one-hot, v_1 = (1, 0, 0), v_2 = (0, 1, 0), v_3 = (0, 0, 1), so the output of attention
    with d_k = 2 (scores divided by sqrt(2)) is its weight vector. q_copy must output v_2 and q_avg
    (v_1 + v_3) / 2, every entry within 0.01. Names scores too small for a nearly one-hot weight, a tie or the
    wrong key, a design that only works without the 1/sqrt(d_k), a query that ties every key, and
    unequal or leaking weights in the average.
    """
    answer = unpack(call(fn), 3, "return a tuple (keys, q_copy, q_avg)")
    keys = _design_array("keys", answer[0], (3, _DESIGN_D), "one key per row, three rows of d_k = 2 numbers")
    q_copy = _design_array("q_copy", answer[1], (_DESIGN_D,), "one query of d_k = 2 numbers")
    q_avg = _design_array("q_avg", answer[2], (_DESIGN_D,), "one query of d_k = 2 numbers")
    _design_query("q_copy", keys, q_copy, np.array([0.0, 1.0, 0.0]), "copy v_2")
    _design_query("q_avg", keys, q_avg, np.array([0.5, 0.0, 0.5]), "average v_1 and v_3")
    w_copy, w_avg = (_design_weights(keys, q, np.sqrt(_DESIGN_D)) for q in (q_copy, q_avg))
    return (f"q_copy outputs {np.round(w_copy, 3).tolist()} (v_2) and q_avg {np.round(w_avg, 3).tolist()} "
            f"((v_1 + v_3) / 2), within {_DESIGN_TOL} after the 1/sqrt(d_k) scaling")

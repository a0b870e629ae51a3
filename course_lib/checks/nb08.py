"""Checkers for notebook 08 (inside the heads).

Besides the per-head statistics, they check the entropy of three attention rows by hand (naming bits,
log10, a missing minus sign, a mean in place of the sum and 0 log 0 left as nan), Michel et al.'s head
importance from per-example gate gradients (naming |mean g|, the score the notebook tells apart from it,
the signed mean, the root mean square, a sum over examples and a per-layer normalisation) and Spearman's
rank correlation (naming Pearson's r of the values, argsort taken once for the ranks, a sign flip and a
wrong n in the formula).
"""

from __future__ import annotations

import numpy as np
import torch

from course_lib.checks._core import CheckFailure, as_array, call, checker, compare, diagnose, is_close, unpack
from course_lib.experiments import head_analysis

__all__ = [
    "check_row_entropy_by_hand",
    "check_head_entropy",
    "check_previous_token_score",
    "check_michel_importance",
    "check_spearman",
]


def _cases() -> list[np.ndarray]:
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(2, 3, 5, 5)) * 2
    random = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    hard = np.zeros((1, 2, 4, 4))
    hard[0, 0] = np.eye(4)  # one-hot rows: entropy 0, needs 0 log 0 = 0
    hard[0, 1] = 0.25  # uniform rows: entropy log 4
    return [random, hard]


@checker
def check_head_entropy(fn):
    """Check the mean attention entropy of each head.

    Your function: `fn(weights) -> entropy`, with weights a (B, H, T, S) numpy array whose rows sum
    to 1, and entropy (H,): -sum_s a log a over the keys in nats, averaged over queries and batch,
    with 0 log 0 = 0. Checks random and hand-built (one-hot, uniform) patterns against
    course_lib.experiments.head_analysis; names a result that is not averaged over the batch.
    """
    for a in _cases():
        name = f"head entropy of weights {a.shape}"
        hint = "entropy is -sum_s a log a over the keys, in nats (np.log), averaged over queries and batch; " \
               "treat 0 * log 0 as 0 (np.where(a > 0, ...))"
        got = as_array(name, call(fn, a.copy(), what=""), hint=hint)
        if got.shape == (a.shape[0], a.shape[1]):
            raise CheckFailure(f"you returned shape {got.shape} = (B, H); average over the batch axis too, "
                               f"so the result is one number per head, shape ({a.shape[1]},)")
        compare(name, got, head_analysis.entropy(a), atol=1e-9, hint=hint)
    return "random and hand-built (one-hot, uniform) patterns match"


@checker
def check_previous_token_score(fn):
    """Check the previous-token score of each head.

    Your function: `fn(weights) -> score`, with weights a (B, H, T, T) numpy array and score (H,):
    the weight of query t on key t - 1, averaged over t = 1 .. T-1 and over the batch.
    Checks random and hand-built patterns against course_lib.experiments.head_analysis.
    """
    for a in _cases():
        got = call(fn, a.copy(), what="")
        compare(f"previous-token score of weights {a.shape}", got, head_analysis.previous_token(a), atol=1e-9,
                hint="average a[..., t, t-1] over t = 1..T-1 (row 0 has no previous token) and over the batch; "
                     "np.diagonal(a, offset=-1, axis1=-2, axis2=-1) gives exactly those entries")
    return "random and hand-built patterns match"


# ----------------------------------------------------------------------------- entropy of three rows, by hand
_ROWS = (np.array([0.5, 0.25, 0.25, 0.0]), np.full(16, 1 / 16), np.array([0.9, 0.1, 0.0, 0.0]))


def _row_entropy(a: np.ndarray, log=np.log, sign: float = -1.0, reduce=np.sum) -> float:
    return float(sign * reduce(np.where(a > 0, a * log(np.where(a > 0, a, 1.0)), 0.0)))


@checker
def check_row_entropy_by_hand(fn):
    """Check the entropies of three attention rows computed by hand.

    Your function: `fn() -> (h1, h2, h3)`, the entropies in nats of the rows (0.5, 0.25, 0.25, 0), the
    uniform row over 16 keys, and (0.9, 0.1, 0, 0); three digits are enough. Names bits (log2), log10,
    a missing minus sign, the mean of the terms in place of their sum, and nan from 0 log 0.
    """
    result = call(fn)
    if isinstance(result, np.ndarray | torch.Tensor) and result.ndim == 1:
        result = tuple(result)  # an array of three numbers is fine too
    answer = as_array("your entropies", unpack(result, 3, "return three numbers (h1, h2, h3)"))
    expected = np.array([_row_entropy(a) for a in _ROWS])
    if np.isnan(answer).any():
        raise CheckFailure(f"you returned {answer.tolist()}: 0 * log 0 gave nan; its limit is 0, so a key with "
                           f"weight 0 adds nothing to the entropy.")
    wrong = {
        "these are in bits (log2); the course measures entropy in nats, with the natural log":
            [_row_entropy(a, np.log2) for a in _ROWS],
        "these use log10; the course measures entropy in nats, with the natural log":
            [_row_entropy(a, np.log10) for a in _ROWS],
        "the minus sign is missing: log a <= 0 for a weight a <= 1, so -sum a log a >= 0":
            [_row_entropy(a, sign=1.0) for a in _ROWS],
        "you averaged the terms -a log a over the keys; the entropy is their SUM":
            [_row_entropy(a, reduce=np.mean) for a in _ROWS],
    }
    for message, values in wrong.items():
        if is_close(answer, values, atol=2e-3, rtol=0):
            raise CheckFailure(message + ".")
    compare("your entropies", answer, expected, atol=2e-3, rtol=0,
            hint="H = -sum_s a_s ln a_s over the keys with a_s > 0; the uniform row over S keys has H = ln S")
    return f"entropies {np.round(expected, 3).tolist()} nats are right"


# ----------------------------------------------------------------------------- Michel et al.'s head importance
def _michel_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(80)
    mixed = rng.normal(loc=[0.2, -0.3, 0.05, -0.1], size=(50, 2, 4))  # (N, L, H): mixed signs, means of both signs
    cancel = np.empty((6, 1, 3))
    cancel[:, 0, 0] = [0.3, -0.3, 0.3, -0.3, 0.3, -0.3]  # a head every example needs, in opposite directions
    cancel[:, 0, 1] = [0.01, 0.02, 0.0, 0.01, 0.02, 0.0]
    cancel[:, 0, 2] = [-0.1, 0.2, -0.3, 0.4, 0.0, 0.1]
    return [mixed, cancel, rng.normal(size=(7, 3, 2)) * rng.random((1, 3, 2))]


@checker
def check_michel_importance(fn):
    """Check Michel et al.'s head importance from per-example gate gradients.

    Your function: `fn(grads) -> importance`, with grads a (N, L, H) float64 numpy array, grads[n, l, h] =
    dL(x_n)/dxi_{l,h} for example n, and importance (L, H) = E_x |dL(x)/dxi|: the mean over the examples of
    the absolute gradient, not normalised. Checks three cases, one with a head whose gradients cancel exactly;
    names |mean g| (the batch-loss score), the signed mean, the root mean square, a sum over examples and a
    per-layer l2 normalisation.
    """
    for grads in _michel_cases():
        N, L, H = grads.shape
        name = f"importance for grads of shape {grads.shape}"
        raw = call(fn, grads.copy(), what="")
        got = as_array(name, raw)
        expected = np.abs(grads).mean(0)  # (L, H)
        if got.shape == expected.shape and not is_close(got, expected):
            mistake = diagnose(got, {
                "this is |mean over examples of g|, the gradient of the batch-mean loss: examples whose gradients "
                "have opposite signs cancel (a head every example needs can score 0). Take the absolute value "
                "INSIDE the mean: mean |g|": np.abs(grads.mean(0)),
                "this is the signed mean of g; the importance is the mean of |g|": grads.mean(0),
                "this is the root mean square sqrt(mean g^2); Michel et al. average |g|": np.sqrt((grads**2).mean(0)),
                "you summed over the examples; the importance is the MEAN of |g| (divide by N)": np.abs(grads).sum(0),
                "you normalised each layer's scores by their l2 norm (Michel et al. do that to prune across layers); "
                "return the raw mean |g| here": expected / np.linalg.norm(expected, axis=-1, keepdims=True),
            })
            if mistake:
                raise CheckFailure(f"for grads of shape {grads.shape}: {mistake}.")
        if got.shape == (H,) or got.shape == (N, L) or got.shape == (L,):
            raise CheckFailure(f"you returned shape {got.shape}; average over the examples (axis 0) only, keeping "
                               f"one score per (layer, head): shape {(L, H)}")
        compare(name, raw, expected,
                hint="np.abs(grads).mean(axis=0): the absolute value inside the mean over the examples")
    return "3 cases match E_x |dL(x)/dxi|, including a head whose gradients cancel"


# ----------------------------------------------------------------------------- Spearman's rank correlation
def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a**2).sum() * (b**2).sum()))


@checker
def check_spearman(fn):
    """Check Spearman's rank correlation of two score vectors without ties.

    Your function: `fn(x, y) -> rho`, with x and y 1-D float64 numpy arrays of the same length n >= 3 and no
    ties; rho is one number, Pearson's r of the ranks (equal to 1 - 6 sum d^2 / (n (n^2 - 1)) without ties).
    Checks a hand-sized case, random cases and a reversed order; names Pearson's r of the values, ranks
    taken with argsort once, a flipped sign and a wrong n in the formula.
    """
    rng = np.random.default_rng(88)
    cases = [(np.array([0.1, 0.4, 0.3, 2.0, 0.2]), np.array([1.0, 3.0, 5.0, 4.0, 2.0])),
             (rng.normal(size=8) ** 3, rng.normal(size=8)),
             (np.exp(rng.normal(size=12)), rng.normal(size=12)),
             (np.arange(6.0), -np.arange(6.0) ** 2)]
    for x, y in cases:
        n = x.size
        name = f"rho for n={n}"
        got = as_array(name, call(fn, x.copy(), y.copy(), what=""))
        expected = head_analysis.spearman(x, y)
        if got.size != 1:
            raise CheckFailure(f"{name}: return one number; got shape {got.shape}")
        got = got.reshape(())
        if not is_close(got, expected):
            rx, ry = head_analysis.rankdata(x), head_analysis.rankdata(y)
            d2 = ((rx - ry) ** 2).sum()
            mistake = diagnose(got, {
                "this is Pearson's r of the values; Spearman's rho is Pearson's r of their RANKS": _pearson(x, y),
                "np.argsort(x) gives the ORDER (the index of the smallest value first), not the ranks; the rank of "
                "each value is np.argsort(np.argsort(x)) (+1)": _pearson(np.argsort(x).astype(float),
                                                                         np.argsort(y).astype(float)),
                "the sign is flipped: rank both arrays in the same direction (smallest = rank 1)": -expected,
                "the formula is 1 - 6 sum d^2 / (n (n^2 - 1)): you used n (n - 1) in the denominator":
                    1 - 6 * d2 / (n * (n - 1)),
                "the formula is 1 - 6 sum d^2 / (n (n^2 - 1)): you used n^3 in the denominator": 1 - 6 * d2 / n**3,
            })
            if mistake:
                raise CheckFailure(f"for x={np.round(x, 3).tolist()}, y={np.round(y, 3).tolist()}: {mistake}.")
        compare(name, got, expected, hint="rank each array (1 = smallest), d = rank(x) - rank(y), "
                                          "rho = 1 - 6 sum d^2 / (n (n^2 - 1))")
    return f"{len(cases)} cases match, including a reversed order (rho = -1)"

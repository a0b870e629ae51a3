"""Checkers for notebook 08 (inside the heads)."""

from __future__ import annotations

import numpy as np

from course_lib import head_analysis
from course_lib.checks._core import CheckFailure, as_array, call, checker, compare

__all__ = ["check_head_entropy", "check_previous_token_score"]


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
    course_lib.head_analysis; names a result that is not averaged over the batch.
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
    Checks random and hand-built patterns against course_lib.head_analysis.
    """
    for a in _cases():
        got = call(fn, a.copy(), what="")
        compare(f"previous-token score of weights {a.shape}", got, head_analysis.previous_token(a), atol=1e-9,
                hint="average a[..., t, t-1] over t = 1..T-1 (row 0 has no previous token) and over the batch; "
                     "np.diagonal(a, offset=-1, axis1=-2, axis2=-1) gives exactly those entries")
    return "random and hand-built patterns match"

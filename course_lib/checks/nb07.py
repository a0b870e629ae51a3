"""Checkers for notebook 07 (why several heads).

Besides the parameter count and the gated concatenation, they check three questions on the recorded
head-count measurements, the rank of a head's score matrix for given shapes (naming the dimension a
wrong formula forgets) and the rank-2 circle head for a given map of queries to keys (naming a query
that points at its own key, the inverse map, a softmax over the queries, scores returned unnormalised,
a forgotten length r, angles 2 pi s / (T - 1), and an extra 1/sqrt(d_head)).
"""

from __future__ import annotations

import numpy as np
import torch

from course_lib.checks._core import (
    CheckFailure,
    as_array,
    call,
    checker,
    compare,
    diagnose,
    is_close,
    multiple_choice,
)

__all__ = [
    "check_param_count_vs_heads",
    "check_gated_concat",
    "check_heads_sweep_quiz",
    "check_score_rank",
    "check_circle_weights",
]


def _reference_param_count(d_model: int, num_heads: int, bias: bool = True) -> int:
    return 4 * d_model * d_model + (4 * d_model if bias else 0)  # W_Q, W_K, W_V, W_O (+ biases): no H in it


@checker
def check_param_count_vs_heads(fn):
    """Check that the parameter count of multi-head attention does not depend on the head count.

    Your function: `fn(d_model, num_heads, bias) -> int`, the number of parameters of one layer's
    q, k, v and output projections (d_model x d_model each, plus four bias vectors when bias).
    Checks five configurations from 1 to 16 heads; names a count that grows with num_heads and
    missing biases.
    """
    cases = [(32, 1, True), (32, 8, True), (64, 4, False), (384, 12, True), (48, 16, False)]
    for d_model, heads, bias in cases:
        got = call(fn, d_model, heads, bias, what=f" (d_model={d_model}, num_heads={heads}, bias={bias})")
        expected = _reference_param_count(d_model, heads, bias)
        if not isinstance(got, int | np.integer) or int(got) != expected:
            hint = ""
            biases = 4 * d_model if bias else 0
            if isinstance(got, int | np.integer) and int(got) == heads * (expected - biases) + biases:
                hint = " It grows with num_heads: each head's W_Q^(h) is d_model x d_head, not d_model x d_model."
            elif isinstance(got, int | np.integer) and bias and int(got) == 4 * d_model * d_model:
                hint = " Did you forget the four bias vectors (d_model each)?"
            raise CheckFailure(f"for d_model={d_model}, num_heads={heads}, bias={bias} you returned {got!r}, "
                               f"expected {expected}.{hint} Count q_proj, k_proj, v_proj and out_proj.")
    return f"{len(cases)} configurations match; the count does not depend on num_heads"


def _reference_gated_concat(heads: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    B, H, T, d_head = heads.shape
    return (heads * gate.view(1, H, 1, 1)).transpose(1, 2).reshape(B, T, H * d_head)


@checker
def check_gated_concat(fn):
    """Check gating the heads before concatenating them.

    Your function: `fn(heads, gate) -> out`, with heads (B, H, T, d_head) and gate (H,) float64
    tensors; out (B, T, H * d_head) is the concatenation of the heads, head h scaled by gate[h].
    Checks three cases, with gates of 0 (a head removed) and 2 (a head doubled).
    """
    g = torch.Generator().manual_seed(7)
    cases = [((2, 4, 5, 3), torch.tensor([1.0, 0.0, 0.5, 2.0])),
             ((1, 3, 4, 2), torch.tensor([0.0, 1.0, 1.0])),
             ((3, 2, 6, 4), torch.tensor([1.0, 1.0]))]
    for shape, gate in cases:
        heads = torch.randn(*shape, generator=g, dtype=torch.float64)
        got = call(fn, heads.clone(), gate.double(), what=f" (heads {tuple(shape)}, gate {tuple(gate.shape)})")
        compare(f"gated_concat(heads {tuple(shape)}, gate {gate.tolist()})", got,
                _reference_gated_concat(heads, gate.double()).numpy(), atol=1e-12,
                hint="scale head h by gate[h] (broadcast gate as (1, H, 1, 1)), then move the head axis next to "
                     "d_head with transpose(1, 2) BEFORE reshape(B, T, H * d_head)")
    return f"{len(cases)} cases match, including a gate of 0 (head removed) and 2 (head doubled)"


# ----------------------------------------------------------------------------- three questions on the measurements
_SWEEP_QUIZ = (
    ("c", {"a": "two of the five H = 1 seeds never reach 0.99 (they end at 0.903 and 0.939 after 3000 steps)",
           "b": "H = 4's slowest seed needs 350 steps; every H = 8 seed is there by step 250"}),
    ("b", {"a": "H = 4's seeds reach 0.99 at steps 200, 250, 250, 200, 200: all by 250, like H = 8",
           "c": "one H = 1 seed needs 700 steps and one H = 2 seed 350"}),
    ("b", {"a": "the rank limits which whole distributions a head can draw, not which key wins: section 4's "
                "circle construction picks any key at rank 2",
           "c": "section 4's random one-to-one matching and the fixed offset gave the same scores; the circle "
                "construction works for any map of queries to keys"}),
)


@checker
def check_heads_sweep_quiz(fn):
    """Check the answers to three multiple-choice questions on the recorded head-count measurements.

    Your function: `fn() -> answers`, three letters (a string such as "abc" or a tuple), one per
    question in the order asked. Says which answer is wrong and why, with the numbers that decide it.
    """
    multiple_choice(call(fn), _SWEEP_QUIZ)
    return "all three answers are right"


# ----------------------------------------------------------------------------- rank of a head's scores
_RANK_CASES = [(32, 32, 64, 8), (32, 32, 64, 64), (10, 6, 64, 8), (16, 40, 8, 32), (100, 200, 512, 64), (5, 3, 2, 4)]
_RANK_MISTAKES = {
    "min(T, d_head) forgets S: in cross-attention the scores are (T, S), and their rank is at most min(T, S)":
        lambda T, S, D, d: min(T, d),
    "min(T, S, d_head) forgets d_model: X W_Q is (T, d_model) @ (d_model, d_head), so its rank is at most "
    "d_model too": lambda T, S, D, d: min(T, S, d),
    "d_head alone forgets that a (T, S) matrix has rank at most min(T, S)": lambda T, S, D, d: d,
    "min(T, S) is the rank of a full score matrix; the product through d_head columns caps it at d_head":
        lambda T, S, D, d: min(T, S),
}


@checker
def check_score_rank(fn):
    """Check the rank of one head's score matrix for given shapes.

    Your function: `fn(T, S, d_model, d_head) -> int`, the rank of the (T, S) scores (X W_Q)(Y W_K)^T for
    random (generic) X (T, d_model), Y (S, d_model) and W_Q, W_K (d_model, d_head). Checks six shapes
    (self- and cross-attention, d_head > d_model, d_head > T); names a formula that forgets S, d_model
    or d_head.
    """
    answers = []
    for T, S, D, d in _RANK_CASES:
        got = call(fn, T, S, D, d, what=f" (T={T}, S={S}, d_model={D}, d_head={d})")
        if isinstance(got, torch.Tensor | np.ndarray) and got.ndim == 0:
            got = got.item()  # a 0-d tensor or array, e.g. from torch.linalg.matrix_rank
        if got is None:
            raise CheckFailure("your rank is None: did you forget to `return` it?")
        if isinstance(got, bool) or not isinstance(got, int | np.integer | float) or not float(got).is_integer():
            raise CheckFailure(f"for T={T}, S={S}, d_model={D}, d_head={d}: return a whole number (the rank); "
                               f"got {got!r}")
        answers.append(int(got))
    expected = [min(T, S, D, d) for T, S, D, d in _RANK_CASES]
    if answers != expected:
        for message, formula in _RANK_MISTAKES.items():
            if answers == [formula(*case) for case in _RANK_CASES]:
                raise CheckFailure(f"{message}.")
        i = next(i for i, (a, e) in enumerate(zip(answers, expected, strict=True)) if a != e)
        T, S, D, d = _RANK_CASES[i]
        raise CheckFailure(f"for T={T}, S={S}, d_model={D}, d_head={d} you returned {answers[i]}, expected "
                           f"{expected[i]}. Hint: the rank of a product is at most the smallest inner or outer "
                           f"dimension along the chain (T, d_model) (d_model, d_head) (d_head, d_model) (d_model, S).")
    return f"{len(_RANK_CASES)} shapes: rank = min(T, S, d_model, d_head)"


# ----------------------------------------------------------------------------- the circle head for a given map
def _circle_weights(keys: np.ndarray, r: float, *, T_angle: int | None = None, own: bool = False,
                    axis: int = -1, softmax: bool = True, scale: float = 1.0) -> np.ndarray:
    T = keys.shape[0]
    angle = 2 * np.pi * np.arange(T) / (T_angle or T)  # (T,)
    k = np.stack([np.cos(angle), np.sin(angle)], -1)  # (T, 2): key s on the unit circle
    q = r * (k if own else k[keys])  # (T, 2): query t points at key keys[t]
    scores = q @ k.T * scale  # (T, T)
    if not softmax:
        return scores
    e = np.exp(scores - scores.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


@checker
def check_circle_weights(fn):
    """Check the weights of the rank-2 circle head for a given map of queries to keys.

    Your function: `fn(keys, r) -> weights`, with keys a (T,) integer numpy array (query t should attend to
    key keys[t]; any map, not only a permutation) and r > 0; weights (T, T) = softmax over s of q_t . k_s
    (no 1/sqrt(d_head)), with k_s = (cos 2 pi s / T, sin 2 pi s / T) and q_t = r k_{keys[t]}. Checks a random
    permutation, a fixed offset and a map that sends two queries to one key; names a query that points at its
    own key, the inverse permutation, a softmax over the queries, scores without the softmax, a forgotten r,
    angles 2 pi s / (T - 1) and an extra 1/sqrt(2).
    """
    rng = np.random.default_rng(7)
    cases = [(rng.permutation(16), 10.0), ((np.arange(8) - 3) % 8, 5.0), (np.array([2, 0, 4, 4, 1, 3]), 3.0)]
    for keys, r in cases:
        T = keys.shape[0]
        name = f"weights for keys={keys.tolist()}, r={r}"
        raw = call(fn, keys.copy(), r, what=f" and r={r}")
        got = as_array(name, raw)
        expected = _circle_weights(keys, r)
        if got.shape == expected.shape and not is_close(got, expected):
            mistakes = {
                "query t points at its own key k_t: it must point at key keys[t], q_t = r * k[keys[t]]":
                    _circle_weights(keys, r, own=True),
                "the softmax runs over the queries (axis 0): each query's weights over the keys must sum to 1":
                    _circle_weights(keys, r, axis=0),
                "these are the scores q_t . k_s: apply the softmax over the keys": _circle_weights(keys, r,
                                                                                               softmax=False),
                "the query length r is missing: q_t = r * k[keys[t]]": _circle_weights(keys, 1.0),
                "the angles are 2 pi s / (T - 1): then key T-1 lands on key 0; use 2 pi s / T":
                    _circle_weights(keys, r, T_angle=T - 1),
                "you divided the scores by sqrt(d_head) = sqrt(2); here the weights are softmax(q_t . k_s), unscaled":
                    _circle_weights(keys, r, scale=2**-0.5),
            }
            if np.array_equal(np.sort(keys), np.arange(T)):  # a permutation: its inverse is a map too
                mistakes["you used the inverse map (query keys[t] points at key t): query t must point at key "
                         "keys[t]"] = _circle_weights(np.argsort(keys), r)
            mistake = diagnose(got, mistakes)
            if mistake:
                raise CheckFailure(f"for keys={keys.tolist()}, r={r}: {mistake}.")
        compare(name, raw, expected, atol=1e-10,
                hint="angle = 2 pi arange(T) / T; k = stack([cos, sin], -1) (T, 2); q = r * k[keys]; "
                     "softmax(q @ k.T, axis=-1)")
    return "3 maps (random permutation, fixed offset, two queries on one key) match"

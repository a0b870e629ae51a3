"""Checkers for the exercises of notebook 00 (setup and course map).

The exercises of notebook 00 are about the conventions, not about arithmetic: the shapes of the
multi-head path, the bottom-right causal mask of decoding, and what the mask convention implies.
Each checker names the convention a wrong answer breaks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from course_lib.checks._core import CheckFailure, as_array, call, checker, multiple_choice, require_result

__all__ = ["check_shape_predictions", "check_decoding_mask", "check_mask_quiz"]


# ----------------------------------------------------------------------------------------------
# Exercise 1: the shapes of the multi-head path, as a formula of the sizes
# ----------------------------------------------------------------------------------------------
_SHAPE_NAMES = ("q", "k", "v", "weights", "out_heads", "concat", "out")


def _expected_shapes(B: int, H: int, T: int, S: int, d_model: int, d_v: int) -> dict[str, tuple[int, ...]]:
    d_head = d_model // H
    return {"q": (B, H, T, d_head), "k": (B, H, S, d_head), "v": (B, H, S, d_v), "weights": (B, H, T, S),
            "out_heads": (B, H, T, d_v), "concat": (B, T, H * d_v), "out": (B, T, d_model)}


def _shape_mistake(name: str, got: tuple, sizes: dict[str, int], expected: tuple) -> str:
    B, H, T, S, d_model, d_v = (sizes[k] for k in ("B", "H", "T", "S", "d_model", "d_v"))
    d_head = d_model // H
    if name == "weights" and got == (B, H, S, T):
        return "weights are (B, H, T, S): one ROW per query (T of them), one column per key (S)"
    if name in ("k", "v") and len(got) == 4 and got[2] == T and got[:2] == (B, H):
        return f"{name} comes from the memory (the keys and values), so its length is S = {S}, not T = {T}"
    if name == "q" and len(got) == 4 and got[2] == S:
        return f"the queries come from x, so their length is T = {T}, not S = {S}"
    if name in ("q", "k") and len(got) == 4 and got[-1] == d_model:
        return f"each head sees d_head = d_model // H = {d_head} features, not all d_model = {d_model}"
    if name == "v" and len(got) == 4 and got[-1] == d_head and d_head != d_v:
        return f"values have their own per-head size d_v = {d_v}, which need not equal d_head = {d_head}"
    if name in ("q", "k", "v", "weights", "out_heads") and len(got) == 3:
        return "after splitting heads the arrays have a head axis: (B, H, length, size)"
    if name in ("q", "k", "v", "out_heads") and len(got) == 4 and got[1] != H and got[2] == H:
        return "the head axis comes second, (B, H, length, size): split, then transpose(0, 2, 1, 3)"
    if name == "concat" and got == (B, T, d_model) and H * d_v != d_model:
        return f"the concatenation has width H * d_v = {H * d_v}; W_o maps it back to d_model = {d_model}"
    if name == "out" and len(got) == 3 and got[-1] == H * d_v:
        return f"W_o maps the concatenation back to d_model = {d_model}"
    return f"expected {expected}"


@checker
def check_shape_predictions(fn: Callable) -> str:
    """Check the shapes of the multi-head path, predicted as a formula of the sizes.

    Your function: `fn(B, H, T, S, d_model, d_v) -> dict` mapping each of "q", "k", "v", "weights",
    "out_heads", "concat", "out" to its shape (a tuple of ints) for cross-attention of T queries over a
    memory of S keys, with d_head = d_model // H. Checks three sets of sizes (T != S, d_v != d_head
    among them) and names swapped T and S, a missing or misplaced head axis, d_model in place of
    d_head, and d_v confused with d_head.
    """
    cases = [dict(B=2, H=4, T=5, S=7, d_model=32, d_v=8), dict(B=1, H=3, T=6, S=2, d_model=12, d_v=5),
             dict(B=3, H=2, T=4, S=4, d_model=16, d_v=8)]
    for sizes in cases:
        answer = call(fn, *sizes.values())
        require_result("your dict of shapes", answer)
        if not isinstance(answer, dict):
            raise CheckFailure(f"return a dict from name to shape, e.g. {{'q': (B, H, T, d_head), ...}}; "
                               f"got {type(answer).__name__}")
        expected = _expected_shapes(**sizes)
        label = ", ".join(f"{k}={v}" for k, v in sizes.items())
        for name in _SHAPE_NAMES:
            if name not in answer:
                raise CheckFailure(f"your dict has no entry '{name}' (it needs {', '.join(_SHAPE_NAMES)})")
            try:
                got = tuple(int(n) for n in answer[name])
            except (TypeError, ValueError):
                raise CheckFailure(f"the shape of '{name}' should be a tuple of ints; got {answer[name]!r}") from None
            if got != expected[name]:
                raise CheckFailure(f"for {label}: shape of {name} is {got}; "
                                   f"{_shape_mistake(name, got, sizes, expected[name])}.")
    return f"{len(cases)} sets of sizes (T != S, d_v != d_head) give the right seven shapes"


# ----------------------------------------------------------------------------------------------
# Exercise 2: the bottom-right causal mask of decoding with a cache
# ----------------------------------------------------------------------------------------------
def _decoding_mask_ref(T: int, S: int) -> np.ndarray:
    return np.tril(np.ones((T, S), dtype=bool), k=S - T)  # query i is position S - T + i


@checker
def check_decoding_mask(fn: Callable) -> str:
    """Check a causal mask for T new queries over S >= T keys (decoding with a cache).

    Your function: `fn(T, S) -> mask`, a boolean (T, S) array (numpy or torch), True = may attend, where
    the T queries are the LAST T of the S positions (bottom-right alignment): query i sees keys
    0 .. S - T + i. Checks (T, S) = (3, 5), (1, 4), (4, 4); names the top-left alignment of np.tril,
    the flipped polarity, a missing diagonal, a transposed mask and a non-boolean dtype.
    """
    for T, S in [(3, 5), (1, 4), (4, 4)]:
        answer = call(fn, T, S)
        require_result("mask", answer)
        got = as_array("mask", answer)
        expected = _decoding_mask_ref(T, S)
        dtype = getattr(answer, "dtype", None)
        if got.shape == (S, T) and S != T:
            raise CheckFailure(f"for T={T}, S={S} your mask has shape (S, T) = {got.shape}: rows are queries, "
                               f"columns keys, so the shape is (T, S) = ({T}, {S}).")
        if got.shape != expected.shape:
            raise CheckFailure(f"for T={T}, S={S} your mask has shape {got.shape}; expected (T, S) = ({T}, {S}).")
        if str(dtype) not in ("bool", "torch.bool"):
            raise CheckFailure(f"your mask has dtype {dtype}; the course's masks are BOOLEAN (True = may attend). "
                               f"A float 0/1 mask would be read as an additive mask (0 or 1 added to the scores).")
        got = got.astype(bool)
        if np.array_equal(got, ~expected):
            raise CheckFailure(f"for T={T}, S={S} the polarity is flipped: you marked the keys to HIDE. In this "
                               f"course True = may attend (torch's scaled_dot_product_attention convention).")
        if np.array_equal(got, np.tril(np.ones((T, S), dtype=bool))) and S != T:
            raise CheckFailure(f"for T={T}, S={S} your mask is aligned top-left (np.tril): query 0 sees only key 0. "
                               f"With a cache the {T} queries are the LAST positions, so query 0 is position "
                               f"{S - T} and sees keys 0..{S - T}: shift the diagonal by S - T (np.tril(..., k=S-T)).")
        if np.array_equal(got, np.tril(np.ones((T, S), dtype=bool), k=S - T - 1)):
            raise CheckFailure(f"for T={T}, S={S} a query cannot see its own position: the diagonal is missing. "
                               f"Causal means keys up to AND including the query's position.")
        if not np.array_equal(got, expected):
            idx = tuple(int(i) for i in np.argwhere(got != expected)[0])
            raise CheckFailure(f"for T={T}, S={S} entry {idx} is {bool(got[idx])}, expected {bool(expected[idx])}. "
                               f"Query i is position S - T + i and may see keys 0 .. S - T + i.")
    return "bottom-right causal masks for (T, S) = (3, 5), (1, 4), (4, 4) are right"


# ----------------------------------------------------------------------------------------------
# Exercise 3: three predictions about masks (multiple choice)
# ----------------------------------------------------------------------------------------------
_QUIZ = (
    ("a", {"b": "10 is the top-left alignment, where query i sees keys 0..i; with S > T the queries are the LAST "
                "T positions, so query i sees S - T + i + 1 keys: 3 + 4 + 5 + 6",
           "c": "24 is every entry: a causal mask still hides each query's future keys"}),
    ("c", {"a": "padding hides keys, not queries: the padded queries 2 and 3 still see the real keys 0 and 1, "
                "so count their rows too",
           "b": "10 is the causal mask alone: combine_masks ANDs it with the padding mask, which hides keys 2 "
                "and 3 from every query"}),
    ("b", {"a": "that is what the course's convention (True = may attend) gives; nn.MultiheadAttention reads "
                "True as IGNORE, so query 0 ignores key 0 and attends to the keys the mask meant to hide",
           "c": "query 0's row of causal_mask(4) is True only at key 0; read as 'ignore', it leaves keys 1, 2 "
                "and 3"}),
)


@checker
def check_mask_quiz(fn: Callable) -> str:
    """Check three predictions about masks: a bottom-right causal mask, causal AND padding, the polarity trap.

    Your function: `fn() -> answers`, a string or tuple of three letters, e.g. "abc" or ("a", "b", "c"),
    one per question in the order asked. Says which answer is wrong and why.
    """
    multiple_choice(call(fn), _QUIZ)
    return "all three answers are right"

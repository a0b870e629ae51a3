"""The notebook-00 checkers accept the reference and reject planted wrong answers with useful messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from course_lib import checks
from course_lib.masks import causal_mask


# ----------------------------------------------------------------------------- shapes
def shapes_ref(B, H, T, S, d_model, d_v):
    d_head = d_model // H
    return {"q": (B, H, T, d_head), "k": (B, H, S, d_head), "v": (B, H, S, d_v), "weights": (B, H, T, S),
            "out_heads": (B, H, T, d_v), "concat": (B, T, H * d_v), "out": (B, T, d_model)}


def _with(**changes):
    def fn(B, H, T, S, d_model, d_v):
        shapes = shapes_ref(B, H, T, S, d_model, d_v)
        sizes = dict(B=B, H=H, T=T, S=S, d_model=d_model, d_v=d_v, d_head=d_model // H)
        shapes.update({name: tuple(sizes.get(n, n) for n in spec) for name, spec in changes.items()})
        return shapes
    return fn


def test_shape_predictions_accepts_reference():
    assert checks.check_shape_predictions(shapes_ref).passed
    as_lists = lambda *a: {k: list(v) for k, v in shapes_ref(*a).items()}  # noqa: E731
    assert checks.check_shape_predictions(as_lists).passed


@pytest.mark.parametrize("wrong, words", [
    (_with(weights=("B", "H", "S", "T")), "one ROW per query"),
    (_with(k=("B", "H", "T", "d_head")), "comes from the memory"),
    (_with(q=("B", "H", "T", "d_model")), "d_head = d_model // H"),
    (_with(v=("B", "H", "S", "d_head")), "d_v ="),
    (_with(q=("B", "T", "d_head")), "head axis"),
    (_with(q=("B", "T", "H", "d_head")), "head axis comes second"),
    (_with(concat=("B", "T", "d_model")), "width H * d_v"),
    (lambda *a: {k: v for k, v in shapes_ref(*a).items() if k != "out"}, "no entry 'out'"),
    (lambda *a: list(shapes_ref(*a).values()), "return a dict"),
])
def test_shape_predictions_rejects_planted_mistakes(wrong, words):
    result = checks.check_shape_predictions(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- decoding mask
def decoding_ref(T, S):
    return np.tril(np.ones((T, S), dtype=bool), k=S - T)


def test_decoding_mask_accepts_reference_and_course_lib():
    assert checks.check_decoding_mask(decoding_ref).passed
    assert checks.check_decoding_mask(lambda T, S: causal_mask(T, S)).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda T, S: np.tril(np.ones((T, S), dtype=bool)), "aligned top-left"),
    (lambda T, S: ~decoding_ref(T, S), "polarity is flipped"),
    (lambda T, S: np.tril(np.ones((T, S), dtype=bool), k=S - T - 1), "diagonal is missing"),
    (lambda T, S: decoding_ref(T, S).T, "shape (S, T)"),
    (lambda T, S: decoding_ref(T, S).astype(float), "BOOLEAN"),
    (lambda T, S: torch.ones(T, S, dtype=torch.bool), "entry"),
])
def test_decoding_mask_rejects_planted_mistakes(wrong, words):
    result = checks.check_decoding_mask(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- quiz
def test_mask_quiz_accepts_the_right_letters_in_any_spelling():
    assert checks.check_mask_quiz(lambda: "acb").passed
    assert checks.check_mask_quiz(lambda: ("A", "c", "b")).passed
    assert checks.check_mask_quiz(lambda: "a, c, b").passed


@pytest.mark.parametrize("wrong, message", [
    (lambda: "bcb", "question 1: 'b' is not it: 10 is the top-left alignment, where query i sees keys 0..i; with "
                    "S > T the queries are the LAST T positions, so query i sees S - T + i + 1 keys: 3 + 4 + 5 + 6."),
    (lambda: "ccb", "question 1: 'c' is not it: 24 is every entry: a causal mask still hides each query's future "
                    "keys."),
    (lambda: "aab", "question 2: 'a' is not it: padding hides keys, not queries: the padded queries 2 and 3 still "
                    "see the real keys 0 and 1, so count their rows too."),
    (lambda: "abb", "question 2: 'b' is not it: 10 is the causal mask alone: combine_masks ANDs it with the padding "
                    "mask, which hides keys 2 and 3 from every query."),
    (lambda: "aca", "question 3: 'a' is not it: that is what the course's convention (True = may attend) gives; "
                    "nn.MultiheadAttention reads True as IGNORE, so query 0 ignores key 0 and attends to the keys "
                    "the mask meant to hide."),
    (lambda: "acc", "question 3: 'c' is not it: query 0's row of causal_mask(4) is True only at key 0; read as "
                    "'ignore', it leaves keys 1, 2 and 3."),
    (lambda: "ac", "return 3 letters, e.g. 'aaa'; got ('a', 'c')"),
    (lambda: "acz", "question 3: answer with one of a, b, c; got 'z'"),
])
def test_mask_quiz_names_each_wrong_answer(wrong, message):
    result = checks.check_mask_quiz(wrong)
    assert not result.passed and result.message == message, result.message


def test_an_all_true_mask_fails_and_does_not_raise():
    # the inputs of these checkers are ints, so there is nothing the learner could change in place
    def mutating(T, S):
        m = decoding_ref(T, S)
        m[:] = True
        return m
    result = checks.check_decoding_mask(mutating)
    assert not result.passed

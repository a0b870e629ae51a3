"""Notebook 07's checkers pass the reference and reject planted mistakes with a useful message."""

import numpy as np
import pytest
import torch

from course_lib import MultiHeadAttention, checks


def param_count(d_model, num_heads, bias):
    return sum(p.numel() for p in MultiHeadAttention(d_model, num_heads, bias=bias).parameters())


def test_param_count_reference_passes():
    result = checks.check_param_count_vs_heads(param_count)
    assert result.passed, result


def test_param_count_growing_with_heads_fails():
    result = checks.check_param_count_vs_heads(lambda d, h, b: h * 4 * d * d + (4 * d if b else 0))
    assert not result.passed and "grows with num_heads" in result.message


def test_param_count_without_bias_fails():
    result = checks.check_param_count_vs_heads(lambda d, h, b: 4 * d * d)
    assert not result.passed and "bias" in result.message


def gated(heads, gate):
    B, H, T, d = heads.shape
    return (heads * gate.view(1, H, 1, 1)).transpose(1, 2).reshape(B, T, H * d)


def test_gated_concat_reference_passes():
    result = checks.check_gated_concat(gated)
    assert result.passed, result


def test_gated_concat_in_float32_fails_and_names_the_dtype():
    result = checks.check_gated_concat(lambda x, g: gated(x.float(), g.float()))
    assert not result.passed and "float32" in result.message and "compute in float64" in result.message


def test_gated_concat_without_transpose_fails():
    result = checks.check_gated_concat(lambda x, g: (x * g.view(1, -1, 1, 1)).reshape(x.shape[0], x.shape[2], -1))
    assert not result.passed and "transpose(1, 2)" in result.message


def test_gated_concat_ignoring_the_gate_fails():
    result = checks.check_gated_concat(lambda x, g: x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1))
    assert not result.passed and "differs from the reference" in result.message


def test_gated_concat_gate_on_wrong_axis_fails():
    result = checks.check_gated_concat(lambda x, g: gated(x, torch.ones_like(g)) * g.mean())
    assert not result.passed


def _not_yet(result, words):
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- three questions
def test_heads_sweep_quiz_accepts_the_right_letters():
    assert checks.check_heads_sweep_quiz(lambda: "cbb").passed
    assert checks.check_heads_sweep_quiz(lambda: ("c", "b", "b")).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda: "abb", "0.903 and 0.939"), (lambda: "bbb", "350 steps"), (lambda: "cab", "200, 250, 250"),
    (lambda: "ccb", "700 steps"), (lambda: "cba", "circle construction picks any key"),
    (lambda: "cbc", "any map"), (lambda: "cb", "3 letters"), (lambda: "cbz", "one of a, b, c"),
])
def test_heads_sweep_quiz_rejects_wrong_answers(wrong, words):
    _not_yet(checks.check_heads_sweep_quiz(wrong), words)


# ----------------------------------------------------------------------------- rank of the scores
def test_score_rank_reference_passes():
    assert checks.check_score_rank(lambda T, S, D, d: min(T, S, D, d)).passed


def test_score_rank_measured_numerically_passes():
    def measured(T, S, D, d):
        g = torch.Generator().manual_seed(0)
        x, y, w_q, w_k = (torch.randn(*shape, generator=g, dtype=torch.float64)
                          for shape in ((T, D), (S, D), (D, d), (D, d)))
        return torch.linalg.matrix_rank((x @ w_q) @ (y @ w_k).T)  # a 0-d tensor is accepted

    assert checks.check_score_rank(measured).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda T, S, D, d: min(T, d), "forgets S"),
    (lambda T, S, D, d: min(T, S, d), "forgets d_model"),
    (lambda T, S, D, d: d, "min(T, S)"),
    (lambda T, S, D, d: min(T, S), "caps it at d_head"),
    (lambda T, S, D, d: T * S, "you returned"),
    (lambda T, S, D, d: min(T, S, D, d) + 0.5, "whole number"),
    (lambda T, S, D, d: True, "whole number"),
])
def test_score_rank_rejects_planted_mistakes(wrong, words):
    _not_yet(checks.check_score_rank(wrong), words)


# ----------------------------------------------------------------------------- circle head
def circle(keys, r, *, own=False, axis=-1, softmax=True, angle_T=None, scale=1.0):
    T = len(keys)
    angle = 2 * np.pi * np.arange(T) / (angle_T or T)
    k = np.stack([np.cos(angle), np.sin(angle)], -1)  # (T, 2)
    q = r * (k if own else k[keys])
    scores = q @ k.T * scale
    if not softmax:
        return scores
    e = np.exp(scores - scores.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def test_circle_weights_reference_passes():
    assert checks.check_circle_weights(circle).passed


def test_circle_weights_in_torch_passes():
    def torch_circle(keys, r):
        T = len(keys)
        angle = 2 * torch.pi * torch.arange(T, dtype=torch.float64) / T
        k = torch.stack([angle.cos(), angle.sin()], -1)
        return torch.softmax(r * k[torch.as_tensor(keys)] @ k.T, -1)

    assert checks.check_circle_weights(torch_circle).passed


def _circle_mutating(keys, r):
    keys[:] = 0  # its own copy only: the checker's keys are intact, so every query now looks at key 0
    return circle(keys, r)


@pytest.mark.parametrize("wrong, words", [
    (lambda keys, r: circle(keys, r, own=True), "its own key"),
    (lambda keys, r: circle(np.argsort(keys), r), "inverse map"),
    (lambda keys, r: circle(keys, r, axis=0), "over the queries"),
    (lambda keys, r: circle(keys, r, softmax=False), "apply the softmax"),
    (lambda keys, r: circle(keys, 1.0), "length r is missing"),
    (lambda keys, r: circle(keys, r, angle_T=len(keys) - 1), "2 pi s / (T - 1)"),
    (lambda keys, r: circle(keys, r, scale=2**-0.5), "sqrt(2)"),
    (lambda keys, r: circle(keys, r).astype(np.float32), "float32"),
    (lambda keys, r: circle(keys, r)[:, :-1], "shape"),
    (_circle_mutating, "differs from the reference"),
])
def test_circle_weights_rejects_planted_mistakes(wrong, words):
    _not_yet(checks.check_circle_weights(wrong), words)

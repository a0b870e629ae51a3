"""The notebook-99 checkers accept the reference and reject planted wrong solutions with useful messages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from course_lib import checks, numpy_ref


# ----------------------------------------------------------------------------- source article 002's mask for SDPA
def additive(mask):
    return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask == 0, float("-inf"))


@pytest.mark.parametrize("reference", [lambda m: m != 0, lambda m: m.bool(), additive], ids=["ne0", "bool", "additive"])
def test_sdpa_mask_accepts_references(reference):
    result = checks.check_sdpa_mask(reference)
    assert result.passed, result.message


@pytest.mark.parametrize("wrong, words", [
    (lambda m: m.double(), "the article's bug"),
    (lambda m: m.float(), "ADDED to the scores"),
    (lambda m: m == 0, "polarity is flipped"),
    (lambda m: m.long(), "not integers"),
    (lambda m: torch.ones_like(m, dtype=torch.bool)[..., :1], "entries differ"),
    (lambda m: (1 - m.double()) * -1.0, "differs from attending"),  # masked keys only 1 lower: not masked
    (lambda m: (m != 0).reshape(-1), "does not broadcast"),
    (lambda m: m.zero_().bool(), "forbids every key"),  # changes its input in place: must fail, not fool the checker
])
def test_sdpa_mask_rejects_planted_mistakes(wrong, words):
    result = checks.check_sdpa_mask(wrong)
    assert not result.passed and words in result.message, result.message


def test_sdpa_mask_float_passthrough_is_named_as_the_articles_bug():
    result = checks.check_sdpa_mask(lambda m: m)
    assert not result.passed and "article's bug" in result.message, result.message


# ----------------------------------------------------------------------------- cost against the head count
def cost_ref(B, T, d_model, H):
    return 8 * B * T * d_model**2 + 4 * B * T**2 * d_model, B * H * T * T


def test_heads_cost_accepts_reference():
    assert checks.check_heads_cost(cost_ref).passed
    assert checks.check_heads_cost(lambda *a: tuple(torch.tensor(float(c)) for c in cost_ref(*a))).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda B, T, d, H: (cost_ref(B, T, d, H)[0] * H, B * H * T * T), "grow with H, as source article 003 says"),
    (lambda B, T, d, H: (8 * B * T * d * d + 4 * B * T * T * d * H, B * H * T * T), "attention products grow with H"),
    (lambda B, T, d, H: (4 * B * T * T * d, B * H * T * T), "add the four projections"),
    (lambda B, T, d, H: (8 * B * T * d * d, B * H * T * T), "only the projections"),
    (lambda B, T, d, H: (cost_ref(B, T, d, H)[0] / 2, B * H * T * T), "a multiply-add is 2 FLOPs"),
    (lambda B, T, d, H: (8 * B * T * d * d + 4 * B * T * T * d / H, B * H * T * T), "d_head in place of d_model"),
    (lambda B, T, d, H: (cost_ref(B, T, d, H)[0], B * T * T), "one (T, T) matrix per head"),
    (lambda B, T, d, H: (cost_ref(B, T, d, H)[0], B * T * T * d), "counts d_head too"),
    (lambda B, T, d, H: cost_ref(B, T, d, H)[0], "return a tuple"),
    (lambda B, T, d, H: (np.ones(2), B * H * T * T), "one number"),
])
def test_heads_cost_rejects_planted_mistakes(wrong, words):
    result = checks.check_heads_cost(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- source article 004's worked example
def token_ref(x, w_q, w_k, w_v, i):
    q, k, v = x @ w_q, x @ w_k, x @ w_v
    return numpy_ref.scaled_dot_product_attention(q[i:i + 1], k, v)[0][0]


def test_token_output_accepts_reference():
    assert checks.check_token_output(token_ref).passed
    assert checks.check_token_output(lambda x, wq, wk, wv, i: torch.from_numpy(token_ref(x, wq, wk, wv, i))).passed


def _without_self(x, w_q, w_k, w_v, i):
    others = [j for j in range(len(x)) if j != i]
    q, k, v = x @ w_q, x[others] @ w_k, x[others] @ w_v
    return numpy_ref.scaled_dot_product_attention(q[i:i + 1], k, v)[0][0]


def _weights(x, w_q, w_k, w_v, i, scale, axis=-1):
    scores = (x @ w_q) @ (x @ w_k).T / scale(w_q.shape[1])
    return numpy_ref.softmax(scores, axis=axis)[i]


def _mutating(x, w_q, w_k, w_v, i):
    x[:] = 0  # changes the checker's input in place (it only gets a copy)
    return token_ref(x, w_q, w_k, w_v, i)


@pytest.mark.parametrize("wrong, words", [
    (_without_self, "as source article 004's worked example does"),
    (lambda x, wq, wk, wv, i: _weights(x, wq, wk, wv, i, lambda d: 1.0) @ (x @ wv), "no scaling"),
    (lambda x, wq, wk, wv, i: _weights(x, wq, wk, wv, i, lambda d: d) @ (x @ wv), "divided by d_head"),
    (lambda x, wq, wk, wv, i: _weights(x, wq, wk, wv, i, math.sqrt, axis=0) @ (x @ wv), "over the queries"),
    (lambda x, wq, wk, wv, i: _weights(x, wq, wk, wv, i, math.sqrt), "returned the attention weights"),
    (lambda x, wq, wk, wv, i: token_ref(x, wq, wk, wv, i).astype(np.float32) + 1e-3, "differs from the reference"),
    (lambda x, wq, wk, wv, i: token_ref(x, wq, wk, wv, i)[None], "shape"),
    (_mutating, "differs from the reference"),
])
def test_token_output_rejects_planted_mistakes(wrong, words):
    result = checks.check_token_output(wrong)
    assert not result.passed and words in result.message, result.message

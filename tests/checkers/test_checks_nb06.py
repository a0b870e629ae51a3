"""The notebook-06 checkers pass the reference and catch planted mistakes with a useful message."""

import math

import numpy as np
import pytest
import torch

from course_lib import checks


def sinusoidal_reference(max_len, d_model):
    pe = np.zeros((max_len, d_model))
    pos = np.arange(max_len)[:, None]
    two_i = np.arange(0, d_model, 2)
    angle = pos / 10000 ** (two_i / d_model)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : d_model // 2])
    return pe


def sinusoidal_swapped(max_len, d_model):
    pe = sinusoidal_reference(max_len, d_model)
    pe[:, 0::2], pe[:, 1::2] = pe[:, 1::2].copy(), pe[:, 0::2].copy()
    return pe


def sinusoidal_wrong_exponent(max_len, d_model):  # uses i instead of 2i
    pe = np.zeros((max_len, d_model))
    pos = np.arange(max_len)[:, None]
    i = np.arange(d_model // 2)
    angle = pos / 10000 ** (i / d_model)
    pe[:, 0::2], pe[:, 1::2] = np.sin(angle), np.cos(angle)
    return pe


def sinusoidal_transposed(max_len, d_model):
    return sinusoidal_reference(max_len, d_model).T


def test_sinusoidal_checker():
    assert checks.check_sinusoidal_encoding(sinusoidal_reference).passed
    assert checks.check_sinusoidal_encoding(lambda n, d: torch.tensor(sinusoidal_reference(n, d))).passed
    r = checks.check_sinusoidal_encoding(sinusoidal_swapped)
    assert not r.passed and "swapped" in r.message
    r = checks.check_sinusoidal_encoding(sinusoidal_wrong_exponent)
    assert not r.passed and "EVEN index 2i" in r.message
    r = checks.check_sinusoidal_encoding(sinusoidal_transposed)
    assert not r.passed and "shape (8, 10), expected (10, 8)" in r.message


def step_reference(q_t, k_t, v_t, k_cache, v_cache):
    k_cache = torch.cat([k_cache, k_t], dim=-2)
    v_cache = torch.cat([v_cache, v_t], dim=-2)
    w = torch.softmax(q_t @ k_cache.transpose(-2, -1) / math.sqrt(q_t.shape[-1]), dim=-1)
    return w @ v_cache, k_cache, v_cache


def step_attends_before_appending(q_t, k_t, v_t, k_cache, v_cache):
    w = torch.softmax(q_t @ k_cache.transpose(-2, -1) / math.sqrt(q_t.shape[-1]), dim=-1)
    out = w @ v_cache  # empty at t = 0, and never sees the new token
    return out, torch.cat([k_cache, k_t], dim=-2), torch.cat([v_cache, v_t], dim=-2)


def step_replaces_cache(q_t, k_t, v_t, k_cache, v_cache):
    out, _, _ = step_reference(q_t, k_t, v_t, k_cache, v_cache)
    return out, k_t, v_t


def step_unscaled(q_t, k_t, v_t, k_cache, v_cache):
    k_cache = torch.cat([k_cache, k_t], dim=-2)
    v_cache = torch.cat([v_cache, v_t], dim=-2)
    return torch.softmax(q_t @ k_cache.transpose(-2, -1), dim=-1) @ v_cache, k_cache, v_cache


def test_cached_step_checker():
    assert checks.check_cached_attention_step(step_reference).passed
    r = checks.check_cached_attention_step(step_attends_before_appending)
    assert not r.passed and "BEFORE computing the scores" in r.message
    r = checks.check_cached_attention_step(step_replaces_cache)
    assert not r.passed and "t + 1 = 2 tokens" in r.message and "dim=-2" in r.message
    r = checks.check_cached_attention_step(step_unscaled)
    assert not r.passed and "step t=1" in r.message and "sqrt(d)" in r.message
    r = checks.check_cached_attention_step(lambda *a: step_reference(*a)[0])
    assert not r.passed and "tuple (out_t, k_cache, v_cache)" in r.message


# ----------------------------------------------------------------------------- predictions (multiple choice)
def test_blocks_quiz_accepts_the_right_letters():
    assert checks.check_blocks_quiz(lambda: "bab").passed
    assert checks.check_blocks_quiz(lambda: ("b", "a", "b")).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda: "aab", "VARIANCE 1"), (lambda: "cab", "removes the input's scale"),
    (lambda: "bbb", "identity"), (lambda: "bca", "only in training"),
    (lambda: "baa", "ties each output to a position"), (lambda: "bac", "batch size"),
    (lambda: "ba", "return 3 letters"),
])
def test_blocks_quiz_rejects_wrong_answers(wrong, words):
    result = checks.check_blocks_quiz(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- the matrix that shifts PE by k
def shift_reference(k, d_model):
    m = np.zeros((d_model, d_model))
    for i in range(d_model // 2):
        a = k * 10000 ** (-2 * i / d_model)
        m[2 * i: 2 * i + 2, 2 * i: 2 * i + 2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    return m


def _exponent_i(k, d_model):
    m = np.zeros((d_model, d_model))
    for i in range(d_model // 2):
        a = k * 10000 ** (-i / d_model)
        m[2 * i: 2 * i + 2, 2 * i: 2 * i + 2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    return m


def _shift_by_minus_k(k, d_model):
    k = -k  # the shift the other way: the transposed matrix
    return shift_reference(k, d_model)


def test_pe_shift_matrix_accepts_reference():
    result = checks.check_pe_shift_matrix(shift_reference)
    assert result.passed, result
    assert checks.check_pe_shift_matrix(lambda k, d: torch.tensor(shift_reference(k, d))).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda k, d: shift_reference(k, d).T, "transposed"),
    (_exponent_i, "EVEN index"),
    (lambda k, d: np.kron(np.eye(d // 2), [[math.cos(k), -math.sin(k)], [math.sin(k), math.cos(k)]]), "own frequency"),
    (lambda k, d: np.eye(d), "identity"),
    (lambda k, d: shift_reference(k, d)[:, : d // 2], "shape"),
    (lambda k, d: shift_reference(k, d) * 1.01, "differs"),
    (_shift_by_minus_k, "transposed"),
])
def test_pe_shift_matrix_rejects_planted_mistakes(wrong, words):
    result = checks.check_pe_shift_matrix(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- ALiBi
def alibi_reference(q, k, v, slopes):
    T, d = q.shape[-2], q.shape[-1]
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # (T, T): i - j
    scores = q @ k.transpose(-2, -1) / math.sqrt(d) - slopes[:, None, None] * distance  # (B, H, T, T)
    scores = scores.masked_fill(distance < 0, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _alibi_variant(kind):
    def fn(q, k, v, slopes):
        T, d = q.shape[-2], q.shape[-1]
        distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        if kind == "plus":
            return alibi_reference(q, k, v, -slopes)
        if kind == "no mask":
            return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d) - slopes[:, None, None] * distance, -1) @ v
        if kind == "bias scaled":
            scores = (q @ k.transpose(-2, -1) - slopes[:, None, None] * distance) / math.sqrt(d)
            return torch.softmax(scores.masked_fill(distance < 0, float("-inf")), -1) @ v
        if kind == "one slope":
            return alibi_reference(q, k, v, slopes[:1].expand(slopes.shape[0]))
        if kind == "mutates":
            slopes.zero_()  # its copy only: the answer is then plain causal attention, and wrong
            return alibi_reference(q, k, v, slopes)
        raise AssertionError(kind)
    return fn


def test_alibi_attention_accepts_reference():
    result = checks.check_alibi_attention(alibi_reference)
    assert result.passed, result


@pytest.mark.parametrize("kind, words", [
    ("plus", "wrong sign"), ("no mask", "causal mask is missing"), ("bias scaled", "divided the bias"),
    ("one slope", "first slope"), ("mutates", "differs"),
])
def test_alibi_attention_rejects_planted_mistakes(kind, words):
    result = checks.check_alibi_attention(_alibi_variant(kind))
    assert not result.passed and words in result.message, result.message


def test_cached_step_rejects_an_answer_that_zeroes_the_cache_in_place():
    def zeroes_the_cache(q_t, k_t, v_t, k_cache, v_cache):
        k_cache.zero_()  # its private copy only: every earlier key is lost
        return step_reference(q_t, k_t, v_t, k_cache, v_cache)

    result = checks.check_cached_attention_step(zeroes_the_cache)
    assert not result.passed, result

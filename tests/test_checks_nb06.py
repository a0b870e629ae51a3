"""The notebook-06 checkers pass the reference and catch planted mistakes with a useful message."""

import math

import numpy as np
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

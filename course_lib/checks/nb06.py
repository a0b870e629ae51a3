"""Checkers for notebook 06 (transformer blocks): predictions about LayerNorm, dropout and causal equivariance,
the matrix that shifts a sinusoidal encoding, one cached decoding step, linear distance biases (ALiBi), and the
sinusoidal table itself."""

from __future__ import annotations

import numpy as np
import torch

from course_lib.checks._core import CheckFailure, as_array, call, checker, compare, diagnose, multiple_choice
from course_lib.masks import causal_mask
from course_lib.positional import sinusoidal_table

__all__ = [
    "check_blocks_quiz",
    "check_pe_shift_matrix",
    "check_cached_attention_step",
    "check_alibi_attention",
    "check_sinusoidal_encoding",
]

_BLOCKS_QUIZ = (
    ("b", {"a": "LayerNorm makes each token's features mean 0 and VARIANCE 1, so the squared norm is the sum of "
                "d_model unit variances: ||x||^2 = d_model = 256",
           "c": "LayerNorm removes the input's scale: with weight 1 and bias 0 every token leaves with norm "
                "sqrt(d_model) whatever came in (up to eps)"}),
    ("a", {"b": "in eval mode nn.Dropout is the identity: nothing is dropped, so the order cannot matter",
           "c": "the 1/(1 - p) factor is applied only in training; in eval mode dropout does nothing at all"}),
    ("b", {"a": "the causal mask ties each output to a position: after a permutation, token x_i sees a different "
                "set of earlier tokens, so its output changes, not only its place",
           "c": "the batch size plays no role: a causal mask already breaks the symmetry for one sequence"}),
)


@checker
def check_blocks_quiz(fn):
    """Check three predictions about LayerNorm, dropout in eval mode and a causal mask without positions.

    Your function: `fn() -> answers`, three letters (a string such as "abc" or a tuple), one per question in the
    order asked. Says which answer is wrong and why.
    """
    multiple_choice(call(fn), _BLOCKS_QUIZ)
    return "all three predictions are right"


def _shift_matrix(k: int, d_model: int) -> np.ndarray:
    """Block-diagonal M with PE[pos + k] = PE[pos] @ M: pair (2i, 2i+1) rotated by k * 10000^(-2i/d)."""
    matrix = np.zeros((d_model, d_model))
    for i in range(d_model // 2):
        angle = k * 10000 ** (-2 * i / d_model)
        c, s = np.cos(angle), np.sin(angle)
        matrix[2 * i: 2 * i + 2, 2 * i: 2 * i + 2] = [[c, -s], [s, c]]
    return matrix


def _exponent_i(k: int, d_model: int) -> np.ndarray:
    matrix = np.zeros((d_model, d_model))
    for i in range(d_model // 2):
        c, s = np.cos(k * 10000 ** (-i / d_model)), np.sin(k * 10000 ** (-i / d_model))
        matrix[2 * i: 2 * i + 2, 2 * i: 2 * i + 2] = [[c, -s], [s, c]]
    return matrix


@checker
def check_pe_shift_matrix(fn):
    """Check the matrix that shifts a sinusoidal positional encoding by k positions.

    Your function: `fn(k, d_model) -> M`, a (d_model, d_model) array (d_model even) with
    PE[pos + k] = PE[pos] @ M for every position pos, PE the sinusoidal table (row vectors). Checks k = 5, -3, 0
    and 100 with d_model from 8 to 64, on the table itself; names the transposed rotation (it shifts by -k), the
    frequency with i instead of 2i, and one frequency for every pair.
    """
    for k, d_model in ((5, 32), (-3, 16), (0, 8), (100, 64)):
        case = f"k={k}, d_model={d_model}"
        got = as_array("M", call(fn, k, d_model, what=f" ({case})"))
        expected = _shift_matrix(k, d_model)
        if got.shape != expected.shape:
            raise CheckFailure(f"for {case} M has shape {got.shape}; it maps a row PE[pos] of {d_model} features to "
                               f"PE[pos + k]: shape ({d_model}, {d_model})")
        table = sinusoidal_table(200, d_model, dtype=torch.float64).numpy()  # (200, d_model)
        start, stop = max(0, -k), min(200, 200 - k)
        if np.allclose(table[start:stop] @ got, table[start + k: stop + k], atol=1e-8):
            continue
        message = diagnose(got, {
            "your rotation is transposed: PE[pos] @ M^T is PE[pos - k]. For a ROW vector [sin, cos] the block is "
            "[[cos, -sin], [sin, cos]]": _shift_matrix(-k, d_model),
            "the frequency of pair i is 10000^(-2i / d_model) (the EVEN index 2i), not 10000^(-i / d_model)":
                _exponent_i(k, d_model),
            "every pair turns at its own frequency 10000^(-2i / d_model); you turned them all by the same angle":
                np.kron(np.eye(d_model // 2), [[np.cos(k), -np.sin(k)], [np.sin(k), np.cos(k)]]),
            "M is not the identity unless k = 0: shifting by k turns pair i by the angle k * 10000^(-2i / d_model)":
                np.eye(d_model),
        })
        if message:
            raise CheckFailure(f"for {case}: {message}.")
        compare(f"M for {case}", got, expected, atol=1e-8, rtol=1e-6,
                hint="block-diagonal; block i = [[cos a, -sin a], [sin a, cos a]] with a = k * 10000^(-2i / d_model)")
    return "k = 5, -3, 0, 100: PE[pos] @ M equals PE[pos + k] on the whole table"


def _alibi(q, k, v, slopes, *, sign=-1.0, masked=True, bias_scaled=False):
    T, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    distance = torch.arange(T, dtype=q.dtype)[:, None] - torch.arange(S, dtype=q.dtype)[None, :]  # (T, S): i - j
    bias = sign * slopes[:, None, None] * distance  # (H, T, S)
    raw = q @ k.transpose(-2, -1)
    scores = (raw + bias) / d ** 0.5 if bias_scaled else raw / d ** 0.5 + bias
    if masked:
        scores = scores.masked_fill(~causal_mask(T, S), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, T, d)


@checker
def check_alibi_attention(fn):
    """Check causal attention with linear distance biases (ALiBi) instead of positional encodings.

    Your function: `fn(q, k, v, slopes) -> out`, torch tensors q, k, v (B, H, T, d) and slopes (H,): head h adds
    -slopes[h] * (i - j) to the scaled score of query i and key j <= i; keys after i are masked. Returns out
    (B, H, T, d). Checks two shapes (H != T) against the formula; names a flipped sign, a missing causal mask,
    a bias scaled by 1/sqrt(d) and one slope for every head.
    """
    g = torch.Generator().manual_seed(6)
    for B, H, T, d in ((2, 4, 7, 8), (1, 3, 5, 16)):
        q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
        slopes = 2.0 ** (-8 * torch.arange(1, H + 1, dtype=torch.float64) / H)  # ALiBi's geometric slopes
        case = f"B={B}, H={H}, T={T}, d={d}"
        out = call(fn, q, k, v, slopes, what=f" ({case})")
        expected = _alibi(q, k, v, slopes)
        got = as_array("out", out)
        if got.shape == tuple(expected.shape) and not np.allclose(got, expected.numpy(), atol=1e-8):
            message = diagnose(got, {
                "the bias has the wrong sign: -slope * (i - j) makes DISTANT keys less likely; +slope * (i - j) "
                "favours them": _alibi(q, k, v, slopes, sign=1.0),
                "the causal mask is missing: keys j > i must get -inf (the bias alone only penalises them)":
                    _alibi(q, k, v, slopes, masked=False),
                "you divided the bias by sqrt(d) too: ALiBi adds it to the already scaled scores q k^T / sqrt(d)":
                    _alibi(q, k, v, slopes, bias_scaled=True),
                "every head used the first slope: head h has its own slope slopes[h], broadcast as slopes[:, None, "
                "None] over (H, T, S)": _alibi(q, k, v, slopes[:1].expand(H)),
            })
            if message:
                raise CheckFailure(f"for {case}: {message}.")
        compare(f"out for {case}", out, expected, atol=1e-8, rtol=1e-6,
                hint="scores = q k^T / sqrt(d) - slopes[:, None, None] * (i - j); -inf where j > i; softmax; @ v")
    return "two shapes match: per-head slopes, the right sign, causal"


@checker
def check_sinusoidal_encoding(fn):
    """Check the sinusoidal positional encoding table.

    Your function: `fn(max_len, d_model) -> table`, a (max_len, d_model) array or tensor with
    PE[pos, 2i] = sin(pos / 10000^(2i / d_model)) and PE[pos, 2i+1] = cos(the same angle).
    Checks three tables (up to 50 x 32) to 1e-5; names swapped sine and cosine and a wrong frequency.
    """
    for max_len, d_model in ((10, 8), (6, 6), (50, 32)):
        expected = sinusoidal_table(max_len, d_model, dtype=torch.float64).numpy()
        got = call(fn, max_len, d_model, what=f" (max_len={max_len}, d_model={d_model})")
        got_np = as_array(f"your table for max_len={max_len}, d_model={d_model}", got)
        if got_np.shape == expected.shape:
            swapped = expected.copy()
            swapped[:, 0::2], swapped[:, 1::2] = expected[:, 1::2], expected[:, 0::2]
            if np.allclose(got_np, swapped, atol=1e-5):
                raise CheckFailure("sine and cosine are swapped: even feature columns 2i take the sine, odd "
                                   "columns 2i+1 the cosine (so PE[0] = [0, 1, 0, 1, ...])")
            if np.allclose(got_np[0], expected[0], atol=1e-5) and not np.allclose(got_np, expected, atol=1e-5):
                raise CheckFailure(
                    f"position 0 is right but later positions are off (max error "
                    f"{np.abs(got_np - expected).max():.3g} for max_len={max_len}, d_model={d_model}): check the "
                    f"frequency 1 / 10000^(2i / d_model) - the exponent uses the EVEN index 2i of the pair, "
                    f"divided by d_model, and a sine/cosine pair shares one frequency")
        compare(f"PE for max_len={max_len}, d_model={d_model}", got_np, expected, atol=1e-5, rtol=1e-5,
                hint="angle = pos / 10000**(2i / d_model); sin at even columns 2i, cos at odd columns 2i+1")
    return "3 tables (up to 50 x 32) match the formula"


def _reference_step(q_t, k_t, v_t, k_cache, v_cache):
    k_cache = torch.cat([k_cache, k_t], dim=-2)
    v_cache = torch.cat([v_cache, v_t], dim=-2)
    scores = q_t @ k_cache.transpose(-2, -1) / q_t.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v_cache, k_cache, v_cache


@checker
def check_cached_attention_step(fn):
    """Check one decoding step of attention with a KV cache.

    Your function: `fn(q_t, k_t, v_t, k_cache, v_cache) -> (out_t, k_cache, v_cache)`, all torch
    tensors: q_t, k_t, v_t (B, H, 1, d) for the new token, the caches (B, H, t, d) for the t earlier
    tokens (t may be 0); out_t (B, H, 1, d), and the returned caches hold t + 1 tokens.
    Runs six steps from an empty cache and compares each out_t with full causal attention; names a
    cache that does not grow and scores computed before the new key is appended.
    """
    g = torch.Generator().manual_seed(0)
    B, H, T, d = 2, 3, 6, 4
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    scores = q @ k.transpose(-2, -1) / d ** 0.5
    full = torch.softmax(scores.masked_fill(~causal_mask(T), float("-inf")), dim=-1) @ v  # (B, H, T, d)
    k_cache = v_cache = torch.zeros(B, H, 0, d, dtype=torch.float64)
    for t in range(T):
        result = call(fn, q[:, :, t: t + 1], k[:, :, t: t + 1], v[:, :, t: t + 1], k_cache, v_cache,
                      what=f" at step t={t}")
        if not isinstance(result, tuple) or len(result) != 3:
            raise CheckFailure(f"return a tuple (out_t, k_cache, v_cache); got {type(result).__name__}")
        out_t, k_cache, v_cache = result
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if not isinstance(cache, torch.Tensor) or tuple(cache.shape) != (B, H, t + 1, d):
                shape = tuple(cache.shape) if hasattr(cache, "shape") else type(cache).__name__
                raise CheckFailure(f"after step t={t} the returned {name} should hold t + 1 = {t + 1} tokens, "
                                   f"shape {(B, H, t + 1, d)}; got {shape}. Hint: torch.cat([cache, new], dim=-2) "
                                   f"appends along the sequence axis")
        if t == 0 and hasattr(out_t, "shape") and tuple(out_t.shape) == (B, H, 1, d):
            first = as_array("out_t at step t=0", out_t)
            if np.allclose(first, 0.0) or not np.isfinite(first).all():
                raise CheckFailure("at the first step the output is 0 or NaN: the new token must attend to "
                                   "itself, so append k_t, v_t to the cache BEFORE computing the scores")
        compare(f"out_t at step t={t}", out_t, full[:, :, t: t + 1], atol=1e-8, rtol=1e-6,
                hint="scores = q_t @ k_cache^T / sqrt(d) over every cached token including the new one; softmax "
                     "over the last axis; weights @ v_cache. No causal mask is needed: the cache only holds the past")
    return f"{T} steps equal full causal attention (B={B}, H={H}, d={d})"

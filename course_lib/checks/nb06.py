"""Checkers for notebook 06 (transformer blocks): the sinusoidal encoding and one cached decoding step."""

from __future__ import annotations

import numpy as np
import torch

from course_lib.checks._core import CheckFailure, as_array, call, checker, compare
from course_lib.masks import causal_mask
from course_lib.positional import sinusoidal_table

__all__ = ["check_sinusoidal_encoding", "check_cached_attention_step"]


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

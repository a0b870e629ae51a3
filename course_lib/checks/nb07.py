"""Checkers for notebook 07 (why several heads)."""

from __future__ import annotations

import numpy as np
import torch

from course_lib.checks._core import CheckFailure, call, checker, compare

__all__ = ["check_param_count_vs_heads", "check_gated_concat"]


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

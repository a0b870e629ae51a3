"""Floating-point operations of attention and of the feed-forward network, counted by hand (notebooks 04, 06, 09,
10 and 99).

A matmul (m, k) @ (k, n) costs 2 m k n FLOPs: a multiply and an add per term. torch's
FlopCounterMode counts the same way (tests/unit/test_bench_attention.py checks it on naive attention).
"""

from __future__ import annotations

from course_lib._validate import check_bool, check_positive_int

__all__ = ["attention_flops", "module_flops", "feed_forward_params", "feed_forward_flops"]


def attention_flops(B: int, H: int, T: int, S: int, d_head: int, *, causal: bool = False, pass_: str = "fwd") -> float:
    """Floating-point operations of the attention core.

    Forward: q k^T is (T, d) @ (d, S) = 2 T S d FLOPs (a multiply and an add per term), weights @ v
    another 2 T S d: 4 B H T S d. Causal: only the lower triangle is needed, half of it.
    Backward: five matmuls of the same size (dV, dP, dS->dQ, dS->dK, plus recomputing or reading
    P), counted as 2.5 x forward; "fwd+bwd" is 3.5 x forward.
    """
    if pass_ not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"pass_ must be 'fwd', 'bwd' or 'fwd+bwd'; got {pass_!r}")
    forward = 4.0 * B * H * T * S * d_head
    if causal:
        forward /= 2
    return {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_] * forward


def module_flops(B: int, T: int, d_model: int, H: int, *, causal: bool = False, pass_: str = "fwd+bwd") -> float:
    """Self-attention module: four (d_model, d_model) projections (2 B T d_model^2 each) + the core.

    A linear layer's backward costs 2 x its forward (gradients for the input and the weight).
    """
    projections = 4 * 2.0 * B * T * d_model * d_model
    factor = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[pass_]
    return factor * projections + attention_flops(B, H, T, T, d_model // H, causal=causal, pass_=pass_)


def feed_forward_params(d_model: int, d_ff: int, *, gated: bool) -> int:
    """Parameters of one FFN: plain (two matrices, two biases) or SwiGLU (three matrices, no biases).

    plain: 2 d_model d_ff + d_ff + d_model;  SwiGLU: 3 d_model d_ff.
    """
    check_positive_int("d_model", d_model)
    check_positive_int("d_ff", d_ff)
    check_bool("gated", gated)
    return 3 * d_model * d_ff if gated else 2 * d_model * d_ff + d_ff + d_model


def feed_forward_flops(tokens: int, d_model: int, d_ff: int, *, gated: bool) -> int:
    """Matmul FLOPs of one FFN's forward pass over `tokens` positions, 2 per multiply-add (as FlopCounterMode).

    plain: 2 matmuls of d_model x d_ff, 4 tokens d_model d_ff;  SwiGLU: 3 of them, 6 tokens d_model d_ff.
    The activation, the gate's product and the biases are O(tokens d_ff), left out like FlopCounterMode does.
    """
    check_positive_int("tokens", tokens)
    check_positive_int("d_model", d_model)
    check_positive_int("d_ff", d_ff)
    check_bool("gated", gated)
    return (3 if gated else 2) * 2 * tokens * d_model * d_ff

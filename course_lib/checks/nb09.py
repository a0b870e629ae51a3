"""Checkers for notebook 09 (GPU, Tensor Cores, mixed precision).

- check_relative_error: ||out - ref|| / ||ref||, computed so it cannot overflow in float16;
- check_attention_flops: the forward FLOP count of attention (4 B H T S d, halved when causal);
- check_fp16_safe_scores: q k^T / sqrt(d) for float16 inputs whose raw products overflow.
On a wrong answer each checker tries the classic mistakes to say which one was made.
"""

from __future__ import annotations

import math

import torch

from course_lib.bench.attention import attention_flops
from course_lib.checks._core import CheckFailure, call, checker, compare

__all__ = ["check_relative_error", "check_attention_flops", "check_fp16_safe_scores"]


def _as_float(got, what: str) -> float:
    if isinstance(got, torch.Tensor):
        if got.numel() != 1:
            raise CheckFailure(f"{what}: return one number (a float or a 0-d tensor); got a tensor of shape "
                               f"{tuple(got.shape)}. Hint: take the norm of the whole difference, not per row")
        got = got.item()
    try:
        return float(got)
    except (TypeError, ValueError):
        raise CheckFailure(f"{what}: return a number; got {type(got).__name__}") from None


# ----------------------------------------------------------------------------- relative error
@checker
def check_relative_error(fn):
    """Check a relative error that cannot overflow in half precision.

    Your function: `fn(out, ref) -> float`, ||out - ref|| / ||ref|| with Frobenius norms, for tensors
    of any shape and dtype (float16 included). Checks four cases, one whose float16 squares overflow;
    names the max absolute difference, a missing division, dividing by ||out||, an entry-wise mean,
    and a computation in float32 or float16 instead of float64.
    """
    g = torch.Generator().manual_seed(9)
    ref = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    cases = [
        ("float64, (2, 3, 5, 4)", ref + 1e-3 * torch.randn(ref.shape, generator=g, dtype=torch.float64), ref),
        ("float32 out vs float64 ref", ref.float(), ref),
        ("a hand case: out [3, 4.5], ref [3, 4]", torch.tensor([3.0, 4.5]), torch.tensor([3.0, 4.0])),
        ("float16 tensors with entries near 1000 (their squares overflow float16)",
         (1000 * ref).half(), (1000 * ref + 3 * torch.randn(ref.shape, generator=g, dtype=torch.float64)).half()),
    ]
    for description, out, ref_ in cases:
        got = _as_float(call(fn, out.clone(), ref_.clone(), what=f" ({description})"), description)
        o, r = out.double(), ref_.double()
        expected = float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r))
        if math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-15):
            continue
        diff = o - r
        wrong = {
            "the largest absolute difference max|out - ref|; the relative error divides the NORM of the "
            "whole difference by the norm of ref": float(diff.abs().max()),
            "||out - ref|| without dividing by ||ref||": float(torch.linalg.vector_norm(diff)),
            "||out - ref|| / ||out||: divide by the norm of the REFERENCE": float(
                torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(o)),
            "the mean of |out - ref| / |ref| entry by entry; use the norms of the whole tensors "
            "(entry-wise ratios explode where ref is near 0)": float((diff.abs() / r.abs()).mean()),
        }
        for mistake, value in wrong.items():
            if math.isfinite(value) and math.isclose(got, value, rel_tol=1e-6):
                raise CheckFailure(f"{description}: you computed {mistake}. Expected {expected:.6g}, got {got:.6g}.")
        low_precision = []
        for low in {torch.float32, torch.promote_types(out.dtype, ref_.dtype)} - {torch.float64}:
            a, b = out.to(low), ref_.to(low)
            low_precision.append(float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)))
        if math.isfinite(got) and got > 0 and any(math.isclose(got, x, rel_tol=1e-4) for x in low_precision):
            raise CheckFailure(f"{description}: right formula, but not computed in float64: expected {expected:.9g}, "
                               f"got {got:.9g}. out - ref cancels most of the digits, so in float32/float16 the "
                               "difference keeps only a few. Hint: convert both to float64 first (.double())")
        if not math.isfinite(got) or got == 0.0:
            raise CheckFailure(f"{description}: your error is {got} but {expected:.3g} was expected. Hint: the sum of "
                               "squares overflows float16 (max 65504); convert both tensors to float64 first")
        raise CheckFailure(f"{description}: expected {expected:.6g}, got {got:.6g}. Hint: "
                           "torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref), in float64")
    return f"{len(cases)} cases match, including float16 inputs whose squares overflow"


# ----------------------------------------------------------------------------- FLOPs
@checker
def check_attention_flops(fn):
    """Check a FLOP count of the attention forward pass.

    Your function: `fn(B, H, T, S, d_head, causal) -> number`, the FLOPs of the two matmuls of
    softmax(q k^T / sqrt(d)) v: 4 B H T S d_head, halved when causal. Checks five cases (T != S,
    causal); names half or twice the count, an unhalved causal count, T*T, and sqrt(d) for d.
    """
    cases = [(1, 1, 4, 4, 2, False), (2, 8, 128, 128, 64, False), (3, 12, 16, 40, 32, False),
             (2, 8, 128, 128, 64, True), (4, 16, 4096, 4096, 128, True)]
    for B, H, T, S, d, causal in cases:
        description = f"B={B}, H={H}, T={T}, S={S}, d_head={d}, causal={causal}"
        got = _as_float(call(fn, B, H, T, S, d, causal, what=f" ({description})"), description)
        full, expected = attention_flops(B, H, T, S, d), attention_flops(B, H, T, S, d, causal=causal)
        if math.isclose(got, expected, rel_tol=1e-9):
            continue
        wrong = [
            (expected / 2, "half the expected count: count 2 FLOPs per multiply-add (a multiply AND an add), for "
                           "each of the two matmuls (q k^T and weights @ v)"),
            (expected * 2 if not causal else None, "twice the expected count: two matmuls of 2 T S d FLOPs each"),
            (full if causal else None, "the full count for a causal mask: only the lower triangle (about half of "
                                       "the T x S scores) needs computing, so halve it"),
            (expected / S * T, "T*T instead of T*S: the score matrix is (T, S), queries by keys"),
            (expected * math.sqrt(d) / d, "a sqrt(d) where d belongs: each dot product has d terms"),
        ]
        for value, message in wrong:
            if value is not None and math.isclose(got, value, rel_tol=1e-9):
                raise CheckFailure(f"{description}: got {got:.6g}, expected {expected:.6g}; this is {message}.")
        raise CheckFailure(f"{description}: got {got:.6g}, expected {expected:.6g}. Hint: q k^T is (T, d) @ (d, S): "
                           "T*S dot products of d multiply-adds = 2*T*S*d FLOPs per head; weights @ v the same")
    return f"{len(cases)} cases match (T != S and causal included)"


# ----------------------------------------------------------------------------- float16-safe scores
@checker
def check_fp16_safe_scores(fn):
    """Check attention scores computed safely from float16 inputs.

    Your function: `fn(q, k) -> scores`, with float16 tensors q (..., T, d) and k (..., S, d), and
    scores (..., T, S) = q k^T / sqrt(d), float16 or float32 and finite even when the raw q k^T
    exceeds 65504. Checks a small case and one that overflows unless scaled first; names inf/NaN
    from overflow, a float64 result and a division by d.
    """
    g = torch.Generator().manual_seed(16)
    cases = [
        ("small float16 inputs, (2, 3, 5, 16) and (2, 3, 7, 16)", 1.0, (2, 3, 5, 16), (2, 3, 7, 16)),
        ("large float16 activations (|q|, |k| ~ 60, d = 64): q k^T exceeds 65504 before scaling",
         60.0, (1, 2, 32, 64), (1, 2, 32, 64)),
    ]
    for description, scale, q_shape, k_shape in cases:
        q = (scale * torch.randn(q_shape, generator=g)).half()
        k = (scale * torch.randn(k_shape, generator=g)).half()
        expected = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
        got = call(fn, q.clone(), k.clone(), what=f" ({description})")
        if not isinstance(got, torch.Tensor):
            raise CheckFailure(f"{description}: return a torch.Tensor; got {type(got).__name__}")
        if got.dtype not in (torch.float16, torch.float32):
            raise CheckFailure(f"{description}: return float16 or float32 scores; got {got.dtype} (float64 would "
                               "hide the problem: Tensor Cores do not compute in float64)")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailure(f"{description}: the scores should have shape (..., T, S) = {tuple(expected.shape)}; "
                               f"got {tuple(got.shape)}. Hint: q @ k.transpose(-2, -1)")
        if not torch.isfinite(got).all():
            raise CheckFailure(f"{description}: {int((~torch.isfinite(got)).sum())} scores are inf/NaN: q @ k^T "
                               "overflowed float16 (max 65504) before the division. Hint: scale q by 1/sqrt(d) "
                               "BEFORE the matmul, or compute the matmul in float32")
        ratio = float((got.double() / expected).median())
        if math.isclose(ratio, 1 / math.sqrt(q.shape[-1]), rel_tol=1e-2):
            raise CheckFailure(f"{description}: your scores are 1/sqrt(d) times too small: you divided by d, "
                               "not sqrt(d)")
        compare(f"scores ({description})", got, expected, atol=2e-3 * float(expected.abs().max()), rtol=4e-3,
                hint="q k^T / sqrt(d_head), with q (..., T, d) and k (..., S, d)")
    return "finite and correct, including inputs whose raw q k^T overflows float16"

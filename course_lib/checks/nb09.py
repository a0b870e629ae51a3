"""Checkers for notebook 09 (GPU, Tensor Cores, mixed precision).

- check_relative_error: ||out - ref|| / ||ref||, computed so it cannot overflow in float16;
- check_attention_flops: the forward FLOP count of attention (4 B H T S d, halved when causal);
- check_fp16_safe_scores: q k^T / sqrt(d) for float16 inputs whose raw products overflow;
- check_format_facts: the largest number, unit roundoff and last consecutive integer of a format, by hand;
- check_autocast_quiz: which dtype CPU autocast gives five ops the notebook did not probe;
- check_scaler_step: one step of a GradScaler (unscale, skip on inf/NaN, back off or grow the scale).
On a wrong answer each checker tries the classic mistakes to say which one was made.
"""

from __future__ import annotations

import math

import torch

from course_lib.checks._core import CheckFailure, as_number, call, checker, compare, multiple_choice, unpack
from course_lib.cost.flops import attention_flops

__all__ = [
    "check_format_facts",
    "check_autocast_quiz",
    "check_scaler_step",
    "check_relative_error",
    "check_attention_flops",
    "check_fp16_safe_scores",
]


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
        got = as_number(description, call(fn, out.clone(), ref_.clone(), what=f" ({description})"),
                        hint="take the norm of the whole difference, not per row")
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
        got = as_number(description, call(fn, B, H, T, S, d, causal, what=f" ({description})"))
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


# ----------------------------------------------------------------------------- a format's numbers, by hand
def _format_facts(exponent_bits: int, mantissa_bits: int) -> tuple[float, float, int]:
    bias = 2 ** (exponent_bits - 1) - 1
    return 2.0**bias * (2 - 2.0**-mantissa_bits), 2.0 ** -(mantissa_bits + 1), 2 ** (mantissa_bits + 1)


_FORMATS = (("bfloat16", 8, 7), ("float16", 5, 10), ("float8_e5m2", 5, 2), ("float32", 8, 23), ("a made-up e6m9", 6, 9))


@checker
def check_format_facts(fn):
    """Check three numbers of an IEEE-style binary format worked out from its bit counts.

    Your function: `fn(exponent_bits, mantissa_bits) -> (largest, unit_roundoff, largest_integer)`: the largest
    finite number (the top exponent code is kept for inf and NaN), the unit roundoff u (the largest relative error
    of rounding to nearest, in the normal range) and the largest n such that every integer 0..n is representable.
    Checks bfloat16, float16, fp8 e5m2, float32 and a made-up format; names epsilon given for u, a bias of 2^(E-1),
    the reserved top exponent used, a forgotten significand, and a forgotten hidden bit.
    """
    for name, e_bits, m_bits in _FORMATS:
        case = f"{name} (E={e_bits}, M={m_bits})"
        got = unpack(call(fn, e_bits, m_bits, what=f" ({case})"), 3,
                     "return a tuple (largest, unit_roundoff, largest_integer)", case=case)
        values = [as_number(f"{label} for {case}", g) for label, g in zip(("largest", "u", "n"), got, strict=True)]
        largest, u, n = _format_facts(e_bits, m_bits)
        bias = 2 ** (e_bits - 1) - 1
        checks = (
            ("largest", values[0], largest, {
                2.0 ** (bias + 1) * (2 - 2.0**-m_bits): "the top exponent code (all ones) is kept for inf and NaN: "
                                                        "the largest exponent is 2^(E-1) - 1, not 2^(E-1)",
                2.0**bias: "the largest significand is 1.11...1 = 2 - 2^-M, not 1",
                2.0 ** (bias + 1): "the top exponent code is kept for inf and NaN, and the significand is at most "
                                   "2 - 2^-M: the largest number is 2^(2^(E-1) - 1) (2 - 2^-M)",
            }),
            ("unit roundoff", values[1], u, {
                2.0**-m_bits: "that is epsilon, the gap between 1 and the next number; rounding to the NEAREST "
                              "number errs by at most half of it: u = 2^-(M+1)",
                2.0 ** -(m_bits - 1): "epsilon is 2^-M, and u is half of it: 2^-(M+1)",
            }),
            ("largest consecutive integer", values[2], n, {
                2.0**m_bits: "the hidden leading 1 gives M + 1 significant bits, so every integer up to 2^(M+1) "
                             "is exact (float16: 2048, bfloat16: 256)",
                2.0 ** (m_bits + 1) - 1: "2^(M+1) itself is exact too (a power of two); the first integer "
                                         "missing is 2^(M+1) + 1",
            }),
        )
        for label, value, expected, mistakes in checks:
            if math.isclose(value, expected, rel_tol=1e-9):
                continue
            for wrong, why in mistakes.items():
                if math.isclose(value, wrong, rel_tol=1e-9):
                    raise CheckFailure(f"{label} for {case}: you gave {value:.6g}; {why}")
            raise CheckFailure(f"{label} for {case}: you gave {value:.6g}, expected {expected:.6g}")
    return f"{len(_FORMATS)} formats: largest number, unit roundoff and last consecutive integer all right"


# ----------------------------------------------------------------------------- which dtype under autocast
_AUTOCAST_QUIZ = (
    ("b", {"a": "losses are on autocast's float32 list, even on the CPU (like cross_entropy in section 4)",
           "c": "autocast was asked for bfloat16: float16 never appears"}),
    ("a", {"b": "bmm is a matrix multiply, on the lower-precision list: its float32 inputs are cast to bfloat16",
           "c": "autocast was asked for bfloat16: float16 never appears"}),
    ("a", {"b": "autocast casts BOTH inputs of a matmul to bfloat16 before the op runs; the float32 weight does "
                "not promote the result",
           "c": "autocast was asked for bfloat16: float16 never appears"}),
    ("b", {"a": "exp is on neither list on the CPU: it runs in its input's dtype, and its input is float32",
           "c": "autocast was asked for bfloat16: float16 never appears"}),
    ("a", {"b": "on the CPU, layer_norm is not on autocast's float32 list (on CUDA it is): a bfloat16 input "
                "stays bfloat16, as softmax did in section 4",
           "c": "autocast was asked for bfloat16: float16 never appears"}),
)


@checker
def check_autocast_quiz(fn):
    """Check five predictions of the dtype that CPU autocast (bfloat16) gives an op.

    Your function: `fn() -> answers`, five letters (a string such as "abbab" or a tuple), one per op in the order
    asked: a = bfloat16, b = float32, c = float16. Says which answer is wrong and why.
    """
    multiple_choice(call(fn), _AUTOCAST_QUIZ)
    return "all five dtypes predicted right"


# ----------------------------------------------------------------------------- one GradScaler step
def _scaler_step(grads, scale: float, good_steps: int, growth_interval: int):
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    if not finite:
        return None, scale * 0.5, 0
    good_steps += 1
    if good_steps == growth_interval:
        return [g.double() / scale for g in grads], scale * 2.0, 0
    return [g.double() / scale for g in grads], scale, good_steps


@checker
def check_scaler_step(fn):
    """Check one optimizer step of a gradient scaler, as torch.amp.GradScaler does it.

    Your function: `fn(scaled_grads, scale, good_steps, growth_interval) -> (grads, new_scale, new_good_steps)`:
    scaled_grads is a list of gradient tensors computed from loss * scale, good_steps the number of finite steps
    since the scale last changed. Return the unscaled gradients (or None when any entry is inf or NaN: the step is
    skipped), and the new scale and count (back off by 0.5 on inf/NaN; double after growth_interval finite steps
    in a row, restarting the count). Checks a run of six steps; names the usual mistakes.
    """
    g = torch.Generator().manual_seed(99)
    scale, good, interval = 2.0**16, 0, 3
    finite = [torch.randn(3, generator=g) * scale * 1e-4, torch.randn(2, 2, generator=g) * scale * 1e-3]
    with_inf = [finite[0].clone(), finite[1].clone()]
    with_inf[1][0, 1] = float("inf")
    with_nan = [finite[0].clone() * float("nan"), finite[1].clone()]
    steps = [("finite", finite), ("finite", finite), ("an inf entry", with_inf), ("finite", finite),
             ("finite", finite), ("finite, the third in a row", finite), ("a NaN entry", with_nan)]
    for number, (what, grads) in enumerate(steps, start=1):
        case = f"step {number} ({what}; scale {scale:g}, good_steps {good}, growth_interval {interval})"
        result = unpack(call(fn, [t.clone() for t in grads], scale, good, interval, what=f" at {case}"), 3,
                        "return a tuple (grads or None, new_scale, new_good_steps)", case=case)
        exp_grads, exp_scale, exp_good = _scaler_step(grads, scale, good, interval)
        got_grads, got_scale, got_good = result
        if exp_grads is None and got_grads is not None:
            raise CheckFailure(f"at {case}: a gradient is inf or NaN, so the step must be SKIPPED (return None for "
                               f"the gradients): applying it would write inf/NaN into the parameters")
        if exp_grads is not None:
            if got_grads is None:
                raise CheckFailure(f"at {case}: every gradient is finite, so the step is taken: return the "
                                   f"unscaled gradients, not None")
            if not isinstance(got_grads, list | tuple) or len(got_grads) != len(exp_grads):
                raise CheckFailure(f"at {case}: return the gradients as a list of {len(exp_grads)} tensors")
            for index, (gg, eg, sg) in enumerate(zip(got_grads, exp_grads, grads, strict=True)):
                if isinstance(gg, torch.Tensor) and gg.shape == eg.shape:
                    if torch.allclose(gg.double(), sg.double(), rtol=1e-6):
                        raise CheckFailure(f"at {case}: gradient {index} is still multiplied by the scale: divide "
                                           f"by it (unscale) before the optimizer uses it")
                    if torch.allclose(gg.double(), sg.double() * scale, rtol=1e-6):
                        raise CheckFailure(f"at {case}: you multiplied by the scale again; unscaling DIVIDES "
                                           f"by it")
                compare(f"gradient {index} at {case}", gg, eg, atol=0, rtol=1e-6,
                        hint="grads = [g / scale for g in scaled_grads], in float32 or wider")
        new_scale = as_number(f"new_scale at {case}", got_scale)
        new_good = as_number(f"new_good_steps at {case}", got_good)
        if new_scale != exp_scale:
            if exp_grads is None:
                why = ("on inf/NaN the scale backs off: multiply it by 0.5 (the scale was too large for the "
                       "gradients' range)")
            elif exp_scale > scale:
                why = (f"this is the {interval}th finite step in a row: the scale doubles (and the count restarts "
                       f"at 0)")
            else:
                why = (f"the scale grows only after {interval} finite steps in a row; here good_steps becomes "
                       f"{exp_good}")
            raise CheckFailure(f"at {case}: new_scale is {new_scale:g}, expected {exp_scale:g}: {why}")
        if new_good != exp_good:
            why = ("an inf/NaN step restarts the count at 0" if exp_grads is None else
                   "the count restarts at 0 when the scale grows" if exp_scale > scale else
                   "a finite step adds 1 to the count")
            raise CheckFailure(f"at {case}: new_good_steps is {new_good:g}, expected {exp_good}: {why}")
        scale, good = exp_scale, exp_good
    return f"{len(steps)} steps: unscaled, skipped on inf and NaN, backed off and grown like GradScaler"

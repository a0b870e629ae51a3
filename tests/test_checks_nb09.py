"""The notebook-09 checkers accept the reference and reject planted wrong solutions with useful messages."""

from __future__ import annotations

import math

import torch

from course_lib import checks
from course_lib.bench.attention import attention_flops


# ----------------------------------------------------------------------------- relative error
def ref_relative_error(out, ref):
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def test_relative_error_accepts_reference():
    result = checks.check_relative_error(ref_relative_error)
    assert result.passed, result
    assert repr(result).startswith("[PASSED]")


def test_relative_error_accepts_tensor_result():
    result = checks.check_relative_error(lambda o, r: (o.double() - r.double()).norm() / r.double().norm())
    assert result.passed, result


def test_relative_error_rejects_max_abs_difference():
    result = checks.check_relative_error(lambda o, r: float((o.double() - r.double()).abs().max()))
    assert not result.passed and "largest absolute difference" in result.message


def test_relative_error_rejects_division_by_out():
    result = checks.check_relative_error(lambda o, r: float((o.double() - r.double()).norm() / o.double().norm()))
    assert not result.passed and "REFERENCE" in result.message


def test_relative_error_rejects_missing_division():
    result = checks.check_relative_error(lambda o, r: float((o.double() - r.double()).norm()))
    assert not result.passed and "without dividing" in result.message


def test_relative_error_rejects_entrywise_mean():
    def entrywise(o, r):
        return float(((o.double() - r.double()).abs() / r.double().abs()).mean())

    result = checks.check_relative_error(entrywise)
    assert not result.passed and "entry by entry" in result.message


def test_relative_error_rejects_float32_and_float16_arithmetic():
    result = checks.check_relative_error(lambda o, r: float((o.float() - r.float()).norm() / r.float().norm()))
    assert not result.passed and "float64" in result.message
    result = checks.check_relative_error(lambda o, r: float((o - r).pow(2).sum().sqrt() / r.pow(2).sum().sqrt()))
    assert not result.passed and "overflows float16" in result.message


def test_relative_error_rejects_per_row_norms():
    result = checks.check_relative_error(lambda o, r: torch.linalg.vector_norm(o.double() - r.double(), dim=-1))
    assert not result.passed and "one number" in result.message


# ----------------------------------------------------------------------------- FLOPs
def ref_flops(B, H, T, S, d_head, causal):
    flops = 4 * B * H * T * S * d_head
    return flops / 2 if causal else flops


def test_flops_accepts_reference_and_agrees_with_the_benchmark_suite():
    assert checks.check_attention_flops(ref_flops).passed
    assert checks.check_attention_flops(lambda *a: attention_flops(*a[:5], causal=a[5])).passed


def test_flops_rejects_two_instead_of_four():
    result = checks.check_attention_flops(lambda B, H, T, S, d, c: ref_flops(B, H, T, S, d, c) / 2)
    assert not result.passed and "multiply AND an add" in result.message


def test_flops_rejects_missing_causal_halving():
    result = checks.check_attention_flops(lambda B, H, T, S, d, c: 4 * B * H * T * S * d)
    assert not result.passed and "lower triangle" in result.message


def test_flops_rejects_t_squared():
    result = checks.check_attention_flops(lambda B, H, T, S, d, c: ref_flops(B, H, T, T, d, c))
    assert not result.passed and "T*T instead of T*S" in result.message and "S=40" in result.message


def test_flops_rejects_unknown_mistake_with_hint():
    result = checks.check_attention_flops(lambda B, H, T, S, d, c: ref_flops(B, H, T, S, d, c) + 1)
    assert not result.passed and "2*T*S*d" in result.message


# ----------------------------------------------------------------------------- float16-safe scores
def ref_scores(q, k):
    return (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)


def test_fp16_scores_accepts_reference_and_float32_variant():
    assert checks.check_fp16_safe_scores(ref_scores).passed
    result = checks.check_fp16_safe_scores(lambda q, k: q.float() @ k.float().transpose(-2, -1) / q.shape[-1] ** 0.5)
    assert result.passed, result


def test_fp16_scores_rejects_scaling_after_the_matmul():
    result = checks.check_fp16_safe_scores(lambda q, k: (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]))
    assert not result.passed
    assert "overflowed float16" in result.message and "BEFORE the matmul" in result.message


def test_fp16_scores_rejects_division_by_d():
    result = checks.check_fp16_safe_scores(lambda q, k: (q / q.shape[-1]) @ k.transpose(-2, -1))
    assert not result.passed and "divided by d" in result.message


def test_fp16_scores_rejects_wrong_transpose_and_float64():
    result = checks.check_fp16_safe_scores(lambda q, k: (k / math.sqrt(k.shape[-1])) @ q.transpose(-2, -1))
    assert not result.passed and "(..., T, S)" in result.message
    result = checks.check_fp16_safe_scores(lambda q, k: q.double() @ k.double().transpose(-2, -1) / 8)
    assert not result.passed and "float64" in result.message

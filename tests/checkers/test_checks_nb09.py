"""The notebook-09 checkers accept the reference and reject planted wrong solutions with useful messages."""

from __future__ import annotations

import math

import pytest
import torch

from course_lib import checks
from course_lib.cost.flops import attention_flops


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


# ----------------------------------------------------------------------------- a format's numbers, by hand
def ref_format_facts(e_bits, m_bits):
    bias = 2 ** (e_bits - 1) - 1
    return 2.0**bias * (2 - 2.0**-m_bits), 2.0 ** -(m_bits + 1), 2 ** (m_bits + 1)


def test_format_facts_accepts_reference_and_agrees_with_torch():
    assert checks.check_format_facts(ref_format_facts).passed
    for dtype, e_bits, m_bits in ((torch.float16, 5, 10), (torch.bfloat16, 8, 7), (torch.float8_e5m2, 5, 2)):
        largest, u, n = ref_format_facts(e_bits, m_bits)
        assert torch.finfo(dtype).max == largest and torch.finfo(dtype).eps == 2 * u
        assert float(torch.tensor(float(n)).to(dtype)) == n and float(torch.tensor(float(n + 1)).to(dtype)) != n + 1


@pytest.mark.parametrize("wrong, words", [
    (lambda e, m: (ref_format_facts(e, m)[0], 2.0**-m, 2 ** (m + 1)), "that is epsilon"),
    (lambda e, m: (2.0 ** (2 ** (e - 1)) * (2 - 2.0**-m), 2.0 ** -(m + 1), 2 ** (m + 1)), "kept for inf and NaN"),
    (lambda e, m: (2.0 ** (2 ** (e - 1) - 1), 2.0 ** -(m + 1), 2 ** (m + 1)), "2 - 2^-M"),
    (lambda e, m: (ref_format_facts(e, m)[0], 2.0 ** -(m + 1), 2**m), "hidden leading 1"),
    (lambda e, m: (ref_format_facts(e, m)[0], 2.0 ** -(m + 1), 2 ** (m + 1) - 1), "is exact too"),
    (lambda e, m: ref_format_facts(e, m)[:2], "tuple"),
])
def test_format_facts_rejects_planted_mistakes(wrong, words):
    result = checks.check_format_facts(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- autocast dtypes
def test_autocast_quiz_key_is_what_cpu_autocast_does():
    x32, w32 = torch.randn(4, 8), torch.randn(8, 8)
    xb = x32.bfloat16()
    ops = [lambda: torch.nn.functional.mse_loss(xb, xb), lambda: torch.bmm(x32[None], w32[None]),
           lambda: xb @ w32, lambda: torch.exp(x32), lambda: torch.nn.functional.layer_norm(xb, (8,))]
    letter = {torch.bfloat16: "a", torch.float32: "b", torch.float16: "c"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = "".join(letter[op().dtype] for op in ops)
    assert checks.check_autocast_quiz(lambda: measured).passed, measured


@pytest.mark.parametrize("wrong, words", [
    (lambda: "aaaba", "losses"), (lambda: "bbaba", "bmm"), (lambda: "babba", "BOTH inputs"),
    (lambda: "baaaa", "neither list"), (lambda: "baabb", "not on autocast's float32 list"),
    (lambda: "caaba", "float16 never appears"), (lambda: "baab", "return 5 letters"),
])
def test_autocast_quiz_rejects_wrong_answers(wrong, words):
    result = checks.check_autocast_quiz(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- one GradScaler step
def ref_scaler_step(scaled_grads, scale, good_steps, growth_interval):
    if not all(torch.isfinite(g).all() for g in scaled_grads):
        return None, scale * 0.5, 0
    good_steps += 1
    grads = [g / scale for g in scaled_grads]
    if good_steps == growth_interval:
        return grads, scale * 2.0, 0
    return grads, scale, good_steps


def _scaler_variant(kind):
    def fn(scaled_grads, scale, good_steps, growth_interval):
        grads, new_scale, new_good = ref_scaler_step(scaled_grads, scale, good_steps, growth_interval)
        finite = grads is not None
        if kind == "not unscaled":
            return (list(scaled_grads) if finite else None), new_scale, new_good
        if kind == "multiplied":
            return ([g * scale for g in scaled_grads] if finite else None), new_scale, new_good
        if kind == "steps on inf":
            return [g / scale for g in scaled_grads], new_scale, new_good
        if kind == "no backoff":
            return grads, (scale if not finite else new_scale), new_good
        if kind == "count kept on inf":
            return grads, new_scale, (good_steps if not finite else new_good)
        if kind == "grows one step late":
            if finite and good_steps + 1 == growth_interval:
                return grads, scale, good_steps + 1
            if finite and good_steps + 1 > growth_interval:
                return grads, scale * 2.0, 0
            return grads, new_scale, new_good
        if kind == "mutates":
            for g in scaled_grads:
                g.mul_(2)  # its copies only: the gradients it returns are then twice too large
            return ref_scaler_step(scaled_grads, scale, good_steps, growth_interval)
        raise AssertionError(kind)
    return fn


def test_scaler_step_accepts_reference_and_agrees_with_torch_gradscaler():
    assert checks.check_scaler_step(ref_scaler_step).passed
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=2)
    scaler.scale(torch.tensor(1.0))  # initialises the scale
    scale, good = 8.0, 0
    for scaled in ([8.0, 16.0, 24.0], [8.0, 8.0, 8.0], [float("inf"), 0.0, 0.0], [4.0, 4.0, 4.0]):
        before = param.detach().clone()
        param.grad = torch.tensor(scaled)
        grads, scale, good = ref_scaler_step([param.grad.clone()], scale, good, 2)
        scaler.step(optimizer)
        scaler.update()
        moved = before - param.detach()
        assert torch.equal(moved, torch.zeros(3)) if grads is None else torch.allclose(moved, grads[0])
        assert scaler.get_scale() == scale


@pytest.mark.parametrize("kind, words", [
    ("not unscaled", "still multiplied"), ("multiplied", "DIVIDES"), ("steps on inf", "SKIPPED"),
    ("no backoff", "backs off"), ("count kept on inf", "restarts the count"),
    ("grows one step late", "the scale doubles"), ("mutates", "differs"),
])
def test_scaler_step_rejects_planted_mistakes(kind, words):
    result = checks.check_scaler_step(_scaler_variant(kind))
    assert not result.passed and words in result.message, result.message


def test_fp16_scores_rejects_an_answer_that_scales_its_input_in_place():
    def scales_k_in_place(q, k):
        k.mul_(0.5)  # its private copy only: the scores it returns are then half the right ones
        return (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)

    result = checks.check_fp16_safe_scores(scales_k_in_place)
    assert not result.passed, result

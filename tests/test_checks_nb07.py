"""Notebook 07's checkers pass the reference and reject planted mistakes with a useful message."""

import torch

from course_lib import MultiHeadAttention, checks


def param_count(d_model, num_heads, bias):
    return sum(p.numel() for p in MultiHeadAttention(d_model, num_heads, bias=bias).parameters())


def test_param_count_reference_passes():
    result = checks.check_param_count_vs_heads(param_count)
    assert result.passed, result


def test_param_count_growing_with_heads_fails():
    result = checks.check_param_count_vs_heads(lambda d, h, b: h * 4 * d * d + (4 * d if b else 0))
    assert not result.passed and "grows with num_heads" in result.message


def test_param_count_without_bias_fails():
    result = checks.check_param_count_vs_heads(lambda d, h, b: 4 * d * d)
    assert not result.passed and "bias" in result.message


def gated(heads, gate):
    B, H, T, d = heads.shape
    return (heads * gate.view(1, H, 1, 1)).transpose(1, 2).reshape(B, T, H * d)


def test_gated_concat_reference_passes():
    result = checks.check_gated_concat(gated)
    assert result.passed, result


def test_gated_concat_in_float32_fails_and_names_the_dtype():
    result = checks.check_gated_concat(lambda x, g: gated(x.float(), g.float()))
    assert not result.passed and "float32" in result.message and "compute in float64" in result.message


def test_gated_concat_without_transpose_fails():
    result = checks.check_gated_concat(lambda x, g: (x * g.view(1, -1, 1, 1)).reshape(x.shape[0], x.shape[2], -1))
    assert not result.passed and "transpose(1, 2)" in result.message


def test_gated_concat_ignoring_the_gate_fails():
    result = checks.check_gated_concat(lambda x, g: x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1))
    assert not result.passed and "differs from the reference" in result.message


def test_gated_concat_gate_on_wrong_axis_fails():
    result = checks.check_gated_concat(lambda x, g: gated(x, torch.ones_like(g)) * g.mean())
    assert not result.passed

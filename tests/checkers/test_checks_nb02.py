"""Notebook 02's checkers: they pass the reference and name the mistake in planted wrong solutions."""

import numpy as np
import pytest

from course_lib import checks
from course_lib import numpy_ref as nr


def _not_yet(result, *fragments):
    assert not result.passed, result
    text = repr(result)
    assert text.startswith("[NOT YET] "), text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


# ----------------------------------------------------------------------------- softmax Jacobian
def reference_jacobian(x):
    p = nr.softmax(x)
    return np.diag(p) - np.outer(p, p)


def test_softmax_jacobian_passes_reference():
    result = checks.check_softmax_jacobian(reference_jacobian)
    assert result.passed, result
    assert repr(result).startswith("[PASSED] softmax_jacobian")


def test_softmax_jacobian_missing_diagonal_term():
    _not_yet(checks.check_softmax_jacobian(lambda x: -np.outer(nr.softmax(x), nr.softmax(x))),
             "diagonal term diag(p) is missing")


def test_softmax_jacobian_sign_flipped():
    _not_yet(checks.check_softmax_jacobian(lambda x: -reference_jacobian(x)), "sign is flipped")


def test_softmax_jacobian_off_diagonal_missing():
    _not_yet(checks.check_softmax_jacobian(lambda x: np.diag(nr.softmax(x))), "off-diagonal term")


def test_softmax_jacobian_unnamed_mistake_reports_row_sums():
    def outer_twice(x):
        p = nr.softmax(x)
        return np.diag(p) - 2 * np.outer(p, p)

    _not_yet(checks.check_softmax_jacobian(outer_twice), "must sum to 0", "diag(p) - p p^T")


def test_softmax_jacobian_overflow_is_reported():
    def unstable(x):
        e = np.exp(x)  # overflows for logits of 1e3
        p = e / e.sum()
        return np.diag(p) - np.outer(p, p)

    with np.errstate(over="ignore", invalid="ignore"):
        result = checks.check_softmax_jacobian(unstable)
    _not_yet(result, "nan", "subtract max(x)")


def test_softmax_jacobian_wrong_shape():
    _not_yet(checks.check_softmax_jacobian(lambda x: nr.softmax(x)), "has shape")


# ----------------------------------------------------------------------------- softmax backward
def reference_softmax_backward(p, d_p):
    return p * (d_p - np.sum(d_p * p, axis=-1, keepdims=True))


def test_softmax_backward_passes_reference():
    assert checks.check_softmax_backward(reference_softmax_backward).passed


def test_softmax_backward_wrong_axis():
    _not_yet(checks.check_softmax_backward(lambda p, d_p: p * (d_p - np.sum(d_p * p, axis=0, keepdims=True))),
             "wrong axis", "LAST axis")


def test_softmax_backward_missing_p_factor():
    _not_yet(checks.check_softmax_backward(lambda p, d_p: d_p - np.sum(d_p * p, axis=-1, keepdims=True)),
             "multiplication by p is missing")


def test_softmax_backward_rowsum_of_dp_alone():
    _not_yet(checks.check_softmax_backward(lambda p, d_p: p * (d_p - np.sum(d_p, axis=-1, keepdims=True))),
             "d_p * p")


def test_softmax_backward_via_jacobian_also_passes():
    def via_jacobian(p, d_p):
        flat_p, flat_dp = p.reshape(-1, p.shape[-1]), d_p.reshape(-1, p.shape[-1])
        rows = [(np.diag(a) - np.outer(a, a)) @ b for a, b in zip(flat_p, flat_dp, strict=True)]
        return np.stack(rows).reshape(p.shape)

    assert checks.check_softmax_backward(via_jacobian).passed


# ----------------------------------------------------------------------------- attention backward
def _parts(q, k, v, d_out, mask):
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    p = nr.softmax(scores)
    dp = d_out @ np.swapaxes(v, -1, -2)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    return p, dp, ds, np.sqrt(q.shape[-1])


def correct_backward(q, k, v, d_out, mask=None):
    p, _, ds, root_d = _parts(q, k, v, d_out, mask)
    return ds @ k / root_d, np.swapaxes(ds, -1, -2) @ q / root_d, np.swapaxes(p, -1, -2) @ d_out


def test_attention_backward_passes_reference_and_handwritten():
    assert checks.check_attention_backward(nr.scaled_dot_product_attention_backward).passed
    result = checks.check_attention_backward(correct_backward)
    assert result.passed, result
    assert "fully masked row" in repr(result)


def test_attention_backward_missing_sqrt_d_in_dq():
    def wrong(q, k, v, d_out, mask=None):
        dq, dk, dv = correct_backward(q, k, v, d_out, mask)
        return dq * np.sqrt(q.shape[-1]), dk, dv

    _not_yet(checks.check_attention_backward(wrong), "dq is missing the 1/sqrt(d) factor")


def test_attention_backward_missing_sqrt_d_in_dk():
    def wrong(q, k, v, d_out, mask=None):
        dq, dk, dv = correct_backward(q, k, v, d_out, mask)
        return dq, dk * np.sqrt(q.shape[-1]), dv

    _not_yet(checks.check_attention_backward(wrong), "dk is missing the 1/sqrt(d) factor")


def test_attention_backward_dk_without_transpose():
    def wrong(q, k, v, d_out, mask=None):
        p, _, ds, root_d = _parts(q, k, v, d_out, mask)
        dq, _, dv = correct_backward(q, k, v, d_out, mask)
        return dq, ds @ q / root_d, dv  # only has the right shape when T == S

    _not_yet(checks.check_attention_backward(wrong), "dk uses dS where it needs dS^T")


def test_attention_backward_dv_without_transpose():
    def wrong(q, k, v, d_out, mask=None):
        p, *_ = _parts(q, k, v, d_out, mask)
        dq, dk, _ = correct_backward(q, k, v, d_out, mask)
        return dq, dk, p @ d_out

    _not_yet(checks.check_attention_backward(wrong), "dv uses P where it needs P^T")


def test_attention_backward_skips_softmax_backward():
    def wrong(q, k, v, d_out, mask=None):
        p, dp, _, root_d = _parts(q, k, v, d_out, mask)
        return dp @ k / root_d, np.swapaxes(dp, -1, -2) @ q / root_d, np.swapaxes(p, -1, -2) @ d_out

    _not_yet(checks.check_attention_backward(wrong), "skips the softmax backward")


def test_attention_backward_ignoring_mask_is_caught_on_the_masked_case():
    def wrong(q, k, v, d_out, mask=None):
        return correct_backward(q, k, v, d_out, None)

    _not_yet(checks.check_attention_backward(wrong), "causal mask")


def test_attention_backward_nan_on_fully_masked_row():
    def naive_softmax_backward(q, k, v, d_out, mask=None):
        scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        dp = d_out @ np.swapaxes(v, -1, -2)
        ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
        root_d = np.sqrt(q.shape[-1])
        return ds @ k / root_d, np.swapaxes(ds, -1, -2) @ q / root_d, np.swapaxes(p, -1, -2) @ d_out

    with np.errstate(invalid="ignore"):
        result = checks.check_attention_backward(naive_softmax_backward)
    _not_yet(result, "fully masked", "NaN")


@pytest.mark.parametrize("bad_return", [lambda g: g[0], lambda g: g[:2], lambda g: list(g) + [None]])
def test_attention_backward_wrong_return_structure(bad_return):
    result = checks.check_attention_backward(lambda *a: bad_return(correct_backward(*a)))
    _not_yet(result, "return a tuple (dq, dk, dv)")


def test_attention_backward_without_mask_argument():
    def no_mask(q, k, v, d_out):
        return correct_backward(q, k, v, d_out)

    _not_yet(checks.check_attention_backward(no_mask), "TypeError", "the last one is the mask")


def test_a_torch_answer_that_still_requires_grad_is_checked_not_crashed():
    import torch

    def jacobian_in_torch(x):
        p = torch.softmax(torch.tensor(x, requires_grad=True), dim=-1)
        return torch.diag(p) - torch.outer(p, p)  # requires grad: numpy cannot read it without detach()

    result = checks.check_softmax_jacobian(jacobian_in_torch)
    assert result.passed, result.message


# ----------------------------------------------------------------------------- softmax with a temperature
def temperature_ref(x, tau, d_p):
    p = nr.softmax(x / tau)
    return p * (d_p - np.sum(d_p * p, axis=-1, keepdims=True)) / tau


def test_softmax_temperature_backward_accepts_reference():
    assert checks.check_softmax_temperature_backward(temperature_ref).passed


def _temperature_mutating(x, tau, d_p):
    d_p *= 0  # its copy only: the checker's d_p and reference are intact, so this answer is simply wrong
    return temperature_ref(x, tau, d_p)


@pytest.mark.parametrize("wrong, words", [
    (lambda x, tau, d_p: temperature_ref(x, tau, d_p) * tau, "chain rule"),
    (lambda x, tau, d_p: temperature_ref(x, tau, d_p) * tau * tau, "multiplied by tau"),
    (lambda x, tau, d_p: temperature_ref(x, 1.0, d_p) / tau, "without the temperature"),
    (lambda x, tau, d_p: nr.softmax(x / tau), "forward pass"),
    (_temperature_mutating, "differs"),
])
def test_softmax_temperature_backward_rejects_planted_mistakes(wrong, words):
    result = checks.check_softmax_temperature_backward(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- gradient of an additive bias
def bias_ref(q, k, v, bias, d_out, *, scale_bias=False, skip_softmax=False, no_sum=False, dv_no_T=False,
             dk_no_T=False):
    d = q.shape[-1]
    p = nr.softmax(q @ k.T / np.sqrt(d) + bias)
    dp = d_out @ v.T
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    d_bias = dp if skip_softmax else ds / np.sqrt(d) if scale_bias else ds
    if bias.shape[0] == 1 and not no_sum:
        d_bias = d_bias.sum(axis=0, keepdims=True)
    dv = p @ d_out if dv_no_T else p.T @ d_out
    dk = ds @ q / np.sqrt(d) if dk_no_T else ds.T @ q / np.sqrt(d)
    return ds @ k / np.sqrt(d), dk, dv, d_bias


def test_bias_backward_accepts_reference():
    assert checks.check_bias_backward(bias_ref).passed


def _bias_mutating(q, k, v, bias, d_out):
    bias[...] = 0.0  # changes its copy; the checker's reference uses the real bias
    return bias_ref(q, k, v, bias, d_out)


@pytest.mark.parametrize("options, words", [
    (dict(scale_bias=True), "no 1/sqrt(d)"),
    (dict(skip_softmax=True), "skips the softmax backward"),
    (dict(no_sum=True), "SUMMED"),
    (dict(dv_no_T=True), "forgot .T: dv = P.T"),
    (dict(dk_no_T=True), "forgot .T: dk = dS.T"),
])
def test_bias_backward_rejects_planted_mistakes(options, words):
    result = checks.check_bias_backward(lambda *args: bias_ref(*args, **options))
    assert not result.passed and words in result.message, result.message


def test_bias_backward_rejects_a_mutating_answer_and_a_triple():
    assert not checks.check_bias_backward(_bias_mutating).passed
    result = checks.check_bias_backward(lambda *args: bias_ref(*args)[:3])
    assert not result.passed and "four arrays" in result.message


# ----------------------------------------------------------------------------- quiz
def test_backward_quiz_accepts_the_right_letters():
    assert checks.check_backward_quiz(lambda: "cbc").passed


@pytest.mark.parametrize("wrong, words", [
    (lambda: "abc", "question 1"), (lambda: "cac", "O(T S^2)"), (lambda: "ccc", "ratio is S"),
    (lambda: "cbb", "FORWARD difference"), (lambda: "cba", "u^(2/3)"), (lambda: "cb", "3 letters"),
])
def test_backward_quiz_rejects_wrong_answers(wrong, words):
    result = checks.check_backward_quiz(wrong)
    assert not result.passed and words in result.message, result.message

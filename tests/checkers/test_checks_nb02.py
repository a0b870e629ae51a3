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
    _not_yet(result, "nan", "Subtract max(x) before exp")


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
    dz = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    return p, dp, dz, np.sqrt(q.shape[-1])


def correct_backward(q, k, v, d_out, mask=None):
    p, _, dz, root_d = _parts(q, k, v, d_out, mask)
    return dz @ k / root_d, np.swapaxes(dz, -1, -2) @ q / root_d, np.swapaxes(p, -1, -2) @ d_out


def test_attention_backward_passes_reference_and_handwritten():
    assert checks.check_attention_backward(nr.scaled_dot_product_attention_backward).passed
    result = checks.check_attention_backward(correct_backward)
    assert result.passed, result
    assert "fully masked row" in repr(result) and "torch autograd" in repr(result)


def test_attention_backward_in_torch_autograd_also_passes():
    import torch

    def by_autograd(q, k, v, d_out, mask=None):
        q, k, v = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~torch.from_numpy(mask), float("-inf"))
        p = torch.nan_to_num(torch.softmax(scores, dim=-1))  # a fully masked row: 0, not NaN
        (p @ v).backward(torch.tensor(d_out))
        return q.grad, k.grad, v.grad

    result = checks.check_attention_backward(by_autograd)
    assert result.passed, result


def _with(**changes):
    """The backward pass with one slip: the checker's own variants, each planted on its own."""
    from course_lib.checks.nb02 import _variant_backward

    return lambda q, k, v, d_out, mask=None: _variant_backward(q, k, v, d_out, mask, **changes)


@pytest.mark.parametrize("changes, message", [
    (dict(dv_untransposed=True), "dv uses P where it needs P^T"),
    (dict(dv_scaled=True), "dv should not be scaled by 1/sqrt(d)"),
    (dict(dv_from_scores=True), "dv uses the scores instead of the weights"),
    (dict(softmax_backward="no_rowsum"), "the '- rowsum(dP * P)' term of the softmax backward is missing"),
    (dict(softmax_backward="none"), "the softmax backward is skipped"),
    (dict(softmax_backward="query_axis"), "row sum runs over the queries"),
    (dict(softmax_backward="no_keepdims"), "row sum lost its axis (keepdims=True is missing)"),
    (dict(dq_root_d_power=0), "dq is missing the 1/sqrt(d) factor"),
    (dict(dk_root_d_power=0), "dk is missing the 1/sqrt(d) factor"),
    (dict(dq_root_d_power=0, dk_root_d_power=0), "dq is missing the 1/sqrt(d) factor"),
    (dict(dq_root_d_power=2), "dq is divided by d instead of sqrt(d)"),
    (dict(dk_root_d_power=2), "dk is divided by d instead of sqrt(d)"),
    (dict(dk_untransposed=True), "dk uses dZ where it needs dZ^T"),
    (dict(dq_transposed=True), "dq uses dZ^T where it needs dZ"),
    (dict(transpose=lambda x: x.T), "x.T reverses EVERY axis of a batched array"),
    (dict(fill=None), "causal mask, T = S = 4: dq: masked pairs receive gradient"),
    (dict(fill=-1e9), "a finite fill such as -1e9"),
    (dict(fill="after"), "the mask is applied after the softmax (P * mask)"),
    (dict(fill="dz_only"), "only dZ is masked, but the forward pass"),
])
def test_attention_backward_names_each_planted_mistake(changes, message):
    _not_yet(checks.check_attention_backward(_with(**changes)), message)


def test_attention_backward_dk_without_transpose_written_by_hand():
    def wrong(q, k, v, d_out, mask=None):
        p, _, dz, root_d = _parts(q, k, v, d_out, mask)
        dq, _, dv = correct_backward(q, k, v, d_out, mask)
        return dq, dz @ q / root_d, dv  # only has the right shape when T == S

    _not_yet(checks.check_attention_backward(wrong), "square T = S = 4", "dk uses dZ where it needs dZ^T")


def test_attention_backward_dot_T_that_crashes_on_a_batch_is_explained():
    def with_dot_t(q, k, v, d_out, mask=None):
        root_d = np.sqrt(q.shape[-1])
        scores = q @ k.T / root_d
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
        p = nr.softmax(scores)
        dp = d_out @ v.T
        dz = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
        return dz @ k / root_d, dz.T @ q / root_d, p.T @ d_out

    _not_yet(checks.check_attention_backward(with_dot_t), "x.T reverses EVERY axis")
    # a transpose by .T in dv only: it runs on the (3, 3, 3, 3) batch but answers something else
    _not_yet(checks.check_attention_backward(
        lambda q, k, v, d_out, mask=None: (*correct_backward(q, k, v, d_out, mask)[:2],
                                           _parts(q, k, v, d_out, mask)[0].T @ d_out)),
        "right on 2-D inputs but not on batched ones", "np.swapaxes(x, -1, -2)")


def test_attention_backward_crash_only_on_batches_names_the_axes():
    def axis_one(q, k, v, d_out, mask=None):
        if q.ndim > 2 and q.shape[0] == 2:
            raise ValueError("operands could not be broadcast together")
        return correct_backward(q, k, v, d_out, mask)

    _not_yet(checks.check_attention_backward(axis_one), "works on 2-D inputs but not on batched ones")


def test_attention_backward_nan_on_fully_masked_row():
    def naive_softmax_backward(q, k, v, d_out, mask=None):
        scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        dp = d_out @ np.swapaxes(v, -1, -2)
        dz = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
        root_d = np.sqrt(q.shape[-1])
        return dz @ k / root_d, np.swapaxes(dz, -1, -2) @ q / root_d, np.swapaxes(p, -1, -2) @ d_out

    with np.errstate(invalid="ignore"):
        result = checks.check_attention_backward(naive_softmax_backward)
    _not_yet(result, "fully masked", "NaN")


@pytest.mark.parametrize("name", ["q", "k", "v", "d_out", "mask"])
def test_attention_backward_rejects_an_answer_that_changes_its_inputs(name):
    def mutating(q, k, v, d_out, mask=None):
        grads = correct_backward(q, k, v, d_out, mask)  # right, and then it spoils the caller's arrays
        target = dict(q=q, k=k, v=v, d_out=d_out, mask=mask)[name]
        if target is not None:
            target[...] = ~target if target.dtype == bool else 0.0
        return grads

    _not_yet(checks.check_attention_backward(mutating), f"changed its input `{name}` in place")


def test_attention_backward_scaling_q_in_place_is_named_as_a_change_of_input():
    def in_place(q, k, v, d_out, mask=None):
        q /= np.sqrt(q.shape[-1])  # the classic in-place shortcut
        p = nr.softmax(np.where(True if mask is None else mask, q @ np.swapaxes(k, -1, -2), -np.inf))
        dp = d_out @ np.swapaxes(v, -1, -2)
        dz = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
        return dz @ k / np.sqrt(q.shape[-1]), np.swapaxes(dz, -1, -2) @ q, np.swapaxes(p, -1, -2) @ d_out

    _not_yet(checks.check_attention_backward(in_place), "changed its input `q` in place")


@pytest.mark.parametrize("order", [(1, 0, 2), (2, 1, 0), (0, 2, 1)])
def test_attention_backward_right_gradients_in_the_wrong_order(order):
    def reordered(q, k, v, d_out, mask=None):
        grads = correct_backward(q, k, v, d_out, mask)
        return tuple(grads[i] for i in order)

    _not_yet(checks.check_attention_backward(reordered), "your gradients are right but returned as",
             "in the order (dq, dk, dv)")


def test_attention_backward_ignoring_mask_is_caught_on_the_masked_case():
    def wrong(q, k, v, d_out, mask=None):
        return correct_backward(q, k, v, d_out, None)

    _not_yet(checks.check_attention_backward(wrong), "causal mask", "masked pairs receive gradient")


@pytest.mark.parametrize("bad_return", [lambda g: g[0], lambda g: g[:2], lambda g: list(g) + [None]])
def test_attention_backward_wrong_return_structure(bad_return):
    result = checks.check_attention_backward(lambda *a: bad_return(correct_backward(*a)))
    _not_yet(result, "return a tuple (dq, dk, dv)")


def test_attention_backward_without_mask_argument():
    def no_mask(q, k, v, d_out):
        return correct_backward(q, k, v, d_out)

    _not_yet(checks.check_attention_backward(no_mask), "TypeError", "the last one is the mask")


def test_attention_backward_in_float32_is_told_about_its_digits():
    def float32(q, k, v, d_out, mask=None):
        return tuple(g.astype(np.float32) for g in correct_backward(q, k, v, d_out, mask))

    _not_yet(checks.check_attention_backward(float32), "float32", "compute in float64")


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
def bias_ref(q, k, v, bias, d_out, *, scale_bias=False, skip_softmax=False, no_sum=False, mean=False):
    d = q.shape[-1]
    p = nr.softmax(q @ k.T / np.sqrt(d) + bias)
    dp = d_out @ v.T
    dz = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    d_bias = dp if skip_softmax else dz / np.sqrt(d) if scale_bias else dz
    if bias.shape[0] == 1 and not no_sum:
        d_bias = d_bias.mean(axis=0, keepdims=True) if mean else d_bias.sum(axis=0, keepdims=True)
    return d_bias


def test_bias_backward_accepts_reference():
    assert checks.check_bias_backward(bias_ref).passed


@pytest.mark.parametrize("options, words", [
    (dict(scale_bias=True), "d_bias carries no 1/sqrt(d)"),
    (dict(skip_softmax=True), "d_bias = dP skips the softmax backward"),
    (dict(no_sum=True), "dZ SUMMED over that axis"),
    (dict(mean=True), "d_bias is the MEAN of dZ over the queries"),
])
def test_bias_backward_rejects_planted_mistakes(options, words):
    result = checks.check_bias_backward(lambda *args: bias_ref(*args, **options))
    assert not result.passed and words in result.message, result.message


def test_bias_backward_rejects_a_mutating_answer_and_a_tuple():
    def mutating(q, k, v, bias, d_out):
        d_bias = bias_ref(q, k, v, bias, d_out)
        bias[...] = 0.0  # right answer, spoiled input
        return d_bias

    result = checks.check_bias_backward(mutating)
    assert not result.passed and "changed its input `bias` in place" in result.message, result.message
    result = checks.check_bias_backward(lambda *args: (None, None, None, bias_ref(*args)))
    assert not result.passed and "return d_bias alone" in result.message, result.message


# ----------------------------------------------------------------------------- predictions
def test_backward_quiz_accepts_the_right_letters():
    assert checks.check_backward_quiz(lambda: "bbab").passed
    assert checks.check_backward_quiz(lambda: ("b", "b", "a", "b")).passed


@pytest.mark.parametrize("wrong, words", [
    ("abab", "linear in the upstream gradient"), ("cbab", "a factor 2 stays a factor 2"),
    ("dbab", "doubles when dO does"),
    ("baab", "dV = P^T dO contains no V: it does not change"), ("bcab", "V enters dQ and dK through dP"),
    ("bdab", "P does not depend on V, but dP = dO V^T does"),
    ("bbbb", "(sum_s dZ_ts) k / sqrt(d) when every k_s = k, and every row of dZ sums to 0"),
    ("bbcb", "a constant row of scores is harmless"),
    ("bbdb", "the row sum in dZ"),
    ("bbaa", "has moved into q'"), ("bbac", "sqrt(d) times LARGER"), ("bbad", "the keys still meet the scaled"),
    ("bba", "4 letters"), ("bbae", "answer with one of a, b, c, d"),
])
def test_backward_quiz_names_what_each_wrong_answer_misses(wrong, words):
    result = checks.check_backward_quiz(lambda: wrong)
    assert not result.passed and words in result.message, result.message

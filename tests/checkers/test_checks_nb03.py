"""Notebook 03's checkers: they pass the reference and name the mistake in planted wrong solutions."""

import pytest
import torch

from course_lib import checks
from course_lib.attention import safe_softmax
from course_lib.attention import scaled_dot_product_attention as course_sdpa


def _not_yet(result, *fragments):
    assert not result.passed, result
    text = repr(result)
    assert text.startswith("[NOT YET] "), text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


# ----------------------------------------------------------------------------- torch attention
def attention(q, k, v, mask=None, *, dim=-1, scale=None, invert_mask=False, softmax=safe_softmax):
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(mask if invert_mask else ~mask, float("-inf"))
    if dim == -1:
        return softmax(scores) @ v
    return torch.softmax(scores, dim=dim) @ v


def test_torch_attention_passes_reference_and_handwritten():
    assert checks.check_torch_attention(lambda q, k, v, mask=None: course_sdpa(q, k, v, attn_mask=mask)).passed
    result = checks.check_torch_attention(attention)
    assert result.passed, result
    assert repr(result).startswith("[PASSED] torch_attention")


def test_torch_attention_softmax_over_wrong_dim():
    _not_yet(checks.check_torch_attention(lambda q, k, v, mask=None: attention(q, k, v, mask, dim=-2)),
             "softmax over dim -2", "LAST dim")


def test_torch_attention_softmax_over_heads_dim_in_batched_case():
    def softmax_dim_1(q, k, v, mask=None):
        if q.ndim == 4:  # right in the unbatched case, wrong once there are batch and head dims
            return attention(q, k, v, mask, dim=1)
        return attention(q, k, v, mask)

    _not_yet(checks.check_torch_attention(softmax_dim_1), "batched", "softmax over dim -3")


def test_torch_attention_missing_scale():
    _not_yet(checks.check_torch_attention(lambda q, k, v, mask=None: attention(q, k, v, mask, scale=1.0)),
             "1/sqrt(d) scaling is missing")


def test_torch_attention_inverted_mask_polarity():
    _not_yet(checks.check_torch_attention(lambda q, k, v, mask=None: attention(q, k, v, mask, invert_mask=True)),
             "polarity is inverted", "True means MAY attend")


def test_torch_attention_nan_on_fully_masked_row():
    def plain_softmax(q, k, v, mask=None):
        return attention(q, k, v, mask, softmax=lambda s: torch.softmax(s, dim=-1))

    _not_yet(checks.check_torch_attention(plain_softmax), "fully masked", "NaN")


def test_torch_attention_dtype_and_type_mistakes():
    _not_yet(checks.check_torch_attention(lambda q, k, v, mask=None: attention(q, k, v, mask).float()),
             "torch.float32", "keep the input dtype")
    _not_yet(checks.check_torch_attention(lambda q, k, v, mask=None: attention(q, k, v, mask).numpy()),
             "numpy array", "torch.Tensor")
    _not_yet(checks.check_torch_attention(lambda q, k, v, mask=None: (attention(q, k, v, mask), None)), "tuple")


# ----------------------------------------------------------------------------- autograd gradients
def autograd_grads(q, k, v, d_out, mask=None, *, dtype=torch.float64, sum_backward=False, fn=None):
    leaves = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in (q, k, v)]
    attn_mask = None if mask is None else torch.from_numpy(mask)
    out = (fn or (lambda q, k, v: course_sdpa(q, k, v, attn_mask=attn_mask)))(*leaves)
    if sum_backward:
        out.sum().backward()
    else:
        out.backward(torch.tensor(d_out, dtype=dtype))
    return tuple(leaf.grad for leaf in leaves)


def test_autograd_grads_passes_reference():
    result = checks.check_autograd_grads(autograd_grads)
    assert result.passed, result
    assert repr(result).startswith("[PASSED] autograd_grads")


def test_autograd_grads_passes_handwritten_torch_ops():
    def handwritten(q, k, v, d_out, mask=None):
        attn_mask = None if mask is None else torch.from_numpy(mask)
        return autograd_grads(q, k, v, d_out, mask, fn=lambda q, k, v: attention(q, k, v, attn_mask))

    assert checks.check_autograd_grads(handwritten).passed


def test_autograd_grads_backward_of_sum():
    _not_yet(checks.check_autograd_grads(lambda *a: autograd_grads(*a, sum_backward=True)),
             "gradient of out.sum()", "out.backward(d_out)")


def test_autograd_grads_in_float32():
    _not_yet(checks.check_autograd_grads(lambda *a: autograd_grads(*a, dtype=torch.float32)),
             "precision of float32", "float64")


def test_autograd_grads_missing_scale():
    def unscaled(q, k, v, d_out, mask=None):
        attn_mask = None if mask is None else torch.from_numpy(mask)
        return autograd_grads(q, k, v, d_out, mask, fn=lambda q, k, v: attention(q, k, v, attn_mask, scale=1.0))

    _not_yet(checks.check_autograd_grads(unscaled), "differs from the reference")


def test_autograd_grads_none_gradient():
    def forgot_requires_grad(q, k, v, d_out, mask=None):
        dq, dk, dv = autograd_grads(q, k, v, d_out, mask)
        return dq, None, dv

    _not_yet(checks.check_autograd_grads(forgot_requires_grad), "gradient is None", "requires_grad=True")


@pytest.mark.parametrize("bad", [lambda g: g[0], lambda g: g[:2]])
def test_autograd_grads_wrong_return_structure(bad):
    _not_yet(checks.check_autograd_grads(lambda *a: bad(autograd_grads(*a))), "return a tuple (dq, dk, dv)")


def test_torch_attention_inputs_are_float64_and_mutation_is_caught():
    seen = []

    def spy(q, k, v, mask=None):
        seen.append(q.dtype)
        q.mul_(0)  # mutating the inputs must not corrupt the reference the checker compares with
        return attention(q, k, v, mask)

    result = checks.check_torch_attention(spy)
    assert set(seen) == {torch.float64}
    _not_yet(result, "differs from the reference")


def test_compare_accepts_numpy_or_tensor_gradients():
    def as_numpy(q, k, v, d_out, mask=None):
        return tuple(g.numpy() for g in autograd_grads(q, k, v, d_out, mask))

    assert checks.check_autograd_grads(as_numpy).passed


# ----------------------------------------------------------------------------- padding mask for F.sdpa
def padding_ref(q, k, v, lengths, *, invert=False, as_float=False, flat=False):
    real = torch.arange(k.shape[-2])[None, :] < lengths[:, None]  # (B, S)
    mask = real if flat else real[:, None, None, :]
    if invert:
        mask = ~mask
    if as_float:
        mask = mask.double()
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_padding_sdpa_call_accepts_reference():
    assert checks.check_padding_sdpa_call(padding_ref).passed


def _padding_mutating(q, k, v, lengths):
    lengths.fill_(k.shape[-2])  # its copy only: the checker still expects the real lengths
    return padding_ref(q, k, v, lengths)


@pytest.mark.parametrize("options, words", [
    (dict(invert=True), "polarity is inverted"),
    (dict(as_float=True), "float 0/1 tensor"),
    (dict(flat=True), "(B, 1, 1, S)"),
])
def test_padding_sdpa_call_rejects_planted_mistakes(options, words):
    result = checks.check_padding_sdpa_call(lambda *args: padding_ref(*args, **options))
    assert not result.passed and words in result.message, result.message


def test_padding_sdpa_call_rejects_a_mutating_answer_and_a_numpy_result():
    assert not checks.check_padding_sdpa_call(_padding_mutating).passed
    result = checks.check_padding_sdpa_call(lambda *args: padding_ref(*args).numpy())
    assert not result.passed and "torch.Tensor" in result.message


# ----------------------------------------------------------------------------- d(bias) by autograd
def bias_grad_ref(q, k, v, bias, d_out, *, of_sum=False, float32=False, expand=False):
    if float32:
        q, k, v, bias, d_out = (t.float() for t in (q, k, v, bias, d_out))
    leaf = bias.expand(q.shape[0], q.shape[1], k.shape[1]).clone() if expand else bias.clone()
    leaf.requires_grad_(True)
    out = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + leaf, dim=-1) @ v
    (out.sum() if of_sum else (out * d_out).sum()).backward()
    return leaf.grad


def test_bias_grad_autograd_accepts_reference_and_sdpa():
    assert checks.check_bias_grad_autograd(bias_grad_ref).passed

    def with_sdpa(q, k, v, bias, d_out):
        bias = bias.clone().requires_grad_(True)
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias).backward(d_out)
        return bias.grad
    assert checks.check_bias_grad_autograd(with_sdpa).passed


def _bias_mutating(q, k, v, bias, d_out):
    d_out.zero_()
    return bias_grad_ref(q, k, v, bias, d_out)


@pytest.mark.parametrize("options, words", [
    (dict(of_sum=True), "out.sum()"),
    (dict(float32=True), "float32"),
    (dict(expand=True), "SUMMED"),
])
def test_bias_grad_autograd_rejects_planted_mistakes(options, words):
    result = checks.check_bias_grad_autograd(lambda *args: bias_grad_ref(*args, **options))
    assert not result.passed and words in result.message, result.message


def test_bias_grad_autograd_rejects_a_mutating_answer_and_a_missing_grad():
    assert not checks.check_bias_grad_autograd(_bias_mutating).passed
    result = checks.check_bias_grad_autograd(lambda q, k, v, bias, d_out: bias.grad)
    assert not result.passed and "requires_grad_(True)" in result.message


# ----------------------------------------------------------------------------- quiz
def test_torch_quiz_accepts_the_right_letters():
    assert checks.check_torch_quiz(lambda: "bab").passed


@pytest.mark.parametrize("wrong, words", [
    (lambda: "aab", "float64"), (lambda: "bbb", "top-left"), (lambda: "baa", "ADDED"), (lambda: "ba", "3 letters"),
])
def test_torch_quiz_rejects_wrong_answers(wrong, words):
    result = checks.check_torch_quiz(wrong)
    assert not result.passed and words in result.message, result.message

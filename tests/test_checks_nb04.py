"""The notebook-04 checkers accept the reference and reject planted wrong solutions with useful messages."""

from __future__ import annotations

import pytest
import torch

from course_lib import MultiHeadAttention, checks
from course_lib.checks import nb04


# ----------------------------------------------------------------------------- split / merge heads
def split_ref(x, num_heads):
    B, T, D = x.shape
    return x.view(B, T, num_heads, D // num_heads).transpose(1, 2)


def merge_ref(x):
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)


def test_split_heads_accepts_reference():
    result = checks.check_split_heads(split_ref)
    assert result.passed, result.message
    assert "[PASSED]" in repr(result)


@pytest.mark.parametrize("wrong, words", [
    (lambda x, H: x.reshape(x.shape[0], H, x.shape[1], -1), "View it as (B, T, H, d_head) first"),
    (lambda x, H: x.view(*x.shape[:2], -1, H).permute(0, 3, 1, 2), "interleaved"),
    (lambda x, H: x.view(*x.shape[:2], H, -1), "has shape"),
    (lambda x, H: None, "None"),
])
def test_split_heads_rejects_planted_mistakes(wrong, words):
    result = checks.check_split_heads(wrong)
    assert not result.passed and words in result.message, result.message


def test_merge_heads_accepts_reference():
    assert checks.check_merge_heads(merge_ref).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda x: x.reshape(x.shape[0], x.shape[2], -1), ".transpose(1, 2) first"),
    (lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2], -1), "interleaved"),
    (lambda x: x.transpose(1, 2), "has shape"),
])
def test_merge_heads_rejects_planted_mistakes(wrong, words):
    result = checks.check_merge_heads(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- forward
def mha_ref(x, w_q, w_k, w_v, w_o, num_heads, mask=None):
    d_head = x.shape[-1] // num_heads
    q, k, v = (split_ref(x @ w.T, num_heads) for w in (w_q, w_k, w_v))
    scores = q @ k.transpose(-2, -1) / d_head**0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return merge_ref(torch.softmax(scores, dim=-1) @ v) @ w_o.T


def mha_via_course_lib(x, w_q, w_k, w_v, w_o, num_heads, mask=None):
    m = MultiHeadAttention(x.shape[-1], num_heads, bias=False, dtype=x.dtype)
    with torch.no_grad():
        for lin, w in zip((m.q_proj, m.k_proj, m.v_proj, m.out_proj), (w_q, w_k, w_v, w_o), strict=True):
            lin.weight.copy_(w)
    return m(x, attn_mask=mask)


@pytest.mark.parametrize("solution", [mha_ref, mha_via_course_lib])
def test_mha_forward_accepts_reference(solution):
    result = checks.check_mha_forward(solution)
    assert result.passed, result.message


def _variant(**changes):
    def fn(x, w_q, w_k, w_v, w_o, num_heads, mask=None):
        return nb04._mha_variant(x, w_q, w_k, w_v, w_o, num_heads, mask=None if changes.get("ignore_mask") else mask,
                                 **{k: v for k, v in changes.items() if k != "ignore_mask"})
    return fn


@pytest.mark.parametrize("wrong, words", [
    (_variant(scale="none"), "divide q k^T by sqrt(d_head)"),
    (_variant(scale="d_model"), "you scaled by sqrt(d_model)"),
    (_variant(softmax_dim=-2), "softmax runs over the queries"),
    (_variant(out_proj=False), "W_O is missing"),
    (_variant(heads=False), "ONE head"),
    (_variant(ignore_mask=True), "the mask is ignored"),
    (lambda *args, **kw: mha_ref(*args, **kw).float() + 1e-3, "differs from the reference"),
    (lambda *args, **kw: mha_ref(*args, **kw).numpy(), "should be a torch.Tensor"),
])
def test_mha_forward_rejects_planted_mistakes(wrong, words):
    result = checks.check_mha_forward(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- parameter count
def count_ref(d_model, num_heads, bias=True, kdim=None, vdim=None):
    m = MultiHeadAttention(d_model, num_heads, bias=bias, kdim=kdim, vdim=vdim, device="meta")
    return sum(p.numel() for p in m.parameters())


def test_param_count_accepts_reference_and_torch():
    assert checks.check_mha_param_count(count_ref).passed
    torch_count = lambda d, h, bias=True, kdim=None, vdim=None: sum(p.numel() for p in torch.nn.MultiheadAttention(
        d, h, bias=bias, kdim=kdim, vdim=vdim, device="meta").parameters())
    assert checks.check_mha_param_count(torch_count).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda d, h, bias=True, kdim=None, vdim=None: h * count_ref(d, h, bias, kdim, vdim), "does not depend on H"),
    (lambda d, h, bias=True, kdim=None, vdim=None: count_ref(d, h, False, kdim, vdim), "biases are missing"),
    (lambda d, h, bias=True, kdim=None, vdim=None: 3 * d * d + (3 * d if bias else 0) + 0 * h, "W_O"),
    (lambda d, h, bias=True, kdim=None, vdim=None: count_ref(d, h, bias), "use kdim and vdim"),
    (lambda d, h, bias=True, kdim=None, vdim=None: "many", "return a number"),
])
def test_param_count_rejects_planted_mistakes(wrong, words):
    result = checks.check_mha_param_count(wrong)
    assert not result.passed and words in result.message, result.message

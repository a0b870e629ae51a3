"""course_lib.attention (torch): fully masked rows in every dtype, fast vs math path, bad input."""

import pytest
import torch
from helpers import assert_clear_error

from course_lib.attention import safe_softmax, scaled_dot_product_attention
from course_lib.masks import causal_mask


def _inputs(dtype=torch.float32, B=2, H=3, T=5, S=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda L: torch.randn(B, H, L, d, generator=g).to(dtype)
    return mk(T), mk(S), mk(S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_row_gives_zeros_never_nan(dtype, need_weights):
    q, k, v = _inputs(dtype)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[2] = False  # query 2 may attend to nothing
    for q_, k_, v_ in ((q, k, v), (q.requires_grad_(), k.requires_grad_(), v.requires_grad_())):
        result = scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, need_weights=need_weights)
        out = result[0] if need_weights else result
        assert torch.isfinite(out).all()
        assert (out[:, :, 2] == 0).all()
        if need_weights:
            assert result[1].dtype == torch.promote_types(dtype, torch.float32)  # weights in float32 at least
            assert (result[1][:, :, 2] == 0).all()
            torch.testing.assert_close(result[1][:, :, 0].sum(-1), torch.ones(2, 3, dtype=result[1].dtype))
    out.float().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_fully_masked_row_with_additive_minus_inf_mask(dtype):
    q, k, v = _inputs(dtype)
    mask = torch.zeros(5, 6, dtype=dtype)
    mask[1] = float("-inf")
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all() and (out[:, :, 1] == 0).all()


def test_fast_and_math_paths_agree_with_masks_and_causal():
    q, k, v = _inputs(torch.float64, T=6, S=6)
    pad = torch.rand(2, 1, 1, 6, generator=torch.Generator().manual_seed(1)) < 0.7
    for kwargs in ({}, {"attn_mask": pad}, {"is_causal": True}, {"attn_mask": pad, "is_causal": True}):
        fast = scaled_dot_product_attention(q, k, v, **kwargs)
        math, weights = scaled_dot_product_attention(q, k, v, need_weights=True, **kwargs)
        torch.testing.assert_close(fast, math, atol=1e-12, rtol=0)
        assert weights.shape == (2, 3, 6, 6)
    _, w = scaled_dot_product_attention(q, k, v, is_causal=True, need_weights=True)
    assert (w.masked_select(~causal_mask(6)) == 0).all()


def test_float16_scores_that_overflow_stay_finite_on_the_math_path():
    q, k, v = _inputs(torch.float16, d=64)
    q, k = q * 100, k * 100  # q.k ~ 100*100*sqrt(64)*N(0,1) = 8e4*N(0,1): beyond float16's max of 65504
    assert torch.isinf(q @ k.transpose(-1, -2)).any()  # the naive product does overflow
    out, w = scaled_dot_product_attention(q, k, v, need_weights=True)
    ref = scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_safe_softmax_gradient_of_empty_row_is_zero():
    x = torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]], requires_grad=True)
    safe_softmax(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_dropout_is_applied_only_when_asked():
    q, k, v = _inputs()
    torch.manual_seed(0)
    a = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    b = scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, dropout_p=0.0), b)


Q, K, V = _inputs()
BAD = [
    ("numpy q", lambda: scaled_dot_product_attention(Q.numpy(), K, V), TypeError, ["q", "torch.Tensor", "ndarray"]),
    ("integer q", lambda: scaled_dot_product_attention(Q.long(), K, V), TypeError, ["q", "floating", "int64"]),
    ("mixed dtypes", lambda: scaled_dot_product_attention(Q, K.double(), V), TypeError, ["float32", "float64"]),
    ("rank-1 v", lambda: scaled_dot_product_attention(Q, K, torch.ones(8)), ValueError, ["v", "at least 2"]),
    ("feature mismatch", lambda: scaled_dot_product_attention(Q, K[..., :4], V[..., :4]), ValueError, ["d=8", "d=4"]),
    ("k/v length mismatch", lambda: scaled_dot_product_attention(Q, K, V[:, :, :5]), ValueError, ["S=6", "S=5"]),
    (
        "mask shape",
        lambda: scaled_dot_product_attention(Q, K, V, attn_mask=torch.ones(6, 5, dtype=torch.bool)),
        ValueError,
        ["attn_mask", "(6, 5)", "(2, 3, 5, 6)"],
    ),
    (
        "int mask",
        lambda: scaled_dot_product_attention(Q, K, V, attn_mask=torch.ones(5, 6, dtype=torch.int64)),
        TypeError,
        ["attn_mask", "int64"],
    ),
    (
        "NaN mask",
        lambda: scaled_dot_product_attention(Q, K, V, attn_mask=torch.full((5, 6), float("nan"))),
        ValueError,
        ["attn_mask", "NaN"],
    ),
    ("list mask", lambda: scaled_dot_product_attention(Q, K, V, attn_mask=[[True] * 6] * 5), TypeError, ["attn_mask"]),
    (
        "ambiguous causal",
        lambda: scaled_dot_product_attention(Q, K, V, is_causal=True),
        ValueError,
        ["is_causal", "T=5", "S=6", "causal_mask(5, 6)"],
    ),
    (
        "dropout_p out of range",
        lambda: scaled_dot_product_attention(Q, K, V, dropout_p=1.5),
        ValueError,
        ["dropout_p", "1.5"],
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_a_clear_error(case):
    _, call, exc, words = case
    assert_clear_error(call, exc, words)

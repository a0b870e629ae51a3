"""numpy reference vs torch (course_lib.attention, both paths): forward, weights and gradients agree.

float64: the same function computed two ways agrees to rounding (~1e-15), so any difference above
1e-10 is a bug. float32: see FLOAT32_TOL. Gradients: the hand-derived numpy backward equals torch
autograd (float64) and central finite differences of the numpy forward.
"""

import numpy as np
import pytest
import torch
from helpers import central_difference
from hypothesis import given, settings
from hypothesis import strategies as st

from course_lib import numpy_ref as nr
from course_lib.attention import scaled_dot_product_attention as course_sdpa

FLOAT64_TOL = 1e-10

# float32 tolerance, relative to the scale of the values (|out| <= max|v|: out is a convex combination of
# the rows of v). float32 rounds each operation with relative error <= u = 2**-24 ~ 6e-8 (eps = 2**-23 ~
# 1.2e-7). Attention chains three reductions (q.k over d, the softmax sum over S, P @ v over S); the
# worst-case bound grows like (d + S) u, which is < 1e-6 for these shapes (d <= 8, S <= 9). The error also
# grows with the size of the logits (a score error of u|s| becomes a relative weight error of u|s|): with
# unit-normal inputs |s| stays below ~10. Notebook 03 measured <= ~20 u (1.2e-6) for d up to 1024 and S up
# to 4096 with unit-scale inputs, so 1e-5 (~170 u) leaves a margin of almost 10x while still catching any
# real bug (wrong scale, mask or axis give errors of order 1e-1).
FLOAT32_TOL = 1e-5

# Central differences in float64: truncation ~ h^2 |f'''| / 6 and round-off ~ u |f| / h balance near
# h ~ u^(1/3) ~ 5e-6 with an error ~ 1e-10 relative to the scale of f (notebook 02 plots the V curve).
FD_STEP = 1e-5
FD_TOL = 1e-7


@st.composite
def attention_case(draw):
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    T, S = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    d, d_v = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.normal(size=(*batch, T, d))  # (*batch, T, d)
    k = rng.normal(size=(*batch, S, d))  # (*batch, S, d)
    v = rng.normal(size=(*batch, S, d_v))  # (*batch, S, d_v)
    kind = draw(st.sampled_from(["none", "full", "TS", "keys"]))
    mask = None
    if kind != "none":
        shape = {"full": (*batch, T, S), "TS": (T, S), "keys": (*batch, 1, S)}[kind]
        mask = rng.random(shape) < draw(st.floats(0.0, 1.0))  # True = may attend; density 0 = all masked
        if kind != "keys" and draw(st.booleans()):
            mask[..., draw(st.integers(0, T - 1)), :] = False  # a fully masked query row
    return q, k, v, mask


def _torch(*arrays, dtype=torch.float64, requires_grad=False):
    return [torch.tensor(a, dtype=dtype, requires_grad=requires_grad) for a in arrays]


def _mask(mask):
    return None if mask is None else torch.from_numpy(mask)


def _assert_close(got, expected, tol, what):
    got = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else got
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite entries"
    err = np.abs(got - expected).max(initial=0.0)
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:g}"


# ----------------------------------------------------------------------------- forward, float64
@settings(max_examples=50, deadline=None)
@given(attention_case())
def test_forward_float64_numpy_equals_both_torch_paths(case):
    q, k, v, mask = case
    out_ref, weights_ref = nr.scaled_dot_product_attention(q, k, v, mask)
    tq, tk, tv = _torch(q, k, v)
    fast = course_sdpa(tq, tk, tv, attn_mask=_mask(mask))
    math_out, weights = course_sdpa(tq, tk, tv, attn_mask=_mask(mask), need_weights=True)
    _assert_close(fast, out_ref, FLOAT64_TOL, "fast path output")
    _assert_close(math_out, out_ref, FLOAT64_TOL, "need_weights path output")
    _assert_close(weights, weights_ref, FLOAT64_TOL, "need_weights path weights")
    if mask is not None:
        empty = ~np.broadcast_to(mask, weights_ref.shape).any(axis=-1)  # (..., T) fully masked rows
        assert (fast.numpy()[empty] == 0).all() and (weights.numpy()[empty] == 0).all()


# ----------------------------------------------------------------------------- forward, float32
@settings(max_examples=50, deadline=None)
@given(attention_case())
def test_forward_float32_within_tolerance_of_float64(case):
    q, k, v, mask = (a.astype(np.float32) if a is not None and a.dtype != bool else a for a in case)
    # reference: float64 arithmetic on the same float32-rounded inputs, so only arithmetic error is measured
    out_ref, weights_ref = nr.scaled_dot_product_attention(q.astype(np.float64), k.astype(np.float64),
                                                           v.astype(np.float64), mask)
    scale = max(1.0, float(np.abs(v).max(initial=0.0)))
    tq, tk, tv = _torch(q, k, v, dtype=torch.float32)
    fast = course_sdpa(tq, tk, tv, attn_mask=_mask(mask))
    math_out, weights = course_sdpa(tq, tk, tv, attn_mask=_mask(mask), need_weights=True)
    assert fast.dtype == math_out.dtype == torch.float32
    _assert_close(fast.double(), out_ref, FLOAT32_TOL * scale, "float32 fast path")
    _assert_close(math_out.double(), out_ref, FLOAT32_TOL * scale, "float32 need_weights path")
    _assert_close(weights.double(), weights_ref, FLOAT32_TOL, "float32 weights")


# ----------------------------------------------------------------------------- backward
@settings(max_examples=50, deadline=None)
@given(attention_case(), st.sampled_from([False, True]))
def test_numpy_backward_equals_torch_autograd_float64(case, need_weights):
    q, k, v, mask = case
    out_ref, _ = nr.scaled_dot_product_attention(q, k, v, mask)
    d_out = np.random.default_rng(q.size + k.size).normal(size=out_ref.shape)
    expected = nr.scaled_dot_product_attention_backward(q, k, v, d_out, mask)
    leaves = _torch(q, k, v, requires_grad=True)
    out = course_sdpa(*leaves, attn_mask=_mask(mask), need_weights=need_weights)
    out = out[0] if need_weights else out
    out.backward(torch.from_numpy(d_out))
    for name, leaf, e in zip(("dq", "dk", "dv"), leaves, expected, strict=True):
        _assert_close(leaf.grad, e, FLOAT64_TOL, f"{name} ({'need_weights' if need_weights else 'fast'} path)")


@settings(max_examples=50, deadline=None)
@given(attention_case())
def test_numpy_backward_equals_directional_finite_difference(case):
    q, k, v, mask = case
    out_ref, _ = nr.scaled_dot_product_attention(q, k, v, mask)
    rng = np.random.default_rng(q.size * 7 + v.size)
    d_out = rng.normal(size=out_ref.shape)
    grads = nr.scaled_dot_product_attention_backward(q, k, v, d_out, mask)
    direction = [rng.normal(size=a.shape) for a in (q, k, v)]
    exact = sum(float(np.sum(g * u)) for g, u in zip(grads, direction, strict=True))

    def loss(h):
        moved = [a + h * u for a, u in zip((q, k, v), direction, strict=True)]
        return float(np.sum(nr.scaled_dot_product_attention(*moved, mask)[0] * d_out))

    numerical = (loss(FD_STEP) - loss(-FD_STEP)) / (2 * FD_STEP)
    assert abs(numerical - exact) <= FD_TOL * (1.0 + abs(exact) + abs(loss(0.0))), (numerical, exact)


@pytest.mark.parametrize("with_mask", [False, True])
def test_numpy_backward_equals_entrywise_central_differences(with_mask):
    rng = np.random.default_rng(11)
    q, k, v = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 5, 2))
    mask = None
    if with_mask:
        mask = rng.random((2, 4, 5)) < 0.6
        mask[0, 1] = False  # a fully masked query row
    d_out = rng.normal(size=(2, 4, 2))
    grads = nr.scaled_dot_product_attention_backward(q, k, v, d_out, mask)

    def loss():
        return float(np.sum(nr.scaled_dot_product_attention(q, k, v, mask)[0] * d_out))

    for x, g in zip((q, k, v), grads, strict=True):
        numerical = central_difference(loss, x, h=FD_STEP)
        rel = np.linalg.norm(numerical - g) / (np.linalg.norm(numerical) + np.linalg.norm(g))
        assert rel < 1e-8, rel
    if with_mask:
        assert (grads[0][0, 1] == 0).all()  # the fully masked query gets no gradient


def test_a_wrong_backward_fails_these_checks():
    """The comparisons above can fail: a backward without the 1/sqrt(d) factor is far outside the tolerances."""
    rng = np.random.default_rng(3)
    q, k, v, d_out = rng.normal(size=(4, 3)), rng.normal(size=(5, 3)), rng.normal(size=(5, 2)), rng.normal(size=(4, 2))
    dq, _, _ = nr.scaled_dot_product_attention_backward(q, k, v, d_out)
    with pytest.raises(AssertionError, match="max abs error"):
        _assert_close(dq * np.sqrt(3), dq, FLOAT64_TOL, "dq")

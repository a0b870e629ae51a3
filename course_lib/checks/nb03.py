"""Checkers for notebook 03 (numpy meets torch).

The learner's torch code is compared in float64 with the numpy reference, so any difference
larger than ~1e-12 is a bug, not rounding. On a wrong answer the checkers try the classic
mistakes (softmax over the wrong dim, mask polarity, a missing 1/sqrt(d), float32, backward
of out.sum() instead of out * d_out) to say which one was made.
"""

from __future__ import annotations

import numpy as np
import torch

from course_lib import numpy_ref
from course_lib.checks._core import CheckFailure, call, checker, compare, is_close, to_numpy, unpack

__all__ = ["check_torch_attention", "check_autograd_grads"]


def _attention_variant(q, k, v, mask, *, softmax_axis=-1, scale=None, invert_mask=False):
    """numpy attention with one thing changed, to recognise a learner's mistake."""
    d = q.shape[-1]
    scores = q @ np.swapaxes(k, -1, -2) * (d**-0.5 if scale is None else scale)
    if mask is not None:
        scores = np.where(~mask if invert_mask else mask, scores, -np.inf)
    return numpy_ref.softmax(scores, axis=softmax_axis) @ v


# ----------------------------------------------------------------------------- forward in torch
@checker
def check_torch_attention(fn):
    """Check scaled dot-product attention written in torch.

    Your function: `fn(q, k, v, mask=None) -> out`, with float64 torch tensors q (..., T, d),
    k (..., S, d), v (..., S, d_v) and a bool mask tensor (True = may attend); out is a float64 tensor
    (..., T, d_v), 0 for a query with nothing to attend to. Checks four cases against numpy_ref to
    1e-10; names a numpy or tuple result, a float32 result, a softmax over the wrong dim, a missing or
    wrong scale, an inverted mask and NaN from a fully masked row.
    """
    rng = np.random.default_rng(5)
    causal = np.tril(np.ones((4, 4), dtype=bool))
    cases = [  # (description, q shape, k shape, v shape, mask)
        ("T = S = 4, d = 3", (4, 3), (4, 3), (4, 3), None),
        ("batched (2, 3, T=3, d=4), S = 5, d_v = 2", (2, 3, 3, 4), (2, 3, 5, 4), (2, 3, 5, 2), None),
        ("causal bool mask, T = S = 4", (2, 4, 6), (2, 4, 6), (2, 4, 3), causal),
        ("bool mask with a fully masked query row", (3, 2), (4, 2), (4, 3),
         np.array([[True, False, True, False], [False, False, False, False], [True, True, True, True]])),
    ]
    for description, q_shape, k_shape, v_shape, mask in cases:
        q, k, v = rng.normal(size=q_shape), rng.normal(size=k_shape), rng.normal(size=v_shape)
        args = [torch.from_numpy(a.copy()) for a in (q, k, v)]
        if mask is not None:
            args.append(torch.from_numpy(mask.copy()))
        got = call(fn, *args, what="; the last one is the mask" if mask is not None else "")
        expected, _ = numpy_ref.scaled_dot_product_attention(q, k, v, mask)
        if isinstance(got, np.ndarray):
            raise CheckFailure(f"{description}: you returned a numpy array; return a torch.Tensor (stay in torch "
                               "so autograd can follow the computation)")
        if isinstance(got, torch.Tensor) and got.dtype != torch.float64:
            raise CheckFailure(f"{description}: the inputs are float64 but your output is {got.dtype}; keep the "
                               "input dtype (do not call .float() or create float32 tensors along the way)")
        if isinstance(got, tuple):
            raise CheckFailure(f"{description}: return only the output tensor (not a tuple)")
        if not is_close(got, expected):
            variants = {
                f"softmax over dim {axis} of the scores; it must run over the LAST dim (the keys), "
                "so each query's weights sum to 1": {"softmax_axis": axis}
                for axis in range(-len(q_shape), -1)
            }
            variants.update({
                "the 1/sqrt(d) scaling is missing (scores = q @ k.transpose(-2, -1) / sqrt(d))": {"scale": 1.0},
                "the scores are divided by d instead of sqrt(d)": {"scale": 1.0 / q_shape[-1]},
                "the mask polarity is inverted: True means MAY attend (torch SDPA's convention), so fill the "
                "scores with -inf where the mask is False: scores.masked_fill(~mask, float('-inf'))":
                    {"invert_mask": True},
            })
            for message, change in variants.items():
                if change.get("invert_mask") and mask is None:
                    continue
                with np.errstate(invalid="ignore"):
                    wrong = _attention_variant(q, k, v, mask, **change)
                if is_close(got, wrong) or is_close(np.nan_to_num(to_numpy(got)), np.nan_to_num(wrong)):
                    raise CheckFailure(f"{description}: {message}.")
            if mask is not None and isinstance(got, torch.Tensor) and got.shape == expected.shape:
                if torch.isnan(got).any():
                    raise CheckFailure(
                        f"{description}: your output contains NaN. A query row with nothing to attend to has all "
                        "scores -inf and softmax gives 0/0; the course's convention is output 0 for such rows "
                        "(e.g. use course_lib.attention.safe_softmax, or zero those rows with torch.where).")
        compare(f"out ({description})", got, expected,
                hint="scores = q @ k.transpose(-2, -1) / math.sqrt(d); masked_fill(~mask, -inf); "
                     "softmax(dim=-1); @ v")
    return "4 float64 cases (batch dims, T != S, causal mask, a fully masked row) match numpy_ref to 1e-10"


# ----------------------------------------------------------------------------- gradients with autograd
@checker
def check_autograd_grads(fn):
    """Check attention gradients computed with torch autograd.

    Your function: `fn(q, k, v, d_out, mask=None) -> (dq, dk, dv)`, given numpy float64 arrays (and a
    bool mask), returning the gradients of sum(out * d_out) as tensors or arrays. Checks three cases
    against the hand-derived numpy backward to 1e-10; names gradients that are None (no
    requires_grad), the gradient of out.sum() instead, and a computation in float32.
    """
    rng = np.random.default_rng(6)
    cases = [
        ("T = 3, S = 5, d = 4, d_v = 2", (3, 4), (5, 4), (5, 2), None),
        ("batched (2, T=4, d=3), S = 4", (2, 4, 3), (2, 4, 3), (2, 4, 3), None),
        ("causal bool mask, T = S = 4", (4, 2), (4, 2), (4, 3), np.tril(np.ones((4, 4), dtype=bool))),
    ]
    for description, q_shape, k_shape, v_shape, mask in cases:
        q, k, v = rng.normal(size=q_shape), rng.normal(size=k_shape), rng.normal(size=v_shape)
        out, _ = numpy_ref.scaled_dot_product_attention(q, k, v, mask)
        d_out = rng.normal(size=out.shape)
        args = [q.copy(), k.copy(), v.copy(), d_out.copy()] + ([] if mask is None else [mask.copy()])
        got = call(fn, *args, what="; the last one is the mask" if mask is not None else "")
        got = unpack(got, 3, "return a tuple (dq, dk, dv) of three arrays or tensors")
        if any(g is None for g in got):
            raise CheckFailure(f"{description}: a gradient is None: create q, k, v with requires_grad=True, call "
                               "backward, then read q.grad, k.grad, v.grad")
        expected = numpy_ref.scaled_dot_product_attention_backward(q, k, v, d_out, mask)
        of_sum = numpy_ref.scaled_dot_product_attention_backward(q, k, v, np.ones_like(d_out), mask)
        for name, g, e, e_sum in zip(("dq", "dk", "dv"), got, expected, of_sum, strict=True):
            if is_close(g, e):
                continue
            if is_close(g, e_sum):
                raise CheckFailure(f"{description}: {name} is the gradient of out.sum(), not of sum(out * d_out): "
                                   "call out.backward(d_out) (or torch.autograd.grad(out, (q, k, v), d_out))")
            if is_close(g, e, atol=1e-5, rtol=1e-4):
                raise CheckFailure(f"{description}: {name} agrees only to ~1e-6, the precision of float32: create the "
                                   "tensors in float64 (torch.from_numpy keeps float64; torch.tensor(x, "
                                   "dtype=torch.float32) or .float() throws the precision away)")
            compare(f"{name} ({description})", g, e,
                    hint="q = torch.tensor(q_np, requires_grad=True) (same for k, v); out = attention(q, k, v, mask); "
                         "out.backward(torch.from_numpy(d_out)); return q.grad, k.grad, v.grad")
    return "3 float64 cases (T != S, batch dims, causal mask) match the hand-derived numpy backward to 1e-10"

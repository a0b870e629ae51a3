"""Checkers for notebook 02 (backprop through attention in numpy).

Each checker compares the learner's function with the hand-derived reference on a few small
float64 cases and, when the answer is wrong, tries the classic mistakes (a missing diagonal
term, a missing 1/sqrt(d), a transposed dS, ...) to say *which* one was made.
"""

from __future__ import annotations

import numpy as np

from course_lib import numpy_ref
from course_lib.checks._core import CheckFailure, call, checker, compare, diagnose, is_close, unpack

__all__ = ["check_softmax_jacobian", "check_softmax_backward", "check_attention_backward"]


# ----------------------------------------------------------------------------- softmax Jacobian
def _reference_jacobian(x: np.ndarray) -> np.ndarray:
    p = numpy_ref.softmax(x)
    return np.diag(p) - np.outer(p, p)  # (n, n), J[i, j] = d p_i / d x_j


@checker
def check_softmax_jacobian(fn):
    """Check the Jacobian of softmax.

    Your function: `fn(x) -> J`, with x a 1-D array of n logits and J (n, n),
    J[i, j] = d softmax(x)_i / d x_j = diag(p) - p p^T.
    Checks four logit vectors (lengths 3 to 7, logits up to +-1e3); names a missing diagonal or
    off-diagonal term, a flipped sign, a wrong diagonal, and rows that do not sum to 0.
    """
    rng = np.random.default_rng(2)
    cases = [np.array([1.0, 2.0, 3.0]), rng.normal(size=5), rng.normal(size=7) * 3, np.array([1e3, 0.0, -1e3, 5.0])]
    for x in cases:
        got = call(fn, x.copy())
        p = numpy_ref.softmax(x)
        expected = _reference_jacobian(x)
        if got is not None and np.shape(got) == expected.shape and not is_close(got, expected):
            mistake = diagnose(got, {
                "you have -p p^T only: the diagonal term diag(p) is missing (d p_i / d x_i = p_i - p_i^2)":
                    -np.outer(p, p),
                "the sign is flipped: J = diag(p) - p p^T, not p p^T - diag(p)": np.outer(p, p) - np.diag(p),
                "you have diag(p) only: the off-diagonal term -p_i p_j is missing": np.diag(p),
                "the diagonal should be p_i (1 - p_i) = p_i - p_i^2; it looks like you used p_i (1 - p_i) twice "
                "or forgot to subtract p p^T on the diagonal": np.diag(p * (1 - p)) - np.outer(p, p),
            })
            if mistake:
                raise CheckFailure(f"for x = {np.round(x, 3).tolist()}: {mistake}.")
            row_sums = np.asarray(got, dtype=np.float64).sum(axis=1)
            if np.isfinite(row_sums).all() and not np.allclose(row_sums, 0.0, atol=1e-9):
                raise CheckFailure(
                    f"for x = {np.round(x, 3).tolist()} the rows of your J sum to {np.round(row_sums, 4).tolist()}, "
                    "but every row must sum to 0: adding the same constant to every logit leaves softmax unchanged. "
                    "Hint: J = diag(p) - p p^T with p = softmax(x).")
        compare(f"J for x of length {len(x)}", got, expected,
                hint="J[i, j] = p_i (delta_ij - p_j), i.e. np.diag(p) - np.outer(p, p) with p = softmax(x) "
                     "(subtract max(x) before exp)")
    return "4 logit vectors (lengths 3 to 7, incl. logits of +-1e3) give diag(p) - p p^T"


# ----------------------------------------------------------------------------- softmax backward (VJP)
@checker
def check_softmax_backward(fn):
    """Check the backward pass of softmax, without building the Jacobian.

    Your function: `fn(p, d_p) -> d_x`, with p = softmax(x) along the last axis and d_p the gradient
    of the loss with respect to p, both of any shape (..., n); d_x = p * (d_p - rowsum(d_p * p)).
    Checks four shapes, one batched; names a row sum over the wrong axis or of d_p alone, a missing
    final factor p, and a flipped sign.
    """
    rng = np.random.default_rng(3)
    shapes = [(1, 4), (3, 5), (2, 3, 6), (4, 1)]
    for shape in shapes:
        p = numpy_ref.softmax(rng.normal(size=shape) * 2)
        d_p = rng.normal(size=shape)
        got = call(fn, p.copy(), d_p.copy())
        expected = p * (d_p - np.sum(d_p * p, axis=-1, keepdims=True))
        mistake = diagnose(got, {
            "the row sum is taken over the wrong axis: sum d_p * p over the LAST axis (the one softmax normalises), "
            "with keepdims=True": p * (d_p - np.sum(d_p * p, axis=0, keepdims=True)),
            "the final multiplication by p is missing: d_x = p * (d_p - rowsum(d_p * p))":
                d_p - np.sum(d_p * p, axis=-1, keepdims=True),
            "the row sum must be of d_p * p (elementwise product), not of d_p alone":
                p * (d_p - np.sum(d_p, axis=-1, keepdims=True)),
            "the sign is flipped: d_x = p * (d_p - rowsum(d_p * p))": -expected,
        }) if not is_close(got, expected) else None
        if mistake:
            raise CheckFailure(f"for inputs of shape {shape}: {mistake}.")
        compare(f"d_x for p of shape {shape}", got, expected,
                hint="d_x = p * (d_p - (d_p * p).sum(axis=-1, keepdims=True)); never build the Jacobian")
    return "4 shapes incl. batched (2, 3, 6) match p * (d_p - rowsum(d_p * p))"


# ----------------------------------------------------------------------------- attention backward
def _wrong_backwards(q, k, v, d_out, mask):
    """The gradients produced by classic mistakes, computed on the same inputs."""
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    p = numpy_ref.softmax(scores)
    dp = d_out @ np.swapaxes(v, -1, -2)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    scale = 1 / np.sqrt(q.shape[-1])
    candidates = {
        "dq": {
            "dq is missing the 1/sqrt(d) factor: S = q k^T / sqrt(d), so dq = dS k / sqrt(d)": lambda: ds @ k,
            "dq is divided by d instead of sqrt(d)": lambda: ds @ k / q.shape[-1],
            "dq skips the softmax backward: use dS = P * (dP - rowsum(dP * P)), not dP": lambda: dp @ k * scale,
            "dq uses P * dP for dS: the '- rowsum(dP * P)' term of the softmax backward is missing":
                lambda: (p * dp) @ k * scale,
        },
        "dk": {
            "dk is missing the 1/sqrt(d) factor: dk = dS^T q / sqrt(d)": lambda: np.swapaxes(ds, -1, -2) @ q,
            "dk uses dS where it needs dS^T (dk = dS^T q / sqrt(d), shape (S, d))": lambda: ds @ q * scale,
            "dk skips the softmax backward: use dS = P * (dP - rowsum(dP * P)), not dP":
                lambda: np.swapaxes(dp, -1, -2) @ q * scale,
        },
        "dv": {
            "dv uses P where it needs P^T: dv = P^T d_out (shape (S, d_v))": lambda: p @ d_out,
            "dv should not be scaled by 1/sqrt(d): only the scores are scaled":
                lambda: np.swapaxes(p, -1, -2) @ d_out * scale,
            "dv uses the scores S instead of the weights P = softmax(S)":
                lambda: np.swapaxes(np.where(np.isfinite(scores), scores, 0.0), -1, -2) @ d_out,
        },
    }
    return {name: {msg: _try(make) for msg, make in group.items()} for name, group in candidates.items()}


def _try(make):
    try:  # a wrong formula may not even have a valid shape on these inputs (e.g. ds @ q when T != S)
        return make()
    except ValueError:
        return None


@checker
def check_attention_backward(fn):
    """Check the hand-derived backward pass of scaled dot-product attention.

    Your function: `fn(q, k, v, d_out, mask=None) -> (dq, dk, dv)`, the gradients of sum(out * d_out)
    for out = attention(q, k, v, mask), shaped like q, k and v; mask as in check_masked_attention.
    Checks five cases (T != S, d_v != d, batch axes, a causal mask, a fully masked row) against
    numpy_ref; names a missing or wrong 1/sqrt(d), a skipped softmax backward, missing transposes,
    the scores used instead of the weights, and NaN from a fully masked row.
    """
    rng = np.random.default_rng(4)
    cases = [  # (description, q shape, k shape, v shape, mask)
        ("square T = S = 4, d = 3", (4, 3), (4, 3), (4, 3), None),
        ("T = 3 queries, S = 5 keys, d = 4, d_v = 2", (3, 4), (5, 4), (5, 2), None),
        ("batched (2, 2, T=3, d=4), S = 4", (2, 2, 3, 4), (2, 2, 4, 4), (2, 2, 4, 3), None),
        ("causal mask, T = S = 4", (4, 5), (4, 5), (4, 2), np.tril(np.ones((4, 4), dtype=bool))),
        ("mask with a fully masked query row", (3, 2), (4, 2), (4, 3),
         np.array([[True, False, True, False], [False, False, False, False], [True, True, True, True]])),
    ]
    for description, q_shape, k_shape, v_shape, mask in cases:
        q, k, v = rng.normal(size=q_shape), rng.normal(size=k_shape), rng.normal(size=v_shape)
        out, _ = numpy_ref.scaled_dot_product_attention(q, k, v, mask)
        d_out = rng.normal(size=out.shape)
        if mask is None:
            got = call(fn, q.copy(), k.copy(), v.copy(), d_out.copy())
        else:
            got = call(fn, q.copy(), k.copy(), v.copy(), d_out.copy(), mask.copy(), what="; the last one is the mask")
        got = unpack(got, 3, "return a tuple (dq, dk, dv) of three arrays")
        expected = numpy_ref.scaled_dot_product_attention_backward(q, k, v, d_out, mask)
        wrong = _wrong_backwards(q, k, v, d_out, mask)
        for name, g, e in zip(("dq", "dk", "dv"), got, expected, strict=True):
            if not is_close(g, e):
                mistake = diagnose(g, wrong[name])
                if mistake:
                    raise CheckFailure(f"{description}: {mistake}.")
                if mask is not None and g is not None and np.shape(g) == e.shape and not np.isfinite(g).all():
                    raise CheckFailure(
                        f"{description}: {name} contains NaN or inf. A fully masked row has P = 0 everywhere; "
                        "compute P with a softmax that returns 0 for an all -inf row (course_lib.numpy_ref.softmax "
                        "does) and the formulas give exactly 0 there.")
            compare(f"{name} ({description})", g, e,
                    hint="dv = P^T d_out, dP = d_out v^T, dS = P * (dP - rowsum(dP * P)), dq = dS k / sqrt(d), "
                         "dk = dS^T q / sqrt(d); apply the mask to the scores before the softmax")
    return "5 cases (T != S, d_v != d, batch dims, causal mask, a fully masked row) match the reference"

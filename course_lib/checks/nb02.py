"""Checkers for notebook 02 (backprop through attention in numpy).

Each checker compares the learner's function with the hand-derived reference on a few small
float64 cases and, when the answer is wrong, tries the classic mistakes (a missing diagonal
term, a missing 1/sqrt(d), a transposed dS, ...) to say *which* one was made.
"""

from __future__ import annotations

import numpy as np

from course_lib import numpy_ref
from course_lib.checks._core import (
    CheckFailure,
    as_array,
    call,
    checker,
    compare,
    diagnose,
    is_close,
    multiple_choice,
    unpack,
)

__all__ = [
    "check_softmax_jacobian",
    "check_softmax_backward",
    "check_attention_backward",
    "check_softmax_temperature_backward",
    "check_bias_backward",
    "check_backward_quiz",
]


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


# ----------------------------------------------------------------------------- softmax with a temperature
def _softmax_vjp(p: np.ndarray, d_p: np.ndarray) -> np.ndarray:
    return p * (d_p - np.sum(d_p * p, axis=-1, keepdims=True))  # same shape as p


@checker
def check_softmax_temperature_backward(fn):
    """Check the backward pass of a softmax with a temperature.

    Your function: `fn(x, tau, d_p) -> d_x`, for p = softmax(x / tau) over the last axis and the
    upstream gradient d_p (same shape as x, any leading axes); returns d_x = dL/dx, same shape.
    Checks tau = 0.5, 2 and 8 on (4, 6) and (2, 3, 5) arrays; names a missing 1/tau (chain rule),
    a factor tau instead of 1/tau, the softmax of x instead of x / tau, and a forward pass returned.
    """
    rng = np.random.default_rng(22)
    for tau, shape in [(0.5, (4, 6)), (2.0, (2, 3, 5)), (8.0, (3, 4))]:
        x, d_p = rng.normal(size=shape) * 2, rng.normal(size=shape)
        got = call(fn, x, tau, d_p)
        p = numpy_ref.softmax(x / tau)
        expected = _softmax_vjp(p, d_p) / tau
        label = f"tau={tau}, x of shape {shape}"
        if got is not None and np.shape(got) == expected.shape and not is_close(got, expected):
            mistake = diagnose(got, {
                "you forgot the chain rule through x / tau: d_x = (1/tau) * p * (d_p - rowsum(d_p * p))":
                    _softmax_vjp(p, d_p),
                "you multiplied by tau; the derivative of x / tau with respect to x is 1/tau":
                    _softmax_vjp(p, d_p) * tau,
                "you used p = softmax(x), without the temperature": _softmax_vjp(numpy_ref.softmax(x), d_p) / tau,
                "this is the forward pass p = softmax(x / tau), not its backward": p,
            })
            if mistake:
                raise CheckFailure(f"for {label}: {mistake}.")
        compare(f"d_x for {label}", got, expected, hint="p = softmax(x / tau); d_x = p * (d_p - rowsum(d_p * p)) / tau")
    return "tau = 0.5, 2, 8 (with batch axes) match p * (d_p - rowsum(d_p * p)) / tau"


# ----------------------------------------------------------------------------- gradient of an additive bias
def _bias_backward_ref(q, k, v, bias, d_out):
    d = q.shape[-1]
    p = numpy_ref.softmax(q @ k.T / np.sqrt(d) + bias)  # (T, S)
    dv = p.T @ d_out  # (S, d_v)
    dp = d_out @ v.T  # (T, S)
    ds = _softmax_vjp(p, dp)  # (T, S)
    d_bias = ds.sum(axis=0, keepdims=True) if bias.shape[0] == 1 and ds.shape[0] != 1 else ds
    return ds @ k / np.sqrt(d), ds.T @ q / np.sqrt(d), dv, d_bias, p, dp, ds


@checker
def check_bias_backward(fn):
    """Check the gradients of attention with an additive bias (a float mask or a learned bias).

    Your function: `fn(q, k, v, bias, d_out) -> (dq, dk, dv, d_bias)` for out = softmax(q k^T / sqrt(d)
    + bias) v and L = sum(out * d_out); q (T, d), k (S, d), v (S, d_v), bias (T, S) or (1, S)
    (broadcast over the queries); d_bias has bias's shape. Checks a (T, S) bias with T == S, a (1, S)
    bias with T != S, and a bias with -inf entries (a mask); names d_bias scaled by 1/sqrt(d), d_bias =
    dP (softmax backward skipped), a missing sum over the broadcast axis, and a forgotten .T in dv or dk.
    """
    rng = np.random.default_rng(23)
    cases = []
    T = S = 5
    cases.append(("bias (T, S) = (5, 5)", rng.normal(size=(T, 4)), rng.normal(size=(S, 4)), rng.normal(size=(S, 3)),
                  rng.normal(size=(T, S)), rng.normal(size=(T, 3))))
    T, S = 3, 6
    cases.append(("bias (1, S) = (1, 6), T = 3", rng.normal(size=(T, 4)), rng.normal(size=(S, 4)),
                  rng.normal(size=(S, 2)), rng.normal(size=(1, S)), rng.normal(size=(T, 2))))
    bias = np.where(np.tril(np.ones((4, 4), dtype=bool)), 0.0, -np.inf)  # (T, S) a causal mask as a float bias
    cases.append(("bias = causal mask with -inf, (4, 4)", rng.normal(size=(4, 8)), rng.normal(size=(4, 8)),
                  rng.normal(size=(4, 2)), bias, rng.normal(size=(4, 2))))
    for label, q, k, v, bias, d_out in cases:
        result = call(fn, q, k, v, bias, d_out)
        dq, dk, dv, d_bias = unpack(result, 4, "return a tuple (dq, dk, dv, d_bias) of four arrays", case=label)
        ref_dq, ref_dk, ref_dv, ref_bias, p, dp, ds = _bias_backward_ref(q, k, v, bias, d_out)
        d = q.shape[-1]
        got_bias = as_array("d_bias", d_bias)
        if got_bias.shape == ds.shape and bias.shape != ds.shape and is_close(got_bias, ds):
            raise CheckFailure(f"for {label}: d_bias has shape {got_bias.shape}, but the bias has shape {bias.shape}: "
                               f"it was broadcast over the queries, so its gradient is dS SUMMED over that axis "
                               f"(ds.sum(axis=0, keepdims=True)).")
        if not is_close(got_bias, ref_bias):
            summed = (lambda a: a.sum(axis=0, keepdims=True)) if bias.shape != ds.shape else (lambda a: a)
            with np.errstate(invalid="ignore"):
                mistake = diagnose(got_bias, {
                    "d_bias carries no 1/sqrt(d): the bias is added AFTER the scaling, so d_bias = dS":
                        summed(ds / np.sqrt(d)),
                    "d_bias = dP skips the softmax backward: d_bias = dS = P * (dP - rowsum(dP * P))": summed(dp),
                })
            if mistake:
                raise CheckFailure(f"for {label}: {mistake}.")
        compare(f"d_bias for {label}", d_bias, ref_bias, hint="d_bias = dS (summed over any axis the bias was "
                                                                "broadcast along)")
        T, S = p.shape
        if T == S and is_close(dv, p @ d_out) and not is_close(dv, ref_dv):
            raise CheckFailure(f"for {label}: dv = P @ dO; you forgot .T: dv = P.T @ dO, each value collects "
                               f"gradient from every query that looked at it.")
        compare(f"dv for {label}", dv, ref_dv, hint="dv = P.T @ d_out")
        if T == S and is_close(dk, ds @ q / np.sqrt(d)) and not is_close(dk, ref_dk):
            raise CheckFailure(f"for {label}: dk = dS @ q / sqrt(d); you forgot .T: dk = dS.T @ q / sqrt(d).")
        compare(f"dq for {label}", dq, ref_dq, hint="dq = dS @ k / sqrt(d)")
        compare(f"dk for {label}", dk, ref_dk, hint="dk = dS.T @ q / sqrt(d)")
    return "3 biases ((T, S), broadcast (1, S), a -inf mask) give the right dq, dk, dv and d_bias"


# ----------------------------------------------------------------------------- three questions on the backward pass
_BACKWARD_QUIZ = (
    ("c", {"a": "dQ = dS K / sqrt(d): the scores were scaled, and Q enters only through them",
           "b": "dK = dS^T Q / sqrt(d) carries the factor too; only V enters after the scaling"}),
    ("b", {"a": "the Jacobian route multiplies an (S, S) matrix by a vector for each of the T rows, O(T S^2) "
                "multiply-adds, against O(T S) for P * (dP - rowsum(dP * P))",
           "c": "the T Jacobians hold T S^2 numbers and the VJP needs about T S operations: the ratio is S, not "
                "S^2"}),
    ("c", {"a": "1e-11 is float64's best central difference; float32's unit roundoff u is 6e-8, and the best "
                "central difference is about u^(2/3) = 1.5e-5",
           "b": "1e-8 is float64's best FORWARD difference; float32's best central difference sits near "
                "u^(2/3) = 1.5e-5 (section 4's float32 curve bottoms out between 1e-5 and 1e-4)"}),
)


@checker
def check_backward_quiz(fn):
    """Check the answers to three multiple-choice questions on the backward pass.

    Your function: `fn() -> answers`, three letters (a string such as "abc" or a tuple), one per
    question in the order asked. Says which answer is wrong and why.
    """
    multiple_choice(call(fn), _BACKWARD_QUIZ)
    return "all three answers are right"

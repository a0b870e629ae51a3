"""Checkers for notebook 02 (backprop through attention in numpy).

Each checker compares the learner's function with the hand-derived reference (and the backward
pass also with torch autograd) on a few small float64 cases and, when the answer is wrong, tries
the classic mistakes (a missing diagonal term, a missing 1/sqrt(d), a transposed dZ, .T on a
batched array, ...) to say *which* one was made.
"""

from __future__ import annotations

import numpy as np
import torch

from course_lib import numpy_ref
from course_lib.checks._core import (
    CheckFailure,
    as_array,
    call,
    call_watching,
    checker,
    compare,
    diagnose,
    is_close,
    multiple_choice,
    to_numpy,
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
        got_array = to_numpy(got)
        if (isinstance(got_array, np.ndarray) and got_array.shape == expected.shape and got_array.dtype.kind == "f"
                and not np.isfinite(got_array).all() and np.abs(x).max() > 700):
            raise CheckFailure(f"J for x of length {len(x)} contains nan or inf: with logits as large as "
                               f"{np.abs(x).max():g}, exp(x) overflows (inf / inf = nan). Subtract max(x) before exp: "
                               f"softmax(x) = softmax(x - max x), and nothing overflows.")
        compare(f"J for x of length {len(x)}", got, expected,
                hint=('differentiate p_i = exp(x_i) / sum_k exp(x_k) with respect to x_j: two cases, i = j and '
                      'i != j'))
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
                hint=('the product of the Jacobian with d_p can be written without building the Jacobian: use '
                      'its structure, a diagonal minus an outer product'))
    return "4 shapes incl. batched (2, 3, 6) match p * (d_p - rowsum(d_p * p))"


# ----------------------------------------------------------------------------- attention backward
def _swap(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)  # transpose the last two axes only


def _variant_backward(q, k, v, d_out, mask, *, transpose=_swap, fill=-np.inf, softmax_backward="vjp",
                      dq_root_d_power=1, dk_root_d_power=1, dv_scaled=False, dv_from_scores=False,
                      dv_untransposed=False, dk_untransposed=False, dq_transposed=False):
    """The gradients (dq, dk, dv) of attention computed with the stated slips (none by default: the right ones).

    transpose: how "^T" is done (the right one swaps the last two axes; `.T` reverses them all);
    fill: the masked scores' value (None: the mask is ignored; "after": P is multiplied by the mask;
    "dz_only": the forward ignores the mask and only dZ is zeroed where it is False);
    softmax_backward: "vjp", "none" (dZ = dP), "no_rowsum" (dZ = P * dP), "query_axis" (the row sum
    over the queries), "no_keepdims" (the row sums broadcast along the wrong axis).
    """
    root_d = np.sqrt(q.shape[-1])
    scores = q @ transpose(k) / root_d  # (..., T, S)
    if mask is not None and fill not in (None, "after", "dz_only"):
        scores = np.where(mask, scores, fill)
    p = numpy_ref.softmax(scores)  # (..., T, S)
    if mask is not None and fill == "after":
        p = p * mask
    dp = d_out @ transpose(v)  # (..., T, S)
    dz = {
        "vjp": lambda: p * (dp - np.sum(dp * p, axis=-1, keepdims=True)),
        "none": lambda: dp,
        "no_rowsum": lambda: p * dp,
        "query_axis": lambda: p * (dp - np.sum(dp * p, axis=-2, keepdims=True)),
        "no_keepdims": lambda: p * (dp - np.expand_dims(np.sum(dp * p, axis=-1), -2)),
    }[softmax_backward]()
    if mask is not None and fill == "dz_only":
        dz = dz * mask
    dq = (transpose(dz) if dq_transposed else dz) @ k / root_d**dq_root_d_power
    dk = (dz if dk_untransposed else transpose(dz)) @ q / root_d**dk_root_d_power
    weights = np.where(np.isfinite(scores), scores, 0.0) if dv_from_scores else p
    dv = (weights if dv_untransposed else transpose(weights)) @ d_out / (root_d if dv_scaled else 1.0)
    return dq, dk, dv


_WHOLE_MISTAKES: dict[str, dict] = {  # slips that change all three gradients, with what each one gets wrong
    "masked pairs receive gradient: your gradients are those of attention WITHOUT the mask. Set the masked "
    "scores to -inf before the softmax, so that P = 0 there and dZ = P * (...) is 0 too": dict(fill=None),
    "a query with no allowed key attends uniformly to every key and sends gradient to all of them: that is "
    "what a finite fill such as -1e9 does to a fully masked row. Fill with -inf and use a softmax that returns 0 "
    "for an all -inf row (course_lib.numpy_ref.softmax does), so its gradients are 0": dict(fill=-1e9),
    "the mask is applied after the softmax (P * mask): the kept weights of a row then no longer sum to 1. Mask "
    "the scores (-inf) before the softmax": dict(fill="after"),
    "only dZ is masked, but the forward pass that your gradients belong to attends to every key: P and dv "
    "come from unmasked scores. Mask the scores (-inf) before the softmax; dZ = P * (...) is then 0 at masked "
    "pairs by itself": dict(fill="dz_only"),
    "x.T reverses EVERY axis of a batched array, (B, H, S, d) -> (d, S, H, B): transpose only the last two "
    "with np.swapaxes(x, -1, -2)": dict(transpose=lambda x: x.T),
    "the softmax backward's row sum lost its axis (keepdims=True is missing), so it is subtracted along the "
    "wrong axis: dZ = P * (dP - (dP * P).sum(axis=-1, keepdims=True))": dict(softmax_backward="no_keepdims"),
    "the softmax backward's row sum runs over the queries; it runs over the keys, the axis the softmax "
    "normalises (the last one)": dict(softmax_backward="query_axis"),
    "the '- rowsum(dP * P)' term of the softmax backward is missing: dZ = P * (dP - rowsum(dP * P)), not "
    "P * dP": dict(softmax_backward="no_rowsum"),
    "the softmax backward is skipped: dZ = P * (dP - rowsum(dP * P)), not dP": dict(softmax_backward="none"),
}

_GRADIENT_MISTAKES: dict[str, dict[str, dict]] = {  # slips in one gradient, by the gradient they show up in
    "dq": {
        "dq is missing the 1/sqrt(d) factor: the scores are q k^T / sqrt(d), so dq = dZ k / sqrt(d)":
            dict(dq_root_d_power=0),
        "dq is divided by d instead of sqrt(d)": dict(dq_root_d_power=2),
        "dq uses dZ^T where it needs dZ: dq = dZ k / sqrt(d), each query collects from the keys it looked at":
            dict(dq_transposed=True),
    },
    "dk": {
        "dk is missing the 1/sqrt(d) factor: dk = dZ^T q / sqrt(d)": dict(dk_root_d_power=0),
        "dk is divided by d instead of sqrt(d)": dict(dk_root_d_power=2),
        "dk uses dZ where it needs dZ^T: dk = dZ^T q / sqrt(d), each key collects gradient from every query "
        "that looked at it": dict(dk_untransposed=True),
    },
    "dv": {
        "dv uses P where it needs P^T: dv = P^T d_out (shape (S, d_v)), each value collects gradient from every "
        "query that used it": dict(dv_untransposed=True),
        "dv should not be scaled by 1/sqrt(d): only the scores are scaled, and v enters after them":
            dict(dv_scaled=True),
        "dv uses the scores instead of the weights P = softmax(scores)": dict(dv_from_scores=True),
    },
}


def _mistakes_in(name: str, q, k, v, d_out, mask) -> dict[str, np.ndarray | None]:
    """Message -> the gradient `name` that each slip gives on these inputs (None where it cannot run)."""
    index = ("dq", "dk", "dv").index(name)
    found = {}
    slips = [*_GRADIENT_MISTAKES[name].items(), *((f"{name}: {m}", o) for m, o in _WHOLE_MISTAKES.items())]
    for message, options in slips:
        if "fill" in options and mask is None:
            continue
        try:  # a slip may not even have a valid shape on these inputs (e.g. dZ q when T != S)
            with np.errstate(all="ignore"):
                found[message] = _variant_backward(q, k, v, d_out, mask, **options)[index]
        except ValueError:
            found[message] = None
    return found


def _autograd_backward(q, k, v, d_out, mask):
    """torch autograd's gradients of sum(out * d_out) through course_lib's attention, in float64."""
    from course_lib.attention import scaled_dot_product_attention

    tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    attn_mask = None if mask is None else torch.from_numpy(mask)
    out, _ = scaled_dot_product_attention(tq, tk, tv, attn_mask=attn_mask, need_weights=True)  # the math path
    out.backward(torch.from_numpy(d_out))
    return tuple(torch.zeros_like(t) if t.grad is None else t.grad for t in (tq, tk, tv))


_ARRAY_ADVICE = ("A backward pass must leave its inputs as they were: write new arrays (x = x / c), "
                 "not x /= c or x[...] = ...")


_ATTENTION_CASES = [  # (description, q shape, k shape, v shape, mask)
    ("square T = S = 4, d = 3", (4, 3), (4, 3), (4, 3), None),
    ("T = 3 queries, S = 5 keys, d = 4, d_v = 2", (3, 4), (5, 4), (5, 2), None),
    ("batched (3, 3, T=3, d=3), S = 3, d_v = 3", (3, 3, 3, 3), (3, 3, 3, 3), (3, 3, 3, 3), None),
    ("batched (2, 2, T=3, d=4), S = 4, d_v = 3", (2, 2, 3, 4), (2, 2, 4, 4), (2, 2, 4, 3), None),
    ("causal mask, T = S = 4", (4, 5), (4, 5), (4, 2), np.tril(np.ones((4, 4), dtype=bool))),
    ("mask with a fully masked query row (query 1)", (3, 2), (4, 2), (4, 3),
     np.array([[True, False, True, False], [False, False, False, False], [True, True, True, True]])),
]


@checker
def check_attention_backward(fn):
    """Check the hand-derived backward pass of scaled dot-product attention.

    Your function: `fn(q, k, v, d_out, mask=None) -> (dq, dk, dv)`, the gradients of sum(out * d_out)
    for out = softmax(q k^T / sqrt(d) [masked]) v, shaped like q (..., T, d), k (..., S, d) and
    v (..., S, d_v); mask bool (True = may attend) of shape (T, S). Checks six cases (T != S, d_v != d,
    batch axes, a causal mask, a fully masked query row) against torch autograd in float64 and against
    course_lib.numpy_ref; names a missing or wrong 1/sqrt(d), a skipped or incomplete softmax backward,
    missing transposes, .T on batched arrays, masked pairs that receive gradient (mask ignored, applied
    after the softmax or to dZ only, a -1e9 fill), NaN from a fully masked row, gradients returned in
    another order, and inputs changed in place.
    """
    rng = np.random.default_rng(4)
    for description, q_shape, k_shape, v_shape, mask in _ATTENTION_CASES:
        q, k, v = rng.normal(size=q_shape), rng.normal(size=k_shape), rng.normal(size=v_shape)
        out, _ = numpy_ref.scaled_dot_product_attention(q, k, v, mask)
        d_out = rng.normal(size=out.shape)
        batched = q.ndim > 2
        inputs: list[np.ndarray] = [q, k, v, d_out] + ([] if mask is None else [mask])
        names = ("q", "k", "v", "d_out", "mask")[:len(inputs)]
        try:
            got = call_watching(fn, *inputs, names=names, advice=_ARRAY_ADVICE,
                                what="; the last one is the mask" if mask is not None else "")
        except CheckFailure as failure:
            if batched and "raised" in str(failure):
                raise CheckFailure(f"{description}: {failure}. Your function works on 2-D inputs but not on "
                                   f"batched ones: x.T reverses EVERY axis, (B, H, S, d) -> (d, S, H, B); "
                                   f"transpose the last two with np.swapaxes(x, -1, -2), and sum over "
                                   f"axis=-1, not axis=1") from None
            raise
        got = unpack(got, 3, "return a tuple (dq, dk, dv) of three arrays", case=description)
        expected = numpy_ref.scaled_dot_product_attention_backward(q, k, v, d_out, mask)
        autograd = _autograd_backward(q, k, v, d_out, mask)
        order = [next((n for n, e in zip(("dq", "dk", "dv"), expected, strict=True) if is_close(g, e)), None)
                 for g in got]
        if None not in order and order != ["dq", "dk", "dv"]:
            raise CheckFailure(f"{description}: your gradients are right but returned as "
                               f"({', '.join(map(str, order))}); return them in the order (dq, dk, dv), like the "
                               f"inputs (q, k, v).")
        for name, g, e, a in zip(("dq", "dk", "dv"), got, expected, autograd, strict=True):
            compare(f"torch autograd's {name} vs course_lib's ({description}; the checker's own agreement)", a, e)
            if is_close(g, e):
                continue
            mistake = diagnose(g, _mistakes_in(name, q, k, v, d_out, mask))
            if mistake:
                raise CheckFailure(f"{description}: {mistake}.")
            if mask is not None and g is not None and np.shape(g) == e.shape and not np.isfinite(g).all():
                raise CheckFailure(
                    f"{description}: {name} contains NaN or inf. A fully masked row has P = 0 everywhere; "
                    "compute P with a softmax that returns 0 for an all -inf row (course_lib.numpy_ref.softmax "
                    "does) and the formulas give exactly 0 there.")
            if batched:
                raise CheckFailure(f"{description}: your {name} is right on 2-D inputs but not on batched ones: "
                                   f"a transpose or a sum counted from the front (x.T reverses every axis; axis=1 "
                                   f"is not the last axis). Transpose with np.swapaxes(x, -1, -2) and sum over "
                                   f"axis=-1.")
            hint = ("follow the chain backwards from out, one intermediate at a time (dv, then dP, then dZ through "
                    "the softmax, then dq and dk), and compare each step with section 3's derivation")
            compare(f"{name} ({description}) vs torch autograd", g, a, hint=hint)
            compare(f"{name} ({description}) vs course_lib.numpy_ref", g, e, hint=hint)
    return ("6 cases (T != S, d_v != d, batch axes, a causal mask, a fully masked row) equal torch autograd "
            "(float64) and course_lib.numpy_ref")


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
        compare(f"d_x for {label}", got, expected, hint=("the temperature divides the logits before the softmax: "
                                                          "the chain rule goes through that division too"))
    return "tau = 0.5, 2, 8 (with batch axes) match p * (d_p - rowsum(d_p * p)) / tau"


# ----------------------------------------------------------------------------- gradient of an additive bias
def _bias_parts(q, k, v, bias, d_out):
    """P, dP and dZ of softmax(q k^T / sqrt(d) + bias) v for L = sum(out * d_out)."""
    p = numpy_ref.softmax(q @ k.T / np.sqrt(q.shape[-1]) + bias)  # (T, S); the bias is added after the scaling
    dp = d_out @ v.T  # (T, S)
    return p, dp, _softmax_vjp(p, dp)


@checker
def check_bias_backward(fn):
    """Check the gradient of attention's loss with respect to an additive bias on the scores.

    Your function: `fn(q, k, v, bias, d_out) -> d_bias` for out = softmax(q k^T / sqrt(d) + bias) v and
    L = sum(out * d_out); q (T, d), k (S, d), v (S, d_v), bias (T, S) or (1, S) (one value per key,
    broadcast over the queries); d_bias has the bias's shape. Checks a (T, S) bias, a (1, S) bias with
    T != S and a causal mask written as a 0 / -inf bias; names d_bias scaled by 1/sqrt(d), d_bias = dP
    (softmax backward skipped), a missing sum over the broadcast axis, a mean instead of that sum, and
    inputs changed in place.
    """
    rng = np.random.default_rng(23)
    causal = np.where(np.tril(np.ones((4, 4), dtype=bool)), 0.0, -np.inf)  # (T, S): a causal mask as a float bias
    cases = [
        ("bias (T, S) = (5, 5)", rng.normal(size=(5, 4)), rng.normal(size=(5, 4)), rng.normal(size=(5, 3)),
         rng.normal(size=(5, 5)), rng.normal(size=(5, 3))),
        ("bias (1, S) = (1, 6), T = 3", rng.normal(size=(3, 4)), rng.normal(size=(6, 4)), rng.normal(size=(6, 2)),
         rng.normal(size=(1, 6)), rng.normal(size=(3, 2))),
        ("bias = causal mask with -inf, (4, 4)", rng.normal(size=(4, 8)), rng.normal(size=(4, 8)),
         rng.normal(size=(4, 2)), causal, rng.normal(size=(4, 2))),
    ]
    for label, q, k, v, bias, d_out in cases:
        got = call_watching(fn, q, k, v, bias, d_out, names=("q", "k", "v", "bias", "d_out"), advice=_ARRAY_ADVICE)
        p, dp, dz = _bias_parts(q, k, v, bias, d_out)
        broadcast = bias.shape != dz.shape
        expected = dz.sum(axis=0, keepdims=True) if broadcast else dz  # sum over the axis the bias was broadcast along
        got_bias = as_array("d_bias", got, hint="return d_bias alone, an array shaped like the bias")
        if broadcast and got_bias.shape == dz.shape and is_close(got_bias, dz):
            raise CheckFailure(f"for {label}: d_bias has shape {got_bias.shape}, but the bias has shape {bias.shape}: "
                               f"it was broadcast over the queries, so its gradient is dZ SUMMED over that axis "
                               f"(each query's score got the same bias and passes its gradient back to it).")
        if not is_close(got_bias, expected):
            summed = (lambda a: a.sum(axis=0, keepdims=True)) if broadcast else (lambda a: a)
            with np.errstate(invalid="ignore"):
                mistake = diagnose(got_bias, {
                    "d_bias carries no 1/sqrt(d): the bias is added AFTER the scaling, so d_bias = dZ":
                        summed(dz / np.sqrt(q.shape[-1])),
                    "d_bias = dP skips the softmax backward: d_bias = dZ = P * (dP - rowsum(dP * P))": summed(dp),
                    "d_bias is the MEAN of dZ over the queries; it is their SUM: every query's score got the "
                    "same bias": dz.mean(axis=0, keepdims=True) if broadcast else None,
                })
            if mistake:
                raise CheckFailure(f"for {label}: {mistake}.")
        compare(f"d_bias for {label}", got_bias, expected,
                hint=('the bias enters the scores by addition: ask what an addition does to a gradient, and '
                      'over which axes the bias was broadcast'))
    return "3 biases ((T, S), broadcast (1, S), a -inf mask) give the right d_bias"


# ----------------------------------------------------------------------------- predictions about the gradients
_BACKWARD_QUIZ = (
    ("b", {"a": "the softmax is nonlinear in its input, the scores, but the backward pass is linear in the upstream "
                "gradient: dP = dO V^T doubles, dZ = P * (dP - rowsum(dP * P)) doubles with it, and so do dQ and dK",
           "c": "d_out enters each gradient once, through dV = P^T dO or dP = dO V^T, and dZ is linear in dP: a "
                "factor 2 stays a factor 2",
           "d": "L = sum(O * dO) doubles when dO does, and so does each of its gradients"}),
    ("b", {"a": "dV = P^T dO contains no V: it does not change",
           "c": "dV = P^T dO contains no V; V enters dQ and dK through dP = dO V^T",
           "d": "P does not depend on V, but dP = dO V^T does, and dQ and dK are made from dZ, which is linear in dP"}),
    ("a", {"b": "dP depends on the values, but dQ_t = sum_s dZ_ts k_s / sqrt(d) = (sum_s dZ_ts) k / sqrt(d) when "
                "every k_s = k, and every row of dZ sums to 0",
           "c": "a constant row of scores is harmless: its softmax is uniform, 1/S per key, and every formula stays "
                "finite",
           "d": "P is uniform, 1/S per key, but the row sum in dZ = P * (dP - rowsum(dP * P)) is subtracted first: "
                "write dQ_t = sum_s dZ_ts k_s / sqrt(d) with every k_s = k"}),
    ("b", {"a": "the forward pass and dZ are the same, but the factor 1/sqrt(d) that multiplied dZ K has moved into "
                "q': the chain rule through scores = q' k^T gives dq' = dZ K, without it",
           "c": "dq' = dZ K, while the old dq = dZ K / sqrt(d): the new one is sqrt(d) times LARGER",
           "d": "dK = dZ^T q' = dZ^T q / sqrt(d) is the old dK: the keys still meet the scaled queries"}),
)


@checker
def check_backward_quiz(fn):
    """Check four predictions about the gradients of attention (multiple choice).

    Your function: `fn() -> answers`, four letters a-d (a string such as "abcd" or a tuple), one per
    question in the order asked. Says which answer is wrong and points at the idea it misses.
    """
    multiple_choice(call(fn), _BACKWARD_QUIZ, letters="abcd")
    return "all four predictions are right"

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
from course_lib.checks._core import (
    CheckFailure,
    as_array,
    as_tensor,
    call,
    checker,
    compare,
    is_close,
    multiple_choice,
    to_numpy,
    unpack,
)

__all__ = [
    "check_torch_attention",
    "check_autograd_grads",
    "check_padding_sdpa_call",
    "check_bias_grad_autograd",
    "check_torch_quiz",
]


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
            variants: dict[str, dict] = {
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
                hint=("the same steps as notebook 01's numpy attention, in torch: scaled scores, the mask "
                      'before the softmax, the softmax over the keys, the weighted sum of the values'))
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
                    hint=('make q, k and v leaf tensors that require gradients, run your forward on them, and '
                          'backpropagate d_out through it'))
    return "3 float64 cases (T != S, batch dims, causal mask) match the hand-derived numpy backward to 1e-10"


# ----------------------------------------------------------------------------- a padding mask for F.sdpa
def _padding_cases():
    gen = torch.Generator().manual_seed(31)
    cases = []
    for B, H, T, S, lengths in [(2, 3, 4, 6, [6, 3]), (3, 2, 3, 5, [5, 2, 4])]:  # the second has B == T
        q, k, v = (torch.randn(B, H, n, 4, generator=gen, dtype=torch.float64) for n in (T, S, S))
        cases.append((f"B={B}, H={H}, T={T}, S={S}, lengths {lengths}", q, k, v, torch.tensor(lengths)))
    return cases


@checker
def check_padding_sdpa_call(fn):
    """Check a call of F.scaled_dot_product_attention with a key padding mask.

    Your function: `fn(q, k, v, lengths) -> out`, with q (B, H, T, d), k and v (B, H, S, .) float64
    tensors and lengths (B,) the number of real keys of each sequence (the rest is padding); returns
    the attention output (B, H, T, d_v) in which no query attends to a padded key. Checks two batches
    (one with B == T); names the inverted polarity, a 0/1 float mask (added to the scores, so it masks
    nothing), and a (B, S) mask that broadcasts against (T, S) instead of over heads and queries.
    """
    for label, q, k, v, lengths in _padding_cases():
        try:
            answer = call(fn, q, k, v, lengths)
        except CheckFailure as failure:
            if "raised" not in str(failure):
                raise
            raise CheckFailure(f"{failure}. Hint: a mask of the keys is (B, S); to broadcast over heads and queries "
                               f"against the (B, H, T, S) scores it must be (B, 1, 1, S).") from None
        got = as_tensor("out", answer)
        S = k.shape[-2]
        real = torch.arange(S)[None, :] < lengths[:, None]  # (B, S) True for real keys
        m4 = real[:, None, None, :]  # (B, 1, 1, S)
        expected = _attention_variant(q.numpy(), k.numpy(), v.numpy(), m4.numpy())
        if got.shape != expected.shape:
            raise CheckFailure(f"for {label}: out has shape {tuple(got.shape)}, expected (B, H, T, d_v) = "
                               f"{expected.shape}. A (B, S) mask needs the shape (B, 1, 1, S) to broadcast over "
                               f"heads and queries.")
        if not is_close(got, expected):
            scale = q.shape[-1] ** -0.5
            scores = (q @ k.transpose(-2, -1) * scale).numpy()
            wrong = {
                "the polarity is inverted: for a BOOLEAN attn_mask, F.scaled_dot_product_attention reads True as "
                "'may attend', so pass the mask of REAL keys (not of the padding)":
                    _attention_variant(q.numpy(), k.numpy(), v.numpy(), m4.numpy(), invert_mask=True),
                "your mask is a float 0/1 tensor: a float attn_mask is ADDED to the scores, so it adds 1 to the "
                "real keys and 0 to the padding and masks nothing; pass a bool mask (or 0 / -inf)":
                    numpy_ref.softmax(scores + m4.double().numpy()) @ v.numpy(),
                "your (B, S) mask broadcast against the (T, S) scores, pairing sequence b's mask with query b; "
                "reshape it to (B, 1, 1, S) (real[:, None, None, :]) so it broadcasts over heads and queries":
                    _attention_variant(q.numpy(), k.numpy(), v.numpy(), real.numpy()) if q.shape[-2] == real.shape[0]
                    else None,
            }
            message = next((m for m, w in wrong.items() if w is not None and is_close(got, w)), None)
            if message:
                raise CheckFailure(f"for {label}: {message}.")
        compare(f"out for {label}", got, expected, hint=("a key is real when its position is below its sequence's "
                                                          "length; shape the mask so that it broadcasts over heads "
                                                          "and queries"))
    return "two padded batches (one with B == T) match attention with the keys beyond each length masked"


# ----------------------------------------------------------------------------- d(bias) by autograd
def _bias_cases():
    gen = torch.Generator().manual_seed(32)
    cases = []
    for T, S, bias_shape in [(4, 4, (4, 4)), (3, 5, (1, 5))]:
        q, k, v = (torch.randn(2, n, 3, generator=gen, dtype=torch.float64) for n in (T, S, S))
        bias = torch.randn(*bias_shape, generator=gen, dtype=torch.float64)
        d_out = torch.randn(2, T, 3, generator=gen, dtype=torch.float64)
        cases.append((f"T={T}, S={S}, bias {bias_shape}", q, k, v, bias, d_out))
    return cases


def _bias_reference(q, k, v, bias, d_out, *, of_sum=False):
    bias = bias.detach().clone().requires_grad_(True)
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + bias
    out = torch.softmax(scores, dim=-1) @ v
    (out.sum() if of_sum else (out * d_out).sum()).backward()
    return bias.grad


@checker
def check_bias_grad_autograd(fn):
    """Check the gradient of an additive attention bias computed with autograd.

    Your function: `fn(q, k, v, bias, d_out) -> d_bias`, with q (B, T, d), k and v (B, S, .) float64
    tensors, bias (T, S) or (1, S) added to the scaled scores, and d_out (B, T, d_v); returns the
    gradient of sum(out * d_out) with respect to bias, a tensor of bias's shape. Checks a (4, 4) and a
    broadcast (1, 5) bias; names the gradient of out.sum() instead of sum(out * d_out), a float32
    computation, a missing sum over the broadcast axes, and a bias that does not require grad (None).
    """
    for label, q, k, v, bias, d_out in _bias_cases():
        answer = call(fn, q, k, v, bias, d_out)
        if answer is None:
            raise CheckFailure(f"for {label}: d_bias is None: did you forget to `return` it, or to call "
                               f"bias.requires_grad_(True) before the forward pass (then bias.grad stays None)?")
        got = as_array("d_bias", answer)
        expected = _bias_reference(q, k, v, bias, d_out)
        if got.shape != tuple(bias.shape):
            raise CheckFailure(f"for {label}: d_bias has shape {got.shape}, expected the bias's shape "
                               f"{tuple(bias.shape)}: a broadcast bias collects its gradient SUMMED over the batch "
                               f"and the broadcast query axis (autograd does that when bias itself is the leaf).")
        if is_close(got, _bias_reference(q, k, v, bias, d_out, of_sum=True)) and not is_close(got, expected):
            raise CheckFailure(f"for {label}: this is the gradient of out.sum(); the exercise asks for the gradient of "
                               f"sum(out * d_out): call out.backward(d_out) (or (out * d_out).sum().backward()).")
        dtype = getattr(answer, "dtype", None)
        if dtype in (torch.float32, np.float32) and not is_close(got, expected):
            raise CheckFailure(f"for {label}: d_bias is {dtype}; keep the float64 inputs in float64 (torch.randn and "
                               f"torch.tensor default to float32), or the gradient keeps only ~7 digits.")
        compare(f"d_bias for {label}", got, expected.numpy(), hint=("let autograd do the work: make the bias a "
                                                                     "leaf that requires a gradient, run the "
                                                                     "forward with it, and backpropagate d_out"))
    return "a (T, S) and a broadcast (1, S) bias: d_bias equals the gradient of sum(out * d_out)"


# ----------------------------------------------------------------------------- three questions
_TORCH_QUIZ = (
    ("b", {"a": "type promotion keeps the wider type: float64 + float32 is float64 (torch.from_numpy keeps numpy's "
                "float64; torch.randn makes float32)",
           "c": "mixing float64 and float32 tensors does not raise: the result is promoted to float64"}),
    ("a", {"b": "that would be the bottom-right alignment of course_lib.masks.causal_mask(2, 5); torch's "
                "is_causal=True is top-left (section 3 measured it): query 0 sees key 0 only",
           "c": "is_causal=True hides the keys after each query's position; with the top-left alignment that torch "
                "uses, query 0 sees key 0 only"}),
    ("b", {"a": "a float attn_mask is ADDED to the scores: 1.0 on the kept keys and 0.0 on the masked ones shifts "
                "the kept scores by 1 and masks nothing",
           "c": "F.scaled_dot_product_attention accepts a float mask: it adds it to the scores, without an error"}),
)


@checker
def check_torch_quiz(fn):
    """Check the answers to three multiple-choice questions on torch's dtypes and masks.

    Your function: `fn() -> answers`, three letters (a string such as "abc" or a tuple), one per
    question in the order asked. Says which answer is wrong and why.
    """
    multiple_choice(call(fn), _TORCH_QUIZ)
    return "all three answers are right"

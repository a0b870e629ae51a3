"""Checkers for notebook 99 (errata of the sources): three bugs of the source articles, fixed.

- check_sdpa_mask: source article 002's 0/1 mask turned into what F.scaled_dot_product_attention expects;
- check_heads_cost: the forward FLOPs and the stored attention weights of one layer, against the
  head count (source article 003 says more heads cost more compute);
- check_token_output: one token's self-attention output, the token itself included (source article 004's
  worked example leaves it out).
On a wrong answer each checker tries the mistakes the exercise invites and says which one was made.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from course_lib import numpy_ref
from course_lib.checks._core import (
    CheckFailure,
    as_array,
    as_number,
    as_tensor,
    call,
    checker,
    compare,
    diagnose,
    unpack,
)
from course_lib.cost.flops import module_flops

__all__ = ["check_sdpa_mask", "check_heads_cost", "check_token_output"]


# ----------------------------------------------------------------------------- source article 002's mask for SDPA
_SCORES_SHAPE = (2, 2, 5, 5)  # (B, H, T, S) of the checker's attention


@checker
def check_sdpa_mask(fn):
    """Check the conversion of a 0/1 mask (1 = may attend) into a mask for F.scaled_dot_product_attention.

    Your function: `fn(mask) -> sdpa_mask`, with mask a float or integer tensor of 0s and 1s (1 = may attend,
    any shape that broadcasts to the scores (B, H, T, S)), and sdpa_mask something that, passed as
    `attn_mask=` to F.scaled_dot_product_attention, attends exactly where mask != 0: a boolean mask (True =
    may attend) or an additive float mask (0 where allowed, -inf elsewhere). Checks three masks; names a float
    0/1 mask passed as it is (SDPA adds it), a flipped polarity, an integer mask and a mask that forbids all.
    """
    g = torch.Generator().manual_seed(99)
    q, k, v = torch.randn(3, *_SCORES_SHAPE[:3], 8, generator=g, dtype=torch.float64).unbind(0)  # (B, H, T, d)
    padding = torch.ones(2, 1, 1, 5, dtype=torch.float64)
    padding[1, ..., 3:] = 0  # the second sequence has 3 real tokens
    random01 = (torch.rand(_SCORES_SHAPE, generator=g) > 0.4).long()
    random01[..., 0] = 1  # every query keeps a key
    cases = [
        ("a float 0/1 padding mask (B, 1, 1, S)", padding),
        ("a float 0/1 causal mask (T, S) (torch.tril of ones)", torch.tril(torch.ones(5, 5, dtype=torch.float64))),
        ("an integer (int64) 0/1 mask (B, H, T, S)", random01),
    ]
    for what, mask in cases:
        allowed = (mask != 0).expand(_SCORES_SHAPE)
        got = as_tensor(f"your mask for {what}", call(fn, mask.clone(), what=f" ({what})"))
        if got.dtype != torch.bool and not got.is_floating_point():
            raise CheckFailure(f"for {what}: your mask has dtype {got.dtype}; SDPA takes a boolean mask (True = may "
                               f"attend) or a float mask that it ADDS to the scores, not integers. Hint: mask != 0")
        try:
            got_full = got.expand(_SCORES_SHAPE)
        except RuntimeError:
            raise CheckFailure(f"for {what}: your mask has shape {tuple(got.shape)}, which does not broadcast to the "
                               f"scores {_SCORES_SHAPE}; keep the input's shape") from None
        if got.dtype == torch.bool:
            if torch.equal(got_full, allowed):
                continue
            if torch.equal(got_full, ~allowed):
                raise CheckFailure(f"for {what}: the polarity is flipped. In SDPA's boolean mask True = MAY attend, "
                                   f"so True where the 0/1 mask is 1 (mask != 0), not where it is 0.")
            if not got_full.any():
                raise CheckFailure(f"for {what}: your mask forbids every key; True must mark the keys a query may "
                                   f"attend to.")
            wrong = int((got_full != allowed).sum())
            raise CheckFailure(f"for {what}: {wrong} of {allowed.numel()} entries differ from mask != 0.")
        if torch.equal(got_full.to(torch.float64), mask.to(torch.float64).expand(_SCORES_SHAPE)):
            raise CheckFailure(f"for {what}: this is the article's bug. A float mask is ADDED to the scores, so 0/1 "
                               f"shifts the allowed keys by +1 and masks nothing. Return a boolean mask (mask != 0) "
                               f"or an additive one (0 where allowed, -inf elsewhere).")
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=got_full.to(torch.float64))
        if not torch.allclose(out, expected, atol=1e-12, rtol=0):
            err = float((out - expected).abs().max())
            raise CheckFailure(f"for {what}: with your additive mask the attention output differs from attending "
                               f"where mask != 0 (by up to {err:.3g}). Hint: 0 where the 0/1 mask is 1, -inf where "
                               f"it is 0.")
    return "3 masks (float padding, float causal, int64): SDPA attends exactly where the 0/1 mask is 1"


# ----------------------------------------------------------------------------- cost against the head count
@checker
def check_heads_cost(fn):
    """Check the forward cost of one self-attention layer against its number of heads.

    Your function: `fn(B, T, d_model, H) -> (flops, score_entries)`: flops = the forward FLOPs of the four
    d_model x d_model projections and the two attention products (a multiply-add counts 2), score_entries =
    the number of entries of the attention weights (B, H, T, T). Checks five (B, T, d_model, H); names FLOPs
    that grow with H (source article 003's claim), missing projections, one FLOP per multiply-add, d_head in place of
    d_model, and weights without the head axis.
    """
    cases = [(1, 4, 8, 1), (2, 128, 256, 4), (2, 128, 256, 64), (3, 10, 12, 3), (8, 512, 768, 12)]
    for B, T, d, H in cases:
        what = f"B={B}, T={T}, d_model={d}, H={H}"
        flops, entries = unpack(call(fn, B, T, d, H, what=f" ({what})"), 2,
                                "return a tuple (flops, score_entries) of two numbers", case=what)
        flops, entries = as_number(f"flops for {what}", flops), as_number(f"score_entries for {what}", entries)
        expected_flops, expected_entries = module_flops(B, T, d, H, pass_="fwd"), float(B * H * T * T)
        projections, core = 8.0 * B * T * d * d, 4.0 * B * T * T * d
        if not math.isclose(flops, expected_flops, rel_tol=1e-9):
            wrong = [
                (expected_flops * H, "your FLOPs grow with H, as source article 003 says; but each head works on "
                                     "d_model/H features, so H heads of d_head = d_model/H cost what one head of "
                                     "d_model costs"),
                (projections + core * H, "your attention products grow with H: per head they cost 4*T^2*d_head, "
                                         "and H*d_head = d_model"),
                (core, "only the attention products: add the four projections (Q, K, V and the output), "
                       "2*B*T*d_model^2 FLOPs each"),
                (projections, "only the projections: add q k^T and weights @ v, 2*B*T*T*d_model FLOPs each"),
                (expected_flops / 2, "half the count: a multiply-add is 2 FLOPs (a multiply and an add)"),
                (projections + core / H, "d_head in place of d_model in the attention products: there are H heads "
                                         "of d_head each"),
            ]
            for value, message in wrong:
                if math.isclose(flops, value, rel_tol=1e-9):
                    raise CheckFailure(f"{what}: flops = {flops:.6g}, expected {expected_flops:.6g}; {message}.")
            raise CheckFailure(f"{what}: flops = {flops:.6g}, expected {expected_flops:.6g}. Hint: projections "
                               f"4 x 2*B*T*d_model^2, attention 2 x 2*B*T*T*d_model.")
        if not math.isclose(entries, expected_entries, rel_tol=1e-9):
            wrong_entries = [
                (float(B * T * T), "the weights have one (T, T) matrix per head: B*H*T*T entries"),
                (float(B * H * T * T * (d // H)), "that counts d_head too: the weights are (B, H, T, T)"),
            ]
            for value, message in wrong_entries:
                if math.isclose(entries, value, rel_tol=1e-9):
                    raise CheckFailure(f"{what}: score_entries = {entries:.6g}, expected {expected_entries:.6g}; "
                                       f"{message}.")
            raise CheckFailure(f"{what}: score_entries = {entries:.6g}, expected {expected_entries:.6g}. Hint: "
                               f"the attention weights have shape (B, H, T, T).")
    return f"{len(cases)} cases: the FLOPs do not depend on H, the stored weights grow as B*H*T^2"


# ----------------------------------------------------------------------------- source article 004's worked example
@checker
def check_token_output(fn):
    """Check one token's output of single-head self-attention.

    Your function: `fn(x, w_q, w_k, w_v, i) -> out`, with x (T, d_model) float64 numpy, w_q, w_k (d_model,
    d_head), w_v (d_model, d_v) and i a position; out (d_v,): softmax(q_i k^T / sqrt(d_head)) v over ALL T
    tokens, token i included. Checks three inputs; names leaving the token out (source article 004's recipe), no
    scaling, a scale of d_head, the softmax over the queries, the weights returned, and x used as values.
    """
    rng = np.random.default_rng(404)
    cases = [(9, 16, 8, 8, 4), (5, 6, 6, 3, 0), (7, 10, 4, 5, 6)]
    for T, d_model, d_head, d_v, i in cases:
        x = rng.standard_normal((T, d_model))
        w_q, w_k = rng.standard_normal((2, d_model, d_head)) / math.sqrt(d_model) * 2
        w_v = rng.standard_normal((d_model, d_v)) / math.sqrt(d_model)
        q, k, v = x @ w_q, x @ w_k, x @ w_v
        what = f"T={T}, d_model={d_model}, d_head={d_head}, i={i}"
        got = call(fn, x.copy(), w_q.copy(), w_k.copy(), w_v.copy(), i, what=f" ({what})")
        expected = numpy_ref.scaled_dot_product_attention(q, k, v)[0][i]
        got_array = as_array(f"your output for {what}", got)
        if got_array.shape == expected.shape and np.allclose(got_array, expected, atol=1e-10, rtol=1e-8):
            continue
        others = [j for j in range(T) if j != i]
        left_out = numpy_ref.scaled_dot_product_attention(q[i:i + 1], k[others], v[others])[0][0]
        scores = q @ k.T  # (T, T), unscaled
        column_softmax = numpy_ref.softmax(scores / math.sqrt(d_head), axis=0)
        weights_i = numpy_ref.softmax(scores[i] / math.sqrt(d_head))
        mistakes = {
            "you left token i out, as source article 004's worked example does: self-attention scores the token's "
            "own key and sums its own value too": left_out,
            "no scaling: divide the scores by sqrt(d_head)": numpy_ref.softmax(scores[i]) @ v,
            "the scores are divided by d_head; divide by sqrt(d_head)": numpy_ref.softmax(scores[i] / d_head) @ v,
            "the softmax runs over the queries (axis 0); each query's weights must sum to 1 over the keys":
                column_softmax[i] @ v,
            "you returned the attention weights; multiply them by the values v = x @ w_v": weights_i,
            "the values are x itself; use v = x @ w_v": weights_i @ x if d_v == d_model else None,
        }
        message = diagnose(got_array, mistakes)
        if message:
            raise CheckFailure(f"for {what}: {message}.")
        compare(f"your output for {what}", got_array, expected,
                hint="q_i = x[i] @ w_q, k = x @ w_k, v = x @ w_v; weights = softmax(q_i k^T / sqrt(d_head)); "
                     "out = weights @ v")
    return f"{len(cases)} inputs: the token attends to all T tokens, itself included"

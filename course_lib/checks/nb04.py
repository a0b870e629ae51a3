"""Checkers for notebook 04 (multi-head attention).

The learner works in torch, float64, so a correct answer agrees with course_lib to ~1e-15 and
any larger difference is a bug. On a wrong answer the checkers try the classic mistakes
(a view without the transpose, heads interleaved, a missing 1/sqrt(d_head), scaling by
sqrt(d_model), one big head, softmax over queries, no W_O, counting W_Q per head) and say
which one was made.
"""

from __future__ import annotations

import numpy as np
import torch

from course_lib.attention import scaled_dot_product_attention
from course_lib.checks._core import CheckFailure, as_tensor, call, checker, compare, diagnose, is_close

__all__ = ["check_split_heads", "check_merge_heads", "check_mha_forward", "check_mha_param_count"]


# ----------------------------------------------------------------------------- split / merge heads
@checker
def check_split_heads(fn):
    """Check splitting the features into heads.

    Your function: `fn(x, num_heads) -> heads`, with x a (B, T, d_model) tensor and heads
    (B, H, T, d_head), head h holding features h*d_head ... (h+1)*d_head - 1 of every token.
    Checks four shapes (one with H = 1) exactly; names a reshape without the transpose (tokens mixed
    into heads) and interleaved heads.
    """
    cases = [(1, 3, 4, 2), (2, 5, 12, 3), (3, 4, 16, 4), (2, 3, 8, 1)]  # (B, T, d_model, H)
    for B, T, D, H in cases:
        x = torch.arange(B * T * D, dtype=torch.float64).view(B, T, D)  # every entry tells where it came from
        d = D // H
        got = call(fn, x.clone(), H)
        expected = x.view(B, T, H, d).transpose(1, 2)
        as_tensor(f"split_heads(x of shape {(B, T, D)}, {H})", got)
        if tuple(got.shape) == tuple(expected.shape) and not is_close(got, expected):
            mistake = diagnose(got, {
                "you reshaped (B, T, d_model) straight to (B, H, T, d_head): that mixes tokens into heads. View "
                "it as (B, T, H, d_head) first, then .transpose(1, 2)": x.reshape(B, H, T, d),
                "the heads are interleaved: feature j went to head j % H. Head h must hold the CONTIGUOUS block of "
                "features h*d_head ... (h+1)*d_head - 1, so view as (B, T, H, d_head), not (B, T, d_head, H)":
                    x.view(B, T, d, H).permute(0, 3, 1, 2),
            })
            if mistake:
                raise CheckFailure(f"for x of shape {(B, T, D)} and H = {H}: {mistake}.")
        compare(f"split_heads(x of shape {(B, T, D)}, num_heads={H})", got, expected, atol=0, rtol=0,
                hint="x.view(B, T, H, d_model // H).transpose(1, 2) gives (B, H, T, d_head)")
    return "4 shapes (incl. H = 1): every feature lands in the right head, token and position"


@checker
def check_merge_heads(fn):
    """Check concatenating the heads back, the inverse of split_heads.

    Your function: `fn(x) -> merged`, with x a (B, H, T, d_head) tensor and merged (B, T, H * d_head),
    head 0's features first. Checks three shapes exactly; names a reshape without the transpose and
    interleaved heads.
    """
    cases = [(1, 2, 3, 2), (2, 3, 5, 4), (3, 4, 2, 1)]  # (B, H, T, d_head)
    for B, H, T, d in cases:
        x = torch.arange(B * H * T * d, dtype=torch.float64).view(B, H, T, d)
        got = call(fn, x.clone())
        expected = x.transpose(1, 2).reshape(B, T, H * d)
        as_tensor(f"merge_heads(x of shape {(B, H, T, d)})", got)
        if tuple(got.shape) == tuple(expected.shape) and not is_close(got, expected):
            mistake = diagnose(got, {
                "you reshaped (B, H, T, d_head) straight to (B, T, H*d_head): tokens and heads get mixed. "
                ".transpose(1, 2) first (to (B, T, H, d_head)), then .reshape(B, T, H * d_head)":
                    x.reshape(B, T, H * d),
                "the heads are interleaved (feature j from head j % H): concatenate them instead, head 0's "
                "d_head features first": x.permute(0, 2, 3, 1).reshape(B, T, H * d),
            })
            if mistake:
                raise CheckFailure(f"for x of shape {(B, H, T, d)}: {mistake}.")
        compare(f"merge_heads(x of shape {(B, H, T, d)})", got, expected, atol=0, rtol=0,
                hint="x.transpose(1, 2).reshape(B, T, H * d_head); .view fails after a transpose (not contiguous)")
    return "3 shapes: heads concatenated in order, head 0 first"


# ----------------------------------------------------------------------------- the forward pass
def _mha_variant(x, w_q, w_k, w_v, w_o, H, *, scale="d_head", heads=True, softmax_dim=-1, out_proj=True, mask=None):
    B, T, D = x.shape
    h = H if heads else 1
    d = D // h
    q, k, v = (t.view(B, T, h, d).transpose(1, 2) for t in (x @ w_q.T, x @ w_k.T, x @ w_v.T))  # (B, h, T, d)
    factor = {"d_head": d**-0.5, "d_model": D**-0.5, "none": 1.0}[scale]
    scores = q @ k.transpose(-2, -1) * factor  # (B, h, T, T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    heads_out = torch.softmax(scores, dim=softmax_dim) @ v  # (B, h, T, d)
    out = heads_out.transpose(1, 2).reshape(B, T, D)
    return out @ w_o.T if out_proj else out


@checker
def check_mha_forward(fn):
    """Check a multi-head attention forward pass.

    Your function: `fn(x, w_q, w_k, w_v, w_o, num_heads, mask=None) -> out`, with x (B, T, d_model),
    the weights (d_model, d_model) in nn.Linear's layout without biases (q = x @ w_q.T), and a bool
    mask broadcastable to (B, H, T, T), True = may attend; out (B, T, d_model), float64 tensors.
    Checks four cases (H = 1 to 4, one with a causal mask) against course_lib to 1e-10; names a
    missing scale, scaling by sqrt(d_model), a softmax over the queries, a missing W_O, one big head,
    and an ignored mask.
    """
    g = torch.Generator().manual_seed(4)
    cases = [(1, 3, 4, 2, None), (2, 5, 12, 3, None), (2, 6, 16, 4, "causal"), (3, 4, 8, 1, None)]
    for B, T, D, H, mask_kind in cases:
        x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
        w_q, w_k, w_v, w_o = (torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5 for _ in range(4))
        mask = torch.ones(T, T, dtype=torch.bool).tril() if mask_kind else None
        kwargs = {"mask": mask} if mask is not None else {}
        got = call(fn, x.clone(), w_q, w_k, w_v, w_o, H, **kwargs)
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (x @ w_q.T, x @ w_k.T, x @ w_v.T))
        expected = scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D) @ w_o.T
        what = f"B={B}, T={T}, d_model={D}, H={H}{', causal mask' if mask is not None else ''}"
        as_tensor(f"your output ({what})", got)
        if tuple(got.shape) == tuple(expected.shape) and not is_close(got, expected):
            args = (x, w_q, w_k, w_v, w_o, H)
            candidates = {
                "the scores are not scaled: divide q k^T by sqrt(d_head)": _mha_variant(*args, scale="none", mask=mask),
                "you scaled by sqrt(d_model); each head's dot product has d_head terms, so divide by sqrt(d_head) "
                "= sqrt(d_model / H)": _mha_variant(*args, scale="d_model", mask=mask),
                "softmax runs over the queries (dim -2); each query's weights over the keys must sum to 1: "
                "softmax(dim=-1)": _mha_variant(*args, softmax_dim=-2, mask=mask),
                "the output projection W_O is missing: multiply the concatenated heads by w_o.T":
                    _mha_variant(*args, out_proj=False, mask=mask),
            }
            if H > 1:
                candidates["this is ONE head over all d_model features: split q, k, v into H heads of d_head = "
                           "d_model / H features each before the softmax"] = _mha_variant(*args, heads=False,
                                                                                         mask=mask)
            if mask is not None:
                candidates["the mask is ignored (or its polarity flipped?): True = may attend, so fill the scores "
                           "where the mask is False with -inf"] = _mha_variant(*args)
            mistake = diagnose(got, candidates)
            if mistake:
                raise CheckFailure(f"for {what}: {mistake}.")
        compare(f"your output ({what})", got, expected,
                hint="project (x @ w.T), split heads, softmax(q k^T / sqrt(d_head)) v per head, merge, then @ w_o.T")
    return "4 cases (H = 1 to 4, one with a causal mask) equal course_lib to 1e-10 in float64"


# ----------------------------------------------------------------------------- parameter count
def _param_count(d_model, num_heads, bias, kdim, vdim):
    kdim, vdim = kdim or d_model, vdim or d_model
    weights = d_model * d_model + kdim * d_model + vdim * d_model + d_model * d_model
    return weights + (4 * d_model if bias else 0)


@checker
def check_mha_param_count(fn):
    """Check a count of the parameters of one multi-head attention layer.

    Your function: `fn(d_model, num_heads, bias=True, kdim=None, vdim=None) -> int`, the number of
    parameters of MultiHeadAttention(d_model, num_heads, bias=bias, kdim=kdim, vdim=vdim). Checks five
    configurations; names a count that grows with num_heads, missing biases, a missing W_O, and
    ignoring kdim and vdim.
    """
    cases = [(512, 8, True, None, None), (768, 12, True, None, None), (384, 12, False, None, None),
             (64, 4, True, 32, 48), (64, 1, True, None, None)]
    for D, H, bias, kdim, vdim in cases:
        got = call(fn, D, H, bias=bias, kdim=kdim, vdim=vdim)
        expected = _param_count(D, H, bias, kdim, vdim)
        what = f"d_model={D}, num_heads={H}, bias={bias}" + (f", kdim={kdim}, vdim={vdim}" if kdim else "")
        if isinstance(got, (torch.Tensor, np.ndarray)) and np.size(got) == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, (int, np.integer, float)):
            raise CheckFailure(f"for {what}: return a number (an int); got {type(got).__name__}")
        if got == expected:
            continue
        k, v = kdim or D, vdim or D
        mistakes = {
            H * _param_count(D, H, bias, kdim, vdim) - (H - 1) * (D * D + (D if bias else 0)):
                "you gave every head its own full (d_model x d_model) W_Q, W_K, W_V; each head's are d_model x "
                "d_head, so all H heads together are d_model x d_model: the count does not depend on H",
            H * _param_count(D, H, bias, kdim, vdim):
                "you multiplied the whole layer by H; the H heads share the d_model x d_model budget "
                "(d_head = d_model / H), so the count does not depend on H",
            _param_count(D, H, False, kdim, vdim): "the biases are missing: 4 bias vectors of d_model each",
            _param_count(D, H, bias, kdim, vdim) - D * D - (D if bias else 0): "W_O (d_model x d_model + bias) "
                                                                                "is missing",
            _param_count(D, H, bias, None, None) if (k, v) != (D, D) else -1:
                "W_K maps kdim -> d_model and W_V maps vdim -> d_model: use kdim and vdim for their inputs",
        }
        hint = mistakes.get(int(got), "4 projections: W_Q (d_model x d_model), W_K (kdim x d_model), "
                                       "W_V (vdim x d_model), W_O (d_model x d_model), plus 4 biases of d_model")
        raise CheckFailure(f"for {what}: got {got}, expected {expected}. {hint}.")
    return "5 configurations match sum(p.numel() for p in MultiHeadAttention(...).parameters())"

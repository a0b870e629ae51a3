"""Attention over part of the keys, and merging such partial results exactly (the log-sum-exp merge).

Attention of a query over a block of keys gives a *partial* result: the output normalised over
those keys only, and its log-sum-exp lse = log sum_j exp(score_j). Two partials over disjoint keys
merge exactly (`merge_partials`): lse = log(e^lse_a + e^lse_b), out = e^(lse_a - lse) out_a
+ e^(lse_b - lse) out_b. That is notebook 10's online softmax (`numpy_ref.online_softmax_step`)
with the running max and sum folded into one number per row.

One home for both users: ring attention merges the blocks that travel round a ring of devices
(`parallel.ring_attention`, notebook 13), split-KV decoding the chunks of one long cache
(`modern.split_kv`, notebook 14).
"""

from __future__ import annotations

import torch

__all__ = ["block_attention", "merge_partials", "masked_scores", "finite_or_zero"]


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                    compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (..., T, d) over one block of keys k (..., S, d), v (..., S, d_v): (out, lse).

    out (..., T, d_v) is normalised over this block's keys; lse (..., T) = log sum_j exp(score_j)
    (-inf, with out 0, for a row whose keys in this block are all masked). mask: bool (True = may
    attend) or additive float, broadcastable to (..., T, S).

    As in MultiHeadAttention's math path, the scores, the softmax and the product with v are
    computed in float32 at least (float64 stays float64): out comes back in q's dtype, lse stays in
    that float32-or-wider dtype. A float16 lse near 12800 would be off by up to 4 (its spacing there
    is 8), which multiplies exp(score - lse) by up to e^4, and it overflows above 65504.
    compute_dtype: given, the computation runs in it and out stays in it too (an accumulator that
    merges many blocks rounds once, at the end).
    """
    compute = torch.promote_types(q.dtype, torch.float32) if compute_dtype is None else compute_dtype
    scores = masked_scores(q.to(compute), k.to(compute), mask, q.dtype)  # (..., T, S)
    lse = torch.logsumexp(scores, dim=-1)  # (..., T)
    p = torch.exp(scores - finite_or_zero(lse).unsqueeze(-1))  # (..., T, S); rows of -inf give 0
    out = p @ v.to(compute)  # (..., T, d_v)
    return (out if compute_dtype is not None else out.to(q.dtype)), lse


def masked_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, mask_dtype: torch.dtype
                  ) -> torch.Tensor:
    """(q / sqrt(d)) k^T, masked, in q's dtype: -inf where a bool mask is False; an additive mask is
    rounded to the inputs' dtype `mask_dtype` first, as MultiHeadAttention's paths do, then added."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (..., T, S)
    if mask is not None:
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask.to(mask_dtype).to(scores.dtype))
    return scores


def finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (no key seen) replaced by 0: exp(-inf - 0) = 0, where exp(-inf - (-inf)) is NaN."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint sets of keys into the result over both.

    out_* (..., T, d_v) are each normalised over their own keys, lse_* (..., T) their log-sum-exps.
    The merged normaliser is e^lse = e^lse_a + e^lse_b, and each partial output is re-weighted by
    its share of it. Rows that saw no key in either (lse -inf in both) stay 0, not NaN. Computed in
    float32 at least; out comes back in the outs' dtype, lse in float32 at least (see block_attention).
    """
    compute = torch.promote_types(torch.promote_types(lse_a.dtype, lse_b.dtype), torch.float32)
    lse = torch.logaddexp(lse_a.to(compute), lse_b.to(compute))  # (..., T)
    shift = finite_or_zero(lse)
    w_a = torch.exp(lse_a.to(compute) - shift).unsqueeze(-1)  # (..., T, 1): the share of a's keys
    w_b = torch.exp(lse_b.to(compute) - shift).unsqueeze(-1)
    out_dtype = torch.promote_types(out_a.dtype, out_b.dtype)
    return (w_a * out_a + w_b * out_b).to(out_dtype), lse

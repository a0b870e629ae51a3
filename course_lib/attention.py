"""Scaled dot-product attention in torch, with the course's conventions.

Two paths compute the same function:
- the fast path (need_weights=False) calls torch's fused `F.scaled_dot_product_attention`
  (flash / memory-efficient / cuDNN kernels on a GPU, a fused kernel on the CPU);
- the math path (need_weights=True) spells the computation out so the weights can be
  returned; it scales q before the matmul and runs the matmul and softmax in float32 (at
  least), so float16 inputs cannot overflow the scores, and returns the weights in float32.
Both give output 0 for a query row with nothing to attend to, never NaN, in every dtype.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from course_lib._validate import (
    autocast_on,
    check_bool,
    check_mask_shape,
    check_positive_int,
    check_probability,
    check_qkv_shapes,
    shape_str,
)
from course_lib.masks import canonical_mask, causal_mask, check_mask

__all__ = ["scaled_dot_product_attention", "attention_core", "naive_attention", "safe_softmax", "check_attn_mask",
           "repeat_kv", "SDPA_HAS_GQA"]

# torch >= 2.5: F.scaled_dot_product_attention(..., enable_gqa=True) lets H query heads share H_kv key/value heads
SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, S, d) -> (B, H_kv * n_rep, S, d): kv head g serves query heads g*n_rep ... (g+1)*n_rep - 1.

    Grouped-query attention written out: each key/value head repeated for the query heads of its
    group (torch.repeat_interleave, the layout of Hugging Face's repeat_kv and of SDPA's enable_gqa).
    """
    n_rep = check_positive_int("n_rep", n_rep)
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=-3)


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating-point dtype; got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    return check_qkv_shapes(tuple(q.shape), tuple(k.shape), tuple(v.shape))


def check_attn_mask(
    attn_mask: object, scores_shape: tuple[int, ...], device: torch.device, module_ndim: bool = False
) -> torch.Tensor:
    """A bool or additive float mask that broadcasts to the scores (..., T, S), on `device`, without NaN.

    module_ndim: only 2-D or 4-D masks, as MultiHeadAttention takes them (see `masks.check_mask`).
    """
    attn_mask = check_mask("attn_mask", attn_mask, module_ndim=module_ndim)
    check_mask_shape(tuple(attn_mask.shape), scores_shape, name="attn_mask")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but the inputs are on {device}")
    if attn_mask.dtype.is_floating_point and torch.isnan(attn_mask).any():
        raise ValueError("attn_mask (floating-point, additive) contains NaN; use -inf for 'may not attend' "
                         "(or a boolean mask, True = may attend)")
    return attn_mask


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    """The textbook formula, in the input dtype, with no checks and no care: softmax(q k^T / sqrt(d)) v.

    It materialises the (..., T, S) scores and weights, overflows where float16 scores pass 65504,
    and gives NaN for a row with nothing to attend to: the baseline that notebooks 09 and 10 measure
    the fused kernels against, not a function to build on (use `scaled_dot_product_attention`).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., T, S)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], device=q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (..., T, d_v)


def check_causal_lengths(is_causal: bool, T: int, S: int, q_shape: tuple[int, ...], k_shape: tuple[int, ...]) -> None:
    """is_causal needs T == S: with T != S, which query is which position is ambiguous."""
    if is_causal and T != S:
        raise ValueError(
            f"is_causal=True with T={T} queries and S={S} keys is ambiguous (which query is which "
            f"position?); pass attn_mask=course_lib.masks.causal_mask({T}, {S}) (queries are the "
            f"last T positions) instead; query {shape_str(q_shape)}, key {shape_str(k_shape)}"
        )


def safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis; a row that is all -inf gives zeros (not NaN), gradients included.

    A row with a NaN stays NaN (a NaN in the inputs is a bug to see, not to hide); an empty last
    axis (no keys) gives an empty result.
    """
    if scores.shape[-1] == 0:
        return scores
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    total = e.sum(dim=-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))  # e is 0 where total is 0


def _output_dtype(q: torch.Tensor) -> torch.dtype:
    kind = q.device.type
    if q.dtype == torch.float32 and autocast_on(kind):
        return torch.get_autocast_dtype(kind)
    return q.dtype


def _math_attention(q, k, v, mask, dropout_p, enable_gqa=False):
    if enable_gqa:
        n_rep = q.shape[-3] // k.shape[-3]
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # grouped-query: (B, H, S, d)
    out_dtype = _output_dtype(q)
    compute = torch.promote_types(q.dtype, torch.float32)  # float16/bfloat16 -> float32; float64 stays
    no_autocast = (torch.autocast(q.device.type, enabled=False) if torch.amp.is_autocast_available(q.device.type)
                   else contextlib.nullcontext())  # e.g. the meta device, which has no autocast
    with no_autocast:
        scale = q.shape[-1] ** -0.5
        scores = (q.to(compute) * scale) @ k.to(compute).transpose(-2, -1)  # (..., T, S)
        if mask is not None:
            # an additive mask is rounded to the inputs' dtype first, as the fused kernels require:
            # both paths then see the same mask (-1e9 is -inf in float16 on both).
            scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                      else scores + mask.to(q.dtype).to(compute))
        weights = safe_softmax(scores)  # (..., T, S)
        p = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
        out = p @ v.to(compute)  # (..., T, d_v)
    return out.to(out_dtype), weights


def _fused_attention(q, k, v, mask, is_causal, dropout_p, enable_gqa=False):
    gqa: dict[str, Any] = {}
    if enable_gqa and q.shape[-3] != k.shape[-3]:  # grouped-query: fewer kv heads
        if SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}  # the kernel indexes the shared heads, no copy
        else:
            n_rep = q.shape[-3] // k.shape[-3]
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, **gqa)
    # A row with every key masked would make the fused softmax 0/0 = NaN (and NaN gradients).
    # Let such rows attend everywhere inside the kernel, then zero their output: the result is
    # exactly 0 and, because the output is replaced, no gradient flows back through them.
    if mask.dtype == torch.bool:
        row_ok = mask.any(dim=-1, keepdim=True)  # (..., T|1, 1)
        safe = mask | ~row_ok
    else:
        row_ok = (mask > float("-inf")).any(dim=-1, keepdim=True)
        safe = mask.masked_fill(~row_ok, 0.0).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, dropout_p=dropout_p, **gqa)
    return out.masked_fill(~row_ok, 0.0)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    backend: str = "auto",
):
    """softmax(q k^T / sqrt(d) [masked]) v with q (..., T, d), k (..., S, d), v (..., S, d_v).

    attn_mask: bool (True = may attend) or float (added to the scores), broadcastable to
    (..., T, S). is_causal: query i sees keys j <= i; needs T == S (for T != S the alignment
    is ambiguous: pass `course_lib.masks.causal_mask(T, S)` explicitly). Both may be given
    and are combined. Returns out (..., T, d_v), or (out, weights (..., T, S)) if need_weights.
    backend: "auto" (torch's fused kernel, or the math path when need_weights) or "triton"
    (the course's FlashAttention kernel, `course_lib.kernels.flash_attention`: no attn_mask,
    no dropout, no weights; is_causal is supported).
    """
    scores_shape = _check_tensors(q, k, v)
    check_bool("is_causal", is_causal)
    check_bool("need_weights", need_weights)
    dropout_p = check_probability("dropout_p", dropout_p)
    mask = None if attn_mask is None else check_attn_mask(attn_mask, scores_shape, q.device)
    T, S = scores_shape[-2:]
    if backend == "triton":
        if mask is not None or dropout_p > 0 or need_weights:
            raise ValueError(
                "backend='triton' supports is_causal but not attn_mask, dropout_p > 0 or need_weights; "
                f"got attn_mask={'None' if mask is None else shape_str(mask.shape)}, dropout_p={dropout_p}, "
                f"need_weights={need_weights}; use backend='auto' for those"
            )
        from course_lib.kernels import flash_attention  # lazy: triton is optional

        return flash_attention(q, k, v, is_causal=is_causal)
    if backend != "auto":
        raise ValueError(f"backend must be 'auto' or 'triton'; got {backend!r}")
    check_causal_lengths(is_causal, T, S, q.shape, k.shape)
    mask, is_causal = canonical_mask(mask, is_causal, T, S, need_weights=need_weights, device=q.device)
    out, weights = attention_core(q, k, v, mask, is_causal=is_causal, dropout_p=dropout_p, need_weights=need_weights)
    return (out, weights) if need_weights else out


def attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The computation behind `scaled_dot_product_attention`, with no checks: (out, weights or None).

    It trusts its inputs: checked by the caller, and the mask in the canonical form of
    `masks.canonical_mask` (is_causal only with T == S, no mask and no weights: the fused
    kernel's own causal path; otherwise the causal part is already in the mask). enable_gqa:
    k and v (B, H_kv, S, d) have fewer heads than q (B, H, T, d), H_kv dividing H: grouped-query
    attention, each kv head shared by a group of H / H_kv query heads. Calling it with unchecked
    inputs gives torch's errors, or silently broadcast masks: use the public function instead.
    """
    if need_weights:
        return _math_attention(q, k, v, mask, dropout_p, enable_gqa)
    return _fused_attention(q, k, v, mask, is_causal, dropout_p, enable_gqa), None

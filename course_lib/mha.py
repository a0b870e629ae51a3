"""Multi-head attention as a torch module: batch-first, the course's mask convention, a KV cache.

    x (B, T, d_model) --q/k/v projections--> (B, T, d_model) each
      --split heads--> (B, H, T, d_head)  with d_head = d_model / H
      --scaled dot-product attention per head--> (B, H, T, d_head)
      --concat heads--> (B, T, d_model) --out_proj W_O--> (B, T, d_model)

The heads are not a loop: splitting is a view + transpose, and one batched SDPA call runs all
B*H heads at once (torch's fused kernel unless need_weights asks for the weights).

num_kv_heads < num_heads shares key/value heads between query heads: grouped-query attention
(GQA, Llama 3, Mistral), or multi-query attention (MQA) with num_kv_heads = 1. k_proj and v_proj
then map to num_kv_heads * d_head features, and a KV cache holds only those heads: the cache
shrinks by num_heads / num_kv_heads (notebook 12). rotary=RotaryEmbedding(d_head) rotates q and
k by their positions (RoPE), passed in as torchtune passes its positional embedding.

Sliding windows, attention sinks and learned sinks are in course_lib.modern.DecoderAttention,
which reuses this module; the argument checks are in course_lib._mha_checks; the conversions
from torch and Hugging Face modules in course_lib.convert.
"""

from __future__ import annotations

from typing import Self

import torch
from torch import nn

from course_lib import convert
from course_lib._mha_checks import check_forward, check_init
from course_lib._validate import check_positive_int, shape_str
from course_lib.attention import attention_core
from course_lib.kv_cache import KVCache, unchanged_on_error
from course_lib.masks import canonical_mask
from course_lib.positional import RotaryEmbedding

__all__ = ["MultiHeadAttention", "split_heads", "merge_heads"]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H * d_head) -> (B, H, L, d_head): a view and a transpose, no copy."""
    B, L, D = x.shape
    num_heads = check_positive_int("num_heads", num_heads)
    if D % num_heads:
        raise ValueError(f"the last dimension ({D}) of x {shape_str(x.shape)} must be divisible by "
                         f"num_heads={num_heads}")
    return x.view(B, L, num_heads, D // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d_head) -> (B, L, H * d_head): head h fills features h*d_head ... (h+1)*d_head - 1."""
    B, H, L, d_head = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d_head)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017), batch first; True in a boolean mask = may attend.

    d_model: the model width, split into num_heads heads of d_head = d_model / num_heads features.
    dropout: on the attention weights, in training mode. bias: on the four projections.
    kdim, vdim: the features of key and value inputs (cross-attention to another width).
    num_kv_heads: key/value heads (None = num_heads; 1 = MQA; a divisor of num_heads = GQA).
    rotary: a RotaryEmbedding(d_head) that rotates queries and keys by their positions (RoPE).
    Parameters: q_proj, k_proj, v_proj, out_proj (nn.Linear, called as modules: hooks, pruning,
    weight_norm and torch.func.functional_call see them).
    """

    def __init__(self, d_model: int, num_heads: int, *, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, num_kv_heads: int | None = None,
                 rotary: RotaryEmbedding | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        d_model, num_heads, num_kv_heads, d_head, kdim, vdim, dropout = check_init(
            d_model, num_heads, num_kv_heads, kdim, vdim, dropout, rotary, dtype)
        self.d_model, self.num_heads, self.num_kv_heads, self.d_head = d_model, num_heads, num_kv_heads, d_head
        self.kdim, self.vdim, self.dropout, self.rotary = kdim, vdim, dropout, rotary
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(d_model, num_heads * d_head, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim, num_kv_heads * d_head, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim, num_kv_heads * d_head, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * d_head, d_model, bias=bias, **factory)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None, *,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False, need_weights: bool = False,
                cache: KVCache | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """query (B, T, d_model); key (B, S, kdim) defaults to query, value (B, S, vdim) to key.

        So mha(x) is self-attention and mha(x, memory) cross-attention to memory. attn_mask: bool
        (True = may attend) or additive float, (T, S) or (B|1, H|1, T|1, S). is_causal: query i sees
        keys j <= i; with a cache, the T new queries are the last T positions. A query row with
        every key masked gives output 0 before out_proj, and weights 0, never NaN. cache: a KVCache
        that new keys/values are appended to, or, static and filled, the cross-attention memory's.
        Returns out (B, T, d_model), or (out, weights (B, H, T, S), float32 at least) if need_weights.
        """
        key = query if key is None else key
        value = key if value is None else value
        S = self._check(query, key, value, attn_mask, is_causal, need_weights, cache)  # keys, cached ones included
        start = 0 if cache is None or cache.static else cache.next_position  # position of the first new query
        mask, is_causal = self._mask(query, attn_mask, is_causal, S, start, cache, need_weights)  # made once, here
        reuse = cache is not None and cache.static and cache.is_filled  # the memory's keys/values, projected once
        q = split_heads(self.q_proj(query), self.num_heads)  # (B, H, T, d_head)
        k = None if reuse else split_heads(self.k_proj(key), self.num_kv_heads)  # (B, H_kv, S_new, d_head)
        v = None if reuse else split_heads(self.v_proj(value), self.num_kv_heads)  # (B, H_kv, S_new, d_head)
        if self.rotary is not None:  # RoPE: rotate q and k by their positions, before k is cached
            q, k = self.rotary(q, offset=start), self.rotary(k, offset=start)
        with unchanged_on_error(cache):  # a call that fails leaves the cache as it was
            if cache is not None:
                if reuse:  # (B, H_kv, S, d_head), projected on the first call
                    k, v = cache.key, cache.value
                else:
                    assert k is not None and v is not None  # projected above: only `reuse` skips them
                    k, v = cache.update(k, v, source=key)  # (B, H_kv, S, d_head)
            out, weights = self._attend(q, k, v, mask, is_causal, need_weights)  # (B, H, T, d_head), (B, H, T, S)
            out = self.out_proj(merge_heads(out))  # concat heads (B, T, d_model), then W_O
        return out if weights is None else (out, weights)  # weights: only if need_weights

    # The three steps a variant may change (course_lib.modern.DecoderAttention changes all three).
    def _check(self, query, key, value, attn_mask, is_causal, need_weights, cache) -> int:
        """Every argument checked before any arithmetic; -> S, the number of keys, cached ones included."""
        return check_forward(self, query, key, value, attn_mask, is_causal, need_weights, cache)

    def _mask(self, query, attn_mask, is_causal, S, start, cache, need_weights) -> tuple[torch.Tensor | None, bool]:
        """The mask in the one form attention_core consumes (causal folded in unless the kernel does it)."""
        return canonical_mask(attn_mask, is_causal, query.shape[1], S, need_weights=need_weights, device=query.device)

    def _attend(self, q, k, v, mask, is_causal, need_weights) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scaled dot-product attention of every head at once: (B, H, T, d_head), weights or None."""
        return attention_core(q, k, v, mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
                              need_weights=need_weights, enable_gqa=self.num_kv_heads != self.num_heads)

    def extra_repr(self) -> str:
        extra = "" if self.num_kv_heads == self.num_heads else f", num_kv_heads={self.num_kv_heads}"
        return (f"d_model={self.d_model}, num_heads={self.num_heads}{extra}, d_head={self.d_head}, "
                f"dropout={self.dropout}")

    def new_cache(self) -> KVCache:
        """An empty self-attention cache."""
        return KVCache()

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> Self:
        """A copy of an nn.MultiheadAttention (`convert.from_torch`); call it batch-first, with OUR mask polarity."""
        return convert.from_torch(cls, module)

    @classmethod
    def from_hf_bert(cls, attention: nn.Module) -> Self:
        """A copy of a Hugging Face BertAttention, up to its output dense layer (`convert.from_hf_bert`)."""
        return convert.from_hf_bert(cls, attention)

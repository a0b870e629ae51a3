"""The argument checks of MultiHeadAttention, run once at its entrance, before any arithmetic.

Kept apart from mha.py so the module reads as multi-head attention; every message names the
argument, what was expected and what came.
"""

from __future__ import annotations

import torch

from course_lib._validate import autocast_on, check_bool, check_positive_int, check_probability, shape_str
from course_lib.attention import check_attn_mask, check_causal_lengths
from course_lib.kv_cache import KVCache
from course_lib.positional import RotaryEmbedding

__all__ = ["check_init", "check_forward"]


def check_init(d_model: int, num_heads: int, num_kv_heads: int | None, kdim: int | None, vdim: int | None,
               dropout: float, rotary: RotaryEmbedding | None, dtype: torch.dtype | None
               ) -> tuple[int, int, int, int, int, int, float]:
    """-> (d_model, num_heads, num_kv_heads, d_head, kdim, vdim, dropout), every one checked (Python ints)."""
    d_model, num_heads = check_positive_int("d_model", d_model), check_positive_int("num_heads", num_heads)
    if d_model % num_heads:
        raise ValueError(
            f"d_model must be divisible by num_heads so every head gets d_head = d_model / num_heads "
            f"features; got d_model={d_model}, num_heads={num_heads} (remainder {d_model % num_heads})"
        )
    d_head = d_model // num_heads
    num_kv_heads = num_heads if num_kv_heads is None else check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads must divide num_heads (each key/value head serves a group of "
                         f"num_heads / num_kv_heads query heads); got num_heads={num_heads}, "
                         f"num_kv_heads={num_kv_heads}")
    if rotary is not None and (not isinstance(rotary, RotaryEmbedding) or rotary.d_head != d_head):
        raise ValueError(f"rotary must be a course_lib.positional.RotaryEmbedding(d_head={d_head}); got {rotary!r}")
    kdim = d_model if kdim is None else check_positive_int("kdim", kdim)
    vdim = d_model if vdim is None else check_positive_int("vdim", vdim)
    dropout = check_probability("dropout", dropout)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (or None for the default); got {dtype!r}")
    return d_model, num_heads, num_kv_heads, d_head, kdim, vdim, dropout


def _check_tensors(module, query, key, value) -> None:
    q_proj = module._modules["q_proj"]  # module.q_proj.weight without nn.Module's slow getattr (once per token)...
    weight = q_proj._parameters.get("weight")
    if weight is None:  # ...unless pruning or weight_norm made the weight a computed attribute
        weight = q_proj.weight
    if (key is query and value is query and isinstance(query, torch.Tensor) and query.ndim == 3
            and query.shape[-1] == module.d_model == module.kdim == module.vdim and query.device == weight.device
            and (query.dtype == weight.dtype or autocast_on(query.device.type))):
        return  # self-attention with a good input: one test per call (decoding calls this per token)
    dims = {"query": ("d_model", module.d_model), "key": ("kdim", module.kdim), "value": ("vdim", module.vdim)}
    same = key is query and value is query and module.kdim == module.vdim == module.d_model  # self-attention
    inputs = (("query", query),) if same else (("query", query), ("key", key), ("value", value))
    for name, t in inputs:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        feat_name, feat = dims[name]
        if t.ndim != 3 or t.shape[-1] != feat:
            raise ValueError(f"{name} must have shape (B, L, {feat}) (batch first, last dim = {feat_name}={feat}); "
                             f"got {shape_str(t.shape)}")
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        raise ValueError(f"query, key and value must share the batch size B; got query {shape_str(query.shape)}, "
                         f"key {shape_str(key.shape)}, value {shape_str(value.shape)}")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key and value must have the same length S; got key {shape_str(key.shape)}, "
                         f"value {shape_str(value.shape)}")
    for name, t in inputs:
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but the module's weights are on {weight.device}; "
                             f"move one of them (module.to(device) or {name}.to(device))")
        if t.dtype != weight.dtype and not autocast_on(t.device.type):
            raise TypeError(f"{name} has dtype {t.dtype} but the module's weights are {weight.dtype}; "
                            f"convert one, or run under torch.autocast for mixed precision")


def _same_memory(key: torch.Tensor, source: torch.Tensor | None) -> bool:
    """Is key the memory a static cache was filled from: the same tensor, or one equal to it?"""
    if source is None or key is source:
        return True
    return key.shape == source.shape and key.dtype == source.dtype and bool(torch.equal(key, source))


def _check_cache(module, query, key, cache: object) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a course_lib.KVCache; got {type(cache).__name__}")
    if cache.window is not None:  # a windowed cache has evicted keys: only a module with that window may use it
        window, sinks = getattr(module, "window", None), getattr(module, "sink_tokens", 0)  # DecoderAttention's
        if window is None or cache.window < window or cache.sink_tokens < sinks:
            raise ValueError(f"this cache keeps only window={cache.window}, sink_tokens={cache.sink_tokens} "
                             f"positions but the module attends to window={window}, sink_tokens={sinks}; "
                             f"use module.new_cache()")
    if cache.static and key is query:
        raise ValueError("a static KVCache holds cross-attention memory; self-attention needs a growing "
                         "KVCache() (static=False)")
    if cache.static and cache.is_filled and (key.shape[1] != len(cache) or not _same_memory(key, cache.source)):
        raise ValueError(f"this static KVCache was filled from another memory (length {len(cache)}); "
                         f"got key {shape_str(key.shape)}: use a new KVCache(static=True) per memory")
    if cache.key is not None:  # filled
        expected = (query.shape[0], module.num_kv_heads, module.d_head)
        got = (cache.key.shape[0], cache.key.shape[1], cache.key.shape[-1])
        if got != expected:
            raise ValueError(f"cache holds keys {shape_str(cache.key.shape)} (B, H_kv, S, d_head) but this "
                             f"call needs B={expected[0]}, H_kv={expected[1]}, d_head={expected[2]}")


def check_forward(module, query, key, value, attn_mask, is_causal, need_weights, cache) -> int:
    """Every argument of MultiHeadAttention.forward; -> S, the number of keys, cached ones included."""
    check_bool("is_causal", is_causal)
    check_bool("need_weights", need_weights)
    _check_tensors(module, query, key, value)
    if module.rotary is not None and key is not query:
        raise ValueError("this module has rotary positions, which apply to self-attention; call it with one "
                         "sequence (mha(x)), not with separate key/value")
    B, T, S = query.shape[0], query.shape[1], key.shape[1]
    if cache is None or cache.static:  # causal against a memory: T queries, S memory keys
        check_causal_lengths(is_causal, T, S, query.shape, key.shape)
    if cache is not None:
        _check_cache(module, query, key, cache)
        S = len(cache) if cache.static and cache.is_filled else len(cache) + S
    if attn_mask is not None:
        check_attn_mask(attn_mask, (B, module.num_heads, T, S), query.device, module_ndim=True)
    return S

"""Transformer layers built from course_lib.MultiHeadAttention: FFN, encoder layer, decoder layer.

Each sublayer (attention or feed-forward) is wrapped in a residual connection and a LayerNorm,
in one of two places:

    post-LN (Vaswani et al. 2017):  x = LayerNorm(x + Dropout(sublayer(x)))
    pre-LN  (GPT-2 and most models since):  x = x + Dropout(sublayer(LayerNorm(x)))

Pre-LN keeps an identity path from the output back to the input of the whole stack, so
gradients reach the first layers undiminished; a pre-LN stack needs one final LayerNorm after
its last layer (the model adds it). Notebook 06 measures the difference in gradient norms.
"""

from __future__ import annotations

import torch
from torch import nn

from course_lib._validate import autocast_on, check_positive_int, check_probability, shape_str
from course_lib.kv_cache import KVCache, unchanged_on_error
from course_lib.mha import MultiHeadAttention
from course_lib.positional import RotaryEmbedding

__all__ = ["FeedForward", "EncoderLayer", "DecoderLayer"]


class FeedForward(nn.Module):
    """Position-wise FFN: Linear(d_model, d_ff) -> ReLU -> Dropout -> Linear(d_ff, d_model).

    Applied to every position independently: it mixes features, never positions.
    """

    def __init__(self, d_model: int, d_ff: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("d_ff", d_ff)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(check_probability("dropout", dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(torch.relu(self.linear1(x))))  # (B, T, d_ff) -> (B, T, d_model)


class _Residual(nn.Module):
    """x + Dropout(f(LN(x))) when norm_first, else LN(x + Dropout(f(x)))."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: torch.Tensor, sublayer) -> tuple[torch.Tensor, object]:
        """sublayer(h) returns (out, extra); returns (new x, extra)."""
        if self.norm_first:
            out, extra = sublayer(self.norm(x))
            return x + self.dropout(out), extra
        out, extra = sublayer(x)
        return self.norm(x + self.dropout(out)), extra


def _pair(attn: MultiHeadAttention, *args, need_weights: bool, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """attn(...) as the pair (out, weights or None) whatever need_weights: what _Residual passes on."""
    result = attn(*args, need_weights=need_weights, **kwargs)
    return result if need_weights else (result, None)


def _check_norm_first(norm_first: object) -> bool:
    if not isinstance(norm_first, bool):
        raise TypeError(f"norm_first must be a bool (True = pre-LN, False = post-LN); got {norm_first!r}")
    return norm_first


def _check_sequence(name: str, x: object, attn: MultiHeadAttention) -> None:
    """x (B, L, d_model) in the layer's dtype (or under autocast) and on its device: before the first LayerNorm."""
    d_model, weight = attn.d_model, attn.q_proj.weight
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{name} must have shape (B, L, d_model={d_model}); got {shape_str(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but the layer's weights are on {weight.device}")
    if x.dtype != weight.dtype and not autocast_on(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but the layer's weights are {weight.dtype}; convert one, "
                        f"or run under torch.autocast for mixed precision")


class EncoderLayer(nn.Module):
    """Self-attention + FFN, each with a residual and a LayerNorm (pre-LN by default).

    forward(x (B, S, d_model), attn_mask=None) -> (B, S, d_model); with need_weights=True,
    also the attention weights (B, H, S, S). attn_mask is typically the source padding mask
    course_lib.masks.padding_mask(lengths, S), (B, 1, 1, S), True = real token.
    rotary=RotaryEmbedding(d_head) rotates the self-attention's queries and keys by their positions (RoPE).
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, dropout: float = 0.0,
                 norm_first: bool = True, rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.norm_first = _check_norm_first(norm_first)
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout, rotary=rotary)
        self.ff = FeedForward(d_model, d_ff, dropout=dropout)
        self.attn_block = _Residual(d_model, dropout, norm_first)
        self.ff_block = _Residual(d_model, dropout, norm_first)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x, weights = self.run(x, attn_mask, need_weights=need_weights)
        return x if weights is None else (x, weights)  # weights: only if need_weights

    def run(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
            need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward`, always returning the pair (x (B, S, d_model), weights (B, H, S, S) or None)."""
        _check_sequence("x", x, self.self_attn)
        x, weights = self.attn_block(
            x, lambda h: _pair(self.self_attn, h, attn_mask=attn_mask, need_weights=need_weights))  # (B, S, d_model)
        x, _ = self.ff_block(x, lambda h: (self.ff(h), None))
        return x, weights


class DecoderLayer(nn.Module):
    """Masked (causal) self-attention, cross-attention to the encoder memory, FFN.

    forward(x (B, T, d_model), memory (B, S, d_model), *, memory_mask=None, tgt_mask=None,
            self_cache=None, cross_cache=None, need_weights=False)
    -> x (B, T, d_model), or (x, self_weights (B, H, T, T'), cross_weights (B, H, T, S)).

    Incremental decoding: pass self_cache=KVCache() and cross_cache=KVCache(static=True) and
    feed one new token at a time; the self cache grows by one position per call, the cross
    cache holds the memory's keys/values, projected once on the first call.
    rotary=RotaryEmbedding(d_head) rotates the queries and keys of the self-attention only: the
    cross-attention compares target with source positions, which RoPE's m - n does not relate.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, dropout: float = 0.0,
                 norm_first: bool = True, rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.norm_first = _check_norm_first(norm_first)
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout, rotary=rotary)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout)
        self.ff = FeedForward(d_model, d_ff, dropout=dropout)
        self.self_block = _Residual(d_model, dropout, norm_first)
        self.cross_block = _Residual(d_model, dropout, norm_first)
        self.ff_block = _Residual(d_model, dropout, norm_first)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, *, memory_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None, self_cache: KVCache | None = None,
                cross_cache: KVCache | None = None,
                need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, self_weights, cross_weights = self.run(x, memory, memory_mask=memory_mask, tgt_mask=tgt_mask,
                                                  self_cache=self_cache, cross_cache=cross_cache,
                                                  need_weights=need_weights)
        if self_weights is None or cross_weights is None:  # need_weights=False
            return x
        return x, self_weights, cross_weights

    def run(self, x: torch.Tensor, memory: torch.Tensor, *, memory_mask: torch.Tensor | None = None,
            tgt_mask: torch.Tensor | None = None, self_cache: KVCache | None = None,
            cross_cache: KVCache | None = None,
            need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`forward`, always returning (x (B, T, d_model), self weights or None, cross weights or None)."""
        _check_sequence("x", x, self.self_attn)
        _check_sequence("memory", memory, self.self_attn)
        if cross_cache is not None and not cross_cache.static:
            raise ValueError("cross_cache must be a KVCache(static=True): the memory is projected once, not appended")
        if self_cache is not None and self_cache.static:
            raise ValueError("self_cache must be a growing KVCache() (static=False): each new token is appended")
        with unchanged_on_error(self_cache, cross_cache):  # e.g. a bad memory_mask after the self-attention step
            x, self_weights = self.self_block(x, lambda h: _pair(self.self_attn,  # (B, T, d_model)
                h, attn_mask=tgt_mask, is_causal=True, need_weights=need_weights, cache=self_cache))
            x, cross_weights = self.cross_block(x, lambda h: _pair(self.cross_attn,  # (B, T, d_model)
                h, memory, memory, attn_mask=memory_mask, need_weights=need_weights, cache=cross_cache))
        x, _ = self.ff_block(x, lambda h: (self.ff(h), None))
        return x, self_weights, cross_weights

"""The causal self-attention of today's decoders: MultiHeadAttention plus windows and sinks.

window=W lets each query see only the last W positions, itself included (Longformer, Mistral);
sink_tokens=s also the first s (StreamingLLM's attention sinks), and `new_cache()` gives a KV
cache that keeps only those; learned_sink=True adds gpt-oss's per-head sink logit, a column of the
softmax that takes weight and gives nothing back. Everything else is MultiHeadAttention's: this
module changes only its three steps (the checks, the mask, the attention core).
"""

from __future__ import annotations

from typing import Self

import torch
from torch import nn

from course_lib._validate import check_bool, check_nonnegative_int, check_positive_int
from course_lib.attention import attention_core
from course_lib.kv_cache import KVCache
from course_lib.masks import canonical_mask, position_mask, to_additive_mask
from course_lib.mha import MultiHeadAttention
from course_lib.modern import convert

__all__ = ["DecoderAttention"]


class DecoderAttention(MultiHeadAttention):
    """MultiHeadAttention for causal self-attention with a sliding window, sink tokens or learned sinks.

    window: each query sees the last `window` positions (None: all of them); needs is_causal=True.
    sink_tokens: with a window, the first positions stay visible too. learned_sink: one trainable
    logit per head (`sink_logits`, zero at the start) joins every row of scores.
    The other arguments are MultiHeadAttention's.
    """

    def __init__(self, d_model: int, num_heads: int, *, window: int | None = None, sink_tokens: int = 0,
                 learned_sink: bool = False, **kwargs) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        self.window = None if window is None else check_positive_int("window", window)
        self.sink_tokens = check_nonnegative_int("sink_tokens", sink_tokens)
        if sink_tokens and window is None:
            raise ValueError("sink_tokens needs a window: without one every token is visible anyway")
        check_bool("learned_sink", learned_sink)
        weight = self.q_proj.weight  # gpt-oss: one logit per head, zero at the start (softmax over S + 1)
        self.sink_logits = nn.Parameter(torch.zeros(num_heads, device=weight.device, dtype=weight.dtype)) \
            if learned_sink else None

    def extra_repr(self) -> str:
        extra = "" if self.window is None else f", window={self.window}, sink_tokens={self.sink_tokens}"
        return super().extra_repr() + extra + ("" if self.sink_logits is None else ", learned_sink=True")

    def new_cache(self) -> KVCache:
        """An empty cache that keeps what this module can attend to (only the window and sinks, if any)."""
        return KVCache(window=self.window, sink_tokens=self.sink_tokens)

    def _check(self, query, key, value, attn_mask, is_causal, need_weights, cache) -> int:
        S = super()._check(query, key, value, attn_mask, is_causal, need_weights, cache)
        if self.window is not None and key is not query:
            raise ValueError("this module has a window, which applies to self-attention; call it with one "
                             "sequence (mha(x)), not with separate key/value")
        if self.window is not None and not is_causal:
            raise ValueError(f"window={self.window} is a causal sliding window: pass is_causal=True")
        return S

    def _mask(self, query, attn_mask, is_causal, S, start, cache, need_weights) -> tuple[torch.Tensor | None, bool]:
        """A window: causal and windowed from positions (a windowed cache has evicted the oldest keys)."""
        T, device = query.shape[1], query.device
        if self.window is None:  # (a windowed cache was refused for this module by the checks)
            # a learned sink runs on the math path, which takes the causal part as a mask
            return canonical_mask(attn_mask, is_causal, T, S, device=device,
                                  need_weights=need_weights or self.sink_logits is not None)
        new = torch.arange(start, start + T, device=device)  # (T,) the new tokens' positions
        k_pos = new if cache is None else torch.cat([cache.key_positions(device=device), new])  # (S,)
        allowed = position_mask(new, k_pos, window=self.window, sink_tokens=self.sink_tokens)  # (T, S)
        return canonical_mask(attn_mask, is_causal, T, S, allowed=allowed)

    def _attend(self, q, k, v, mask, is_causal, need_weights) -> tuple[torch.Tensor, torch.Tensor | None]:
        """gpt-oss: softmax over [scores, sink_h], then drop the sink column.

        The sink is a key of zeros (score 0) with a value of zeros, whose additive mask entry is the
        head's logit: one more column of the softmax that takes weight and adds nothing to the output.
        Runs on the math path, so the logits get gradients.
        """
        if self.sink_logits is None:
            return super()._attend(q, k, v, mask, is_causal, need_weights)
        B, H, T, d_head = q.shape
        S = k.shape[-2]
        compute = torch.promote_types(q.dtype, torch.float32)
        if mask is None:
            add = q.new_zeros((1, 1, T, S), dtype=compute)
        else:
            add = to_additive_mask(mask, compute) if mask.dtype == torch.bool else mask.to(compute)
        add = add.reshape((1,) * (4 - add.ndim) + tuple(add.shape)).expand(B, H, T, S)  # (B, H, T, S)
        sink = self.sink_logits.to(compute).view(1, H, 1, 1).expand(B, H, T, 1)
        zeros = k.new_zeros(B, k.shape[1], 1, d_head)  # (B, H_kv, 1, d_head)
        k, v = torch.cat([k, zeros], dim=-2), torch.cat([v, zeros.new_zeros(B, v.shape[1], 1, v.shape[-1])], dim=-2)
        out, weights = attention_core(q, k, v, torch.cat([add, sink], dim=-1), need_weights=True,
                                      dropout_p=self.dropout if self.training else 0.0,
                                      enable_gqa=self.num_kv_heads != self.num_heads)
        assert weights is not None  # need_weights=True: the math path, which returns them
        return out, weights[..., :S] if need_weights else None  # the sink's weight is what is missing

    @classmethod
    def from_module(cls, module: MultiHeadAttention, *, window: int | None = None,
                    sink_tokens: int = 0) -> DecoderAttention:
        """A copy of a MultiHeadAttention (its weights, rotary and mode) that attends within a window."""
        if not isinstance(module, MultiHeadAttention) or isinstance(module, DecoderAttention):
            raise TypeError(f"module must be a course_lib.MultiHeadAttention; got {type(module).__name__}")
        weight = module.q_proj.weight
        new = cls(module.d_model, module.num_heads, window=window, sink_tokens=sink_tokens,
                  num_kv_heads=module.num_kv_heads, bias=module.q_proj.bias is not None, dropout=module.dropout,
                  kdim=module.kdim, vdim=module.vdim, rotary=module.rotary, device=weight.device, dtype=weight.dtype)
        new.load_state_dict(module.state_dict())
        return new.train(module.training)

    @classmethod
    def from_hf(cls, attention: nn.Module) -> Self:
        """A copy of a Hugging Face Llama, Mistral or gpt-oss attention (`convert.from_hf_decoder_attention`)."""
        return convert.from_hf_decoder_attention(cls, attention)

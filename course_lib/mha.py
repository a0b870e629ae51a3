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
shrinks by num_heads / num_kv_heads (notebook 12).

The other changes of today's decoder attention are options too, off by default:
rotary=RotaryEmbedding(d_head) rotates q and k by their positions (RoPE; the position of a new
token is the number the cache has seen); window=W lets causal self-attention see only the last W
positions (Mistral), sink_tokens=s also the first s (StreamingLLM), and `new_cache()` gives a
KV cache that keeps only those; learned_sink=True adds gpt-oss's per-head sink logit, a column
of the softmax that takes weight and gives nothing back.

Every argument is checked before the first matmul (and before a KV cache is touched), so a
wrong shape, dtype, device or mask gets a message naming it instead of a failure deep inside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from course_lib._validate import (
    autocast_on,
    check_bool,
    check_nonnegative_int,
    check_positive_int,
    check_probability,
    shape_str,
)
from course_lib.attention import attention_core, check_attn_mask, check_causal_lengths
from course_lib.kv_cache import KVCache, unchanged_on_error
from course_lib.masks import position_mask, restrict_mask, to_additive_mask, with_causal
from course_lib.positional import RotaryEmbedding

__all__ = ["MultiHeadAttention", "split_heads", "merge_heads"]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H * d_head) -> (B, H, L, d_head): a view and a transpose, no copy."""
    B, L, D = x.shape
    if D % num_heads:
        raise ValueError(f"the last dimension ({D}) of x {shape_str(x.shape)} must be divisible by "
                         f"num_heads={num_heads}")
    return x.view(B, L, num_heads, D // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d_head) -> (B, L, H * d_head): head h fills features h*d_head ... (h+1)*d_head - 1."""
    B, H, L, d_head = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d_head)


def _same_memory(key: torch.Tensor, source: torch.Tensor | None) -> bool:
    """Is key the memory a static cache was filled from: the same tensor, or one equal to it?"""
    if source is None or key is source:
        return True
    return key.shape == source.shape and key.dtype == source.dtype and bool(torch.equal(key, source))


class MultiHeadAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        num_kv_heads: int | None = None,
        rotary: RotaryEmbedding | None = None,
        window: int | None = None,
        sink_tokens: int = 0,
        learned_sink: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("num_heads", num_heads)
        if d_model % num_heads:
            raise ValueError(
                f"d_model must be divisible by num_heads so every head gets d_head = d_model / num_heads "
                f"features; got d_model={d_model}, num_heads={num_heads} (remainder {d_model % num_heads})"
            )
        num_kv_heads = num_heads if num_kv_heads is None else check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads (each key/value head serves a group of "
                             f"num_heads / num_kv_heads query heads); got num_heads={num_heads}, "
                             f"num_kv_heads={num_kv_heads}")
        self.d_model, self.num_heads, self.d_head = d_model, num_heads, d_model // num_heads
        self.num_kv_heads = num_kv_heads
        d_kv = num_kv_heads * self.d_head  # = d_model for MHA
        if rotary is not None and (not isinstance(rotary, RotaryEmbedding) or rotary.d_head != self.d_head):
            raise ValueError(f"rotary must be a course_lib.positional.RotaryEmbedding(d_head={self.d_head}); got "
                             f"{rotary!r}")
        self.rotary = rotary
        self.window = None if window is None else check_positive_int("window", window)
        check_nonnegative_int("sink_tokens", sink_tokens)
        if sink_tokens and window is None:
            raise ValueError("sink_tokens needs a window: without one every token is visible anyway")
        self.sink_tokens = sink_tokens
        check_bool("learned_sink", learned_sink)
        self.kdim = d_model if kdim is None else check_positive_int("kdim", kdim)
        self.vdim = d_model if vdim is None else check_positive_int("vdim", vdim)
        self.dropout = check_probability("dropout", dropout)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype (or None for the default); got {dtype!r}")
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, d_kv, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, d_kv, bias=bias, **factory)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        # gpt-oss: one logit per head that joins every row of scores; zero at the start (softmax over S + 1)
        self.sink_logits = nn.Parameter(torch.zeros(num_heads, **factory)) if learned_sink else None

    def extra_repr(self) -> str:
        extra = "" if self.num_kv_heads == self.num_heads else f", num_kv_heads={self.num_kv_heads}"
        extra += "" if self.window is None else f", window={self.window}, sink_tokens={self.sink_tokens}"
        extra += "" if self.sink_logits is None else ", learned_sink=True"
        return (f"d_model={self.d_model}, num_heads={self.num_heads}{extra}, d_head={self.d_head}, "
                f"dropout={self.dropout}")

    def new_cache(self) -> KVCache:
        """An empty self-attention cache that keeps what this module can attend to (only the window, if any)."""
        return KVCache(window=self.window, sink_tokens=self.sink_tokens)

    # ----------------------------------------------------------------------------- helpers
    def _fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (3D, D) weight and (3D,) bias of the three projections, stacked.

        With gradients on, the stacking is part of the graph (its backward splits the gradient
        back into the three weights), so it is redone each call. Without gradients (inference,
        decoding token by token, where a call is short and this copy would be a visible part of
        it) it is computed once and reused until a weight changes: moved, replaced or updated in
        place (tensor._version counts in-place writes).
        """
        mods = self._modules  # plain dict lookups: nn.Module.__getattr__ is slow, and decoding calls this per token
        names = ("q_proj", "k_proj", "v_proj")
        params = [mods[name]._parameters[kind] for kind in ("weight", "bias") for name in names]
        if params[3] is None:
            params = params[:3]
        def stack() -> tuple[torch.Tensor, torch.Tensor | None]:
            return torch.cat(params[:3]), None if len(params) == 3 else torch.cat(params[3:])

        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return stack()
        key = [p.data_ptr() for p in params] + [p._version for p in params]  # moved or written in place
        cached = self.__dict__.get("_qkv_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                fused = stack()
            self.__dict__["_qkv_cache"] = cached = (key, fused)  # not a buffer: never saved in state_dict
        return cached[1]

    def _project_self(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused QKV: one (D + 2 D_kv, D) matmul instead of three when q = k = v = x (D_kv = D for MHA)."""
        weight, bias = self._fused_qkv()  # (D + 2 D_kv, D), (D + 2 D_kv,) or None
        d_kv = self.num_kv_heads * self.d_head
        return F.linear(x, weight, bias).split([self.d_model, d_kv, d_kv], dim=-1)  # (B, T, D), 2 x (B, T, D_kv)

    def _check_inputs(self, query, key, value, attn_mask, is_causal, need_weights, cache) -> tuple[int, int, int]:
        """Validate everything before any arithmetic; return (B, T, S) with S counting cached keys."""
        check_bool("is_causal", is_causal)
        check_bool("need_weights", need_weights)
        dims = {"query": ("d_model", self.d_model), "key": ("kdim", self.kdim), "value": ("vdim", self.vdim)}
        same = key is query and value is query and self.kdim == self.vdim == self.d_model  # self-attention
        inputs = (("query", query),) if same else (("query", query), ("key", key), ("value", value))
        for name, t in inputs:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
            feat_name, feat = dims[name]
            if t.ndim != 3 or t.shape[-1] != feat:
                raise ValueError(
                    f"{name} must have shape (B, L, {feat}) (batch first, last dim = {feat_name}={feat}); "
                    f"got {shape_str(t.shape)}"
                )
        if not query.shape[0] == key.shape[0] == value.shape[0]:
            raise ValueError(
                f"query, key and value must share the batch size B; got query {shape_str(query.shape)}, "
                f"key {shape_str(key.shape)}, value {shape_str(value.shape)}"
            )
        if key.shape[1] != value.shape[1]:
            raise ValueError(f"key and value must have the same length S; got key {shape_str(key.shape)}, "
                             f"value {shape_str(value.shape)}")
        weight = self.q_proj.weight
        for name, t in inputs:
            if t.device != weight.device:
                raise ValueError(f"{name} is on {t.device} but the module's weights are on {weight.device}; "
                                 f"move one of them (module.to(device) or {name}.to(device))")
            if t.dtype != weight.dtype and not autocast_on(t.device.type):
                raise TypeError(f"{name} has dtype {t.dtype} but the module's weights are {weight.dtype}; "
                                f"convert one, or run under torch.autocast for mixed precision")
        B, T, S = query.shape[0], query.shape[1], key.shape[1]
        if (self.rotary is not None or self.window is not None) and key is not query:
            raise ValueError("this module has rotary positions or a window, which apply to self-attention; "
                             "call it with one sequence (mha(x)), not with separate key/value")
        if self.window is not None and not is_causal:
            raise ValueError(f"window={self.window} is a causal sliding window: pass is_causal=True")
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a course_lib.KVCache; got {type(cache).__name__}")
            if cache.window is not None and (self.window is None or cache.window < self.window
                                             or cache.sink_tokens < self.sink_tokens):
                raise ValueError(f"this cache keeps only window={cache.window}, sink_tokens={cache.sink_tokens} "
                                 f"positions but the module attends to window={self.window}, sink_tokens="
                                 f"{self.sink_tokens}; use module.new_cache()")
            if cache.static and key is query:
                raise ValueError("a static KVCache holds cross-attention memory; self-attention needs a growing "
                                 "KVCache() (static=False)")
            if cache.static and cache.is_filled and (key.shape[1] != len(cache) or not _same_memory(key, cache.source)):
                raise ValueError(f"this static KVCache was filled from another memory (length {len(cache)}); "
                                 f"got key {shape_str(key.shape)}: use a new KVCache(static=True) per memory")
            if cache.is_filled:
                expected = (B, self.num_kv_heads, self.d_head)
                got = (cache.key.shape[0], cache.key.shape[1], cache.key.shape[-1])
                if got != expected:
                    raise ValueError(f"cache holds keys {shape_str(cache.key.shape)} (B, H_kv, S, d_head) but this "
                                     f"call needs B={B}, H_kv={self.num_kv_heads}, d_head={self.d_head}")
                S = len(cache) if cache.static else len(cache) + S
        if cache is None:
            check_causal_lengths(is_causal, T, S, query.shape, key.shape)
        if attn_mask is not None:
            check_attn_mask(attn_mask, (B, self.num_heads, T, S), query.device, module_ndim=True)
        return B, T, S

    # ----------------------------------------------------------------------------- forward
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
        cache: KVCache | None = None,
    ):
        """query (B, T, d_model); key (B, S, kdim) defaults to query, value (B, S, vdim) to key.

        So mha(x) is self-attention and mha(x, memory) cross-attention to memory (keys and values
        from the same sequence); pass value only when it differs from key.

        attn_mask: bool (True = may attend) or additive float, (T, S) or (B|1, H|1, T|1, S).
        is_causal: query i sees keys j <= i (T == S), or, with a cache, the T new queries are the
        last T of the S positions. A query row with every key masked gives attention output 0
        (so the module returns out_proj's bias there) and weights 0, never NaN.
        cache: a KVCache; new keys/values are appended (self-attention) or, for a static cache
        that is already filled (cross-attention memory), key/value are not projected again.
        Returns out (B, T, d_model), or (out, weights (B, H, T, S)) if need_weights; the weights are
        float32 (float64 for float64 inputs), whatever the input dtype. `attend` takes the same
        arguments and always returns the pair (out, weights or None).
        """
        out, weights = self._attend(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                    need_weights=need_weights, cache=cache)
        return (out, weights) if need_weights else out

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward`, always returning (out (B, T, d_model), weights (B, H, T, S) or None).

        For code that passes need_weights through (the encoder and decoder layers) and should not
        branch on the type of the result. It calls the module, so forward hooks run as usual.
        """
        result = self(query, key, value, attn_mask=attn_mask, is_causal=is_causal, need_weights=need_weights,
                      cache=cache)
        return result if need_weights else (result, None)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        *,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        need_weights: bool,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The work of forward: validate once, project, attend, merge heads; (out, weights or None)."""
        self_attention = key is None and value is None
        key = query if key is None else key
        value = key if value is None else value
        B, T, S = self._check_inputs(query, key, value, attn_mask, is_causal, need_weights, cache)
        start = 0 if cache is None or cache.static else max(cache.seen, len(cache))  # first new position
        windowed = self.window is not None or (cache is not None and cache.window is not None)
        # The mask is final from here: checked once above, the causal part folded in at most once below.
        if windowed:
            is_causal = False  # the position mask below is causal (and windowed)
        elif is_causal and T != S:
            # with a cache: the T new queries are the last T of S positions (bottom-right aligned).
            # One new query is the last position and sees every key: there is nothing to mask.
            if T > 1 or attn_mask is not None:
                attn_mask = with_causal(attn_mask, T, S, device=query.device)
            is_causal = False

        if self_attention and self.kdim == self.vdim == self.d_model:
            q, k, v = self._project_self(query)  # 3 x (B, T, d_model)
        else:
            q = self.q_proj(query)  # (B, T, d_model)
            k = v = None
            if not (cache is not None and cache.static and cache.is_filled):
                k, v = self.k_proj(key), self.v_proj(value)  # (B, S_new, d_model)
        q = split_heads(q, self.num_heads)  # (B, H, T, d_head)
        k = None if k is None else split_heads(k, self.num_kv_heads)  # (B, H_kv, S_new, d_head)
        v = None if v is None else split_heads(v, self.num_kv_heads)
        if self.rotary is not None:  # RoPE: rotate q and k by their positions, before they are cached
            q, k = self.rotary(q, offset=start), self.rotary(k, offset=start)
        with unchanged_on_error(cache):  # a failed call leaves the cache as it was
            if cache is not None and k is not None:
                k, v = cache.update(k, v)  # (B, H_kv, S, d_head)
                if cache.static:
                    cache.source = key
            elif cache is not None:
                k, v = cache.key, cache.value  # a filled static cache: the memory's keys and values
            if windowed:  # causal + window from positions (a windowed cache has evicted the oldest keys)
                k_pos = (torch.arange(S, device=q.device) if cache is None
                         else cache.key_positions(k.shape[-2], device=q.device))  # (S,)
                q_pos = torch.arange(start, start + T, device=q.device)  # (T,)
                pos = position_mask(q_pos, k_pos, window=self.window, sink_tokens=self.sink_tokens)  # (T, S)
                attn_mask = restrict_mask(attn_mask, pos)
            dropout = self.dropout if self.training else 0.0
            gqa = self.num_kv_heads != self.num_heads
            if self.sink_logits is None:
                out, weights = attention_core(  # no second validation
                    q, k, v, attn_mask, is_causal, dropout, need_weights, enable_gqa=gqa,
                )  # (B, H, T, d_head), (B, H, T, S) or None
            else:
                out, weights = self._attend_with_sink(q, k, v, attn_mask, is_causal, dropout, gqa)
                weights = weights if need_weights else None
            return self.out_proj(merge_heads(out)), weights  # concat heads (B, T, d_model), then W_O

    def _attend_with_sink(self, q, k, v, attn_mask, is_causal, dropout, gqa):
        """gpt-oss: softmax over [scores, sink_h], then drop the sink column.

        The sink is a key of zeros (score 0) with a value of zeros, whose additive mask entry is the
        head's logit: one more column of the softmax that takes weight and adds nothing to the output.
        Runs on the math path, so the logits get gradients.
        """
        B, H, T, d_head = q.shape
        S = k.shape[-2]
        if is_causal:
            attn_mask = with_causal(attn_mask, T, S, device=q.device)
        compute = torch.promote_types(q.dtype, torch.float32)
        if attn_mask is None:
            add = q.new_zeros((1, 1, T, S), dtype=compute)
        else:
            add = to_additive_mask(attn_mask, compute) if attn_mask.dtype == torch.bool else attn_mask.to(compute)
        add = add.reshape((1,) * (4 - add.ndim) + tuple(add.shape)).expand(B, H, T, S)  # (B, H, T, S)
        sink = self.sink_logits.to(compute).view(1, H, 1, 1).expand(B, H, T, 1)
        zeros = k.new_zeros(B, k.shape[1], 1, d_head)  # (B, H_kv, 1, d_head)
        k, v = torch.cat([k, zeros], dim=-2), torch.cat([v, zeros.new_zeros(B, v.shape[1], 1, v.shape[-1])], dim=-2)
        out, weights = attention_core(q, k, v, torch.cat([add, sink], dim=-1), False, dropout, True, enable_gqa=gqa)
        return out, weights[..., :S]  # (B, H, T, d_head), (B, H, T, S): the sink's weight is what is missing

    # ----------------------------------------------------------------------------- conversions
    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> MultiHeadAttention:
        """Copy an nn.MultiheadAttention's weights. Call the result batch-first, with OUR mask polarity."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention; got {type(module).__name__}")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn has no equivalent here")
        w = module.out_proj.weight
        new = cls(module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
                  kdim=module.kdim, vdim=module.vdim, device=w.device, dtype=w.dtype)
        if module._qkv_same_embed_dim:
            wq, wk, wv = module.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
        with torch.no_grad():
            for lin, weight in ((new.q_proj, wq), (new.k_proj, wk), (new.v_proj, wv)):
                lin.weight.copy_(weight)
            new.out_proj.weight.copy_(module.out_proj.weight)
            if module.in_proj_bias is not None:
                for lin, b in zip((new.q_proj, new.k_proj, new.v_proj), module.in_proj_bias.chunk(3), strict=True):
                    lin.bias.copy_(b)
                new.out_proj.bias.copy_(module.out_proj.bias)
        return new.train(module.training)

    @classmethod
    def from_hf_bert(cls, attention: nn.Module) -> MultiHeadAttention:
        """Copy a Hugging Face BertAttention (layer.attention): query/key/value, then output.dense as W_O.

        The result computes BERT's attention up to (and including) the output dense layer, i.e.
        before BERT's dropout + residual + LayerNorm.
        """
        self_attn, output = getattr(attention, "self", None), getattr(attention, "output", None)
        if self_attn is None or output is None or not hasattr(self_attn, "query") or not hasattr(output, "dense"):
            raise TypeError(f"attention must be a BertAttention (with .self.query/key/value and .output.dense); "
                            f"got {type(attention).__name__}")
        d_model, num_heads = self_attn.query.in_features, self_attn.num_attention_heads
        if self_attn.query.out_features != d_model or output.dense.out_features != d_model:
            raise ValueError(f"from_hf_bert expects query and output.dense to map {d_model} -> {d_model} features; got "
                             f"query {self_attn.query.out_features}, output.dense {output.dense.out_features}")
        w = self_attn.query.weight
        new = cls(d_model, num_heads, dropout=float(self_attn.dropout.p), bias=self_attn.query.bias is not None,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            pairs = ((new.q_proj, self_attn.query), (new.k_proj, self_attn.key), (new.v_proj, self_attn.value),
                     (new.out_proj, output.dense))
            for ours, theirs in pairs:
                ours.weight.copy_(theirs.weight)
                if theirs.bias is not None:
                    ours.bias.copy_(theirs.bias)
        return new.train(attention.training)

    @classmethod
    def from_hf_decoder_attention(cls, attention: nn.Module) -> MultiHeadAttention:
        """Copy a Hugging Face Llama, Mistral or gpt-oss attention (q_proj, k_proj, v_proj, o_proj + config).

        Reads from `attention.config`: num_attention_heads, num_key_value_heads, the rotary base
        (rope_parameters["rope_theta"], default RoPE only), the sliding window (Mistral's
        config.sliding_window, or the layer's own `sliding_window` in gpt-oss) and gpt-oss's `sinks`.
        The result computes the attention of one layer (input: the normalised hidden states), with
        is_causal=True.
        """
        config = getattr(attention, "config", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if config is None or not all(isinstance(getattr(attention, n, None), nn.Linear) for n in names):
            raise TypeError(f"attention must be a Hugging Face decoder attention with .config and q/k/v/o_proj; "
                            f"got {type(attention).__name__}")
        d_model, num_heads = config.hidden_size, config.num_attention_heads
        d_head = getattr(attention, "head_dim", d_model // num_heads)
        if d_head * num_heads != d_model:
            raise ValueError(f"this module needs head_dim * num_attention_heads = hidden_size; got head_dim={d_head}, "
                             f"num_attention_heads={num_heads}, hidden_size={d_model}")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only the default RoPE is supported; got rope_type={rope.get('rope_type')!r}")
        window = getattr(attention, "sliding_window", None) if hasattr(attention, "sinks") else \
            getattr(config, "sliding_window", None)
        w = attention.q_proj.weight
        new = cls(d_model, num_heads, num_kv_heads=config.num_key_value_heads, bias=attention.q_proj.bias is not None,
                  dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
                  rotary=RotaryEmbedding(d_head, base=float(rope.get("rope_theta", 10000.0))),
                  window=window, learned_sink=hasattr(attention, "sinks"), device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for ours, theirs in zip((new.q_proj, new.k_proj, new.v_proj, new.out_proj),
                                    (getattr(attention, n) for n in names), strict=True):
                ours.weight.copy_(theirs.weight)
                if theirs.bias is not None:
                    ours.bias.copy_(theirs.bias)
            if new.sink_logits is not None:
                new.sink_logits.copy_(attention.sinks)
        return new.train(attention.training)

"""Multi-head latent attention (MLA, DeepSeek-V2 and V3): cache a small latent instead of keys and values.

    x (B, T, d_model)
      queries:  q = W_UQ norm(W_DQ x)   (or one q_proj without q_rank)  -> per head [q_nope | q_rope]
      keys/values: [c | k_rope] = W_DKV x,  c = norm(c)  (B, T, kv_rank): ONE latent for all heads
                   [k_nope | v] = W_UKV c   per head;    k_rope (B, T, d_rope): ONE rotary key for all heads
      score_h = (q_nope . k_nope + q_rope . k_rope) / sqrt(d_nope + d_rope)

RoPE cannot be folded into the latent (a rotation by the position sits between W_UK and q), so a
small decoupled rotary part (d_rope features, shared by the heads) carries the positions.

Long contexts: rope_scaling (course_lib.positional.rope_inv_freq's format) scales the rotary part's
frequencies. DeepSeek-V3 ships YaRN with mscale and mscale_all_dim; as in DeepSeek's code, mscale_all_dim
also multiplies the softmax scale by yarn_mscale(factor, mscale_all_dim) ** 2 (cos and sin get the ratio
yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)).

The cache holds only c and k_rope: kv_rank + d_rope numbers per token per layer, whatever the
number of heads. Two ways to decode from it compute the same function:
- plain: expand the cached latent into every head's keys and values (W_UKV c) at every step;
- absorbed: q_nope . (W_UK c) = (W_UK^T q_nope) . c, so fold W_UK into the query and W_UV into the
  output; attention then runs over the latent itself. It is multi-query attention with one shared
  key [c | k_rope] of kv_rank + d_rope features and one shared value c.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from course_lib._validate import check_bool, check_positive_int, check_positive_number, shape_str
from course_lib.attention import attention_core
from course_lib.kv_cache import KVCache, unchanged_on_error
from course_lib.masks import canonical_mask
from course_lib.mha import merge_heads
from course_lib.positional import RotaryEmbedding, yarn_mscale

__all__ = ["MultiHeadLatentAttention", "LatentCache", "MLA_ROPE_TYPES"]

MLA_ROPE_TYPES = ("default", "yarn", "linear", "llama3", "dynamic")  # the rope_types from_hf_deepseek_v3 copies


class LatentCache:
    """MLA's cache: per token the latent c (kv_rank numbers) and the shared rotary key (d_rope), not keys and values.

    latent (B, 1, S, kv_rank) and rope_key (B, 1, S, d_rope) grow by the new tokens at each call;
    next_position is the position of the next token. (It stores them in a KVCache, whose checks
    and restore-on-error it reuses.)
    """

    def __init__(self) -> None:
        self.store = KVCache()

    @property
    def latent(self) -> torch.Tensor | None:
        return self.store.key  # (B, 1, S, kv_rank)

    @property
    def rope_key(self) -> torch.Tensor | None:
        return self.store.value  # (B, 1, S, d_rope)

    @property
    def next_position(self) -> int:
        return self.store.next_position

    def __len__(self) -> int:
        return len(self.store)

    def __repr__(self) -> str:
        latent = None if self.latent is None else tuple(self.latent.shape)
        rope_key = None if self.rope_key is None else tuple(self.rope_key.shape)  # filled with the latent
        return f"LatentCache(latent={latent}, rope_key={rope_key})"

    def update(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, 1, S_new, .) latents and rotary keys; return everything cached so far."""
        return self.store.update(latent, rope_key)


class MultiHeadLatentAttention(nn.Module):
    """Causal self-attention with DeepSeek's latent key/value compression; see the module docstring.

    A cache is a LatentCache (`new_cache()`): the latent c (B, 1, S, kv_rank) and k_rope (B, 1, S, d_rope).
    """

    def __init__(self, d_model: int, num_heads: int, *, kv_rank: int, d_nope: int, d_rope: int, d_v: int,
                 q_rank: int | None = None, rope_base: float = 10000.0, rope_interleaved: bool = True,
                 rope_scaling: Mapping[str, object] | None = None, eps: float = 1e-6, bias: bool = False) -> None:
        super().__init__()
        d_model, num_heads, kv_rank, d_nope, d_rope, d_v = (check_positive_int(name, value) for name, value in (
            ("d_model", d_model), ("num_heads", num_heads), ("kv_rank", kv_rank), ("d_nope", d_nope),
            ("d_rope", d_rope), ("d_v", d_v)))
        if d_rope % 2:
            raise ValueError(f"d_rope must be even: the rotary part turns its features in pairs; got d_rope={d_rope}")
        q_rank = None if q_rank is None else check_positive_int("q_rank", q_rank)
        rope_base = check_positive_number("rope_base", rope_base, above=1.0)  # named as here, not as RotaryEmbedding's
        check_bool("rope_interleaved", rope_interleaved)
        check_bool("bias", bias)
        try:
            self.rotary = RotaryEmbedding(d_rope, base=rope_base, interleaved=rope_interleaved, scaling=rope_scaling)
        except (TypeError, ValueError) as e:  # named as here: rope_scaling, not RotaryEmbedding's scaling
            raise type(e)(f"rope_scaling: {e}") from None
        scaling = self.rotary.scaling or {}
        # the softmax scale is 1/sqrt(d_nope + d_rope) times score_multiplier: DeepSeek's mscale_all_dim term, or 1
        m_all = yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) if scaling.get("mscale_all_dim") else 1.0
        self.score_multiplier = m_all * m_all
        self.d_model, self.num_heads, self.kv_rank, self.q_rank = d_model, num_heads, kv_rank, q_rank
        self.d_nope, self.d_rope, self.d_v = d_nope, d_rope, d_v
        d_qk = d_nope + d_rope
        if q_rank is None:
            self.q_proj = nn.Linear(d_model, num_heads * d_qk, bias=False)
        else:
            self.q_down = nn.Linear(d_model, q_rank, bias=bias)  # W_DQ
            self.q_norm = nn.RMSNorm(q_rank, eps=eps)
            self.q_up = nn.Linear(q_rank, num_heads * d_qk, bias=False)  # W_UQ
        self.kv_down = nn.Linear(d_model, kv_rank + d_rope, bias=bias)  # W_DKV and the shared rotary key
        self.kv_norm = nn.RMSNorm(kv_rank, eps=eps)
        self.kv_up = nn.Linear(kv_rank, num_heads * (d_nope + d_v), bias=False)  # W_UK and W_UV, head by head
        self.out_proj = nn.Linear(num_heads * d_v, d_model, bias=bias)

    def extra_repr(self) -> str:
        scaling = "" if self.rotary.scaling is None else f", rope_scaling={self.rotary.scaling}"
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, kv_rank={self.kv_rank}, q_rank={self.q_rank}, "
                f"d_nope={self.d_nope}, d_rope={self.d_rope}, d_v={self.d_v}" + scaling)

    def new_cache(self) -> LatentCache:
        """An empty cache of latents and rotary keys."""
        return LatentCache()

    def cache_numbers_per_token(self) -> int:
        """Numbers one layer's cache holds per token: the latent and the rotary key (MHA: 2 * H * d_head)."""
        return self.kv_rank + self.d_rope

    def _queries(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_rank is None else self.q_up(self.q_norm(self.q_down(x)))  # (B, T, H * d_qk)
        q = q.view(B, T, self.num_heads, self.d_nope + self.d_rope).transpose(1, 2)  # (B, H, T, d_qk)
        if self.score_multiplier != 1.0:  # attention_core scales by 1/sqrt(d_qk); the rest goes into q
            q = q * self.score_multiplier
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        return q_nope, self.rotary(q_rope, offset=start)  # (B, H, T, d_nope), (B, H, T, d_rope)

    def _latent(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        c, k_rope = self.kv_down(x).split([self.kv_rank, self.d_rope], dim=-1)  # (B, T, r), (B, T, d_rope)
        return self.kv_norm(c).unsqueeze(1), self.rotary(k_rope.unsqueeze(1), offset=start)  # (B, 1, T, .)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, d_nope, r) and W_UV (H, d_v, r), views of kv_up's weight."""
        w = self.kv_up.weight.view(self.num_heads, self.d_nope + self.d_v, self.kv_rank)
        return w[:, : self.d_nope], w[:, self.d_nope:]

    def forward(self, x: torch.Tensor, *, cache: LatentCache | None = None, absorbed: bool = False) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model), causal; with a cache, x holds only the new tokens."""
        check_bool("absorbed", absorbed)
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be a (B, T, d_model={self.d_model}) tensor; got "
                             f"{shape_str(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dtype != self.kv_down.weight.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the weights are {self.kv_down.weight.dtype}")
        if cache is not None:
            if not isinstance(cache, LatentCache):
                raise TypeError(f"cache must be a LatentCache (mla.new_cache()): MLA caches latents, not keys and "
                                f"values; got {type(cache).__name__}")
            held, held_rope = cache.latent, cache.rope_key  # both None, or both filled
            if held is not None and held_rope is not None and (
                    held.shape[0] != x.shape[0] or held.shape[-1] != self.kv_rank
                    or held_rope.shape[-1] != self.d_rope):
                raise ValueError(f"cache holds latents {shape_str(held.shape)} and rotary keys "
                                 f"{shape_str(held_rope.shape)}; this call needs B={x.shape[0]}, "
                                 f"kv_rank={self.kv_rank}, d_rope={self.d_rope}")
        B, T, _ = x.shape
        start = 0 if cache is None else cache.next_position  # position of the first new token
        q_nope, q_rope = self._queries(x, start)
        c, k_rope = self._latent(x, start)  # (B, 1, T, r), (B, 1, T, d_rope)
        with unchanged_on_error(None if cache is None else cache.store):
            if cache is not None and T:  # no new token (T = 0): nothing to append, the cache stays as it was
                c, k_rope = cache.update(c, k_rope)  # (B, 1, S, r), (B, 1, S, d_rope)
            S = c.shape[-2]
            mask, is_causal = canonical_mask(None, True, T, S, device=x.device)  # new queries: the last T positions
            if absorbed:
                out = self._absorbed(q_nope, q_rope, c, k_rope, mask, is_causal)
            else:
                out = self._plain(q_nope, q_rope, c, k_rope, mask, is_causal)
        return self.out_proj(merge_heads(out))  # (B, H, T, d_v) -> (B, T, d_model)

    def _plain(self, q_nope, q_rope, c, k_rope, mask, is_causal) -> torch.Tensor:
        """Expand the latent into every head's keys and values, then ordinary multi-head attention."""
        B, H, S = c.shape[0], self.num_heads, c.shape[-2]
        kv = self.kv_up(c.squeeze(1)).view(B, S, H, self.d_nope + self.d_v).transpose(1, 2)  # (B, H, S, dn + dv)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, d_qk)
        k = torch.cat([k_nope, k_rope.expand(B, H, S, self.d_rope)], dim=-1)  # (B, H, S, d_qk)
        out, _ = attention_core(q, k, v, mask, is_causal=is_causal)  # scale 1/sqrt(d_qk)
        return out  # (B, H, T, d_v)

    def _absorbed(self, q_nope, q_rope, c, k_rope, mask, is_causal) -> torch.Tensor:
        """Attention over the cached latent itself: W_UK folded into the queries, W_UV into the output."""
        w_uk, w_uv = self._up_weights()  # (H, dn, r), (H, dv, r)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, r): W_UK^T q_nope
        # one shared key [c | k_rope] and one shared value c: multi-query attention with d = r + d_rope.
        # attention_core scales by 1/sqrt(r + d_rope); MLA's scale is 1/sqrt(d_nope + d_rope): rescale q.
        ratio = ((self.kv_rank + self.d_rope) / (self.d_nope + self.d_rope)) ** 0.5
        q = torch.cat([q_lat, q_rope], dim=-1) * ratio  # (B, H, T, r + d_rope)
        k = torch.cat([c, k_rope], dim=-1)  # (B, 1, S, r + d_rope)
        out_lat, _ = attention_core(q, k, c, mask, is_causal=is_causal, enable_gqa=True)  # (B, H, T, r)
        return torch.einsum("bhtr,hvr->bhtv", out_lat, w_uv)  # (B, H, T, d_v): W_UV applied after the sum

    @classmethod
    def from_hf_deepseek_v3(cls, attention: Any) -> MultiHeadLatentAttention:
        """Copy a Hugging Face DeepseekV3Attention; its config says the sizes, the pairing and the RoPE scaling.

        rope_parameters' rope_type may be "default", "yarn" (DeepSeek-V3's, with mscale and mscale_all_dim: the
        softmax scale changes too), "linear", "llama3" or "dynamic"; any other type, or partial_rotary_factor != 1,
        is refused by name.
        """
        config = getattr(attention, "config", None)
        if config is None or not hasattr(attention, "kv_a_proj_with_mqa"):
            raise TypeError(f"attention must be a Hugging Face DeepseekV3Attention; got {type(attention).__name__}")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        base = float(rope.pop("rope_theta", 10000.0))
        rope_type = rope.setdefault("rope_type", "default")
        if rope_type not in MLA_ROPE_TYPES:
            raise ValueError(f"rope_parameters['rope_type'] must be one of {', '.join(map(repr, MLA_ROPE_TYPES))} "
                             f"to be copied exactly; got {rope_type!r}")
        if rope.pop("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"rope_parameters['partial_rotary_factor'] must be 1 (RoPE on all qk_rope_head_dim "
                             f"features); got {config.rope_parameters['partial_rotary_factor']}")
        if rope_type == "dynamic":  # Hugging Face's dynamic NTK counts from max_position_embeddings
            rope["original_max_position_embeddings"] = config.max_position_embeddings
        if rope_type == "yarn" and rope.get("factor") is None and rope.get("original_max_position_embeddings"):
            # as Hugging Face does when the factor is left out
            rope["factor"] = config.max_position_embeddings / rope["original_max_position_embeddings"]
        new = cls(config.hidden_size, config.num_attention_heads, kv_rank=config.kv_lora_rank,
                  d_nope=config.qk_nope_head_dim, d_rope=config.qk_rope_head_dim, d_v=config.v_head_dim,
                  q_rank=config.q_lora_rank, rope_base=base, rope_interleaved=bool(config.rope_interleave),
                  rope_scaling=None if rope_type == "default" else rope,
                  eps=attention.kv_a_layernorm.variance_epsilon, bias=bool(config.attention_bias))
        pairs: list[tuple[nn.Linear | nn.RMSNorm, Any]] = [  # (ours, theirs)
            (new.kv_down, attention.kv_a_proj_with_mqa), (new.kv_up, attention.kv_b_proj),
            (new.out_proj, attention.o_proj), (new.kv_norm, attention.kv_a_layernorm)]
        if new.q_rank is None:
            pairs.append((new.q_proj, attention.q_proj))
        else:
            pairs += [(new.q_down, attention.q_a_proj), (new.q_norm, attention.q_a_layernorm),
                      (new.q_up, attention.q_b_proj)]
        with torch.no_grad():
            for ours, theirs in pairs:
                ours.weight.copy_(theirs.weight)
                if isinstance(ours, nn.Linear) and getattr(theirs, "bias", None) is not None:
                    ours.bias.copy_(theirs.bias)
        return new.to(attention.kv_b_proj.weight.dtype).train(attention.training)

"""Positional information for attention, which on its own ignores word order.

Self-attention is permutation-equivariant: shuffle the tokens and the outputs are shuffled the
same way, nothing else changes (notebook 06 measures it). Adding a position-dependent vector
to each token embedding breaks that symmetry.

* SinusoidalPositionalEncoding (Vaswani et al. 2017), fixed, no parameters:
      PE[pos, 2i]   = sin(pos / base^(2i / d_model))
      PE[pos, 2i+1] = cos(pos / base^(2i / d_model))
  Each pair of features is a rotation at its own frequency, so PE[pos + k] is a fixed linear
  function (a rotation) of PE[pos] for every k.
* LearnedPositionalEmbedding (BERT, GPT-2): one trained vector per position, nothing beyond
  max_len.

Both take `offset` so that incremental decoding (one new token at position t, with a KV cache)
adds the encoding of position t, not of position 0.

* RotaryEmbedding (RoPE; Su et al. 2021, used by Llama, Mistral, DeepSeek, gpt-oss) adds nothing
  to the embeddings: it rotates each query and key of a head, pair of features by pair of
  features, by the angle pos * base^(-2i / d_head) (the frequencies of the sinusoidal table). A
  rotation by m*theta dotted with one by n*theta is a rotation by (m - n)*theta, so the score q_m . k_n
  depends on the positions only through m - n (notebook 12 checks it). Two layouts of the pairs
  are in use: rotate-half (Llama, GPT-NeoX: feature i pairs with i + d/2) and interleaved
  (RoFormer, GPT-J, DeepSeek's weights: 2i pairs with 2i+1). They are the same rotation once the
  features are permuted by `interleaved_to_half`.

A model trained on sequences of length L has seen only the angles of positions below L. To read
longer contexts, `rope_inv_freq` rescales the frequencies (RotaryEmbedding's `scaling`, in Hugging
Face's rope_parameters format):
* "linear": position interpolation (Chen et al. 2023): every frequency / factor, so position
  factor * L turns as far as position L did.
* "ntk": NTK-aware scaling (bloc97 2023, as described in the YaRN paper): a larger base,
  base * factor^(d/(d-2)), which leaves the fastest pair as it was and slows the slowest pair by
  exactly `factor`.
* "dynamic": Hugging Face's dynamic NTK: "ntk" with a factor grown from the current length s,
  factor * s / L - (factor - 1), once s > L (plain RoPE below). s is offset + T of each call;
  Hugging Face keeps the largest s seen, which is the same while a sequence grows (cached decoding).
* "llama3": The Llama 3 Herd of Models (Grattafiori et al. 2024): pairs whose wavelength is under
  L / high_freq_factor are kept, those over L / low_freq_factor are divided by factor, and those
  in between are blended smoothly.
* "yarn": YaRN (Peng et al. 2023): the same keep / interpolate / blend by pair, with the boundaries
  set by how many turns a pair makes over L (beta_fast, beta_slow), and an attention factor
  0.1 ln(factor) + 1 multiplying cos and sin (so the scores, by its square) to sharpen the softmax.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from course_lib._validate import check_bool, check_nonnegative_int, check_positive_int, check_positive_number, shape_str

__all__ = ["sinusoidal_table", "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding", "RotaryEmbedding",
           "interleaved_to_half", "ROPE_TYPES", "rope_inv_freq", "yarn_mscale"]


def _inv_freq(dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """(ceil(dim/2),) float64: base^(-2i / dim), the frequencies of both the sinusoidal table and RoPE."""
    two_i = torch.arange(0, dim, 2, dtype=torch.float64, device=device)  # (ceil(dim/2),)
    return torch.exp(-math.log(base) * two_i / dim)


def _angles(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """(L, ceil(dim/2)) float64: positions[l] * base^(-2i / dim), the angles of both the sinusoidal table and RoPE."""
    return positions.to(torch.float64).unsqueeze(1) * _inv_freq(dim, base, positions.device)


def sinusoidal_table(max_len: int, d_model: int, *, base: float = 10000.0, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(max_len, d_model): row pos is the sinusoidal encoding of position pos."""
    max_len, d_model = check_positive_int("max_len", max_len), check_positive_int("d_model", d_model)
    base = check_positive_number("base", base, above=1.0)
    angle = _angles(torch.arange(max_len, device=device), d_model, base)  # (max_len, ceil(d/2))
    table = torch.zeros(max_len, d_model, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])  # an odd d_model has one fewer cosine
    return table.to(dtype)


def _check_input(x: torch.Tensor, d_model: int, offset: int, max_len: int) -> int:
    """-> offset, a Python int."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape (B, T, d_model={d_model}); got {shape_str(x.shape)}")
    offset = check_nonnegative_int("offset", offset, " (the position of x's first token)")
    if offset + x.shape[1] > max_len:
        raise ValueError(f"positions {offset}..{offset + x.shape[1] - 1} exceed max_len={max_len}; "
                         f"build the encoding with a larger max_len")
    return offset


class SinusoidalPositionalEncoding(nn.Module):
    """x (B, T, d_model) -> x + PE[offset : offset + T] (then dropout). No trainable parameters."""

    table: torch.Tensor  # (max_len, d_model): a buffer, registered in __init__

    def __init__(self, d_model: int, max_len: int = 512, *, dropout: float = 0.0, base: float = 10000.0) -> None:
        super().__init__()
        self.d_model, self.max_len = check_positive_int("d_model", d_model), check_positive_int("max_len", max_len)
        self.register_buffer("table", sinusoidal_table(max_len, d_model, base=base), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        offset = _check_input(x, self.d_model, offset, self.max_len)
        return self.dropout(x + self.table[offset: offset + x.shape[1]].to(x.dtype))  # (B, T, d_model)


class LearnedPositionalEmbedding(nn.Module):
    """x (B, T, d_model) -> x + E[offset : offset + T] with E a trained (max_len, d_model) table."""

    def __init__(self, d_model: int, max_len: int = 512, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.d_model, self.max_len = check_positive_int("d_model", d_model), check_positive_int("max_len", max_len)
        self.embedding = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        offset = _check_input(x, self.d_model, offset, self.max_len)
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)  # (T,)
        return self.dropout(x + self.embedding(positions).to(x.dtype))  # (B, T, d_model)


def _even_d_head(d_head: object) -> int:
    d_head = check_positive_int("d_head", d_head)
    if d_head % 2:
        raise ValueError(f"d_head must be even for rotary embeddings (features rotate in pairs); got {d_head}")
    return d_head


def interleaved_to_half(d_head: int) -> torch.Tensor:
    """(d_head,) permutation [0, 2, 4, ..., 1, 3, 5, ...]: x[..., perm] puts interleaved pairs in rotate-half layout.

    rotate-half RoPE of x[..., perm] equals (interleaved RoPE of x)[..., perm]: the two conventions are
    one rotation, and since q and k are permuted alike, every score q . k is the same.
    """
    d_head = _even_d_head(d_head)
    return torch.cat([torch.arange(0, d_head, 2), torch.arange(1, d_head, 2)])


# rope_type -> (required keys, optional keys) of a `scaling` mapping
ROPE_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "ntk": (("factor",), ()),
    "dynamic": (("factor", "original_max_position_embeddings"), ()),
    "llama3": (("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")),
}


def _check_scaling(scaling: Mapping[str, object] | None, d_head: int) -> dict[str, Any] | None:
    """None (plain RoPE) or a copy of `scaling` whose keys and values are checked, with YaRN's defaults filled in."""
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise TypeError(f"scaling must be a mapping such as {{'rope_type': 'linear', 'factor': 4.0}} or None; "
                        f"got {type(scaling).__name__}")
    kind = scaling.get("rope_type")
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise ValueError(f"scaling['rope_type'] must be one of {', '.join(map(repr, ROPE_TYPES))} or 'default'; "
                         f"got {kind!r}")
    required, optional = ROPE_TYPES[kind]
    missing = [k for k in required if scaling.get(k) is None]
    unknown = sorted(set(scaling) - {"rope_type", *required, *optional})
    if missing or unknown:
        raise ValueError(f"scaling with rope_type={kind!r} needs the keys {list(required)} (and may have "
                         f"{list(optional)}); missing {missing}, unexpected {unknown}")
    out: dict[str, Any] = {"rope_type": kind}
    for key in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor",
                "mscale", "mscale_all_dim"):
        if scaling.get(key) is not None:
            out[key] = check_positive_number(f"scaling[{key!r}]", scaling[key])
    if "original_max_position_embeddings" in scaling:
        out["original_max_position_embeddings"] = check_positive_int(
            "scaling['original_max_position_embeddings']", scaling["original_max_position_embeddings"])
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError(f"scaling['high_freq_factor'] must exceed scaling['low_freq_factor']; got "
                         f"{out['high_freq_factor']} and {out['low_freq_factor']}")
    if kind == "yarn":
        out.setdefault("beta_fast", 32.0)  # YaRN's defaults (the paper's, and Hugging Face's)
        out.setdefault("beta_slow", 1.0)
        out["truncate"] = check_bool("scaling['truncate']", scaling.get("truncate", True))
        if not out["beta_fast"] > out["beta_slow"]:
            raise ValueError(f"scaling['beta_fast'] must exceed scaling['beta_slow']; got {out['beta_fast']} "
                             f"and {out['beta_slow']}")
    if kind in ("ntk", "dynamic") and d_head <= 2:
        raise ValueError(f"rope_type={kind!r} needs d_head > 2 (its base grows by factor^(d/(d-2))); got {d_head}")
    return out


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's temperature term 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1): sqrt(1/t) in the YaRN paper.

    Plain YaRN multiplies cos and sin by yarn_mscale(factor). DeepSeek's configurations set mscale and
    mscale_all_dim: cos and sin get yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim), and its
    attention (course_lib.modern.mla) multiplies the softmax scale by yarn_mscale(factor, mscale_all_dim) ** 2.
    """
    factor = check_positive_number("factor", factor)
    mscale = check_positive_number("mscale", mscale)
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_attention_factor(factor: float, scaling: Mapping[str, Any]) -> float:
    """YaRN's attention temperature: sqrt(1/t) = 0.1 ln(factor) + 1 (or mscale's ratio, or given)."""
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:  # DeepSeek's form
        return yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
    return yarn_mscale(factor)


def _scaled_inv_freq(d_head: int, base: float, scaling: Mapping[str, Any] | None,
                     seq_len: int | None) -> tuple[torch.Tensor, float]:
    """rope_inv_freq on a `scaling` that _check_scaling has already checked."""
    if scaling is None:
        return _inv_freq(d_head, base), 1.0
    kind, factor = scaling["rope_type"], scaling["factor"]
    if kind == "dynamic":  # Hugging Face: "ntk" with a factor that grows with the length seen
        L = scaling["original_max_position_embeddings"]
        if seq_len is None:
            raise ValueError("rope_type='dynamic' depends on the sequence length: pass seq_len")
        kind, factor = "ntk", factor * max(seq_len, L) / L - (factor - 1)
    if kind == "ntk":
        return _inv_freq(d_head, base * factor ** (d_head / (d_head - 2))), 1.0
    inv_freq = _inv_freq(d_head, base)  # (d_head/2,)
    if kind == "linear":
        return inv_freq / factor, 1.0
    L = scaling["original_max_position_embeddings"]
    if kind == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        turns = L * inv_freq / (2 * math.pi)  # (d_head/2,) how many turns each pair makes over L
        keep = ((turns - low) / (high - low)).clamp(0.0, 1.0)  # 1: kept (fast), 0: divided by factor (slow)
    else:  # yarn: the pair index where a pair makes `beta` turns over L, from 2 pi beta = L * base^(-2i/d)
        def pair_index(beta: float) -> float:
            return d_head * math.log(L / (2 * math.pi * beta)) / (2 * math.log(base))
        lo, hi = pair_index(scaling["beta_fast"]), pair_index(scaling["beta_slow"])
        if scaling["truncate"]:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d_head - 1)
        hi = hi + 0.001 if hi == lo else hi  # (Hugging Face's guard against a zero-width ramp)
        i = torch.arange(d_head // 2, dtype=torch.float64)  # (d_head/2,)
        keep = 1.0 - ((i - lo) / (hi - lo)).clamp(0.0, 1.0)
    scaled = inv_freq / factor * (1.0 - keep) + inv_freq * keep  # (d_head/2,)
    return scaled, (_yarn_attention_factor(factor, scaling) if kind == "yarn" else 1.0)


def rope_inv_freq(d_head: int, base: float = 10000.0, scaling: Mapping[str, object] | None = None, *,
                  seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(d_head/2,) float64 inverse frequencies theta_i of RoPE, scaled for long contexts, and the attention factor.

    scaling: None (plain RoPE: theta_i = base^(-2i/d_head), factor 1) or a mapping with "rope_type" in
    ROPE_TYPES and its keys, as in Hugging Face's rope_parameters (rope_theta apart: that is `base`):
      "linear" {factor}, "ntk" {factor}, "dynamic" {factor, original_max_position_embeddings},
      "llama3" {factor, original_max_position_embeddings, low_freq_factor, high_freq_factor},
      "yarn" {factor, original_max_position_embeddings; beta_fast=32, beta_slow=1, attention_factor,
              mscale, mscale_all_dim, truncate=True}.
    seq_len: the length the positions belong to; only "dynamic" reads it.
    The attention factor multiplies cos and sin (1 except for YaRN).
    """
    d_head = _even_d_head(d_head)
    base = check_positive_number("base", base, above=1.0)
    scaling = _check_scaling(scaling, d_head)
    if seq_len is not None:
        seq_len = check_positive_int("seq_len", seq_len)
    return _scaled_inv_freq(d_head, base, scaling, seq_len)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding: x (..., T, d_head) at positions offset ... offset + T - 1 -> rotated x.

    Applied to the queries and keys of every head (not to the values, not to the embeddings).
    Pair (a, b) of features at position p turns by p * theta_i, theta_i = base^(-2i / d_head):
        a' = a cos - b sin,  b' = b cos + a sin.
    interleaved=False: a = x[i], b = x[i + d_head/2] (rotate-half: Llama, GPT-NeoX, Mistral, gpt-oss).
    interleaved=True:  a = x[2i], b = x[2i + 1]       (RoFormer, GPT-J, DeepSeek's checkpoints).
    scaling: None, or a long-context scaling of the theta_i (see `rope_inv_freq`: "linear", "ntk",
    "dynamic", "llama3", "yarn"); YaRN's attention factor multiplies cos and sin.
    The angles are computed in float64 and the rotation in the input's dtype. No parameters.
    """

    def __init__(self, d_head: int, *, base: float = 10000.0, interleaved: bool = False,
                 scaling: Mapping[str, object] | None = None) -> None:
        super().__init__()
        d_head = _even_d_head(d_head)
        base = check_positive_number("base", base, above=1.0)
        check_bool("interleaved", interleaved)
        self.d_head, self.base, self.interleaved = d_head, base, interleaved
        self.scaling = _check_scaling(scaling, d_head)

    def extra_repr(self) -> str:
        scaling = "" if self.scaling is None else f", scaling={self.scaling}"
        return f"d_head={self.d_head}, base={self.base:g}, interleaved={self.interleaved}" + scaling

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, d_head/2) cos and sin of the angles at `positions` (L,), times the attention factor, in `dtype`.

        seq_len (only rope_type "dynamic" reads it): the length the positions belong to, by default max + 1.
        """
        if seq_len is None and self.scaling is not None and self.scaling["rope_type"] == "dynamic":
            seq_len = int(positions.max()) + 1
        inv_freq, factor = _scaled_inv_freq(self.d_head, self.base, self.scaling, seq_len)  # (d_head/2,), float
        angle = positions.to(torch.float64).unsqueeze(1) * inv_freq.to(positions.device)  # (L, d_head/2)
        return (angle.cos() * factor).to(dtype), (angle.sin() * factor).to(dtype)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor; got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.ndim < 2 or x.shape[-1] != self.d_head:
            raise ValueError(f"x must have shape (..., T, d_head={self.d_head}); got {shape_str(x.shape)}")
        offset = check_nonnegative_int("offset", offset, " (the position of x's first token)")
        T = x.shape[-2]
        cos, sin = self.cos_sin(torch.arange(offset, offset + T, device=x.device), x.dtype,
                                seq_len=offset + T)  # (T, d_head/2)
        if self.interleaved:
            a, b = x[..., 0::2], x[..., 1::2]  # (..., T, d_head/2) each
            return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)  # (..., T, d_head)
        a, b = x[..., : self.d_head // 2], x[..., self.d_head // 2:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)  # (..., T, d_head)

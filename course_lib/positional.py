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
"""

from __future__ import annotations

import math

import torch
from torch import nn

from course_lib._validate import check_bool, check_nonnegative_int, check_positive_int, check_positive_number, shape_str

__all__ = ["sinusoidal_table", "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding", "RotaryEmbedding",
           "interleaved_to_half"]


def _angles(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """(L, ceil(dim/2)) float64: positions[l] * base^(-2i / dim), the angles of both the sinusoidal table and RoPE."""
    two_i = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)  # (ceil(dim/2),)
    return positions.to(torch.float64).unsqueeze(1) * torch.exp(-math.log(base) * two_i / dim)


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


class RotaryEmbedding(nn.Module):
    """Rotary position embedding: x (..., T, d_head) at positions offset ... offset + T - 1 -> rotated x.

    Applied to the queries and keys of every head (not to the values, not to the embeddings).
    Pair (a, b) of features at position p turns by p * theta_i, theta_i = base^(-2i / d_head):
        a' = a cos - b sin,  b' = b cos + a sin.
    interleaved=False: a = x[i], b = x[i + d_head/2] (rotate-half: Llama, GPT-NeoX, Mistral, gpt-oss).
    interleaved=True:  a = x[2i], b = x[2i + 1]       (RoFormer, GPT-J, DeepSeek's checkpoints).
    The angles are computed in float64 and the rotation in the input's dtype. No parameters.
    """

    def __init__(self, d_head: int, *, base: float = 10000.0, interleaved: bool = False) -> None:
        super().__init__()
        d_head = _even_d_head(d_head)
        base = check_positive_number("base", base, above=1.0)
        check_bool("interleaved", interleaved)
        self.d_head, self.base, self.interleaved = d_head, base, interleaved

    def extra_repr(self) -> str:
        return f"d_head={self.d_head}, base={self.base:g}, interleaved={self.interleaved}"

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, d_head/2) cos and sin of the angles at `positions` (L,), in `dtype`."""
        angle = _angles(positions, self.d_head, self.base)  # (L, d_head/2)
        return angle.cos().to(dtype), angle.sin().to(dtype)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor; got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.ndim < 2 or x.shape[-1] != self.d_head:
            raise ValueError(f"x must have shape (..., T, d_head={self.d_head}); got {shape_str(x.shape)}")
        offset = check_nonnegative_int("offset", offset, " (the position of x's first token)")
        T = x.shape[-2]
        cos, sin = self.cos_sin(torch.arange(offset, offset + T, device=x.device), x.dtype)  # (T, d_head/2)
        if self.interleaved:
            a, b = x[..., 0::2], x[..., 1::2]  # (..., T, d_head/2) each
            return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)  # (..., T, d_head)
        a, b = x[..., : self.d_head // 2], x[..., self.d_head // 2:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)  # (..., T, d_head)

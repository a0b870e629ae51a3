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
"""

from __future__ import annotations

import math

import torch
from torch import nn

from course_lib._validate import check_positive_int, shape_str

__all__ = ["sinusoidal_table", "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding"]


def sinusoidal_table(max_len: int, d_model: int, *, base: float = 10000.0, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(max_len, d_model): row pos is the sinusoidal encoding of position pos."""
    check_positive_int("max_len", max_len)
    check_positive_int("d_model", d_model)
    position = torch.arange(max_len, dtype=torch.float64, device=device).unsqueeze(1)  # (max_len, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64, device=device)  # (ceil(d/2),)
    angle = position * torch.exp(-math.log(base) * two_i / d_model)  # (max_len, ceil(d/2))
    table = torch.zeros(max_len, d_model, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])  # an odd d_model has one fewer cosine
    return table.to(dtype)


def _check_input(x: torch.Tensor, d_model: int, offset: int, max_len: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape (B, T, d_model={d_model}); got {shape_str(x.shape)}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0 (the position of x's first token); got {offset!r}")
    if offset + x.shape[1] > max_len:
        raise ValueError(f"positions {offset}..{offset + x.shape[1] - 1} exceed max_len={max_len}; "
                         f"build the encoding with a larger max_len")


class SinusoidalPositionalEncoding(nn.Module):
    """x (B, T, d_model) -> x + PE[offset : offset + T] (then dropout). No trainable parameters."""

    def __init__(self, d_model: int, max_len: int = 512, *, dropout: float = 0.0, base: float = 10000.0) -> None:
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        self.register_buffer("table", sinusoidal_table(max_len, d_model, base=base), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        _check_input(x, self.d_model, offset, self.max_len)
        return self.dropout(x + self.table[offset: offset + x.shape[1]].to(x.dtype))  # (B, T, d_model)


class LearnedPositionalEmbedding(nn.Module):
    """x (B, T, d_model) -> x + E[offset : offset + T] with E a trained (max_len, d_model) table."""

    def __init__(self, d_model: int, max_len: int = 512, *, dropout: float = 0.0) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("max_len", max_len)
        self.d_model, self.max_len = d_model, max_len
        self.embedding = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        _check_input(x, self.d_model, offset, self.max_len)
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)  # (T,)
        return self.dropout(x + self.embedding(positions).to(x.dtype))  # (B, T, d_model)

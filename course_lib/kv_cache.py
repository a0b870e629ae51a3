"""A key/value cache for incremental (token-by-token) decoding.

Self-attention: each step appends the new token's keys and values, so step t attends to all
t cached positions without recomputing their projections. Cross-attention: the encoder
memory's keys and values are computed once (`static=True`) and reused at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from course_lib._validate import shape_str

__all__ = ["KVCache"]


@dataclass
class KVCache:
    key: torch.Tensor | None = None  # (B, H, S_cached, d_head)
    value: torch.Tensor | None = None  # (B, H, S_cached, d_head_v)
    static: bool = False  # True for cross-attention: filled once, then only read

    def __len__(self) -> int:
        return 0 if self.key is None else self.key.shape[-2]

    @property
    def is_filled(self) -> bool:
        return self.key is not None

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, S_new, d) keys/values; return everything cached so far."""
        if self.key is None:
            self.key, self.value = key, value
            return key, value
        if self.static:
            raise RuntimeError("this KVCache is static (cross-attention memory): it is filled once, not appended to")
        if key.shape[:2] != self.key.shape[:2] or key.shape[-1] != self.key.shape[-1]:
            raise ValueError(
                f"new keys {shape_str(key.shape)} do not match the cached keys {shape_str(self.key.shape)} "
                f"in batch, heads or d_head"
            )
        self.key = torch.cat([self.key, key], dim=-2)
        self.value = torch.cat([self.value, value], dim=-2)
        return self.key, self.value

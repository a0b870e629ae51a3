"""A key/value cache for incremental (token-by-token) decoding.

Self-attention: each step appends the new token's keys and values, so step t attends to all
t cached positions without recomputing their projections. Cross-attention: the encoder
memory's keys and values are computed once (`static=True`) and reused at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from course_lib._validate import shape_str

__all__ = ["KVCache"]


@dataclass
class KVCache:
    key: torch.Tensor | None = None  # (B, H, S_cached, d_head)
    value: torch.Tensor | None = None  # (B, H, S_cached, d_head_v)
    static: bool = False  # True for cross-attention: filled once, then only read
    source: torch.Tensor | None = field(default=None, repr=False)  # static: the memory it was filled from

    def __len__(self) -> int:
        return 0 if self.key is None else self.key.shape[-2]

    @property
    def is_filled(self) -> bool:
        return self.key is not None

    def extend(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What `update` would cache, without caching it: (all keys, all values) after appending.

        Every check runs here, before anything is stored, so a call that fails leaves the cache as
        it was. A caller that can still fail after this point (MultiHeadAttention) stores the
        result with `store` only once its own work has succeeded.
        """
        for name, t in (("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.ndim != 4:
                raise TypeError(f"{name} must be a (B, H, S_new, d) torch.Tensor; got "
                                f"{shape_str(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if key.shape[:3] != value.shape[:3]:
            raise ValueError(f"key {shape_str(key.shape)} and value {shape_str(value.shape)} must share (B, H, S_new): "
                             f"one value per key")
        if self.key is None:
            return key, value
        if self.static:
            raise RuntimeError("this KVCache is static (cross-attention memory): it is filled once, not appended to")
        for name, new, old in (("key", key, self.key), ("value", value, self.value)):
            if new.shape[:2] != old.shape[:2] or new.shape[-1] != old.shape[-1]:
                raise ValueError(f"new {name}s {shape_str(new.shape)} do not match the cached {name}s "
                                 f"{shape_str(old.shape)} in batch, heads or d_head")
            if new.dtype != old.dtype or new.device != old.device:
                raise TypeError(f"new {name}s are {new.dtype} on {new.device} but the cache holds {old.dtype} on "
                                f"{old.device}: fill and extend a cache in one dtype (the same autocast setting) "
                                f"and on one device")
        return torch.cat([self.key, key], dim=-2), torch.cat([self.value, value], dim=-2)

    def store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Keep (all keys, all values) as returned by `extend`."""
        self.key, self.value = key, value

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, S_new, d) keys/values; return everything cached so far."""
        key, value = self.extend(key, value)
        self.store(key, value)
        return key, value

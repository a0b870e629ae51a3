"""A key/value cache for incremental (token-by-token) decoding.

Self-attention: each step appends the new token's keys and values, so step t attends to all
t cached positions without recomputing their projections. Cross-attention: the encoder
memory's keys and values are computed once (`static=True`) and reused at every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from course_lib._validate import shape_str

__all__ = ["KVCache", "unchanged_on_error"]


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

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, S_new, d) keys/values; return everything cached so far.

        Every check runs before anything is stored, so an update that fails leaves the cache as it
        was; `unchanged_on_error` does the same for work that can fail after an update.
        """
        for name, t in (("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.ndim != 4:
                raise TypeError(f"{name} must be a (B, H, S_new, d) torch.Tensor; got "
                                f"{shape_str(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if key.shape[:3] != value.shape[:3]:
            raise ValueError(f"key {shape_str(key.shape)} and value {shape_str(value.shape)} must share (B, H, S_new): "
                             f"one value per key")
        if self.key is None:
            self.key, self.value = key, value
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
        self.key, self.value = torch.cat([self.key, key], dim=-2), torch.cat([self.value, value], dim=-2)
        return self.key, self.value


@contextlib.contextmanager
def unchanged_on_error(*caches: KVCache | None) -> Iterator[None]:
    """Run a block that may fill or extend `caches`; if it raises, put every cache back as it was.

    An update never writes into the tensors it replaces (torch.cat makes new ones), so keeping the
    old references is enough to restore them.
    """
    saved = [(c, c.key, c.value, c.source) for c in caches if c is not None]
    try:
        yield
    except BaseException:
        for cache, key, value, source in saved:
            cache.key, cache.value, cache.source = key, value, source
        raise

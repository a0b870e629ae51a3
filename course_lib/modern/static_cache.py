"""A preallocated (static) KV cache: allocated once for its largest length, then written in place.

course_lib's `KVCache` appends with torch.cat, which allocates a new cache one token longer and
copies the old one into it at every step: the whole cache is read and written per token. A static
cache (Hugging Face's StaticCache, and what inference engines do) writes only the new token's keys
and values into rows reserved for them, and hands attention a view of the rows filled so far
(notebook 14 measures both).

`write_at` is the same write for a step captured in a CUDA graph: the row is a tensor on the device,
not a Python int, so the captured write lands wherever that tensor points at replay
(course_lib.modern.graphed_decode).
"""

from __future__ import annotations

import torch

from course_lib._validate import check_positive_int, shape_str

__all__ = ["StaticKVCache"]


class StaticKVCache:
    """Keys (B, H_kv, max_len, d_head) and values (B, H_kv, max_len, d_head_v) allocated once; `length` filled."""

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, d_head: int, d_head_v: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        d_head_v = d_head if d_head_v is None else d_head_v
        dims = [check_positive_int(name, value) for name, value in (
            ("batch", batch), ("num_kv_heads", num_kv_heads), ("max_len", max_len), ("d_head", d_head),
            ("d_head_v", d_head_v))]
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
        B, H_kv, self.max_len, d, d_v = dims
        self.key = torch.zeros(B, H_kv, self.max_len, d, dtype=dtype, device=device)  # (B, H_kv, max_len, d_head)
        self.value = torch.zeros(B, H_kv, self.max_len, d_v, dtype=dtype, device=device)  # (B, H_kv, max_len, d_v)
        self.length = 0  # rows filled so far

    def __len__(self) -> int:
        return self.length

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H_kv, S_new, d) keys/values into the next rows; return views of every row filled so far.

        Every check runs before anything is written, so a refused update leaves the cache as it was.
        """
        self._check_new(key, value)
        end = self.length + key.shape[2]
        if end > self.max_len:
            raise ValueError(f"key adds {key.shape[2]} tokens to a cache holding {self.length} of max_len="
                             f"{self.max_len}: allocate a larger StaticKVCache")
        self.key[:, :, self.length:end].copy_(key)  # in place: only the new rows are written
        self.value[:, :, self.length:end].copy_(value)
        self.length = end
        return self.key[:, :, :end], self.value[:, :, :end]  # views, no copy

    def write_at(self, key: torch.Tensor, value: torch.Tensor,
                 position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token's keys/values (B, H_kv, 1, d) into row `position`, in place; return the whole cache.

        position: a (1,) int64 tensor on the cache's device. A CUDA graph (or a traced graph) that
        captured this call writes, at each replay, into the row `position` holds then; a Python int
        would have been baked in at capture. Rows past the position keep what they held: attention
        must mask them (`arange(max_len) <= position`). `length`, the host's count, is not changed:
        whoever advances `position` keeps it (`GraphedDecodeStep`). A position outside 0 ... max_len - 1
        is an index error, on a GPU a device-side one that ends the process: check the count first.
        Every check runs before anything is written. Returns views of all max_len rows (no copy).
        """
        self._check_new(key, value)
        if key.shape[2] != 1:
            raise ValueError(f"key must hold one token, shape (B, H_kv, 1, d); got {shape_str(key.shape)}")
        if not isinstance(position, torch.Tensor):
            raise TypeError(f"position must be a (1,) int64 torch.Tensor on the cache's device; got "
                            f"{type(position).__name__}")
        if position.shape != (1,) or position.dtype != torch.int64 or position.device != self.key.device:
            raise ValueError(f"position must be a (1,) int64 tensor on {self.key.device}; got "
                             f"{shape_str(position.shape)} {position.dtype} on {position.device}")
        return self._write_at(key, value, position)

    def _write_at(self, key: torch.Tensor, value: torch.Tensor,
                  position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """write_at without its checks, for a caller that has made them (static_decode_step, once per token)."""
        self.key.index_copy_(2, position, key)  # (B, H_kv, max_len, d): row `position` written, in place
        self.value.index_copy_(2, position, value)
        return self.key, self.value

    def _check_new(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """New keys/values (B, H_kv, S_new, d) that fit the cache: shapes, dtype, device; one value per key."""
        for name, new, held in (("key", key, self.key), ("value", value, self.value)):
            if not isinstance(new, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor (B, H_kv, S_new, d); got {type(new).__name__}")
            if new.ndim != 4 or new.shape[:2] != held.shape[:2] or new.shape[3] != held.shape[3]:
                raise ValueError(f"{name} must have shape ({held.shape[0]}, {held.shape[1]}, S_new, {held.shape[3]}) "
                                 f"(B, H_kv, S_new, d) to match the cache; got {shape_str(new.shape)}")
            if new.dtype != held.dtype or new.device != held.device:
                raise TypeError(f"{name} is {new.dtype} on {new.device}; the cache holds {held.dtype} on {held.device}")
        if key.shape[2] != value.shape[2]:
            raise ValueError(f"key {shape_str(key.shape)} and value {shape_str(value.shape)} must share S_new: one "
                             f"value per key")

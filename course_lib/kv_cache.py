"""A key/value cache for incremental (token-by-token) decoding.

Self-attention: each step appends the new token's keys and values, so step t attends to all
t cached positions without recomputing their projections. Cross-attention: the encoder
memory's keys and values are computed once (`static=True`) and reused at every step.

A windowed cache (`window=W`, for sliding-window attention as in Mistral) keeps only the last W
positions, and with `sink_tokens=s` also the first s (StreamingLLM's attention sinks): its size
stops growing at s + W, whatever the length of the text. Kept keys keep the rotation of their
original position (`key_positions` says which positions the cache holds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NoReturn

import torch

from course_lib._validate import check_nonnegative_int, check_positive_int, shape_str

__all__ = ["KVCache", "unchanged_on_error"]


@dataclass
class KVCache:
    """The keys and values of the positions seen so far, for one attention layer (see the module docstring).

    A growing cache (self-attention) is appended to by each call; a static one (cross-attention)
    is filled once from the encoder memory. window and sink_tokens make a cache that keeps only
    the positions a sliding-window module can attend to; seen=k starts a cache at position k.
    """

    key: torch.Tensor | None = None  # (B, H, S_cached, d_head)
    value: torch.Tensor | None = None  # (B, H, S_cached, d_head_v)
    static: bool = False  # True for cross-attention: filled once, then only read
    source: torch.Tensor | None = field(default=None, repr=False)  # static: the memory it was filled from
    window: int | None = None  # keep only the last `window` positions (None: keep all)
    sink_tokens: int = 0  # with a window: also keep the first `sink_tokens` positions
    seen: int = 0  # positions appended so far, evicted ones included (the position of the next token)

    def __post_init__(self) -> None:
        if self.window is not None:
            self.window = check_positive_int("window", self.window)
            if self.static:
                raise ValueError("a static KVCache (cross-attention memory) cannot have a window")
        self.sink_tokens = check_nonnegative_int("sink_tokens", self.sink_tokens)
        if self.sink_tokens and self.window is None:
            raise ValueError("sink_tokens needs a window: without one every position is kept anyway")
        self.seen = check_nonnegative_int("seen", self.seen)
        if self.sink_tokens and self.seen:
            raise ValueError(f"sink_tokens keeps the first positions of a text; a cache that starts at position "
                             f"seen={self.seen} has lost them: use seen=0 or sink_tokens=0")
        self.seen = self.next_position

    @property
    def next_position(self) -> int:
        """The position of the next token appended: every position seen so far, evicted ones included.

        A cache may start at a later position (KVCache(seen=k): a text whose first k tokens are
        gone); it has always seen at least what it holds (for tensors assigned directly).
        """
        return max(self.seen, len(self))

    def key_positions(self, length: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """(length,) positions of the keys held (length = len(self)) or just returned by `update`.

        Either way they are the first min(sink_tokens, length) positions, then consecutive positions up
        to next_position - 1: eviction only ever removes a block between the sinks and the window.
        """
        length = len(self) if length is None else check_nonnegative_int("length", length)
        sinks, end = min(self.sink_tokens, length), self.next_position
        return torch.cat([torch.arange(sinks, device=device), torch.arange(end - (length - sinks), end, device=device)])

    def __len__(self) -> int:
        return 0 if self.key is None else self.key.shape[-2]

    @property
    def is_filled(self) -> bool:
        return self.key is not None

    def update(self, key: torch.Tensor, value: torch.Tensor, *,
               source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, S_new, d) keys/values; return everything cached so far.

        source: for a static cache, the memory the keys and values were projected from (so a later
        call with another memory is refused instead of silently reading this one).
        Every check runs before anything is stored, so an update that fails leaves the cache as it
        was; `unchanged_on_error` does the same for work that can fail after an update.
        """
        old_k, old_v = self.key, self.value
        if not (isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor) and key.ndim == value.ndim == 4):
            _refuse_new(key, value)
        ks, vs = key.shape, value.shape  # integers compared, not sliced: decoding runs this once per token
        if not (ks[0] == vs[0] and ks[1] == vs[1] and ks[2] == vs[2]):
            _refuse_new(key, value)
        if old_k is None:
            self.key, self.value, self.source = key, value, source if self.static else None
            self.seen += key.shape[-2]  # a cache that starts at position k keeps counting from k
            self._evict()
            return key, value
        if self.static:
            raise RuntimeError("this KVCache is static (cross-attention memory): it is filled once, not appended to")
        assert old_v is not None  # key and value are filled together
        oks, ovs = old_k.shape, old_v.shape
        if not (ks[0] == oks[0] and ks[1] == oks[1] and ks[3] == oks[3] and vs[0] == ovs[0] and vs[1] == ovs[1]
                and vs[3] == ovs[3] and key.dtype == old_k.dtype and value.dtype == old_v.dtype
                and key.device == old_k.device and value.device == old_v.device):
            _refuse_mismatch(key, value, old_k, old_v)
        full_k, full_v = torch.cat([old_k, key], dim=-2), torch.cat([old_v, value], dim=-2)
        self.key, self.value, self.seen = full_k, full_v, self.next_position + ks[2]
        if self.window is not None:
            self._evict()
        return full_k, full_v  # this step attends to everything before eviction (its own window)

    def _evict(self) -> None:
        """Windowed cache: keep the first sink_tokens and the last window positions (new tensors, no writes)."""
        if self.window is None or len(self) <= self.sink_tokens + self.window:
            return
        s, w = self.sink_tokens, self.window
        assert self.key is not None and self.value is not None  # len(self) > 0: both are filled
        self.key = torch.cat([self.key[..., :s, :], self.key[..., -w:, :]], dim=-2)
        self.value = torch.cat([self.value[..., :s, :], self.value[..., -w:, :]], dim=-2)


def _refuse_new(key: torch.Tensor, value: torch.Tensor) -> NoReturn:
    """The message for new keys/values that are not a pair of (B, H, S_new, d) tensors with one value per key."""
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise TypeError(f"{name} must be a (B, H, S_new, d) torch.Tensor; got "
                            f"{shape_str(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    raise ValueError(f"key {shape_str(key.shape)} and value {shape_str(value.shape)} must share (B, H, S_new): "
                     f"one value per key")


def _refuse_mismatch(key: torch.Tensor, value: torch.Tensor, old_k: torch.Tensor, old_v: torch.Tensor) -> NoReturn:
    """The message for new keys/values that do not extend the cached ones."""
    for name, new, old in (("key", key, old_k), ("value", value, old_v)):
        if new.shape[:2] != old.shape[:2] or new.shape[-1] != old.shape[-1]:
            raise ValueError(f"new {name}s {shape_str(new.shape)} do not match the cached {name}s "
                             f"{shape_str(old.shape)} in batch, heads or d_head")
        if new.dtype != old.dtype or new.device != old.device:
            raise TypeError(f"new {name}s are {new.dtype} on {new.device} but the cache holds {old.dtype} on "
                            f"{old.device}: fill and extend a cache in one dtype (the same autocast setting) "
                            f"and on one device")
    raise AssertionError("update's test and these messages disagree: every mismatch it refuses is named above")


class unchanged_on_error:  # noqa: N801 (used like a function: `with unchanged_on_error(cache):`)
    """Run a block that may fill or extend `caches`; if it raises, put every cache back as it was.

    An update never writes into the tensors it replaces (torch.cat makes new ones), so keeping the
    old references is enough to restore them. (A class rather than a generator: decoding enters it
    once per token, and this costs a fifth as much.)
    """

    __slots__ = ("saved",)

    def __init__(self, *caches: KVCache | None) -> None:
        self.saved = [(c, c.key, c.value, c.source, c.seen) for c in caches if c is not None]

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: object) -> Literal[False]:
        if kind is not None:
            for cache, key, value, source, seen in self.saved:
                cache.key, cache.value, cache.source, cache.seen = key, value, source, seen
        return False  # the error goes on

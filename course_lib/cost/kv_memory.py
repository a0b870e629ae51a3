"""Closed forms for the memory a batch of sequences takes in a KV cache, per layout (notebook 14).

Counts are in token slots (one slot holds one token's keys and values for every key/value head of
a layer); multiply by 2 H_kv d_head x bytes per number (notebook 12) for bytes.

- `padded_kv_slots`: one contiguous (B, H_kv, L, d_head) tensor, every sequence padded to L: the
  batch's longest length, or the context each request reserved (`capacity`), as servers that
  allocate a request's cache up front must.
- `paged_kv_slots`: fixed-size blocks from a shared pool (vLLM's PagedAttention, Kwon et al. 2023,
  "Efficient Memory Management for Large Language Model Serving with PagedAttention"): a sequence
  of L tokens holds ceil(L / block_size) blocks, so it wastes at most block_size - 1 slots.
- `prefix_shared_blocks`: requests that start with one shared prompt keep one copy of its full
  blocks; the block the prompt ends in, if partial, is copied by each request that writes into it.
"""

from __future__ import annotations

from collections.abc import Sequence

from course_lib._validate import check_bool, check_nonnegative_int, check_positive_int

__all__ = ["padded_kv_slots", "paged_kv_slots", "prefix_shared_blocks"]


def _lengths(lengths: Sequence[int]) -> list[int]:
    if isinstance(lengths, str | bytes) or not isinstance(lengths, Sequence) or not lengths:
        raise TypeError(f"lengths must be a non-empty sequence of ints (tokens per sequence); got {lengths!r}")
    return [check_nonnegative_int(f"lengths[{i}]", n, " (tokens)") for i, n in enumerate(lengths)]


def padded_kv_slots(lengths: Sequence[int], capacity: int | None = None) -> dict[str, int]:
    """Slots of one padded contiguous cache: B x L, with L = max(lengths) or the reserved `capacity`.

    Returns {"slots", "used" (= sum of lengths), "wasted" (= slots - used)}.
    """
    lengths = _lengths(lengths)
    longest = max(lengths)
    if capacity is None:
        capacity = longest
    elif check_positive_int("capacity", capacity) < longest:
        raise ValueError(f"capacity={capacity} is shorter than the longest sequence ({longest} tokens)")
    slots, used = len(lengths) * capacity, sum(lengths)
    return {"slots": slots, "used": used, "wasted": slots - used}


def paged_kv_slots(lengths: Sequence[int], block_size: int) -> dict[str, int]:
    """Slots of a paged cache: each sequence holds ceil(L / block_size) blocks of block_size slots.

    Returns {"blocks", "slots", "used", "wasted"}; wasted = sum((-L) mod block_size), at most
    (block_size - 1) per sequence: only each sequence's last block is partly empty.
    """
    lengths = _lengths(lengths)
    block_size = check_positive_int("block_size", block_size)
    blocks = sum(-(-n // block_size) for n in lengths)
    used = sum(lengths)
    return {"blocks": blocks, "slots": blocks * block_size, "used": used, "wasted": blocks * block_size - used}


def prefix_shared_blocks(prompt_len: int, suffix_lengths: Sequence[int], block_size: int, *,
                         keep_prompt: bool = True) -> dict[str, int]:
    """Blocks that requests sharing one prompt hold, with and without sharing.

    Each request i is the prompt (prompt_len tokens) followed by suffix_lengths[i] tokens of its own.
    Unshared, request i holds ceil((P + s_i) / b) blocks. Shared: the floor(P / b) full blocks of the
    prompt once; the prompt's partial last block (if P mod b > 0) once for the prompt itself (when
    keep_prompt: the prompt stays cached for later requests) and once more for every request that
    appends (s_i > 0: copy-on-write, since it writes into a block others hold); a request with
    s_i = 0 keeps reading the shared one. On top, each request's own blocks after the copied one.
    Returns {"unshared", "shared", "saved"}.
    """
    P = check_nonnegative_int("prompt_len", prompt_len, " (tokens)")
    suffixes = _lengths(suffix_lengths)
    b = check_positive_int("block_size", block_size)
    check_bool("keep_prompt", keep_prompt)
    full, partial = divmod(P, b)
    unshared = sum(-(-(P + s) // b) for s in suffixes) + ((-(-P // b)) if keep_prompt else 0)
    shared = full + (1 if partial and (keep_prompt or any(s == 0 for s in suffixes)) else 0)
    shared += sum(-(-(P + s) // b) - full for s in suffixes if s > 0)  # each writer: its copy and its own blocks
    return {"unshared": unshared, "shared": shared, "saved": unshared - shared}

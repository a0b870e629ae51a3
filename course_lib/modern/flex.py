"""Masks as programs: the course's masks as FlexAttention `mask_mod`s, ALiBi as a `score_mod` (notebook 05).

`torch.nn.attention.flex_attention` (Dong, Feng, Guessous, Liang & He 2024, "Flex Attention: A Programming
Model for Generating Optimized Attention Kernels") takes a mask as a function of indices,
`mask_mod(b, h, q_idx, kv_idx) -> bool` (True = may attend: the course's convention), and a bias as
`score_mod(score, b, h, q_idx, kv_idx) -> score`. `create_block_mask` evaluates a mask_mod once, block by
block, and records which (query block, key block) tiles are full, partial or empty; the compiled kernel
(`torch.compile(flex_attention)`) skips the empty ones. Uncompiled, flex_attention applies the mask_mod to every
score and never reads the tiles, so matching outputs there check the mask_mod alone. Each builder here returns
one such function, written with elementwise tensor operations so it also runs on whole index grids
(`dense_mask`), which is how the tests compare it with `course_lib.masks`.
`block_counts` reads the tiles from a BlockMask; `dense_block_counts` counts them from a dense mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from course_lib._validate import check_nonnegative_int, check_positive_int, shape_str

__all__ = [
    "MaskMod",
    "ScoreMod",
    "BlockCounts",
    "causal_mod",
    "padding_mod",
    "window_mod",
    "document_mod",
    "prefix_lm_mod",
    "alibi_slopes",
    "alibi_mod",
    "dense_mask",
    "block_counts",
    "dense_block_counts",
]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    return value


def _int_tensor(name: str, values: Sequence[int] | torch.Tensor, ndims: tuple[int, ...], what: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be {what}; got {values!r:.60}") from None
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers ({what}); got dtype {tensor.dtype}")
    if tensor.ndim not in ndims or tensor.numel() == 0:
        raise ValueError(f"{name} must be {what}; got shape {shape_str(tensor.shape)}")
    if tensor.min() < 0:
        raise ValueError(f"{name} must be >= 0; got {tensor.tolist()}")
    return tensor.long()


def causal_mod(offset: int = 0) -> MaskMod:
    """Query i may attend to key j iff j <= i + offset.

    offset 0 is the lower triangle aligned top-left (torch's `is_causal` for any T, S); offset S - T aligns it
    bottom-right, the queries being the last T of S positions: `course_lib.masks.causal_mask(T, S)`.
    """
    offset = _check_int("offset", offset)

    def causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return kv_idx <= q_idx + offset

    return causal


def padding_mod(lengths: Sequence[int] | torch.Tensor) -> MaskMod:
    """Key j of sequence b is visible iff j < lengths[b]: `course_lib.masks.padding_mask(lengths, S)`."""
    lengths = _int_tensor("lengths", lengths, (1,), "a 1-D sequence of ints, one length per batch element")

    def padding(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return kv_idx < lengths[b]

    return padding


def window_mod(window: int, *, sink_tokens: int = 0, offset: int = 0) -> MaskMod:
    """Causal within the last `window` positions (itself included), plus the first `sink_tokens` keys.

    The query at row i sits at position p = i + offset (offset S - T for the last T of S positions): key j is
    visible iff j <= p and (p - window < j or j < sink_tokens), `course_lib.masks.sliding_window_mask`.
    """
    window = check_positive_int("window", window)
    sink_tokens = check_nonnegative_int("sink_tokens", sink_tokens)
    offset = _check_int("offset", offset)

    def sliding_window(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        p = q_idx + offset
        return (kv_idx <= p) & ((kv_idx > p - window) | (kv_idx < sink_tokens))

    return sliding_window


def document_mod(document_ids: Sequence[int] | torch.Tensor, *, causal: bool = True) -> MaskMod:
    """Packed sequences: a query sees only keys of its own document (and, if causal, not after itself).

    document_ids: (T,) shared by the batch, or (B, T), the document each position belongs to; queries and keys
    are the same T positions (self-attention over the packed row).
    """
    ids = _int_tensor("document_ids", document_ids, (1, 2), "(T,) or (B, T) ints, the document of each position")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {type(causal).__name__}")

    def same_document(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        if ids.ndim == 1:
            same = ids[q_idx] == ids[kv_idx]
        else:
            same = ids[b, q_idx] == ids[b, kv_idx]
        return same & (kv_idx <= q_idx) if causal else same

    return same_document


def prefix_lm_mod(prefix_lengths: int | Sequence[int] | torch.Tensor) -> MaskMod:
    """Prefix-LM (T5's and UniLM's): the first prefix_lengths[b] positions see each other, the rest is causal.

    Key j is visible to query i iff j <= i or j < prefix length; an int is one prefix for the whole batch.
    """
    shared = isinstance(prefix_lengths, int) and not isinstance(prefix_lengths, bool)
    values = [check_nonnegative_int("prefix_lengths", prefix_lengths)] if shared else prefix_lengths
    prefix = _int_tensor("prefix_lengths", values, (1,), "an int or one int per batch element")  # type: ignore[arg-type]

    def prefix_lm(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        length = prefix[0] if shared else prefix[b]
        return (kv_idx <= q_idx) | (kv_idx < length)

    return prefix_lm


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """(num_heads,) float32: ALiBi's slope per head (Press, Smith & Lewis 2022, "Train Short, Test Long").

    For H a power of two the geometric sequence 2^(-8/H), 2^(-16/H), ..., 2^(-8); otherwise the slopes of the
    largest power of two below H, then every other slope of the next power of two, as the paper's code does.
    """
    num_heads = check_positive_int("num_heads", num_heads)
    power = 2 ** math.floor(math.log2(num_heads))

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    slopes = geometric(power) + geometric(2 * power)[0::2][: num_heads - power]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_mod(slopes: torch.Tensor, *, offset: int = 0) -> ScoreMod:
    """ALiBi as a score_mod: score - slopes[h] * (i + offset - j), a penalty growing with the distance.

    Combine it with a causal mask (ALiBi is a decoder's bias; keys after the query get a bonus otherwise).
    """
    if not isinstance(slopes, torch.Tensor) or not slopes.dtype.is_floating_point or slopes.ndim != 1:
        raise TypeError("slopes must be a 1-D floating-point tensor, one slope per head (alibi_slopes(H)); got "
                        + (f"shape {shape_str(slopes.shape)} dtype {slopes.dtype}" if isinstance(slopes, torch.Tensor)
                           else type(slopes).__name__))
    offset = _check_int("offset", offset)

    def alibi(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
              kv_idx: torch.Tensor) -> torch.Tensor:
        return score - slopes[h] * (q_idx + offset - kv_idx)

    return alibi


def dense_mask(mask_mod: MaskMod, B: int, H: int, T: int, S: int) -> torch.Tensor:
    """(B, H, T, S) bool: mask_mod evaluated on the whole index grid by broadcasting (no vmap, no compile)."""
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be a function (b, h, q_idx, kv_idx) -> bool; got {type(mask_mod).__name__}")
    B, H = check_positive_int("B", B), check_positive_int("H", H)
    T, S = check_positive_int("T", T), check_positive_int("S", S)
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    q_idx = torch.arange(T).view(1, 1, T, 1)
    kv_idx = torch.arange(S).view(1, 1, 1, S)
    return torch.as_tensor(mask_mod(b, h, q_idx, kv_idx)).bool().expand(B, H, T, S)  # (B, H, T, S)


class BlockCounts(NamedTuple):
    """Tiles of the (T, S) score matrix, summed over batch and heads: all keys visible, some, none."""

    full: int
    partial: int
    skipped: int

    @property
    def total(self) -> int:
        return self.full + self.partial + self.skipped


def block_counts(block_mask: object) -> BlockCounts:
    """The tiles a FlexAttention `BlockMask` computes without a mask (full), with one (partial), or skips."""
    kv_num_blocks = getattr(block_mask, "kv_num_blocks", None)
    if not isinstance(kv_num_blocks, torch.Tensor):
        raise TypeError(f"block_mask must be a BlockMask (from create_block_mask); got {type(block_mask).__name__}")
    full_blocks = getattr(block_mask, "full_kv_num_blocks", None)
    partial = int(kv_num_blocks.sum())
    full = 0 if full_blocks is None else int(full_blocks.sum())
    q_blocks = kv_num_blocks.shape[-1]  # (B, H, T / Q_BLOCK)
    kv_blocks = math.ceil(block_mask.seq_lengths[1] / block_mask.BLOCK_SIZE[1])  # type: ignore[attr-defined]
    total = kv_num_blocks.shape[0] * kv_num_blocks.shape[1] * q_blocks * kv_blocks
    return BlockCounts(full=full, partial=partial, skipped=total - full - partial)


def dense_block_counts(mask: torch.Tensor, block_size: int | tuple[int, int] = 128) -> BlockCounts:
    """The same count from a dense bool mask (..., T, S): tiles of block_size (queries, keys), padded with False."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim < 2:
        raise TypeError("mask must be a bool tensor (..., T, S); got "
                        + (f"shape {shape_str(mask.shape)} dtype {mask.dtype}" if isinstance(mask, torch.Tensor)
                           else type(mask).__name__))
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    q_block, kv_block = check_positive_int("block_size", q_block), check_positive_int("block_size", kv_block)
    T, S = mask.shape[-2:]
    padded = torch.nn.functional.pad(mask, (0, -S % kv_block, 0, -T % q_block))  # False where there is no token
    tiles = padded.reshape(-1, padded.shape[-2] // q_block, q_block, padded.shape[-1] // kv_block, kv_block)
    visible = tiles.sum(dim=(2, 4))  # (..., T / q_block, S / kv_block): visible entries per tile
    full = int((visible == q_block * kv_block).sum())
    skipped = int((visible == 0).sum())
    return BlockCounts(full=full, partial=visible.numel() - full - skipped, skipped=skipped)

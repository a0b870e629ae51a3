"""Attention masks, one convention everywhere: boolean, True = this query MAY attend to this key.

That is torch's `F.scaled_dot_product_attention` polarity. `torch.nn.MultiheadAttention`
uses the opposite (True = ignore); `to_torch_mha_mask` converts, and notebook 05 shows what
happens when the two are confused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from course_lib._validate import broadcast_shapes, check_nonnegative_int, check_positive_int, shape_str

__all__ = [
    "causal_mask",
    "sliding_window_mask",
    "position_mask",
    "check_mask",
    "with_causal",
    "canonical_mask",
    "restrict_mask",
    "padding_mask",
    "combine_masks",
    "to_torch_mha_mask",
    "from_torch_mha_mask",
    "from_key_padding_mask",
    "to_additive_mask",
]


def causal_mask(T: int, S: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, S) bool: query i may attend to key j iff j <= i + (S - T).

    With S == T this is the lower triangle. With S > T the queries are the *last* T positions
    of a sequence of length S (bottom-right alignment), which is what incremental decoding with
    a KV cache needs: the new token sees every cached key and itself.
    """
    T = check_positive_int("T", T)
    S = T if S is None else check_positive_int("S", S)
    i = torch.arange(T, device=device).unsqueeze(1)  # (T, 1)
    j = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
    return j <= i + (S - T)  # (T, S)


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, *, window: int | None = None,
                  sink_tokens: int = 0) -> torch.Tensor:
    """(T, S) bool from the positions of the queries (T,) and keys (S,): causal, optionally windowed.

    Query at position p may attend to the key at position j iff j <= p and, with a window W,
    p - W < j (the last W positions, itself included: Mistral's and Hugging Face's convention) or
    j < sink_tokens (StreamingLLM's attention sinks: the first tokens stay visible).
    """
    window = None if window is None else check_positive_int("window", window)
    sink_tokens = check_nonnegative_int("sink_tokens", sink_tokens)
    p, j = q_pos.unsqueeze(1), k_pos.unsqueeze(0)  # (T, 1), (1, S)
    allowed = j <= p
    if window is not None:
        allowed = allowed & ((j > p - window) | (j < sink_tokens))
    return allowed  # (T, S)


def sliding_window_mask(T: int, S: int | None = None, *, window: int, sink_tokens: int = 0,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """(T, S) bool: causal_mask(T, S) restricted to the last `window` keys (plus the first `sink_tokens`).

    Queries are the last T of S positions, as in causal_mask. window >= S gives causal_mask.
    """
    T = check_positive_int("T", T)
    S = T if S is None else check_positive_int("S", S)
    positions = torch.arange(S, device=device)
    return position_mask(positions[S - T:], positions, window=window, sink_tokens=sink_tokens)  # (T, S)


def check_mask(name: str, mask: object, *, module_ndim: bool = False) -> torch.Tensor:
    """A mask tensor, boolean (True = may attend) or floating-point (added to the scores).

    module_ndim: also require 2-D (T, S) or 4-D (B|1, H|1, T|1, S), the shapes MultiHeadAttention
    takes; a 3-D (B, T, S) mask would broadcast its batch axis against the heads.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool or float); got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be boolean (True = may attend) or floating-point (added to the scores); got "
                        f"dtype {mask.dtype} (for a 0/1 mask use mask.bool(); 1 = may attend)")
    if module_ndim and mask.ndim not in (2, 4):
        raise ValueError(f"{name} must be 2-D (T, S) or 4-D (B|1, H|1, T|1, S); got {mask.ndim}-D "
                         f"{shape_str(mask.shape)} (a 3-D mask is ambiguous: add the head axis, mask[:, None])")
    return mask


def with_causal(mask: torch.Tensor | None, T: int, S: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`mask` restricted to causal_mask(T, S): AND for a bool mask, -inf added for an additive float mask."""
    causal = causal_mask(T, S, device=device)  # (T, S)
    if mask is None:
        return causal
    check_mask("mask", mask)
    if mask.ndim == 0 or mask.shape[-1] not in (1, S) or (mask.ndim >= 2 and mask.shape[-2] not in (1, T)):
        raise ValueError(f"mask of shape {shape_str(mask.shape)} does not broadcast to the (T, S) = ({T}, {S}) "
                         f"causal mask")
    return restrict_mask(mask, causal)


def canonical_mask(attn_mask: torch.Tensor | None, is_causal: bool, T: int, S: int, *,
                   need_weights: bool = False, allowed: torch.Tensor | None = None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor | None, bool]:
    """The one form the attention core consumes: (mask or None, is_causal), made once, at the entrance.

    The queries are the last T of S positions (bottom-right aligned, as in causal_mask). The
    causal part is folded into the mask, except in the one case a fused kernel does it better:
    is_causal with T == S, no other mask and no weights asked for, which stays (None, True).
    allowed: a (T, S) bool mask from positions (a sliding window, sinks: `position_mask`) that
    replaces the causal one. The inputs are trusted (checked by the caller); a query row left with
    nothing to attend to is the core's to handle (output 0, weights 0).
    """
    if allowed is not None:
        return restrict_mask(attn_mask, allowed), False
    if not is_causal or T == 0 or S == 0:
        return attn_mask, False
    if attn_mask is None and not need_weights and T == S:
        return None, True  # the kernel's own causal path (no (T, S) mask is built)
    if attn_mask is None and T == 1:
        return None, False  # one new query is the last position: it sees every key
    return with_causal(attn_mask, T, S, device=device), False


def restrict_mask(mask: torch.Tensor | None, allowed: torch.Tensor) -> torch.Tensor:
    """`mask` (None, bool, or additive float) further limited to where the bool `allowed` is True.

    AND for a bool mask, -inf where `allowed` is False for an additive one. No checks: callers have
    validated both (with_causal, canonical_mask's `allowed` positions, ring attention's tiles).
    """
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def padding_mask(lengths: Sequence[int] | torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, 1, 1, max_len) bool, True for real tokens: key j of sequence b is real iff j < lengths[b].

    Shaped to broadcast over heads and queries against scores of shape (B, H, T, max_len).
    """
    max_len = check_positive_int("max_len", max_len)
    try:
        lengths = torch.as_tensor(lengths)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"lengths must be a 1-D sequence of ints (one per batch element); "
                        f"got {lengths!r:.60}") from None
    if lengths.ndim != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be a 1-D sequence of ints (one per batch element); got shape "
                         f"{shape_str(lengths.shape)} dtype {lengths.dtype}")
    if len(lengths) and (lengths.min() < 0 or lengths.max() > max_len):
        raise ValueError(f"lengths must lie in [0, max_len={max_len}]; got {lengths.tolist()}")
    keep = torch.arange(max_len, device=lengths.device) < lengths.unsqueeze(1)  # (B, max_len)
    return keep[:, None, None, :]  # (B, 1, 1, max_len)


def combine_masks(*masks: torch.Tensor | None) -> torch.Tensor | None:
    """One mask that allows a key only where every mask allows it; None entries are skipped.

    Boolean masks (True = may attend) are ANDed, and the result is boolean. If any mask is an
    additive float mask, the boolean ones become 0 / -inf in its dtype and all are added. Each mask
    is 2-D (T, S) or 4-D (B|1, H|1, T|1, S), as `MultiHeadAttention` takes them: a 3-D mask is
    refused, because (B, T, S) would broadcast its batch axis against the heads.
    """
    for i, m in enumerate(masks):
        if m is not None:
            check_mask(f"mask {i}", m, module_ndim=True)
    present = [m for m in masks if m is not None]
    if not present:
        return None
    if broadcast_shapes(*(tuple(m.shape) for m in present)) is None:
        raise ValueError("masks do not broadcast together: " + ", ".join(shape_str(m.shape) for m in present))
    additive = [m for m in present if m.dtype.is_floating_point]
    if not additive:
        allowed = present[0]
        for m in present[1:]:
            allowed = allowed & m
        return allowed
    dtype = additive[0].dtype
    for m in additive[1:]:
        dtype = torch.promote_types(dtype, m.dtype)
    out = None
    for m in present:
        term = to_additive_mask(m, dtype) if m.dtype == torch.bool else m.to(dtype)
        out = term if out is None else out + term
    return out


def _check_bool(mask: object, name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be boolean; got dtype {mask.dtype}")
    return mask


def to_torch_mha_mask(mask: torch.Tensor) -> torch.Tensor:
    """Our polarity (True = may attend) -> nn.MultiheadAttention's (True = ignore): the negation.

    Use it for nn.MultiheadAttention's `attn_mask` ((T, S) or (B*H, T, S)) and, applied to a
    (B, S) row of keys, for its `key_padding_mask`. Handing our mask over unconverted masks
    exactly the keys that should be seen and lets through the ones that should not.
    """
    return ~_check_bool(mask)


def from_torch_mha_mask(mask: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's boolean mask (True = ignore) -> ours (True = may attend)."""
    return ~_check_bool(mask)


def from_key_padding_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's key_padding_mask (B, S), True = padding -> ours (B, 1, 1, S), True = real."""
    key_padding_mask = _check_bool(key_padding_mask, "key_padding_mask")
    if key_padding_mask.ndim != 2:
        raise ValueError(f"key_padding_mask must be (B, S); got shape {shape_str(key_padding_mask.shape)}")
    return ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)


def to_additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask -> float mask to add to scores: 0 where allowed, -inf where not.

    -inf (not -1e9, not finfo.min) is exact in every float dtype: -1e9 overflows to -inf in
    float16 anyway, and finfo.min + a negative score overflows too. Fully masked rows must be
    handled by the softmax (course_lib's give zeros), not by a large finite constant.
    """
    mask = _check_bool(mask)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype (the mask is added to scores); got {dtype}")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))

"""Checkers for notebook 12 (today's attention): KV-cache bytes, grouped-query attention by hand,
interleaved rotary embeddings, and the receptive field of stacked sliding windows."""

from __future__ import annotations

import numpy as np
import torch

from course_lib.attention import repeat_kv
from course_lib.checks._core import CheckFailure, as_array, as_number, call, checker, compare, diagnose, is_close
from course_lib.masks import causal_mask
from course_lib.positional import RotaryEmbedding

__all__ = ["check_kv_cache_bytes", "check_gqa_attention", "check_interleaved_rope", "check_window_receptive_field"]


# (num_layers, num_heads, num_kv_heads, d_head, bytes_per_number): Llama-3-8B-like in bf16, an MQA and an MHA
_CACHE_CASES = ((32, 32, 8, 128, 2), (24, 16, 1, 64, 4), (12, 12, 12, 64, 2))


@checker
def check_kv_cache_bytes(fn):
    """Check the KV-cache size per token.

    Your function: `fn(num_layers, num_heads, num_kv_heads, d_head, bytes_per_number) -> bytes`, the bytes
    a key/value cache holds for ONE token across all layers. Three configurations, exact; names a missing
    factor 2 (keys and values), counting query heads instead of key/value heads, bits instead of bytes,
    and one layer instead of all.
    """
    for L, H, H_kv, d, nbytes in _CACHE_CASES:
        expected = 2 * L * H_kv * d * nbytes
        got = as_number(f"your answer for {(L, H, H_kv, d, nbytes)}", call(fn, L, H, H_kv, d, nbytes))
        mistakes = {
            "a factor 2 is missing: the cache holds keys AND values": expected / 2,
            "you counted query heads (num_heads): only the num_kv_heads key/value heads are cached": 2 * L * H * d
            * nbytes,
            "the answer is in bits: bytes_per_number is already in bytes": expected * 8,
            "that is one layer: every layer has its own cache (multiply by num_layers)": expected / L,
        }
        if got != expected:
            wrong = diagnose(np.float64(got), {m: np.float64(v) for m, v in mistakes.items() if v != expected})
            raise CheckFailure(f"for num_layers={L}, num_heads={H}, num_kv_heads={H_kv}, d_head={d}, "
                               f"bytes_per_number={nbytes}: got {got:g}, expected {expected}. "
                               + (wrong or "Hint: 2 (K and V) x layers x kv heads x d_head x bytes"))
    return f"{len(_CACHE_CASES)} configurations (GQA, MQA, MHA) match 2 * L * H_kv * d_head * bytes"


def _float64_answer(name: str, got, inputs: str) -> np.ndarray:
    """The learner's answer as an array, which must be float64 like the inputs: a float32 answer is off by
    its rounding (~1e-7) everywhere, and the message says so instead of showing two numbers that print alike."""
    arr = as_array(name, got)
    if isinstance(got, torch.Tensor | np.ndarray) and got.dtype not in (torch.float64, np.float64):
        dtype = str(got.dtype).removeprefix("torch.")
        raise CheckFailure(f"{name} is {dtype}, expected float64: {inputs} float64, and the answer must keep "
                           f"their precision (look for a .float(), a dtype=torch.float32 or a float32 array)")
    return arr


def _gqa_reference(q, k, v, layout="interleave"):
    n_rep = q.shape[1] // k.shape[1]
    if layout == "interleave":
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    else:  # tile: kv head h % H_kv serves query head h (the wrong grouping)
        k, v = k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1)
    T = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~causal_mask(T), float("-inf")), dim=-1) @ v


@checker
def check_gqa_attention(fn):
    """Check grouped-query causal attention written by hand.

    Your function: `fn(q, k, v) -> out` with q (B, H, T, d) and k, v (B, H_kv, T, d) float64 tensors,
    H_kv dividing H: query heads g * (H / H_kv) ... (g + 1) * (H / H_kv) - 1 share key/value head g. Causal,
    scaled by 1/sqrt(d); out (B, H, T, d). Three shapes (GQA, MQA, MHA), to 1e-8; names the tiled (wrong)
    grouping, a missing causal mask, a missing scale, and an answer in float32 (or complex) instead of float64.
    """
    g = torch.Generator().manual_seed(12)
    for H, H_kv in ((6, 2), (4, 1), (3, 3)):
        B, T, d = 2, 5, 4
        q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
        k, v = (torch.randn(B, H_kv, T, d, generator=g, dtype=torch.float64) for _ in range(2))
        expected = _gqa_reference(q, k, v)
        got = _float64_answer(f"out for H={H}, H_kv={H_kv}", call(fn, q, k, v, what=f" (H={H}, H_kv={H_kv})"),
                              "q, k and v are")
        if not is_close(got, expected, atol=1e-8, rtol=1e-6):
            n_rep = H // H_kv
            unscaled = torch.softmax((q @ repeat_kv(k, n_rep).transpose(-2, -1)).masked_fill(
                ~causal_mask(T), float("-inf")), dim=-1) @ repeat_kv(v, n_rep)
            full = torch.softmax(q @ repeat_kv(k, n_rep).transpose(-2, -1) / d ** 0.5, dim=-1) @ repeat_kv(v, n_rep)
            wrong = diagnose(got, {
                "the grouping is tiled: query head h used kv head h % H_kv (k.repeat), but consecutive query "
                "heads share a kv head (h // (H / H_kv)): use repeat_interleave along the head axis":
                    _gqa_reference(q, k, v, "tile") if H_kv not in (1, H) else None,
                "no causal mask: query i must not see keys j > i": full,
                "the scores are not divided by sqrt(d)": unscaled,
            })
            if wrong:
                raise CheckFailure(f"for H={H}, H_kv={H_kv}: {wrong}")
        compare(f"out for H={H}, H_kv={H_kv}", got, expected, atol=1e-8, rtol=1e-6,
                hint="repeat each kv head H / H_kv times (repeat_interleave, dim=1), then causal attention")
    return "GQA (6 heads, 2 kv), MQA (4 heads, 1 kv) and MHA match the reference"


@checker
def check_interleaved_rope(fn):
    """Check the interleaved rotary embedding (RoFormer, GPT-J, DeepSeek's checkpoints).

    Your function: `fn(x, offset) -> rotated` with x a (T, d) float64 tensor at positions offset ...
    offset + T - 1: pair (x[2i], x[2i+1]) turns by the angle pos * 10000^(-2i / d). Three cases, to 1e-10;
    names the rotate-half layout, a rotation the wrong way, an ignored offset, and an answer that is complex
    or not float64.
    """
    g = torch.Generator().manual_seed(7)
    for T, d, offset in ((5, 8, 0), (4, 16, 9), (3, 2, 100)):
        x = torch.randn(T, d, generator=g, dtype=torch.float64)
        expected = RotaryEmbedding(d, interleaved=True)(x, offset=offset)
        got = _float64_answer(f"rotated x for T={T}, d={d}, offset={offset}",
                              call(fn, x, offset, what=f" (offset={offset})"), "x is")
        if not is_close(got, expected, atol=1e-10, rtol=1e-8):
            cos, sin = RotaryEmbedding(d).cos_sin(torch.arange(offset, offset + T), torch.float64)  # (T, d/2)
            back = torch.stack((x[:, 0::2] * cos + x[:, 1::2] * sin, x[:, 1::2] * cos - x[:, 0::2] * sin),
                               dim=-1).flatten(-2)  # turned by -angle
            wrong = diagnose(got, {
                "that is the rotate-half layout (x[i] paired with x[i + d/2]); here pairs are neighbours "
                "(x[2i], x[2i+1])": RotaryEmbedding(d)(x, offset=offset) if d > 2 else None,
                "the rotation goes the wrong way: a' = a cos - b sin, b' = b cos + a sin": back,
                "the offset is ignored: the first row is at position offset, not 0":
                    RotaryEmbedding(d, interleaved=True)(x, offset=0) if offset else None,
            })
            if wrong:
                raise CheckFailure(f"for T={T}, d={d}, offset={offset}: {wrong}")
        compare(f"rotated x for T={T}, d={d}, offset={offset}", got, expected, atol=1e-10, rtol=1e-8,
                hint="angle[p, i] = p * 10000 ** (-2i / d) for p = offset + row; out[:, 0::2] = a cos - b sin, "
                     "out[:, 1::2] = b cos + a sin with a = x[:, 0::2], b = x[:, 1::2]")
    return "3 cases (d = 8, 16, 2; offsets 0, 9, 100) match"


@checker
def check_window_receptive_field(fn):
    """Check the receptive field of stacked sliding windows.

    Your function: `fn(num_layers, window) -> n`, how many input positions (itself included) the last
    token's output after num_layers causal sliding-window layers can depend on, for a long sequence; each
    layer lets a token see itself and the window - 1 before it. Names layers x window, the single window
    and window ** layers.
    """
    for L, W in ((1, 4), (3, 4), (6, 2), (4, 5)):
        expected = L * (W - 1) + 1
        got = as_number(f"your answer for num_layers={L}, window={W}", call(fn, L, W))
        if got != expected:
            named = {"layers x window counts the token itself once per layer: each layer reaches only "
                     "window - 1 positions further back": L * W,
                     "that is one layer's window: each layer adds window - 1 more positions": W,
                     "the reach adds up layer by layer, it does not multiply": W ** L}
            wrong = next((m for m, v in named.items() if v == got and v != expected), None)
            raise CheckFailure(f"for num_layers={L}, window={W}: got {got:g}, expected {expected}. "
                               + (wrong or "Hint: count how far back one layer reaches, then stack them"))
    return "4 (layers, window) pairs match layers * (window - 1) + 1"

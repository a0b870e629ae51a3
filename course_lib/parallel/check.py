"""Checking a module split across ranks against the single-device MultiHeadAttention.

Every rank builds the same module, inputs, mask and output gradient from one seed
(`example_case`), runs the single-device module itself, then its shard of the parallel one, and
compares the two (`max_abs_error`). Nothing needs to be gathered in one place: each rank checks
its own part. `report` turns the results into the one-line verdicts the self-checks print.
"""

from __future__ import annotations

import math

import torch

from course_lib.masks import causal_mask, combine_masks, padding_mask
from course_lib.mha import MultiHeadAttention

__all__ = ["check_plain_mha", "example_case", "grad_of", "max_abs_error", "report", "TOLERANCE"]

TOLERANCE = 1e-5  # float32: the parallel modules add and rescale in another order than the single one


def check_plain_mha(mha: object, what: str) -> MultiHeadAttention:
    """`mha` if it is a MultiHeadAttention without the options of notebook 12, which the split modules do not shard.

    Shared key/value heads, rotary positions, windows and sinks change which heads and positions a
    rank needs; refusing them up front beats a wrong answer on some rank.
    """
    if not isinstance(mha, MultiHeadAttention):
        raise TypeError(f"mha must be a course_lib.MultiHeadAttention; got {type(mha).__name__}")
    options = {"num_kv_heads": mha.num_kv_heads if mha.num_kv_heads != mha.num_heads else None,
               "rotary": mha.rotary, "window": getattr(mha, "window", None),  # DecoderAttention's options
               "learned_sink": getattr(mha, "sink_logits", None) is not None or None}
    used = [f"{name}={value!r}" for name, value in options.items() if value is not None]
    if used:
        raise ValueError(f"mha uses {', '.join(used)}: {what} splits plain multi-head attention only "
                         f"(num_kv_heads = num_heads, no rotary, window or learned sink)")
    return mha


def example_case(case: dict, seed: int = 0):
    """(mha, query, memory or None, mask or None, grad_out): the same on every rank for the same seed.

    case: B, T, d_model, heads; S and cross=True for cross-attention to a memory (B, S, d_model);
    mask: words among "padding" (sequence b has S - 2b real keys, at least 1), "causal" (a mask
    tensor) and "is_causal" (the flag, which the caller passes itself).
    """
    gen = torch.Generator().manual_seed(seed)
    B, T, S, D, H = case["B"], case["T"], case.get("S", case["T"]), case["d_model"], case["heads"]
    torch.manual_seed(seed)
    mha = MultiHeadAttention(D, H)
    query = torch.randn(B, T, D, generator=gen, requires_grad=True)  # (B, T, d_model)
    memory = torch.randn(B, S, D, generator=gen, requires_grad=True) if case.get("cross") else None
    words = case.get("mask", "").split()
    pad = padding_mask([max(1, S - 2 * b) for b in range(B)], S) if "padding" in words else None  # (B, 1, 1, S)
    causal = causal_mask(T, S) if "causal" in words else None  # (T, S)
    grad_out = torch.randn(B, T, D, generator=gen)  # the gradient of the loss with respect to the output
    return mha, query, memory, combine_masks(pad, causal), grad_out


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| as a float (0 for empty tensors; NaN if either has NaN, which fails any `< tol`)."""
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def grad_of(t: torch.Tensor | None) -> torch.Tensor:
    """t.grad, which the backward pass of a check has filled (a tensor it did not reach is a bug of the check)."""
    assert t is not None and t.grad is not None, "the backward pass did not reach this tensor"
    return t.grad


def report(results: list[dict], world_size: int, rank: int) -> str:
    """One line per compared case: ok when every error is below TOLERANCE and the bytes equal the formula.

    A NaN error (or a case with no errors at all) is FAILED, and the line shows the NaN: `max` alone
    would drop it, since every comparison with NaN is False.
    """
    lines = []
    for result in results:
        errors = [float(e) for e in result["errors"].values()]
        worst = math.nan if not errors or any(math.isnan(e) for e in errors) else max(errors)
        bytes_ok = (result["sent forward"], result["sent backward"]) == (result["expected forward"],
                                                                         result["expected backward"])
        verdict = "ok" if worst < TOLERANCE and bytes_ok else "FAILED"  # NaN < TOLERANCE is False
        lines.append(f"[{verdict}] R={world_size} rank {rank} {result['case']}: max error {worst:.1e}, bytes sent "
                     f"forward {result['sent forward']} (formula {result['expected forward']}), backward "
                     f"{result['sent backward']} (formula {result['expected backward']})")
    return "\n".join(lines)

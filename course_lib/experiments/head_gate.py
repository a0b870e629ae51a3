"""One way to gate attention heads: scale head h's part of W_O's input by a gate xi_h.

Every attention of the course (`course_lib.MultiHeadAttention`) ends with

    out = concat_h(head_h) W_O,    W_O = out_proj,

and out_proj's input (B, T, H * d_head) holds head h in features h*d_head ... (h+1)*d_head - 1
(`course_lib.mha.merge_heads`). A forward pre-hook on out_proj multiplies that slice by xi_h
(Michel et al. 2019, "Are Sixteen Heads Really Better than One?"):

    out = concat_h(xi_h * head_h) W_O

xi_h = 1 leaves head h as it is, xi_h = 0 removes it. The hook is part of the forward pass, so a gate
that requires grad receives dL/dxi_h, Michel et al.'s head importance. Nothing of the attention is
written again here: the module computes its heads as always (torch's fused kernel or the math path,
grouped-query attention, a KV cache), and the gate sees only what they hand to W_O.

    with gated_heads({attn: torch.tensor([1.0, 0.0, 1.0, 1.0])}):
        model(x)  # head 1 of attn contributes nothing; the hooks are gone after the block
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["gate_heads", "gated_heads"]


def gate_heads(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x (B, T, H * d_head), the concatenated heads, with head h scaled by gate[..., h].

    gate: (H,) for every example, or (B, H), one gate per example (per-example gate gradients).
    The gate is converted to x's dtype and device; gradients flow to it.
    """
    H = gate.shape[-1]
    B, T, D = x.shape
    g = gate.to(device=x.device, dtype=x.dtype).reshape(-1, 1, H, 1)  # (1|B, 1, H, 1)
    return (x.reshape(B, T, H, D // H) * g).reshape(B, T, D)


def _check_gate(attn: nn.Module, gate: object) -> tuple[nn.Module, int, torch.Tensor]:
    """(out_proj, num_heads, gate) of one entry of gated_heads, checked."""
    out_proj = getattr(attn, "out_proj", None)
    H = getattr(attn, "num_heads", None)
    if not isinstance(out_proj, nn.Module) or not isinstance(H, int):
        raise TypeError(f"gated_heads: each key must be an attention module with out_proj and num_heads "
                        f"(a course_lib.MultiHeadAttention); got {type(attn).__name__}")
    if not isinstance(gate, torch.Tensor) or not gate.dtype.is_floating_point:
        raise TypeError(f"gated_heads: a gate must be a floating-point torch.Tensor of shape ({H},) or (B, {H}); "
                        f"got {type(gate).__name__}" + (f" of dtype {gate.dtype}" if isinstance(gate, torch.Tensor)
                                                         else ""))
    if gate.ndim not in (1, 2) or gate.shape[-1] != H:
        raise ValueError(f"gated_heads: a gate must have shape ({H},) or (B, {H}) (num_heads={H}); "
                         f"got {tuple(gate.shape)}")
    return out_proj, H, gate


def _hook(gate: torch.Tensor, num_heads: int):
    def hook(module: nn.Module, args: tuple) -> tuple:
        (x,) = args  # (B, T, H * d_head): the heads, concatenated
        if x.ndim != 3 or x.shape[-1] % num_heads:
            raise ValueError(f"gated_heads: out_proj's input must be (B, T, num_heads * d_head) with "
                             f"num_heads={num_heads}; got {tuple(x.shape)}")
        if gate.ndim == 2 and gate.shape[0] != x.shape[0]:
            raise ValueError(f"gated_heads: a (B, H) gate needs one row per example; got a gate of shape "
                             f"{tuple(gate.shape)} for a batch of {x.shape[0]}")
        return (gate_heads(x, gate),)
    return hook


@contextmanager
def gated_heads(gates: Mapping[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Inside the block, each attention's head h is scaled by its gate[..., h] before W_O.

    gates: {attention module: gate}, the gate (num_heads,) or (B, num_heads) (one row per example of
    each call). Every gate is checked before any hook is registered, and the hooks are removed on
    leaving the block, also when it raises. The modules' weights are never touched.
    """
    checked = [_check_gate(attn, gate) for attn, gate in gates.items()]
    handles = []
    try:
        for out_proj, num_heads, gate in checked:
            handles.append(out_proj.register_forward_pre_hook(_hook(gate, num_heads)))
        yield
    finally:
        for handle in handles:
            handle.remove()

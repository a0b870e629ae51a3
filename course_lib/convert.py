"""Copy the weights of torch's and Hugging Face's attention modules into MultiHeadAttention.

MultiHeadAttention.from_torch and .from_hf_bert call these functions; they take the class to build
(cls), so this module needs nothing from mha.py (`Projections` says what they fill). Each copies
exactly, so the outputs match (tests/unit/test_mha.py, notebook 04), or refuses what it cannot copy
by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, Self, TypeVar

import torch
from torch import nn

__all__ = ["from_torch", "from_hf_bert", "copy_linear"]


class Projections(Protocol):
    """What a conversion fills: the four projections of a MultiHeadAttention (or of a subclass)."""

    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    out_proj: nn.Linear

    def train(self, mode: bool = True) -> Self: ...


M = TypeVar("M", bound=Projections)


def from_torch(cls: Callable[..., M], module: nn.MultiheadAttention) -> M:
    """Copy an nn.MultiheadAttention's weights. Call the result batch-first, with OUR mask polarity."""
    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError(f"module must be a torch.nn.MultiheadAttention; got {type(module).__name__}")
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn has no equivalent here")
    w = module.out_proj.weight
    new = cls(module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
              kdim=module.kdim, vdim=module.vdim, device=w.device, dtype=w.dtype)
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    with torch.no_grad():
        for lin, weight in ((new.q_proj, wq), (new.k_proj, wk), (new.v_proj, wv)):
            lin.weight.copy_(weight)
        new.out_proj.weight.copy_(module.out_proj.weight)
        if module.in_proj_bias is not None:
            for lin, b in zip((new.q_proj, new.k_proj, new.v_proj), module.in_proj_bias.chunk(3), strict=True):
                lin.bias.copy_(b)
            new.out_proj.bias.copy_(module.out_proj.bias)
    return new.train(module.training)


def copy_linear(ours: nn.Linear, theirs: nn.Linear) -> None:
    """ours.weight (and bias, if theirs has one) := theirs', in place; call under torch.no_grad()."""
    ours.weight.copy_(theirs.weight)
    if theirs.bias is not None:
        ours.bias.copy_(theirs.bias)


def from_hf_bert(cls: Callable[..., M], attention: nn.Module) -> M:
    """Copy a Hugging Face BertAttention (layer.attention): query/key/value, then output.dense as W_O.

    The result computes BERT's attention up to (and including) the output dense layer, i.e.
    before BERT's dropout + residual + LayerNorm.
    """
    self_attn, output = getattr(attention, "self", None), getattr(attention, "output", None)
    if self_attn is None or output is None or not hasattr(self_attn, "query") or not hasattr(output, "dense"):
        raise TypeError(f"attention must be a BertAttention (with .self.query/key/value and .output.dense); "
                        f"got {type(attention).__name__}")
    d_model, num_heads = self_attn.query.in_features, self_attn.num_attention_heads
    if self_attn.query.out_features != d_model or output.dense.out_features != d_model:
        raise ValueError(f"from_hf_bert expects query and output.dense to map {d_model} -> {d_model} features; got "
                         f"query {self_attn.query.out_features}, output.dense {output.dense.out_features}")
    w = self_attn.query.weight
    new = cls(d_model, num_heads, dropout=float(self_attn.dropout.p), bias=self_attn.query.bias is not None,
              device=w.device, dtype=w.dtype)
    with torch.no_grad():
        pairs = ((new.q_proj, self_attn.query), (new.k_proj, self_attn.key), (new.v_proj, self_attn.value),
                 (new.out_proj, output.dense))
        for ours, theirs in pairs:
            copy_linear(ours, theirs)
    return new.train(attention.training)

"""Copy Hugging Face decoder attention (Llama, Mistral, gpt-oss) into course_lib.modern.DecoderAttention.

DecoderAttention.from_hf calls this function (it takes the class to build, so this module needs
nothing from decoder_attention.py). It copies exactly or refuses by name: a module whose
projections, rotary pairing or scaling differ is refused, not converted approximately.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from course_lib.convert import Projections, copy_linear
from course_lib.positional import ROPE_TYPES, RotaryEmbedding

__all__ = ["from_hf_decoder_attention", "SUPPORTED"]


class DecoderProjections(Projections, Protocol):
    """What from_hf_decoder_attention fills: a DecoderAttention's projections and its learned sink, if any."""

    sink_logits: nn.Parameter | None


D = TypeVar("D", bound=DecoderProjections)

SUPPORTED = ("LlamaAttention", "MistralAttention", "GptOssAttention")
HF_ROPE_TYPES = ("default", *(t for t in ROPE_TYPES if t != "ntk"))  # "ntk" (static) is course_lib's own
UNSUPPORTED = {  # what a close relative does differently
    "Qwen2Attention": "q/k/v have a bias and o_proj has none",
    "CohereAttention": "its RoPE pairs neighbouring features (interleaved), not the two halves",
}


def from_hf_decoder_attention(cls: Callable[..., D], attention: Any) -> D:
    """Copy a Hugging Face Llama, Mistral or gpt-oss attention (q_proj, k_proj, v_proj, o_proj + config).

    Reads from `attention.config`: num_attention_heads, num_key_value_heads, the rotary base and its
    long-context scaling (rope_parameters: rope_type "default", "linear", "dynamic", "llama3" or
    "yarn", see course_lib.positional.rope_inv_freq), the sliding window (Mistral's
    config.sliding_window, or the layer's own `sliding_window` in gpt-oss) and gpt-oss's `sinks`.
    The result computes the attention of one layer (input: the normalised hidden states), with
    is_causal=True.
    """
    kind = type(attention).__name__
    if kind not in SUPPORTED:
        raise TypeError(f"attention must be one of {', '.join(SUPPORTED)} (Hugging Face), copied exactly; got "
                        f"{kind}" + (f": {UNSUPPORTED[kind]}" if kind in UNSUPPORTED else ""))
    config = getattr(attention, "config", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if config is None or not all(isinstance(getattr(attention, n, None), nn.Linear) for n in names):
        raise TypeError(f"attention must be a Hugging Face decoder attention with .config and q/k/v/o_proj; "
                        f"got {kind}")
    biases = {n: getattr(attention, n).bias is not None for n in names}
    if len(set(biases.values())) > 1:
        raise ValueError(f"{kind} has a bias on some projections only ({biases}); DecoderAttention has one "
                         f"bias setting for all four, so it cannot copy this module exactly")
    d_model, num_heads = config.hidden_size, config.num_attention_heads
    d_head = getattr(attention, "head_dim", d_model // num_heads)
    if d_head * num_heads != d_model:
        raise ValueError(f"this module needs head_dim * num_attention_heads = hidden_size; got head_dim={d_head}, "
                         f"num_attention_heads={num_heads}, hidden_size={d_model}")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    base = float(rope.pop("rope_theta", 10000.0))
    rope_type = rope.setdefault("rope_type", "default")
    if rope_type not in HF_ROPE_TYPES:
        raise ValueError(f"rope_parameters['rope_type'] must be one of {', '.join(map(repr, HF_ROPE_TYPES))} to be "
                         f"copied exactly; got {rope_type!r}")
    if rope_type == "dynamic":  # Hugging Face's dynamic NTK counts from max_position_embeddings
        rope["original_max_position_embeddings"] = config.max_position_embeddings
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope_parameters['partial_rotary_factor'] must be 1 (RoPE on every feature of a head); "
                         f"got {config.rope_parameters['partial_rotary_factor']}")
    if rope_type == "yarn" and rope.get("factor") is None and rope.get("original_max_position_embeddings"):
        # as Hugging Face does when the factor is left out
        rope["factor"] = config.max_position_embeddings / rope["original_max_position_embeddings"]
    window = getattr(attention, "sliding_window", None) if hasattr(attention, "sinks") else \
        getattr(config, "sliding_window", None)
    w = attention.q_proj.weight
    new = cls(d_model, num_heads, num_kv_heads=config.num_key_value_heads, bias=attention.q_proj.bias is not None,
              dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
              rotary=RotaryEmbedding(d_head, base=base, scaling=rope),
              window=window, learned_sink=hasattr(attention, "sinks"), device=w.device, dtype=w.dtype)
    with torch.no_grad():
        for ours, theirs in zip((new.q_proj, new.k_proj, new.v_proj, new.out_proj),
                                (getattr(attention, n) for n in names), strict=True):
            copy_linear(ours, theirs)
        if new.sink_logits is not None:
            new.sink_logits.copy_(attention.sinks)
    return new.train(attention.training)

"""SwiGLUFeedForward equals Hugging Face's LlamaMLP with copied weights; the stated parameter and FLOP counts
equal numel() and torch's FlopCounterMode; bad input is refused with a message naming the argument."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from course_lib.blocks import FeedForward
from course_lib.cost.flops import feed_forward_flops, feed_forward_params
from course_lib.modern import SwiGLUFeedForward


def test_swiglu_equals_llama_mlp_with_copied_weights():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4,
                                      num_key_value_heads=4, hidden_act="silu")
    theirs = LlamaMLP(config).double()
    ours = SwiGLUFeedForward.from_hf_llama_mlp(theirs)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    assert ours.gate_proj.weight.dtype == torch.float64
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-12, rtol=0)


def test_swiglu_is_the_formula():
    torch.manual_seed(1)
    ffn = SwiGLUFeedForward(8, 12)
    x = torch.randn(3, 8)
    gate, up = x @ ffn.gate_proj.weight.T, x @ ffn.up_proj.weight.T
    expected = (gate * torch.sigmoid(gate) * up) @ ffn.down_proj.weight.T
    torch.testing.assert_close(ffn(x), expected)


@pytest.mark.parametrize("d_model, d_ff", [(8, 12), (64, 171), (5, 7)])
def test_parameter_counts_equal_numel(d_model, d_ff):
    def numel(module):
        return sum(p.numel() for p in module.parameters())

    assert feed_forward_params(d_model, d_ff, gated=True) == numel(SwiGLUFeedForward(d_model, d_ff))
    assert feed_forward_params(d_model, d_ff, gated=False) == numel(FeedForward(d_model, d_ff))


@pytest.mark.parametrize("gated", [True, False])
def test_flop_counts_equal_flop_counter_mode(gated):
    B, T, d_model, d_ff = 2, 7, 16, 40
    module = SwiGLUFeedForward(d_model, d_ff) if gated else FeedForward(d_model, d_ff)
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(B, T, d_model))
    assert counter.get_total_flops() == feed_forward_flops(B * T, d_model, d_ff, gated=gated)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="d_ff"):
        SwiGLUFeedForward(8, 0)
    with pytest.raises(TypeError, match="bias"):
        SwiGLUFeedForward(8, 4, bias="no")
    with pytest.raises(ValueError, match="d_model=8"):
        SwiGLUFeedForward(8, 4)(torch.randn(2, 5))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        SwiGLUFeedForward(8, 4)([1.0] * 8)
    with pytest.raises(TypeError, match="gate_proj"):
        SwiGLUFeedForward.from_hf_llama_mlp(FeedForward(8, 4))
    with pytest.raises(TypeError, match="gated"):
        feed_forward_params(8, 4, gated=1)
    with pytest.raises(ValueError, match="tokens"):
        feed_forward_flops(0, 8, 4, gated=True)

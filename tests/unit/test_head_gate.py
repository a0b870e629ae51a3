"""The one head gate (course_lib.experiments.head_gate): a pre-hook on out_proj that scales head h's features."""

from __future__ import annotations

import pytest
import torch

from course_lib import MultiHeadAttention
from course_lib.experiments.head_gate import gate_heads, gated_heads

D, H = 16, 4
D_HEAD = D // H


def _concat_seen(attn: MultiHeadAttention, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """What out_proj received (after any pre-hook) in one call of attn(x)."""
    seen = []
    handle = attn.out_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        attn(x, **kwargs)
    finally:
        handle.remove()
    return seen[0]


def test_gate_heads_scales_each_heads_slice():
    heads = torch.randn(2, H, 5, D_HEAD, dtype=torch.float64)  # (B, H, T, d_head)
    concat = heads.transpose(1, 2).reshape(2, 5, D)  # merge_heads
    for gate in (torch.tensor([1.0, 0.0, 2.0, -1.0], dtype=torch.float64), torch.rand(2, H, dtype=torch.float64)):
        expected = (heads * gate.reshape(-1, H, 1, 1)).transpose(1, 2).reshape(2, 5, D)
        assert torch.equal(gate_heads(concat, gate), expected)


@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])  # MHA, grouped-query, multi-query
@pytest.mark.parametrize("need_weights", [False, True])  # torch's fused kernel and the math path
def test_a_gate_of_zero_removes_the_head_and_ones_change_nothing(num_kv_heads, need_weights):
    torch.manual_seed(0)
    attn = MultiHeadAttention(D, H, num_kv_heads=num_kv_heads).eval()
    x = torch.randn(3, 6, D)
    with torch.no_grad():
        plain = _concat_seen(attn, x, need_weights=need_weights)
        with gated_heads({attn: torch.ones(H)}):
            assert torch.equal(_concat_seen(attn, x, need_weights=need_weights), plain)
        with gated_heads({attn: torch.tensor([1.0, 0.0, 1.0, 1.0])}):
            gated = _concat_seen(attn, x, need_weights=need_weights)
    assert torch.count_nonzero(gated[..., D_HEAD:2 * D_HEAD]) == 0
    assert torch.equal(gated[..., :D_HEAD], plain[..., :D_HEAD])
    assert torch.equal(gated[..., 2 * D_HEAD:], plain[..., 2 * D_HEAD:])


def test_the_gate_gradient_is_the_heads_contribution():
    """dL/dxi_h = sum over head h's features of (dL/d concat) * head_h, for a gate per example."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(D, H, num_kv_heads=2, dtype=torch.float64).eval()
    x = torch.randn(3, 6, D, dtype=torch.float64)
    gate = torch.rand(3, H, dtype=torch.float64, requires_grad=True)  # (B, H)
    with gated_heads({attn: gate}):
        out = attn(x)
    (grad,) = torch.autograd.grad(out.square().sum(), gate)
    with torch.no_grad():
        concat = _concat_seen(attn, x)  # ungated heads (B, T, H * d_head)
    scaled = gate.detach().repeat_interleave(D_HEAD, dim=-1)[:, None, :] * concat  # the gated input, by hand
    d_concat = (2 * attn.out_proj(scaled)) @ attn.out_proj.weight  # dL/d(gated input)
    expected = (d_concat * concat).reshape(3, 6, H, D_HEAD).sum(dim=(1, 3))
    torch.testing.assert_close(grad, expected)


def test_hooks_are_removed_after_the_block_also_when_it_raises():
    attn = MultiHeadAttention(D, H)
    with gated_heads({attn: torch.zeros(H)}):
        assert len(attn.out_proj._forward_pre_hooks) == 1
    assert not attn.out_proj._forward_pre_hooks
    with pytest.raises(RuntimeError, match="inside"), gated_heads({attn: torch.zeros(H)}):
        raise RuntimeError("inside the block")
    assert not attn.out_proj._forward_pre_hooks


@pytest.mark.parametrize(("other", "gate", "error", "match"), [
    ("attn", torch.ones(H + 1), ValueError, r"shape \(4,\) or \(B, 4\).*got \(5,\)"),
    ("attn", torch.ones(2, 3, H), ValueError, r"got \(2, 3, 4\)"),
    ("attn", torch.ones(H, dtype=torch.long), TypeError, "floating-point torch.Tensor"),
    ("attn", [1.0] * H, TypeError, "got list"),
    ("linear", torch.ones(H), TypeError, "attention module with out_proj and num_heads"),
])
def test_bad_gates_are_refused_before_any_hook(other, gate, error, match):
    good = MultiHeadAttention(D, H)
    bad = MultiHeadAttention(D, H) if other == "attn" else torch.nn.Linear(D, D)
    with pytest.raises(error, match=match), gated_heads({good: torch.ones(H), bad: gate}):
        pass
    assert not good.out_proj._forward_pre_hooks
    assert other == "linear" or not bad.out_proj._forward_pre_hooks


def test_a_gate_per_example_must_match_the_batch():
    attn = MultiHeadAttention(D, H)
    with pytest.raises(ValueError, match="one row per example"), gated_heads({attn: torch.ones(2, H)}):
        attn(torch.randn(3, 5, D))
    assert not attn.out_proj._forward_pre_hooks

"""Removing heads from the capstone model: gated exactly, on both attention paths, and undone afterwards."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from course_lib.experiments.capstone import (
    attention_modules,
    build_capstone_model,
    encode_pairs,
    removed_heads,
    teacher_forced_metrics,
)
from course_lib.experiments.toy_translation import load_split
from course_lib.experiments.training import collate_pairs


@pytest.fixture(scope="module")
def setup():
    model, src_vocab, tgt_vocab = build_capstone_model(0)
    model.eval()
    pairs = load_split("validation")[:16]
    return model, src_vocab, tgt_vocab, pairs, collate_pairs(encode_pairs(pairs, src_vocab, tgt_vocab))


def test_names_cover_every_attention(setup):
    model = setup[0]
    assert list(attention_modules(model)) == ["encoder 1 self", "encoder 2 self", "decoder 1 self", "decoder 1 cross",
                                              "decoder 2 self", "decoder 2 cross"]


def test_a_removed_head_contributes_nothing_on_both_paths(setup):
    model, _, _, _, (src, tgt_in, _) = setup
    attn = attention_modules(model)["decoder 1 cross"]
    seen = []
    handle = attn.out_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))  # gated input
    try:
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            seen.clear()
            with torch.no_grad(), sdpa_kernel(backend), removed_heads(model, [("decoder 1 cross", 1)]):
                model(src, tgt_in)
            d_head = attn.d_head
            assert seen and all(torch.count_nonzero(x[..., d_head:2 * d_head]) == 0 for x in seen)
            assert all(torch.count_nonzero(x[..., :d_head]) > 0 for x in seen)
    finally:
        handle.remove()


def test_removal_changes_the_output_and_is_undone(setup):
    model, src_vocab, tgt_vocab, pairs, (src, tgt_in, _) = setup
    with torch.no_grad():
        before = model(src, tgt_in)
        with removed_heads(model, [("encoder 1 self", 0), ("decoder 2 self", 3)]):
            during = model(src, tgt_in)
        after = model(src, tgt_in)
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)
    assert not any(a.out_proj._forward_pre_hooks for a in attention_modules(model).values())
    with pytest.raises(RuntimeError), removed_heads(model, [("decoder 1 self", 0)]):
        raise RuntimeError("inside the block")
    assert not any(a.out_proj._forward_pre_hooks for a in attention_modules(model).values())
    loss, acc = teacher_forced_metrics(model, pairs, src_vocab, tgt_vocab)
    assert loss > 0 and 0 <= acc <= 1


@pytest.mark.parametrize(("heads", "match"), [([("decoder 9 self", 0)], "no attention named"),
                                              ([("decoder 1 self", 4)], "head index"),
                                              ([("decoder 1 self", True)], "head index")])
def test_bad_heads_are_refused_before_any_hook(setup, heads, match):
    model = setup[0]
    with pytest.raises(ValueError, match=match), removed_heads(model, heads):
        pass
    assert not any(a.out_proj._forward_pre_hooks for a in attention_modules(model).values())


# ------------------------------------------------------------------ ranking heads by what their removal costs
def test_head_cost_counts_tokens_and_rounds_the_loss_rise():
    from course_lib.experiments.capstone import HeadCost, head_cost

    # 2000 tokens: accuracy 1.0 -> 0.9965 is 7 tokens lost; a rise of 0.0614 rounds to 0.061
    cost = head_cost((0.0007, 1.0), (0.0621, 0.9965), 2000)
    assert isinstance(cost, HeadCost)
    assert cost.tokens_lost == 7
    assert cost.loss_rise == pytest.approx(0.061)
    # rises at float rounding level (1e-9) are the same rounded rise, 0, whatever their order
    assert head_cost((2.3e-8, 1.0), (2.3e-8 + 3e-9, 1.0), 2000) == head_cost((2.3e-8, 1.0), (2.3e-8 + 1e-9, 1.0), 2000)
    assert head_cost((2.3e-8, 1.0), (2.3e-8 + 3e-9, 1.0), 2000).loss_rise == 0.0
    assert head_cost((0.0, 1.0), (0.004, 1.0), 10, resolution=1e-2).loss_rise == 0.0
    assert head_cost((0.0, 1.0), (0.006, 1.0), 10, resolution=1e-2).loss_rise == pytest.approx(0.01)


def test_rank_heads_tokens_first_then_rounded_rise_then_given_order():
    from course_lib.experiments.capstone import HeadCost, rank_heads

    costs = {"a": HeadCost(0, 0.0), "b": HeadCost(0, 0.002), "c": HeadCost(5, 0.001), "d": HeadCost(5, 0.003),
             "e": HeadCost(0, 0.0), "f": HeadCost(0, 0.002)}
    # d beats c on the rise (same tokens); c beats b although b's rise is larger (tokens come first);
    # b before f and a before e: ties keep the given order
    assert rank_heads(costs) == ["d", "c", "b", "f", "a", "e"]
    # a pruning order: least important first, ties still in the given order (not the ranking reversed)
    assert rank_heads(costs, least_important_first=True) == ["a", "e", "b", "f", "c", "d"]


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), [
    (((0.0, 1.0), (0.1, 0.9), 0), {}, ValueError, "n_tokens"),
    (((0.0, 1.0), (0.1, 0.9), 10), {"resolution": 0.0}, ValueError, "resolution"),
    (((0.0, 1.0), (0.1, 1.5), 10), {}, ValueError, "removed: token accuracy"),
    (((0.0,), (0.1, 0.9), 10), {}, TypeError, "base must be"),
])
def test_head_cost_refuses_bad_input(args, kwargs, error, match):
    from course_lib.experiments.capstone import head_cost

    with pytest.raises(error, match=match):
        head_cost(*args, **kwargs)


def test_rank_heads_refuses_raw_losses():
    from course_lib.experiments.capstone import rank_heads

    with pytest.raises(TypeError, match=r"costs\['a'\] must be a HeadCost"):
        rank_heads({"a": (0.1, 0.9)})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="least_important_first"):
        rank_heads({}, least_important_first=1)  # type: ignore[arg-type]

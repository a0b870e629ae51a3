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

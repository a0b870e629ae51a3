"""The notebook-05 checkers accept the reference and reject planted wrong solutions with useful messages."""

from __future__ import annotations

import pytest
import torch

from course_lib import checks
from course_lib.masks import causal_mask, combine_masks, padding_mask, to_torch_mha_mask


# ----------------------------------------------------------------------------- causal + padding mask
def mask_ref(lengths, T):
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    keys = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    return (j <= i)[None, None] & keys[:, None, None, :]  # (B, 1, T, T)


def test_causal_padding_mask_accepts_reference_and_course_lib():
    assert checks.check_causal_padding_mask(mask_ref).passed
    assert checks.check_causal_padding_mask(lambda lengths, T: combine_masks(padding_mask(lengths, T),
                                                                           causal_mask(T))).passed


def _pad_rows(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None])[:, None, :, None]  # (B, 1, T, 1)


@pytest.mark.parametrize("wrong, words", [
    (lambda lengths, T: ~mask_ref(lengths, T), "polarity is flipped"),
    (lambda lengths, T: mask_ref(lengths, T).transpose(-1, -2) & padding_mask(lengths, T), "upper triangle"),
    (lambda lengths, T: padding_mask(lengths, T), "causal part is missing"),
    (lambda lengths, T: causal_mask(T), "padding part is missing"),
    (lambda lengths, T: _pad_rows(lengths, T) & causal_mask(T), "applied to the QUERIES"),
    (lambda lengths, T: mask_ref(lengths, T)[:, 0], "add the head axis"),
    (lambda lengths, T: mask_ref(lengths, T).float(), "BOOLEAN"),
    (lambda lengths, T: mask_ref(lengths, T).numpy(), "should be a torch.Tensor"),
    (lambda lengths, T: mask_ref([min(n + 1, T) for n in lengths], T), "the padding is off by one"),
    (lambda lengths, T: mask_ref(lengths, T) & ~torch.eye(T, dtype=torch.bool), "leaves out the diagonal"),
])
def test_causal_padding_mask_rejects_planted_mistakes(wrong, words):
    result = checks.check_causal_padding_mask(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- polarity
def test_to_key_padding_mask_accepts_reference():
    assert checks.check_to_key_padding_mask(lambda m: ~m[:, 0, 0]).passed
    assert checks.check_to_key_padding_mask(lambda m: to_torch_mha_mask(m).view(m.shape[0], -1)).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda m: m[:, 0, 0], "polarity trap"),
    (lambda m: ~m, "wants key_padding_mask of shape (B, S)"),
    (lambda m: (~m[:, 0, 0]).float(), "boolean"),
    (lambda m: torch.zeros_like(m[:, 0, 0]), "entries differ"),
    (lambda m: -m[:, 0, 0], "a boolean mask is inverted with a logical not"),
])
def test_to_key_padding_mask_rejects_planted_mistakes(wrong, words):
    result = checks.check_to_key_padding_mask(wrong)
    assert not result.passed and words in result.message, result.message


def test_to_key_padding_mask_messages_name_the_idea_not_the_line():
    for wrong in (lambda m: m[:, 0, 0], lambda m: ~m, lambda m: (~m).squeeze()):
        message = checks.check_to_key_padding_mask(wrong).message
        assert "~" not in message and "[:, 0, 0]" not in message, message
    message = checks.check_causal_padding_mask(lambda lengths, T: mask_ref(lengths, T)[:, 0]).message
    assert "[:, None]" not in message, message


# ----------------------------------------------------------------------------- masked softmax
def softmax_ref(scores, mask):
    s = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~mask, float("-inf"))
    allowed = mask.expand(s.shape).any(dim=-1, keepdim=True)
    w = torch.softmax(s.masked_fill(~allowed, 0.0), dim=-1)
    return (w * allowed).to(scores.dtype)


def test_masked_softmax_accepts_reference_and_course_lib_safe_softmax():
    assert checks.check_masked_softmax(softmax_ref).passed
    from course_lib.attention import safe_softmax
    assert checks.check_masked_softmax(lambda s, m: safe_softmax(s.double().masked_fill(~m, float("-inf")))).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda s, m: torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1), "0/0 = NaN"),
    (lambda s, m: torch.softmax(s.masked_fill(~m, -1e9), dim=-1), "does not fit in float16"),
    (lambda s, m: torch.softmax(s.float().masked_fill(~m, -1e9), dim=-1), "uniform weights 1/S"),
    (lambda s, m: torch.softmax(s.float().masked_fill(~m, torch.finfo(torch.float32).min), dim=-1), "uniform"),
    (lambda s, m: softmax_ref(s, ~m), "polarity is flipped"),
    (lambda s, m: torch.softmax(s.float(), dim=-1), "exactly 0"),
    (lambda s, m: softmax_ref(s, m).transpose(-1, -2), "shape"),
    (lambda s, m: torch.nan_to_num(torch.softmax(s.double().masked_fill(~m, float("-inf")), dim=0)).to(s.dtype),
     "your softmax normalises along axis 0, not along the keys"),
    (lambda s, m: softmax_ref(s.float(), m), "float64 inputs ask for float64 weights"),
])
def test_masked_softmax_rejects_planted_mistakes(wrong, words):
    result = checks.check_masked_softmax(wrong)
    assert not result.passed and words in result.message, result.message


def _after_softmax(renormalise, dtype=torch.float64, guard=False):
    def fn(s, m):
        w = torch.softmax(s.to(dtype), dim=-1) * m
        if not renormalise:
            return w
        total = w.sum(-1, keepdim=True)
        return w / total.clamp_min(torch.finfo(dtype).tiny) if guard else w / total  # guard: empty rows get 0
    return fn


@pytest.mark.parametrize("renormalise, words", [(False, "masked after the softmax"), (True, "renormalising")])
def test_masked_softmax_names_masking_after_the_softmax(renormalise, words):
    result = checks.check_masked_softmax(_after_softmax(renormalise))
    assert not result.passed and words in result.message, result.message


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("guard", [False, True])
def test_masked_softmax_rejects_renormalising_after_the_softmax(dtype, guard):
    # the same function as the -inf mask only while the kept weights do not underflow: a masked key scoring
    # far above the kept ones leaves them 0, and renormalising gives 0/0 (NaN) or, guarded, all 0
    result = checks.check_masked_softmax(_after_softmax(True, dtype, guard))
    assert not result.passed, result.message
    assert "masked after the softmax" in result.message and "renormalising" in result.message, result.message
    assert "-inf" in result.message and "BEFORE the softmax" in result.message, result.message


def test_masked_softmax_rejects_a_mutating_answer():
    def mutating(s, m):
        m.fill_(True)  # its copy only
        return softmax_ref(s, m)
    result = checks.check_masked_softmax(mutating)
    assert not result.passed and "changed its input `mask` in place" in result.message, result.message


def test_answers_that_are_right_but_change_their_inputs_are_named():
    def softmax_then_scribble(s, m):
        out = softmax_ref(s, m)
        s.zero_()  # the caller's scores
        return out

    def invert_in_place(mask):
        return mask.logical_not_()[:, 0, 0]  # right values, but the caller's mask is flipped

    def sort_lengths(lengths, T):
        out = mask_ref(lengths, T)
        lengths.sort()  # the caller's list
        return out

    for checker, fn, name in ((checks.check_masked_softmax, softmax_then_scribble, "scores"),
                              (checks.check_to_key_padding_mask, invert_in_place, "mask"),
                              (checks.check_causal_padding_mask, sort_lengths, "lengths")):
        result = checker(fn)
        assert not result.passed and f"changed its input `{name}` in place" in result.message, result.message


# ----------------------------------------------------------------------------- a test for future leaks
def leak_test_ref(layer, T, d, *, atol=0.0, neighbour_only=False, perturb_past=False, scale=1.0, as_tensor=False,
                  dtype=torch.float64, inverted=False):
    if inverted:
        return not leak_test_ref(layer, T, d)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, T, d, generator=gen, dtype=dtype)
    y = layer(x)
    for i in range(T - 1):
        x2 = x.clone()
        start = 0 if perturb_past else i + 1
        stop = i + 2 if neighbour_only else T  # the mistake: perturb only the next position ...
        x2[:, start:stop] += scale * torch.randn(1, stop - start, d, generator=gen, dtype=dtype)
        seen = slice(i, i + 1) if neighbour_only else slice(0, i + 1)  # ... and look only at output i
        same = torch.isclose(layer(x2)[:, seen], y[:, seen], atol=atol, rtol=0).all()
        if not same:
            return ~same if as_tensor else True
    return ~same if as_tensor else False


def test_future_leak_test_accepts_reference():
    assert checks.check_future_leak_test(leak_test_ref).passed


@pytest.mark.parametrize("options, words", [
    (dict(perturb_past=True), "reports a leak"),
    (dict(atol=1e-4), "tolerance is too loose"),
    (dict(scale=1e-12), "its perturbation is too small to see. The inputs it gave the layer differ by at most"),
    (dict(as_tensor=True), "return a bool, True (the layer leaks) or False"),
    (dict(dtype=torch.float32), "the inputs your test builds must be float64 too"),
    (dict(inverted=True), "your test's verdicts are inverted"),
    (dict(neighbour_only=True), "too few positions"),
])
def test_future_leak_test_rejects_planted_mistakes(options, words):
    result = checks.check_future_leak_test(lambda layer, T, d: leak_test_ref(layer, T, d, **options))
    assert not result.passed and words in result.message, result.message


def _changed(layer, x, x2, seen):
    return not torch.equal(layer(x2)[:, seen], layer(x)[:, seen])


def perturb_last_only(layer, T, d):  # the future is only ever the last position
    x = torch.randn(1, T, d, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 1.0
    return _changed(layer, x, x2, slice(0, T - 1))


def check_first_only(layer, T, d):  # the past is only ever position 0
    x = torch.randn(1, T, d, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 1:] += 1.0
    return _changed(layer, x, x2, slice(0, 1))


def both_ends(layer, T, d):  # tailored to leaks into position 0 or from the last position
    return perturb_last_only(layer, T, d) or check_first_only(layer, T, d)


@pytest.mark.parametrize("incomplete, words", [
    (perturb_last_only, "perturbs too few positions (only the last one"),
    (check_first_only, "checks too few positions (only position 0"),
    (both_ends, "a leak between two middle positions"),
])
def test_future_leak_test_rejects_incomplete_tests(incomplete, words):
    result = checks.check_future_leak_test(incomplete)
    assert not result.passed and words in result.message, result.message
    assert "your test missed a" in result.message and "For every i < T-1" in result.message, result.message


def test_future_leak_test_leaks_only_in_the_middle_defeat_both_ends():
    # the middle layers leak from j into i with 0 < i < j < T-1, the sizes vary, and a test of both ends misses them
    from course_lib.checks.nb05 import _layers
    layers = _layers()
    middle = [(layer, T, d) for _, layer, _, kind, T, d in layers if kind == "middle"]
    assert len(middle) == 2 and len({(T, d) for *_, T, d in layers}) > 1
    for layer, T, d in middle:
        assert leak_test_ref(layer, T, d) and not both_ends(layer, T, d)


@pytest.mark.parametrize("wrong, words", [
    (lambda layer, T, d: True, "reports a leak"),
    (lambda layer, T, d: False, "missed"),
    (lambda layer, T, d: "no", "return True"),
])
def test_future_leak_test_rejects_constant_answers(wrong, words):
    result = checks.check_future_leak_test(wrong)
    assert not result.passed and words in result.message, result.message

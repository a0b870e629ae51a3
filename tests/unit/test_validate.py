"""One family of argument checks (course_lib._validate), used at every integer argument of the spine and
of course_lib.modern: Python and numpy integers pass and come back as Python ints; a bool, a str, a
float (even 3.0) or None is a TypeError naming the argument; a number out of range a ValueError."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import assert_clear_error

from course_lib import KVCache, MultiHeadAttention, masks
from course_lib._validate import check_nonnegative_int, check_positive_int, check_positive_number, check_probability
from course_lib.attention import repeat_kv
from course_lib.mha import split_heads
from course_lib.modern import DecoderAttention
from course_lib.positional import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    sinusoidal_table,
)
from course_lib.seq2seq import Seq2SeqConfig
from course_lib.tools.paths import REPO_ROOT

NUMPY_INTS = [np.int8(3), np.int16(3), np.int32(3), np.int64(3), np.uint8(3), np.uint64(3)]
NOT_INTS = ["3", 3.0, 2.5, np.float64(3.0), None, True, False, np.True_, torch.tensor(3), [3]]


@pytest.mark.parametrize("check, lowest", [(check_positive_int, 1), (check_nonnegative_int, 0)])
def test_the_two_integer_checks_are_one_family(check, lowest):
    for value in [lowest, lowest + 5, *NUMPY_INTS]:
        got = check("n", value)
        assert type(got) is int and got == int(value)
    for value in NOT_INTS:
        with pytest.raises(TypeError, match=r"^n must be (a positive int|an int >= 0)"):
            check("n", value)
    for value in (lowest - 1, lowest - 7, np.int64(lowest - 1)):
        with pytest.raises(ValueError, match=r"^n must be (a positive int|an int >= 0)"):
            check("n", value)


def test_numbers_and_probabilities_take_numpy_and_refuse_bools():
    assert check_positive_number("x", np.float32(2.5)) == 2.5 and type(check_positive_number("x", np.int64(2))) is float
    assert check_probability("p", np.float32(0.5)) == 0.5 and check_probability("p", np.int64(0)) == 0.0
    for bad in (True, "1", None, 1j):
        assert_clear_error(lambda bad=bad: check_positive_number("x", bad), TypeError, ["x must be"])
        assert_clear_error(lambda bad=bad: check_probability("p", bad), TypeError, ["p must be"])
    for bad in (0, -1.0, float("nan"), float("inf"), np.float64("-inf"), 10**400):
        assert_clear_error(lambda bad=bad: check_positive_number("x", bad), ValueError, ["x must be"])
    assert_clear_error(lambda: check_positive_number("base", 1.0, above=1.0), ValueError, ["base", "> 1"])
    for bad in (1.0, -0.1, float("nan")):
        assert_clear_error(lambda bad=bad: check_probability("p", bad), ValueError, ["p must be"])


def test_decoder_attention_takes_numpy_window_and_sinks():
    torch.manual_seed(0)
    ours = DecoderAttention(8, 2, window=np.int64(3), sink_tokens=np.int64(1))
    plain = DecoderAttention(8, 2, window=3, sink_tokens=1)
    plain.load_state_dict(ours.state_dict())
    assert type(ours.window) is int and type(ours.sink_tokens) is int
    assert ours.extra_repr() == plain.extra_repr()
    x = torch.randn(2, 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, is_causal=True), plain(x, is_causal=True), rtol=0, atol=0)
        cache = ours.new_cache()
        assert type(cache.window) is int and type(cache.sink_tokens) is int
        steps = [ours(x[:, i:i + 1], is_causal=True, cache=cache) for i in range(7)]
        torch.testing.assert_close(torch.cat(steps, 1), plain(x, is_causal=True), atol=1e-6, rtol=1e-6)
    for kwargs, name in (({"window": 3, "sink_tokens": "1"}, "sink_tokens"), ({"window": 3.0}, "window"),
                         ({"window": 3, "sink_tokens": True}, "sink_tokens"), ({"window": 0}, "window"),
                         ({"window": 3, "sink_tokens": -1}, "sink_tokens")):
        error = ValueError if 0 in kwargs.values() or -1 in kwargs.values() else TypeError
        assert_clear_error(lambda kwargs=kwargs: DecoderAttention(8, 2, **kwargs), error, [name])


def test_offsets_and_sizes_of_the_positional_modules_take_numpy_ints():
    x = torch.randn(2, 3, 8)
    rope = RotaryEmbedding(np.int64(8), base=np.float32(10000.0))
    assert type(rope.d_head) is int and type(rope.base) is float
    torch.testing.assert_close(rope(x, offset=np.int64(5)), RotaryEmbedding(8)(x, offset=5), rtol=0, atol=0)
    for module in (SinusoidalPositionalEncoding(np.int64(8), np.int32(16)),
                   LearnedPositionalEmbedding(np.int64(8), np.int32(16))):
        assert type(module.d_model) is int and type(module.max_len) is int
        torch.testing.assert_close(module(x, offset=np.int64(4)), module(x, offset=4), rtol=0, atol=0)
        assert_clear_error(lambda module=module: module(x, offset="4"), TypeError, ["offset"])
        assert_clear_error(lambda module=module: module(x, offset=np.int64(-1)), ValueError, ["offset"])
    torch.testing.assert_close(sinusoidal_table(np.int64(6), np.int16(4)), sinusoidal_table(6, 4))
    assert_clear_error(lambda: rope(x, offset=1.0), TypeError, ["offset"])
    assert_clear_error(lambda: rope(x, offset=False), TypeError, ["offset"])
    assert_clear_error(lambda: RotaryEmbedding(8, base="10000"), TypeError, ["base"])
    assert_clear_error(lambda: sinusoidal_table(6, 4, base=0.5), ValueError, ["base"])


def test_the_spine_takes_numpy_ints_and_keeps_python_ints():
    mha = MultiHeadAttention(np.int64(8), np.int32(2), num_kv_heads=np.int64(1), kdim=np.int16(8), vdim=np.uint8(8))
    assert all(type(getattr(mha, n)) is int for n in ("d_model", "num_heads", "num_kv_heads", "d_head", "kdim", "vdim"))
    cache = KVCache(window=np.int64(2), sink_tokens=np.int64(1))
    assert type(cache.window) is int and type(cache.sink_tokens) is int and type(KVCache(seen=np.int32(4)).seen) is int
    assert cache.key_positions(np.int64(0)).numel() == 0
    positions = torch.arange(4)
    assert torch.equal(masks.position_mask(positions, positions, window=np.int64(2), sink_tokens=np.int8(1)),
                       masks.position_mask(positions, positions, window=2, sink_tokens=1))
    assert torch.equal(masks.sliding_window_mask(np.int64(3), window=np.int64(2)),
                       masks.sliding_window_mask(3, window=2))
    assert masks.padding_mask([1, 2], np.int64(3)).shape == (2, 1, 1, 3)
    kv = torch.randn(1, 2, 3, 4)
    assert torch.equal(repeat_kv(kv, np.int64(2)), repeat_kv(kv, 2))
    x = torch.randn(1, 3, 8)
    assert torch.equal(split_heads(x, np.int64(2)), split_heads(x, 2))
    config = Seq2SeqConfig(np.int64(10), np.int32(12), d_model=np.int64(16), num_heads=np.int64(2), pad_id=np.int64(0),
                           bos_id=np.int8(1), eos_id=np.uint8(2))
    json.dumps(config.to_dict())  # numpy ints would not serialize
    assert all(type(v) is int for k, v in config.to_dict().items() if k not in ("dropout", "norm_first", "positional"))


@pytest.mark.parametrize("call, error, words", [
    (lambda: MultiHeadAttention("8", 2), TypeError, ["d_model", "'8'"]),
    (lambda: MultiHeadAttention(8, 2.0), TypeError, ["num_heads", "2.0"]),
    (lambda: MultiHeadAttention(8, 2, num_kv_heads=True), TypeError, ["num_kv_heads"]),
    (lambda: MultiHeadAttention(8, 2, dropout="0.1"), TypeError, ["dropout"]),
    (lambda: KVCache(window="2"), TypeError, ["window"]),
    (lambda: KVCache(seen=-1), ValueError, ["seen"]),
    (lambda: KVCache().key_positions(1.5), TypeError, ["length"]),
    (lambda: masks.causal_mask(2.5), TypeError, ["T must be a positive int"]),
    (lambda: masks.padding_mask([1], "3"), TypeError, ["max_len"]),
    (lambda: repeat_kv(torch.randn(1, 2, 3, 4), 0), ValueError, ["n_rep"]),
    (lambda: repeat_kv(torch.randn(1, 2, 3, 4), 2.0), TypeError, ["n_rep"]),
    (lambda: split_heads(torch.randn(1, 3, 8), 0), ValueError, ["num_heads"]),
    (lambda: Seq2SeqConfig(10, 12, pad_id="0"), TypeError, ["pad_id"]),
    (lambda: Seq2SeqConfig(10, 12, eos_id=-2), ValueError, ["eos_id"]),
    (lambda: Seq2SeqConfig(10, 12, eos_id=12), ValueError, ["eos_id", "[0, 12)"]),
    (lambda: Seq2SeqConfig(10, 12.0), TypeError, ["tgt_vocab_size"]),
])
def test_a_bad_integer_is_refused_by_name(call, error, words):
    assert_clear_error(call, error, words)


SPINE_AND_MODERN = ["mha.py", "_mha_checks.py", "attention.py", "masks.py", "kv_cache.py", "positional.py",
                    "blocks.py", "seq2seq.py", "modern/decoder_attention.py", "modern/mla.py", "modern/convert.py",
                    "cost/io_complexity.py"]


@pytest.mark.parametrize("path", SPINE_AND_MODERN)
def test_integer_arguments_go_through_the_one_family(path):
    # an ad-hoc isinstance(x, int) refuses numpy ints (or lets bools through) where the checks accept them
    source = (REPO_ROOT / "course_lib" / path).read_text()
    calls = re.findall(r"isinstance\((?:[^()]|\([^()]*\))*\)", source)  # one level of parentheses inside
    adhoc = [c for c in calls if re.search(r"\b(?:int|float|numbers\.\w+|np\.integer|np\.floating)\b", c)]
    assert not adhoc, f"{path}: use course_lib._validate's checks instead of {adhoc}"

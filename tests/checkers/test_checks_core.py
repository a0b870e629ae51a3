"""The shared checker tool that names an input changed in place: every kind of input a checker passes."""

import numpy as np
import pytest
import torch

from course_lib.checks._core import CheckFailure, call_watching


def _fails(fn, *args, names=(), **kwargs) -> str:
    with pytest.raises(CheckFailure) as failure:
        call_watching(fn, *args, names=names, advice="Write new ones.", **kwargs)
    return str(failure.value)


def test_an_input_written_in_place_is_named_with_the_advice():
    x = torch.randn(3, 4)
    message = _fails(lambda t: t.mul_(2), x.clone(), names=("x",))
    assert message.startswith("your function changed its input `x` in place") and message.endswith("Write new ones.")
    assert "`a`, `b`" in _fails(lambda a, b: (a.__setitem__(0, 1.0), b.fill(0)), np.zeros(3), np.ones(2),
                                names=("a", "b"))
    assert "`lengths`" in _fails(lambda lengths: lengths.sort(), [3, 1, 2], names=("lengths",))
    assert "`table`" in _fails(lambda table: table.update(k=2), table={"k": 1})
    assert "argument 2" in _fails(lambda a, b: b.add_(1), torch.zeros(1), torch.zeros(1), names=("a",))


def test_inputs_left_alone_pass_through_including_nan_entries():
    x = torch.tensor([1.0, float("nan")])
    got = call_watching(lambda t, m, n, s: t * 2, x, np.array([np.nan, 0.0]), 3, "text", names=("t", "m", "n", "s"))
    assert torch.equal(torch.isnan(got), torch.tensor([False, True]))
    assert call_watching(lambda mask: ~mask, torch.tensor([True, False]), names=("mask",)).tolist() == [False, True]


def test_the_checkers_own_inputs_are_never_changed():
    x = torch.zeros(2)
    with pytest.raises(CheckFailure):
        call_watching(lambda t: t.add_(1), x, names=("x",))
    assert torch.equal(x, torch.zeros(2))

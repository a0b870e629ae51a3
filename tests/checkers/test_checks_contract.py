"""No checker raises, and no wrong answer passes: not garbage, not a crash, not an answer that
changes the checker's inputs in place so that the reference it computes afterwards agrees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import course_lib.checks as checks
from course_lib.checks._core import call, private_copy

CHECKERS = [name for name in checks.__all__ if name.startswith("check_")]


def _mha_ref(x, w_q, w_k, w_v, w_o, num_heads, mask=None):
    from course_lib.attention import scaled_dot_product_attention

    B, T, D = x.shape
    q, k, v = ((x @ w.T).view(B, T, num_heads, D // num_heads).transpose(1, 2) for w in (w_q, w_k, w_v))
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(B, T, D) @ w_o.T


def test_the_reference_mha_passes():
    assert checks.check_mha_forward(_mha_ref).passed


MUTATING_ANSWERS = {
    "zeroes w_o, returns zeros": lambda x, wq, wk, wv, wo, H, mask=None: (wo.zero_(), torch.zeros_like(x))[1],
    "scales w_q in place": lambda x, wq, wk, wv, wo, H, mask=None: _mha_ref(x, wq.mul_(2), wk, wv, wo, H, mask),
    "allows every key in the mask": lambda x, wq, wk, wv, wo, H, mask=None: _mha_ref(
        x, wq, wk, wv, wo, H, None if mask is None else mask.fill_(True)),
    "zeroes x, returns its own answer for zeros": lambda x, wq, wk, wv, wo, H, mask=None: _mha_ref(
        x.zero_(), wq, wk, wv, wo, H, mask),
}


@pytest.mark.parametrize("name", list(MUTATING_ANSWERS))
def test_an_answer_that_changes_its_inputs_in_place_does_not_pass(name):
    result = checks.check_mha_forward(MUTATING_ANSWERS[name])
    assert not result.passed, name


def test_call_hands_the_learner_copies():
    a, t, m = np.ones(3), torch.ones(2, requires_grad=True), torch.nn.Linear(2, 2)
    seen = {}

    def learner(arr, ten, mod, nested):
        seen["ids"] = (id(arr), id(ten), id(mod), id(nested[0]))
        arr[:] = 0
        with torch.no_grad():
            ten.zero_()
            mod.weight.zero_()
        nested[0][:] = 0
        return ten.requires_grad

    assert call(learner, a, t, m, [a]) is True  # requires_grad kept on the copy
    assert seen["ids"][0] != id(a) and seen["ids"][1] != id(t) and seen["ids"][2] != id(m)
    assert (a == 1).all() and (t == 1).all() and (m.weight != 0).any()
    assert private_copy((1, "x", None)) == (1, "x", None)


def _exits(*args, **kwargs):
    raise SystemExit(3)


def _returns(value):
    return lambda *args, **kwargs: value


GARBAGE = {
    "None": _returns(None),
    "a string": _returns("softmax"),
    "a pair of None": _returns((None, None)),
    "a triple of None": _returns((None, None, None)),
    "NaN": _returns(float("nan")),
    "a ragged list": _returns([[1.0, 2.0], [3.0]]),
    "a bfloat16 tensor": _returns(torch.ones(2, 3, dtype=torch.bfloat16)),
    "a tensor that requires grad": _returns(torch.ones(3, requires_grad=True)),
    "a dict": _returns({"out": 1}),
    "an empty array": _returns(np.zeros((0,))),
    "SystemExit": _exits,
}


@pytest.mark.parametrize("name", CHECKERS)
@pytest.mark.parametrize("answer", list(GARBAGE))
def test_no_checker_raises_or_passes_garbage(name, answer):
    result = getattr(checks, name)(GARBAGE[answer])
    assert isinstance(result, checks.CheckResult) and not result.passed, (name, answer, result)


_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
    st.lists(st.floats(-2, 2), max_size=4).map(np.array),
    st.lists(st.floats(-2, 2), min_size=1, max_size=4).map(lambda xs: torch.tensor(xs, dtype=torch.float64)),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=st.one_of(_values, st.tuples(_values, _values), st.tuples(_values, _values, _values)))
@pytest.mark.parametrize("name", CHECKERS)
def test_no_checker_raises_or_passes_random_answers(name, answer):
    result = getattr(checks, name)(_returns(answer))
    assert isinstance(result, checks.CheckResult) and not result.passed, (name, answer, result)

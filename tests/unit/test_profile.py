"""profile_steps says where a step's time goes; the mha benchmark hands out the steps it times."""

from __future__ import annotations

import pytest
import torch

from course_lib.bench import mha
from course_lib.bench.profile import profile_steps


def test_the_profile_counts_each_steps_operators_per_call():
    a = torch.randn(96, 96)
    steps = {"three_products": lambda: a @ a @ a @ a, "one_sum": lambda: a.sum()}
    result = profile_steps(steps, device="cpu", calls=4, top=5)
    assert set(result) == set(steps)
    heavy, light = result["three_products"], result["one_sum"]
    mm = {row["op"]: row for row in heavy["top_ops"]}
    assert mm["aten::mm"]["calls_per_step"] == 3  # counted per call of the step, not per profiled loop
    assert "aten::mm" not in {row["op"] for row in light["top_ops"]}
    assert heavy["host_ops_us_per_call"] > light["host_ops_us_per_call"] > 0
    assert heavy["wall_us_per_call"] >= heavy["host_ops_us_per_call"] * 0.5  # same loop, measured around it
    assert heavy["kernels_per_call"] == light["kernels_per_call"] == 0  # no GPU: no kernels, no device time
    assert heavy["device_us_per_call"] == 0 and len(heavy["top_ops"]) <= 5


@pytest.mark.parametrize(("kwargs", "match"), [({"fns": {}}, "fns"), ({"fns": {"x": 3}}, "fns"),
                                               ({"calls": 0}, "calls"), ({"warmup": -1}, "warmup"),
                                               ({"top": 0}, "top")])
def test_bad_arguments_are_refused_before_anything_runs(kwargs, match):
    ran = []
    args = {"fns": {"step": lambda: ran.append(1)}, "device": "cpu"} | kwargs
    with pytest.raises((TypeError, ValueError), match=match):
        profile_steps(**args)
    assert ran == []


@pytest.mark.parametrize("cache_kind", mha.CACHE_KINDS)
def test_decode_steps_are_what_run_decode_times_and_give_the_same_answer_every_call(cache_kind):
    steps = mha.decode_steps(cache_kind=cache_kind, batch=2, cache_len=9, d_model=16, heads=4, dtype=torch.float64)
    assert set(steps) == {"course_lib", "plain_sdpa"}
    with torch.no_grad():
        first = {name: step().clone() for name, step in steps.items()}
        again = {name: step().clone() for name, step in steps.items()}
    assert first["course_lib"].shape == (2, 1, 16)
    assert torch.allclose(first["course_lib"], first["plain_sdpa"], atol=1e-12)
    for name in steps:  # the cache is put back before each call: the same work, the same output
        assert torch.equal(first[name], again[name]), name


def test_training_steps_are_the_three_modules():
    steps = mha.training_steps(batch=2, seq=5, d_model=8, heads=2)
    assert set(steps) == {"course_lib", "torch_mha", "plain_sdpa"}
    for step in steps.values():
        step()


@pytest.mark.parametrize(("kwargs", "match"), [({"cache_kind": "paged"}, "cache_kind"),
                                               ({"cache_len": 0}, "cache_len")])
def test_decode_steps_refuse_bad_arguments(kwargs, match):
    args = {"cache_kind": "static", "batch": 1, "cache_len": 4, "d_model": 8, "heads": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        mha.decode_steps(**args)

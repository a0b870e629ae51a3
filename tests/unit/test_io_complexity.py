"""The HBM traffic counted inside numpy_ref.online_softmax_attention equals the closed forms of io_complexity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from course_lib import numpy_ref
from course_lib.cost.io_complexity import (
    IOCounter,
    attainable_flops,
    block_q_for_memory,
    standard_attention_io,
    theorem2_bound,
    tiled_attention_io,
    tiled_on_chip_elements,
)


@pytest.mark.parametrize(("T", "S", "d", "d_v", "block_q", "block_k"),
                         [(64, 64, 8, 8, 16, 16), (37, 53, 5, 3, 10, 7), (20, 9, 4, 4, 64, 2), (1, 1, 1, 1, 1, 1)])
def test_counted_traffic_equals_the_closed_form(T, S, d, d_v, block_q, block_k):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((T, d)), rng.standard_normal((S, d)), rng.standard_normal((S, d_v))
    io = IOCounter()
    out = numpy_ref.online_softmax_attention(q, k, v, block_size=block_q, key_block_size=block_k, io=io)
    np.testing.assert_allclose(out, numpy_ref.scaled_dot_product_attention(q, k, v)[0], rtol=0, atol=1e-12)
    assert io.total == tiled_attention_io(T, S, d, d_v, block_q=block_q)
    assert io.writes == T * d_v
    assert io.on_chip_peak == tiled_on_chip_elements(d, d_v, block_q=min(block_q, T), block_k=min(block_k, S))


def test_counts_sum_over_heads_and_working_set_is_per_head():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 3, 24, 4)) for _ in range(3))
    io = IOCounter()
    numpy_ref.online_softmax_attention(q, k, v, block_size=8, io=io)
    assert io.total == 6 * tiled_attention_io(24, 24, 4, block_q=8)
    assert io.on_chip_peak == tiled_on_chip_elements(4, block_q=8, block_k=8)


def test_mask_tiles_are_read():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((16, 4)) for _ in range(3))
    plain, masked = IOCounter(), IOCounter()
    numpy_ref.online_softmax_attention(q, k, v, block_size=4, io=plain)
    numpy_ref.online_softmax_attention(q, k, v, np.tril(np.ones((16, 16), dtype=bool)), block_size=4, io=masked)
    assert masked.reads - plain.reads == 16 * 16


def test_more_on_chip_memory_means_less_traffic_like_theorem_2():
    T, d = 4096, 64
    traffic = [tiled_attention_io(T, T, d, block_q=block_q_for_memory(M, d, block_k=d)) for M in (2**14, 2**16, 2**18)]
    assert traffic[0] > traffic[1] > traffic[2]
    ratios = [t / theorem2_bound(T, d, M) for t, M in zip(traffic, (2**14, 2**16, 2**18), strict=True)]
    assert max(ratios) / min(ratios) < 2  # Theta(T^2 d^2 / M): the constant stays put
    assert standard_attention_io(T, T, d) == 4 * T * d + 4 * T * T


def test_block_q_for_memory_is_the_largest_that_fits():
    for M in (2300, 5000, 20608, 10**6):
        b = block_q_for_memory(M, 64, block_k=16)
        assert tiled_on_chip_elements(64, block_q=b, block_k=16) <= M < tiled_on_chip_elements(64, block_q=b + 1,
                                                                                             block_k=16)
    with pytest.raises(ValueError, match="M = 10"):
        block_q_for_memory(10, 64, block_k=16)


def test_roofline():
    assert attainable_flops(10.0, 1e15, 1e12) == 1e13
    assert attainable_flops(1e4, 1e15, 1e12) == 1e15
    for bad in (0, -1.0, math.inf, math.nan, -math.inf, np.float32(0.0), np.float64(np.nan), np.int64(-3)):
        with pytest.raises(ValueError, match="intensity"):
            attainable_flops(bad, 1e15, 1e12)
    for bad in (True, np.True_, "1", None, 1j):
        with pytest.raises(TypeError, match="intensity"):
            attainable_flops(bad, 1e15, 1e12)


def test_roofline_takes_numpy_numbers_of_every_kind():
    for intensity, peak, bandwidth in ((np.float32(2.0), 1e15, 1e12), (2.0, np.float64(1e15), np.int64(10**12)),
                                       (np.int32(2), np.float16(1000.0), 1e12), (np.float64(2.0), 1e15, 1e12)):
        got = attainable_flops(intensity, peak, bandwidth)
        assert type(got) is float and got == min(float(peak), float(intensity) * float(bandwidth))
    for name, args in (("peak_flops", (2.0, np.float32("inf"), 1e12)), ("bandwidth", (2.0, 1e15, np.int64(0)))):
        with pytest.raises(ValueError, match=name):
            attainable_flops(*args)


def test_io_counter_counts_only_whole_non_negative_numbers():
    io = IOCounter()
    io.read(np.int64(3))
    io.write(np.int32(2))
    io.on_chip(np.uint8(7))
    io.read(0)
    assert (io.reads, io.writes, io.on_chip_peak) == (3, 2, 7)
    assert all(type(n) is int for n in (io.reads, io.writes, io.on_chip_peak))
    for method in (io.read, io.write, io.on_chip):
        for bad in (2.9, 2.0, np.float64(3.0), "3", True, None):
            with pytest.raises(TypeError, match=r"^n must be an int >= 0"):
                method(bad)
        for bad in (-5, np.int64(-1)):
            with pytest.raises(ValueError, match=r"^n must be an int >= 0"):
                method(bad)
    assert (io.reads, io.writes, io.on_chip_peak) == (3, 2, 7)  # nothing counted by a refused call


def test_closed_forms_take_numpy_ints_and_give_python_ints():
    sizes = {name: np.int64(v) for name, v in (("T", 37), ("S", 53), ("d", 5), ("d_v", 3))}
    assert standard_attention_io(**sizes) == standard_attention_io(37, 53, 5, 3)
    assert type(standard_attention_io(**sizes)) is int
    assert type(tiled_attention_io(**sizes, block_q=np.int32(10))) is int
    assert block_q_for_memory(np.int64(5000), np.int64(64), block_k=np.int16(16)) == block_q_for_memory(
        5000, 64, block_k=16)
    with pytest.raises(TypeError, match="block_k"):
        block_q_for_memory(5000, 64, block_k=16.0)


class _TallyCounter:
    """Not an IOCounter: any object with read, write and on_chip is accepted as io."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"read": 0, "write": 0, "on_chip": 0}

    def read(self, n: int) -> None:
        self.calls["read"] += n

    def write(self, n: int) -> None:
        self.calls["write"] += n

    def on_chip(self, n: int) -> None:
        self.calls["on_chip"] = max(self.calls["on_chip"], n)


def test_a_duck_typed_counter_counts_what_an_io_counter_counts():
    q = np.random.default_rng(0).standard_normal((12, 4))
    duck, counter = _TallyCounter(), IOCounter()
    numpy_ref.online_softmax_attention(q, q, q, block_size=4, io=duck)
    numpy_ref.online_softmax_attention(q, q, q, block_size=4, io=counter)
    assert duck.calls == {"read": counter.reads, "write": counter.writes, "on_chip": counter.on_chip_peak}
    assert counter.reads > 0


class _ReadOnly:
    def read(self, n: int) -> None:
        pass

    write = None  # present but not callable


@pytest.mark.parametrize(("io", "missing"), [({}, "read, write, on_chip"), (_ReadOnly(), "write, on_chip"),
                                             ("counter", "read, write, on_chip")])
def test_an_object_without_the_counter_methods_is_refused_by_name(io, missing):
    q = np.ones((4, 2))
    with pytest.raises(TypeError, match=rf"^io must be None or an IO counter with methods read\(n\), write\(n\) "
                                        rf"and on_chip\(n\).*IOCounter.*has no {missing}$"):
        numpy_ref.online_softmax_attention(q, q, q, io=io)


def test_bad_arguments_are_named():
    q = np.ones((4, 2))
    with pytest.raises(ValueError, match="key_block_size"):
        numpy_ref.online_softmax_attention(q, q, q, key_block_size=0)
    with pytest.raises(TypeError, match="io"):
        numpy_ref.online_softmax_attention(q, q, q, io={})
    with pytest.raises(ValueError, match="block_q"):
        tiled_attention_io(4, 4, 2, block_q=0)

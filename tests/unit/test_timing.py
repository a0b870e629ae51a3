"""course_lib.bench.timing.compare: interleaved rounds, back-to-back calls, medians and quartiles, and,
on a simulated GPU (a fake torch.cuda with a host clock and a stream clock), where the CUDA events sit
relative to the calls, the L2 flush and the spin that holds the stream."""

from __future__ import annotations

import pytest
import torch

from course_lib.bench import timing
from course_lib.bench.timing import DeviceTiming, compare, quartiles, ratio_with_spread


# ----------------------------------------------------------------------------- a fake clock (CPU path)
class Clock:
    """perf_counter that only moves when a fake function says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", fake.perf_counter)
    return fake


def _fn(clock: Clock, log: list, name: str, durations):
    it = iter(durations)

    def fn() -> None:
        log.append(name)
        clock.now += next(it)

    return fn


def test_medians_and_quartiles_of_device_and_wall_time(clock):
    # calls=1: each round is one timed call (device) then one call with a synchronize (wall)
    log: list = []
    durations = [1, 10, 2, 20, 3, 30, 4, 40, 5, 50]
    res = compare({"a": _fn(clock, log, "a", durations)}, device="cpu", warmup=0, rounds=5, calls=1)["a"]
    assert (res.device_q1_s, res.device_s, res.device_q3_s) == (2, 3, 4)
    assert (res.wall_q1_s, res.wall_s, res.wall_q3_s) == (20, 30, 40)
    assert res.rounds == 5 and res.calls == 1 and "perf_counter" in res.method


def test_device_time_is_per_call_of_the_back_to_back_group(clock):
    log: list = []
    # 4 calls of 0.5 s per group, then a wall call of 7 s; 3 rounds
    durations = [0.5] * 4 + [7] + [0.5] * 4 + [7] + [0.5] * 4 + [7]
    res = compare({"a": _fn(clock, log, "a", durations)}, device="cpu", warmup=0, rounds=3, calls=4)["a"]
    assert res.device_s == 0.5 and res.wall_s == 7


def test_rounds_are_interleaved_in_a_rotating_order_with_back_to_back_calls(clock):
    log: list = []
    fns = {n: _fn(clock, log, n, [1.0] * 100) for n in "abc"}
    compare(fns, device="cpu", warmup=2, rounds=4, calls=3)
    assert log[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, then the rounds
    rounds = [log[6 + 12 * r: 6 + 12 * (r + 1)] for r in range(4)]
    assert len(log) == 6 + 4 * 3 * (3 + 1)
    expected_orders = ["abc", "bca", "cab", "abc"]
    for r, order in zip(rounds, expected_orders, strict=True):
        assert r == [n for n in order for _ in range(3 + 1)]  # each fn: 3 back-to-back calls + 1 wall call


def test_quartiles_and_single_round():
    assert quartiles([5.0]) == (5.0, 5.0, 5.0)
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert quartiles([4.0, 1.0, 3.0, 2.0]) == (1.75, 2.5, 3.25)
    with pytest.raises(ValueError, match="values"):
        quartiles([])


def _timing(d, dq1, dq3, w=1.0) -> DeviceTiming:
    return DeviceTiming(device_s=d, device_q1_s=dq1, device_q3_s=dq3, wall_s=w, wall_q1_s=w, wall_q3_s=w,
                        rounds=5, calls=10, method="test")


def test_ratio_with_spread_pairs_opposite_quartiles():
    a, b = _timing(2.0, 1.8, 2.4), _timing(1.0, 0.9, 1.2)
    r = ratio_with_spread(a, b)
    assert r["ratio"] == 2.0 and r["low"] == pytest.approx(1.8 / 1.2) and r["high"] == pytest.approx(2.4 / 0.9)
    assert r["low"] <= r["ratio"] <= r["high"] and r["key"] == "device" and "q1" in r["method"]
    assert ratio_with_spread(a.to_dict(), b.to_dict()) == r  # works on stored records
    assert ratio_with_spread(a, b, key="wall")["ratio"] == 1.0
    with pytest.raises(ValueError, match="key"):
        ratio_with_spread(a, b, key="median")
    with pytest.raises(ValueError, match="b must carry"):
        ratio_with_spread(a, {"median_s": 1.0})


def test_to_dict_has_every_field():
    d = _timing(1.0, 0.5, 2.0).to_dict()
    assert set(d) == {"device_s", "device_q1_s", "device_q3_s", "wall_s", "wall_q1_s", "wall_q3_s", "rounds",
                      "calls", "method"}


@pytest.mark.parametrize("kwargs, error, words", [
    ({"fns": {}}, ValueError, "fns"),
    ({"fns": [lambda: None]}, TypeError, "fns"),
    ({"fns": {"a": 3}}, TypeError, r"fns\['a'\]"),
    ({"fns": {1: lambda: None}}, TypeError, "fns"),
    ({"rounds": 0}, ValueError, "rounds"),
    ({"calls": 0}, ValueError, "calls"),
    ({"calls": 2.0}, TypeError, "calls"),
    ({"warmup": -1}, ValueError, "warmup"),
    ({"flush_l2": "yes"}, TypeError, "flush_l2"),
])
def test_bad_input_is_refused_before_any_call(kwargs, error, words):
    called = []
    args = {"fns": {"a": lambda: called.append(1)}, "device": "cpu"} | kwargs
    with pytest.raises(error, match=words):
        compare(**args)
    assert called == []


# ----------------------------------------------------------------------------- a simulated GPU
class FakeGPU:
    """One stream. The host clock moves by each call's dispatch time; work on the stream starts when both the
    host has enqueued it and the previous work is done. An event fires when the stream reaches it."""

    CYCLES_PER_S = 1e9

    def __init__(self, flush_s: float = 1e-3) -> None:
        self.host = 0.0
        self.stream = 0.0  # when the stream's queued work ends
        self.flush_s = flush_s
        self.log: list[tuple] = []

    def enqueue(self, seconds: float, what: tuple) -> None:
        self.stream = max(self.stream, self.host) + seconds
        self.log.append(what)

    def call(self, name: str, dispatch_s: float, gpu_s: float):
        def fn() -> None:
            self.host += dispatch_s
            self.enqueue(gpu_s, ("call", name))
        return fn

    # the torch.cuda pieces
    def synchronize(self, device=None) -> None:
        self.host = max(self.host, self.stream)
        self.log.append(("sync",))

    def sleep(self, cycles: int) -> None:
        self.enqueue(cycles / self.CYCLES_PER_S, ("spin", cycles))

    def flush(self) -> None:
        self.enqueue(self.flush_s, ("flush",))

    def event_class(self):
        gpu = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                self.t: float | None = None

            def record(self) -> None:
                gpu.stream = max(gpu.stream, gpu.host)
                self.t = gpu.stream
                gpu.log.append(("record", id(self)))

            def synchronize(self) -> None:
                assert self.t is not None, "synchronize on an event never recorded"
                gpu.host = max(gpu.host, self.t)
                gpu.log.append(("event_sync",))

            def elapsed_time(self, end) -> float:
                return (end.t - self.t) * 1e3

        return Event


@pytest.fixture
def gpu(monkeypatch):
    fake = FakeGPU()
    monkeypatch.setattr(torch.cuda, "Event", fake.event_class())
    monkeypatch.setattr(torch.cuda, "synchronize", fake.synchronize)
    monkeypatch.setattr(torch.cuda, "_sleep", fake.sleep, raising=False)
    monkeypatch.setattr(timing, "_make_l2_flusher", lambda device: fake.flush)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: fake.host)
    return fake


def _groups(log: list[tuple]) -> list[list[tuple]]:
    """The log cut into the timed groups: from a start event's record to the end event's record."""
    groups, current = [], None
    for entry in log:
        if entry[0] == "record":
            if current is None:
                current = [entry]
            else:
                groups.append(current + [entry])
                current = None
        elif current is not None:
            current.append(entry)
    return groups


def _problems(gpu: FakeGPU, res: dict[str, DeviceTiming], expected_device_s: dict[str, float], calls: int,
              flush_l2: bool) -> list[str]:
    """What is wrong with a CUDA timing run: the log's order and the numbers it produced."""
    problems = []
    groups = _groups(gpu.log)
    calibration = groups[0]  # the spinner measures cycles per second once
    if [e[0] for e in calibration] != ["record", "spin", "record"]:
        problems.append(f"spinner calibration looks wrong: {calibration}")
    for group in groups[1:]:
        inside = [e[0] for e in group[1:-1]]
        if inside != ["call"] * calls:
            problems.append(f"the window holds {inside}, not {calls} back-to-back calls")
    # what precedes each start event: a spin, and before it the flush when asked
    starts = [i for i, e in enumerate(gpu.log) if e[0] == "record"][2::2]
    for i in starts:
        if gpu.log[i - 1][0] != "spin":
            problems.append("the start event is not recorded right after the spin that holds the stream")
        if flush_l2 and gpu.log[i - 2][0] != "flush":
            problems.append("no L2 flush right before the held stream")
    for name, t in res.items():
        if t.device_s != pytest.approx(expected_device_s[name], rel=1e-9):
            problems.append(f"{name}: device_s {t.device_s} != {expected_device_s[name]}")
    return problems


def test_cuda_path_times_the_device_work_of_back_to_back_calls(gpu):
    # kernels longer than their dispatch: the window must hold exactly the GPU time of the calls
    fns = {"slow": gpu.call("slow", dispatch_s=30e-6, gpu_s=200e-6), "fast": gpu.call("fast", 20e-6, 100e-6)}
    res = compare(fns, device="cuda", warmup=1, rounds=3, calls=5, flush_l2=True)
    assert _problems(gpu, res, {"slow": 200e-6, "fast": 100e-6}, calls=5, flush_l2=True) == []
    # wall: one call from an idle device, dispatch + GPU time; the flush before it is outside
    assert res["slow"].wall_s == pytest.approx(230e-6) and res["fast"].wall_s == pytest.approx(120e-6)
    assert "cuda events" in res["slow"].method and "L2 flushed" in res["slow"].method
    flushes = sum(e[0] == "flush" for e in gpu.log)
    assert flushes == 3 * 2 * 2  # before every group and every wall call


def test_without_flush_nothing_is_flushed(gpu):
    res = compare({"a": gpu.call("a", 30e-6, 200e-6)}, device="cuda", warmup=1, rounds=2, calls=3)
    assert not any(e[0] == "flush" for e in gpu.log) and "L2" not in res["a"].method
    assert _problems(gpu, res, {"a": 200e-6}, calls=3, flush_l2=False) == []


def test_launch_bound_calls_show_their_gaps(gpu):
    # a 5 us kernel behind a 30 us dispatch: back-to-back calls cannot beat the host; device time says so
    res = compare({"tiny": gpu.call("tiny", 30e-6, 5e-6)}, device="cuda", warmup=1, rounds=3, calls=20)["tiny"]
    assert 20e-6 < res.device_s <= 30e-6 and res.wall_s == pytest.approx(35e-6)


def test_without_torch_cuda_sleep_the_method_says_so(gpu, monkeypatch):
    monkeypatch.delattr(torch.cuda, "_sleep")
    res = compare({"a": gpu.call("a", 30e-6, 200e-6)}, device="cuda", warmup=0, rounds=1, calls=2)["a"]
    assert "no _sleep" in res.method


def test_l2_size_is_read_from_the_device(monkeypatch):
    class Props:
        L2_cache_size = 50 * 2**20

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    assert timing._l2_bytes(torch.device("cuda")) == 50 * 2**20
    Props.L2_cache_size = 0
    assert timing._l2_bytes(torch.device("cuda")) == timing.DEFAULT_L2_BYTES
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: object())
    assert timing._l2_bytes(torch.device("cuda")) == timing.DEFAULT_L2_BYTES


# ----------------------------------------------------------------------------- planted wrong versions
def _flush_inside(fn, calls, device, flush, spin, hold_s):
    torch.cuda.synchronize(device)
    spin(hold_s)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    if flush is not None:
        flush()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def _sync_each_call(fn, calls, device, flush, spin, hold_s):
    torch.cuda.synchronize(device)
    if flush is not None:
        flush()
    spin(hold_s)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
        torch.cuda.synchronize(device)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def _idle_start(fn, calls, device, flush, spin, hold_s):  # the start event on an idle stream: times dispatch
    if flush is not None:
        flush()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def _one_call(fn, calls, device, flush, spin, hold_s):  # one call per window, as time_fn does
    if flush is not None:
        flush()
    spin(hold_s)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _short_hold(fn, calls, device, flush, spin, hold_s):  # a spin shorter than the first call's dispatch
    return timing_cuda_group(fn, calls, device, flush, spin, 1e-6)


timing_cuda_group = timing._cuda_group


@pytest.mark.parametrize("wrong, flush_l2", [(_flush_inside, True), (_sync_each_call, False), (_sync_each_call, True),
                                             (_idle_start, False), (_idle_start, True), (_one_call, False),
                                             (_short_hold, False)])
def test_planted_wrong_event_placements_are_caught(gpu, monkeypatch, wrong, flush_l2):
    monkeypatch.setattr(timing, "_cuda_group", wrong)
    fns = {"slow": gpu.call("slow", 30e-6, 200e-6), "fast": gpu.call("fast", 20e-6, 100e-6)}
    res = compare(fns, device="cuda", warmup=1, rounds=3, calls=5, flush_l2=flush_l2)
    assert _problems(gpu, res, {"slow": 200e-6, "fast": 100e-6}, calls=5, flush_l2=flush_l2) != []


def test_two_functions_alternate_which_goes_first(clock):
    log: list = []
    fns = {n: _fn(clock, log, n, [1.0] * 100) for n in "ab"}
    compare(fns, device="cpu", warmup=0, rounds=2, calls=1)
    assert log == ["a", "a", "b", "b", "b", "b", "a", "a"]  # round 2 starts with b

"""The parallel modules, the launcher and the self-check harness on inputs that used to go wrong.

Most tests here run R "ranks" as threads of this process that pass tensors through queues
(`ThreadComm`, a Comm whose messages skip gloo): the ring algorithms, the byte counts and the
argument checks are exercised at R = 2 on many inputs in seconds. The launcher's failure modes
need real processes; those tests are few, and each launch takes a fraction of a second once the
forkserver is up. The gloo transport itself is tested in test_parallel.py.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import queue
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parallel_launch_targets import behave, tensors

from course_lib import MultiHeadAttention
from course_lib.parallel import distributed
from course_lib.parallel import ring_attention as ra
from course_lib.parallel import tensor_parallel as tp
from course_lib.parallel import ulysses as ul
from course_lib.parallel.check import TOLERANCE, example_case, report
from course_lib.parallel.distributed import Comm, RankFailure, launch, ring_allreduce_bytes
from course_lib.tools.paths import REPO_ROOT

PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # the "course" profile's examples
FEW_LAUNCHES = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLEAN_ERRORS = (ValueError, TypeError)


# ----------------------------------------------------------------------------- R ranks as threads
class _Ring:
    """The mailboxes of R ranks in one process: inbox[r][s] holds what rank s sent to rank r, in order."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.inbox: list[list[queue.Queue]] = [[queue.Queue() for _ in range(world_size)] for _ in range(world_size)]
        self.failed = threading.Event()  # a rank raised: the others stop waiting for it


class ThreadComm(Comm):
    """A Comm whose ring_shift (any offset) passes tensors between threads; it counts bytes exactly as Comm does."""

    def __init__(self, ring: _Ring, rank: int) -> None:
        super().__init__()
        self._ring, self._rank = ring, rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._ring.world_size

    def start_ring_shift(self, tensor, recv_shape=None, what="ring_shift", offset=1):
        tensor = tensor.contiguous()
        shape = tuple(tensor.shape if recv_shape is None else recv_shape)
        R = self.world_size
        if R == 1 or offset % R == 0:
            return lambda: tensor.clone()
        self._ring.inbox[(self._rank + offset) % R][self._rank].put(tensor.detach().clone())
        source = (self._rank - offset) % R
        n_sent, n_recv = tensor.numel() * tensor.element_size(), math.prod(shape) * tensor.element_size()
        self.sent += n_sent
        self.received += n_recv
        self.log.append((what, n_sent, n_recv))

        def wait():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if self._ring.failed.is_set():
                    raise RuntimeError("another rank failed")
                try:
                    got = self._ring.inbox[self._rank][source].get(timeout=0.02)
                except queue.Empty:
                    continue
                assert tuple(got.shape) == shape and got.dtype == tensor.dtype, (what, got.shape, shape)
                return got
            raise RuntimeError(f"rank {self._rank}: no message within 30 s ({what})")

        return wait


def run_ranks(world_size: int, fn) -> list:
    """fn(rank, comm) on every rank, each in its own thread; a list of (ok, result or exception) per rank."""
    ring = _Ring(world_size)
    outcome: list = [None] * world_size

    def body(rank: int) -> None:
        try:
            outcome[rank] = (True, fn(rank, ThreadComm(ring, rank)))
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            outcome[rank] = (False, e)
            ring.failed.set()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(o is not None for o in outcome), "a rank did not finish"
    return outcome


def results_of(outcome: list) -> list:
    for rank, (ok, value) in enumerate(outcome):
        if not ok:
            raise AssertionError(f"rank {rank} raised {type(value).__name__}: {value}") from value
    return [value for _, value in outcome]


# ----------------------------------------------------------------------------- 1. half precision
def _near(score: float, dtype: torch.dtype, T: int = 4, S: int = 6, d: int = 16, seed: int = 0):
    """q, k, v in `dtype` whose scores q.k / sqrt(d) lie within a few units of `score`, and v of size 1."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=gen, dtype=torch.float64)
    base = direction / direction.norm() * math.sqrt(score * math.sqrt(d))  # base . base / sqrt(d) = score
    q = base * (1 + 1e-4 * torch.randn(T, 1, generator=gen, dtype=torch.float64))
    k = base * (1 + 1e-4 * torch.randn(S, 1, generator=gen, dtype=torch.float64))
    v = torch.randn(S, 3, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("score", [12800.0, 70000.0])
def test_block_attention_in_half_precision_is_as_accurate_as_sdpa(dtype, score):
    q, k, v = _near(score, dtype)  # above 65504 a float16 score overflows; its inputs (about 130) do not
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())  # on the rounded inputs, exactly
    ref_lse = torch.logsumexp(q.double() @ k.double().T / math.sqrt(q.shape[-1]), -1)
    out, lse = ra.block_attention(q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    sdpa_error = float((F.scaled_dot_product_attention(q, k, v).double() - ref).abs().max())
    error = float((out.double() - ref).abs().max())
    one_rounding = torch.finfo(dtype).eps * float(ref.abs().max())  # of the output to `dtype`
    assert error <= 1.5 * sdpa_error + one_rounding, (error, sdpa_error)
    assert float((lse.double() - ref_lse).abs().max()) <= 1e-6 * abs(float(ref_lse[0])) + 1e-3


def test_merging_half_precision_partials_keeps_the_lse_exact():
    q, k, v = _near(12800.0, torch.float16, S=8)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    o1, l1 = ra.block_attention(q, k[:3], v[:3])
    o2, l2 = ra.block_attention(q, k[3:], v[3:])
    out, lse = ra.merge_partials(o1, l1, o2, l2)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    assert float((out.double() - ref).abs().max()) < 5e-3


# ----------------------------------------------------------------------------- R = 2: agreement, bytes
@st.composite
def split_cases(draw, tensor_parallel: bool):
    """A compare_case for R = 2: shapes the rank count does or does not divide, masks, layouts, cross-attention."""
    B = draw(st.integers(1, 2))
    heads = draw(st.sampled_from([2, 4])) if tensor_parallel else draw(st.integers(1, 3))
    d_model = heads * draw(st.integers(1, 3))
    cross = draw(st.booleans())
    T = draw(st.integers(2 if not tensor_parallel else 1, 9))
    S = draw(st.integers(2, 9)) if cross else T
    words = [w for w in ("padding", "causal") if draw(st.booleans())]
    if not cross and not tensor_parallel and draw(st.booleans()):
        words.append("is_causal")
    case = {"B": B, "T": T, "d_model": d_model, "heads": heads, "mask": " ".join(words)}
    if cross:
        case.update(S=S, cross=True)
    if not tensor_parallel:
        case["layout"] = draw(st.sampled_from(ra.LAYOUTS))
    return case


def _compare_at_two_ranks(module, case: dict, makes_cases=None) -> list[dict]:
    """module.compare_case on two thread ranks. example_case seeds torch's global generator, which threads share
    (and the shards' own constructors draw from): it is made once here, and every rank gets a copy.
    makes_cases: the module whose example_case compare_case calls (default: module itself)."""
    mha, query, memory, mask, grad_out = example_case(case)

    def fresh(t):
        return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)

    def made(case: dict, seed: int = 0):
        return copy.deepcopy(mha), fresh(query), fresh(memory), mask, grad_out

    with mock.patch.object(module if makes_cases is None else makes_cases, "example_case", made):
        return results_of(run_ranks(2, lambda rank, comm: module.compare_case(rank, 2, case, comm=comm)))


def _assert_agrees(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        bad = {k: v for k, v in result["errors"].items() if not v < TOLERANCE}
        assert not bad, f"rank {rank}, case {result['case']}: {bad}"
        assert (result["sent forward"], result["sent backward"]) == (result["expected forward"],
                                                                     result["expected backward"])


@PROPERTY
@given(case=split_cases(tensor_parallel=False))
def test_ring_attention_at_two_ranks_equals_the_module_and_sends_the_formula(case):
    _assert_agrees(_compare_at_two_ranks(ra, case))


@PROPERTY
@given(case=split_cases(tensor_parallel=False))
def test_ulysses_at_two_ranks_equals_the_module_and_sends_the_formula(case):
    if case["heads"] % 2:  # Ulysses gives each of the 2 ranks whole heads
        case = dict(case, heads=2 * case["heads"], d_model=2 * case["d_model"])
    _assert_agrees(_compare_at_two_ranks(ul, case, makes_cases=ra))


@PROPERTY
@given(case=split_cases(tensor_parallel=True))
def test_tensor_parallel_at_two_ranks_equals_the_module_and_sends_the_formula(case):
    _assert_agrees(_compare_at_two_ranks(tp, case))


@PROPERTY
@given(numel=st.integers(0, 40), R=st.sampled_from([2, 3]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_all_reduce_sums_and_sends_what_ring_allreduce_bytes_counts(numel, R, dtype):
    def one(rank, comm):
        x = torch.arange(numel, dtype=dtype) * (rank + 1)
        return comm.all_reduce(x), comm.sent

    results = results_of(run_ranks(R, one))
    expected = torch.arange(numel, dtype=dtype) * sum(range(1, R + 1))
    size = torch.finfo(dtype).bits // 8
    for rank, (total, sent) in enumerate(results):
        assert torch.equal(total, expected)
        assert sent == ring_allreduce_bytes(numel, R, size, rank=rank)
    if numel % R == 0:
        assert all(sent == ring_allreduce_bytes(numel, R, size) for _, sent in results)
    else:
        with pytest.raises(ValueError, match="numel"):
            ring_allreduce_bytes(numel, R, size)


def test_ring_allreduce_bytes_counts_what_is_sent_or_asks_for_the_rank():
    assert [ring_allreduce_bytes(5, 2, 8, rank=r) for r in range(2)] == [40, 40]  # chunks of 3 and 2 numbers
    with pytest.raises(ValueError, match=r"numel=5 is not divisible by world_size=2(.|\n)*rank"):
        ring_allreduce_bytes(5, 2, 8)
    assert ring_allreduce_bytes(10, 2, 8) == 80
    for bad, name in (({"numel": -1}, "numel"), ({"world_size": 0}, "world_size"), ({"rank": 2}, "rank"),
                      ({"element_size": 2.5}, "element_size")):
        kwargs = dict({"numel": 4, "world_size": 2, "element_size": 4, "rank": 0}, **bad)
        with pytest.raises(CLEAN_ERRORS, match=name):
            ring_allreduce_bytes(**kwargs)


@st.composite
def half_precision_cases(draw):
    B, heads, T = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2])), draw(st.integers(2, 8))
    return (B, heads, T, draw(st.sampled_from(ra.LAYOUTS)), draw(st.booleans()),
            draw(st.sampled_from([torch.float16, torch.bfloat16])), draw(st.sampled_from([1.0, 40.0])),
            draw(st.integers(0, 2**16)))


@PROPERTY
@given(case=half_precision_cases())
def test_ring_attention_in_half_precision_is_as_accurate_as_the_module(case):
    """Against the float64 module, output and input gradient: the ring's error is no worse than the module's own
    in that dtype (scores in the thousands included, where a float16 log-sum-exp is off by units)."""
    B, heads, T, kind, is_causal, dtype, scale, seed = case
    torch.manual_seed(seed)
    mha64 = MultiHeadAttention(8 * heads, heads, dtype=torch.float64)
    mha64.load_state_dict({k: v.to(dtype).double() for k, v in mha64.state_dict().items()})  # representable
    mha = MultiHeadAttention(8 * heads, heads, dtype=dtype)
    mha.load_state_dict({k: v.to(dtype) for k, v in mha64.state_dict().items()})  # the same weights
    x = (torch.randn(B, T, 8 * heads, dtype=torch.float64) * scale).to(dtype)  # scale 40: scores in the thousands
    grad = torch.randn(B, T, 8 * heads, dtype=torch.float64).to(dtype)

    def run(module, x):
        x = x.detach().clone().requires_grad_()
        out = module(x, is_causal=is_causal)
        out.backward(grad.to(x.dtype))
        return out.detach().double(), x.grad.double()

    ref, ref_grad = run(mha64, x.double())
    own, own_grad = run(mha, x)
    layout = ra.SequenceLayout.make(T, 2, kind)

    def one(rank, comm):
        ring = ra.RingAttention.from_module(mha, comm)
        x_r = layout.shard(x, rank).requires_grad_()
        out = ring(x_r, q_layout=layout, is_causal=is_causal)
        out.backward(layout.shard(grad, rank))
        assert out.dtype == x_r.grad.dtype == dtype
        return out.detach(), x_r.grad

    outs, grads = zip(*results_of(run_ranks(2, one)), strict=True)
    relative = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for name, got, expected, module_own in (("out", layout.unshard(list(outs)), ref, own),
                                            ("grad", layout.unshard(list(grads)), ref_grad, own_grad)):
        assert torch.isfinite(got).all(), name
        error, own_error = float((got.double() - expected).abs().max()), float((module_own - expected).abs().max())
        floor = relative * max(1.0, float(expected.abs().max()))
        assert error <= 2 * own_error + floor, (name, error, own_error)


# ----------------------------------------------------------------------------- bad input, refused at R = 2
BAD_RING_INPUTS = ["memory_batch", "dtype", "length", "features", "mask_shape", "mask_dtype", "layout_ranks",
                   "not_a_tensor", "causal_cross", "flag"]


@PROPERTY
@given(bad=st.sampled_from(BAD_RING_INPUTS), B=st.integers(1, 2), T=st.integers(2, 7), S=st.integers(2, 7),
       kind=st.sampled_from(ra.LAYOUTS))
def test_ring_attention_refuses_bad_input_before_any_message(bad, B, T, S, kind):
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2)
    q_layout, kv_layout = ra.SequenceLayout.make(T, 2, kind), ra.SequenceLayout.make(S, 2, kind)
    names = {"memory_batch": "batch size", "dtype": "query", "length": "query", "features": "key",
             "mask_shape": "attn_mask", "mask_dtype": "attn_mask", "layout_ranks": "kv_layout",
             "not_a_tensor": "value", "causal_cross": "is_causal", "flag": "is_causal"}

    def one(rank, comm):
        ring = ra.RingAttention.from_module(mha, comm)
        before = {k: v.clone() for k, v in ring.state_dict().items()}
        query = q_layout.shard(torch.randn(B, T, 8), rank)
        memory = kv_layout.shard(torch.randn(B, S, 8), rank)
        kwargs = {"q_layout": q_layout, "kv_layout": kv_layout}
        args = [query, memory]
        if bad == "memory_batch":
            args[1] = kv_layout.shard(torch.randn(B + 1, S, 8), rank)
        elif bad == "dtype":
            args[0] = query.double()
        elif bad == "length":
            args[0] = torch.randn(B, q_layout.lengths[rank] + 1, 8)
        elif bad == "features":
            args[1] = kv_layout.shard(torch.randn(B, S, 5), rank)
        elif bad == "mask_shape":
            kwargs["attn_mask"] = torch.ones(T, S + 1, dtype=torch.bool)
        elif bad == "mask_dtype":
            kwargs["attn_mask"] = torch.ones(T, S, dtype=torch.int64)
        elif bad == "layout_ranks":
            kwargs["kv_layout"] = ra.SequenceLayout.make(S, 1, "contiguous")
        elif bad == "not_a_tensor":
            args.append(memory.tolist())
        elif bad == "causal_cross":
            kwargs["is_causal"] = True
            kwargs["kv_layout"] = longer = ra.SequenceLayout.make(T + 1, 2, kind)
            args[1] = longer.shard(torch.randn(B, T + 1, 8), rank)
        elif bad == "flag":
            kwargs["is_causal"] = "yes"
        try:
            ring(*args, **kwargs)
        except CLEAN_ERRORS as e:
            assert names[bad] in str(e), f"{bad}: {e}"
        else:
            raise AssertionError(f"{bad}: accepted")
        assert comm.sent == 0 and ring.scores_computed == 0  # refused before any message or score
        assert all(torch.equal(v, before[k]) for k, v in ring.state_dict().items())
        return True

    assert results_of(run_ranks(2, one)) == [True, True]


def test_ring_attention_refuses_a_memory_of_another_batch_size():
    mha = MultiHeadAttention(8, 2)
    layout = ra.SequenceLayout.make(4, 1)
    ring = ra.RingAttention.from_module(mha, ThreadComm(_Ring(1), 0))
    with pytest.raises(ValueError, match=r"batch size B; got query \(2, 4, 8\), key \(1, 4, 8\)"):
        ring(torch.randn(2, 4, 8), torch.randn(1, 4, 8), q_layout=layout)


def test_ring_attention_refuses_float64_input_to_float32_weights():
    ring = ra.RingAttention.from_module(MultiHeadAttention(8, 2), ThreadComm(_Ring(1), 0))
    with pytest.raises(TypeError, match="query has dtype torch.float64 but the module's weights are torch.float32"):
        ring(torch.randn(2, 4, 8, dtype=torch.float64), q_layout=ra.SequenceLayout.make(4, 1))


def test_ring_attention_function_refuses_mismatched_shards():
    comm = ThreadComm(_Ring(1), 0)
    layout = ra.SequenceLayout.make(4, 1)
    q, k = torch.randn(2, 2, 4, 3), torch.randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="must share B, H and d"):
        ra.ring_attention(q, k, k, comm, layout)
    with pytest.raises(TypeError, match="share one dtype"):
        ra.ring_attention(q, q.double(), q.double(), comm, layout)
    with pytest.raises(TypeError, match="comm must be"):
        ra.ring_attention(q, q, q, "comm", layout)


# ----------------------------------------------------------------------------- 4. the self-check verdict
def _result(errors: dict) -> dict:
    return {"case": "c", "errors": errors, "sent forward": 8, "sent backward": 8, "expected forward": 8,
            "expected backward": 8}


@PROPERTY
@given(errors=st.lists(st.one_of(st.floats(0, 1e-6), st.just(math.nan), st.floats(1e-4, 1e3)), min_size=1,
                       max_size=5))
def test_report_says_ok_only_when_every_error_is_small_and_not_nan(errors):
    line = report([_result({f"e{i}": e for i, e in enumerate(errors)})], 2, 0)
    fine = all(e < TOLERANCE for e in errors)  # False for NaN
    assert line.startswith("[ok]" if fine else "[FAILED]"), line
    if any(math.isnan(e) for e in errors):
        assert "nan" in line


def _rank_one_fails(rank: int, world_size: int) -> str:
    return "[ok] R=2 rank 0 c: fine" if rank == 0 else "[FAILED] R=2 rank 1 c: max error nan"


def test_self_check_fails_when_another_rank_fails(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(distributed, "launch", lambda fn, R, timeout: [fn(r, R) for r in range(R)])
    assert distributed.self_check_main(_rank_one_fails, []) == 1
    assert "[FAILED] R=2 rank 1" in capsys.readouterr().out

    def raising(fn, R, timeout):
        raise RankFailure("rank 1 of 2 failed:\nValueError: boom")

    monkeypatch.setattr(distributed, "launch", raising)
    assert distributed.self_check_main(_rank_one_fails, ["2"]) == 1
    assert "[FAILED]" in capsys.readouterr().out


def test_self_check_under_torchrun_reads_every_rank(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "init_from_env", lambda: (0, 2))

    def all_gather_object(out, obj):
        out[:] = [obj, _rank_one_fails(1, 2)]

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(distributed.dist, "barrier", lambda *a: None)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda *a: None)
    assert distributed.self_check_main(_rank_one_fails, []) == 1
    out = capsys.readouterr().out
    assert "[ok] R=2 rank 0" in out and "[FAILED] R=2 rank 1" in out


# ----------------------------------------------------------------------------- 7. the command line
@pytest.mark.parametrize("check", [ra.self_check, tp.self_check], ids=["ring_attention", "tensor_parallel"])
def test_self_check_command_line_explains_its_argument(check, capsys):
    with pytest.raises(SystemExit) as exit_info:
        distributed.self_check_main(check, ["two"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "world_size" in err and "'two'" in err and f"python -m {check.__module__}" in err
    for bad in (["0"], ["2", "3"]):
        with pytest.raises(SystemExit) as exit_info:
            distributed.self_check_main(check, bad)
        assert exit_info.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        distributed.self_check_main(check, ["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_python_dash_m_gives_a_usage_error_not_a_traceback():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("RANK", None)
    done = subprocess.run([sys.executable, "-m", "course_lib.parallel.ring_attention", "two"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO_ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "argument world_size" in done.stderr


# ----------------------------------------------------------------------------- 5. the launcher
@FEW_LAUNCHES
@given(failing_rank=st.integers(0, 1), mode=st.sampled_from(["exit", "lambda", "generator", "lock", "raise"]),
       code=st.integers(1, 120))
def test_a_rank_that_dies_or_returns_the_unpicklable_is_named_at_once(failing_rank, mode, code):
    start = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        launch(behave, 2, (failing_rank, mode, code), timeout=60)
    message = str(failure.value)
    assert message.startswith(f"rank {failing_rank} of 2"), message
    if mode == "exit":
        assert f"died with exit code {code}" in message.splitlines()[0]
    elif mode == "raise":
        assert "failed on purpose" in message
    else:
        assert "cannot be pickled" in message
    assert time.monotonic() - start < 20  # well before the timeout


def test_ranks_may_return_tensors_and_fn_may_be_a_partial():
    results = launch(functools.partial(tensors, shape=(2, 2)), 2, (2.0,), timeout=60)
    assert [r["n"] for r in results] == [0, 1]
    assert torch.equal(results[1]["x"], torch.full((2, 2), 2.0)) and torch.equal(results[0]["x"], torch.zeros(2, 2))


@PROPERTY
@given(timeout=st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 0, -1, 0.0, True, "10", None]),
                         st.floats(max_value=0.0, allow_nan=False)))
def test_launch_refuses_a_timeout_that_is_not_a_finite_positive_number(timeout):
    with pytest.raises(CLEAN_ERRORS, match="timeout"):
        launch(tensors, 2, timeout=timeout)


@PROPERTY
@given(args=st.one_of(st.integers(), st.text(max_size=3), st.none(), st.dictionaries(st.text(max_size=1), st.integers(),
                                                                                    max_size=1),
                      st.floats(allow_nan=False), st.sets(st.integers(), max_size=2)))
def test_launch_refuses_args_that_are_not_a_tuple(args):
    with pytest.raises(TypeError, match="args must be a tuple"):
        launch(tensors, 2, args)


@pytest.mark.parametrize("fn", [lambda rank, world_size: None, functools.partial(lambda r, w: None), 3],
                         ids=["lambda", "partial of a lambda", "not callable"])
def test_launch_refuses_a_function_no_process_can_import(fn):
    with pytest.raises(TypeError, match="fn must be"):
        launch(fn, 2)

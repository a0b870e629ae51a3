"""Tensor-parallel attention and ring attention on 2 and 4 gloo ranks equal the single-device module.

Outputs and gradients (inputs and every weight) to 1e-5 in float32, for self- and cross-attention,
padding and causal masks and lengths that the rank count does not divide; the bytes each rank sends
equal the formulas; a rank that fails or hangs fails the launch with a message, never hangs the suite.
Each launch of processes costs seconds, so all cases for one rank count run in one launch.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from course_lib import MultiHeadAttention
from course_lib.masks import padding_mask
from course_lib.numpy_ref import scaled_dot_product_attention as numpy_attention
from course_lib.parallel import ring_attention as ra
from course_lib.parallel import tensor_parallel as tp
from course_lib.parallel import ulysses as ul
from course_lib.parallel.distributed import (
    Comm,
    RankFailure,
    check_collectives,
    demo_failure,
    launch,
    ring_allreduce_bytes,
    run_many,
)
from course_lib.tools.paths import REPO_ROOT

TOL = 1e-5

TP_CASES = [
    {"B": 2, "T": 7, "d_model": 16, "heads": 4, "mask": ""},
    {"B": 2, "T": 7, "d_model": 16, "heads": 4, "mask": "padding causal"},
    {"B": 1, "T": 6, "d_model": 16, "heads": 4, "mask": "is_causal"},
    {"B": 2, "T": 5, "S": 9, "d_model": 16, "heads": 4, "cross": True, "mask": "padding"},
]
RING_CASES = [
    {"B": 2, "T": 9, "d_model": 16, "heads": 4, "mask": ""},
    {"B": 2, "T": 10, "d_model": 16, "heads": 4, "mask": "is_causal"},
    {"B": 2, "T": 9, "d_model": 16, "heads": 4, "mask": "padding is_causal", "layout": "zigzag"},
    {"B": 1, "T": 7, "d_model": 16, "heads": 4, "mask": "causal", "layout": "striped"},
    {"B": 2, "T": 6, "S": 11, "d_model": 16, "heads": 4, "cross": True, "mask": "padding"},
]
WORK = {"B": 1, "T": 64, "d_model": 16, "heads": 4, "repeats": 1}


def _calls():
    calls = [(check_collectives, {"numel": 10})]
    calls += [(tp.compare_case, {"case": c}) for c in TP_CASES]
    calls += [(ra.compare_case, {"case": c}) for c in RING_CASES]
    calls += [(ra.measure_step, dict(WORK, layout=kind)) for kind in ("contiguous", "zigzag")]
    calls += [(tp.measure_step, WORK)]
    return calls


@pytest.fixture(scope="module", params=[2, 4], ids=["R=2", "R=4"])
def launched(request):
    R = request.param
    per_rank = launch(run_many, R, (_calls(),), timeout=120)
    n_tp, n_ring = len(TP_CASES), len(RING_CASES)
    return {
        "R": R,
        "collectives": [r[0] for r in per_rank],
        "tp": [[r[1 + i] for r in per_rank] for i in range(n_tp)],  # [case][rank]
        "ring": [[r[1 + n_tp + i] for r in per_rank] for i in range(n_ring)],
        "work": {kind: [r[1 + n_tp + n_ring + j] for r in per_rank] for j, kind in enumerate(("contiguous", "zigzag"))},
        "tp work": [r[-1] for r in per_rank],
    }


@pytest.fixture(scope="module")
def one_rank():
    """A process group of one rank, in this process: the single-device baseline of the same code."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched rank does; tiny ops on a busy machine crawl with more threads
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


def _assert_close(results):
    for per_rank in results:
        for rank, result in enumerate(per_rank):
            bad = {k: v for k, v in result["errors"].items() if not v < TOL}  # NaN fails too
            assert not bad, f"rank {rank}, case {result['case']}: errors above {TOL}: {bad}"


def test_ring_collectives_equal_torch_distributed(launched):
    R = launched["R"]
    for r in launched["collectives"]:
        assert r["all_reduce error"] < 1e-12 and r["all_gather error"] == 0.0
    # the chunks of 10 numbers differ in size, so ranks send different amounts; together 2 (R - 1) N numbers
    assert sum(r["all_reduce sent"] for r in launched["collectives"]) == 2 * (R - 1) * 10 * 8
    assert all(r["all_gather sent"] == (R - 1) * 10 * 8 for r in launched["collectives"])


def test_tensor_parallel_equals_the_single_module(launched):
    _assert_close(launched["tp"])
    assert len(launched["tp"][0]) == launched["R"]


def test_ring_attention_equals_the_single_module(launched):
    _assert_close(launched["ring"])


@pytest.mark.parametrize("kind", ["tp", "ring"])
def test_bytes_sent_equal_the_formula(launched, kind):
    for per_rank in launched[kind]:
        for result in per_rank:
            assert result["sent forward"] == result["expected forward"] > 0, result["case"]
            assert result["sent backward"] == result["expected backward"] > 0, result["case"]


def test_tensor_parallel_bytes_formula_by_hand(launched):
    R = launched["R"]
    case = launched["tp"][0][0]  # self-attention, B=2, T=7, d_model=16, float32
    assert case["sent forward"] == case["sent backward"] == 2 * (R - 1) * (2 * 7 * 16 // R) * 4


def test_ring_bytes_formula_by_hand(launched):
    R = launched["R"]
    work = launched["work"]["contiguous"]  # B=1, T=64 (divisible), d_model=16, float32
    block = 1 * (64 // R) * 16 * 4  # one shard of keys (or values, or their gradients)
    weight_grads = ring_allreduce_bytes(4 * (16 * 16 + 16), R, 4)
    for r in work:
        assert r["sent per step"] - r["sent for weight gradients"] == 2 * (R - 1) * block + (4 * (R - 1) + 2) * block
        assert r["sent for weight gradients"] == weight_grads


def test_causal_work_is_uneven_contiguous_and_even_zigzag(launched):
    R = launched["R"]
    contiguous = [r["scores computed"] for r in launched["work"]["contiguous"]]
    zigzag = [r["scores computed"] for r in launched["work"]["zigzag"]]
    block = (64 // R) ** 2
    assert contiguous == [(rank + 1) * block for rank in range(R)]  # rank r: r full blocks and its diagonal
    assert max(zigzag) == min(zigzag) == (2 * R + 1) * block // 4  # 2R - 1 full quarter-blocks and 2 diagonals
    assert sum(zigzag) < sum(contiguous)


def test_activation_memory_falls_as_one_over_R_against_one_rank(launched, one_rank):
    R = launched["R"]
    ring_one = ra.measure_step(0, 1, **dict(WORK, layout="contiguous"))["activation bytes"]
    tp_one = tp.measure_step(0, 1, **WORK)
    for r in launched["work"]["contiguous"]:
        assert r["activation bytes"] * R == ring_one
    for r in launched["tp work"]:
        assert r["activation bytes"] * R == tp_one["activation bytes"]
        assert r["weight bytes"] == (tp_one["weight bytes"] - 4 * 16) // R + 4 * 16  # W_O's bias on every rank


def test_activation_memory_per_rank_falls_as_one_over_R(launched):
    R = launched["R"]
    single = ra.SequenceLayout.make(64, 1)  # the unsplit layout, for the arithmetic below
    assert single.lengths == [64]
    per_rank = [r["activation bytes"] for r in launched["work"]["contiguous"]]
    assert len(set(per_rank)) == 1
    # saved per rank: the projections' outputs q, k, v (3 B T_r d_model), the heads' output and the
    # lse for the ring (B T_r d_model + B H T_r), the merged heads before W_O (B T_r d_model), in float32
    T_r = 64 // R
    assert per_rank[0] == 4 * (3 * T_r * 16 + T_r * 16 + 4 * T_r + T_r * 16)


def test_a_failing_rank_fails_the_launch_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 1 of 2 failed:(.|\n)*ValueError: rank 1 failed on purpose"):
        launch(demo_failure, 2, (1, "raise"), timeout=60)
    assert time.monotonic() - start < 30


def test_a_hanging_rank_fails_the_launch_after_the_timeout():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"did not finish within timeout=4"):
        launch(demo_failure, 2, (1, "hang"), timeout=4)
    assert time.monotonic() - start < 15


def test_launch_refuses_a_function_a_spawned_process_cannot_import():
    with pytest.raises(TypeError, match="importable module"):
        launch(lambda rank, world_size: None, 2)
    with pytest.raises(ValueError, match="world_size"):
        launch(demo_failure, 0)
    with pytest.raises(ValueError, match="timeout"):
        launch(demo_failure, 2, timeout=0)


# ----------------------------------------------------------------------------- in one process
@pytest.mark.parametrize("kind", ra.LAYOUTS)
@pytest.mark.parametrize(("length", "R"), [(9, 2), (9, 4), (16, 4), (5, 4)])
def test_layouts_cover_every_position_once_and_unshard_inverts_shard(kind, length, R):
    layout = ra.SequenceLayout.make(length, R, kind)
    assert sorted(torch.cat(layout.positions).tolist()) == list(range(length))
    assert max(layout.lengths) - min(layout.lengths) <= (2 if kind == "zigzag" else 1)
    x = torch.randn(2, length, 3)
    shards = [layout.shard(x, r) for r in range(R)]
    assert torch.equal(layout.unshard(shards), x)
    for r in range(R):  # the runs describe the positions exactly
        rebuilt = [p for _, start, n in layout.runs(r) for p in range(start, start + n)]
        assert rebuilt == layout.positions[r].tolist()


def test_layout_refuses_a_bad_partition():
    with pytest.raises(ValueError, match="each exactly once"):
        ra.SequenceLayout((torch.tensor([0, 1]), torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="kind"):
        ra.SequenceLayout.make(8, 2, "diagonal")


def test_causal_work_of_the_layouts():
    assert ra.causal_work(ra.SequenceLayout.make(8, 2, "contiguous")) == [10, 26]
    assert ra.causal_work(ra.SequenceLayout.make(8, 2, "zigzag")) == [18, 18]
    assert ra.causal_work(ra.SequenceLayout.make(8, 2, "striped")) == [16, 20]


def test_merging_partials_over_key_blocks_equals_attention_over_all_keys():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 4, generator=gen, dtype=torch.float64) * 3 for _ in range(3))
    mask = padding_mask([5, 2], 5)[:, 0]  # (B, 1, 5): the second sequence has 2 real keys
    expected, _ = numpy_attention(q.numpy(), k.numpy(), v.numpy(), mask.numpy())
    out, lse = None, None
    for cols in (slice(0, 2), slice(2, 3), slice(3, 5)):  # three blocks of keys, merged one by one
        o, l = ra.block_attention(q, k[:, cols], v[:, cols], mask[..., cols])
        out, lse = (o, l) if out is None else ra.merge_partials(out, lse, o, l)
    torch.testing.assert_close(out, torch.from_numpy(expected), atol=1e-12, rtol=0)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(4)).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-12, rtol=0)


def test_merging_two_empty_partials_gives_zeros_not_nan():
    out = torch.zeros(3, 2)
    lse = torch.full((3,), float("-inf"))
    merged, merged_lse = ra.merge_partials(out, lse, out, lse)
    assert torch.equal(merged, torch.zeros(3, 2)) and torch.isneginf(merged_lse).all()
    nothing = torch.zeros(3, 4, dtype=torch.bool)
    o, l = ra.block_attention(torch.randn(3, 2), torch.randn(4, 2), torch.randn(4, 2), nothing)
    assert torch.equal(o, torch.zeros(3, 2)) and torch.isneginf(l).all()


@pytest.mark.skipif(os.environ.get("COURSE_LIB_TORCHRUN") != "1",
                    reason="starts torchrun (about 10 s): set COURSE_LIB_TORCHRUN=1 to run it")
@pytest.mark.parametrize("module", ["course_lib.parallel.tensor_parallel", "course_lib.parallel.ring_attention",
                                    "course_lib.parallel.ulysses"])
def test_torchrun_runs_the_self_check(module):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", module],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("[ok]") == 3 and "FAILED" not in done.stdout


# ----------------------------------------------------------------------------- one rank, in this process
def test_one_rank_equals_the_module_and_converts_back(one_rank):
    for compare in (tp.compare_case, ra.compare_case):
        result = compare(0, 1, {"B": 2, "T": 5, "d_model": 16, "heads": 4, "mask": "padding"})
        assert max(result["errors"].values()) < TOL and result["sent forward"] == result["sent backward"] == 0


def test_bad_input_is_refused_with_the_argument_named(one_rank):
    mha = MultiHeadAttention(16, 4)
    shard = tp.TensorParallelAttention.from_module(mha)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="query must have shape"):
        shard(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="attn_mask"):
        shard(x, attn_mask=torch.ones(2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal"):
        shard(x, torch.randn(2, 7, 16), is_causal=True)
    with pytest.raises(TypeError, match="mha must be"):
        tp.TensorParallelAttention(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dropout"):
        tp.TensorParallelAttention.from_module(MultiHeadAttention(16, 4, dropout=0.1))(x)
    ring = ra.RingAttention.from_module(mha)
    layout = ra.SequenceLayout.make(5, 1)
    with pytest.raises(ValueError, match="query must be this rank's shard"):
        ring(torch.randn(2, 4, 16), q_layout=layout)
    with pytest.raises(ValueError, match="q_layout is for 2 ranks"):
        ring(x, q_layout=ra.SequenceLayout.make(5, 2))
    with pytest.raises(ValueError, match="query must have shape"):
        ring(torch.randn(2, 5, 8), q_layout=layout)
    with pytest.raises(ValueError, match="is_causal"):
        ring(x, torch.randn(2, 7, 16), q_layout=layout, kv_layout=ra.SequenceLayout.make(7, 1), is_causal=True)
    with pytest.raises(ValueError, match="layout is for length 5"):
        layout.shard(torch.randn(2, 6, 16), 0)


def test_tensor_parallel_needs_whole_heads_per_rank(one_rank):
    class TwoRanks(Comm):
        world_size = 2  # a group of two, as far as the shard can tell

    with pytest.raises(ValueError, match="num_heads=3 must be divisible"):
        tp.TensorParallelAttention(MultiHeadAttention(12, 3), TwoRanks())


@pytest.mark.parametrize(("H", "H_kv", "R", "says"), [(8, 2, 4, "num_kv_heads=2 < R=4: each key/value head would have "
                                                                 "to be replicated"),
                                                   (8, 1, 2, "num_kv_heads=1 < R=2"),
                                                   (8, 4, 2, "num_kv_heads=4 >= R=2: rank r would own")])
def test_tensor_parallel_refuses_grouped_query_attention_saying_how_it_would_split(one_rank, H, H_kv, R, says):
    class Ranks(Comm):
        world_size = R  # a group of R, as far as the shard can tell

    comm = Ranks()
    with pytest.raises(ValueError, match=says):
        tp.TensorParallelAttention(MultiHeadAttention(16, H, num_kv_heads=H_kv), comm)
    assert comm.sent == 0


def test_ring_takes_an_additive_float_mask_like_the_module(one_rank):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4)
    x = torch.randn(2, 6, 16)
    mask = torch.randn(2, 4, 6, 6).masked_fill(torch.rand(2, 4, 6, 6) < 0.3, float("-inf"))  # per head
    mask[0, 1, 2] = float("-inf")  # a row with nothing to attend to: output 0 there, as in the module
    layout = ra.SequenceLayout.make(6, 1, "zigzag")
    out = ra.RingAttention.from_module(mha)(x, q_layout=layout, attn_mask=mask, is_causal=True)
    torch.testing.assert_close(out, mha(x, attn_mask=mask, is_causal=True), atol=TOL, rtol=0)


@pytest.mark.parametrize("options", [{"num_kv_heads": 2}, {"learned_sink": True}, {"window": 3}])
def test_modern_options_are_refused_not_split_wrongly(one_rank, options):
    from course_lib.modern import DecoderAttention
    from course_lib.positional import RotaryEmbedding

    cls = MultiHeadAttention if "num_kv_heads" in options else DecoderAttention
    for mha in (cls(16, 4, **options), MultiHeadAttention(16, 4, rotary=RotaryEmbedding(4))):
        for build in (tp.TensorParallelAttention.from_module, ra.RingAttention.from_module,
                      ul.UlyssesAttention.from_module):
            with pytest.raises(ValueError, match="splits plain multi-head attention only"):
                build(mha)

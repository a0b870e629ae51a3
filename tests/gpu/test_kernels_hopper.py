"""The Triton kernels compiled for Hopper (sm_90) on this machine, no GPU needed.

Triton can compile a kernel for a GPU that is not there (ahead of time, with the ptxas it ships),
which shows what the CPU interpreter cannot: the precision of each tl.dot, whether the
matrix products became Hopper's wgmma instructions, the 64-bit offsets, and the shared memory
each block size needs. Every config the launcher may pick must fit in the 227 KiB a block can
have on an H100 or H200; a config that did not would fail at launch on the GPU.

It also reads the machine code (registers per thread, the stack frame that spilled registers
take, the warps that run): every 16-bit config of the backward kernels and of the Hopper forward
kernel must compile without spilling, and the Hopper forward kernel must come out warp-specialized
(a producer warpgroup issuing TMA copies, two consumer warpgroups), which Triton does only under
conditions it does not report when they are not met.

COURSE_LIB_HOPPER_SWEEP=1 compiles every candidate config of every kernel, dtype and head size
(minutes); by default a subset: the largest configs, float32 at d_head 256, each kernel once, and
every candidate of the Hopper forward and of the backward kernels at d_head 128 in bfloat16.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.maintainer  # a minute of compiling: make ci runs it, make test does not
MAX_SHARED_PER_BLOCK = 232448  # 227 KiB: the opt-in limit of compute capability 9.0


def compile_for_hopper(cases: list[dict]) -> list[dict]:
    """Compile each case in a fresh process: in this one Triton may be in interpreter mode
    (TRITON_INTERPRET=1 is read once, at import), where kernels cannot be compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu" / "hopper_compile.py")], input=json.dumps(cases),
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def _cases():
    from course_lib.kernels import _flash_triton as fk  # interpreter or not: only the config tables are read

    sweep = os.environ.get("COURSE_LIB_HOPPER_SWEEP") == "1"
    cases = []
    for kind in ("fwd", "dkdv", "dq"):
        for dtype in ("bfloat16", "float16", "float32") if sweep else ("bfloat16", "float32"):
            for d_head in (32, 64, 128, 256) if sweep else ((128,) if dtype == "bfloat16" else (256,)):
                for causal in (False, True) if sweep else (kind == "dq",):
                    block_d = fk.block_d_for(d_head)
                    itemsize = 4 if dtype == "float32" else 2
                    configs = fk.candidate_configs(kind, block_d, itemsize, causal)
                    for config in configs if sweep else configs[:1]:
                        cases.append({"kind": kind, "dtype": dtype, "d_head": d_head, "causal": causal,
                                      "precision": "ieee", "config": list(config)})
    for kind in ("fwd_ws", "dkdv", "dq"):  # every candidate: no spills, and the Hopper kernel's warpgroups
        for d_head in (64, 128) if sweep else (128,):
            for causal in (False, True):
                for config in fk.candidate_configs(kind, d_head, 2, causal):
                    case = {"kind": kind, "dtype": "bfloat16", "d_head": d_head, "causal": causal,
                            "precision": "ieee", "config": list(config)}
                    if case not in cases:
                        cases.append(case)
    cases.append({"kind": "fwd_ws", "dtype": "bfloat16", "d_head": 64, "causal": False, "precision": "ieee",
                  "config": list(fk.WS_FWD_CONFIGS[0]), "mask_keys": True})  # S not a multiple of 128
    return cases


@pytest.fixture(scope="module")
def compiled():
    cases = _cases()
    cases += [  # precision and 64-bit offsets
        {"kind": "fwd", "dtype": "float32", "d_head": 32, "causal": False, "precision": p, "config": [32, 32, 4, 1]}
        for p in ("ieee", "tf32")
    ] + [{"kind": k, "dtype": "float16", "d_head": 64, "causal": False, "precision": "ieee", "config": [64, 64, 4, 1]}
         for k in ("fwd", "dkdv", "dq")]
    return compile_for_hopper(cases)


def test_candidate_configs_fit_hopper_shared_memory(compiled):
    for case in compiled:
        assert 0 < case["shared"] <= MAX_SHARED_PER_BLOCK, case
        if case["dtype"] != "float32":  # 16-bit tiles must reach the Tensor Cores through Hopper's wgmma
            assert case["wgmma"] > 0, case


def warp_specialized(case: dict) -> bool:
    """One producer warpgroup (TMA copies only) and two consumers: 12 warps from num_warps=4, registers
    handed from the producer to the consumers (setmaxnreg), tiles moved by TMA, none by per-thread copies."""
    return (case["warps"] == 3 * case["config"][2] == 12 and case["setmaxnreg"] > 0 and case["tma_copies"] > 0
            and case["thread_copies"] == 0)


def test_16_bit_configs_of_the_backward_and_hopper_kernels_do_not_spill(compiled):
    """A spilled register lives in local memory (device memory through L1): a stack frame above 0 bytes."""
    from course_lib.kernels import _flash_triton as fk

    # d_head 64 and 128, the tuned sizes; at 256 the one dK/dV config that fits keeps 88 bytes (Triton 3.6.0)
    cases = [c for c in compiled if c["kind"] in ("fwd_ws", "dkdv", "dq") and c["dtype"] != "float32"
             and c["d_head"] in fk.TUNED_D
             and tuple(c["config"]) in fk.candidate_configs(c["kind"], fk.block_d_for(c["d_head"]), 2, c["causal"])]
    assert {c["kind"] for c in cases} == {"fwd_ws", "dkdv", "dq"}
    for case in cases:
        assert case["stack_bytes"] == 0, case


def test_the_hopper_forward_is_warp_specialized_and_loads_by_tma(compiled):
    from course_lib.kernels import _flash_triton as fk

    cases = [c for c in compiled if c["kind"] == "fwd_ws"]
    assert {c["causal"] for c in cases} == {False, True} and len(cases) > 2 * len(fk.WS_FWD_CONFIGS)
    for case in cases:
        assert warp_specialized(case), case
        # 168 = what each of the 384 threads has at launch (65 536 / 384, to a multiple of 8); setmaxnreg then
        # lowers the producer's limit and raises the consumers'
        assert case["registers"] <= 168 and case["wgmma"] > 0, case


def test_the_warpgroup_check_can_fail():
    """Compiled with num_warps=8, Triton keeps the flag but does not specialize (8 warps, no setmaxnreg),
    and the portable kernel loads with per-thread copies: the check says no to both."""
    from course_lib.kernels import _flash_triton as fk

    eight = {"kind": "fwd_ws", "dtype": "bfloat16", "d_head": 128, "causal": True, "precision": "ieee",
             "config": [128, 128, 8, 2]}
    portable = {"kind": "fwd", "dtype": "bfloat16", "d_head": 128, "causal": True, "precision": "ieee",
                "config": list(fk.candidate_configs("fwd", 128, 2, True)[0])}
    for case in compile_for_hopper([eight, portable]):
        assert not warp_specialized(case), case
    assert case["tma_copies"] == 0 and case["thread_copies"] > 0  # the portable kernel: cp.async per thread


def test_float32_products_are_exact_unless_tf32_is_asked_for(compiled):
    """Triton's default for a float32 tl.dot on a GPU is TF32; the kernel must say what it wants."""
    by = {c["precision"]: c for c in compiled if c["dtype"] == "float32" and c["d_head"] == 32}
    assert by["ieee"]["tf32_dots"] == 0 and by["ieee"]["tf32_mma"] == 0
    assert by["tf32"]["tf32_dots"] > 0 and by["tf32"]["tf32_mma"] > 0


def test_offsets_to_each_head_are_64_bit(compiled):
    """bh * T * D passes 2^31 for large batches: the per-head base pointers must move by an int64."""
    cases = [c for c in compiled if c["dtype"] == "float16" and c["d_head"] == 64]
    assert {c["kind"] for c in cases} == {"fwd", "dkdv", "dq"}
    for case in cases:
        assert case["head_offsets"] and set(case["head_offsets"]) == {"i64"}, case


def test_grid_is_one_dimensional_for_any_number_of_heads():
    """CUDA caps grid axes 1 and 2 at 65535; axis 0 at 2^31 - 1."""
    from course_lib.kernels import _flash_triton as fk

    (programs,) = fk.grid_size(70_000, 1000, 128)
    assert programs == 70_000 * 8 and programs < 2**31 - 1


def test_the_offset_check_would_see_32_bit_offsets():
    """The regex of test_offsets_to_each_head_are_64_bit reads i32 offsets as such (it can fail)."""
    line = "%Q_13 = tt.addptr %Q, %Q_12 : !tt.ptr<f16>, i32 loc(#loc96)"
    assert re.findall(r"tt\.addptr %(?:Q|K|V|O|DO|DK|DV|DQ), %\S+ : !tt\.ptr<\w+>, (i\d+)", line) == ["i32"]


def test_the_recorded_compile_facts_are_what_triton_compiles_now():
    """Notebook 10 shows data/benchmarks/hopper_compile_sm90_triton3.6.0.json (Triton 3.6.0, the version on the
    course's GPU machine). With that Triton every figure must come out again; with another (3.7.1 here), the
    warps, shared memory, TMA copies, register hand-offs, wgmma count and whether anything spills."""
    path = ROOT / "data" / "benchmarks" / "hopper_compile_sm90_triton3.6.0.json"
    record = json.loads(path.read_text())
    keys = ("kind", "dtype", "d_head", "causal", "precision", "config", "mask_keys")
    fresh = compile_for_hopper([{k: row[k] for k in keys} for row in record["rows"]])
    same_triton = fresh[0]["triton"] == record["triton"]
    compared = ("warps", "shared", "tma_copies", "setmaxnreg", "wgmma")
    compared += ("registers", "stack_bytes", "thread_copies") if same_triton else ()
    for old, new in zip(record["rows"], fresh, strict=True):
        assert {k: old[k] for k in compared} == {k: new[k] for k in compared}, (old, new)
        assert (old["stack_bytes"] == 0) == (new["stack_bytes"] == 0), (old, new)

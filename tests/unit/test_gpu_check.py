"""scripts/gpu_check.py: the stage order, the target verdicts (on synthetic records), and the dry run on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_measurements_that_decide_the_targets_come_first(gc):
    assert gc.STAGES == ("smoke", "tune", "targets", "modules", "profile", "accuracy", "attention", "tests", "oom")
    assert set(gc.TARGETS) == {"triton_fwd_vs_best_sdpa_min", "triton_fwd_bwd_vs_best_sdpa_min",
                               "module_step_vs_plain_sdpa_max", "decode_step_vs_plain_max",
                               "graph_static_speedup_min"}
    assert (gc.TARGETS["triton_fwd_vs_best_sdpa_min"], gc.TARGETS["triton_fwd_bwd_vs_best_sdpa_min"]) == (0.8, 0.6)
    assert gc.TARGETS["module_step_vs_plain_sdpa_max"] == gc.TARGETS["decode_step_vs_plain_max"] == 1.05
    assert gc.TARGETS["graph_static_speedup_min"] == 3.0
    assert set(gc.TARGET_IMPLS) == {"sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "triton", "triton_portable"}


def test_16384_only_when_the_budget_covers_it(gc):
    assert gc.target_lengths(1000, 200) == [4096, 8192, 16384]
    assert gc.target_lengths(370, 200) == [4096, 8192]


# ----------------------------------------------------------------------------- synthetic records
def _core(impl, T, causal, pass_, device_s, spread=0.05, d_head=128):
    return {"level": "core", "impl": impl, "T": T, "d_head": d_head, "causal": causal, "pass": pass_, "status": "ok",
            "tflops": 1.0 / device_s, "frac_peak": 0.5, "device_s": device_s,
            "device_q1_s": device_s * (1 - spread), "device_q3_s": device_s * (1 + spread)}


def _attention(triton_fwd, triton_bwd, Ts=(4096, 8192), d_head=128):
    rows = []
    for T in Ts:
        for causal in (False, True):
            rows += [_core("sdpa_flash", T, causal, "fwd", 1.0, d_head=d_head),
                     _core("sdpa_cudnn", T, causal, "fwd", 0.9, d_head=d_head),
                     _core("triton", T, causal, "fwd", triton_fwd, d_head=d_head),
                     _core("sdpa_flash", T, causal, "fwd+bwd", 3.0, d_head=d_head),
                     _core("triton", T, causal, "fwd+bwd", triton_bwd, d_head=d_head)]
    return {"rows": rows}


def _timing(device_s, spread=0.02):
    return {"median_s": device_s, "device": {"device_s": device_s, "device_q1_s": device_s * (1 - spread),
                                             "device_q3_s": device_s * (1 + spread), "method": "cuda events"}}


def _modules(train_ratio=1.0, decode_ratio=1.0, dynamic_s=3e-4, graph_s=5e-5, cache=(1, 32)):
    rows = [{"config": {"step": "forward+backward", "batch": 4, "seq": 1024, "causal": False},
             "timings": {"course_lib": _timing(train_ratio * 1e-3), "plain_sdpa": _timing(1e-3)}}]
    for kind, ours in (("dynamic", dynamic_s), ("static", 1e-4), ("graph", graph_s)):
        rows.append({"config": {"step": "decode one token (no grad)", "batch": cache[0], "cache_len": cache[1],
                                "cache_kind": kind, "cuda_graph": kind == "graph"},
                     "timings": {"course_lib": _timing(ours), "plain_sdpa": _timing(ours / decode_ratio)}})
    return {"rows": rows}


FIELDS = {"target", "bound", "where", "timing_method", "cases", "value", "range", "verdict", "noise_straddles_bound"}


def test_targets_met(gc):
    v = gc.evaluate_targets(_attention(triton_fwd=1.0, triton_bwd=4.0), None, _modules())
    assert {name: t["verdict"] for name, t in v.items()} == dict.fromkeys(gc.TARGETS, "met")
    fwd = v["triton_fwd_vs_best_sdpa_min"]
    assert set(fwd) == FIELDS and len(fwd["cases"]) == 4  # T 4096, 8192 x causal and not
    assert fwd["value"] == pytest.approx(0.9) and fwd["range"][0] < 0.9 < fwd["range"][1]
    assert fwd["timing_method"].startswith("device_s")
    assert v["triton_fwd_bwd_vs_best_sdpa_min"]["value"] == pytest.approx(0.75)
    assert v["graph_static_speedup_min"]["value"] == pytest.approx(6.0)
    assert "separate comparisons" in v["graph_static_speedup_min"]["timing_method"]


def test_targets_missed_are_named_with_the_worst_case(gc):
    slow = _attention(triton_fwd=1.2, triton_bwd=6.0)
    slow["rows"].append(_core("triton", 8192, True, "fwd", 2.0))  # only the first triton row of a case counts
    v = gc.evaluate_targets(slow, None, _modules(train_ratio=1.2, decode_ratio=1.5, dynamic_s=1e-4, graph_s=5e-5))
    assert {name: t["verdict"] for name, t in v.items()} == dict.fromkeys(gc.TARGETS, "missed")
    assert v["triton_fwd_vs_best_sdpa_min"]["value"] == pytest.approx(0.75)
    assert v["module_step_vs_plain_sdpa_max"]["value"] == pytest.approx(1.2)
    assert v["decode_step_vs_plain_max"]["value"] == pytest.approx(1.5)
    assert v["graph_static_speedup_min"]["value"] == pytest.approx(2.0)


def test_noise_that_straddles_the_bound_is_said(gc):
    noisy = _attention(triton_fwd=1.1, triton_bwd=4.0)
    for r in noisy["rows"]:
        r["device_q1_s"], r["device_q3_s"] = r["device_s"] * 0.7, r["device_s"] * 1.3
    t = gc.evaluate_targets(noisy, None, None)["triton_fwd_vs_best_sdpa_min"]
    assert t["verdict"] == "met" and t["noise_straddles_bound"] is True  # 0.82 by the medians, but it could be 0.5


def test_not_measured_where_nothing_is_at_the_target_shapes(gc):
    v = gc.evaluate_targets(_attention(1.0, 4.0, Ts=(1024, 2048)), _attention(1.0, 4.0, d_head=64), None)
    assert {name: t["verdict"] for name, t in v.items()} == dict.fromkeys(gc.TARGETS, "not measured")
    assert all(t["value"] is None and t["cases"] == [] for t in v.values())


def test_old_module_rows_without_device_times_give_a_value_without_a_range(gc):
    modules = {"rows": [{"config": {"step": "forward+backward", "batch": 4, "seq": 4096, "causal": True},
                         "timings": {"course_lib": {"median_s": 1.02e-3}, "plain_sdpa": {"median_s": 1e-3}}}]}
    t = gc.evaluate_targets(None, None, modules)["module_step_vs_plain_sdpa_max"]
    assert t["verdict"] == "met" and t["value"] == pytest.approx(1.02) and t["range"] is None
    assert "dispatch included" in t["timing_method"]


def test_the_two_forward_kernels_are_set_side_by_side(gc):
    record = _attention(0.9, 3.0, Ts=(4096,))
    record["rows"] += [_core("triton_portable", 4096, causal, "fwd", 1.8) for causal in (False, True)]
    rows = gc.forward_kernels_compared(record)
    fwd = [r for r in rows if r["pass"] == "fwd"]
    assert [(r["T"], r["causal"]) for r in fwd] == [(4096, False), (4096, True)]
    for r in fwd:  # best SDPA 0.9 s: the Hopper kernel as fast (1.0), the portable one half as fast (0.5)
        assert r["auto_vs_best_sdpa"] == pytest.approx(1.0) and r["portable_vs_best_sdpa"] == pytest.approx(0.5)
        assert r["auto_over_portable_speed"] == pytest.approx(2.0)
    bwd = [r for r in rows if r["pass"] == "fwd+bwd"]  # no portable row: nothing to divide by
    assert bwd and all(r["portable_vs_best_sdpa"] is None and "auto_over_portable_speed" not in r for r in bwd)
    assert gc.forward_kernels_compared(None) == []


def test_cache_kind_is_passed_only_where_run_decode_takes_it(gc, monkeypatch):
    def old_run_decode(*, batch, cache_len, d_model, heads, repeats, warmup, device, dtype):
        raise AssertionError("not called here")

    def new_run_decode(*, batch, cache_len, d_model, heads, repeats, warmup, device, dtype, cache_kind="dynamic"):
        raise AssertionError("not called here")

    monkeypatch.setattr(gc.mha_bench, "run_decode", old_run_decode)
    assert gc.decode_kwargs("graph") == {}
    monkeypatch.setattr(gc.mha_bench, "run_decode", new_run_decode)
    assert gc.decode_kwargs("graph") == {"cache_kind": "graph"}


def test_a_kernel_that_corrupts_memory_is_left_out(gc):
    assert gc.kernel_is_sound({"failures": [{"test": "t", "message": "AssertionError: 0.1 > 0.01"}]}, None)
    assert not gc.kernel_is_sound({}, {"failures": [{"test": "t", "message": "CUDA error: an illegal memory access"}]})


def test_tests_that_timed_out_leave_the_kernels_out_on_a_gpu(gc, monkeypatch):
    monkeypatch.setattr(gc, "ON_GPU", True)
    assert not gc.kernel_is_sound({"returncode": None, "output_tail": "timed out after 150 s"})
    assert gc.kernel_is_sound({"returncode": 1, "failures": []}) and gc.kernel_is_sound({})


def test_a_failed_hopper_test_switches_the_benchmarks_to_the_portable_kernel(gc):
    failed = {"failures": [{"test": "tests.gpu.test_kernels_gpu::test_every_candidate_config_of_the_hopper_forward"
                                    "[512-False-128]", "message": "AssertionError"}]}
    assert not gc.hopper_kernel_passed(failed)
    assert gc.hopper_kernel_passed({"failures": [{"test": "x::test_float32_exact_products", "message": "m"}]})
    assert gc.hopper_kernel_passed({}) and gc.hopper_kernel_passed(None)
    impls = ("sdpa_flash", "triton", "triton_portable")
    assert gc.triton_impls(impls, True, True) == impls
    assert gc.triton_impls(impls, True, False) == ("sdpa_flash", "triton_portable")  # once, not twice
    assert gc.triton_impls(impls, False, True) == ("sdpa_flash",)
    # the targets then read the portable kernel's rows, and say so
    record = _attention(0.9, 3.0)
    for r in record["rows"]:
        if r["impl"] == "triton":
            r["impl"] = "triton_portable"
    verdict = gc.evaluate_targets(record, None, None)["triton_fwd_vs_best_sdpa_min"]
    assert verdict["verdict"] == "met" and "triton_portable" in verdict["where"]


def test_a_module_row_that_fails_is_recorded_and_the_others_run(gc, monkeypatch, tmp_path):
    real = gc.mha_bench.run_decode

    def flaky(*, cache_kind="dynamic", **kwargs):  # takes cache_kind, as gpu_check asks of run_decode
        if cache_kind == "graph":
            raise RuntimeError("capture failed")
        return real(cache_kind=cache_kind, **kwargs)

    monkeypatch.setattr(gc.mha_bench, "run_decode", flaky)
    record = gc.module_benchmarks(tmp_path, deadline=float("inf"))
    errors = [s for s in record["skipped"] if "error" in s]
    assert errors and all(s["cache_kind"] == "graph" and "capture failed" in s["error"] for s in errors)
    steps = [(r["config"]["step"], r["config"].get("cache_kind")) for r in record["rows"]]
    assert steps[:2] == [(gc.mha_bench.DECODE_STEP, "dynamic"), (gc.mha_bench.DECODE_STEP, "static")]  # first
    assert (gc.mha_bench.TRAINING_STEP, None) in steps and len(steps) == 2 + 2 + 2  # B=2 decodes, two trainings
    assert json.loads((tmp_path / "mha_cpu_float32.json").read_text())["skipped"] == record["skipped"]


def test_tests_that_run_past_their_timeout_are_stopped_with_their_workers(gc, tmp_path):
    slow = tmp_path / "test_slow.py"
    slow.write_text("import time\n\ndef test_sleeps():\n    time.sleep(60)\n")
    run = gc.Run(tmp_path, 100.0)
    start = gc.time.monotonic()
    result = gc.run_tests(run, 3.0, [str(slow)], key="slow", workers=1)
    assert result["returncode"] is None and "timed out after 3 s" in result["output_tail"]
    assert gc.time.monotonic() - start < 30  # interrupted, not waited for


# ----------------------------------------------------------------------------- the dry run
def _dry_run(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = os.environ | {"PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, even on a GPU machine
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return done, json.loads((out / "gpu_check.json").read_text())


def test_a_spent_budget_skips_stages_in_order_and_still_writes_the_summary(tmp_path):
    done, summary = _dry_run(tmp_path, "--budget-s", "1", "--stages", "smoke,targets,modules,tests")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert summary["stage_order"] == ["smoke", "targets", "modules", "tests"]
    assert all(s["status"] == "skipped" and "budget" in s["reason"] for s in summary["stages"].values())
    assert all(t["verdict"] == "not measured" for t in summary["targets_verdicts"].values())
    assert summary["dry_run"] is True and "versions" in summary["device_info"]


def test_an_unknown_stage_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--stages", "smoke,benchmarks"], cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "benchmarks" in done.stderr


@pytest.mark.maintainer
def test_the_dry_run_writes_every_file_and_a_verdict_per_target(tmp_path):
    done, summary = _dry_run(tmp_path, "--budget-s", "300")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["attention_cpu_float32.json", "attention_cpu_float32.png", "attention_targets_cpu_float32.json",
                     "gpu_check.json", "mha_cpu_float32.json"]
    assert summary["stage_order"] == list(summary["stages"]) == ["smoke", "tune", "targets", "modules", "profile",
                                                                 "accuracy", "attention", "tests", "oom"]
    profiles = summary["profiles"]  # each case profiles course_lib's step and the plain module's
    assert {"decode B=1 cache=32 dynamic", "decode B=1 cache=32 graph", "training B=4 T=32 causal"} <= set(profiles)
    for case, by_step in profiles.items():
        if case != "method":
            assert set(by_step) == {"course_lib", "plain_sdpa"}, case
            assert all(p["wall_us_per_call"] > 0 and p["top_ops"] for p in by_step.values()), case
    assert summary["stages"]["tune"]["status"] == "skipped"  # needs a GPU
    assert all(s["status"] == "ok" for name, s in summary["stages"].items() if name != "tune")
    assert summary["seconds"] < 180
    for name, target in summary["targets_verdicts"].items():
        assert set(target) == FIELDS, name
        assert target["verdict"] in ("met", "missed", "not measured") and target["timing_method"], name
    # triton does not run without a GPU: its targets are not measured; the modules' run at tiny sizes
    assert summary["targets_verdicts"]["triton_fwd_vs_best_sdpa_min"]["verdict"] == "not measured"
    assert summary["targets_verdicts"]["decode_step_vs_plain_max"]["cases"]
    targets = json.loads((tmp_path / "attention_targets_cpu_float32.json").read_text())
    assert {r["impl"] for r in targets["rows"]} == {"sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "triton",
                                                    "triton_portable"}
    assert {(r["T"], r["causal"], r["pass"]) for r in summary["forward_kernels_compared"]} == {
        (T, causal, pass_) for T in (64, 128) for causal in (False, True) for pass_ in ("fwd", "fwd+bwd")}
    assert all("device_s" in r for r in targets["rows"] if r["status"] == "ok")
    mha = json.loads((tmp_path / "mha_cpu_float32.json").read_text())
    assert {r["config"].get("cache_kind") for r in mha["rows"] if "cache_len" in r["config"]} <= {
        "dynamic", "static", "graph"}

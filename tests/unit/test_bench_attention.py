"""The attention benchmark suite: a tiny CPU run writes complete JSON and a plot; FLOPs are counted right."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import course_lib
from course_lib.attention import naive_attention
from course_lib.bench import attention as suite
from course_lib.bench.__main__ import main as bench_main
from course_lib.bench.attention import recorded_runs
from course_lib.bench.timing import matmul_peak
from course_lib.cost.flops import attention_flops, module_flops

matplotlib.use("Agg")


# ----------------------------------------------------------------------------- FLOPs
def test_attention_flops_hand_count():
    # B=H=1, T=2, S=3, d=4. q k^T: 2*3 scores, each 4 multiplies + 4 adds = 48 FLOPs.
    # weights @ v: (2, 3) @ (3, 4): 2*4 outputs, each 3 multiplies + 3 adds = 48 FLOPs.
    assert attention_flops(1, 1, 2, 3, 4) == 96
    assert attention_flops(1, 1, 2, 3, 4, causal=True) == 48
    assert attention_flops(2, 8, 128, 256, 64) == 4 * 2 * 8 * 128 * 256 * 64
    assert attention_flops(1, 1, 2, 3, 4, pass_="bwd") == 2.5 * 96
    assert attention_flops(1, 1, 2, 3, 4, pass_="fwd+bwd") == 3.5 * 96
    with pytest.raises(ValueError, match="pass_"):
        attention_flops(1, 1, 2, 3, 4, pass_="backward")


def test_attention_flops_is_defined_once_in_course_lib():
    root = Path(course_lib.__file__).parent
    homes = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if "def attention_flops(" in p.read_text())
    assert homes == ["cost/flops.py"]


def test_attention_flops_equals_torch_flop_counter_on_naive_attention():
    q = torch.randn(2, 3, 16, 8)
    k = torch.randn(2, 3, 24, 8)
    v = torch.randn(2, 3, 24, 8)
    with FlopCounterMode(display=False) as counter:
        naive_attention(q, k, v)
    assert counter.get_total_flops() == attention_flops(2, 3, 16, 24, 8)


def test_module_flops_adds_four_projections():
    B, T, D, H = 2, 16, 32, 4
    assert module_flops(B, T, D, H, pass_="fwd") == 8 * B * T * D * D + attention_flops(B, H, T, T, D // H)
    layer = torch.nn.Linear(D, D, bias=False)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(B, T, D))
    assert 4 * counter.get_total_flops() == 8 * B * T * D * D


# ----------------------------------------------------------------------------- a tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["attention", "--seq", "16,32", "--d-head", "8", "--batch", "1", "--heads", "2", "--dtype", "float32",
            "--device", "cpu", "--repeats", "2", "--warmup", "1", "--quiet",
            "--json", str(out / "run.json"), "--plot", str(out / "run.png")]
    assert bench_main(argv) == 0
    return out


def test_json_has_device_versions_config_and_records(tiny_run):
    data = json.loads((tiny_run / "run.json").read_text())
    assert data["suite"] == "attention" and data["config"]["dtype"] == "float32"
    info = data["device_info"]
    assert info["device_type"] == "cpu" and info["torch"] == torch.__version__ and "device_name" in info
    assert data["config"]["seqs"] == [16, 32] and data["config"]["d_heads"] == [8]
    assert data["matmul_peak"]["tflops"] > 0 and data["matmul_peak"]["dtype"] == "float32"
    assert data["config"]["calls"] == 1 and "interleaved rounds" in data["config"]["timing"]
    assert "versions" in info
    records = data["rows"]
    core = [r for r in records if r["level"] == "core"]
    assert {r["impl"] for r in core} == set(suite.CORE_IMPLS)
    assert {(r["T"], r["causal"], r["pass"]) for r in core} == {
        (T, c, p) for T in (16, 32) for c in (False, True) for p in ("fwd", "fwd+bwd")}
    for r in core:
        for key in ("median_s", "min_s", "max_s", "repeats", "flops", "tflops", "frac_peak", "peak_memory_bytes",
                    "scores_bytes", "status", "reason", "B", "H", "S", "d_head"):
            assert key in r
        assert r["flops"] == attention_flops(1, 2, r["T"], r["T"], 8, causal=r["causal"], pass_=r["pass"])
        assert r["scores_bytes"] == 1 * 2 * r["T"] * r["T"] * 4
        if r["impl"] in ("sdpa_efficient", "sdpa_cudnn"):
            assert r["status"] == "unsupported" and "CUDA" in r["reason"] and r["median_s"] is None
        elif r["impl"] == "triton":  # the interpreter's times would say nothing about a GPU
            assert r["status"] == "skipped" and "interpreter" in r["reason"] and r["median_s"] is None
            assert r["executed_flops"] == {"fwd": 1.0, "fwd+bwd": 4.5}[r["pass"]] * r["flops"] / (
                1.0 if r["pass"] == "fwd" else 3.5)
        else:
            assert r["status"] == "ok", r
            assert 0 < r["device_q1_s"] <= r["median_s"] == r["device_s"] <= r["device_q3_s"]
            assert 0 < r["wall_q1_s"] <= r["wall_s"] <= r["wall_q3_s"]
            assert r["rounds"] == r["repeats"] == 2 and r["calls"] == 1 and "perf_counter" in r["timing_method"]
            assert r["min_s"] is None and r["max_s"] is None  # one call per window: the old method's figures
            assert r["interleaved_with"] == ["course_lib", "naive", "sdpa_flash", "sdpa_math"]
            assert r["tflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e12)
            assert r["frac_peak"] == pytest.approx(r["tflops"] / data["matmul_peak"]["tflops"])
            assert r["peak_memory_bytes"] is None  # not tracked on the CPU: no made-up number
    modules = [r for r in records if r["level"] == "module"]
    assert {r["impl"] for r in modules} == {"course_lib", "plain_sdpa", "torch_mha"}
    assert all(r["status"] == "ok" and r["ratio_to_plain_sdpa"] > 0 for r in modules)


def test_plot_is_written(tiny_run):
    png = tiny_run / "run.png"
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_recorded_runs_reads_suite_files(tiny_run, tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"suite": "mha"}))
    (tmp_path / "run.json").write_text((tiny_run / "run.json").read_text())
    runs = recorded_runs(directory=tmp_path)
    assert [r["file"] for r in runs] == ["run.json"]
    assert recorded_runs("cuda", directory=tmp_path) == []


def test_recorded_benchmarks_in_data_are_labelled():
    for run in recorded_runs():
        info = run["device_info"]
        assert info["device_type"] in ("cpu", "cuda") and info["device_name"]
        if info["device_type"] == "cuda":
            assert info.get("compute_capability") and info.get("cuda")


def test_cpu_guard_skips_huge_score_matrices():
    data = suite.run_suite(seqs=[64], d_heads=[8], batch=1, heads=1, causal=(False,), passes=("fwd",),
                           impls=("naive", "course_lib"), modules=False, warmup=0, repeats=1, measure_peak=False,
                           cpu_max_gib=1e-6, progress=False)
    by = {r["impl"]: r for r in data["rows"]}
    assert by["naive"]["status"] == "skipped" and "GiB" in by["naive"]["reason"]
    assert by["course_lib"]["status"] == "ok" and by["course_lib"]["frac_peak"] is None


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench_main(["attention", "--seq", "0,16"])
    with pytest.raises(SystemExit):
        bench_main(["attention", "--impls", "naive,fastest"])
    with pytest.raises(ValueError, match="dtype"):
        suite.run_suite(seqs=[16], d_heads=[8], dtype="float8")


def test_matmul_peak_counts_two_n_cubed():
    peak = matmul_peak("cpu", torch.float32, n=64, warmup=1, repeats=2)
    assert peak["flops"] == 2 * 64**3 and peak["tflops"] == pytest.approx(peak["flops"] / peak["min_s"] / 1e12)
    assert peak["tflops_median"] == pytest.approx(peak["flops"] / peak["median_s"] / 1e12)
    assert peak["tflops"] >= peak["tflops_median"]


def test_plot_handles_measured_memory_and_oom(tiny_run):
    """The GPU branch of the plot (measured peak memory, out-of-memory markers), fed synthetic values:
    this exercises the drawing code on the CPU; no number here is, or is stored as, a measurement."""
    import matplotlib.pyplot as plt

    data = json.loads((tiny_run / "run.json").read_text())
    for i, r in enumerate(data["rows"]):
        if r["level"] == "core" and r["status"] == "ok":
            r["peak_memory_bytes"] = 2**20 * (i + 1)
        if r["impl"] == "naive" and r["T"] == 32:
            r.update(status="oom", reason="CUDA out of memory (synthetic)", median_s=None, tflops=None)
    fig = suite.plot_results(data, pass_="fwd+bwd")
    titles = [ax.get_title() for ax in fig.axes]
    assert "peak memory" in titles and any("side by side" in t for t in titles)
    plt.close(fig)


# ----------------------------------------------------------------------------- inputs and interleaving
def test_inputs_are_drawn_once_per_shape_and_shared(monkeypatch):
    drawn = []
    real = suite.draw_inputs

    def counting(*args, **kwargs):
        drawn.append(args[:4])
        return real(*args, **kwargs)

    compared: list[tuple] = []
    real_compare = suite.compare

    def recording(fns, **kwargs):
        compared.append(tuple(fns))
        return real_compare(fns, **kwargs)

    monkeypatch.setattr(suite, "draw_inputs", counting)
    monkeypatch.setattr(suite, "compare", recording)
    data = suite.run_suite(seqs=[16, 24], d_heads=[8], batch=1, heads=2, causal=(False, True), passes=suite.PASSES,
                           impls=("naive", "course_lib", "sdpa_flash", "sdpa_efficient"), modules=False, warmup=0,
                           repeats=2, measure_peak=False, accuracy=False, progress=False)
    assert drawn == [(1, 2, 16, 8), (1, 2, 24, 8)]  # one draw per shape: not per implementation, pass or causal
    # one interleaved comparison per (shape, causal, pass), of every implementation that runs here
    assert compared == [("naive", "course_lib", "sdpa_flash")] * (2 * 2 * 2)
    assert all(r["status"] == "unsupported" for r in data["rows"] if r["impl"] == "sdpa_efficient")


def test_draw_inputs_is_one_draw_on_the_device():
    q, k, v, g = suite.draw_inputs(2, 3, 5, 4, dtype=torch.float32, device="cpu", seed=7)
    expected = torch.randn(4, 2, 3, 5, 4, generator=torch.Generator().manual_seed(7))
    for i, t in enumerate((q, k, v, g)):
        assert t.shape == (2, 3, 5, 4) and t.is_contiguous()
        assert torch.equal(t, expected[i])
    assert not torch.equal(q, k)


def test_working_set_decides_the_l2_flush():
    assert suite.working_set_bytes(4, 16, 1024, 128, itemsize=2, pass_="fwd") == 4 * 4 * 16 * 1024 * 128 * 2
    assert suite.working_set_bytes(1, 1, 8, 8, itemsize=4, pass_="fwd+bwd") == 2 * suite.working_set_bytes(
        1, 1, 8, 8, itemsize=4, pass_="fwd")


# ----------------------------------------------------------------------------- versus_best_sdpa
def _row(impl, device_s=None, tflops=None, q=(1.0, 1.0)):
    row = {"level": "core", "impl": impl, "T": 4096, "d_head": 128, "causal": False, "pass": "fwd", "status": "ok",
           "tflops": tflops if tflops is not None else 100.0 / device_s, "frac_peak": 0.5}
    if device_s is not None:
        row |= {"device_s": device_s, "device_q1_s": device_s * q[0], "device_q3_s": device_s * q[1]}
    return row


def test_versus_best_sdpa_uses_device_time_and_states_its_spread():
    rows = [_row("sdpa_flash", 1.0, q=(0.9, 1.1)), _row("sdpa_cudnn", 0.8, q=(0.95, 1.05)),
            _row("triton", 1.0, q=(0.9, 1.2))]
    rows[0]["tflops"] = 1e6  # a stale TFLOP/s must not decide which backend is fastest
    (r,) = suite.versus_best_sdpa({"rows": rows}, impl="triton")
    assert r["best_sdpa"] == "sdpa_cudnn" and r["ratio"] == pytest.approx(0.8)
    assert r["ratio_low"] == pytest.approx(0.8 * 0.95 / 1.2) and r["ratio_high"] == pytest.approx(0.8 * 1.05 / 0.9)
    assert r["timing"].startswith("device_s")


def test_versus_best_sdpa_on_old_records_is_unchanged():
    rows = [_row("sdpa_flash", tflops=300.0), _row("sdpa_cudnn", tflops=400.0), _row("triton", tflops=200.0)]
    (r,) = suite.versus_best_sdpa({"rows": rows}, impl="triton")
    assert (r["best_sdpa"], r["ratio"], r["ratio_low"], r["timing"]) == ("sdpa_cudnn", 0.5, None, suite.OLD_TIMING)


def _legacy_versus_best_sdpa(data, impl, d_head=None, min_T=0):
    """The function as it was when the recorded runs were read by the notebooks."""
    core = [r for r in data["rows"] if r["level"] == "core" and r["status"] == "ok"]
    keys = sorted({(r["T"], r["d_head"], r["causal"], r["pass"]) for r in core
                   if r["T"] >= min_T and (d_head is None or r["d_head"] == d_head)})
    out = []
    for key in keys:
        group = [r for r in core if (r["T"], r["d_head"], r["causal"], r["pass"]) == key]
        sdpa = [r for r in group if r["impl"].startswith("sdpa_")]
        ours = [r for r in group if r["impl"] == impl]
        if sdpa:
            best = max(sdpa, key=lambda r: r["tflops"])
            out.append({"T": key[0], "d_head": key[1], "causal": key[2], "pass": key[3], "best_sdpa": best["impl"],
                        "best_sdpa_tflops": best["tflops"], "best_sdpa_frac_peak": best["frac_peak"],
                        f"{impl}_tflops": ours[0]["tflops"] if ours else None,
                        "ratio": ours[0]["tflops"] / best["tflops"] if ours else None})
    return out


@pytest.mark.parametrize("impl, kwargs", [("triton", {}), ("course_lib", {"d_head": 128, "min_T": 4096})])
def test_recorded_gpu_runs_read_as_before(impl, kwargs):
    runs = recorded_runs("cuda")
    assert len(runs) >= 2
    for run in runs:
        new = suite.versus_best_sdpa(run, impl=impl, **kwargs)
        old = _legacy_versus_best_sdpa(run, impl, **kwargs)
        assert [{k: r[k] for k in o} for r, o in zip(new, old, strict=True)] == old, run["file"]

"""`python -m course_lib.bench mha` at a tiny shape: it runs, prints the table, saves the JSON."""

import importlib
import json
import pkgutil
import subprocess
import sys

import pytest
import torch

import course_lib.bench
from course_lib.bench import __main__ as bench_cli
from course_lib.bench import mha as bench_mha

TINY = ["--batch", "2", "--seq", "8", "--d-model", "16", "--heads", "2", "--repeats", "3", "--warmup", "1"]


def test_mha_suite_is_listed():
    assert "mha" in bench_cli.suites()


def test_every_suite_module_is_registered_and_every_registered_suite_has_a_main():
    modules = {m.name for m in pkgutil.iter_modules(course_lib.bench.__path__) if not m.name.startswith("_")}
    assert set(course_lib.bench.SUITES) == modules - {"timing", "profile"}  # shared by the suites, not suites
    for name in course_lib.bench.SUITES:
        assert callable(importlib.import_module(f"course_lib.bench.{name}").main), name


def test_an_unknown_suite_is_refused_with_the_list(capsys):
    assert bench_cli.main(["no_such_suite"]) == 2
    err = capsys.readouterr().err  # a usage error goes to stderr, as argparse's do
    assert "no_such_suite" in err and all(name in err for name in course_lib.bench.SUITES)


def test_tiny_run_prints_the_table_and_saves_json(tmp_path, capsys):
    path = tmp_path / "bench" / "mha.json"
    assert bench_cli.main(["mha", *TINY, "--device", "cpu", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for name in ("course_lib", "torch_mha", "plain_sdpa", "median ms", "ratio"):
        assert name in out
    saved = json.loads(path.read_text())
    assert saved["suite"] == "mha" and saved["device_info"]["device_type"] == "cpu" and "torch" in saved["device_info"]
    assert saved["config"]["seqs"] == [8] and saved["config"]["step"] == bench_mha.TRAINING_STEP
    (result,) = saved["rows"]
    assert result["config"]["batch"] == 2 and result["config"]["step"] == "forward+backward"
    assert result["device_info"] == saved["device_info"]
    assert result["max_abs_output_difference"] < 1e-5  # the three modules compute the same function
    timings = result["timings"]
    assert set(timings) == {"course_lib", "torch_mha", "plain_sdpa"}
    for t in timings.values():
        assert t["repeats"] == 3 and t["calls"] == 5 and 0 < t["q1_s"] <= t["median_s"] <= t["q3_s"]
        assert t["device"]["device_s"] == t["median_s"] and t["device"]["rounds"] == 3 and t["wall_median_s"] > 0
        low, high = t["ratio_range"]
        assert low <= t["ratio_to_best_baseline"] <= high
    assert min(timings[b]["ratio_to_best_baseline"] for b in bench_mha.BASELINES) == pytest.approx(1.0)
    assert min(timings[b]["wall_ratio_to_best_baseline"] for b in bench_mha.BASELINES) == pytest.approx(1.0)


def test_one_record_per_call_with_a_run_per_sequence_length(tmp_path):
    path = tmp_path / "mha.json"
    assert bench_cli.main(["mha", *TINY, "--seq", "8,12", "--device", "cpu", "--json", str(path)]) == 0
    assert [r["config"]["seq"] for r in json.loads(path.read_text())["rows"]] == [8, 12]


def _help(suite: str, capsys) -> str:
    with pytest.raises(SystemExit):
        bench_cli.main([suite, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("suite", sorted(course_lib.bench.SUITES))
def test_every_suite_speaks_the_same_flags(suite, capsys):
    text = _help(suite, capsys)
    assert "--json" in text and "--seq" in text
    assert ("--d-head" in text) == (suite != "mha")  # mha sizes heads by --d-model and --heads
    for old in ("--out", "--lengths", "--d-heads", "--d "):
        assert old not in text, f"{suite} still takes {old}"


def test_nothing_is_written_unless_asked(capsys):
    from course_lib.bench import tiled_memory
    from course_lib.tools.paths import DATA_DIR

    before = {p: p.stat().st_mtime_ns for p in (DATA_DIR / "benchmarks").iterdir()}
    assert tiled_memory.main(["--seq", "32", "--d-head", "8", "--block-size", "16"]) == 0
    assert "wrote" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (DATA_DIR / "benchmarks").iterdir()} == before


def test_recorded_runs_use_the_same_vocabulary():
    from course_lib.tools.paths import DATA_DIR

    recorded = {p.name: json.loads(p.read_text()) for p in sorted((DATA_DIR / "benchmarks").glob("*.json"))}
    suites = {name: data for name, data in recorded.items() if data.get("suite") in course_lib.bench.SUITES}
    assert {data["suite"] for data in suites.values()} == {"attention", "mha", "tiled_memory"}
    for name, data in suites.items():
        assert {"device_info", "config", "rows"} <= set(data) and "dtype" in data["config"], name
        assert "results" not in data and "median_ms" not in json.dumps(data), name


def test_causal_variant_runs_and_modules_agree():
    result = bench_mha.run(batch=1, seq=6, d_model=8, heads=2, repeats=1, warmup=0, causal=True)
    assert result["config"]["causal"] and result["max_abs_output_difference"] < 1e-5


def test_the_three_modules_share_weights_and_outputs():
    mods = bench_mha.build_modules(16, 4, "cpu", torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ref = mods["torch_mha"](x, x, x, need_weights=False)[0]
    torch.testing.assert_close(mods["course_lib"](x), ref)
    torch.testing.assert_close(mods["plain_sdpa"](x), ref)


@pytest.mark.parametrize("bad", [["--heads", "5"], ["--batch", "0"], ["--device", "cuda"]])
def test_bad_arguments_exit_with_a_message(bad):
    if bad[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as info:
        bench_mha.main([*TINY, *bad])
    assert info.value.code != 0


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "course_lib.bench", "mha", "--help"], capture_output=True, text=True,
                          check=True)
    assert "--d-model" in done.stdout and "--json" in done.stdout


def test_decode_step_benchmark_compares_the_same_computation(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert bench_cli.main(["mha", "--decode", "--batch", "2", "--cache-len", "8", "--d-model", "16", "--heads", "2",
                 "--repeats", "3", "--warmup", "1", "--device", "cpu", "--json", str(out),
                 "--cache-kind", "dynamic,static,graph"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("decode step") == 3 and "no CUDA graph: eager" in printed
    saved = json.loads(out.read_text())
    assert saved["config"]["cache_len"] == 8 and saved["config"]["step"] == bench_mha.DECODE_STEP
    assert saved["config"]["cache_kinds"] == ["dynamic", "static", "graph"] and saved["config"]["calls"] == 10
    assert [r["config"]["cache_kind"] for r in saved["rows"]] == ["dynamic", "static", "graph"]
    for result in saved["rows"]:
        assert result["config"]["cache_len"] == 8 and result["config"]["step"].startswith("decode")
        assert result["max_abs_output_difference"] < 1e-6  # same weights, same cache: same next-token output
        assert result["max_abs_difference_to_dynamic_cache"] < 1e-6
        assert set(result["timings"]) == {"course_lib", "plain_sdpa"}
        assert all(t["median_s"] > 0 and t["repeats"] == 3 and t["calls"] == 10 and t["device"]["rounds"] == 3
                   for t in result["timings"].values())
        assert result["timings"]["plain_sdpa"]["ratio_to_best_baseline"] == 1.0
        assert result["config"]["max_len"] == (9 if result["config"]["cache_kind"] == "dynamic" else 16)
        assert result["config"]["cuda_graph"] is False


@pytest.mark.parametrize("kind", bench_mha.CACHE_KINDS)
def test_every_timed_decode_call_starts_from_the_same_cache(kind, monkeypatch):
    """The timed functions are called many times: each call must give the first call's answer (the cache put back)."""
    import course_lib.bench.mha as module

    seen = {}

    def record(fns, **kwargs):
        seen.update({name: [fn().clone() for _ in range(4)] for name, fn in fns.items()})
        return real_compare(fns, **kwargs)

    real_compare = module.compare
    monkeypatch.setattr(module, "compare", record)
    result = bench_mha.run_decode(batch=2, cache_len=5, d_model=16, heads=2, repeats=1, warmup=0, calls=1,
                                  cache_kind=kind, dtype=torch.float64)
    for outs in seen.values():
        assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert result["max_abs_output_difference"] < 1e-12 and result["max_abs_difference_to_dynamic_cache"] < 1e-12


def test_run_decode_refuses_an_unknown_cache_kind():
    with pytest.raises(ValueError, match="cache_kind must be one of"):
        bench_mha.run_decode(d_model=8, heads=2, cache_kind="paged")


@pytest.mark.parametrize("mode", ["eager", "traced"])
def test_the_plain_static_decode_equals_its_torch_cat_decode(mode):
    from course_lib.modern.graphed_decode import GraphedDecodeStep
    from course_lib.modern.static_cache import StaticKVCache

    torch.manual_seed(0)
    plain = bench_mha.build_modules(16, 4, "cpu", torch.float64)["plain_sdpa"]
    assert isinstance(plain, bench_mha.PlainSDPAttention)
    keys, values = torch.randn(2, 4, 3, 4, dtype=torch.float64), torch.randn(2, 4, 3, 4, dtype=torch.float64)
    growing, static = [keys, values], StaticKVCache(2, 4, 16, 4, dtype=torch.float64)
    static.update(keys, values)
    xs = torch.randn(12, 2, 1, 16, dtype=torch.float64)
    with torch.no_grad():
        step = GraphedDecodeStep(lambda x, p: plain.static_decode(x, static.key, static.value, p), static, xs[0],
                                 mode=mode)
        for x in xs:
            torch.testing.assert_close(step(x), plain.decode(x, growing), rtol=0, atol=1e-12)
    torch.testing.assert_close(static.key[:, :, :15], growing[0], rtol=0, atol=0)

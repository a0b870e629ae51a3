"""Every command line of course_lib refuses a bad flag value with argparse's usage error: exit status 2, the flag
named on stderr, before any work and without writing a file; `--help` exits 0.

The commands: `python -m course_lib.bench {attention,flash,mha,tiled_memory}`, `python -m course_lib.tools.device`,
`python -m course_lib.tools.viz`, `python -m course_lib.experiments.toy_translation` and `... .capstone` (its
flags that argparse itself checks). Each is called in-process through its main(argv), with the functions that
would do the work replaced by ones that fail the test, so a value that slips past the parser shows up here
instead of as a traceback, a wrong record or a run with its guard off.
"""

from __future__ import annotations

import argparse
import importlib
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from course_lib.tools import cli

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: cuda is a good value here")

# command -> (module whose main(argv) it runs, argv prefix, the functions that do its work or write its files)
COMMANDS = {
    "bench": ("course_lib.bench.__main__", [], []),  # the dispatcher: its work is a suite's main
    "bench attention": ("course_lib.bench.__main__", ["attention"],
                        ["course_lib.bench.attention:run_suite", "course_lib.bench.attention:write_record"]),
    "bench flash": ("course_lib.bench.__main__", ["flash"],
                    ["course_lib.bench.flash:bench_one", "course_lib.bench.flash:write_record"]),
    "bench mha": ("course_lib.bench.__main__", ["mha"],
                  ["course_lib.bench.mha:run", "course_lib.bench.mha:run_decode", "course_lib.bench.mha:write_record"]),
    "bench tiled_memory": ("course_lib.bench.__main__", ["tiled_memory"],
                           ["course_lib.bench.tiled_memory:measure", "course_lib.bench.tiled_memory:write_record"]),
    "tools.device": ("course_lib.tools.device", [], ["course_lib.tools.device:device_report"]),
    "tools.viz": ("course_lib.tools.viz", [], ["course_lib.tools.viz:install_assets"]),
    "experiments.toy_translation": ("course_lib.experiments.toy_translation", [],
                                    ["course_lib.experiments.toy_translation:write_splits"]),
    "experiments.capstone": ("course_lib.experiments.capstone", [], ["course_lib.experiments.capstone:train_capstone"]),
}
BENCH = [name for name in COMMANDS if name.startswith("bench ")]

# (command, bad argv, the flag the error must name). {file} is an existing file, {dir} an existing folder.
_COUNTS = {  # flags of the bench suites that take a count >= 1 (warm-up may be 0)
    "bench attention": ["--batch", "--heads", "--repeats", "--threads"],
    "bench flash": ["--batch", "--heads", "--repeats"],
    "bench mha": ["--batch", "--d-model", "--heads", "--repeats", "--cache-len"],
    "bench tiled_memory": ["--block-size"],
}
BAD = [
    *[(command, [flag, value], flag) for command, flags in _COUNTS.items() for flag in flags
      for value in ("0", "-1", "1.5", "nan", "many")],
    *[(command, ["--warmup", value], "--warmup") for command in ("bench attention", "bench flash", "bench mha")
      for value in ("-3", "-1", "0.5", "inf", "x")],
    *[(command, ["--seq", value], "--seq") for command in BENCH for value in ("0", "-8", "16,0", "nan", "", ",")],
    *[(command, ["--d-head", value], "--d-head") for command in BENCH if command != "bench mha"
      for value in ("0", "-64", "64.0")],
    *[("bench attention", ["--cpu-max-gib", value], "--cpu-max-gib")
      for value in ("nan", "NaN", "inf", "-inf", "0", "-1", "1e-400", "1e400", "two")],
    ("bench attention", ["--cpu-max-gib=-inf"], "--cpu-max-gib"),  # with "=", argparse hands "-inf" to the type
    ("bench attention", ["--impls", "naive,fastest"], "--impls"),
    ("bench attention", ["--impls", ""], "--impls"),
    ("bench attention", ["--passes", "bwd"], "--passes"),
    ("bench attention", ["--passes", ","], "--passes"),
    ("bench attention", ["--causal", "maybe"], "--causal"),
    ("bench attention", ["--plot", "{dir}"], "--plot"),
    ("bench attention", ["--plot", "{dir}/panels.xyz"], "--plot"),
    ("bench flash", ["--impls", "bogus"], "--impls"),
    ("bench flash", ["--impls", "sdpa_math,flash"], "--impls"),
    ("bench flash", ["--impls", ""], "--impls"),
    ("bench mha", ["--d-model", "10", "--heads", "3"], "--d-model"),
    *[(command, ["--dtype", "float8"], "--dtype") for command in ("bench attention", "bench flash", "bench mha")],
    *[(command, ["--device", value], "--device") for command in ("bench attention", "bench flash", "bench mha")
      for value in ("bogus", "meta", "")],
    *[pytest.param(command, ["--device", "cuda"], "--device", marks=NO_GPU)
      for command in ("bench attention", "bench flash", "bench mha")],
    *[(command, ["--json", value], "--json") for command in BENCH for value in ("{dir}", "{file}/record.json", "")],
    *[(command, ["--no-such-flag"], "--no-such-flag") for command in COMMANDS if command != "tools.viz"],
    ("tools.viz", ["install-assets", "--no-such-flag"], "--no-such-flag"),
    ("bench", [], "suite"),
    ("bench", ["attentions"], "attentions"),
    ("tools.device", ["bogus"], "device"),
    ("tools.device", ["meta"], "device"),
    ("tools.device", ["cpu", "cpu"], "cpu"),
    pytest.param("tools.device", ["cuda"], "device", marks=NO_GPU),
    ("tools.viz", [], "command"),
    ("tools.viz", ["install"], "command"),
    ("tools.viz", ["install-assets", "--dir", "{file}"], "--dir"),
    ("tools.viz", ["install-assets", "--dir", "{file}/assets"], "--dir"),
    ("tools.viz", ["install-assets", "--dir", ""], "--dir"),
    ("experiments.toy_translation", ["{file}"], "out_dir"),
    ("experiments.toy_translation", ["{file}/splits"], "out_dir"),
    ("experiments.toy_translation", [""], "out_dir"),
    ("experiments.capstone", ["--autocast", "float16"], "--autocast"),
    ("experiments.capstone", ["--steps", "many"], "--steps"),
    ("experiments.capstone", ["--threads", "1.5"], "--threads"),
    *[("experiments.capstone", ["--steps", value], "--steps") for value in ("0", "-1")],
    *[("experiments.capstone", ["--threads", value], "--threads") for value in ("0", "-2")],
    *[("experiments.capstone", ["--seed", value], "--seed") for value in ("-1", str(2**32), "0.5")],
    ("experiments.capstone", ["--out", "{dir}"], "--out"),
    ("experiments.capstone", ["--out", "{file}/capstone.safetensors"], "--out"),
]


def _call(command: str, argv: list[str], monkeypatch) -> int | str | None:
    """Run the command's main(argv) in-process with its work replaced by a failure; return the exit status."""
    module, prefix, work = COMMANDS[command]

    def no_work(*args, **kwargs):
        raise AssertionError(f"{command} {argv}: the command started its work despite a bad flag")

    for target in work:
        name, _, attribute = target.partition(":")
        monkeypatch.setattr(importlib.import_module(name), attribute, no_work, raising=False)
    try:
        return importlib.import_module(module).main([*prefix, *argv])
    except SystemExit as e:
        return e.code


def _case_id(case) -> str:
    command, bad, _ = case.values if hasattr(case, "values") else case
    return f"{command} {' '.join(repr(a) if not a or ' ' in a else a for a in bad)}"


@pytest.mark.parametrize(("command", "bad", "flag"), BAD, ids=[_case_id(case) for case in BAD])
def test_a_bad_flag_is_a_usage_error_naming_it_before_any_work(command, bad, flag, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()
    monkeypatch.chdir(tmp_path)  # a file written relative to the working folder would show up here too
    argv = [a.format(file=tmp_path / "a_file", dir=tmp_path / "a_dir") for a in bad]
    if command in BENCH and "--json" not in argv:
        argv += ["--json", str(tmp_path / "a_dir" / "record.json")]  # what it would write, were the flag good
    before = sorted(tmp_path.rglob("*"))
    threads = torch.get_num_threads()
    status = _call(command, argv, monkeypatch)
    err = capsys.readouterr().err
    assert status == 2, f"{command} {argv}: exit status {status!r}, stderr {err!r}"
    assert "usage:" in err and "error:" in err and flag in err.split("error:")[-1], err
    assert sorted(tmp_path.rglob("*")) == before, "a file was written"
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("command", COMMANDS)
def test_help_prints_the_usage_and_exits_0(command, monkeypatch, capsys):
    assert _call(command, ["--help"], monkeypatch) in (0, None)
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("subcommand", [["install-assets", "--help"]])
def test_subcommand_help_exits_0(subcommand, monkeypatch, capsys):
    assert _call("tools.viz", subcommand, monkeypatch) == 0
    assert "--dir" in capsys.readouterr().out


def test_python_m_device_help_is_the_usage_not_a_traceback():
    done = subprocess.run([sys.executable, "-m", "course_lib.tools.device", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout and "Traceback" not in done.stderr, done.stderr


def test_good_values_still_reach_the_work(tmp_path, monkeypatch):
    """The types refuse only what is bad: the smallest good values (warm-up 0, one repeat) pass the parser."""
    seen: dict = {}
    monkeypatch.setattr("course_lib.bench.attention.run_suite", lambda **kwargs: seen.update(kwargs) or {})
    monkeypatch.setattr("course_lib.bench.attention.format_table", lambda data: "")
    from course_lib.bench import attention

    out = tmp_path / "new" / "record.json"
    monkeypatch.setattr(attention, "write_record", lambda path, data: seen.update(json=path))
    assert attention.main(["--seq", "16", "--batch", "1", "--repeats", "1", "--warmup", "0", "--threads", "1",
                           "--cpu-max-gib", "0.5", "--device", "cpu", "--impls", "naive, course_lib",
                           "--passes", "fwd", "--json", str(out)]) == 0
    assert seen["warmup"] == 0 and seen["repeats"] == 1 and seen["threads"] == 1 and seen["cpu_max_gib"] == 0.5
    assert seen["impls"] == ("naive", "course_lib") and seen["passes"] == ("fwd",) and seen["json"] == out


# ------------------------------------------------------------------------------------ the shared argparse types
@given(st.integers(-10**6, 10**6))
def test_count_types_accept_exactly_the_ints_in_range(n):
    for parse, lowest in ((cli.positive_int, 1), (cli.nonnegative_int, 0)):
        if n >= lowest:
            assert parse(str(n)) == n
        else:
            with pytest.raises(argparse.ArgumentTypeError, match=repr(str(n))):
                parse(str(n))


@given(st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6))
def test_positive_finite_float_accepts_exactly_the_finite_positive_numbers(value):
    text = value if isinstance(value, str) else repr(value)
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if math.isfinite(number) and number > 0:
        assert cli.positive_finite_float(text) == number
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="positive finite"):
            cli.positive_finite_float(text)


@given(st.lists(st.integers(-3, 3), max_size=4))
def test_int_list_accepts_exactly_nonempty_lists_of_positive_ints(values):
    text = ",".join(map(str, values))
    if values and min(values) > 0:
        assert cli.int_list(text) == values
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            cli.int_list(text)


@given(st.lists(st.sampled_from(["fwd", "fwd+bwd", "bwd", "", " fwd "]), max_size=4))
def test_choice_list_accepts_exactly_nonempty_selections_of_known_names(names):
    parse = cli.choice_list(("fwd", "fwd+bwd"))
    picked = [n.strip() for n in names if n.strip()]
    if picked and set(picked) <= {"fwd", "fwd+bwd"}:
        assert parse(",".join(names)) == tuple(picked)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="fwd, fwd"):
            parse(",".join(names))


# ------------------------------------------------------------------------- the functions behind the commands
@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0, -1.0, "2"])
def test_run_suite_refuses_a_memory_limit_that_would_switch_the_guard_off(value):
    from course_lib.bench.attention import run_suite

    threads = torch.get_num_threads()
    with pytest.raises((ValueError, TypeError), match="cpu_max_gib"):
        run_suite(seqs=[16], d_heads=[8], cpu_max_gib=value, threads=1, progress=False)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(("kwargs", "name"), [({"threads": 0}, "threads"), ({"warmup": -3}, "warmup"),
                                              ({"repeats": 0}, "repeats"), ({"batch": 0}, "batch"),
                                              ({"passes": ("bwd",)}, "passes"), ({"seqs": []}, "seqs")])
def test_run_suite_refuses_bad_counts_before_any_work(kwargs, name):
    from course_lib.bench.attention import run_suite

    with pytest.raises((ValueError, TypeError), match=name):
        run_suite(**{"seqs": [16], "d_heads": [8], "progress": False, **kwargs})


@pytest.mark.parametrize(("kwargs", "name"), [({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup")])
def test_timing_refuses_zero_repeats_and_negative_warmup_without_calling(kwargs, name):
    from course_lib.bench.timing import time_fn

    calls = []
    with pytest.raises((ValueError, TypeError), match=name):
        time_fn(lambda: calls.append(1), **kwargs)
    assert calls == []


@pytest.mark.parametrize(("kwargs", "name"), [({"batch": 0}, "batch"), ({"batch": -1}, "batch"),
                                              ({"repeats": 0}, "repeats"), ({"warmup": -3}, "warmup"),
                                              ({"impls": ("bogus",)}, "impls"), ({"impls": ()}, "impls")])
def test_flash_bench_one_refuses_bad_arguments_instead_of_recording_error_rows(kwargs, name):
    from course_lib.bench.flash import bench_one

    args = {"batch": 1, "heads": 1, "T": 8, "d_head": 8, "dtype": torch.float32, "causal": False, "device": "cpu",
            "repeats": 1, "warmup": 0, "impls": ("sdpa_math",)} | kwargs
    with pytest.raises((ValueError, TypeError), match=name):
        bench_one(**args)


@pytest.mark.parametrize("run", ["run", "run_decode"])
@pytest.mark.parametrize(("kwargs", "name"), [({"repeats": 0}, "repeats"), ({"warmup": -2}, "warmup")])
def test_mha_runs_refuse_zero_repeats_and_negative_warmup(run, kwargs, name):
    from course_lib.bench import mha

    with pytest.raises((ValueError, TypeError), match=name):
        getattr(mha, run)(d_model=8, heads=2, **kwargs)

"""Two data folders: course_lib/data/ (PACKAGE_DATA) holds only what the library's own functions load, and ships
in the wheel; the repository's data/ (DATA_DIR) holds the course's records, which the scripts and the benchmark
suites write and which an installed course_lib does not have. Nothing writes records into course_lib/, and a
function that reads records names the folder it is missing."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re

import pytest

import course_lib.bench
from course_lib.bench.attention import recorded_runs
from course_lib.tools import paths
from course_lib.tools.paths import DATA_DIR, PACKAGE_DATA, PACKAGE_DIR, REPO_ROOT, RecordsNotFoundError, records_dir

RECORDS = ("benchmarks", "head_ablation", "positional", "seed_code")
# Files a writer of results would leave behind; the package's own .py files are left out, so that editing the
# library while the tests run does not look like a benchmark writing into it.
RESULT_SUFFIXES = {".json", ".jsonl", ".png", ".log", ".txt", ".csv", ".md", ".safetensors", ".pt", ".npz"}


def test_package_data_and_records_are_two_folders():
    assert PACKAGE_DATA == PACKAGE_DIR / "data" and DATA_DIR == REPO_ROOT / "data"
    assert not DATA_DIR.is_relative_to(PACKAGE_DIR)
    for name in RECORDS:
        assert (DATA_DIR / name).is_dir(), name
        assert not (PACKAGE_DATA / name).exists(), f"{name} is a record: it belongs in data/, not course_lib/data/"
    assert (PACKAGE_DATA / "toy_translation" / "test.jsonl").is_file()
    assert (PACKAGE_DATA / "checkpoints" / "capstone_bf16.safetensors").is_file()


def _sources() -> dict[str, str]:
    """The text of every file that could point at a record: code, tests, notebooks' cells, README, Makefile."""
    texts = {p.relative_to(REPO_ROOT).as_posix(): p.read_text(encoding="utf-8")
             for folder in ("course_lib", "scripts", "tests") for p in (REPO_ROOT / folder).rglob("*.py")}
    for name in ("README.md", "Makefile", "pyproject.toml"):
        texts[name] = (REPO_ROOT / name).read_text(encoding="utf-8")
    for nb in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        texts[nb.relative_to(REPO_ROOT).as_posix()] = "\n".join("".join(c["source"]) for c in cells)
    return texts


def test_no_code_notebook_or_document_points_at_records_inside_the_package():
    stale = re.compile(r"course_lib/data/(?:" + "|".join(RECORDS) + r")\b")
    found = [f"{name}: {m.group(0)}" for name, text in _sources().items() for m in stale.finditer(text)]
    assert not found, found


# ----------------------------------------------------------------------------- a missing data/ is named
def test_a_records_reader_names_the_missing_folder(monkeypatch, tmp_path):
    missing = tmp_path / "installed" / "data"  # what DATA_DIR is after a non-editable `pip install .`
    monkeypatch.setattr(paths, "DATA_DIR", missing)
    with pytest.raises(RecordsNotFoundError, match=re.escape(str(missing / "benchmarks"))) as err:
        recorded_runs()
    assert isinstance(err.value, FileNotFoundError) and "source checkout" in str(err.value)
    with pytest.raises(RecordsNotFoundError, match=re.escape(str(missing / "head_ablation"))):
        records_dir("head_ablation")
    with pytest.raises(RecordsNotFoundError, match=re.escape(str(tmp_path / "elsewhere"))):
        recorded_runs(directory=tmp_path / "elsewhere")  # an explicit folder that is not there: no silent []


def test_records_dir_returns_an_existing_folder():
    assert records_dir("benchmarks") == DATA_DIR / "benchmarks"
    assert recorded_runs("cpu") and all(run["suite"] == "attention" for run in recorded_runs())


# ----------------------------------------------------------------------------- writers stay out of course_lib/
def _results_under(root) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and p.suffix in RESULT_SUFFIXES and "__pycache__" not in p.parts}


# The smallest run of each suite; a suite added to SUITES without an entry here fails the test below.
TINY_SUITE_ARGS = {
    "attention": ["--seq", "16", "--d-head", "8", "--batch", "1", "--heads", "2", "--dtype", "float32",
                  "--device", "cpu", "--repeats", "1", "--warmup", "0", "--impls", "naive,course_lib",
                  "--no-modules", "--no-peak", "--no-accuracy", "--quiet"],
    "flash": ["--device", "cpu", "--seq", "16", "--d-head", "32", "--batch", "1", "--heads", "1",
              "--dtype", "float32", "--repeats", "1", "--warmup", "0", "--impls", "sdpa_math"],
    "mha": ["--device", "cpu", "--batch", "1", "--seq", "8", "--d-model", "16", "--heads", "2",
            "--repeats", "1", "--warmup", "0"],
    "tiled_memory": ["--seq", "32", "--d-head", "8", "--block-size", "16"],
}


@pytest.mark.parametrize("suite", sorted(course_lib.bench.SUITES))
def test_a_benchmark_suite_writes_no_file_unless_asked_and_nothing_into_the_package(suite, monkeypatch, tmp_path,
                                                                                   capsys):
    monkeypatch.chdir(tmp_path)
    package, records = _results_under(PACKAGE_DIR), _results_under(DATA_DIR)
    assert importlib.import_module(f"course_lib.bench.{suite}").main(TINY_SUITE_ARGS[suite]) == 0
    assert "wrote" not in capsys.readouterr().out
    assert _results_under(PACKAGE_DIR) == package and _results_under(DATA_DIR) == records
    assert not list(tmp_path.iterdir())


def _fresh_script(name: str):
    """Load scripts/<name>.py anew, so that it reads course_lib.tools.paths.DATA_DIR as it is now."""
    spec = importlib.util.spec_from_file_location(f"{name}_fresh", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The smallest run of each script, without --out: where its record goes by default.
TINY_SCRIPT_RUNS = [("run_head_ablation", ["--tiny"], "head_ablation"),
                    ("run_kv_sharing", ["--tiny"], "head_ablation"),
                    ("run_parity_ablation", ["--tiny"], "head_ablation"),
                    ("run_length_generalisation", ["--tiny", "--positionals", "sinusoidal"], "positional")]


@pytest.mark.parametrize(("script", "argv", "folder"), TINY_SCRIPT_RUNS, ids=[run[0] for run in TINY_SCRIPT_RUNS])
def test_a_script_writes_its_record_into_the_repositorys_data(script, argv, folder, monkeypatch, tmp_path):
    data = tmp_path / "data"
    monkeypatch.setattr(paths, "DATA_DIR", data)  # the default --out follows DATA_DIR: no real record is touched
    package = _results_under(PACKAGE_DIR)
    written = _fresh_script(script).main(argv)
    assert written.parent == data / folder and json.loads(written.read_text())
    assert _results_under(PACKAGE_DIR) == package


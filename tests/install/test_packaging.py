"""A plain (non-editable) install carries everything the library's own functions load (the toy dataset and
the checkpoints: course_lib/data/, package data) and none of the course's records (the repository's data/:
benchmarks, sweeps, logs, the source articles' code); a function that reads records says where they are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from course_lib.tools.paths import REPO_ROOT

PROBE = """
import pathlib, sys
import course_lib
from course_lib.bench.attention import recorded_runs
from course_lib.experiments.capstone import load_capstone
from course_lib.experiments.head_ablation import load_head_model
from course_lib.experiments.toy_translation import load_split
from course_lib.tools.paths import DATA_DIR, PACKAGE_DATA, RecordsNotFoundError

site = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(course_lib.__file__).resolve().is_relative_to(site), course_lib.__file__
model, src_vocab, tgt_vocab, info = load_capstone()
assert info["metadata"]["test_exact_match"] == 1.0
assert len(load_split("test")) > 0
load_head_model(PACKAGE_DATA / "checkpoints" / "heads_two_lookups_attn_only_h8.safetensors")
try:
    recorded_runs()
except RecordsNotFoundError as err:
    assert str(DATA_DIR / "benchmarks") in str(err), err
else:
    raise AssertionError("an installed copy found records at " + str(DATA_DIR))
print("loaded from", PACKAGE_DATA)
"""


@pytest.mark.maintainer
def test_a_non_editable_install_loads_the_capstone_and_the_data_and_has_no_records(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO_ROOT / name).exists():
            shutil.copy(REPO_ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO_ROOT / "course_lib", source / "course_lib", ignore=ignore)
    shutil.copytree(REPO_ROOT / "data", source / "data", ignore=ignore)  # beside pyproject.toml, as in a checkout
    package_data = {p.relative_to(source).as_posix() for p in (source / "course_lib" / "data").rglob("*")
                    if p.is_file()}
    records = {p.relative_to(source / "data").as_posix() for p in (source / "data").rglob("*") if p.is_file()}
    assert package_data and records
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("course_lib-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert package_data <= names, sorted(package_data - names)
    assert {n for n in names if n.startswith("course_lib/data/")} == package_data
    assert not [n for n in names if n.startswith("data/")], "the records went into the wheel"
    assert not [n for n in names for r in records if n.endswith("/" + r)], "a record went into the wheel"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, cwd=tmp_path)
    shutil.rmtree(source)  # nothing may be read from the copy it was built from
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", PROBE, str(site)], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert str(site) in run.stdout

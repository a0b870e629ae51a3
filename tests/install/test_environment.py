"""The install surface: pyproject and environment.yml list the same packages; the commands exist."""

import json
import re
import tomllib

import pytest
import yaml

from course_lib.tools.paths import DATA_DIR, REPO_ROOT


def _normalise(req: str) -> str:
    name, _, rest = req.partition(";")
    name = re.sub(r"\s+", "", name).lower().replace("_", "-")
    marker = re.sub(r"\s+", " ", rest.strip().replace('"', "'"))
    return f"{name}; {marker}" if marker else name


def _pyproject_requirements() -> set[str]:
    """The exact pins the Makefile installs: the `lock` extra and the developer tools."""
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {_normalise(r) for r in extras["lock"] + extras["dev"]}


def _conda_requirements() -> set[str]:
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_normalise(r) for r in pip}


def test_pyproject_and_environment_yml_do_not_drift():
    pyproject, conda = _pyproject_requirements(), _conda_requirements()
    assert pyproject == conda, (
        f"only in pyproject.toml: {sorted(pyproject - conda)}; only in environment.yml: {sorted(conda - pyproject)}"
    )


def test_drift_check_notices_a_difference():
    assert _normalise("torch==2.13.0") != _normalise("torch==2.14.0")
    assert _normalise("Torch == 2.13.0") == _normalise("torch==2.13.0")


def test_torch_is_pinned_to_the_reproducible_build():
    assert "torch==2.13.0" in _pyproject_requirements()
    import torch

    assert torch.__version__.startswith("2.13.0")


def test_readme_gives_the_two_commands_first_and_ci_runs_the_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    first_code = re.findall(r"make \w+", readme)[:2]
    assert first_code == ["make lab", "make test"], first_code
    assert "make ci" in readme  # the maintainers' command is named too
    # CI runs make ci, which is the learner's make test first, then the maintainers' checks
    assert re.search(r"^make ci$", (REPO_ROOT / ".ci" / "run").read_text(), re.M)
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^ci: test maintainer-tests nbval-cpu-matrix$", makefile, re.M)
    for target in ("lab", "test", "ci", "execute", "lint"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no '{target}' target"


def test_every_notebook_is_named_in_the_readme_map():
    readme = (REPO_ROOT / "README.md").read_text()
    for nb in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        assert nb.name in readme, f"{nb.name} is missing from the README's notebook map"


def _says_where_it_ran(data: dict) -> bool:
    return bool(data.get("device_info"))


def test_recorded_benchmarks_say_where_they_ran():
    recorded = sorted((DATA_DIR / "benchmarks").glob("*.json"))
    assert recorded, "data/benchmarks/ holds no recorded runs"
    for path in recorded:
        data = json.loads(path.read_text())
        assert _says_where_it_ran(data), f"{path.name} records benchmark numbers without the device they ran on"


def test_where_it_ran_check_rejects_a_bare_record():
    assert not _says_where_it_ran({"rows": [{"median_s": 1.0}]})
    assert _says_where_it_ran({"device_info": {"device_name": "CPU"}, "rows": [{"median_s": 1.0}]})


def test_git_ignores_the_environment_and_the_bertviz_scripts_as_folders_or_as_symlinks(tmp_path):
    """A learner may keep .venv (or .offline-viz) elsewhere and link it in: git must ignore the link too."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "clone"
    repo.mkdir()
    shutil.copy(REPO_ROOT / ".gitignore", repo / ".gitignore")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "venv" / "bin").mkdir(parents=True)
    (elsewhere / "venv" / "bin" / "python").write_text("")
    (elsewhere / "viz").mkdir()
    (elsewhere / "viz" / "d3.min.js").write_text("")
    git = ["git", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)

    def untracked():
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=all"], cwd=repo, check=True,
                                capture_output=True, text=True).stdout
        return status.splitlines()

    for name, target in ((".venv", "venv"), (".offline-viz", "viz")):
        (repo / name).symlink_to(elsewhere / target, target_is_directory=True)
    assert untracked() == ["?? .gitignore"]
    for name in (".venv", ".offline-viz"):  # and as plain folders
        (repo / name).unlink()
        (repo / name / "x").mkdir(parents=True)
        (repo / name / "x" / "f").write_text("")
    assert untracked() == ["?? .gitignore"]


def _pins_outside_their_ranges(ranges: list[str], pins: list[str]) -> list[str]:
    """The lock's pins that the declared ranges do not admit, and the packages only one side names."""
    from packaging.requirements import Requirement

    declared = {Requirement(r).name.lower(): Requirement(r) for r in ranges}
    locked = {Requirement(p).name.lower(): Requirement(p) for p in pins}
    problems = [f"{name}: in one list only" for name in sorted(set(declared) ^ set(locked))]
    for name in sorted(set(declared) & set(locked)):
        (pin,) = locked[name].specifier
        if pin.operator != "==" or not declared[name].specifier.contains(pin.version, prereleases=True):
            problems.append(f"{name}: {pin} is outside {declared[name].specifier}")
        if declared[name].marker != locked[name].marker:
            problems.append(f"{name}: markers differ")
    return problems


def test_every_exact_pin_lies_in_the_range_course_lib_declares():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert _pins_outside_their_ranges(project["dependencies"], project["optional-dependencies"]["lock"]) == []
    # the check can fail: a pin above the range, a range without a pin, a loose "pin"
    assert _pins_outside_their_ranges(["torch>=2.11.0,<2.14"], ["torch==2.14.0"]) == [
        "torch: ==2.14.0 is outside <2.14,>=2.11.0"]
    assert _pins_outside_their_ranges(["torch>=2.11.0,<2.14", "numpy>=2"], ["torch==2.13.0"]) == [
        "numpy: in one list only"]
    assert _pins_outside_their_ranges(["torch>=2.11.0"], ["torch>=2.13.0"]) == ["torch: >=2.13.0 is outside >=2.11.0"]

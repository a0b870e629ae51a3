"""The exercise policy of COURSE_DESIGN.md, checked on every notebook: 3-6 exercises, the last open-ended, each
stub visible and unsolved, each reference solution in a collapsed cell that ran and, where it calls a checker,
passed."""

import json
import re

import pytest

from course_lib.tools.paths import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))  # every notebook, and any added later


def _exercise_cells(path):
    cells = json.loads(path.read_text())["cells"]
    start = next(i for i, c in enumerate(cells)
                 if c["cell_type"] == "markdown" and re.search(r"^## Exercises", "".join(c["source"]), re.M))
    return cells[start:]


def _hidden(cell):
    return bool(cell.get("metadata", {}).get("jupyter", {}).get("source_hidden"))


def _text(cell):
    return "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                   for o in cell.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_three_to_six_exercises_the_last_open_ended(path):
    headings = re.findall(r"^### Exercise .*$", "\n".join("".join(c["source"]) for c in _exercise_cells(path)
                                                          if c["cell_type"] == "markdown"), re.M)
    assert 3 <= len(headings) <= 6, headings
    assert "open-ended" in headings[-1], headings[-1]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stubs_are_visible_and_every_solution_is_collapsed_and_passes(path):
    cells = [c for c in _exercise_cells(path) if c["cell_type"] == "code"]
    visible = [c for c in cells if not _hidden(c)]
    hidden = [c for c in cells if _hidden(c)]
    assert visible and hidden
    for cell in visible:  # only stubs are shown: the answer never sits in plain sight
        assert "raise NotImplementedError" in "".join(cell["source"]), "".join(cell["source"])
        assert "[PASSED]" not in _text(cell)
    for cell in hidden:
        assert cell["outputs"], "a reference solution that was not run: " + "".join(cell["source"])[:80]
        # collapsed output too: a visible "[0.787 0.107 0.107]" under the stub would be the answer
        assert cell["metadata"]["jupyter"].get("outputs_hidden") is True, "".join(cell["source"])[:80]
        if "checks.check_" in "".join(cell["source"]):
            assert "[PASSED]" in _text(cell) and "[NOT YET]" not in _text(cell), _text(cell)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_no_summary_reports_what_the_exercises_solutions_find(path):
    """"What we measured" lists what the notebook measured; the exercises' results are the learner's to find."""
    cells = json.loads(path.read_text())["cells"]
    prose = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert not re.search(r"(?i)in the exercises'? solutions", prose)


def _bound_names(source: str) -> set[str]:
    """The names a cell binds at its top level: functions, classes and assignments."""
    import ast

    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def solutions_rebinding_stubs(cells: list[dict]) -> list[str]:
    """The learner's names (bound by a stub cell) that a collapsed solution binds again: Run All would replace them."""
    stubs: set[str] = set()
    found = []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if not _hidden(cell) and "raise NotImplementedError" in source:
            stubs |= _bound_names(source)
        elif _hidden(cell):
            found += sorted(_bound_names(source) & stubs)
    return found


def summary_numbers_from_solutions(cells: list[dict]) -> list[str]:
    """Numbers (two or more decimals) that only a solution printed and the "What we measured" summary repeats.

    A number the notebook also shows elsewhere (a visible output, the lesson's prose) is its own measurement.
    """
    def numbers(text: str) -> set[str]:
        return set(re.findall(r"\d+\.\d{2,}", text))

    def is_summary(c: dict) -> bool:
        return c["cell_type"] == "markdown" and bool(re.search(r"^## What we measured", "".join(c["source"]), re.M))

    summary = "".join("".join(c["source"]) for c in cells if is_summary(c))
    shown = set().union(*(numbers(_text(c)) for c in cells if c["cell_type"] == "code" and not _hidden(c)),
                        *(numbers("".join(c["source"])) for c in cells if c["cell_type"] == "markdown"
                          and not is_summary(c)))
    printed = set().union(*(numbers(_text(c)) for c in cells if c["cell_type"] == "code" and _hidden(c))) - shown
    return sorted(n for n in printed if re.search(rf"(?<![\d.]){re.escape(n)}(?!\d)", summary))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_run_all_keeps_what_the_learner_wrote(path):
    """A reference solution has its own names (solution_*), so running every cell never replaces my_*,
    and it never calls the learner's my_* either (which, unsolved, would raise)."""
    cells = json.loads(path.read_text())["cells"]
    assert not solutions_rebinding_stubs(cells)
    uses = [m for c in cells if c["cell_type"] == "code" and _hidden(c)
            for m in re.findall(r"\bmy_\w+", "".join(c["source"]))]
    assert not uses, uses


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_no_summary_repeats_a_number_a_solution_printed(path):
    assert not summary_numbers_from_solutions(json.loads(path.read_text())["cells"])


def _cell(kind, source, hidden=False, output=""):
    cell = {"cell_type": kind, "source": [source], "metadata": {}, "outputs": []}
    if hidden:
        cell["metadata"]["jupyter"] = {"source_hidden": True, "outputs_hidden": True}
    if output:
        cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": [output]}]
    return cell


def test_the_policy_checks_find_planted_violations():
    stub = _cell("code", "def my_f(x):\n    raise NotImplementedError\n")
    rebinding = _cell("code", "def my_f(x):\n    return x\n", hidden=True)
    own_name = _cell("code", "def solution_f(x):\n    return x\nmy_g = 3\n", hidden=True)
    assert solutions_rebinding_stubs([stub, rebinding]) == ["my_f"]
    assert solutions_rebinding_stubs([stub, own_name]) == []
    solved = _cell("code", "print(solution_f(2))", hidden=True, output="by hand: 0.787 0.107 6.805\n")
    summary = _cell("markdown", "## What we measured\n\n- the hand example gives 6.805 (exercise 1)\n")
    assert summary_numbers_from_solutions([solved, summary]) == ["6.805"]
    assert summary_numbers_from_solutions([solved, _cell("markdown", "## What we measured\n\n- 16.805\n")]) == []
    measured = _cell("code", "print(total)", output="measured 6.805\n")  # the notebook's own measurement
    assert summary_numbers_from_solutions([measured, solved, summary]) == []


def _colab_collapse_disagreements(cells) -> list[str]:
    """Code cells whose Colab collapse (`cellView: form` and a title) differs from JupyterLab's (`source_hidden`)."""
    problems = []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        in_colab = cell["metadata"].get("cellView") == "form" and source.startswith("# @title ")
        if in_colab != _hidden(cell):
            where = "JupyterLab" if _hidden(cell) else "Colab"
            problems.append(f"hidden only in {where}: {source[:60]}")
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_colab_collapses_exactly_what_jupyterlab_collapses(path):
    """A solution collapsed in JupyterLab must not open in full on Colab (scripts/colab_cells.py writes both)."""
    assert _colab_collapse_disagreements(json.loads(path.read_text())["cells"]) == []


def test_the_colab_collapse_check_finds_a_solution_left_open():
    solution = {"cell_type": "code", "metadata": {"jupyter": {"source_hidden": True}}, "source": ["x = 1\n"]}
    stray = {"cell_type": "code", "metadata": {"cellView": "form"}, "source": ["# @title t\n", "y = 2\n"]}
    assert _colab_collapse_disagreements([solution]) == ["hidden only in JupyterLab: x = 1\n"]
    assert _colab_collapse_disagreements([stray]) == ["hidden only in Colab: # @title t\ny = 2\n"]

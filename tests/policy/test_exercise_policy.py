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

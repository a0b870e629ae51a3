"""Every notebook is committed executed, in order, with the sections the course promises."""

import json
import re

import pytest

from course_lib.tools.paths import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


APPENDIX = 99  # the errata of the sources: an appendix, last whatever notebooks the main sequence gains


def test_notebooks_are_numbered_in_sequence():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    main = [n for n in numbers if n != APPENDIX]
    assert main == list(range(len(main))), [p.name for p in NOTEBOOKS]
    assert numbers.count(APPENDIX) <= 1, [p.name for p in NOTEBOOKS]
    assert APPENDIX not in numbers or numbers[-1] == APPENDIX, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_executed_in_order_without_errors(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "mha-course"
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    counts = [c["execution_count"] for c in code]
    assert None not in counts, f"{path.name}: {counts.count(None)} code cells were never executed"
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: not executed top to bottom in one run"
    for cell in code:
        for out in cell["outputs"]:
            assert out["output_type"] != "error", f"{path.name}: a saved output is an error ({out.get('ename')})"
            assert not re.search(r"/(work|tmp|root|home|Users)/\w", json.dumps(out)), (
                f"{path.name}: output shows a local path"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_has_the_promised_sections(path):
    nb = json.loads(path.read_text())
    markdown = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert nb["cells"][0]["cell_type"] == "markdown" and nb["cells"][0]["source"][0].startswith("# ")
    assert re.search(r"you will be able to", markdown, re.I), f"{path.name}: no 'what you will be able to do'"
    if not path.name.startswith("00"):
        assert re.search(r"^#+ .*exercise", markdown, re.I | re.M), f"{path.name}: no Exercises section"
        assert re.search(r"^#+ .*what we measured", markdown, re.I | re.M), f"{path.name}: no 'What we measured'"
        images = sum(
            "image/png" in o.get("data", {}) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]
        )
        assert images >= 1, f"{path.name}: no figure"


def _prose_words(path) -> int:
    """Words of a notebook's prose: whitespace-separated tokens of its markdown cells."""
    cells = json.loads(path.read_text())["cells"]
    return sum(len("".join(c["source"]).split()) for c in cells if c["cell_type"] == "markdown")


NOTEBOOK_WORDS = 5_000  # past this a notebook is split
CORE_WORDS = 14_000  # notebooks 00-06 together: the first steps stay short


# Notebooks past the limit that are waiting to be split (none now); strict, so a mark must go when its notebook is.
TO_SPLIT: set[str] = set()


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason="past the word limit: to be split"))
    if p.name in TO_SPLIT else p
    for p in NOTEBOOKS if int(p.name[:2]) != APPENDIX  # the appendix is a table to look things up in, not read through
], ids=[p.name for p in NOTEBOOKS if int(p.name[:2]) != APPENDIX])
def test_a_notebook_is_short_enough_to_read_in_one_sitting(path):
    assert _prose_words(path) <= NOTEBOOK_WORDS, f"{path.name}: {_prose_words(path)} words of prose; split it"


def test_the_core_notebooks_together_stay_within_their_word_budget():
    core = {p.name: _prose_words(p) for p in NOTEBOOKS if int(p.name[:2]) <= 6}
    assert len(core) == 7 and sum(core.values()) <= CORE_WORDS, core

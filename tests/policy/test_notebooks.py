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

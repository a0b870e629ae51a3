"""What the site's tests share: book/build.py, the built site, and the check that its toggles follow the notebooks."""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SITE = REPO_ROOT / "book" / "_build" / "html"

_spec = importlib.util.spec_from_file_location("course_book_build", REPO_ROOT / "book" / "build.py")
assert _spec is not None and _spec.loader is not None
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

# The checks of the built site run in `make book-check` (part of `make ci`), which builds the site first;
# a learner's `make test` skips them.
needs_site = pytest.mark.skipif(
    os.environ.get("COURSE_BOOK_CHECK") != "1" or not (SITE / "index.html").exists(),
    reason="the website's checks run with make book-check (make ci), which builds the site first",
)


def expected_collapsed(nb: dict) -> list[tuple[str, bool, bool, str]]:
    """(cell type, source hidden, outputs hidden, first source line) for each cell the site renders as a cell:
    code cells (every one is a `div.cell`) and the collapsed Markdown cells (each a `toggle`)."""
    cells = []
    for cell in nb["cells"]:
        if build.left_out(cell):
            continue
        source_hidden, outputs_hidden = build.collapsed(cell)
        text = "".join(cell["source"]).strip()
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        if cell["cell_type"] == "code" and text:
            cells.append(("code", source_hidden, outputs_hidden and bool(cell.get("outputs")), first))
        elif cell["cell_type"] == "markdown" and source_hidden:
            cells.append(("markdown", True, False, first))
    return cells


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text))


def toggle_mismatches(nb: dict, page_html: str) -> list[str]:
    """Where the page's collapsed parts differ from the notebook's metadata (empty when they agree): every
    solution collapsed (its source, its output, or a collapsed Markdown cell), and nothing else collapsed."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(page_html, "html.parser")
    article = soup.select_one("article") or soup
    found = []
    for node in article.select("div.cell, div.toggle"):
        if "toggle" in node.get("class", []):
            found.append(("markdown", True, False, node.get_text(" ", strip=True)))
            continue
        source = node.select_one("div.cell_input")
        details = [d for d in node.select("details.hide")]
        in_hidden = source is not None and source.find_parent("details") is not None
        out_hidden = any("below-input" in d.get("class", []) for d in details)
        found.append(("code", in_hidden, out_hidden, source.get_text(" ", strip=True) if source else ""))
    expected = expected_collapsed(nb)
    problems = []
    if len(found) != len(expected):
        problems.append(f"{len(expected)} code or collapsed Markdown cells in the notebook, {len(found)} on the page")
    for i, (want, got) in enumerate(zip(expected, found, strict=False)):
        if want[0] != got[0] or not _words(got[3]).startswith(_words(want[3])[:40]):
            problems.append(f"cell {i}: the page's cells are out of step with the notebook's at {want[3][:60]!r}")
            break
        if want[1:3] != got[1:3]:
            problems.append(f"cell {i} ({want[3][:60]!r}): notebook says source hidden={want[1]}, outputs "
                            f"hidden={want[2]}; the page has {got[1]}, {got[2]}")
    return problems


def notebook_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))

"""Notebook 99 (errata of the sources) is a well-formed audit: every table row names a source article that
exists and one verdict from the fixed set, and every link to a notebook section lands on a heading."""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import cache

import pytest

from course_lib.tools.paths import DATA_DIR, REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
ERRATA = NOTEBOOKS_DIR / "99_errata_of_the_sources.ipynb"
VERDICTS = {"correct", "wrong", "unsupported", "misleading"}
# The five source articles (Chinese), as the course received them; the notebook's "sources" table lists them.
SEED_FILES = {
    "000": "000_1bde75d32ba16e6d.txt",
    "001": "001_8b31ecaf8fd11a69.txt",
    "002": "002_df6625a56521bb69.txt",
    "003": "003_a781b199673621ce.txt",
    "004": "004_c3c59f9296bd3e48.txt",
}
SEEDS_DIR = REPO_ROOT.parent / "shared" / "seeds"  # where the articles sit beside a checkout, when they do

ROW = re.compile(r"^\| \*\*(\d{3}) (§[^*]+|FAQ \d|introduction|conclusion)\*\* (.+)$")
# a markdown link: [text](destination), the destination possibly holding balanced parentheses
LINK = re.compile(r"\[[^\]]*\]\(((?:[^()\s]|\([^()\s]*\))+)\)")


def markdown_cells(path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]


def jupyterlab_anchor(heading: str) -> str:
    """The id JupyterLab gives a heading: its rendered text with spaces replaced by '-' (code marks and
    emphasis stars are not part of the rendered text)."""
    return heading.lstrip("#").strip().replace("`", "").replace("*", "").replace(" ", "-")


@cache
def anchors(name: str) -> frozenset[str]:
    path = NOTEBOOKS_DIR / name
    headings = [line for cell in markdown_cells(path) for line in cell.splitlines() if re.match(r"#{1,6} ", line)]
    return frozenset(jupyterlab_anchor(h) for h in headings)


def table_rows() -> list[tuple[str, str, list[str]]]:
    """(seed of the section the table is in, seed the row names, the row's cells) for every claim row."""
    rows, section_seed = [], None
    for cell in markdown_cells(ERRATA):
        for line in cell.splitlines():
            heading = re.match(r"## Source (\d{3})", line)
            if heading:
                section_seed = heading.group(1)
            elif re.match(r"## ", line):
                section_seed = None
            if line.startswith("| **"):
                cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
                rows.append((section_seed, line, cells))
    return rows


def test_the_errata_notebook_exists_and_lists_the_five_sources():
    assert ERRATA.exists()
    text = "\n".join(markdown_cells(ERRATA))
    for number, name in SEED_FILES.items():
        assert f"| {number} | `{name}` |" in text, f"the sources table does not list {name}"


def test_the_seed_files_are_the_articles_next_to_the_checkout():
    if not SEEDS_DIR.is_dir():
        pytest.skip(f"the source articles are not beside this checkout ({SEEDS_DIR.name}/ not found)")
    assert sorted(p.name for p in SEEDS_DIR.glob("*.txt")) == sorted(SEED_FILES.values())


def test_every_row_names_a_seed_and_one_verdict_from_the_fixed_set():
    rows = table_rows()
    assert len(rows) >= 93, f"only {len(rows)} claim rows: a claim was dropped from the tables"
    problems = []
    for section_seed, line, cells in rows:
        match = ROW.match(line)
        if not match:
            problems.append(f"row does not start with '**NNN §section**': {line[:80]}")
            continue
        seed = match.group(1)
        if seed not in SEED_FILES:
            problems.append(f"row names seed {seed}, which is not a source file: {line[:80]}")
        if seed != section_seed:
            problems.append(f"row of seed {seed} sits in the section of seed {section_seed}: {line[:80]}")
        if len(cells) != 4:
            problems.append(f"{len(cells)} cells instead of 4 (claim | verdict | evidence | correction): {line[:80]}")
            continue
        claim, verdict, evidence, correction = cells
        if verdict not in VERDICTS:
            problems.append(f"verdict {verdict!r} is not one of {sorted(VERDICTS)}: {line[:80]}")
        if len(claim) < 20 or not evidence or not correction:
            problems.append(f"empty claim, evidence or correction: {line[:80]}")
    assert not problems, "\n".join(problems)


def test_the_summary_states_the_tables_counts():
    """'What we measured' says how many claims were checked and how many got each verdict: the tables' numbers."""
    verdicts = [cells[1] for _, line, cells in table_rows() if ROW.match(line) and len(cells) == 4]
    counts = Counter(verdicts)
    text = "\n".join(markdown_cells(ERRATA))
    summary = re.search(r"\*\*(\d+) claims checked\*\* in the five articles: (\d+) correct, (\d+) wrong, "
                        r"(\d+) unsupported, (\d+) misleading", text)
    assert summary, "the summary does not state the number of claims and of each verdict"
    stated = [int(n) for n in summary.groups()]
    assert stated == [len(verdicts), *(counts[v] for v in ("correct", "wrong", "unsupported", "misleading"))], stated


def test_the_prose_means_a_random_seed_by_seed():
    """The five articles are "source articles" in the notebook's own prose; "seed" is kept for random seeds.
    Headings are left out (other notebooks link to them), and so are link texts and code."""
    stray = []
    for cell in markdown_cells(ERRATA):
        lines = [line for line in cell.splitlines() if not re.match(r"#{1,6} ", line)]
        prose = re.sub(r"`[^`]*`", "", LINK.sub("", " ".join(lines)))  # a phrase may run over two lines
        for match in re.finditer(r"(\w+\s+)?\bseeds?\b", prose, flags=re.IGNORECASE):
            if (match.group(1) or "").strip().lower() != "random":
                stray.append(prose[max(0, match.start() - 40):match.end() + 40])
    assert not stray, "'seed' for a source article:\n" + "\n".join(stray)


def test_each_seed_has_a_table_and_the_audit_says_where_each_seed_is_right():
    verdicts: dict[str, set[str]] = {}
    for _, line, cells in table_rows():
        match = ROW.match(line)
        if match and len(cells) == 4:
            verdicts.setdefault(match.group(1), set()).add(cells[1])
    assert set(verdicts) == set(SEED_FILES), sorted(verdicts)
    assert all("correct" in v for v in verdicts.values()), verdicts


def test_every_link_to_a_notebook_lands_on_a_heading():
    own = ERRATA.name
    broken, checked = [], 0
    for cell in markdown_cells(ERRATA):
        for destination in LINK.findall(cell):
            if destination.startswith(("http://", "https://")):
                continue
            target, _, fragment = destination.partition("#")
            target = target or own
            if not target.endswith(".ipynb"):
                continue
            checked += 1
            if not (NOTEBOOKS_DIR / target).exists():
                broken.append(f"{destination}: no notebook {target}")
            elif fragment and fragment not in anchors(target):
                broken.append(f"{destination}: no heading with anchor #{fragment} in {target}")
    assert checked >= 50, f"only {checked} links to notebooks"
    assert not broken, "\n".join(broken)


def test_the_code_the_notebook_runs_is_stored_with_it():
    notebook_text = ERRATA.read_text(encoding="utf-8")
    for name in re.findall(r'(?:run_seed|seed_source)\(\\"(\w+)\\"', notebook_text):
        assert (DATA_DIR / "seed_code" / f"{name}.txt").exists(), name

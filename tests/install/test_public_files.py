"""What a public course carries: a citation, a changelog and a contribution guide that agree with pyproject.toml.

CITATION.cff was validated against the Citation File Format 1.2.0 schema with cffconvert 2.0.0
(`cffconvert --validate`); this test keeps the fields that schema requires and the version in step without
needing cffconvert installed."""

import json
import re
import tomllib

import yaml

from course_lib.tools.paths import REPO_ROOT


def _project_version() -> str:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_citation_has_the_required_fields_and_the_project_version():
    cff = yaml.safe_load((REPO_ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors", "version", "license"):
        assert cff.get(key), key
    assert all(isinstance(a, dict) and (a.get("name") or a.get("family-names")) for a in cff["authors"])
    assert str(cff["version"]) == _project_version()
    license_text = (REPO_ROOT / "LICENSE").read_text()
    assert cff["license"] == "MIT" and license_text.startswith("MIT License")


def test_changelog_has_an_entry_for_the_project_version_first():
    headings = re.findall(r"^## (\S+)", (REPO_ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), re.M)
    assert headings, "CHANGELOG.md has no version entry"
    assert headings[0] == _project_version(), (headings[0], _project_version())


def test_contributing_and_the_issue_template_point_at_what_exists():
    contributing = (REPO_ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    makefile = (REPO_ROOT / "Makefile").read_text()
    targets = re.findall(r"`make ([a-z-]+)", contributing) + re.findall(r"^make ([a-z-]+)", contributing, re.M)
    assert "ci" in targets and "test" in targets
    for target in targets:
        assert re.search(rf"^{target}:", makefile, re.M), f"CONTRIBUTING.md names `make {target}`: no such target"
    for path in re.findall(r"`((?:tests|course_lib|data)/[\w/.-]+?\.(?:py|md))`", contributing):
        assert list(REPO_ROOT.glob(path.replace("NN", "[0-9][0-9]"))), path  # nbNN: every notebook's
    readme_anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                      for h in re.findall(r"^#+ (.+)$", (REPO_ROOT / "README.md").read_text(), re.M)}
    for anchor in re.findall(r"\(README\.md#([\w-]+)\)", contributing):
        assert anchor in readme_anchors, anchor
    template = (REPO_ROOT / ".github" / "ISSUE_TEMPLATE" / "problem.md").read_text()
    assert "make device-report" in template and re.search(r"^device-report:", makefile, re.M)


def test_the_source_articles_code_says_where_it_comes_from_and_on_what_terms():
    note = (REPO_ROOT / "data" / "seed_code" / "README.md").read_text(encoding="utf-8")
    assert "not covered by this repository's MIT license" in " ".join(note.split())
    assert "criticism and review" in note


def test_binder_installs_the_pinned_cpu_torch_the_course_and_the_kernel_the_notebooks_name():
    """Binder (repo2docker) reads binder/: the requirements must pin the same torch as pyproject.toml's lock (its
    CPU build), install the course itself with its pins, and postBuild must register the kernel every notebook names."""
    binder = REPO_ROOT / "binder"
    lines = [ln.strip() for ln in (binder / "requirements.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    pins = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["lock"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    assert f"{torch_pin}+cpu" in lines and "-e .[lock]" in lines  # the exact pins, as make lab installs them
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    assert (binder / "runtime.txt").read_text().strip() == "python-3.11"
    post_build = (binder / "postBuild").read_text()
    notebooks = (REPO_ROOT / "notebooks").glob("*.ipynb")
    names = {json.loads(p.read_text())["metadata"]["kernelspec"]["name"] for p in notebooks}
    assert names == {"mha-course"}
    assert "ipykernel install --sys-prefix --name mha-course" in post_build
    makefile = (REPO_ROOT / "Makefile").read_text()
    start = (binder / "start").read_text()
    for var in re.findall(r"^export (\w+) := ", makefile, re.M):  # the same offline settings as make lab
        assert f"{var}=" in start, var
    for script in ("postBuild", "start"):
        assert (binder / script).stat().st_mode & 0o111, f"binder/{script} must be executable"

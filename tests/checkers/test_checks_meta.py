"""What every exercise checker promises, tested once for all of them.

Each checker is re-exported by `course_lib.checks` under a name no other notebook module uses,
prints the name it is called by, has a docstring that says what to write, reports an unfinished
stub, a non-function and a missing `return` without raising, and has tests of its own (the
reference passes, planted mistakes fail) in its notebook's test module.
"""

import importlib
import inspect
import pkgutil

import numpy as np
import pytest
import torch

import course_lib.checks as checks
from course_lib.tools.paths import REPO_ROOT

NOTEBOOK_MODULES = [
    importlib.import_module(f"{checks.__name__}.{info.name}")
    for info in sorted(pkgutil.iter_modules(checks.__path__), key=lambda info: info.name)
    if info.name.startswith("nb")
]
CHECKERS = [name for module in NOTEBOOK_MODULES for name in module.__all__]


def test_each_notebook_module_exports_every_checker_it_defines():
    for module in NOTEBOOK_MODULES:
        defined = {
            name
            for name, obj in vars(module).items()
            if name.startswith("check_") and callable(obj) and obj.__module__ == module.__name__
        }
        assert defined == set(module.__all__), module.__name__


def test_no_name_is_exported_by_two_notebook_modules():
    # the package namespace is flat: a second checker of the same name would silently replace the first
    first_module = {}
    clashes = []
    for module in NOTEBOOK_MODULES:
        for name in module.__all__:
            if name in first_module:
                clashes.append(f"{name} ({first_module[name]} and {module.__name__})")
            first_module.setdefault(name, module.__name__)
    assert not clashes, "exported by two notebook modules: " + ", ".join(clashes)


def test_the_package_reexports_every_checker_and_nothing_else():
    missing = [
        f"{name} ({module.__name__})"
        for module in NOTEBOOK_MODULES
        for name in module.__all__
        if getattr(checks, name, None) is not getattr(module, name)
    ]
    assert not missing, "not re-exported by course_lib.checks: " + ", ".join(missing)
    assert sorted(checks.__all__) == sorted(["CheckResult", *CHECKERS])
    assert len(checks.__all__) == len(set(checks.__all__))


def test_every_checker_is_exercised_by_its_notebooks_test_module():
    missing = []
    for name in CHECKERS:
        notebook = getattr(checks, name).__module__.rsplit(".", 1)[1]  # e.g. nb04
        test_file = REPO_ROOT / "tests" / "checkers" / f"test_checks_{notebook}.py"
        if not test_file.exists() or test_file.read_text().count(name) < 2:
            missing.append(f"{name} ({test_file.name})")
    assert not missing, "checkers without a pass and a fail test: " + ", ".join(missing)


@pytest.mark.parametrize("name", CHECKERS)
def test_docstring_says_what_the_learners_function_takes_and_returns(name):
    doc = inspect.getdoc(getattr(checks, name))
    assert doc and doc.startswith("Check "), name
    assert "Your function: `fn(" in doc and "->" in doc, name


def _stub(*args, **kwargs):
    raise NotImplementedError


@pytest.mark.parametrize("name", CHECKERS)
def test_an_unfinished_stub_is_not_yet_implemented_under_the_checkers_name(name):
    result = getattr(checks, name)(_stub)
    assert not result.passed and "not implemented yet" in result.message, (name, result.message)
    # one naming style: `[NOT YET] softmax: ...` for checks.check_softmax
    assert repr(result).startswith(f"[NOT YET] {name.removeprefix('check_')}: "), repr(result)


@pytest.mark.parametrize("not_a_function", [np.zeros(3), torch.zeros(3)], ids=["numpy", "torch"])
@pytest.mark.parametrize("name", CHECKERS)
def test_passing_a_result_instead_of_a_function_is_explained(name, not_a_function):
    result = getattr(checks, name)(not_a_function)
    assert not result.passed and "pass your function itself" in result.message, (name, result.message)


@pytest.mark.parametrize("name", CHECKERS)
def test_a_function_that_returns_nothing_is_reported_not_raised(name):
    result = getattr(checks, name)(lambda *args, **kwargs: None)
    assert not result.passed and "None" in result.message, (name, result.message)

"""Every exercise checker has tests of its own (reference passes, planted mistakes fail) beside its notebook's."""

import course_lib.checks as checks
from course_lib.paths import REPO_ROOT


def test_every_checker_is_exercised_by_its_notebooks_test_module():
    missing = []
    for name in checks.__all__:
        if not name.startswith("check_"):
            continue
        notebook = getattr(checks, name).__module__.rsplit(".", 1)[1]  # e.g. nb04
        test_file = REPO_ROOT / "tests" / f"test_checks_{notebook}.py"
        if not test_file.exists() or test_file.read_text().count(name) < 2:
            missing.append(f"{name} ({test_file.name})")
    assert not missing, "checkers without a pass and a fail test: " + ", ".join(missing)


def test_every_checker_returns_not_yet_for_an_unfinished_stub():
    def stub(*args, **kwargs):
        raise NotImplementedError

    for name in checks.__all__:
        if name.startswith("check_"):
            result = getattr(checks, name)(stub)
            assert not result.passed and "not implemented yet" in result.message, (name, result.message)

"""Dispatch `python -m course_lib.bench <suite> ...` to course_lib.bench.<suite>.main(argv)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import course_lib.bench as package


def suites() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_") and m.name != "timing"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in suites():
        print("usage: python -m course_lib.bench <suite> [options]   (suite --help for its options)")
        print("suites: " + ", ".join(suites()))
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    return importlib.import_module(f"course_lib.bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())

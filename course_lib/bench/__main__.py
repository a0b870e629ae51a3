"""Dispatch `python -m course_lib.bench <suite> ...` to course_lib.bench.<suite>.main(argv) (the suites in SUITES)."""

from __future__ import annotations

import importlib
import sys

from course_lib.bench import SUITES


def suites() -> list[str]:
    return sorted(SUITES)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in SUITES:
        print("usage: python -m course_lib.bench <suite> [options]   (suite --help for its options)")
        print("suites:")
        for name in suites():
            print(f"  {name:13s} {SUITES[name]}")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    return importlib.import_module(f"course_lib.bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())

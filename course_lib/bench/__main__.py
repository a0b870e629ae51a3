"""Dispatch `python -m course_lib.bench <suite> ...` to course_lib.bench.<suite>.main(argv) (the suites in SUITES)."""

from __future__ import annotations

import importlib
import sys

from course_lib.bench import SUITES

USAGE = "usage: python -m course_lib.bench <suite> [options]   (suite --help for its options)"


def suites() -> list[str]:
    return sorted(SUITES)


def _usage() -> str:
    return "\n".join([USAGE, "suites:", *(f"  {name:13s} {SUITES[name]}" for name in suites())])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if not argv or argv[0] not in SUITES:  # a usage error, as argparse gives one: usage and error on stderr, 2
        got = f"unknown suite {argv[0]!r}" if argv else "no suite given"
        print(f"{_usage()}\npython -m course_lib.bench: error: argument suite: {got}", file=sys.stderr)
        return 2
    return importlib.import_module(f"course_lib.bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())

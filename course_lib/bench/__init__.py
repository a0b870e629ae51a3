"""Benchmarks: `python -m course_lib.bench <suite> [options]`; suites are the modules of this package."""

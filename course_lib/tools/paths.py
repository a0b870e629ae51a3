"""Where the course's files are, wherever a notebook or script runs from.

DATA_DIR is package data (course_lib/data: datasets, checkpoints, recorded benchmarks), so it is
there in a source checkout and after a plain `pip install .` alike. REPO_ROOT is the checkout
itself (notebooks, scripts): it exists only when course_lib runs from the repository.
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = PACKAGE_DIR / "data"
REPO_ROOT = PACKAGE_DIR.parent

"""Where the course's files are, wherever a notebook or script runs from.

Two data folders, for two kinds of files:

PACKAGE_DATA  course_lib/data/: what the library's own functions load (the toy translation splits, the
              capstone and head-ablation checkpoints). It is package data, so it is there in a source
              checkout and after a plain `pip install .` alike.
DATA_DIR      the repository's data/: the course's records (benchmark results, sweeps, logs, figures, the
              source articles' code), written by scripts/ and `python -m course_lib.bench`, read by the
              notebooks and tests. It exists only in a source checkout (an editable install points at one):
              a non-editable `pip install .` carries no records. Library code that reads them goes through
              `records_dir`, which names the missing folder instead of failing deep inside.
REPO_ROOT     the checkout itself (notebooks, scripts, data/): it too exists only in a source checkout.

The commands that remake these files (README, "Where the recorded results come from") write over an
existing file only when asked to (`--force`, or `force=True` in Python): `refuse_overwrite` is that check.
"""

from collections.abc import Iterable
from pathlib import Path

__all__ = ["PACKAGE_DIR", "PACKAGE_DATA", "REPO_ROOT", "DATA_DIR", "RecordsNotFoundError", "records_dir",
           "refuse_overwrite"]

PACKAGE_DIR = Path(__file__).resolve().parent.parent
PACKAGE_DATA = PACKAGE_DIR / "data"
REPO_ROOT = PACKAGE_DIR.parent
DATA_DIR = REPO_ROOT / "data"


class RecordsNotFoundError(FileNotFoundError):
    """The course's records (DATA_DIR) are not here: course_lib runs from an installed copy, not a checkout."""


def records_dir(*parts: str) -> Path:
    """DATA_DIR / parts, checked to exist: RecordsNotFoundError, naming the folder, where it does not."""
    path = DATA_DIR.joinpath(*parts)
    if not path.is_dir():
        raise RecordsNotFoundError(
            f"{path} does not exist: the course's records (data/) are in a source checkout of the repository, "
            "not in an installed course_lib; run from a clone (pip install -e .) or pass the folder explicitly")
    return path


def refuse_overwrite(paths: Iterable[Path | str], *, force: bool, argument: str, how: str) -> None:
    """ValueError, before any work, when a file of `paths` exists and force is False.

    A re-run (a smoke run with --steps 1, a sweep with other settings) must not replace a recorded
    result by accident: the shipped checkpoints and dataset, data/'s records. Every existing file
    counts, wherever it is, since a file a command would replace may be a record. `argument` names
    the output argument (`out`, `--out`), `how` says how to write anyway ("pass --force ...").
    """
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise ValueError(f"{argument}: refusing to write over {names}, which already exist"
                         f"{'s' if len(existing) == 1 else ''} (recorded results the notebooks and tests read may be "
                         f"among them); {how}")

"""argparse types shared by every command line of course_lib (`python -m course_lib.bench ...`, `.tools.device`,
`.tools.viz`, `.experiments.toy_translation`).

A flag's value is checked where argparse reads it: `parser.add_argument("--repeats", type=positive_int)`.
A bad value then gives argparse's usage error, which names the flag, says what was expected and what came,
and exits with status 2 before any work is done and before any file is written:

    python -m course_lib.bench attention: error: argument --repeats: expected a positive int (1, 2, ...); got '0'

Each function takes the text of one value and returns it converted, or raises argparse.ArgumentTypeError.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["positive_int", "nonnegative_int", "seed", "positive_finite_float", "int_list", "choice_list",
           "torch_device", "output_file", "output_dir"]


def _int(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None


def positive_int(text: str) -> int:
    """An int >= 1: a count, a size, a number of repeats or threads."""
    value = _int(text, "a positive int (1, 2, ...)")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int (1, 2, ...); got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An int >= 0: a number of warm-up runs, which may be none."""
    value = _int(text, "an int >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0; got {text!r}")
    return value


def seed(text: str) -> int:
    """A random seed: an int from 0 to 2**32 - 1 (what numpy's and torch's generators accept)."""
    value = nonnegative_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to 2**32 - 1; got {text!r}")
    return value


def positive_finite_float(text: str) -> float:
    """A float > 0 that is neither NaN nor infinite (a limit: NaN would compare False and switch it off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, e.g. 2 or 0.5; got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, e.g. 2 or 0.5; got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """Comma-separated positive ints (--seq 256,512; --d-head 64,128)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, e.g. 256,512; got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints; got {text!r}")
    return values


def choice_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """The type of a comma-separated selection from `choices` (--impls naive,sdpa_math): at least one, none unknown."""
    allowed = tuple(choices)

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = [name for name in names if name not in allowed]
        if not names or unknown:
            what = f"unknown {', '.join(map(repr, unknown))} in {text!r}" if unknown else repr(text)
            raise argparse.ArgumentTypeError(f"expected comma-separated names among {', '.join(allowed)}; got {what}")
        return names

    parse.__name__ = "choice_list"
    return parse


def torch_device(text: str) -> str:
    """'cpu', or 'cuda' / 'cuda:N' naming a GPU this machine has; returned as torch spells it."""
    import torch  # only the commands that take a device need torch

    expected = "cpu, cuda or cuda:N"
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r} (a {device.type} device)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"got {text!r}, but no CUDA device is available here "
                                             f"(torch {torch.__version__}): pass cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"got {text!r}, but this machine has {torch.cuda.device_count()} "
                                             f"CUDA device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return str(device)


def _nearest_existing(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(".")


def output_file(text: str) -> Path:
    """A file to write: not empty, not an existing folder, and not below an existing file."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a file path; got {text!r}")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file path; got {text!r}, which is a folder")
    if not path.exists() and not _nearest_existing(path).is_dir():
        raise argparse.ArgumentTypeError(f"expected a file path; got {text!r}, but "
                                         f"{_nearest_existing(path)} is a file, not a folder")
    return path


def output_dir(text: str) -> Path:
    """A folder to write into (made if missing): not empty, not an existing file, and not below one."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a folder path; got {text!r}")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a folder path; got {text!r}, which is a file")
    if not path.exists() and not _nearest_existing(path).is_dir():
        raise argparse.ArgumentTypeError(f"expected a folder path; got {text!r}, but "
                                         f"{_nearest_existing(path)} is a file, not a folder")
    return path

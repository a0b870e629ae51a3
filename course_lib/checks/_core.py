"""What every exercise checker shares: a result object and comparisons with helpful messages.

A checker never raises on a wrong answer: it returns a CheckResult that prints as a pass or
as a message saying what is wrong (shape, NaN, which entry, by how much) and a hint. That
way an unfinished exercise shows "not yet" instead of a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["CheckResult", "CheckFailure", "checker", "call", "compare", "is_close", "to_numpy"]


class CheckFailure(Exception):
    """Raised inside a checker to report what is wrong with the learner's function."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        mark = "PASSED" if self.passed else "NOT YET"
        return f"[{mark}] {self.name}: {self.message}"

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise AssertionError(repr(self))


def checker(name: str) -> Callable:
    """Turn `body(learner_fn) -> summary` (raising CheckFailure on a wrong answer) into a checker."""

    def wrap(body: Callable) -> Callable[..., CheckResult]:
        @functools.wraps(body)
        def run(learner_fn: Callable, *args, **kwargs) -> CheckResult:
            if not callable(learner_fn):
                return CheckResult(
                    name, False, f"pass your function itself (not its result); got {type(learner_fn).__name__}"
                )
            try:
                summary = body(learner_fn, *args, **kwargs)
            except CheckFailure as failure:
                return CheckResult(name, False, str(failure))
            return CheckResult(name, True, summary or "all cases match the reference")

        return run

    return wrap


def call(learner_fn: Callable, *args, what: str = "", **kwargs):
    """Call the learner's function; turn NotImplementedError and crashes into a readable failure."""
    try:
        return learner_fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckFailure("not implemented yet: replace the `raise NotImplementedError` with your code") from None
    except Exception as e:  # the learner's bug, reported rather than raised
        shapes = ", ".join(str(np.shape(a)) for a in args)
        raise CheckFailure(
            f"your function raised {type(e).__name__}: {e} (called with shapes {shapes}{what})"
        ) from None


def to_numpy(x):
    """A torch tensor (any device, requiring grad or not) as a numpy array; anything else unchanged."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def is_close(got, expected, *, atol: float = 1e-10, rtol: float = 1e-8) -> bool:
    """Does `got` have the shape and (within atol/rtol) the values of `expected`? False for non-numbers.

    The defaults suit float64 answers, where a correct solution agrees with the reference to ~1e-15.
    """
    try:
        got = np.asarray(to_numpy(got), dtype=np.float64)
    except (TypeError, ValueError):
        return False
    expected = np.asarray(to_numpy(expected), dtype=np.float64)
    return got.shape == expected.shape and bool(np.allclose(got, expected, atol=atol, rtol=rtol))


def compare(name: str, got, expected, *, atol: float = 1e-8, rtol: float = 1e-6, hint: str = "") -> None:
    """Raise CheckFailure describing the first way `got` differs from `expected`."""
    suffix = f" Hint: {hint}" if hint else ""
    if got is None:
        raise CheckFailure(f"{name} is None: did you forget to `return` it?{suffix}")
    try:
        got = np.asarray(to_numpy(got), dtype=np.float64)
    except (TypeError, ValueError):
        raise CheckFailure(f"{name} should be an array of numbers; got {type(got).__name__}{suffix}") from None
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        raise CheckFailure(f"{name} has shape {got.shape}, expected {expected.shape}.{suffix}")
    bad = ~np.isfinite(got) & np.isfinite(expected)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise CheckFailure(
            f"{name} contains {got[idx]} at index {idx} where {expected[idx]:.6g} was expected "
            f"({int(bad.sum())} non-finite entries).{suffix}"
        )
    close = np.isclose(got, expected, atol=atol, rtol=rtol, equal_nan=True)
    if not close.all():
        idx = tuple(int(i) for i in np.argwhere(~close)[0])
        err = float(np.nanmax(np.abs(got - expected)))
        raise CheckFailure(
            f"{name} differs from the reference: at index {idx} got {got[idx]:.6g}, expected "
            f"{expected[idx]:.6g} ({int((~close).sum())} of {close.size} entries off, max abs "
            f"error {err:.3g}).{suffix}"
        )

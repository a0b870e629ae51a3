"""What every exercise checker shares: a result object, the tolerances, and the guards and
comparisons that turn a wrong answer into a helpful message.

A checker never raises on a wrong answer: it returns a CheckResult that prints as a pass or
as a message saying what is wrong (shape, NaN, which entry, by how much) and a hint. That
way an unfinished exercise shows "not yet" instead of a traceback.

A checker is written as `check_<name>(fn)` decorated with `@checker`; `<name>` is what its
result prints, `[PASSED] <name>: ...`, so the printed name is always the function's name.
"""

from __future__ import annotations

import copy
import functools
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "ATOL",
    "RTOL",
    "CheckResult",
    "CheckFailure",
    "checker",
    "call",
    "as_number",
    "private_copy",
    "require_result",
    "as_array",
    "as_tensor",
    "unpack",
    "compare",
    "is_close",
    "diagnose",
    "to_numpy",
    "multiple_choice",
]

# The default tolerances of is_close and compare. The exercises compute in float64, where a correct
# answer agrees with the reference to ~1e-15 whatever order it sums in; 1e-10 / 1e-8 leaves room for
# that and still catches a float32 computation (~1e-7) or any real mistake. Checkers whose answers are
# rounded on purpose (float16, a formula evaluated in float32) pass their own tolerances.
ATOL, RTOL = 1e-10, 1e-8


class CheckFailure(Exception):
    """Raised inside a checker to report what is wrong with the learner's function."""


@dataclass(frozen=True)
class CheckResult:
    """A checker's verdict: the exercise's name, passed or not, and the message a learner reads."""

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


def checker(body: Callable) -> Callable[..., CheckResult]:
    """Turn `check_<name>(learner_fn) -> summary` (raising CheckFailure on a wrong answer) into a checker.

    The result is named `<name>`, the function's name without `check_`, so that what a learner
    types and what the result prints are the same words.
    """
    name = body.__name__.removeprefix("check_")

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
        except Exception as e:  # an answer so far off that comparing it failed: still a verdict, never a crash
            return CheckResult(name, False, f"your answer could not be compared with the reference "
                                            f"({type(e).__name__}: {e}); check what your function returns")
        return CheckResult(name, True, summary or "all cases match the reference")

    return run


def private_copy(x):
    """A copy the learner's function may change at will: arrays, tensors and modules are copied
    (nested in lists, tuples and dicts too), so the checker's own inputs and reference stay intact."""
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, torch.Tensor):
        return x.detach().clone().requires_grad_(x.requires_grad)
    if isinstance(x, torch.nn.Module):
        return copy.deepcopy(x)
    if isinstance(x, list | tuple):
        return type(x)(private_copy(a) for a in x)
    if isinstance(x, dict):
        return {k: private_copy(v) for k, v in x.items()}
    return x


def call(learner_fn: Callable, *args, what: str = "", **kwargs):
    """Call the learner's function on copies of the inputs; turn NotImplementedError and crashes into
    a readable failure. A function that changes its inputs in place changes only its copies."""
    args, kwargs = private_copy(args), private_copy(kwargs)
    try:
        return learner_fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckFailure("not implemented yet: replace the `raise NotImplementedError` with your code") from None
    except SystemExit as e:  # exit() in a notebook cell would end the checker, not the kernel: report it
        raise CheckFailure(f"your function called exit() / raised SystemExit({e})") from None
    except Exception as e:  # the learner's bug, reported rather than raised
        shapes = ", ".join(str(np.shape(a)) for a in args)
        raise CheckFailure(
            f"your function raised {type(e).__name__}: {e} (called with shapes {shapes}{what})"
        ) from None


def _unchanged(before, after) -> bool:
    """Whether the learner's copy `after` still equals the checker's input `before`: arrays and tensors entry by
    entry, lists, tuples and dicts item by item, numbers and strings by value; modules are not compared."""
    if isinstance(before, torch.Tensor):
        if not (isinstance(after, torch.Tensor) and before.shape == after.shape and before.dtype == after.dtype):
            return False
        nan_too = before.is_floating_point() or before.is_complex()  # a NaN input left alone is unchanged
        return bool(torch.allclose(before, after.detach(), rtol=0, atol=0, equal_nan=True) if nan_too
                    else torch.equal(before, after))
    if isinstance(before, np.ndarray):
        return (isinstance(after, np.ndarray) and before.shape == after.shape
                and bool(np.array_equal(before, after, equal_nan=before.dtype.kind in "fc")))
    if isinstance(before, dict):
        return isinstance(after, dict) and before.keys() == after.keys() and all(
            _unchanged(before[k], after[k]) for k in before)
    if isinstance(before, list | tuple):
        return (isinstance(after, list | tuple) and len(before) == len(after)
                and all(_unchanged(b, a) for b, a in zip(before, after, strict=True)))
    if isinstance(before, numbers.Number | str):
        return before == after
    return True


def call_watching(learner_fn: Callable, *args, names: tuple[str, ...] = (), what: str = "", advice: str = "",
                  **kwargs):
    """`call`, then fail if the learner's function changed one of its inputs in place, naming it.

    The function runs on private copies, so the checker's inputs are safe either way; but code that writes into
    its inputs (masked_fill_, +=, x[...] = ...) changes the caller's tensors, a bug even when the returned value
    is right. names: the positional arguments' names, in order; keyword arguments are named by their keys.
    advice: what to write instead, in the words of the exercise.
    """
    seen: dict = {}

    def watched(*copies, **kwcopies):
        seen["args"], seen["kwargs"] = copies, kwcopies
        return learner_fn(*copies, **kwcopies)

    got = call(watched, *args, what=what, **kwargs)
    labels = [f"`{names[i]}`" if i < len(names) else f"argument {i + 1}" for i in range(len(args))]
    pairs = list(zip(labels, args, seen["args"], strict=True))
    pairs += [(f"`{name}`", kwargs[name], seen["kwargs"][name]) for name in kwargs]
    changed = [label for label, before, after in pairs if not _unchanged(before, after)]
    if changed:
        raise CheckFailure(f"your function changed its input {', '.join(changed)} in place: the caller's "
                           f"data is modified, a bug even when the result is right.{_hint_or(advice)}")
    return got


def _hint_or(advice: str) -> str:
    return f" {advice}" if advice else " Return new arrays or tensors instead of writing into the inputs"


def _hint(hint: str) -> str:
    return f" Hint: {hint}" if hint else ""


def require_result(name: str, got, *, hint: str = "") -> None:
    """Fail with "did you forget to `return` it?" when the learner's function returned None."""
    if got is None:
        raise CheckFailure(f"{name} is None: did you forget to `return` it?{_hint(hint)}")


def to_numpy(x):
    """A torch tensor (any device, requiring grad or not) as a numpy array; anything else unchanged."""
    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach().cpu()
    return (x.double() if x.dtype == torch.bfloat16 else x).numpy()  # numpy has no bfloat16


def as_array(name: str, got, *, hint: str = "") -> np.ndarray:
    """The learner's answer as a float64 array; a readable failure for None, something not numeric, or
    complex numbers (whose imaginary part a conversion to float64 would silently drop)."""
    require_result(name, got, hint=hint)
    try:
        raw = np.asarray(to_numpy(got))
        if np.iscomplexobj(raw):
            raise CheckFailure(f"{name} is complex ({raw.dtype}); the answer is real numbers: turn a complex "
                               f"intermediate back into real ones (torch.view_as_real), its imaginary part "
                               f"is not ignored{_hint(hint)}")
        return np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise CheckFailure(f"{name} should be an array of numbers; got {type(got).__name__}{_hint(hint)}") from None


def as_tensor(name: str, got) -> torch.Tensor:
    """The learner's answer, which must be a torch.Tensor; a readable failure for None or anything else."""
    require_result(name, got)
    if not isinstance(got, torch.Tensor):
        raise CheckFailure(f"{name} should be a torch.Tensor; got {type(got).__name__}")
    return got


def as_number(name: str, got, *, hint: str = "") -> float:
    """One real number from a learner's answer: an int, a float, or a tensor or array of one element (not a bool)."""
    if isinstance(got, torch.Tensor | np.ndarray):
        if np.prod(got.shape, dtype=int) != 1:
            raise CheckFailure(f"{name} should be one number; got a {type(got).__name__} of shape "
                               f"{tuple(got.shape)}{_hint(hint)}")
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, numbers.Real):
        raise CheckFailure(f"{name} should be one number; got {type(got).__name__}{_hint(hint)}")
    return float(got)


def unpack(result, count: int, expected: str, *, case: str = "") -> tuple:
    """The learner's tuple (or list) of `count` results; `expected` says what to return, e.g.
    "return a tuple (dq, dk, dv) of three arrays", and `case` on which inputs."""
    if not isinstance(result, tuple | list) or len(result) != count:
        length = f" of length {len(result)}" if isinstance(result, tuple | list) else ""
        raise CheckFailure(f"{expected}; got {type(result).__name__}{length}" + (f" ({case})" if case else ""))
    return tuple(result)


def is_close(got, expected, *, atol: float = ATOL, rtol: float = RTOL) -> bool:
    """Does `got` have the shape and (within atol/rtol) the values of `expected`? False for non-numbers
    and complex numbers."""
    try:
        got = np.asarray(to_numpy(got))
        if np.iscomplexobj(got):
            return False
        got = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    expected = np.asarray(to_numpy(expected), dtype=np.float64)
    return got.shape == expected.shape and bool(np.allclose(got, expected, atol=atol, rtol=rtol))


def diagnose(got, mistakes: Mapping[str, object]) -> str | None:
    """The message of the first planted mistake whose result `got` equals (within the default
    tolerances), or None. A mistake's result may be None where it cannot be computed on these inputs."""
    for message, wrong in mistakes.items():
        if wrong is not None and is_close(got, wrong):
            return message
    return None


def compare(name: str, got, expected, *, atol: float = ATOL, rtol: float = RTOL, hint: str = "") -> None:
    """Raise CheckFailure describing the first way `got` differs from `expected`."""
    suffix = _hint(hint)
    try:
        dtype = np.asarray(to_numpy(got)).dtype  # before the float64 conversion: was it computed in float32?
    except (TypeError, ValueError):
        dtype = None
    got = as_array(name, got, hint=hint)
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
            f"error {err:.3g}).{_too_few_digits(dtype, rtol, err, expected)}{suffix}"
        )


def _too_few_digits(dtype, rtol: float, err: float, expected: np.ndarray) -> str:
    """A note when the answer's dtype (float32, float16) cannot hold the digits that `rtol` asks for
    and its rounding alone could explain the error."""
    if dtype is None or not np.issubdtype(dtype, np.floating) or np.finfo(dtype).eps <= rtol:
        return ""
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(float(finite.max()) if finite.size else 1.0, 1.0)
    if err > 100 * float(np.finfo(dtype).eps) * scale:
        return ""  # a real mistake, not rounding
    return (f" Your answer is {dtype}, which keeps about {np.finfo(dtype).precision} significant digits: "
            f"compute in float64, like the inputs.")


def multiple_choice(answer, key: tuple[tuple[str, Mapping[str, str]], ...], *, letters: str = "abc") -> None:
    """Check a learner's letters against `key`, one (right letter, {wrong letter: why not}) per question.

    `answer` may be a string ("bca", "b, c, a") or a tuple/list of letters, in the order the questions
    were asked. Raises CheckFailure naming the first wrong question and why its answer is wrong.
    """
    require_result("your answers", answer)
    if isinstance(answer, str):
        answer = tuple(answer.replace(",", "").replace(" ", ""))
    if not isinstance(answer, tuple | list) or len(answer) != len(key):
        raise CheckFailure(f"return {len(key)} letters, e.g. '{letters[:1] * len(key)}'; got {answer!r}")
    for number, (given, (right, why_not)) in enumerate(zip(answer, key, strict=True), start=1):
        letter = str(given).strip().lower()
        if letter not in letters:
            raise CheckFailure(f"question {number}: answer with one of {', '.join(letters)}; got {given!r}")
        if letter != right:
            raise CheckFailure(f"question {number}: '{letter}' is not it: {why_not.get(letter, 'reread the section')}.")

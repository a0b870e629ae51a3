"""Small helpers shared by several test modules (importable because pytest puts tests/ on sys.path)."""

from collections.abc import Callable

import numpy as np
import pytest


def assert_clear_error(call: Callable[[], object], exc: type[Exception], words: list[str]) -> None:
    """call() must raise `exc` whose message contains every one of `words` (argument names, shapes, dtypes)."""
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), f"message {str(info.value)!r} should mention {word!r}"


def central_difference(f: Callable[[], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d f / d x entry by entry, (f(x + h) - f(x - h)) / 2h, perturbing x in place and restoring it."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        up = f()
        x[i] = old - h
        down = f()
        x[i] = old
        grad[i] = (up - down) / (2 * h)
    return grad

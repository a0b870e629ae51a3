"""Input validation shared by the numpy reference, the torch functions and the modules.

Every public function checks its arguments here *before* any arithmetic, so a learner
sees a message naming the argument, what was expected and what came, instead of a
broadcasting error (or worse, a silently wrong broadcast) deep inside a matmul.
The checks work on plain shapes, so numpy arrays and torch tensors share them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

Shape = tuple[int, ...]


def shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def broadcast_shapes(*shapes: Shape) -> Shape | None:
    """numpy-style broadcast of shapes, or None when they do not broadcast."""
    ndim = max(len(s) for s in shapes)
    out = []
    for axis in range(-ndim, 0):
        sizes = {s[axis] for s in shapes if len(s) >= -axis} - {1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def check_qkv_shapes(q: Shape, k: Shape, v: Shape) -> Shape:
    """Check q (..., T, d), k (..., S, d), v (..., S, d_v); return the score shape (..., T, S)."""
    for name, shape, what in (("q", q, "(..., T, d)"), ("k", k, "(..., S, d)"), ("v", v, "(..., S, d_v)")):
        if len(shape) < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions {what}; got shape {shape_str(shape)} "
                f"with {len(shape)} dimension(s)"
            )
    if q[-1] == 0:
        raise ValueError(f"q and k must have at least one feature (d >= 1) to take dot products; got q {shape_str(q)}")
    if q[-1] != k[-1]:
        raise ValueError(
            f"q and k must have the same feature size d (last dimension) to take dot products; "
            f"got q {shape_str(q)} with d={q[-1]} and k {shape_str(k)} with d={k[-1]}"
        )
    if k[-2] != v[-2]:
        raise ValueError(
            f"k and v must have the same length S (second-to-last dimension): one value per key; "
            f"got k {shape_str(k)} with S={k[-2]} and v {shape_str(v)} with S={v[-2]}"
        )
    batch = broadcast_shapes(q[:-2], k[:-2], v[:-2])
    if batch is None:
        raise ValueError(
            f"the leading (batch) dimensions of q, k and v must broadcast; got q {shape_str(q)}, "
            f"k {shape_str(k)}, v {shape_str(v)}"
        )
    return (*batch, q[-2], k[-2])


def check_mask_shape(mask: Shape, scores: Shape, name: str = "mask") -> None:
    """A mask must broadcast to the score shape (..., T, S) without changing it.

    Refusing masks that would *enlarge* the result stops the classic silent bug where a
    (B, T, S) mask meant for a batch broadcasts against the head axis instead.
    """
    if len(mask) > len(scores) or broadcast_shapes(mask, scores) != tuple(scores):
        raise ValueError(
            f"{name} of shape {shape_str(mask)} cannot broadcast to the attention scores of shape "
            f"{shape_str(scores)} (..., T, S); each of its dimensions must equal the score's or be 1, "
            f"e.g. (T, S) = {shape_str(scores[-2:])} or (B, 1, 1, S) for padding"
        )


def _check_int(name: str, value: object, lowest: int, expected: str) -> int:
    """The one integer check: `value` as a Python int >= lowest, or an error naming `name`.

    Python and numpy integers pass; a bool (an int to Python, never meant as a size) and anything
    else that is not an integer (str, float, tensor, even 3.0) is a TypeError, an integer below
    `lowest` a ValueError.
    """
    if type(value) is int and value >= lowest:  # the common case first: decoding checks an offset per token
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}; got {value!r} ({type(value).__name__})")
    if value < lowest:
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return int(value)


def check_positive_int(name: str, value: object) -> int:
    """An integer >= 1 (Python or numpy; not a bool), returned as a Python int."""
    return _check_int(name, value, 1, "a positive int")


def check_nonnegative_int(name: str, value: object, meaning: str = "") -> int:
    """An integer >= 0 (Python or numpy; not a bool), e.g. a position offset or a count that may be zero,
    returned as a Python int; `meaning` says what the number is, in the message."""
    return _check_int(name, value, 0, f"an int >= 0{meaning}")


def check_positive_number(name: str, value: object, *, above: float = 0.0) -> float:
    """A finite real number > `above` (Python or numpy int or float; not a bool), returned as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number > {above:g}; got {value!r} ({type(value).__name__})")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not (math.isfinite(number) and number > above):
        raise ValueError(f"{name} must be a finite number > {above:g}; got {value!r}")
    return number


def check_bool(name: str, value: object) -> bool:
    """A real bool: a string such as "False" is truthy, so it is refused rather than guessed at."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False); got {value!r} ({type(value).__name__})")
    return value


def check_probability(name: str, value: object) -> float:
    """A number in [0, 1) (Python or numpy; not a bool), e.g. a dropout rate, returned as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1); got {value!r} ({type(value).__name__})")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1); got {value!r}")
    return float(value)


def autocast_on(device_type: str) -> bool:
    """Is autocast enabled for this device type? False for types without autocast (e.g. "meta")."""
    import torch  # the shape checks above work without torch; only this one needs it

    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)

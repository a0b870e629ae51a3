"""Checkers for notebook 13 (attention across devices).

- check_tp_cross_bytes: the bytes one rank sends per step of tensor-parallel cross-attention;
- check_merge_many: R partial attention results merged in one go by their log-sum-exps;
- check_zigzag_positions: a causal load-balanced split of a sequence across ranks.
On a wrong answer each checker tries the classic mistakes to say which one was made.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from course_lib.checks._core import CheckFailure, as_array, as_number, call, checker, compare, diagnose, unpack
from course_lib.parallel.distributed import ring_allreduce_bytes
from course_lib.parallel.ring_attention import SequenceLayout, block_attention, causal_work, merge_partials
from course_lib.parallel.tensor_parallel import tp_bytes_per_step

__all__ = ["check_tp_cross_bytes", "check_merge_many", "check_zigzag_positions"]


# ----------------------------------------------------------------------------- bytes of tensor parallelism
@checker
def check_tp_cross_bytes(fn):
    """Check the bytes one rank sends in a step of tensor-parallel cross-attention.

    Your function: `fn(B, T, S, d_model, R, element_size) -> (forward_bytes, backward_bytes)`: queries
    (B, T, d_model) attend to a memory (B, S, d_model) used as key and value, heads split over R
    ranks, every all-reduce a ring all-reduce. Checks several shapes; names a backward pass that
    forgets the memory's gradient, the memory counted with T, a missing factor 2 or (R - 1) / R, and
    forgotten element sizes.
    """
    cases = [(2, 5, 9, 16, 2, 4), (1, 128, 512, 1024, 4, 2), (3, 7, 7, 64, 8, 4), (1, 4096, 1024, 4096, 8, 2)]
    for B, T, S, D, R, size in cases:
        what = f"B={B}, T={T}, S={S}, d_model={D}, R={R}, element_size={size}"
        got = unpack(call(fn, B, T, S, D, R, size, what=f"; {what}"), 2,
                     "return a tuple (forward_bytes, backward_bytes)", case=what)
        fwd, bwd = (as_number(f"{name} bytes ({what})", g)
                    for g, name in zip(got, ("forward", "backward"), strict=True))
        expected = tp_bytes_per_step(B, T, S, D, R, size, self_attention=False)
        if fwd == expected["forward"] and bwd == expected["backward"]:
            continue
        one = ring_allreduce_bytes(B * T * D, R, size)
        mistakes = {
            "the backward pass also all-reduces the gradient of the memory (B, S, d_model): it went to every "
            "rank through f like the queries, so its partial gradients must be summed too": (one, one),
            "the memory has S positions, not T: its gradient is B * S * d_model numbers":
                (one, 2 * one),
            "a ring all-reduce sends 2 (R - 1) / R of the tensor per rank (reduce-scatter, then all-gather); "
            "you counted one of the two halves": (one / 2, (one + ring_allreduce_bytes(B * S * D, R, size)) / 2),
            "each rank sends 2 (R - 1) / R of the tensor, not 2 N: the chunks are N / R each":
                (2 * B * T * D * size, 2 * (B * T * D + B * S * D) * size),
            "count bytes, not numbers: multiply by element_size":
                (one / size, (one + ring_allreduce_bytes(B * S * D, R, size)) / size),
        }
        for message, (m_fwd, m_bwd) in mistakes.items():
            if math.isclose(fwd, m_fwd) and math.isclose(bwd, m_bwd):
                raise CheckFailure(f"{what}: got ({fwd:.0f}, {bwd:.0f}). {message}")
        raise CheckFailure(f"{what}: got ({fwd:.0f}, {bwd:.0f}), expected ({expected['forward']}, "
                           f"{expected['backward']}). Hint: one all-reduce of B T d_model forward; backward one "
                           f"for the queries' gradient and one for the memory's")
    return f"{len(cases)} shapes: forward and backward bytes match"


# ----------------------------------------------------------------------------- merging R partials
def _partials(seed: int, R: int, T: int = 5, d: int = 3, masked_rows: tuple[int, ...] = (),
              scale: float = 1.0):
    """R partial results over disjoint key blocks, and the attention over all keys (the answer)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, d, generator=gen, dtype=torch.float64) * scale
    blocks = [(torch.randn(2 + i, d, generator=gen, dtype=torch.float64) * scale,
               torch.randn(2 + i, d, generator=gen, dtype=torch.float64)) for i in range(R)]
    outs, lses = [], []
    for k, v in blocks:
        mask = torch.ones(T, k.shape[0], dtype=torch.bool)
        mask[list(masked_rows)] = False
        o, l = block_attention(q, k, v, mask)
        outs.append(o)
        lses.append(l)
    out, lse = outs[0], lses[0]
    for o, l in zip(outs[1:], lses[1:], strict=True):
        out, lse = merge_partials(out, lse, o, l)
    return outs, lses, out, lse


@checker
def check_merge_many(fn):
    """Check merging R partial attention results in one step.

    Your function: `fn(outs, lses) -> (out, lse)`: outs a list of R tensors (T, d_v), each normalised
    over its own block of keys, lses the list of their (T,) log-sum-exps (-inf for a row that saw no
    key); returns the output over all the keys (T, d_v) and its log-sum-exp (T,). Checks 1, 2 and 4
    partials, scores large enough to overflow exp, and rows that saw no key at all; names a plain
    average, weights that overflow, NaN rows, and an lse that is a max instead of a log-sum-exp.
    """
    cases = [
        ("2 partials", _partials(0, 2)),
        ("4 partials", _partials(1, 4)),
        ("1 partial (nothing to merge)", _partials(2, 1)),
        ("4 partials with scores near 1000 (exp overflows)", _partials(3, 4, scale=25.0)),
        ("3 partials, rows 1 and 3 saw no key in any block", _partials(4, 3, masked_rows=(1, 3))),
    ]
    for what, (outs, lses, out, lse) in cases:
        got = unpack(call(fn, [o.clone() for o in outs], [l.clone() for l in lses], what=f"; {what}"), 2,
                     "return a tuple (out, lse)", case=what)
        got_out = as_array(f"out ({what})", got[0])
        finite = np.isfinite(lse.numpy())  # rows that saw at least one key
        stacked = torch.stack(lses)  # (R, T)
        message = diagnose(got_out, {
            "out is the plain average of the partial outputs: weight each by its share of the keys' total, "
            "exp(lse_i - lse) with lse = logsumexp of the lse_i": torch.stack(outs).mean(0) if len(outs) > 1 else None,
        })
        if message:
            raise CheckFailure(f"{what}: {message}")
        bad = ~np.isfinite(got_out)
        if bad.any() and bad.shape[:1] == finite.shape and bad[~finite].any():
            raise CheckFailure(f"{what}: out is NaN in rows that saw no key (every lse_i = -inf): exp(-inf - (-inf)) "
                               f"is NaN. Subtract 0 instead of -inf in those rows, so that their output is 0")
        if bad.any():
            raise CheckFailure(f"{what}: out is not finite. exp(lse_i) overflows for large scores: subtract the "
                               f"merged lse (or the largest lse_i) before exponentiating")
        compare(f"out ({what})", got_out, out.numpy(), hint="out = sum_i exp(lse_i - lse) * out_i")
        got_lse = as_array(f"lse ({what})", got[1])
        if got_lse.shape == lse.shape and np.allclose(got_lse[finite], stacked.amax(0).numpy()[finite]) and \
                len(outs) > 1:
            raise CheckFailure(f"{what}: lse is the max of the lse_i; it must be their log-sum-exp "
                               f"(torch.logsumexp(torch.stack(lses), 0)), the log of the sum of the normalisers")
        compare(f"lse ({what})", got_lse, lse.numpy(), hint="lse = log(sum_i exp(lse_i)), -inf where every lse_i is")
    return f"{len(cases)} cases: out and lse match merging the blocks one by one"


# ----------------------------------------------------------------------------- a balanced causal split
def _integer(p: object) -> int | None:
    """p as a Python int if it is an integer (Python, numpy, or a 0-d integer tensor/array); else None.

    int() would also take 2.5 (to 2), "3" and True: a position is an index, and those are not indices.
    """
    if isinstance(p, torch.Tensor | np.ndarray) and p.ndim == 0:
        integral = (p.dtype != torch.bool and not p.is_floating_point() and not p.is_complex()
                    if isinstance(p, torch.Tensor) else np.issubdtype(p.dtype, np.integer))
        return int(p.item()) if integral else None
    if isinstance(p, bool) or not isinstance(p, numbers.Integral):
        return None
    return int(p)


def _positions(what: str, rank: int, entry: object) -> list[int]:
    """Rank `rank`'s entry as a list of Python ints, or a CheckFailure saying what it is instead."""
    if isinstance(entry, torch.Tensor | np.ndarray):
        entry = entry.tolist() if entry.ndim == 1 else entry
    if not isinstance(entry, list | tuple | range):
        raise CheckFailure(f"{what}: each rank's entry must be a list of integer positions; rank {rank}'s is a "
                           f"{type(entry).__name__}")
    positions = []
    for p in entry:
        value = _integer(p)
        if value is None:
            raise CheckFailure(f"{what}: positions are token indices, integers; rank {rank} has {p!r} "
                               f"({type(p).__name__}). Hint: keep the integer tensor torch.arange(T) gives")
        positions.append(value)
    return positions


@checker
def check_zigzag_positions(fn):
    """Check a split of a sequence that gives every rank the same causal work.

    Your function: `fn(T, R) -> list of R lists of positions`: rank r gets pieces r and 2R - 1 - r of
    the sequence 0 ... T - 1 cut into 2R consecutive pieces (sizes as torch.tensor_split gives them),
    each rank's positions in increasing order. Checks lengths that 2R divides and lengths it does
    not; names a contiguous split, the wrong partner piece, positions lost or repeated, and unsorted
    positions, and reports the causal work per rank of your split.
    """
    for T, R in ((16, 2), (32, 4), (13, 2), (30, 4), (7, 3)):
        what = f"T={T}, R={R}"
        got = call(fn, T, R, what=f"; {what}")
        if isinstance(got, torch.Tensor | np.ndarray) or not isinstance(got, list | tuple) or len(got) != R:
            raise CheckFailure(f"{what}: return a list of {R} lists of positions (one per rank); got "
                               f"{type(got).__name__}")
        ranks = [_positions(what, rank, entry) for rank, entry in enumerate(got)]
        flat = sorted(p for r in ranks for p in r)
        if flat != list(range(T)):
            lost = sorted(set(range(T)) - set(flat))
            repeated = sorted({p for p in flat if flat.count(p) > 1})
            raise CheckFailure(f"{what}: every position 0 ... {T - 1} must go to exactly one rank; lost {lost[:8]}, "
                               f"repeated {repeated[:8]}. Hint: cut torch.arange(T) with tensor_split(2 * R)")
        if any(r != sorted(r) for r in ranks):
            raise CheckFailure(f"{what}: each rank's positions must be in increasing order (piece r, then piece "
                               f"2R - 1 - r)")
        expected = [p.tolist() for p in SequenceLayout.make(T, R, "zigzag").positions]
        if ranks == expected:
            continue
        work = causal_work(SequenceLayout(tuple(torch.tensor(r, dtype=torch.long) for r in ranks)))
        pieces = torch.arange(T).tensor_split(2 * R)
        contiguous = [p.tolist() for p in torch.arange(T).tensor_split(R)]
        partner = [sorted(pieces[r].tolist() + pieces[r + R].tolist()) for r in range(R)]
        if ranks == contiguous:
            message = ("this is the contiguous split: rank 0's queries see only early keys, the last rank's see "
                       "all of them")
        elif ranks == partner:
            message = "pair piece r with piece 2R - 1 - r (the mirror image), not with piece r + R"
        else:
            message = f"expected {expected}"
        raise CheckFailure(f"{what}: causal work per rank {work} (balanced would be "
                           f"{causal_work(SequenceLayout.make(T, R, 'zigzag'))}). {message}")
    return "5 lengths, divisible by 2R or not: the pieces and the balance match"

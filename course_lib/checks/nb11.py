"""Checkers for notebook 11 (capstone): teacher-forcing targets, a word-level edit distance for classifying
translation errors, batched greedy decoding, and beam search with a length penalty."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from course_lib.checks._core import CheckFailure, as_number, call, checker

__all__ = ["check_shift_targets", "check_edit_distance", "check_greedy_decode", "check_beam_search"]


@checker
def check_shift_targets(fn):
    """Check the teacher-forcing inputs and targets of a decoder.

    Your function: `fn(target_ids, bos_id, eos_id) -> (decoder_input, decoder_target)`, with
    target_ids a list of ints; decoder_input = [bos_id, *target_ids] and
    decoder_target = [*target_ids, eos_id], as sequences of ints. Checks four cases, one empty;
    names swapped input and target.
    """
    cases = [([7, 8, 9], 1, 2), ([5], 1, 2), ([], 1, 2), ([10, 11, 12, 13], 3, 4)]
    for ids, bos, eos in cases:
        result = call(fn, list(ids), bos, eos, what=f" (target_ids={ids}, bos_id={bos}, eos_id={eos})")
        if not isinstance(result, tuple) or len(result) != 2:
            raise CheckFailure(f"return a pair (decoder_input, decoder_target); got {type(result).__name__}")
        got_in, got_out = (list(map(int, x)) for x in result)
        want_in, want_out = [bos, *ids], [*ids, eos]
        if (got_in, got_out) == (want_out, want_in):
            raise CheckFailure("input and target are swapped: the decoder READS <bos> + target and must PREDICT "
                               "target + <eos>")
        if got_in != want_in:
            raise CheckFailure(f"for target {ids}: decoder_input should be {want_in}, got {got_in}. Hint: the input "
                               f"starts with <bos> and does not contain <eos> (nothing is predicted after <eos>)")
        if got_out != want_out:
            raise CheckFailure(f"for target {ids}: decoder_target should be {want_out}, got {got_out}. Hint: the "
                               f"target is the input shifted left by one: position t predicts token t + 1, and "
                               f"the last prediction is <eos>")
    return f"{len(cases)} cases incl. an empty target"


def _rows_until_eos(ids: torch.Tensor, eos: int) -> list[list[int]]:
    rows = []
    for row in ids.tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@functools.cache
def _capstone_problem(max_new_tokens: int):
    """The default problem, made once per process: (capstone model, src (8, S) of test sentences, its greedy
    decoding (8, L)). Safe to share: the learner's function only ever receives private copies (`call`)."""
    from course_lib.experiments.capstone import encode_pairs, load_capstone
    from course_lib.experiments.toy_translation import load_split
    from course_lib.experiments.training import collate_pairs

    model, src_vocab, tgt_vocab, _ = load_capstone()
    src, _, _ = collate_pairs(encode_pairs(load_split("test")[:8], src_vocab, tgt_vocab))
    return model, src, model.greedy_decode(src, max_new_tokens=max_new_tokens)


@checker
def check_greedy_decode(fn, model=None, src=None):
    """Check batched greedy decoding with the KV cache.

    Your function: `fn(model, src, max_new_tokens) -> ids`, with model a course_lib Seq2SeqTransformer and
    src (B, S) source ids; ids is a (B, L) tensor of generated tokens without <bos>, <pad> after each
    row's <eos>. By default it decodes 8 test sentences with the capstone model (pass `model` and
    `src` to use others) and compares with the model's own greedy_decode; names a leading <bos>, a
    first differing step, and tokens after <eos>.
    """
    max_new = 16
    if model is None:
        model, src, expected = _capstone_problem(max_new)
    else:
        expected = model.greedy_decode(src, max_new_tokens=max_new)  # (B, L)
    c = model.config
    got = call(fn, model, src, max_new, what=f" (max_new_tokens={max_new})")
    if not isinstance(got, torch.Tensor) or got.ndim != 2 or got.shape[0] != src.shape[0]:
        shape = tuple(got.shape) if hasattr(got, "shape") else type(got).__name__
        raise CheckFailure(f"return a (B, L) tensor of token ids with B={src.shape[0]}; got {shape}")
    if got.shape[1] > 0 and torch.all(got[:, 0] == c.bos_id):
        raise CheckFailure("every row starts with <bos>: return only the generated tokens (drop the <bos> "
                           "you started from, e.g. generated[:, 1:])")
    want_rows, got_rows = _rows_until_eos(expected, c.eos_id), _rows_until_eos(got, c.eos_id)
    for b, (want, have) in enumerate(zip(want_rows, got_rows, strict=True)):
        if have != want:
            pairs = enumerate(zip(have, want, strict=False))
            first = next((i for i, (x, y) in pairs if x != y), min(len(have), len(want)))
            raise CheckFailure(f"row {b} differs from greedy decoding at step {first}: got {have[: first + 1]}, "
                               f"expected {want[: first + 1]}. Hint: at each step feed the token just chosen "
                               f"(argmax of the LAST position's logits) back in - with a cache only that one "
                               f"token, whose position is the number of tokens already cached")
        tail = got[b, len(have):]
        if torch.any(tail != c.pad_id):
            raise CheckFailure(f"row {b} has tokens {tail.tolist()} after its <eos>: once a row has produced "
                               f"<eos>, fill its later positions with <pad> ({c.pad_id}); stop when all rows are done")
    return f"{len(want_rows)} sentences decoded exactly like course_lib's greedy_decode"


# ----------------------------------------------------------------------------- word-level edit distance
def _edit_distance(a: list, b: list) -> int:
    previous = list(range(len(b) + 1))  # distance from a[:0] to b[:j]
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


_EDIT_CASES = [
    ("la rega veka silenta granda ga las dosentas o voka", "la rega silenta granda ga las dosentas o voka"),
    ("lo kano roso ga una mika o mira", "lo kano roso ga una mika o mira"),
    ("lo kano roso ga una mika o mira", "lo kano ga una mika pikola o mira"),
    ("los ninos ga la ekva o ne ven", "los ninos ga la ekva o ven ne"),
    ("un nino ga unas vulpas o ama", "un nino silento ga unas vulpas o ama"),
    ("", "una rega ga lo amiko o trova"),
]


@checker
def check_edit_distance(fn):
    """Check a word-level edit distance between a reference translation and a prediction.

    Your function: `fn(reference, prediction) -> int`, two strings of space-separated words; the least number of
    single-word deletions, insertions and substitutions that turn the reference into the prediction. Checks six
    pairs (a dropped word, equal sentences, a word moved, an inserted word, an empty reference); names comparing
    position by position, counting characters instead of words, and the length difference alone.
    """
    for reference, prediction in _EDIT_CASES:
        case = f"reference {reference!r}, prediction {prediction!r}"
        got = call(fn, reference, prediction, what=f" ({case})")
        if got is None:
            raise CheckFailure("your function returned None: did you forget to `return` the distance?")
        value = as_number(f"the distance for {case}", got)
        ref, pred = reference.split(), prediction.split()
        expected = _edit_distance(ref, pred)
        if value == expected:
            continue
        positional = sum(x != y for x, y in zip(ref, pred, strict=False)) + abs(len(ref) - len(pred))
        mistakes: dict[float, str] = {
            positional: "you compared the words position by position: one dropped word shifts every later word, "
                        "so they all count as different. An edit distance aligns the two sentences (dynamic "
                        "programming over prefixes)",
            _edit_distance(list(reference), list(prediction)): "you counted CHARACTERS; split the sentences into "
                                                                "words first (str.split())",
            abs(len(ref) - len(pred)): "the length difference counts only the words missing or added, not the "
                                       "words that differ",
        }
        why = mistakes.get(value)
        raise CheckFailure(f"for {case}: you gave {got}, expected {expected}" + (f": {why}." if why else ". Hint: "
                           "d[i][j] = min(d[i-1][j] + 1, d[i][j-1] + 1, d[i-1][j-1] + (ref[i-1] != pred[j-1]))"))
    return f"{len(_EDIT_CASES)} pairs: deletions, insertions, substitutions and a moved word counted right"


# ----------------------------------------------------------------------------- beam search with a length penalty
def _toy_model(seed: int, vocab: int, eos_id: int, eos_bias: float) -> Callable:
    """A deterministic 'language model': log-probabilities of the next token given the prefix (a tuple)."""
    def next_log_probs(prefix: tuple) -> np.ndarray:
        logits = np.random.default_rng([seed, len(prefix), *prefix]).standard_normal(vocab) * 2.0
        logits[eos_id] += eos_bias * (len(prefix) - 1.5)  # eos unlikely at first, likelier with length
        return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    return next_log_probs


def _beam(next_log_probs, eos_id, beam_size, max_len, alpha, *, expand_finished=False, penalise=True,
          alpha_one=False):
    beam: list[tuple[tuple[int, ...], float]] = [((), 0.0)]  # (prefix, log-probability)
    finished: list[tuple[tuple[int, ...], float]] = []
    for _ in range(max_len):
        candidates = []
        for prefix, score in beam:
            log_probs = next_log_probs(prefix)
            candidates += [((*prefix, token), score + float(lp)) for token, lp in enumerate(log_probs)]
        candidates.sort(key=lambda c: -c[1])
        beam = []
        for prefix, score in candidates[:beam_size]:
            if prefix[-1] == eos_id and not expand_finished:
                finished.append((prefix, score))
            else:
                beam.append((prefix, score))
        if not beam:
            break
    finished += beam  # hypotheses still open after max_len tokens

    def final(c):
        if not penalise:
            return c[1]
        return c[1] / len(c[0]) ** (1.0 if alpha_one else alpha)
    best = max(finished, key=final)
    return list(best[0])


# (seed, V, eos_id, beam_size, max_len, eos_bias, alpha): chosen so that each named mistake changes the answer
# (the first case: the right answer and the four mistakes' answers are all different)
_BEAM_CASES = [(10, 7, 2, 4, 10, 0.5, 0.3), (72, 6, 1, 3, 8, 0.4, 0.5), (16, 5, 2, 3, 8, 0.3, 0.4),
               (5, 6, 1, 2, 8, 0.8, 1.0), (8, 5, 2, 1, 6, 0.7, 0.7)]


@checker
def check_beam_search(fn):
    """Check beam search with a length penalty on a toy language model.

    Your function: `fn(next_log_probs, eos_id, beam_size, max_len, alpha) -> tokens`, a list of ints. next_log_probs
    (prefix tuple) gives the log-probabilities (V,) of the next token. Start from the empty prefix; at each of at
    most max_len steps extend every open hypothesis by every token, keep the beam_size best by summed log-
    probability; a kept hypothesis that ends in eos_id is finished (never extended again); stop when none is open.
    Open hypotheses left after max_len steps count as finished. Return the finished hypothesis with the highest
    score / len(tokens) ** alpha (eos included). Checks five toy models; names the usual mistakes.
    """
    for seed, vocab, eos_id, beam_size, max_len, eos_bias, alpha in _BEAM_CASES:
        model = _toy_model(seed, vocab, eos_id, eos_bias)
        case = f"toy model {seed} (V={vocab}, eos_id={eos_id}), beam_size={beam_size}, max_len={max_len}, alpha={alpha}"
        got = call(fn, model, eos_id, beam_size, max_len, alpha, what=f" ({case})")
        if got is None:
            raise CheckFailure("your function returned None: did you forget to `return` the tokens?")
        try:
            tokens = [int(t) for t in got]
        except (TypeError, ValueError):
            raise CheckFailure(f"return the best hypothesis as a list of ints; got {type(got).__name__}") from None
        expected = _beam(model, eos_id, beam_size, max_len, alpha)
        if tokens == expected:
            continue
        mistakes = [
            ("you chose the final hypothesis by its summed log-probability: without the length penalty short "
             "hypotheses win, since every token adds a negative log-probability. Divide by len ** alpha",
             _beam(model, eos_id, beam_size, max_len, alpha, penalise=False)),
            ("you divided by the length itself; the penalty is len ** alpha (alpha = 1 only when asked)",
             _beam(model, eos_id, beam_size, max_len, alpha, alpha_one=True)),
            ("you kept extending hypotheses that already ended in <eos>: once finished, a hypothesis leaves the beam",
             _beam(model, eos_id, beam_size, max_len, alpha, expand_finished=True)),
            ("that is greedy decoding: keep beam_size hypotheses at every step, not only the best one",
             _beam(model, eos_id, 1, max_len, alpha)),
        ]
        why = next((m for m, w in mistakes if w == tokens and w != expected), None)
        raise CheckFailure(f"for {case}: you returned {tokens}, expected {expected}" + (f": {why}." if why else
                           ". Hint: rank by summed log-probability while searching; apply the penalty only to "
                           "choose among the finished hypotheses"))
    return f"{len(_BEAM_CASES)} toy models: the same hypothesis as beam search with a length penalty"

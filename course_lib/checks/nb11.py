"""Checkers for notebook 11 (capstone): teacher-forcing targets and batched greedy decoding."""

from __future__ import annotations

import torch

from course_lib.checks._core import CheckFailure, call, checker

__all__ = ["check_shift_targets", "check_greedy_decode"]


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


@checker
def check_greedy_decode(fn, model=None, src=None):
    """Check batched greedy decoding with the KV cache.

    Your function: `fn(model, src, max_new_tokens) -> ids`, with model a course_lib Seq2SeqTransformer and
    src (B, S) source ids; ids is a (B, L) tensor of generated tokens without <bos>, <pad> after each
    row's <eos>. By default it decodes 8 test sentences with the capstone model (pass `model` and
    `src` to use others) and compares with the model's own greedy_decode; names a leading <bos>, a
    first differing step, and tokens after <eos>.
    """
    if model is None:
        from course_lib.capstone import encode_pairs, load_capstone
        from course_lib.toy_translation import load_split
        from course_lib.training import collate_pairs

        model, src_vocab, tgt_vocab, _ = load_capstone()
        pairs = load_split("test")[:8]
        src, _, _ = collate_pairs(encode_pairs(pairs, src_vocab, tgt_vocab))
    c = model.config
    max_new = 16
    expected = model.greedy_decode(src, max_new_tokens=max_new)  # (B, L)
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

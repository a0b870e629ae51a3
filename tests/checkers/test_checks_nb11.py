"""The notebook-11 checkers pass the reference and catch planted mistakes with a useful message."""

import pytest
import torch

from course_lib import checks
from course_lib.seq2seq import greedy_decode


def shift_reference(ids, bos_id, eos_id):
    return [bos_id, *ids], [*ids, eos_id]


def test_shift_targets_checker():
    assert checks.check_shift_targets(shift_reference).passed
    r = checks.check_shift_targets(lambda ids, b, e: ([*ids, e], [b, *ids]))
    assert not r.passed and "swapped" in r.message
    r = checks.check_shift_targets(lambda ids, b, e: ([b, *ids, e], [b, *ids, e]))
    assert not r.passed and "does not contain <eos>" in r.message
    r = checks.check_shift_targets(lambda ids, b, e: ([b, *ids], list(ids)))
    assert not r.passed and "shifted left by one" in r.message


def greedy_reference(model, src, max_new_tokens):
    return greedy_decode(model, src, max_new_tokens=max_new_tokens)


def greedy_keeps_bos(model, src, max_new_tokens):
    out = greedy_decode(model, src, max_new_tokens=max_new_tokens)
    return torch.cat([torch.full((out.shape[0], 1), model.config.bos_id), out], dim=1)


@torch.no_grad()
def greedy_never_feeds_back(model, src, max_new_tokens):
    memory, mask = model.encode(src)
    bos = torch.full((src.shape[0], 1), model.config.bos_id)
    steps = [model.decode(bos, memory, mask)[:, -1].argmax(-1) for _ in range(max_new_tokens)]
    return torch.stack(steps, dim=1)


@torch.no_grad()
def greedy_no_padding_after_eos(model, src, max_new_tokens):
    memory, mask = model.encode(src)
    generated = torch.full((src.shape[0], 1), model.config.bos_id)
    for _ in range(max_new_tokens):
        nxt = model.decode(generated, memory, mask)[:, -1].argmax(-1)
        generated = torch.cat([generated, nxt[:, None]], dim=1)
    return generated[:, 1:]


def test_greedy_decode_checker():
    assert checks.check_greedy_decode(greedy_reference).passed
    r = checks.check_greedy_decode(greedy_keeps_bos)
    assert not r.passed and "drop the <bos>" in r.message
    r = checks.check_greedy_decode(greedy_never_feeds_back)
    assert not r.passed and "differs from greedy decoding at step 1" in r.message
    r = checks.check_greedy_decode(greedy_no_padding_after_eos)
    assert not r.passed and "after its <eos>" in r.message


# ----------------------------------------------------------------------------- word-level edit distance
def edit_reference(reference, prediction):
    a, b = reference.split(), prediction.split()
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def test_edit_distance_accepts_reference():
    result = checks.check_edit_distance(edit_reference)
    assert result.passed, result


def _positional(reference, prediction):
    a, b = reference.split(), prediction.split()
    return sum(x != y for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))


def _characters(reference, prediction):
    previous = list(range(len(prediction) + 1))  # the same recurrence over the strings' characters
    for i, x in enumerate(reference, start=1):
        current = [i]
        for j, y in enumerate(prediction, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


@pytest.mark.parametrize("wrong, words", [
    (_positional, "position by position"),
    (_characters, "CHARACTERS"),
    (lambda r, p: abs(len(r.split()) - len(p.split())), "length difference"),
    (lambda r, p: edit_reference(r, p) + 1, "Hint"),
    (lambda r, p: [edit_reference(r, p)], "one number"),
])
def test_edit_distance_rejects_planted_mistakes(wrong, words):
    result = checks.check_edit_distance(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- beam search with a length penalty
def beam_reference(next_log_probs, eos_id, beam_size, max_len, alpha, expand_finished=False, penalty=None,
                   greedy=False):
    beam, finished = [((), 0.0)], []
    for _ in range(max_len):
        candidates = [((*prefix, token), score + float(lp))
                      for prefix, score in beam for token, lp in enumerate(next_log_probs(prefix))]
        candidates.sort(key=lambda c: -c[1])
        beam = []
        for prefix, score in candidates[: 1 if greedy else beam_size]:
            (finished if prefix[-1] == eos_id and not expand_finished else beam).append((prefix, score))
        if not beam:
            break
    finished += beam
    exponent = alpha if penalty is None else penalty
    return list(max(finished, key=lambda c: c[1] / len(c[0]) ** exponent)[0])


def _beam_drops_eos(next_log_probs, eos_id, beam_size, max_len, alpha):
    return beam_reference(next_log_probs, eos_id, beam_size, max_len, alpha)[:-1]


def test_beam_search_accepts_reference():
    result = checks.check_beam_search(beam_reference)
    assert result.passed, result


@pytest.mark.parametrize("wrong, words", [
    (lambda f, e, b, m, a: beam_reference(f, e, b, m, a, penalty=0.0), "without the length penalty"),
    (lambda f, e, b, m, a: beam_reference(f, e, b, m, a, penalty=1.0), "divided by the length itself"),
    (lambda f, e, b, m, a: beam_reference(f, e, b, m, a, expand_finished=True), "kept extending"),
    (lambda f, e, b, m, a: beam_reference(f, e, b, m, a, greedy=True), "greedy decoding"),
    (_beam_drops_eos, "Hint"),
    (lambda f, e, b, m, a: "tokens", "list of ints"),
])
def test_beam_search_rejects_planted_mistakes(wrong, words):
    result = checks.check_beam_search(wrong)
    assert not result.passed and words in result.message, result.message


def test_greedy_decode_rejects_an_answer_that_changes_the_model_in_place():
    def zeroes_the_model(model, src, max_new_tokens):
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # its private copy of the model only: the checker's reference is untouched
        return model.greedy_decode(src, max_new_tokens=max_new_tokens)

    result = checks.check_greedy_decode(zeroes_the_model)
    assert not result.passed, result
    # the default problem is made once per process: an answer that zeroed its model left it as it was
    assert checks.check_greedy_decode(greedy_reference).passed


def test_shift_targets_rejects_an_answer_that_changes_its_list_in_place():
    def appends_eos_in_place(ids, bos_id, eos_id):
        ids.append(eos_id)  # its private copy only: the input then already ends in <eos>
        return [bos_id, *ids], [*ids, eos_id]

    result = checks.check_shift_targets(appends_eos_in_place)
    assert not result.passed and "decoder_input" in result.message, result.message

"""The notebook-11 checkers pass the reference and catch planted mistakes with a useful message."""

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

"""The checkers of notebook 14 accept the references and name the planted mistakes."""

import math

import pytest

from course_lib import checks
from course_lib.cost.kv_memory import padded_kv_slots


# ----------------------------------------------------------------------------- blocks of a batch
def blocks_needed(lengths, block_size):
    blocks = sum(math.ceil(n / block_size) for n in lengths)
    return blocks, blocks * block_size - sum(lengths)


def test_blocks_needed_reference_passes():
    assert checks.check_blocks_needed(blocks_needed).passed


@pytest.mark.parametrize(("wrong", "words"), [
    (lambda L, b: (sum(n // b for n in L), sum(n // b for n in L) * b - sum(L)), "rounded down"),
    (lambda L, b: (math.ceil(sum(L) / b), math.ceil(sum(L) / b) * b - sum(L)), "rounds up on its own"),
    (lambda L, b: (blocks_needed(L, b)[0], sum(b - n % b for n in L)), "(-L) mod block_size"),
    (lambda L, b: (blocks_needed(L, b)[0], padded_kv_slots(L)["wasted"]), "padded contiguous cache"),
    (lambda L, b: (blocks_needed(L, b)[0] + 1, 0), "expected"),
    (lambda L, b: 3, "return a tuple (blocks, wasted)"),
])
def test_blocks_needed_names_the_mistake(wrong, words):
    result = checks.check_blocks_needed(wrong)
    assert not result.passed and words in result.message, result.message


def test_blocks_needed_that_mutates_its_input_fails_without_raising():
    def sorts_in_place(lengths, block_size):
        lengths.sort()
        return blocks_needed(lengths, block_size)

    result = checks.check_blocks_needed(sorts_in_place)
    assert not result.passed and "changed its input `lengths`" in result.message


# ----------------------------------------------------------------------------- the block-table gather
def gather_kv(key_pool, block_table, length):
    H_kv, d = key_pool.shape[1], key_pool.shape[3]
    return key_pool[block_table].transpose(0, 1).reshape(H_kv, -1, d)[:, :length]


def test_gather_kv_reference_passes():
    assert checks.check_gather_kv(gather_kv).passed


@pytest.mark.parametrize(("wrong", "words"), [
    (lambda pool, table, n: gather_kv(pool, list(range(len(table))), n), "pool's order"),
    (lambda pool, table, n: pool[table].reshape(pool.shape[1], -1, pool.shape[3])[:, :n], "mixes heads"),
    (lambda pool, table, n: gather_kv(pool, table, len(table) * pool.shape[2]), "first `length` rows"),
    (lambda pool, table, n: gather_kv(pool, table, n) * 2, "differs from the reference"),
])
def test_gather_kv_names_the_mistake(wrong, words):
    result = checks.check_gather_kv(wrong)
    assert not result.passed and words in result.message, result.message


def test_gather_kv_that_mutates_its_input_fails_without_raising():
    def zeroes_the_pool(key_pool, block_table, length):
        out = gather_kv(key_pool, block_table, length).clone()
        key_pool.zero_()
        return out

    result = checks.check_gather_kv(zeroes_the_pool)
    assert not result.passed and "changed its input `key_pool`" in result.message


# ----------------------------------------------------------------------------- shared prompts
def shared_prefix_blocks(prompt_len, suffix_lengths, block_size):
    full, partial = divmod(prompt_len, block_size)
    blocks = full + (1 if partial else 0)  # the prompt, cached once
    for s in suffix_lengths:
        if s:  # a copy of the partial block (if any) and the request's own blocks after it
            blocks += math.ceil((prompt_len + s) / block_size) - full
    return blocks


def test_shared_prefix_blocks_reference_passes():
    assert checks.check_shared_prefix_blocks(shared_prefix_blocks).passed


def _no_copy(P, S, b):
    return math.ceil(P / b) + sum(math.ceil((P + s) / b) - math.ceil(P / b) for s in S)


def _unshared(P, S, b):
    return math.ceil(P / b) + sum(math.ceil((P + s) / b) for s in S)


@pytest.mark.parametrize(("wrong", "words"), [
    (_no_copy, "copy-on-write"),
    (_unshared, "without sharing"),
    (lambda P, S, b: math.ceil(P / b) + sum(math.ceil(s / b) for s in S), "fresh block"),
    (lambda P, S, b: shared_prefix_blocks(P, S, b) + 1, "expected"),
])
def test_shared_prefix_blocks_names_the_mistake(wrong, words):
    result = checks.check_shared_prefix_blocks(wrong)
    assert not result.passed and words in result.message, result.message


def test_shared_prefix_blocks_that_mutates_its_input_fails_without_raising():
    def pops(prompt_len, suffix_lengths, block_size):
        answer = shared_prefix_blocks(prompt_len, suffix_lengths, block_size)
        suffix_lengths.clear()
        return answer

    result = checks.check_shared_prefix_blocks(pops)
    assert not result.passed and "changed its input `suffix_lengths`" in result.message

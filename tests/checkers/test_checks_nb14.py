"""The checkers of notebook 14 accept the references, reject a table of the fixed cases, and name the planted
mistakes."""

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib import checks
from course_lib.checks import nb14


# ----------------------------------------------------------------------------- blocks with room to grow
def blocks_needed(lengths, block_size, lookahead):
    blocks = sum(math.ceil((n + lookahead) / block_size) for n in lengths)
    return blocks, blocks * block_size - sum(lengths)


def test_blocks_needed_reference_passes():
    result = checks.check_blocks_needed(blocks_needed)
    assert result.passed and "6 random" in result.message, result.message


def test_blocks_needed_fixed_cases_include_the_edges():
    cases = nb14._LOOKAHEAD_CASES
    assert any(0 in lengths and k == 0 for lengths, _, k in cases)  # an empty sequence with no room: 0 blocks
    assert any(all(n % b == 0 for n in lengths) and k for lengths, b, k in cases)  # exact multiples


def test_blocks_needed_table_of_the_fixed_cases_fails():
    table = {(tuple(lengths), b, k): blocks_needed(lengths, b, k) for lengths, b, k in nb14._LOOKAHEAD_CASES}

    def memorised(lengths, block_size, lookahead):
        return table.get((tuple(lengths), block_size, lookahead), (0, 0))

    result = checks.check_blocks_needed(memorised)
    assert not result.passed and "expected" in result.message, result.message


def _wrong_at_empty_sequences(lengths, block_size, lookahead):
    blocks = sum(max(1, math.ceil((n + lookahead) / block_size)) for n in lengths)  # an empty sequence takes a block
    return blocks, blocks * block_size - sum(lengths)


@pytest.mark.parametrize(("wrong", "words"), [
    (lambda L, b, k: blocks_needed(L, b, 0), "needs room for `lookahead` more tokens"),
    (lambda L, b, k: (sum(math.ceil(n / b) + math.ceil(k / b) for n in L),
                      sum(math.ceil(n / b) + math.ceil(k / b) for n in L) * b - sum(L)), "rounding L and lookahead"),
    (lambda L, b, k: (blocks_needed(L, b, k)[0], blocks_needed(L, b, k)[1] - k * len(L)), "reserved slots hold no"),
    (lambda L, b, k: (sum((n + k) // b for n in L), sum((n + k) // b for n in L) * b - sum(L)), "rounded down"),
    (_wrong_at_empty_sequences, "expected (0, 0)"),
    (lambda L, b, k: 3, "return a tuple (blocks, empty)"),
])
def test_blocks_needed_names_the_mistake(wrong, words):
    result = checks.check_blocks_needed(wrong)
    assert not result.passed and words in result.message, result.message


def test_blocks_needed_that_mutates_its_input_fails_without_raising():
    def sorts_in_place(lengths, block_size, lookahead):
        lengths.sort()
        return blocks_needed(lengths, block_size, lookahead)

    result = checks.check_blocks_needed(sorts_in_place)
    assert not result.passed and "changed its input `lengths`" in result.message


# ----------------------------------------------------------------------------- the block-table gather
def gather_kv(key_pool, block_table, length):
    H_kv, d = key_pool.shape[1], key_pool.shape[3]
    return key_pool[block_table].transpose(0, 1).reshape(H_kv, -1, d)[:, :length]


def test_gather_kv_reference_passes():
    result = checks.check_gather_kv(gather_kv)
    assert result.passed and "3 random" in result.message, result.message


@pytest.mark.parametrize(("wrong", "words"), [
    (lambda pool, table, n: gather_kv(pool, list(range(len(table))), n), "pool's order"),
    (lambda pool, table, n: pool[table].reshape(pool.shape[1], -1, pool.shape[3])[:, :n], "mixes heads"),
    (lambda pool, table, n: gather_kv(pool, table, len(table) * pool.shape[2]), "first `length` rows"),
    (lambda pool, table, n: gather_kv(pool, table, n) * 2, "which axes of the gathered blocks"),
])
def test_gather_kv_names_the_mistake(wrong, words):
    result = checks.check_gather_kv(wrong)
    assert not result.passed and words in result.message, result.message


def test_gather_kv_hint_gives_no_code():
    result = checks.check_gather_kv(lambda pool, table, n: gather_kv(pool, table, n) * 2)
    assert "transpose(" not in result.message and "reshape(" not in result.message, result.message


def test_gather_kv_that_mutates_its_input_fails_without_raising():
    def zeroes_the_pool(key_pool, block_table, length):
        out = gather_kv(key_pool, block_table, length).clone()
        key_pool.zero_()
        return out

    result = checks.check_gather_kv(zeroes_the_pool)
    assert not result.passed and "changed its input `key_pool`" in result.message


# ----------------------------------------------------------------------------- blocks freed by finished requests
def blocks_freed(prompt_len, suffix_lengths, block_size, finished):
    full = prompt_len // block_size  # the prompt's full blocks stay with the prompt
    return sum(math.ceil((prompt_len + suffix_lengths[i]) / block_size) - full
               for i in finished if suffix_lengths[i])  # a writer's copied block and its own blocks


def test_shared_prefix_blocks_reference_passes():
    result = checks.check_shared_prefix_blocks(blocks_freed)
    assert result.passed and "6 random" in result.message, result.message


def test_shared_prefix_blocks_fixed_cases_include_the_edges():
    cases = nb14._FREED_CASES
    assert any(P == 0 for P, *_ in cases) and any(P and P % b == 0 for P, _, b, _ in cases)
    assert any(not finished for *_, finished in cases) and any(0 in s for _, s, _, _ in cases)


def test_shared_prefix_blocks_table_of_the_fixed_cases_fails():
    table = {(P, tuple(s), b, tuple(f)): blocks_freed(P, s, b, f) for P, s, b, f in nb14._FREED_CASES}

    def memorised(prompt_len, suffix_lengths, block_size, finished):
        return table.get((prompt_len, tuple(suffix_lengths), block_size, tuple(finished)), 0)

    result = checks.check_shared_prefix_blocks(memorised)
    assert not result.passed and "expected" in result.message, result.message


def test_the_reference_pool_agrees_with_the_closed_form_on_many_cases():
    import numpy as np

    for case in nb14._freed_cases(np.random.default_rng(14), n=200):
        assert nb14._blocks_freed(*case) == blocks_freed(*case), case


def _wrong_at_empty_prompt(P, S, b, F):
    return blocks_freed(P, S, b, F) + (1 if P == 0 and F else 0)


@pytest.mark.parametrize(("wrong", "words"), [
    (lambda P, S, b, F: sum(math.ceil((P + S[i]) / b) for i in F), "the prompt's blocks stay"),
    (lambda P, S, b, F: sum(math.ceil((P + S[i]) / b) - math.ceil(P / b) for i in F), "its own copy"),
    (lambda P, S, b, F: sum(math.ceil((P + S[i]) / b) - P // b for i in F), "generated nothing"),
    (_wrong_at_empty_prompt, "prompt_len=0"),
    (lambda P, S, b, F: blocks_freed(P, S, b, F) + 1, "expected"),
])
def test_shared_prefix_blocks_names_the_mistake(wrong, words):
    result = checks.check_shared_prefix_blocks(wrong)
    assert not result.passed and words in result.message, result.message


def test_shared_prefix_blocks_that_mutates_its_input_fails_without_raising():
    def pops(prompt_len, suffix_lengths, block_size, finished):
        answer = blocks_freed(prompt_len, suffix_lengths, block_size, finished)
        finished.clear()
        return answer

    result = checks.check_shared_prefix_blocks(pops)
    assert not result.passed and "changed its input `finished`" in result.message


# ----------------------------------------------------------------------------- a graph-safe sliding-window step
def window_decode_step(q, k, v, keys, values, position, window):
    keys.index_copy_(2, position, k)  # row `position`, wherever it points when a graph replays this
    values.index_copy_(2, position, v)
    rows = torch.arange(keys.shape[2], device=keys.device)
    visible = ((rows <= position) & (rows > position - window)).view(1, 1, 1, -1)  # (1, 1, 1, max_len)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
    position.add_(1)
    return out


def _masked_step(mask, *, advance=True, python_row=False, host_read=None, write_offset=0):
    """The reference with one thing changed: the mask (rows, position, window) -> bool, the write or the advance,
    or a read of the position back to the host, host_read(position, max_len) -> bool."""
    def step(q, k, v, keys, values, position, window):
        if host_read is not None:
            assert host_read(position, keys.shape[2])  # harmless eagerly; a CUDA graph capture refuses it
        if python_row:
            row = int(position)
            keys[:, :, row], values[:, :, row] = k[:, :, 0], v[:, :, 0]
        else:
            keys.index_copy_(2, position + write_offset, k)
            values.index_copy_(2, position + write_offset, v)
        rows = torch.arange(keys.shape[2])
        visible = mask(rows, position, window)
        out = F.scaled_dot_product_attention(q, keys, values,
                                             attn_mask=None if visible is None else visible.view(1, 1, 1, -1))
        if advance:
            position.add_(1)
        return out

    return step


def _window(rows, position, window):
    return (rows <= position) & (rows > position - window)


def _sliced(q, k, v, keys, values, position, window):
    p = int(position)
    keys[:, :, p], values[:, :, p] = k[:, :, 0], v[:, :, 0]
    lo = max(0, p - window + 1)
    out = F.scaled_dot_product_attention(q, keys[:, :, lo:p + 1], values[:, :, lo:p + 1])  # grows until it is `window`
    position.add_(1)
    return out


def _python_mask(q, k, v, keys, values, position, window):
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v)
    p = int(position)  # right eagerly; a trace bakes in the first value
    visible = _window(torch.arange(keys.shape[2]), p, window).view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
    position.add_(1)
    return out


def _advanced_first(q, k, v, keys, values, position, window):
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v)
    position.add_(1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=_window(torch.arange(keys.shape[2]), position,
                                                                             window).view(1, 1, 1, -1))


def _rebinds(q, k, v, keys, values, position, window):
    out = window_decode_step(q, k, v, keys, values, position.clone(), window)
    position = position + 1  # a new tensor: the caller's position stays
    return out


def _if_on_a_tensor(q, k, v, keys, values, position, window):
    if (position >= keys.shape[2]).any():
        raise ValueError("the cache is full")
    return window_decode_step(q, k, v, keys, values, position, window)


def _one_dimensional_mask(q, k, v, keys, values, position, window):
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=_window(torch.arange(keys.shape[2]), position,
                                                                            window))  # (max_len,): SDPA refuses it
    position.add_(1)
    return out


def _fails_when_traced():
    calls = []

    def step(*args):
        calls.append(1)
        if len(calls) > len(nb14._WINDOW_CASES) * nb14._DECODE_STEPS + nb14._DECODE_STEPS:  # the eager calls are done
            raise RuntimeError("cannot trace this")
        return window_decode_step(*args)

    return step


def test_window_decode_step_reference_passes():
    result = checks.check_window_decode_step(window_decode_step)
    assert result.passed and "1 random" in result.message, result.message


def _put_advanced_first_softmax(q, k, v, keys, values, position, window):
    heads = (torch.arange(keys.shape[0]).view(-1, 1), torch.arange(keys.shape[1]).view(1, -1))
    keys.index_put_((*heads, position), k[:, :, 0])
    values.index_put_((*heads, position), v[:, :, 0])
    position += 1  # advanced first, so the mask is < position
    rows = torch.arange(keys.shape[2])
    scores = (q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(
        ~((rows < position) & (rows >= position - window)), float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    return weights / weights.sum(-1, keepdim=True) @ values


def _additive_mask(q, k, v, keys, values, position, window):
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v)
    bias = torch.where(_window(torch.arange(keys.shape[2]), position, window), 0.0, float("-inf")).to(q.dtype)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias.view(1, 1, 1, -1))
    position.add_(1)
    return out


def _scatter_expanded_mask(q, k, v, keys, values, position, window):
    B, H, L, d = keys.shape
    rows = position.view(1, 1, 1, 1).expand(B, H, 1, d)
    keys.scatter_(2, rows, k)
    values.scatter_(2, rows, v)
    visible = _window(torch.arange(L), position, window).view(1, 1, 1, L).expand(B, H, 1, L)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
    position.add_(1)
    return out


@pytest.mark.parametrize("right", [_put_advanced_first_softmax, _additive_mask, _scatter_expanded_mask])
def test_window_decode_step_other_right_answers_pass(right):
    result = checks.check_window_decode_step(right)
    assert result.passed, result.message


def test_window_decode_step_fixed_cases_include_the_edges():
    cases = nb14._WINDOW_CASES
    assert any(P == 0 for _, _, _, P, _, _ in cases)  # the first token of a text: position 0
    assert any(W == 1 for *_, W, _ in cases)  # a window of the newest token alone
    assert any(W > P + nb14._DECODE_STEPS for _, _, _, P, W, _ in cases)  # a window longer than the text
    assert any(P >= W for _, _, _, P, W, _ in cases)  # the window cuts from the first step (the missing window shows)


@pytest.mark.parametrize(("wrong", "words"), [
    (_masked_step(lambda r, p, w: (r < p) & (r > p - w)), "a token attends to itself"),
    (_advanced_first, "lets in row position + 1"),
    (_masked_step(lambda r, p, w: (r <= p) & (r >= p - w)), "your window holds 5 tokens, not window = 4"),
    (_masked_step(lambda r, p, w: (r <= p) & (r > p - w + 1)), "your window holds 3 tokens, not window = 4"),
    (_masked_step(lambda r, p, w: r > p - w), "rows after `position` are not masked"),
    (_masked_step(lambda r, p, w: None), "every row of the cache is attended to"),
    (_masked_step(lambda r, p, w: r <= p), "the window is missing"),
    (_masked_step(_window, advance=False), "advance it by one in place"),
    (_rebinds, "advance it by one in place"),
    (_masked_step(_window, write_offset=1), "hold the new token's key and value in row 5"),
    (_sliced, "different operations or shapes from one token to the next"),
    (_masked_step(_window, python_row=True), "writes every token into the row it wrote at the trace (5)"),
    (_python_mask, "right eagerly, but replayed, token 2 attends to the rows the traced token did"),
    (_masked_step(_window, host_read=lambda p, n: p.item() < n), "(32 times: .item()"),
    # on the CPU .tolist() and .numpy() dispatch no operation; the position handed to the step counts them
    (_masked_step(_window, host_read=lambda p, n: p.tolist()[0] < n), "the trace here replays right, but a CUDA "
                                                                      "graph capture refuses it"),
    (_masked_step(_window, host_read=lambda p, n: p.numpy()[0] < n), "reads a tensor back to the host (32 times"),
    (_masked_step(_window, host_read=lambda p, n: (p - 1)[0].tolist() < n), "reads a tensor back to the host"),
    (_masked_step(_window, host_read=lambda p, n: float(p) < n), "reads a tensor back to the host (32 times"),
    (_masked_step(_window, host_read=lambda p, n: int(p) < n), "reads a tensor back to the host (32 times"),
    (_masked_step(_window, host_read=lambda p, n: range(n)[p] >= 0), "reads a tensor back to the host (32 times"),
    # bool() and `if` on a comparison make_fx records: the trace fails, named as the host read it is
    (_masked_step(_window, host_read=lambda p, n: bool(p < n)), "a Python `if` or bool() on a tensor reads it "
                                                                 "back"),
    (_if_on_a_tensor, "make_fx could not trace it, and a CUDA graph capture refuses it"),
    (_one_dimensional_mask, "your mask has shape (16,), the scores (1, 2, 1, 16): the mask must broadcast against "
                            "the scores (B, H, 1, max_len), e.g. .view(1, 1, 1, -1)"),
    (_fails_when_traced(), "tracing your step with make_fx failed (RuntimeError: cannot trace this)"),
    (lambda *args: window_decode_step(*args) * 2, "differs from the reference"),
    (lambda *args: window_decode_step(*args)[..., :2], "expected (1, 2, 1, 4)"),
])
def test_window_decode_step_names_the_mistake(wrong, words):
    result = checks.check_window_decode_step(wrong)
    assert not result.passed and words in result.message, result.message


def test_window_decode_step_that_mutates_its_input_fails_without_raising():
    def zeroes_the_query(q, k, v, keys, values, position, window):
        out = window_decode_step(q, k, v, keys, values, position, window)
        q.zero_()
        return out

    result = checks.check_window_decode_step(zeroes_the_query)
    assert not result.passed and "changed its input `q`" in result.message, result.message

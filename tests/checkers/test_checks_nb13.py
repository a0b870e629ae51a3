"""The checkers of notebook 13 accept the references and name the planted mistakes."""

import torch

from course_lib import checks
from course_lib.parallel.distributed import ring_allreduce_bytes
from course_lib.parallel.ring_attention import SequenceLayout, merge_partials
from course_lib.parallel.tensor_parallel import tp_bytes_per_step


# ----------------------------------------------------------------------------- tensor-parallel bytes
def tp_cross_bytes(B, T, S, d_model, R, element_size):
    forward = 2 * (R - 1) * (B * T * d_model // R) * element_size
    return forward, forward + 2 * (R - 1) * (B * S * d_model // R) * element_size


def forgets_the_memory_gradient(B, T, S, d_model, R, element_size):
    forward = ring_allreduce_bytes(B * T * d_model, R, element_size)
    return forward, forward


def counts_numbers(B, T, S, d_model, R, element_size):
    f, b = tp_cross_bytes(B, T, S, d_model, R, 1)
    return f, b


def test_tp_cross_bytes_reference_passes():
    assert checks.check_tp_cross_bytes(tp_cross_bytes).passed
    expected = tp_bytes_per_step(2, 5, 9, 16, 2, 4, self_attention=False)
    assert tp_cross_bytes(2, 5, 9, 16, 2, 4) == (expected["forward"], expected["backward"])


def test_tp_cross_bytes_names_the_missing_memory_gradient():
    result = checks.check_tp_cross_bytes(forgets_the_memory_gradient)
    assert not result.passed and "gradient of the memory" in result.message


def test_tp_cross_bytes_names_numbers_instead_of_bytes():
    result = checks.check_tp_cross_bytes(counts_numbers)
    assert not result.passed and "element_size" in result.message


def test_tp_cross_bytes_names_a_half_all_reduce():
    result = checks.check_tp_cross_bytes(lambda *shape: tuple(x / 2 for x in tp_cross_bytes(*shape)))
    assert not result.passed and "reduce-scatter" in result.message


def test_tp_cross_bytes_wrong_type_is_explained():
    result = checks.check_tp_cross_bytes(lambda *a: 12)
    assert not result.passed and "tuple (forward_bytes, backward_bytes)" in result.message


# ----------------------------------------------------------------------------- merging R partials
def merge_many(outs, lses):
    lse = torch.logsumexp(torch.stack(lses), dim=0)  # (T,)
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(torch.stack(lses) - shift)  # (R, T)
    return (weights.unsqueeze(-1) * torch.stack(outs)).sum(0), lse


def merge_by_folding(outs, lses):
    out, lse = outs[0], lses[0]
    for o, l in zip(outs[1:], lses[1:], strict=True):
        out, lse = merge_partials(out, lse, o, l)
    return out, lse


def plain_average(outs, lses):
    return torch.stack(outs).mean(0), torch.logsumexp(torch.stack(lses), 0)


def nan_on_empty_rows(outs, lses):
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    weights = torch.exp(torch.stack(lses) - lse)  # -inf - (-inf) = NaN in rows that saw no key
    return (weights.unsqueeze(-1) * torch.stack(outs)).sum(0), lse


def overflowing_weights(outs, lses):
    raw = torch.exp(torch.stack(lses))  # inf for scores near 1000
    out = (raw.unsqueeze(-1) * torch.stack(outs)).sum(0) / raw.sum(0).unsqueeze(-1)
    return out, torch.logsumexp(torch.stack(lses), 0)


def max_instead_of_logsumexp(outs, lses):
    out, _ = merge_many(outs, lses)
    return out, torch.stack(lses).amax(0)


def mutates_and_zeroes(outs, lses):
    for o in outs:
        o.zero_()
    return merge_many(outs, lses)


def test_merge_many_reference_and_folding_pass():
    assert checks.check_merge_many(merge_many).passed
    assert checks.check_merge_many(merge_by_folding).passed


def test_merge_many_names_a_plain_average():
    result = checks.check_merge_many(plain_average)
    assert not result.passed and "plain average" in result.message


def test_merge_many_names_nan_rows():
    result = checks.check_merge_many(nan_on_empty_rows)
    assert not result.passed and "NaN" in result.message and "saw no key" in result.message


def test_merge_many_names_overflow():
    result = checks.check_merge_many(overflowing_weights)
    assert not result.passed and "overflows" in result.message


def test_merge_many_names_a_max_for_the_lse():
    result = checks.check_merge_many(max_instead_of_logsumexp)
    assert not result.passed and "max of the lse_i" in result.message


def test_merge_many_is_not_fooled_by_mutation():
    result = checks.check_merge_many(mutates_and_zeroes)
    assert not result.passed


# ----------------------------------------------------------------------------- zigzag positions
def zigzag_positions(T, R):
    pieces = torch.arange(T).tensor_split(2 * R)
    return [pieces[r].tolist() + pieces[2 * R - 1 - r].tolist() for r in range(R)]


def contiguous_positions(T, R):
    return [p.tolist() for p in torch.arange(T).tensor_split(R)]


def wrong_partner(T, R):
    pieces = torch.arange(T).tensor_split(2 * R)
    return [pieces[r].tolist() + pieces[r + R].tolist() for r in range(R)]


def drops_the_remainder(T, R):
    size = T // (2 * R)
    return [list(range(r * size, (r + 1) * size)) + list(range((2 * R - 1 - r) * size, (2 * R - r) * size))
            for r in range(R)]


def unsorted(T, R):
    return [list(reversed(p)) for p in zigzag_positions(T, R)]


def test_zigzag_reference_passes_and_equals_the_layout():
    assert checks.check_zigzag_positions(zigzag_positions).passed
    assert zigzag_positions(13, 2) == [p.tolist() for p in SequenceLayout.make(13, 2, "zigzag").positions]


def test_zigzag_names_the_contiguous_split():
    result = checks.check_zigzag_positions(contiguous_positions)
    assert not result.passed and "contiguous split" in result.message and "causal work per rank" in result.message


def test_zigzag_names_the_wrong_partner():
    result = checks.check_zigzag_positions(wrong_partner)
    assert not result.passed and "mirror image" in result.message


def test_zigzag_names_lost_positions():
    result = checks.check_zigzag_positions(drops_the_remainder)
    assert not result.passed and "lost" in result.message


def test_zigzag_names_unsorted_positions():
    result = checks.check_zigzag_positions(unsorted)
    assert not result.passed and "increasing order" in result.message


def test_zigzag_wrong_type_is_explained():
    result = checks.check_zigzag_positions(lambda T, R: torch.arange(T))
    assert not result.passed and "list of" in result.message


def half_positions(T, R):
    return [[p + 0.5 for p in r] for r in zigzag_positions(T, R)]


def string_positions(T, R):
    return [[str(p) for p in r] for r in zigzag_positions(T, R)]


def float_tensor_positions(T, R):
    return [torch.tensor(r, dtype=torch.float32) for r in zigzag_positions(T, R)]


def bool_positions(T, R):
    return [[bool(p) for p in r] for r in zigzag_positions(T, R)]


def positions_as_a_string(T, R):
    return ["".join(map(str, r)) for r in zigzag_positions(T, R)]


def zero_d_tensors(T, R):
    pieces = torch.arange(T).tensor_split(2 * R)
    return [list(pieces[r]) + list(pieces[2 * R - 1 - r]) for r in range(R)]  # 0-d integer tensors: fine


def test_zigzag_refuses_positions_that_are_not_integers():
    for wrong in (half_positions, string_positions, float_tensor_positions, bool_positions):
        result = checks.check_zigzag_positions(wrong)
        assert not result.passed and "integers" in result.message, (wrong.__name__, result.message)
    result = checks.check_zigzag_positions(positions_as_a_string)
    assert not result.passed and "list of integer positions" in result.message


def test_zigzag_takes_integer_tensors_and_their_elements():
    assert checks.check_zigzag_positions(zero_d_tensors).passed
    assert checks.check_zigzag_positions(lambda T, R: [torch.tensor(r) for r in zigzag_positions(T, R)]).passed

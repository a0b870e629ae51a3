"""Notebook 08's checkers pass the reference and reject planted mistakes with a useful message."""

import numpy as np

from course_lib import checks


def entropy(a):
    safe = np.where(a > 0, a, 1.0)
    return (-(a * np.log(safe)).sum(-1)).mean(-1).mean(0)


def test_entropy_reference_passes():
    result = checks.check_head_entropy(entropy)
    assert result.passed, result


def test_entropy_with_nan_for_zeros_fails():
    with np.errstate(all="ignore"):
        result = checks.check_head_entropy(lambda a: (-(a * np.log(a)).sum(-1)).mean((0, 2)))
    assert not result.passed and "0 * log 0" in result.message


def test_entropy_in_bits_fails():
    result = checks.check_head_entropy(lambda a: entropy(a) / np.log(2))
    assert not result.passed and "nats" in result.message


def test_entropy_not_averaged_over_batch_fails():
    result = checks.check_head_entropy(lambda a: (-(a * np.log(np.where(a > 0, a, 1))).sum(-1)).mean(-1))
    assert not result.passed and "average over the batch" in result.message


def previous(a):
    return np.diagonal(a, offset=-1, axis1=-2, axis2=-1).mean(-1).mean(0)


def test_previous_token_reference_passes():
    result = checks.check_previous_token_score(previous)
    assert result.passed, result


def test_previous_token_next_token_fails():
    result = checks.check_previous_token_score(lambda a: np.diagonal(a, offset=1, axis1=-2, axis2=-1).mean((0, 2)))
    assert not result.passed and "t-1" in result.message


def test_previous_token_dividing_by_T_fails():
    result = checks.check_previous_token_score(
        lambda a: np.diagonal(a, offset=-1, axis1=-2, axis2=-1).sum(-1).mean(0) / a.shape[-1])
    assert not result.passed and "row 0 has no previous token" in result.message

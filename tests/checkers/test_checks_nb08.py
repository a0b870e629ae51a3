"""Notebook 08's checkers pass the reference and reject planted mistakes with a useful message."""

import numpy as np
import pytest
import torch

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


def _not_yet(result, words):
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- entropy by hand
def test_row_entropy_by_hand_accepts_three_digits():
    assert checks.check_row_entropy_by_hand(lambda: (1.040, 2.773, 0.325)).passed
    assert checks.check_row_entropy_by_hand(lambda: np.array([1.5 * np.log(2), np.log(16), 0.3251])).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda: (1.5, 4.0, 0.469), "bits"),
    (lambda: (0.452, 1.204, 0.141), "log10"),
    (lambda: (-1.040, -2.773, -0.325), "minus sign"),
    (lambda: (0.260, 0.173, 0.081), "SUM"),
    (lambda: (float("nan"), 2.773, float("nan")), "0 * log 0"),
    (lambda: (1.040, np.log(15), 0.325), "differs"),
    (lambda: (1.040, 2.773), "three numbers"),
])
def test_row_entropy_by_hand_rejects_planted_mistakes(wrong, words):
    _not_yet(checks.check_row_entropy_by_hand(wrong), words)


# ----------------------------------------------------------------------------- Michel's importance
def michel(grads):
    return np.abs(grads).mean(0)


def test_michel_importance_reference_passes():
    assert checks.check_michel_importance(michel).passed


def test_michel_importance_in_torch_passes():
    assert checks.check_michel_importance(lambda g: torch.as_tensor(g).abs().mean(0)).passed


def _michel_mutating(grads):
    grads[:] = grads.mean(0)  # its own copy only: the checker's gradients are intact, so this is |mean g|
    return np.abs(grads).mean(0)


@pytest.mark.parametrize("wrong, words", [
    (lambda g: np.abs(g.mean(0)), "Take the absolute value INSIDE the mean"),
    (lambda g: g.mean(0), "signed mean"),
    (lambda g: np.sqrt((g**2).mean(0)), "root mean square"),
    (lambda g: np.abs(g).sum(0), "divide by N"),
    (lambda g: michel(g) / np.linalg.norm(michel(g), axis=-1, keepdims=True), "l2 norm"),
    (lambda g: np.abs(g).mean((0, 1)), "axis 0"),
    (lambda g: michel(g).astype(np.float32), "float32"),
    (_michel_mutating, "INSIDE the mean"),
])
def test_michel_importance_rejects_planted_mistakes(wrong, words):
    _not_yet(checks.check_michel_importance(wrong), words)


# ----------------------------------------------------------------------------- Spearman
def ranks(v):
    return np.argsort(np.argsort(v)) + 1.0


def spearman_by_formula(x, y):
    n = len(x)
    return 1 - 6 * ((ranks(x) - ranks(y)) ** 2).sum() / (n * (n**2 - 1))


def test_spearman_reference_passes():
    assert checks.check_spearman(spearman_by_formula).passed
    assert checks.check_spearman(lambda x, y: np.corrcoef(ranks(x), ranks(y))[0, 1]).passed


def _spearman_mutating(x, y):
    x.sort()  # its own copy only, but it breaks the pairing of x and y
    return spearman_by_formula(x, y)


@pytest.mark.parametrize("wrong, words", [
    (lambda x, y: np.corrcoef(x, y)[0, 1], "Pearson's r of the values"),
    (lambda x, y: np.corrcoef(np.argsort(x), np.argsort(y))[0, 1], "argsort"),
    (lambda x, y: -spearman_by_formula(x, y), "sign is flipped"),
    (lambda x, y: 1 - 6 * ((ranks(x) - ranks(y)) ** 2).sum() / (len(x) * (len(x) - 1)), "n (n - 1)"),
    (lambda x, y: 1 - 6 * ((ranks(x) - ranks(y)) ** 2).sum() / len(x) ** 3, "n^3"),
    (lambda x, y: np.array([spearman_by_formula(x, y)] * 2), "one number"),
    (_spearman_mutating, "differs"),
])
def test_spearman_rejects_planted_mistakes(wrong, words):
    _not_yet(checks.check_spearman(wrong), words)

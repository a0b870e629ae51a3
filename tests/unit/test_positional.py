"""Positional encodings: the formula, the offset used by incremental decoding, and what they are for:
without them self-attention is permutation-equivariant, with them it is not."""

import math

import numpy as np
import pytest
import torch

from course_lib.blocks import EncoderLayer
from course_lib.mha import MultiHeadAttention
from course_lib.positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding, sinusoidal_table


def _formula(max_len, d_model, base=10000.0):
    table = np.zeros((max_len, d_model))
    for pos in range(max_len):
        for j in range(d_model):
            i2 = j - j % 2  # 2i for both the sine (j = 2i) and the cosine (j = 2i + 1)
            angle = pos / base ** (i2 / d_model)
            table[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return table


@pytest.mark.parametrize("max_len,d_model", [(10, 8), (7, 5), (50, 16)])
def test_sinusoidal_table_matches_the_formula(max_len, d_model):
    got = sinusoidal_table(max_len, d_model, dtype=torch.float64).numpy()
    assert got.shape == (max_len, d_model)
    np.testing.assert_allclose(got, _formula(max_len, d_model), atol=1e-12)


def test_shift_by_k_is_a_rotation_of_each_feature_pair():
    d, k = 16, 5
    table = sinusoidal_table(40, d, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float64) / d)
    for pos in (0, 3, 20):
        for i, w in enumerate(freqs):
            c, s = math.cos(k * w), math.sin(k * w)
            sin_p, cos_p = table[pos, 2 * i], table[pos, 2 * i + 1]
            rotated = torch.tensor([s * cos_p + c * sin_p, c * cos_p - s * sin_p])
            torch.testing.assert_close(table[pos + k, 2 * i: 2 * i + 2], rotated, atol=1e-12, rtol=0)


def test_dot_product_depends_only_on_distance():
    table = sinusoidal_table(64, 32, dtype=torch.float64)
    gram = table @ table.T
    for shift in (1, 4, 9):
        diag = torch.diagonal(gram, offset=shift)
        assert float(diag.max() - diag.min()) < 1e-9


@pytest.mark.parametrize("cls", [SinusoidalPositionalEncoding, LearnedPositionalEmbedding])
def test_offset_gives_the_positions_of_a_suffix(cls):
    torch.manual_seed(0)
    pe = cls(8, max_len=20)
    x = torch.randn(2, 6, 8)
    full = pe(x)
    torch.testing.assert_close(pe(x[:, 4:], offset=4), full[:, 4:])
    torch.testing.assert_close(pe(x[:, 2:3], offset=2), full[:, 2:3])


@pytest.mark.parametrize("cls", [SinusoidalPositionalEncoding, LearnedPositionalEmbedding])
def test_bad_inputs_raise_clear_errors(cls):
    pe = cls(8, max_len=10)
    with pytest.raises(ValueError, match="exceed max_len=10"):
        pe(torch.zeros(1, 8, 8), offset=3)
    with pytest.raises(ValueError, match=r"\(B, T, d_model=8\).*\(1, 4, 6\)"):
        pe(torch.zeros(1, 4, 6))
    with pytest.raises(ValueError, match="offset"):
        pe(torch.zeros(1, 4, 8), offset=-1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        pe(np.zeros((1, 4, 8)))


def test_sinusoidal_has_no_parameters_learned_has_one_table():
    assert sum(p.numel() for p in SinusoidalPositionalEncoding(16, 32).parameters()) == 0
    assert sum(p.numel() for p in LearnedPositionalEmbedding(16, 32).parameters()) == 16 * 32


# ------------------------------------------------------------------ permutation equivariance
def _layers():
    torch.manual_seed(0)
    return [MultiHeadAttention(16, 4).eval(), EncoderLayer(16, 4, 32, norm_first=True).eval(),
            EncoderLayer(16, 4, 32, norm_first=False).eval()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_positions_self_attention_is_permutation_equivariant(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 9, 16, generator=g)
    perm = torch.randperm(9, generator=g)
    assert not torch.equal(perm, torch.arange(9))
    for layer in _layers():
        with torch.no_grad():
            torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [SinusoidalPositionalEncoding, LearnedPositionalEmbedding])
def test_with_positions_self_attention_is_not_permutation_equivariant(cls):
    torch.manual_seed(0)
    pe = cls(16, max_len=32)
    if cls is LearnedPositionalEmbedding:  # as after training: rows of the size of the sinusoidal ones
        torch.nn.init.normal_(pe.embedding.weight, std=0.7)
    x = torch.randn(3, 9, 16)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    for layer in _layers():
        with torch.no_grad():
            gap = (layer(pe(x[:, perm])) - layer(pe(x))[:, perm]).abs().max().item()
        assert gap > 1e-2, f"{type(layer).__name__}: permuting the input only permuted the output (gap {gap:.2e})"

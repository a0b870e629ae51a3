"""The notebook-06 checkers pass the reference and catch planted mistakes with a useful message."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import MultiHeadAttention, checks
from course_lib.blocks import FeedForward


def sinusoidal_reference(max_len, d_model):
    pe = np.zeros((max_len, d_model))
    pos = np.arange(max_len)[:, None]
    two_i = np.arange(0, d_model, 2)
    angle = pos / 10000 ** (two_i / d_model)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : d_model // 2])
    return pe


def sinusoidal_swapped(max_len, d_model):
    pe = sinusoidal_reference(max_len, d_model)
    pe[:, 0::2], pe[:, 1::2] = pe[:, 1::2].copy(), pe[:, 0::2].copy()
    return pe


def sinusoidal_wrong_exponent(max_len, d_model):  # uses i instead of 2i
    pe = np.zeros((max_len, d_model))
    pos = np.arange(max_len)[:, None]
    i = np.arange(d_model // 2)
    angle = pos / 10000 ** (i / d_model)
    pe[:, 0::2], pe[:, 1::2] = np.sin(angle), np.cos(angle)
    return pe


def sinusoidal_transposed(max_len, d_model):
    return sinusoidal_reference(max_len, d_model).T


def test_sinusoidal_checker():
    assert checks.check_sinusoidal_encoding(sinusoidal_reference).passed
    assert checks.check_sinusoidal_encoding(lambda n, d: torch.tensor(sinusoidal_reference(n, d))).passed
    r = checks.check_sinusoidal_encoding(sinusoidal_swapped)
    assert not r.passed and "swapped" in r.message
    r = checks.check_sinusoidal_encoding(sinusoidal_wrong_exponent)
    assert not r.passed and "EVEN index 2i" in r.message
    r = checks.check_sinusoidal_encoding(sinusoidal_transposed)
    assert not r.passed and "shape (8, 10), expected (10, 8)" in r.message


def step_reference(q_t, k_t, v_t, k_cache, v_cache):
    k_cache = torch.cat([k_cache, k_t], dim=-2)
    v_cache = torch.cat([v_cache, v_t], dim=-2)
    w = torch.softmax(q_t @ k_cache.transpose(-2, -1) / math.sqrt(q_t.shape[-1]), dim=-1)
    return w @ v_cache, k_cache, v_cache


def step_attends_before_appending(q_t, k_t, v_t, k_cache, v_cache):
    w = torch.softmax(q_t @ k_cache.transpose(-2, -1) / math.sqrt(q_t.shape[-1]), dim=-1)
    out = w @ v_cache  # empty at t = 0, and never sees the new token
    return out, torch.cat([k_cache, k_t], dim=-2), torch.cat([v_cache, v_t], dim=-2)


def step_replaces_cache(q_t, k_t, v_t, k_cache, v_cache):
    out, _, _ = step_reference(q_t, k_t, v_t, k_cache, v_cache)
    return out, k_t, v_t


def step_unscaled(q_t, k_t, v_t, k_cache, v_cache):
    k_cache = torch.cat([k_cache, k_t], dim=-2)
    v_cache = torch.cat([v_cache, v_t], dim=-2)
    return torch.softmax(q_t @ k_cache.transpose(-2, -1), dim=-1) @ v_cache, k_cache, v_cache


def step_square_causal_mask(q_t, k_t, v_t, k_cache, v_cache):
    k_cache = torch.cat([k_cache, k_t], dim=-2)
    v_cache = torch.cat([v_cache, v_t], dim=-2)
    scores = q_t @ k_cache.transpose(-2, -1) / math.sqrt(q_t.shape[-1])  # (B, H, 1, t + 1)
    scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v_cache, k_cache, v_cache


def test_cached_step_checker():
    assert checks.check_cached_attention_step(step_reference).passed
    r = checks.check_cached_attention_step(step_attends_before_appending)
    assert not r.passed and "BEFORE computing the scores" in r.message
    r = checks.check_cached_attention_step(step_replaces_cache)
    assert not r.passed and "t + 1 = 2 tokens" in r.message and "along the token axis" in r.message
    r = checks.check_cached_attention_step(step_square_causal_mask)
    assert not r.passed and "attends only to the first one" in r.message, r.message
    r = checks.check_cached_attention_step(step_unscaled)
    assert not r.passed and "step t=1" in r.message and "sqrt(d)" in r.message
    r = checks.check_cached_attention_step(lambda *a: step_reference(*a)[0])
    assert not r.passed and "tuple (out_t, k_cache, v_cache)" in r.message


def _step_with(join=lambda cache, new: torch.cat([cache, new], dim=-2), swap_kv=False, order=(0, 1, 2),
               attend="all", softmax_dim=-1):
    def step(q_t, k_t, v_t, k_cache, v_cache):
        k_new, v_new = (v_t, k_t) if swap_kv else (k_t, v_t)
        k_cache, v_cache = join(k_cache, k_new), join(v_cache, v_new)
        keys, values = (k_t, v_t) if attend == "new" else (k_cache, v_cache)
        w = torch.softmax(q_t @ keys.transpose(-2, -1) / math.sqrt(q_t.shape[-1]), dim=softmax_dim)
        result = (w @ values, k_cache, v_cache)
        return tuple(result[i] for i in order)
    return step


@pytest.mark.parametrize("wrong, words", [
    (_step_with(join=lambda cache, new: torch.cat([new, cache], dim=-2)), "the newest token is at the FRONT"),
    (_step_with(swap_kv=True), "your k_cache holds the values and your v_cache the keys"),
    (_step_with(order=(1, 2, 0)), "your tuple is in the wrong order"),
    (_step_with(join=lambda cache, new: torch.cat([cache, new], dim=-1)), "along another axis than the token axis"),
    (_step_with(attend="new"), "the new token attends only to itself"),
    (_step_with(softmax_dim=-2), "the softmax runs over the wrong axis"),
])
def test_cached_step_names_each_planted_mistake(wrong, words):
    result = checks.check_cached_attention_step(wrong)
    assert not result.passed and words in result.message, result.message


def test_cached_step_hints_name_the_idea_not_the_line():
    for wrong in (step_replaces_cache, step_unscaled, _step_with(join=lambda cache, new: torch.cat([cache, new], -1))):
        message = checks.check_cached_attention_step(wrong).message
        assert "torch.cat" not in message and "q_t @" not in message and "dim=-2" not in message, message


def test_cached_step_rejects_an_answer_that_zeroes_the_cache_in_place():
    def zeroes_the_cache(q_t, k_t, v_t, k_cache, v_cache):
        k_cache.zero_()  # its private copy only: every earlier key is lost
        return step_reference(q_t, k_t, v_t, k_cache, v_cache)

    result = checks.check_cached_attention_step(zeroes_the_cache)
    assert not result.passed, result


# ----------------------------------------------------------------------------- four predictions
def test_block_predictions_accept_the_right_answers():
    assert checks.check_block_predictions(lambda: (2, 4, "b", 1365.33)).passed
    assert checks.check_block_predictions(lambda: (2.0, 4.0, "B", 1365)).passed


@pytest.mark.parametrize("answers, words", [
    ((1, 4, "b", 1365), "RMSNorm's gain acts after it"),
    ((4, 4, "b", 1365), "you applied the gain twice (squared)"),
    ((16, 4, "b", 1365), "the question asks for the RMS"),
    ((3, 4, "b", 1365), "question 1: 3 is not it. Hint"),
    ((2, 16, "b", 1365), "the LayerNorm's weight acts after it"),
    ((2, 1, "b", 1365), "you applied the weight twice (squared)"),
    ((2, 64, "b", 1365), "a weight on every feature scales it linearly"),
    ((2, 0.25, "b", 1365), "VARIANCE 1, not norm 1"),
    ((2, 5, "b", 1365), "question 2: 5 is not it. Hint"),
    ((2, 4, "a", 1365), "question 3: 'a' is not it: the memory gives the cross-attention its keys and values"),
    ((2, 4, "d", 1365), "question 3: answer with one of a, b, c"),
    ((2, 4, "c", 1365), "normalised by its own LayerNorm (norm2)"),
    ((2, 4, "b", 2048), "1.5 times the weights"),
    ((2, 4, "b", 1024), "you counted four matrices"),
    ((2, 4, "b", 3072), "must each be SMALLER"),
    ((2, 4, "b", 1366), "question 4: 1366 is not it. Hint"),
    (("b", 2, 4, 1365), "your answers are out of order"),
    ((2, 4, "b"), "return a tuple (rms, norm, letter, hidden)"),
    ((2, 4, "b", "1365"), "answer 4 should be one number"),
])
def test_block_predictions_name_wrong_answers(answers, words):
    result = checks.check_block_predictions(lambda: answers)
    assert not result.passed and words in result.message, result.message


def test_block_predictions_messages_do_not_give_the_answers():
    wrong = [(1, 4, "b", 1365), (4, 4, "b", 1365), (16, 4, "b", 1365), (2, 16, "b", 1365), (2, 1, "b", 1365),
             (2, 64, "b", 1365), (2, 0.25, "b", 1365), (2, 4, "b", 1024), (2, 4, "b", 3072), (2, 4, "b", 1000)]
    for answers in wrong:
        message = checks.check_block_predictions(lambda answers=answers: answers).message
        assert "doubles" not in message and "* 512" not in message and "= 2" not in message, message
        assert "sqrt(256)" not in message and "1365" not in message, message


def test_block_predictions_agree_with_torch():
    norm = nn.RMSNorm(64)
    with torch.no_grad():
        norm.weight.fill_(2.0)
        y = norm(torch.randn(3, 64) * 7 + 1)
    assert torch.allclose(y.pow(2).mean(-1).sqrt(), torch.full((3,), 2.0), atol=1e-3)
    layer_norm = nn.LayerNorm(256)
    with torch.no_grad():
        layer_norm.weight.fill_(0.25)
        z = layer_norm(torch.randn(3, 256) * 5 + 3)
    assert torch.allclose(z.norm(dim=-1), torch.full((3,), 4.0), atol=1e-3)
    assert abs(3 * 512 * 1365.33 - 2 * 512 * 2048) < 3 * 512


# ----------------------------------------------------------------------------- the learner's encoder block
class EncoderBlock(nn.Module):
    """What the exercise asks for, with one planted mistake when `mistake` is set."""

    def __init__(self, d_model, num_heads, d_ff, norm_first=True, dropout=0.0, mistake=None):
        super().__init__()
        self.norm_first, self.mistake = norm_first, mistake
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout)
        self.ff = FeedForward(d_model, d_ff, dropout=dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x, attn_mask=None):
        m = self.mistake
        mask = None if m == "no mask" else attn_mask
        if m == "flipped mask" and attn_mask is not None:
            mask = ~attn_mask
        norm1, norm2 = self.norm1, self.norm1 if m == "same norm" else self.norm2
        if m == "swapped norms":
            norm1, norm2 = self.norm2, self.norm1
        drop = (lambda t: F.dropout(t, self.p)) if m == "dropout in eval" else self.dropout
        if m == "no dropout":  # dropout passed nowhere: not to the attention, the FFN or the residual branches
            self.self_attn.dropout, self.ff.dropout, drop = 0.0, nn.Identity(), nn.Identity()

        def attn(h):
            return self.self_attn(h, attn_mask=mask, is_causal=m == "causal")

        pre = self.norm_first if m not in ("ignores norm_first", "swapped placement") else True
        if m == "swapped placement":
            pre = not self.norm_first
        if m == "in place" and pre:
            x += drop(attn(norm1(x)))
            return x + drop(self.ff(norm2(x)))
        if m == "ff first" and pre:
            x = x + drop(self.ff(norm2(x)))
            return x + drop(attn(norm1(x)))
        if m == "dropout on the sum" and pre:
            x = drop(x + attn(norm1(x)))
            return drop(x + self.ff(norm2(x)))
        if pre:
            if m == "normed residual":
                h = norm1(x)
                x = h + drop(attn(h))
                h = norm2(x)
                return h + drop(self.ff(h))
            x = drop(attn(norm1(x))) if m in ("no residual", "no attention residual") else \
                x + drop(attn(norm1(x)))
            return drop(self.ff(norm2(x))) if m in ("no residual", "no ff residual") else x + drop(self.ff(norm2(x)))
        if m == "dropout on the sum":
            x = norm1(drop(x + attn(x)))
            return norm2(drop(x + self.ff(x)))
        if m == "norm then add":
            x = norm1(x) + drop(attn(x))
            return norm2(x) + drop(self.ff(x))
        x = norm1(x + drop(attn(x)))
        return norm2(x + drop(self.ff(x)))


def _encoder(mistake):
    return lambda *args, **kwargs: EncoderBlock(*args, mistake=mistake, **kwargs)


def test_encoder_block_accepts_the_reference_and_a_sequential_ffn():
    result = checks.check_encoder_block(EncoderBlock)
    assert result.passed, result

    class SequentialFFN(EncoderBlock):
        def __init__(self, d_model, num_heads, d_ff, norm_first=True, dropout=0.0):
            super().__init__(d_model, num_heads, d_ff, norm_first, dropout)
            self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))

    assert checks.check_encoder_block(SequentialFFN).passed


@pytest.mark.parametrize("mistake, words", [
    ("swapped placement", "you normalised after the residual add, which is post-LN; with norm_first=True"),
    ("ignores norm_first", "with norm_first=False (post-LN) the LayerNorm comes after the residual add"),
    ("no residual", "the residual connections are missing"),
    ("no attention residual", "the attention sublayer has no residual connection"),
    ("no ff residual", "the feed-forward sublayer has no residual connection"),
    ("normed residual", "the residual adds the NORMALISED x"),
    ("same norm", "one LayerNorm serves both sublayers"),
    ("swapped norms", "norm1 and norm2 are swapped"),
    ("ff first", "the feed-forward runs before the attention"),
    ("no mask", "the mask is ignored"),
    ("flipped mask", "the mask's polarity is flipped"),
    ("norm then add", "in post-LN the LayerNorm normalises the SUM"),
    ("causal", "your block's self-attention is causal"),
    ("in place", "changed its input `x` in place"),
    ("dropout in eval", "dropout is still on"),
    ("dropout on the sum", "dropout acts on the residual path"),
    ("no dropout", "the dropout argument is never used"),
])
def test_encoder_block_names_each_planted_mistake(mistake, words):
    result = checks.check_encoder_block(_encoder(mistake))
    assert not result.passed and words in result.message, result.message


def test_encoder_block_explains_missing_parts_and_wrong_types():
    class Unnamed(nn.Module):
        def __init__(self, d_model, num_heads, d_ff, norm_first=True, dropout=0.0):
            super().__init__()
            self.attention = MultiHeadAttention(d_model, num_heads)

    result = checks.check_encoder_block(Unnamed)
    assert not result.passed and "no module named self_attn, ff, norm1, norm2" in result.message, result.message

    class RMSNormed(EncoderBlock):
        def __init__(self, d_model, num_heads, d_ff, norm_first=True, dropout=0.0):
            super().__init__(d_model, num_heads, d_ff, norm_first, dropout)
            self.norm1 = nn.RMSNorm(d_model)

    result = checks.check_encoder_block(RMSNormed)
    assert not result.passed and "self.norm1 should be nn.LayerNorm(d_model)" in result.message, result.message
    class SharedNorm(EncoderBlock):
        def __init__(self, d_model, num_heads, d_ff, norm_first=True, dropout=0.0):
            super().__init__(d_model, num_heads, d_ff, norm_first, dropout)
            self.norm1 = self.norm2 = nn.LayerNorm(d_model)

    result = checks.check_encoder_block(SharedNorm)
    assert not result.passed and "self.norm1 and self.norm2 are one and the same" in result.message, result.message
    result = checks.check_encoder_block(lambda *a, **k: EncoderBlock(*a, **k).forward)
    assert not result.passed and "should build an nn.Module" in result.message, result.message


# ----------------------------------------------------------------------------- the learner's decoder layer
class DecoderLayer(nn.Module):
    def __init__(self, d_model, num_heads, d_ff, dropout=0.0, mistake=None):
        super().__init__()
        self.mistake, self.p = mistake, dropout
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout)
        self.ff = FeedForward(d_model, d_ff, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, memory, memory_mask=None):
        m = self.mistake
        drop = (lambda t: F.dropout(t, self.p)) if m == "dropout in eval" else self.dropout
        norm2, norm3 = (self.norm1, self.norm1) if m == "same norm" else (self.norm2, self.norm3)
        mask = None if m == "no mask" else memory_mask
        if m == "flipped mask":
            mask = ~memory_mask
        if m == "norms swapped":
            norm2, norm3 = self.norm3, self.norm2

        def self_sub(h):
            if m == "upper triangle":
                return self.self_attn(h, attn_mask=torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).triu())
            return self.self_attn(h, is_causal=m != "not causal")

        def cross_sub(h):
            if m == "keys from the stream":
                return self.cross_attn(h)
            if m == "queries from the memory":
                return self.cross_attn(memory, h, h)
            source = norm2(memory) if m == "normed memory" else memory
            return self.cross_attn(h, source, source, attn_mask=mask, is_causal=m == "causal cross")

        subs = [(self_sub, self.norm1), (cross_sub, norm2), (self.ff, norm3)]
        if m == "cross first":
            subs = [subs[1], subs[0], subs[2]]
        for number, (f, norm) in enumerate(subs):
            if m == "post-LN":
                x = norm(x + drop(f(x)))
            elif m == "no cross residual" and number == 1:
                x = drop(f(norm(x)))
            elif m == "dropout on the sum":
                x = drop(x + f(norm(x)))
            elif m == "in place memory":
                memory.mul_(1.0)
                memory += 0.0 if number else 1.0
                x = x + drop(f(norm(x)))
            else:
                x = x + drop(f(norm(x)))
        return x


def _decoder(mistake):
    return lambda *args, **kwargs: DecoderLayer(*args, mistake=mistake, **kwargs)


def test_decoder_layer_accepts_the_reference():
    result = checks.check_decoder_layer(DecoderLayer)
    assert result.passed, result


@pytest.mark.parametrize("mistake, words", [
    ("not causal", "the self-attention is not causal"),
    ("causal cross", "the cross-attention is causal too"),
    ("keys from the stream", "keys and values come from the decoder stream"),
    ("queries from the memory", "takes its queries from the memory"),
    ("cross first", "the cross-attention comes before the masked self-attention"),
    ("same norm", "one LayerNorm is reused"),
    ("normed memory", "you normalised the memory with norm2"),
    ("no mask", "memory_mask is ignored"),
    ("flipped mask", "memory_mask's polarity is flipped"),
    ("upper triangle", "the self-attention's mask is the upper triangle"),
    ("norms swapped", "norm2 and norm3 are swapped"),
    ("post-LN", "which is post-LN; this layer is pre-LN"),
    ("no cross residual", "the cross-attention sublayer has no residual connection"),
    ("in place memory", "changed its input `memory` in place"),
    ("dropout in eval", "dropout is still on"),
    ("dropout on the sum", "dropout acts on the residual path"),
])
def test_decoder_layer_names_each_planted_mistake(mistake, words):
    result = checks.check_decoder_layer(_decoder(mistake))
    assert not result.passed and words in result.message, result.message


def test_block_messages_name_the_idea_not_the_line():
    for mistake in ("keys from the stream", "queries from the memory", "no mask", "post-LN"):
        message = checks.check_decoder_layer(_decoder(mistake)).message
        assert "self.cross_attn(" not in message and "attn_mask=memory_mask" not in message, message
        assert "x + f(LN(x))" not in message, message
    for mistake in ("swapped placement", "normed residual"):
        message = checks.check_encoder_block(_encoder(mistake)).message
        assert "x + f(LN(x))" not in message, message


# ----------------------------------------------------------------------------- one training step
def train_step_reference(model, optimizer, tokens):
    logits = model(tokens[:, :-1])  # (B, L - 1, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def _step(mistake):
    def step(model, optimizer, tokens):
        inputs, targets = {"unshifted": (tokens, tokens), "reversed": (tokens[:, 1:], tokens[:, :-1])}.get(
            mistake, (tokens[:, :-1], tokens[:, 1:]))
        if mistake in ("eval", "eval and back"):
            model.eval()
        logits = model(inputs)
        if mistake == "eval and back":
            model.train()
        if mistake == "unflattened":
            loss = F.cross_entropy(logits, targets)
        elif mistake == "view":
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        else:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   reduction="sum" if mistake == "sum" else "mean")
        if mistake == "step before backward":
            optimizer.zero_grad()
            optimizer.step()
            loss.backward()
            return loss.item()
        if mistake != "no zero_grad":
            optimizer.zero_grad()
        if mistake != "no backward":
            loss.backward()
        if mistake == "zero_grad after backward":
            optimizer.zero_grad()
        if mistake != "no step":
            optimizer.step()
        if mistake == "in place":
            tokens.zero_()
        if mistake == "loss after the update":
            with torch.no_grad():
                logits = model(inputs)
                return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()
        return loss if mistake == "tensor" else loss.item()
    return step


def test_train_step_accepts_the_reference_and_a_full_length_forward():
    assert checks.check_train_step(train_step_reference).passed

    def full_length(model, optimizer, tokens):  # a causal model: logits[:, :-1] of the whole batch are the same
        logits = model(tokens)[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    assert checks.check_train_step(full_length).passed


@pytest.mark.parametrize("mistake, words", [
    ("unshifted", "the targets are not shifted"),
    ("no zero_grad", "the gradients accumulate"),
    ("sum", "your loss is a sum over the tokens"),
    ("no step", "optimizer.step() is missing"),
    ("step before backward", "or runs before loss.backward()"),
    ("no backward", "loss.backward() is missing, or the gradients are cleared after the backward pass"),
    ("zero_grad after backward", "loss.backward() is missing, or the gradients are cleared after the backward pass"),
    ("reversed", "the shift runs backwards"),
    ("loss after the update", "the loss you return is computed again after the update"),
    ("eval", "your step switched the model to eval mode"),
    ("eval and back", "your step switched the model to eval mode"),
    ("unflattened", "flatten them"),
    ("view", "use .reshape(-1)"),
    ("tensor", "return loss.item()"),
    ("in place", "changed `tokens` in place"),
])
def test_train_step_names_each_planted_mistake(mistake, words):
    result = checks.check_train_step(_step(mistake))
    assert not result.passed and words in result.message, result.message

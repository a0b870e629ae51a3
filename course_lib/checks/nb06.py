"""Checkers for notebook 06 (transformer blocks): four predictions (RMSNorm, LayerNorm, the decoder's
cross-attention, SwiGLU's size), the learner's pre-LN/post-LN block and decoder layer against course_lib.blocks,
one training step, one cached decoding step, and the sinusoidal table."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.checks._core import (
    CheckFailure,
    as_array,
    as_number,
    as_tensor,
    call,
    call_watching,
    checker,
    compare,
    diagnose,
    is_close,
    require_result,
    unpack,
)
from course_lib.masks import causal_mask
from course_lib.positional import sinusoidal_table

__all__ = [
    "check_block_predictions",
    "check_encoder_block",
    "check_decoder_layer",
    "check_train_step",
    "check_cached_attention_step",
    "check_sinusoidal_encoding",
]

# ----------------------------------------------------------------------------- four predictions
_HIDDEN_SIZE = round(2 * 512 * 2048 / (3 * 512))  # the SwiGLU hidden size with a plain FFN's weights, rounded: 1365


def _prediction(number: int, got, right: float, tolerance: float, named: dict[float, str], hint: str) -> None:
    value = as_number(f"answer {number}", got)
    if abs(value - right) <= tolerance:
        return
    for wrong, why in named.items():
        if abs(value - wrong) <= tolerance:
            raise CheckFailure(f"question {number}: {value:g} is not it: {why}.")
    raise CheckFailure(f"question {number}: {value:g} is not it. Hint: {hint}.")


@checker
def check_block_predictions(fn):
    """Check four predictions: the RMS after RMSNorm, the norm after a scaled LayerNorm, the decoder's
    cross-attention queries, and the SwiGLU hidden size with a plain FFN's weights.

    Your function: `fn() -> (rms, norm, letter, hidden)`: two numbers, one letter (a, b or c) and a number, in
    the order asked. Names the usual wrong answers (a forgotten or squared gain, a norm for an RMS, the memory as
    the queries' source, two matrices counted instead of three).
    """
    answers = unpack(call(fn), 4, "return a tuple (rms, norm, letter, hidden) of four answers")
    letters = [i + 1 for i, a in enumerate(answers) if isinstance(a, str) and a.strip().lower() in ("a", "b", "c")]
    if letters and letters != [3]:
        raise CheckFailure(f"your answers are out of order: answer {letters[0]} is a letter, but the letter answers "
                           f"question 3; return them in the order asked, (rms, norm, letter, hidden)")
    _prediction(1, answers[0], 2.0, 0.02, {
        1.0: "that is the RMS straight out of the normalisation; RMSNorm's gain acts after it, on every feature, "
             "and the question sets it to 2",
        4.0: "you applied the gain twice (squared): a gain on every feature scales the RMS by that gain once",
        16.0: "that is the Euclidean norm, sqrt(d_model) times the RMS; the question asks for the RMS",
        8.0: "sqrt(d_model) = 8 relates the norm to the RMS; after RMSNorm the RMS is the gain itself"},
        "RMSNorm(x) = g * x / RMS(x): what is the RMS of x / RMS(x), and what does g do to it?")
    _prediction(2, answers[1], 4.0, 0.02, {
        16.0: "that is the norm straight out of the normalisation; the LayerNorm's weight acts after it, on every "
              "feature, and the question sets it to 0.25",
        1.0: "you applied the weight twice (squared): a weight on every feature scales the norm by that weight once",
        64.0: "you scaled the feature count (or the squared norm) by the weight; the norm is the square root of the "
              "sum of squares, and a weight on every feature scales it linearly",
        0.25: "LayerNorm gives each token's features mean 0 and VARIANCE 1, not norm 1: many features of mean square "
              "1 have a norm well above 1"},
        "after the normalisation the 256 features have mean 0 and variance 1: what is their norm, and what does "
        "a weight of 0.25 on every feature do to it?")
    letter = str(answers[2]).strip().lower()
    why_not = {
        "a": "the memory gives the cross-attention its keys and values; the queries come from the decoder: "
             "each target position asks the source a question",
        "c": "the cross-attention is the second sublayer: its input is the stream after the masked self-attention "
             "sublayer's residual add, normalised by its own LayerNorm (norm2)"}
    if letter in why_not:
        raise CheckFailure(f"question 3: '{letter}' is not it: {why_not[letter]}.")
    if letter != "b":
        raise CheckFailure(f"question 3: answer with one of a, b, c; got {answers[2]!r}")
    _prediction(4, answers[3], _HIDDEN_SIZE, 0.5, {
        2048.0: "the same hidden size gives SwiGLU three d_model x h matrices (gate, up, down) instead of two: "
                "1.5 times the weights",
        1024.0: "you counted four matrices in the SwiGLU FFN; it has three, d_model x h each (gate, up, down)",
        3072.0: "three matrices at the same budget must each be SMALLER than the plain FFN's two, so h is below d_ff"},
        "count the d_model x hidden matrices of each FFN, then find the hidden size at which the totals agree, "
        "rounded to the nearest whole number")
    return "all four predictions are right"


# ----------------------------------------------------------------------------- the learner's blocks, shared parts
def _check_linear(owner: str, name: str, got, expected: nn.Linear) -> nn.Linear:
    if not isinstance(got, nn.Linear) or got.weight.shape != expected.weight.shape:
        what = type(got).__name__ if not isinstance(got, nn.Linear) else f"weight {tuple(got.weight.shape)}"
        raise CheckFailure(f"{owner}.{name} should be an nn.Linear with weight {tuple(expected.weight.shape)}; got "
                           f"{what}")
    if (got.bias is None) != (expected.bias is None):
        raise CheckFailure(f"{owner}.{name} should have a bias, as nn.Linear has by default")
    return got


def _copy_into(module: Any, reference: Any, pairs: dict[str, str], attentions: tuple[str, ...]) -> None:
    """Copy the reference's weights into the learner's module, part by part (names as in the stub)."""
    with torch.no_grad():
        for name in attentions:
            theirs, ours = getattr(module, name), getattr(reference, name)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                _check_linear(f"self.{name}", proj, getattr(theirs, proj, None),
                              getattr(ours, proj)).load_state_dict(getattr(ours, proj).state_dict())
        linears = [m for m in module.ff.modules() if isinstance(m, nn.Linear)]
        if len(linears) != 2:
            raise CheckFailure(f"self.ff should hold two nn.Linear layers (d_model -> d_ff -> d_model, as "
                               f"FeedForward does); found {len(linears)}")
        for got, expected in zip(linears, (reference.ff.linear1, reference.ff.linear2), strict=True):
            _check_linear("self.ff", "linear", got, expected).load_state_dict(expected.state_dict())
        norms = [getattr(module, name) for name in pairs]
        shared = [f"self.{name}" for name, norm in zip(pairs, norms, strict=True) if norms.count(norm) > 1]
        if shared:
            raise CheckFailure(f"{' and '.join(shared)} are one and the same LayerNorm module (a = b = "
                               f"nn.LayerNorm(...)): each sublayer needs its own, with its own scale and shift; "
                               f"create one nn.LayerNorm per name")
        for name, path in pairs.items():
            norm = getattr(module, name)
            expected = reference.get_submodule(path)
            if not isinstance(norm, nn.LayerNorm) or norm.normalized_shape != expected.normalized_shape:
                raise CheckFailure(f"self.{name} should be nn.LayerNorm(d_model); got {type(norm).__name__}")
            norm.load_state_dict(expected.state_dict())


def _built_block(build, parts: tuple[str, ...], case: str, *args, **kwargs) -> Any:
    module = call(build, *args, what=f" ({case})", **kwargs)
    require_result("your class's instance", module, hint="pass the class itself, e.g. MyEncoderBlock")
    if not isinstance(module, nn.Module):
        raise CheckFailure(f"your class should build an nn.Module (class ...(nn.Module)); got {type(module).__name__}")
    missing = [name for name in parts if not isinstance(getattr(module, name, None), nn.Module)]
    if missing:
        raise CheckFailure(f"your block has no module named {', '.join(missing)}: name the parts as the stub does "
                           f"({', '.join(parts)}), so the checker can copy the same weights into yours and "
                           f"course_lib's")
    return module.double()


def _randomised(reference: nn.Module, seed: int) -> Any:
    """The reference in float64 with random weights, LayerNorms included (so two norms are never alike)."""
    g = torch.Generator().manual_seed(seed)
    reference = reference.double().eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.3 * noise if is_norm_weight else 0.3 * noise)
    return reference


def _run(module: nn.Module, inputs: dict[str, torch.Tensor], case: str, **kwargs) -> torch.Tensor:
    """module(*inputs), refusing an answer that changes its inputs in place (the caller's tensors)."""
    with torch.no_grad():
        out = call_watching(module, *inputs.values(), names=tuple(inputs), what=f" ({case})", **kwargs,
                            advice="The residual stream of the layer below is modified: write x = x + ..., which "
                                   "makes a new tensor, not x += ...")
    require_result(f"your block's output ({case})", out)
    return as_tensor(f"your block's output ({case})", out)


def _sublayers(x, steps, *, pre: bool, normed_residual: bool = False, no_residual: tuple[str, ...] = (),
               norm_then_add: bool = False):
    """Run the (name, sublayer, norm) steps in pre-LN or post-LN form, with the planted mistakes asked for."""
    for name, f, norm in steps:
        if norm_then_add:  # post-LN written as LN(x) + f(x)
            x = norm(x) + f(x)
        elif pre:
            h = norm(x)
            out = f(h)
            base = h if normed_residual else x
            x = out if name in no_residual else base + out
        else:
            out = f(x)
            x = norm(out if name in no_residual else x + out)
    return x


def _dropout_probe(module: nn.Module, zero: list[nn.Linear], inputs: dict[str, torch.Tensor], expected,
                   case: str, kwargs: dict) -> None:
    """With every sublayer's last linear layer zero, the sublayers add nothing; in training mode a block whose
    dropout acts only on the sublayers' outputs then returns `expected` exactly."""
    with torch.no_grad():
        for lin in zero:
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
    module.train()
    got = _run(module, inputs, case, **kwargs)
    module.eval()
    if tuple(got.shape) == tuple(expected.shape) and not torch.allclose(got, expected, atol=1e-10):
        dropped = (got == 0) & (expected != 0)
        where = " (some of its entries are 0)" if dropped.any() else ""
        raise CheckFailure(f"in training mode, with every sublayer's output zero, your block changed the residual "
                           f"stream{where} ({case}): dropout acts on the residual path. Drop only the sublayer's "
                           f"output, x + dropout(f(...)), never the sum")


def _eval_is_deterministic(module: nn.Module, inputs: dict[str, torch.Tensor], case: str, kwargs: dict) -> None:
    module.eval()
    first, second = _run(module, inputs, case, **kwargs), _run(module, inputs, case, **kwargs)
    if not torch.equal(first, second):
        raise CheckFailure(f"in eval() mode two calls give different outputs ({case}): dropout is still on. Use an "
                           f"nn.Dropout module, which .eval() switches off (F.dropout needs training=self.training)")
    module.train()
    trained = _run(module, inputs, case, **kwargs)
    module.eval()
    if torch.equal(trained, first):
        raise CheckFailure(f"in training mode your block gives its eval() output ({case}): the dropout argument is "
                           f"never used. Apply self.dropout to each sublayer's output: x + self.dropout(f(...))")


# ----------------------------------------------------------------------------- encoder block, pre-LN and post-LN
_ENCODER_PARTS = ("self_attn", "ff", "norm1", "norm2")


def _encoder_mistakes(ref, x, mask, norm_first: bool) -> dict[str, torch.Tensor]:
    n1, n2 = ref.attn_block.norm, ref.ff_block.norm

    def run(*, pre=norm_first, same_norm=False, ff_first=False, no_mask=False, causal=False, swapped=False,
            flip_mask=False, **mistake):
        first, second = (n2, n1) if swapped else (n1, n1 if same_norm else n2)
        given = ~mask if flip_mask else mask
        steps = [("attn", lambda h: ref.self_attn(h, attn_mask=None if no_mask else given, is_causal=causal), first),
                 ("ff", ref.ff, second)]
        return _sublayers(x, steps[::-1] if ff_first else steps, pre=pre, **mistake)

    placement = ("you normalised after the residual add, which is post-LN; with norm_first=True the LayerNorm goes "
                 "on the sublayer's input, and the residual add comes after the sublayer") if norm_first else (
                 "with norm_first=False (post-LN) the LayerNorm comes after the residual add, LN(x + f(x)); you "
                 "normalised the sublayer's input (pre-LN): forward must follow self.norm_first")
    mistakes = {
        placement: run(pre=not norm_first),
        "the residual connections are missing: each sublayer's output is ADDED to its input, x + f(...)":
            run(no_residual=("attn", "ff")),
        "the attention sublayer has no residual connection: add its output to x": run(no_residual=("attn",)),
        "the feed-forward sublayer has no residual connection: add its output to x": run(no_residual=("ff",)),
        "one LayerNorm serves both sublayers: norm1 belongs to the attention, norm2 to the feed-forward; each "
        "sublayer has its own scale and shift": run(same_norm=True),
        "norm1 and norm2 are swapped: norm1 goes with the attention, norm2 with the feed-forward (the checker "
        "copies the weights by these names)": run(swapped=True),
        "the feed-forward runs before the attention: a block is attention first, then the feed-forward":
            run(ff_first=True),
        "the mask is ignored: pass attn_mask to self.self_attn, so padded keys get no weight": run(no_mask=True),
        "the mask's polarity is flipped: your block attends where the mask is False. Here True = may attend, and "
        "the mask goes to the self-attention as it is given": run(flip_mask=True),
        "your block's self-attention is causal: an encoder block attends both ways, and a causal mask, where one is "
        "wanted, comes in through attn_mask (as section 5's TinyLM passes it)": run(causal=True),
    }
    if norm_first:
        mistakes["the residual adds the NORMALISED x to the sublayer's output; the residual path carries x itself, "
                 "un-normalised: that is pre-LN's identity path, and only the sublayer sees the LayerNorm"] = run(
            normed_residual=True)
    else:
        mistakes["in post-LN the LayerNorm normalises the SUM of the input and the sublayer's output; you normalised "
                 "the input alone and added the sublayer's output after"] = run(norm_then_add=True)
    return mistakes


@checker
def check_encoder_block(build):
    """Check a transformer block (self-attention + feed-forward), pre-LN and post-LN.

    Your function: `fn(d_model, num_heads, d_ff, norm_first=True, dropout=0.0) -> module`, i.e. your class
    MyEncoderBlock itself, whose instances have self_attn (a MultiHeadAttention), ff (two nn.Linear layers, as
    FeedForward), norm1 and norm2 (nn.LayerNorm) and forward(x, attn_mask=None) -> (B, T, d_model).
    Copies random weights into yours and into course_lib.blocks.EncoderLayer(norm_first=True and False) and
    compares in float64, with a padding mask; names the LayerNorm on the wrong side of the residual, post-LN written
    as LN(x) + f(x), a missing residual, the residual taken after the norm, a flipped or ignored mask, one LayerNorm
    for both sublayers (or one module under both
    names), the sublayers swapped, a causal self-attention, dropout left on in eval mode or
    applied to the residual path or never applied, and inputs changed in place.
    """
    from course_lib.blocks import EncoderLayer
    from course_lib.masks import padding_mask

    B, T, D, H, FF = 2, 5, 12, 3, 20
    g = torch.Generator().manual_seed(6)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    mask = padding_mask([5, 3], T)  # (B, 1, 1, T)
    pairs = {"norm1": "attn_block.norm", "norm2": "ff_block.norm"}
    for norm_first in (True, False):
        case = f"norm_first={norm_first}, B={B}, T={T}, d_model={D}, H={H}, d_ff={FF}, padding mask"
        ref = _randomised(EncoderLayer(D, H, FF, norm_first=norm_first), seed=1 + norm_first)
        yours = _built_block(build, _ENCODER_PARTS, case, D, H, FF, norm_first=norm_first, dropout=0.0).eval()
        _copy_into(yours, ref, pairs, ("self_attn",))
        got = _run(yours, {"x": x.clone(), "attn_mask": mask.clone()}, case)
        with torch.no_grad():
            expected = ref(x, mask)
            if tuple(got.shape) == tuple(expected.shape) and not is_close(got, expected):
                message = diagnose(got, _encoder_mistakes(ref, x, mask, norm_first))
                if message:
                    raise CheckFailure(f"{case}: {message}.")
        compare(f"your block's output ({case})", got, expected,
                hint=("go through the block step by step against course_lib.blocks.EncoderLayer: the mask as "
                      "given, each sublayer with its own LayerNorm, each residual add, the order of the two"))
        case = f"norm_first={norm_first}, dropout=0.5"
        dropping = _built_block(build, _ENCODER_PARTS, case, D, H, FF, norm_first=norm_first, dropout=0.5)
        _copy_into(dropping, ref, pairs, ("self_attn",))
        inputs = {"x": x.clone(), "attn_mask": mask.clone()}
        _eval_is_deterministic(dropping, inputs, case, {})
        compare(f"your block's output in eval() mode ({case})", _run(dropping, inputs, case), expected,
                hint="in eval() mode dropout does nothing: the output is the one without dropout")
        with torch.no_grad():
            n1, n2 = ref.attn_block.norm, ref.ff_block.norm
            unchanged = x if norm_first else n2(n1(x))  # what the block returns when both sublayers add 0
        _dropout_probe(dropping, [dropping.self_attn.out_proj, _last_linear(dropping.ff)], inputs, unchanged,
                       case, {})
    return ("pre-LN and post-LN equal course_lib.blocks.EncoderLayer with the same weights; dropout only on the "
            "sublayers")


def _last_linear(module: nn.Module) -> nn.Linear:
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1]


# ----------------------------------------------------------------------------- decoder layer (pre-LN)
_DECODER_PARTS = ("self_attn", "cross_attn", "ff", "norm1", "norm2", "norm3")


def _decoder_mistakes(ref, x, memory, mask) -> list[tuple[str, torch.Tensor | None]]:
    n1, n2, n3 = ref.self_block.norm, ref.cross_block.norm, ref.ff_block.norm

    def run(*, causal=True, kv="memory", cross_first=False, same_norm=False, no_mask=False, norm_memory=False,
            pre=True, queries_from_memory=False, causal_cross=False, flip_mask=False, future=False,
            norms_swapped=False, **mistake):
        def cross(h):
            if queries_from_memory:
                return ref.cross_attn(memory, h, h)
            if causal_cross:
                return ref.cross_attn(h, memory, memory, attn_mask=mask, is_causal=True)
            source = n2(memory) if norm_memory else {"memory": memory, "stream": h}[kv]
            return ref.cross_attn(h, source, source, attn_mask=None if no_mask else (~mask if flip_mask else mask))

        def self_attention(h):
            if future:  # a hand-made mask of the upper triangle: each position sees itself and the future
                return ref.self_attn(h, attn_mask=torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).triu())
            return ref.self_attn(h, is_causal=causal)

        cross_norm, ff_norm = (n3, n2) if norms_swapped else (n2, n3)
        steps = [("self", self_attention, n1),
                 ("cross", cross, n1 if same_norm else cross_norm), ("ff", ref.ff, n1 if same_norm else ff_norm)]
        if cross_first:
            steps = [steps[1], steps[0], steps[2]]
        return _sublayers(x, steps, pre=pre, **mistake)

    keys_from_stream = ("the cross-attention's keys and values come from the decoder stream: only its queries do; "
                        "its keys and values come from the encoder's memory")
    mistakes = [
        ("the self-attention is not causal: every position sees the tokens after it. Pass is_causal=True (or a "
         "causal mask) to self.self_attn", run(causal=False)),
        (keys_from_stream, run(kv="stream", no_mask=True)),
        (keys_from_stream, run(kv="stream") if x.shape[1] == memory.shape[1] else None),
        ("the cross-attention takes its queries from the memory: the decoder asks, so the queries come from the "
         "decoder stream and the keys and values from the memory",
         run(queries_from_memory=True) if x.shape[1] == memory.shape[1] else None),
        ("the cross-attention is causal too: target position t may read every source position, so only the "
         "self-attention gets is_causal=True", run(causal_cross=True)),
        ("the cross-attention comes before the masked self-attention: the order is self-attention, "
         "cross-attention, feed-forward", run(cross_first=True)),
        ("one LayerNorm is reused: each of the three sublayers has its own (norm1, norm2, norm3)",
         run(same_norm=True)),
        ("you normalised the memory with norm2: in a pre-LN layer only the decoder stream goes through the "
         "sublayer's LayerNorm; the memory is used as the encoder returned it", run(norm_memory=True)),
        ("memory_mask is ignored: the cross-attention needs it, so that padded source positions get no weight",
         run(no_mask=True)),
        ("memory_mask's polarity is flipped: your cross-attention attends to the padded source positions only. "
         "Here True = real source token, may attend, and the mask goes to the cross-attention as it is given",
         run(flip_mask=True)),
        ("the self-attention's mask is the upper triangle: each position sees itself and the tokens AFTER it. A "
         "causal mask lets position i see positions j <= i, the lower triangle", run(future=True)),
        ("norm2 and norm3 are swapped: norm2 belongs to the cross-attention, norm3 to the feed-forward (the "
         "checker copies the weights by these names)", run(norms_swapped=True)),
        ("you normalised after the residual add, which is post-LN; this layer is pre-LN: each LayerNorm goes on "
         "its sublayer's input, and the residual add comes after the sublayer", run(pre=False)),
        ("the residual adds the NORMALISED stream to the sublayer's output; the residual path carries x itself, "
         "un-normalised, and only the sublayer sees the LayerNorm", run(normed_residual=True)),
        ("the residual connections are missing: each sublayer's output is ADDED to its input",
         run(no_residual=("self", "cross", "ff"))),
    ]
    for name, words in (("self", "masked self-attention"), ("cross", "cross-attention"), ("ff", "feed-forward")):
        mistakes.append((f"the {words} sublayer has no residual connection: add its output to x",
                         run(no_residual=(name,))))
    return mistakes


def _first_match(got, mistakes) -> str | None:
    return next((message for message, wrong in mistakes if wrong is not None and is_close(got, wrong)), None)


@checker
def check_decoder_layer(build):
    """Check a pre-LN decoder layer: masked self-attention, cross-attention to the memory, feed-forward.

    Your function: `fn(d_model, num_heads, d_ff, dropout=0.0) -> module`, i.e. your class MyDecoderLayer itself,
    whose instances have self_attn and cross_attn (MultiHeadAttention), ff (two nn.Linear layers), norm1, norm2,
    norm3 (nn.LayerNorm) and forward(x, memory, memory_mask=None) -> (B, T, d_model), with x (B, T, d_model),
    memory (B, S, d_model) and memory_mask (B, 1, 1, S), True = real source token. Copies random weights into
    yours and into course_lib.blocks.DecoderLayer(norm_first=True) and compares in float64 (T = S, then T != S);
    names a non-causal self-attention, an upper-triangle mask, a causal cross-attention, cross-attention keys and
    values from the decoder stream (or its queries from the memory), the two attentions swapped, a reused
    LayerNorm, norm2 and norm3 swapped, a normalised memory, an ignored or flipped memory_mask, post-LN, a missing or
    normalised residual, dropout left on in eval mode or applied to the residual path, and inputs changed in
    place.
    """
    from course_lib.blocks import DecoderLayer
    from course_lib.masks import padding_mask

    D, H, FF = 12, 3, 20
    g = torch.Generator().manual_seed(7)
    pairs = {"norm1": "self_block.norm", "norm2": "cross_block.norm", "norm3": "ff_block.norm"}
    ref = _randomised(DecoderLayer(D, H, FF, norm_first=True), seed=3)
    for B, T, S, lengths in ((2, 5, 5, [5, 3]), (2, 4, 6, [6, 2])):
        x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
        memory = torch.randn(B, S, D, generator=g, dtype=torch.float64)
        mask = padding_mask(lengths, S)  # (B, 1, 1, S)
        case = f"B={B}, T={T}, S={S}, d_model={D}, H={H}, d_ff={FF}, source lengths {lengths}"
        yours = _built_block(build, _DECODER_PARTS, case, D, H, FF, dropout=0.0).eval()
        _copy_into(yours, ref, pairs, ("self_attn", "cross_attn"))
        inputs = {"x": x.clone(), "memory": memory.clone()}
        got = _run(yours, inputs, case, memory_mask=mask.clone())
        with torch.no_grad():
            expected = ref(x, memory, memory_mask=mask)
            if tuple(got.shape) == tuple(expected.shape) and not is_close(got, expected):
                message = _first_match(got, _decoder_mistakes(ref, x, memory, mask))
                if message:
                    raise CheckFailure(f"{case}: {message}.")
        compare(f"your layer's output ({case})", got, expected,
                hint=('three sublayers, each with its own norm and residual: masked self-attention (each position '
                      'sees itself and the past), cross-attention whose keys and values are the memory, with the '
                      'memory mask as given, then the feed-forward network'))
    case = "dropout=0.5"
    dropping = _built_block(build, _DECODER_PARTS, case, D, H, FF, dropout=0.5)
    _copy_into(dropping, ref, pairs, ("self_attn", "cross_attn"))
    kwargs = {"memory_mask": mask}
    _eval_is_deterministic(dropping, inputs, case, kwargs)
    compare(f"your layer's output in eval() mode ({case})", _run(dropping, inputs, case, **kwargs), expected,
            hint="in eval() mode dropout does nothing: the output is the one without dropout")
    _dropout_probe(dropping, [dropping.self_attn.out_proj, dropping.cross_attn.out_proj, _last_linear(dropping.ff)],
                   inputs, x, case, kwargs)
    return ("equal to course_lib.blocks.DecoderLayer with the same weights (T = S and T != S, padded memory), "
            "causal, dropout only on the sublayers")


# ----------------------------------------------------------------------------- one training step
def _step_model(seed: int) -> nn.Module:
    """A tiny next-token model, (B, L) token ids -> (B, L, V) logits, each position on its own (causal), in
    training mode."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(7, 6), nn.Tanh(), nn.Linear(6, 7)).double().train()


def _step_variant(model, optimizer, tokens, *, shifted: bool | str = True, zero_grad=True, reduction="mean",
                  loss_after=False) -> float:
    inputs, targets = {True: (tokens[:, :-1], tokens[:, 1:]), False: (tokens, tokens),
                       "reversed": (tokens[:, 1:], tokens[:, :-1])}[shifted]
    logits = model(inputs)  # (B, L, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
    if zero_grad:
        optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if loss_after:
        with torch.no_grad():
            logits = model(inputs)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
    return loss.item()


def _steps(step, batches, *, seed: int = 4, learner: bool = False, **variant) -> tuple[list[float], nn.Module]:
    model = _step_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for number, tokens in enumerate(batches):
        if not learner:
            losses.append(step(model, optimizer, tokens, **variant))
            continue
        mine = tokens.clone()
        before = [p.detach().clone() for p in model.parameters()]
        case = f"step {number + 1}, tokens {tuple(tokens.shape)}"
        modes: list[bool] = []
        hook = model.register_forward_pre_hook(lambda module, args: modes.append(module.training))  # noqa: B023
        try:
            loss = call(lambda: step(model, optimizer, mine), what=f" ({case})")  # noqa: B023 (called at once)
        except CheckFailure as failure:
            if "view size is not compatible" in str(failure):
                raise CheckFailure(f"{failure}. tokens[:, 1:] is a slice whose rows are not contiguous in memory, so "
                                   f".view(-1) cannot flatten it: use .reshape(-1)") from None
            if "Expected target size" in str(failure) or "expected input batch_size" in str(failure):
                raise CheckFailure(f"{failure}. F.cross_entropy wants logits (N, V) and targets (N,): flatten them, "
                                   f"merging the batch and position axes into one axis of N = B * L tokens") from None
            raise
        finally:
            hook.remove()
        if not all(modes) or not model.training:
            raise CheckFailure(f"your step switched the model to eval mode ({case}): a training step runs in training "
                               f"mode, where dropout is on, and leaves the mode as the caller set it. Switching to "
                               f"eval belongs to evaluation, outside the step")
        if not torch.equal(mine, tokens):
            raise CheckFailure(f"your step changed `tokens` in place ({case}): the caller's batch is modified")
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            raise CheckFailure("return loss.item(), a float: the loss tensor keeps the whole step's autograd graph "
                               "alive, and a list of them keeps every step's")
        losses.append(as_number(f"the loss your step returned ({case})", loss))
        if all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)):
            grads = [p.grad for p in model.parameters()]
            if all(g is not None and bool(g.abs().sum() > 0) for g in grads):
                raise CheckFailure(f"your step leaves the weights unchanged ({case}) although the gradients are "
                                   f"there: optimizer.step() is missing, or runs before loss.backward()")
            raise CheckFailure(f"your step leaves the weights unchanged ({case}) and no gradient is left: "
                               f"loss.backward() is missing, or the gradients are cleared after the backward pass "
                               f"and before the update, so the update sees none")
    return losses, model


@checker
def check_train_step(fn):
    """Check one training step of a next-token model.

    Your function: `fn(model, optimizer, tokens) -> loss`: tokens (B, L) int64 token ids, model(ids (B, L')) ->
    logits (B, L', V); predict every token from the ones before it (cross-entropy, mean over the tokens), update
    the weights with the optimizer, and return the loss as a float. Runs three steps with SGD on a tiny model
    from the same start as the reference; names unshifted targets, a missing zero_grad, a missing backward or
    step, a summed loss, a reversed shift, the loss recomputed after the update, a model switched to eval mode,
    unflattened logits, .view on a slice, a returned tensor and a changed `tokens`.
    """
    g = torch.Generator().manual_seed(8)
    batches = [torch.randint(0, 7, (3, 6), generator=g) for _ in range(3)]
    got_losses, got_model = _steps(fn, batches, learner=True)
    expected_losses, expected_model = _steps(_step_variant, batches)
    if np.allclose(got_losses, expected_losses, atol=1e-10) and all(
            is_close(a, b) for a, b in zip(got_model.parameters(), expected_model.parameters(), strict=True)):
        return "three steps give the reference's losses and weights"
    for message, variant in (
            ("the targets are not shifted: the model must predict token t + 1 from tokens 0..t, so the inputs "
             "leave out the last token and the targets the first", {"shifted": False}),
            ("the shift runs backwards: your model predicts each token from the ones AFTER it. The inputs are the "
             "earlier tokens and the targets the tokens one step later", {"shifted": "reversed"}),
            ("the loss you return is computed again after the update, on the new weights: return the loss of the "
             "forward pass that the update came from, the one you backpropagated", {"loss_after": True}),
            ("the gradients accumulate from step to step: clear them before each backward pass",
             {"zero_grad": False}),
            ("your loss is a sum over the tokens: take the mean (F.cross_entropy's default), so the step size does "
             "not grow with the batch", {"reduction": "sum"})):
        losses, model = _steps(_step_variant, batches, **variant)
        if np.allclose(got_losses, losses, atol=1e-10) and all(
                is_close(a, b) for a, b in zip(got_model.parameters(), model.parameters(), strict=True)):
            raise CheckFailure(message)
    compare("the losses your step returned", got_losses, expected_losses,
            hint=('a language-model step: predict each next token from the ones before it, score against '
                  'the shifted targets, then clear the old gradients, backpropagate and update'))
    for number, (a, b) in enumerate(zip(got_model.parameters(), expected_model.parameters(), strict=True)):
        compare(f"parameter {number} after three steps", a.detach(), b.detach(),
                hint="the returned loss is right but the update is not: one backward pass and one update per "
                     "call, with the gradients cleared before the backward pass")
    return "three steps give the reference's losses and weights"


@checker
def check_sinusoidal_encoding(fn):
    """Check the sinusoidal positional encoding table.

    Your function: `fn(max_len, d_model) -> table`, a (max_len, d_model) array or tensor with
    PE[pos, 2i] = sin(pos / 10000^(2i / d_model)) and PE[pos, 2i+1] = cos(the same angle).
    Checks three tables (up to 50 x 32) to 1e-5; names swapped sine and cosine and a wrong frequency.
    """
    for max_len, d_model in ((10, 8), (6, 6), (50, 32)):
        expected = sinusoidal_table(max_len, d_model, dtype=torch.float64).numpy()
        got = call(fn, max_len, d_model, what=f" (max_len={max_len}, d_model={d_model})")
        got_np = as_array(f"your table for max_len={max_len}, d_model={d_model}", got)
        if got_np.shape == expected.shape:
            swapped = expected.copy()
            swapped[:, 0::2], swapped[:, 1::2] = expected[:, 1::2], expected[:, 0::2]
            if np.allclose(got_np, swapped, atol=1e-5):
                raise CheckFailure("sine and cosine are swapped: even feature columns 2i take the sine, odd "
                                   "columns 2i+1 the cosine (so PE[0] = [0, 1, 0, 1, ...])")
            if np.allclose(got_np[0], expected[0], atol=1e-5) and not np.allclose(got_np, expected, atol=1e-5):
                raise CheckFailure(
                    f"position 0 is right but later positions are off (max error "
                    f"{np.abs(got_np - expected).max():.3g} for max_len={max_len}, d_model={d_model}): check the "
                    f"frequency 1 / 10000^(2i / d_model) - the exponent uses the EVEN index 2i of the pair, "
                    f"divided by d_model, and a sine/cosine pair shares one frequency")
        compare(f"PE for max_len={max_len}, d_model={d_model}", got_np, expected, atol=1e-5, rtol=1e-5,
                hint=('each pair of columns is one frequency: the angle grows with the position and shrinks as '
                      "the column pair's index grows"))
    return "3 tables (up to 50 x 32) match the formula"


def _reference_step(q_t, k_t, v_t, k_cache, v_cache):
    k_cache = torch.cat([k_cache, k_t], dim=-2)
    v_cache = torch.cat([v_cache, v_t], dim=-2)
    scores = q_t @ k_cache.transpose(-2, -1) / q_t.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v_cache, k_cache, v_cache


@checker
def check_cached_attention_step(fn):
    """Check one decoding step of attention with a KV cache.

    Your function: `fn(q_t, k_t, v_t, k_cache, v_cache) -> (out_t, k_cache, v_cache)`, all torch
    tensors: q_t, k_t, v_t (B, H, 1, d) for the new token, the caches (B, H, t, d) for the t earlier
    tokens (t may be 0); out_t (B, H, 1, d), and the returned caches hold t + 1 tokens.
    Runs six steps from an empty cache and compares each out_t with full causal attention and the caches with
    the keys and values so far, oldest first; names a cache that does not grow or grows along the wrong axis, the
    tuple in the wrong order, the new token put first, the key and value caches swapped, scores computed before
    the new key is appended, attending to the new token only, a missing scale, a softmax over the query axis,
    and a causal mask built for the one-row score matrix.
    """
    g = torch.Generator().manual_seed(0)
    B, H, T, d = 2, 3, 6, 4
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    scores = q @ k.transpose(-2, -1) / d ** 0.5
    full = torch.softmax(scores.masked_fill(~causal_mask(T), float("-inf")), dim=-1) @ v  # (B, H, T, d)
    k_cache = v_cache = torch.zeros(B, H, 0, d, dtype=torch.float64)
    for t in range(T):
        try:
            result = call(fn, q[:, :, t: t + 1], k[:, :, t: t + 1], v[:, :, t: t + 1], k_cache, v_cache,
                          what=f" at step t={t}")
        except CheckFailure as crash:
            if "must match except in dimension" in str(crash):
                raise CheckFailure(f"{crash}. You joined the new token to the cache along another axis than the "
                                   f"token axis: the caches are (B, H, t, d), and a new token adds one entry to t, "
                                   f"the third of the four axes") from None
            raise
        if not isinstance(result, tuple) or len(result) != 3:
            raise CheckFailure(f"return a tuple (out_t, k_cache, v_cache); got {type(result).__name__}")
        kept_k, kept_v = k[:, :, : t + 1], v[:, :, : t + 1]  # the caches after this step, oldest token first
        expected_out = full[:, :, t: t + 1]
        if is_close(result[0], kept_k) and is_close(result[1], kept_v) and is_close(result[2], expected_out):
            raise CheckFailure("your tuple is in the wrong order: the output comes first, then the two caches, "
                               "(out_t, k_cache, v_cache)")
        out_t, k_cache, v_cache = result
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if not isinstance(cache, torch.Tensor) or tuple(cache.shape) != (B, H, t + 1, d):
                shape = tuple(cache.shape) if hasattr(cache, "shape") else type(cache).__name__
                raise CheckFailure(f"after step t={t} the returned {name} should hold t + 1 = {t + 1} tokens, "
                                   f"shape {(B, H, t + 1, d)}; got {shape}. Hint: each step appends the new token's "
                                   f"key and value to the caches, along the token axis")
        if is_close(k_cache, v[:, :, : t + 1]) and is_close(v_cache, k[:, :, : t + 1]):
            raise CheckFailure(f"after step t={t} your k_cache holds the values and your v_cache the keys: k_t "
                               f"belongs in the key cache and v_t in the value cache")
        if t > 0 and is_close(k_cache, k[:, :, : t + 1].flip(-2)) and is_close(v_cache, v[:, :, : t + 1].flip(-2)):
            raise CheckFailure(f"after step t={t} the newest token is at the FRONT of your caches: they must keep "
                               f"the tokens in order, oldest first, so that position i of the cache is token i "
                               f"(the attention output does not show it, but anything that reads positions does)")
        for name, cache, kept in (("k_cache", k_cache, kept_k), ("v_cache", v_cache, kept_v)):
            if not is_close(cache, kept):
                raise CheckFailure(f"after step t={t} your {name} does not hold tokens 0..{t} in order, oldest "
                                   f"first: keep the cache you were given as it is and add the new token after it")
        if t == 0 and hasattr(out_t, "shape") and tuple(out_t.shape) == (B, H, 1, d):
            first = as_array("out_t at step t=0", out_t)
            if np.allclose(first, 0.0) or not np.isfinite(first).all():
                raise CheckFailure("at the first step the output is 0 or NaN: the new token must attend to "
                                   "itself, so append k_t, v_t to the cache BEFORE computing the scores")
        if t > 0 and is_close(out_t, v[:, :, :1]):
            raise CheckFailure(f"at step t={t} the new token attends only to the first one: a causal mask built for "
                               f"the (1, t + 1) score row (triu / tril of its shape) treats the new query as position "
                               f"0. It is the LAST position and may see every cached key: no mask is needed")
        if t > 0 and not is_close(out_t, expected_out, atol=1e-8, rtol=1e-6):
            q_t = q[:, :, t: t + 1]
            scores = q_t @ kept_k.transpose(-2, -1)  # (B, H, 1, t + 1), unscaled
            mistake = diagnose(out_t, {
                f"at step t={t} the new token attends only to itself: it must attend to every token in the cache, "
                f"the earlier ones and its own": v[:, :, t: t + 1],
                f"at step t={t} the scores are not scaled: divide the query-key dot products by sqrt(d), as in "
                f"full attention": torch.softmax(scores, dim=-1) @ kept_v,
                f"at step t={t} the softmax runs over the wrong axis: the score row has one query and t + 1 keys, "
                f"and the weights must sum to 1 over the keys (a softmax over the single query gives every key weight "
                f"1)": torch.softmax(scores / d**0.5, dim=-2) @ kept_v,
            })
            if mistake:
                raise CheckFailure(mistake)
        compare(f"out_t at step t={t}", out_t, expected_out, atol=1e-8, rtol=1e-6,
                hint="the new token's query attends, as in full attention, to every cached token including its own; "
                     "no causal mask is needed, since the cache holds only the past")
    return f"{T} steps equal full causal attention (B={B}, H={H}, d={d})"

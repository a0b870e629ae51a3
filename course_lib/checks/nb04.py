"""Checkers for notebook 04 (multi-head attention).

The learner works in torch, float64, so a correct answer agrees with course_lib to ~1e-15 and
any larger difference is a bug. On a wrong answer the checkers try the classic mistakes
(a view without the transpose, heads interleaved, a missing 1/sqrt(d_head), scaling by
sqrt(d_model), one big head, softmax over queries, no W_O, counting W_Q per head) and say
which one was made.
"""

from __future__ import annotations

import numpy as np
import torch

from course_lib.attention import scaled_dot_product_attention
from course_lib.checks._core import (
    CheckFailure,
    as_array,
    as_tensor,
    call,
    call_watching,
    checker,
    compare,
    diagnose,
    is_close,
    multiple_choice,
    unpack,
)

__all__ = [
    "check_split_heads",
    "check_merge_heads",
    "check_mha_forward",
    "check_mha_module",
    "check_mha_param_count",
    "check_cross_mha_forward",
    "check_cross_mha_cost",
    "check_heads_quiz",
]


# ----------------------------------------------------------------------------- inputs changed in place
TENSOR_ADVICE = ("Return a new tensor instead of writing into the input: the forms without a trailing underscore "
                 "(masked_fill, not masked_fill_) and x = x + ... make new tensors; +=, x[...] = ... and the "
                 "underscore forms do not")  # shared with notebook 05's checkers


# ----------------------------------------------------------------------------- split / merge heads
@checker
def check_split_heads(fn):
    """Check splitting the features into heads.

    Your function: `fn(x, num_heads) -> heads`, with x a (B, T, d_model) tensor and heads
    (B, H, T, d_head), head h holding features h*d_head ... (h+1)*d_head - 1 of every token.
    Checks four shapes (one with H = 1) exactly; names a reshape without the transpose (tokens mixed
    into heads) and interleaved heads.
    """
    cases = [(1, 3, 4, 2), (2, 5, 12, 3), (3, 4, 16, 4), (2, 3, 8, 1)]  # (B, T, d_model, H)
    for B, T, D, H in cases:
        x = torch.arange(B * T * D, dtype=torch.float64).view(B, T, D)  # every entry tells where it came from
        d = D // H
        got = call_watching(fn, x.clone(), H, names=("x", "num_heads"), advice=TENSOR_ADVICE)
        expected = x.view(B, T, H, d).transpose(1, 2)
        as_tensor(f"split_heads(x of shape {(B, T, D)}, {H})", got)
        if tuple(got.shape) == tuple(expected.shape) and not is_close(got, expected):
            mistake = diagnose(got, {
                "you reshaped (B, T, d_model) straight to (B, H, T, d_head): that mixes tokens into heads. A reshape "
                "keeps the memory order, token by token; split each token's features into heads first, then move "
                "the head axis in front of time": x.reshape(B, H, T, d),
                "the heads are interleaved: feature j went to head j % H. Head h must hold the CONTIGUOUS block of "
                "features h*d_head ... (h+1)*d_head - 1, so view as (B, T, H, d_head), not (B, T, d_head, H)":
                    x.view(B, T, d, H).permute(0, 3, 1, 2),
            })
            if mistake:
                raise CheckFailure(f"for x of shape {(B, T, D)} and H = {H}: {mistake}.")
        compare(f"split_heads(x of shape {(B, T, D)}, num_heads={H})", got, expected, atol=0, rtol=0,
                hint=('a head is a contiguous block of d_head features: view the features as (H, d_head), then '
                      'move the head axis in front of the time axis'))
    return "4 shapes (incl. H = 1): every feature lands in the right head, token and position"


@checker
def check_merge_heads(fn):
    """Check concatenating the heads back, the inverse of split_heads.

    Your function: `fn(x) -> merged`, with x a (B, H, T, d_head) tensor and merged (B, T, H * d_head),
    head 0's features first. Checks three shapes exactly; names a reshape without the transpose and
    interleaved heads.
    """
    cases = [(1, 2, 3, 2), (2, 3, 5, 4), (3, 4, 2, 1)]  # (B, H, T, d_head)
    for B, H, T, d in cases:
        x = torch.arange(B * H * T * d, dtype=torch.float64).view(B, H, T, d)
        got = call_watching(fn, x.clone(), names=("x",), advice=TENSOR_ADVICE)
        expected = x.transpose(1, 2).reshape(B, T, H * d)
        as_tensor(f"merge_heads(x of shape {(B, H, T, d)})", got)
        if tuple(got.shape) == tuple(expected.shape) and not is_close(got, expected):
            mistake = diagnose(got, {
                "you reshaped (B, H, T, d_head) straight to (B, T, H*d_head): tokens and heads get mixed. A reshape "
                "keeps the memory order, head by head; move the head axis back behind time before flattening the "
                "heads into one feature axis":
                    x.reshape(B, T, H * d),
                "the heads are interleaved (feature j from head j % H): concatenate them instead, head 0's "
                "d_head features first": x.permute(0, 2, 3, 1).reshape(B, T, H * d),
            })
            if mistake:
                raise CheckFailure(f"for x of shape {(B, H, T, d)}: {mistake}.")
        compare(f"merge_heads(x of shape {(B, H, T, d)})", got, expected, atol=0, rtol=0,
                hint=('merging undoes the split: move the head axis back behind time, then flatten (H, d_head) '
                      'into one axis; a transposed tensor is not contiguous'))
    return "3 shapes: heads concatenated in order, head 0 first"


# ----------------------------------------------------------------------------- the forward pass
def _mha_variant(x, w_q, w_k, w_v, w_o, H, *, memory=None, scale="d_head", heads=True, softmax_dim=-1,
                 out_proj=True, mask=None, split_transpose=True, merge_transpose=True, forgot_T: bool | str = False):
    """Multi-head attention with one thing changed, to recognise a learner's mistake. Queries come from x
    (B, T, d_model), keys and values from memory (B, S, kdim) (default: x); w_q, w_k (H d_k, .), w_v (H d_v, .),
    w_o (d_model, H d_v) in nn.Linear's layout."""
    memory = x if memory is None else memory
    B, T, S = x.shape[0], x.shape[1], memory.shape[1]
    h = H if heads else 1
    d_k, d_v = w_q.shape[0] // h, w_v.shape[0] // h

    def project(t, w, inputs=True):
        return t @ (w if forgot_T is True or (forgot_T == "inputs" and inputs) else w.T)

    def split(t, L, d):  # (B, L, h*d) -> (B, h, L, d)
        return t.reshape(B, L, h, d).transpose(1, 2) if split_transpose else t.reshape(B, h, L, d)

    q, k, v = split(project(x, w_q), T, d_k), split(project(memory, w_k), S, d_k), split(project(memory, w_v), S, d_v)
    factor = {"d_head": d_k**-0.5, "d_model": x.shape[-1] ** -0.5, "d_v": d_v**-0.5, "none": 1.0}[scale]
    scores = q @ k.transpose(-2, -1) * factor  # (B, h, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.nan_to_num(torch.softmax(scores, dim=softmax_dim), nan=0.0)  # a query with no key: weights 0
    heads_out = weights @ v  # (B, h, T, d_v)
    out = heads_out.transpose(1, 2).reshape(B, T, h * d_v) if merge_transpose else heads_out.reshape(B, T, h * d_v)
    return project(out, w_o, inputs=False) if out_proj else out


_FORWARD_ARGS = ("x", "w_q", "w_k", "w_v", "w_o", "num_heads")
_CROSS_ARGS = ("x", "memory", "w_q", "w_k", "w_v", "w_o", "num_heads")
_RESHAPE_SPLIT = ("you reshaped to (B, H, T, d_head) without the transpose: head 0 then gets the first T*d_head "
                  "numbers, i.e. tokens 0..T/H-1 each cut into H fake tokens. Split each token's features into "
                  "heads first, then move the head axis in front of time")
_RESHAPE_MERGE = ("you merged the heads with a reshape of (B, H, T, d_head) without moving the head axis back: "
                  "tokens and heads get mixed. Put time before the heads again, then flatten the heads into one "
                  "feature axis")
_FORGOT_T = ("the projections ignore nn.Linear's layout: a weight is stored (out_features, in_features), one ROW per "
             "output feature, so projecting row vectors multiplies by the transposed weight (with square weights the "
             "untransposed product runs, but it computes something else)")
_FORGOT_T_INPUTS = ("the query, key and value projections ignore nn.Linear's layout (the output projection does "
                    "not): a weight is stored (out_features, in_features), one ROW per output feature, so projecting "
                    "row vectors multiplies by the transposed weight, for w_q, w_k and w_v as for w_o")
_MASK_FLIPPED = ("the mask's polarity is flipped: your output is attention where the mask is False. Here True = may "
                 "attend (F.scaled_dot_product_attention's convention, not nn.MultiheadAttention's), so a query "
                 "attends to the keys where its mask is True")


@checker
def check_mha_forward(fn):
    """Check a multi-head attention forward pass.

    Your function: `fn(x, w_q, w_k, w_v, w_o, num_heads, mask=None) -> out`, with x (B, T, d_model),
    the weights (d_model, d_model) in nn.Linear's layout without biases (q = x @ w_q.T), and a bool
    mask broadcastable to (B, H, T, T), True = may attend; out (B, T, d_model), float64 tensors.
    Checks four cases (H = 1 to 4, one with a causal mask) against course_lib to 1e-10; names a
    missing scale, scaling by sqrt(d_model), a softmax over the queries, a missing W_O, a forgotten .T,
    a reshape without transpose (splitting or merging the heads), one big head, and an ignored or flipped mask.
    """
    _forward_cases(fn, "your output")
    return "4 cases (H = 1 to 4, one with a causal mask) equal course_lib to 1e-10 in float64"


def _forward_cases(fn, label: str) -> None:
    """check_mha_forward's four cases, each compared with course_lib and, when it differs, diagnosed."""
    g = torch.Generator().manual_seed(4)
    cases = [(1, 3, 4, 2, None), (2, 5, 12, 3, None), (2, 6, 16, 4, "causal"), (3, 4, 8, 1, None)]
    for B, T, D, H, mask_kind in cases:
        x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
        w_q, w_k, w_v, w_o = (torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5 for _ in range(4))
        mask = torch.ones(T, T, dtype=torch.bool).tril() if mask_kind else None
        kwargs: dict = {"mask": mask} if mask is not None else {}
        got = call_watching(fn, x.clone(), w_q, w_k, w_v, w_o, H, names=_FORWARD_ARGS, **kwargs, advice=TENSOR_ADVICE)
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (x @ w_q.T, x @ w_k.T, x @ w_v.T))
        expected = scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D) @ w_o.T
        what = f"B={B}, T={T}, d_model={D}, H={H}{', causal mask' if mask is not None else ''}"
        as_tensor(f"{label} ({what})", got)
        if tuple(got.shape) == tuple(expected.shape) and not is_close(got, expected):
            args = (x, w_q, w_k, w_v, w_o, H)
            candidates = {
                "the scores are not scaled: divide q k^T by sqrt(d_head)": _mha_variant(*args, scale="none", mask=mask),
                "you scaled by sqrt(d_model); each head's dot product has d_head terms, so divide by sqrt(d_head) "
                "= sqrt(d_model / H)": _mha_variant(*args, scale="d_model", mask=mask),
                "softmax runs over the queries (dim -2); each query's weights over the keys must sum to 1: "
                "softmax(dim=-1)": _mha_variant(*args, softmax_dim=-2, mask=mask),
                "the output projection W_O is missing: apply it to the concatenated heads (@ w_o.T, or "
                "self.out_proj(...) in a module)": _mha_variant(*args, out_proj=False, mask=mask),
            }
            candidates[_FORGOT_T] = _mha_variant(*args, forgot_T=True, mask=mask)
            if H > 1:
                candidates[_RESHAPE_SPLIT] = _mha_variant(*args, split_transpose=False, mask=mask)
                candidates[_RESHAPE_MERGE] = _mha_variant(*args, merge_transpose=False, mask=mask)
                candidates["this is ONE head over all d_model features: split q, k, v into H heads of d_head = "
                           "d_model / H features each before the softmax"] = _mha_variant(*args, heads=False,
                                                                                         mask=mask)
            if mask is not None:
                candidates["the mask is ignored: True = may attend, so the keys where the mask is False must get "
                           "weight 0"] = _mha_variant(*args)
                candidates[_MASK_FLIPPED] = _mha_variant(*args, mask=~mask)
            mistake = diagnose(got, candidates)
            if mistake is None and mask is not None and is_close(torch.nan_to_num(got.detach(), nan=0.0),
                                                                 candidates[_MASK_FLIPPED]):
                mistake = _MASK_FLIPPED  # flipped, and the rows the flipped mask empties came out NaN
            if mistake:
                raise CheckFailure(f"for {what}: {mistake}.")
        compare(f"{label} ({what})", got, expected,
                hint=('the steps are: project, split into heads, attend within each head with the '
                      '1/sqrt(d_head) scale, merge the heads, project the output'))


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
_NO_KEY = ("a query that may attend to no key must give output 0 (before out_proj's bias), the course's convention, "
           "course_lib.MultiHeadAttention's too")


def _fully_masked_case(as_function, reference_class) -> None:
    """A mask under which some queries may attend to no key, compared with course_lib.MultiHeadAttention alone
    (nn.MultiheadAttention gives NaN there); names the NaN of an unguarded -inf fill and the average of a finite one."""
    g = torch.Generator().manual_seed(14)
    B, T, D, H = 2, 5, 8, 2
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weights = [torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5 for _ in range(4)]
    first_key = torch.tensor([0, 2])  # sequence 1 is padded on the left: its queries 0 and 1 see no key
    mask = torch.ones(T, T, dtype=torch.bool).tril() & (torch.arange(T) >= first_key[:, None])[:, None, None, :]
    what = (f"B={B}, T={T}, d_model={D}, H={H}, a causal mask with sequence 1 padded on the left, so that its "
            f"queries 0 and 1 may attend to no key")
    got = as_tensor(f"your module's output ({what})",
                    call_watching(as_function, x.clone(), *weights, H, mask.clone(),
                                  names=(*_FORWARD_ARGS, "attn_mask"), advice=TENSOR_ADVICE))
    reference = reference_class(D, H, dtype=torch.float64)
    _load(reference, weights, [torch.zeros(D, dtype=torch.float64)] * 4)
    with torch.no_grad():
        expected = reference(x, attn_mask=mask)
    if tuple(got.shape) == tuple(expected.shape):
        empty = ~mask.any(dim=-1)[:, 0]  # (B, T): queries with no key
        got = got.detach()
        others_right = is_close(got[~empty], expected[~empty])
        if others_right and torch.isnan(got[empty]).any():
            raise CheckFailure(f"for {what}: your output is NaN at those queries. Filling the masked scores with "
                               f"-inf is right, but a row with every score -inf has softmax 0/0 = NaN: {_NO_KEY}, so "
                               f"give such rows weights 0.")
        if others_right and torch.isfinite(got[empty]).all() and not is_close(got[empty], expected[empty]):
            raise CheckFailure(f"for {what}: your output there is an average of the values, not 0. That is what a "
                               f"finite fill such as -1e9 gives: every score of the row is equal, so the softmax "
                               f"spreads evenly over keys that are all masked. Fill with -inf, and {_NO_KEY}.")
    compare(f"your module's output ({what})", got, expected,
            hint=f"{_NO_KEY}; the other queries attend as before")


def _built(build, d_model: int, num_heads: int) -> torch.nn.Module:
    """The learner's module, checked for the four nn.Linear projections, in float64."""
    module = call(build, d_model, num_heads, what=f" = (d_model, num_heads) = ({d_model}, {num_heads})")
    if module is None:
        raise CheckFailure("your class built None: did you forget to `return` it (from a function), or is "
                           "the class itself not passed?")
    if not isinstance(module, torch.nn.Module):
        raise CheckFailure(f"your class should build an nn.Module (class MyMultiHeadAttention(nn.Module)); "
                           f"got {type(module).__name__}")
    for name in _PROJECTIONS:
        lin = getattr(module, name, None)
        if not isinstance(lin, torch.nn.Linear) or tuple(lin.weight.shape) != (d_model, d_model):
            got = type(lin).__name__ if not isinstance(lin, torch.nn.Linear) else f"weight {tuple(lin.weight.shape)}"
            raise CheckFailure(f"your module needs self.{name} = nn.Linear(d_model, d_model) (weight "
                               f"{(d_model, d_model)}); got {got}. The checker loads the same weights into it, "
                               f"course_lib.MultiHeadAttention and nn.MultiheadAttention by these names")
    return module.double()


def _load(module: torch.nn.Module, weights, biases) -> None:
    with torch.no_grad():
        for name, w, b in zip(_PROJECTIONS, weights, biases, strict=True):
            lin = getattr(module, name)
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(b)


@checker
def check_mha_module(build):
    """Check a multi-head attention nn.Module.

    Your function: `fn(d_model, num_heads) -> module`, i.e. your class MyMultiHeadAttention itself, whose
    instances have four nn.Linear(d_model, d_model) layers q_proj, k_proj, v_proj, out_proj (with bias)
    and forward(x, attn_mask=None) -> out: x (B, T, d_model), attn_mask bool broadcastable to (B, H, T, T),
    True = may attend, out (B, T, d_model). Loads the same weights into yours, course_lib.MultiHeadAttention
    and torch.nn.MultiheadAttention and compares the outputs to 1e-10 in float64; names the mistakes that
    check_mha_forward names (no scale, sqrt(d_model), softmax over queries, reshape without transpose, a flipped
    mask, ...). A mask under which some queries may attend to no key is compared with course_lib alone (output 0
    there, before out_proj's bias); names the NaN of an unguarded -inf fill and the average of a finite fill.
    """
    from course_lib.mha import MultiHeadAttention  # the library is what the learner's module is checked against

    _built(build, 8, 2)  # the structure first: a clear message before any arithmetic

    def as_function(x, w_q, w_k, w_v, w_o, num_heads, mask=None):
        module = _built(build, x.shape[-1], num_heads)
        _load(module, (w_q, w_k, w_v, w_o), [torch.zeros(x.shape[-1], dtype=x.dtype)] * 4)
        return module(x) if mask is None else module(x, attn_mask=mask)

    _forward_cases(as_function, "your module's output")
    _fully_masked_case(as_function, MultiHeadAttention)
    g = torch.Generator().manual_seed(5)
    B, T, D, H = 2, 5, 12, 3
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weights = [torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5 for _ in range(4)]
    biases = [torch.randn(D, generator=g, dtype=torch.float64) for _ in range(4)]
    yours, ours = _built(build, D, H), MultiHeadAttention(D, H, dtype=torch.float64)
    theirs = torch.nn.MultiheadAttention(D, H, batch_first=True, dtype=torch.float64)
    _load(yours, weights, biases)
    _load(ours, weights, biases)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat(weights[:3]))
        theirs.in_proj_bias.copy_(torch.cat(biases[:3]))
        theirs.out_proj.weight.copy_(weights[3])
        theirs.out_proj.bias.copy_(biases[3])
        got = call_watching(yours, x.clone(), names=("x",), what=" (with biases)", advice=TENSOR_ADVICE)
        expected, torch_out = ours(x), theirs(x, x, x, need_weights=False)[0]
    as_tensor(f"your module's output (B={B}, T={T}, d_model={D}, H={H}, with biases)", got)
    if tuple(got.shape) == tuple(expected.shape) and is_close(got, expected - biases[3]):
        raise CheckFailure("out_proj's bias is missing from your output: call self.out_proj(...), the nn.Linear, "
                           "rather than multiplying by its weight")
    compare(f"your module's output (B={B}, T={T}, d_model={D}, H={H}, with biases)", got, expected,
            hint=('each projection is an nn.Linear with its bias: call the module rather than multiplying '
                  'by its weight alone'))
    compare("course_lib vs nn.MultiheadAttention (the checker's own agreement)", expected, torch_out)
    return ("5 cases equal course_lib.MultiHeadAttention, and nn.MultiheadAttention with the same weights, "
            "to 1e-10 in float64; queries with no allowed key give output 0, as in course_lib")


# ----------------------------------------------------------------------------- parameter count
def _param_count(d_model, num_heads, bias, kdim, vdim):
    kdim, vdim = kdim or d_model, vdim or d_model
    weights = d_model * d_model + kdim * d_model + vdim * d_model + d_model * d_model
    return weights + (4 * d_model if bias else 0)


@checker
def check_mha_param_count(fn):
    """Check a count of the parameters of one multi-head attention layer.

    Your function: `fn(d_model, num_heads, bias=True, kdim=None, vdim=None) -> int`, the number of
    parameters of MultiHeadAttention(d_model, num_heads, bias=bias, kdim=kdim, vdim=vdim). Checks five
    configurations; names a count that grows with num_heads, missing biases, a missing W_O, and
    ignoring kdim and vdim.
    """
    cases = [(512, 8, True, None, None), (768, 12, True, None, None), (384, 12, False, None, None),
             (64, 4, True, 32, 48), (64, 1, True, None, None)]
    for D, H, bias, kdim, vdim in cases:
        got = call(fn, D, H, bias=bias, kdim=kdim, vdim=vdim)
        expected = _param_count(D, H, bias, kdim, vdim)
        what = f"d_model={D}, num_heads={H}, bias={bias}" + (f", kdim={kdim}, vdim={vdim}" if kdim else "")
        if isinstance(got, (torch.Tensor, np.ndarray)) and np.size(got) == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, (int, np.integer, float)):
            raise CheckFailure(f"for {what}: return a number (an int); got {type(got).__name__}")
        if got == expected:
            continue
        k, v = kdim or D, vdim or D
        mistakes = {
            H * _param_count(D, H, bias, kdim, vdim) - (H - 1) * (D * D + (D if bias else 0)):
                "you gave every head its own full (d_model x d_model) W_Q, W_K, W_V; each head's are d_model x "
                "d_head, so all H heads together are d_model x d_model: the count does not depend on H",
            H * _param_count(D, H, bias, kdim, vdim):
                "you multiplied the whole layer by H; the H heads share the d_model x d_model budget "
                "(d_head = d_model / H), so the count does not depend on H",
            _param_count(D, H, False, kdim, vdim): "the biases are missing: 4 bias vectors of d_model each",
            _param_count(D, H, bias, kdim, vdim) - D * D - (D if bias else 0): "W_O (d_model x d_model + bias) "
                                                                                "is missing",
            _param_count(D, H, bias, None, None) if (k, v) != (D, D) else -1:
                "W_K maps kdim -> d_model and W_V maps vdim -> d_model: use kdim and vdim for their inputs",
        }
        hint = mistakes.get(int(got), "4 projections: W_Q (d_model x d_model), W_K (kdim x d_model), "
                                       "W_V (vdim x d_model), W_O (d_model x d_model), plus 4 biases of d_model")
        raise CheckFailure(f"for {what}: got {got}, expected {expected}. {hint}.")
    return "5 configurations match sum(p.numel() for p in MultiHeadAttention(...).parameters())"


# ----------------------------------------------------------------------------- cross-attention with d_v != d_k
_KEYS_FROM_X = ("the keys and values come from x: in cross-attention only the queries come from x, the keys and "
                "values from memory")


def _cross_mistakes(x, memory, w_q, w_k, w_v, w_o, H) -> dict[str, torch.Tensor]:
    """What each named mistake answers on these inputs, leaving out those that cannot run on their shapes."""
    args = (x, w_q, w_k, w_v, w_o, H)
    square = all(w.shape[0] == w.shape[1] for w in (w_q, w_k, w_v, w_o))
    candidates = {
        _RESHAPE_SPLIT: _mha_variant(*args, memory=memory, split_transpose=False),
        _RESHAPE_MERGE: _mha_variant(*args, memory=memory, merge_transpose=False),
        _FORGOT_T: _mha_variant(*args, memory=memory, forgot_T=True) if square else None,
        _FORGOT_T_INPUTS: _mha_variant(*args, memory=memory, forgot_T="inputs") if square else None,
        "you scaled by sqrt(d_v); the scale is sqrt(d_k), the length of the query-key dot products":
            _mha_variant(*args, memory=memory, scale="d_v"),
        "you scaled by sqrt(d_model); each head's dot product has d_k terms: divide by sqrt(d_k)":
            _mha_variant(*args, memory=memory, scale="d_model"),
        _KEYS_FROM_X: _mha_variant(*args) if w_k.shape[1] == w_v.shape[1] == x.shape[-1] else None,  # x fits w_k
    }
    return {message: wrong for message, wrong in candidates.items() if wrong is not None}


@checker
def check_cross_mha_forward(fn):
    """Check a multi-head cross-attention forward pass with value heads of another size.

    Your function: `fn(x, memory, w_q, w_k, w_v, w_o, num_heads) -> out`, with x (B, T, d_model) giving
    the queries, memory (B, S, kdim) the keys and values, w_q (H d_k, d_model), w_k (H d_k, kdim),
    w_v (H d_v, kdim), w_o (d_model, H d_v) in nn.Linear's layout without biases; out (B, T, d_model).
    Checks d_v != d_k, T != S and a case where every weight is square; names a reshape without
    transpose, a forgotten .T (on every weight, or on w_q, w_k and w_v only), scaling by sqrt(d_v) or sqrt(d_model),
    keys taken from x, and a missing w_o. A mistake
    that crashes on one case's shapes is named from a case where it runs.
    """
    g = torch.Generator().manual_seed(44)
    cases = []
    shapes = [(2, 3, 5, 12, 12, 3, 4, 2), (1, 4, 4, 8, 8, 2, 4, 4), (2, 6, 4, 16, 10, 4, 2, 3)]
    for B, T, S, D, kdim, H, d_k, d_v in shapes:
        x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
        memory = torch.randn(B, S, kdim, generator=g, dtype=torch.float64)
        w_q = torch.randn(H * d_k, D, generator=g, dtype=torch.float64) / D**0.5
        w_k = torch.randn(H * d_k, kdim, generator=g, dtype=torch.float64) / kdim**0.5
        w_v = torch.randn(H * d_v, kdim, generator=g, dtype=torch.float64) / kdim**0.5
        w_o = torch.randn(D, H * d_v, generator=g, dtype=torch.float64) / (H * d_v) ** 0.5
        what = f"B={B}, T={T}, S={S}, d_model={D}, kdim={kdim}, H={H}, d_k={d_k}, d_v={d_v}"
        cases.append((what, (x, memory, w_q, w_k, w_v, w_o, H)))

    def probe(inputs) -> str | None:
        got = call_watching(fn, *inputs, names=_CROSS_ARGS, advice=TENSOR_ADVICE)
        return diagnose(as_tensor("your output", got), _cross_mistakes(*inputs))

    for what, inputs in cases:
        try:
            got = as_tensor(f"your output ({what})",
                            call_watching(fn, *inputs, names=_CROSS_ARGS, advice=TENSOR_ADVICE))
        except CheckFailure as crash:
            for other, other_inputs in cases:
                if other == what:
                    continue
                try:
                    mistake = probe(other_inputs)
                except CheckFailure:
                    continue
                if mistake:
                    raise CheckFailure(f"{crash}. For {other} it runs, and its output there shows why: "
                                       f"{mistake}.") from None
            raise crash from None
        x, memory, w_q, w_k, w_v, w_o, H = inputs
        expected = _mha_variant(x, w_q, w_k, w_v, w_o, H, memory=memory)
        if is_close(got, _mha_variant(x, w_q, w_k, w_v, w_o, H, memory=memory, out_proj=False)):
            raise CheckFailure(f"for {what}: the output projection w_o is missing: your output is the merged heads, "
                               f"(B, T, H*d_v) = {tuple(got.shape)}; w_o maps them back to d_model features.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailure(f"for {what}: your output has shape {tuple(got.shape)}, expected (B, T, d_model) = "
                               f"{tuple(expected.shape)}: one row per QUERY (from x), projected back by w_o.")
        if not is_close(got, expected):
            mistake = diagnose(got, _cross_mistakes(*inputs))
            if mistake:
                raise CheckFailure(f"for {what}: {mistake}.")
        compare(f"your output ({what})", got, expected, hint=("cross-attention takes its queries from x and its "
                                                               "keys and values from the memory; then the same "
                                                               "split, attention, merge and output projection as "
                                                               "self-attention"))
    return "3 cases (d_v != d_k, T != S, square weights) equal the reference to 1e-10 in float64"


# ----------------------------------------------------------------------------- parameters and FLOPs, on paper
def _cross_cost(B, T, S, d_model, H, d_k, d_v, kdim, vdim):
    params = H * d_k * (d_model + kdim) + H * d_v * vdim + d_model * H * d_v  # W_q, W_k, W_v, W_o
    params += 2 * H * d_k + H * d_v + d_model  # biases
    core_flops = 2 * B * H * T * S * (d_k + d_v)  # scores q k^T and weights @ v, a multiply-add = 2 FLOPs
    return params, core_flops


@checker
def check_cross_mha_cost(fn):
    """Check the parameter count and attention-core FLOPs of a cross-attention layer, as formulas.

    Your function: `fn(B, T, S, d_model, H, d_k, d_v, kdim, vdim) -> (params, core_flops)`: the number
    of parameters (weights and biases of W_q (H d_k x d_model), W_k (H d_k x kdim), W_v (H d_v x vdim),
    W_o (d_model x H d_v)) and the FLOPs of q k^T and weights @ v for B sequences of T queries over S
    keys (a multiply-add = 2 FLOPs). Checks four configurations; names the pair in the wrong order, missing
    biases, d_model in place of kdim/vdim, kdim in place of vdim, d_k used for the value heads, multiply-adds
    counted as 1 FLOP, and T * T instead of T * S.
    """
    configs = [(2, 5, 7, 32, 4, 8, 6, 20, 12), (1, 10, 3, 64, 8, 8, 8, 64, 64), (3, 4, 9, 48, 6, 4, 10, 30, 30),
               (1, 128, 512, 512, 8, 64, 32, 768, 768)]
    for config in configs:
        label = "B={}, T={}, S={}, d_model={}, H={}, d_k={}, d_v={}, kdim={}, vdim={}".format(*config)
        answer = unpack(call(fn, *config), 2, "return a pair (params, core_flops)", case=label)
        params, flops = _cross_cost(*config)
        B, T, S, D, H, d_k, d_v, kdim, vdim = config
        got_params, got_flops = (as_array(name, a) for name, a in zip(("params", "core_flops"), answer, strict=True))
        if not is_close(got_params, params) and is_close(got_params, flops) and is_close(got_flops, params):
            raise CheckFailure(f"for {label}: your pair is in the wrong order, (core_flops, params): return the "
                               f"parameter count first, then the FLOPs.")
        if not is_close(got_params, params):
            wrong = {
                "the biases are missing: W_q and W_k have H*d_k each, W_v H*d_v, W_o d_model":
                    params - (2 * H * d_k + H * d_v + D),
                "you used d_model as the input size of W_k and W_v; they read the memory, of sizes kdim and vdim":
                    _cross_cost(B, T, S, D, H, d_k, d_v, D, D)[0],
                "you used kdim as the input size of W_v too: W_k reads keys of size kdim, but W_v reads values of "
                "size vdim": _cross_cost(B, T, S, D, H, d_k, d_v, kdim, kdim)[0] if kdim != vdim else None,
                "value heads have their own size d_v: W_v is (H*d_v x vdim) and W_o is (d_model x H*d_v)":
                    _cross_cost(B, T, S, D, H, d_k, d_k, kdim, vdim)[0],
            }
            mistake = diagnose(got_params, wrong)
            raise CheckFailure(f"for {label}: params = {got_params}, expected {params}" +
                               (f": {mistake}." if mistake else "."))
        if not is_close(got_flops, flops):
            wrong = {
                "you counted a multiply-add as 1 FLOP; the convention here is 2": flops // 2,
                "you used T x T scores; cross-attention has T x S": 2 * B * H * T * T * (d_k + d_v),
                "the value product uses d_v, not d_k: weights (T x S) @ v (S x d_v)": 4 * B * H * T * S * d_k,
            }
            mistake = diagnose(got_flops, wrong)
            raise CheckFailure(f"for {label}: core_flops = {got_flops}, expected {flops}" +
                               (f": {mistake}." if mistake else "."))
    return "4 configurations: parameters and attention-core FLOPs right, d_v != d_k and kdim != d_model included"


# ----------------------------------------------------------------------------- four predictions
_HEADS_QUIZ = (
    ("b", {"a": "the head count does not appear in the parameter count: 16 heads of 32 partition the same "
                "512 x 512 matrices that 8 heads of 64 do, so the count stays the same",
           "c": "W_Q, W_K, W_V and W_O all grow with d_model on BOTH sides (d_model x d_model), so doubling "
                "d_model multiplies the weights by about 4, not 2",
           "d": "count each option's matrices (W_Q, W_K, W_V map d_model to H x d_head features, W_O maps them "
                "back): one of the three comes out at about twice"}),
    ("b", {"a": "the projections (8 T d^2) double with T, but the scores and weights @ V (4 T^2 d) quadruple, "
                "so the total grows faster than 2x",
           "c": "only the attention core quadruples; the projections double, and at T < 2 d_model they are "
                "still the larger part, so the total grows by less than 4x",
           "d": "each of q k^T and weights @ V is a (T x d) by (d x T) product: T^2 d, quadratic in T, not cubic"}),
    ("c", {"a": "permuting W_Q alone gives head 0 the queries of head 1 but still the keys of head 0: the scores "
                "change",
           "b": "then each head computes the other's output, but the concatenation puts it in the other's slot, "
                "where W_O's columns expect the first head's output: W_O's input columns must be swapped too "
                "(its bias stays)",
           "d": "the heads are interchangeable only if everything that reads them moves with them: W_O's input "
                "columns read head i's slot, so the output changes unless they are permuted too"}),
    ("b", {"a": "that is 8 key/value heads (2 x 512 x 512); with 2 key/value heads each projection outputs only "
                "2 x d_head = 128 features",
           "c": "that is one key/value head (2 x 512 x 64); here there are two, each d_head = 64 wide",
           "d": "4 is how many query heads share each key/value head; k_proj and v_proj output one d_head block "
                "per key/value head, and there are 2: a shared head is stored once"}),
)


@checker
def check_heads_quiz(fn):
    """Check the answers to four prediction questions on parameters, FLOPs, swapping heads and shared key/value heads.

    Your function: `fn() -> answers`, four letters (a string such as "abcd" or a tuple), one per
    question in the order asked. Says which answer is wrong and the idea behind the wrong choice.
    """
    multiple_choice(call(fn), _HEADS_QUIZ, letters="abcd")
    return "all four predictions are right"

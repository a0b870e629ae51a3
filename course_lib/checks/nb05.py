"""Checkers for notebook 05 (masking and cross-attention).

Masks are booleans with the course's polarity (True = may attend). On a wrong answer the
checkers try the classic mistakes (flipped polarity, the upper triangle, padding applied to
queries instead of keys, a (B, T, T) mask that broadcasts against the head axis, -1e9 in
float16, NaN or uniform weights in a fully masked row, masking after the softmax with or without
renormalising) and say which one was made.
"""

from __future__ import annotations

import numpy as np
import torch

from course_lib._validate import broadcast_shapes
from course_lib.checks._core import CheckFailure, as_tensor, call, call_watching, checker, require_result
from course_lib.checks.nb04 import TENSOR_ADVICE
from course_lib.masks import causal_mask, padding_mask

__all__ = [
    "check_causal_padding_mask",
    "check_to_key_padding_mask",
    "check_masked_softmax",
    "check_future_leak_test",
]


def _as_bool_mask(name: str, got, target_shape: tuple[int, ...]) -> torch.Tensor:
    """The learner's mask, checked for type and shape, expanded to target_shape."""
    got = as_tensor(name, got)
    if got.dtype != torch.bool:
        raise CheckFailure(f"{name} has dtype {got.dtype}; return a BOOLEAN mask (True = may attend), e.g. "
                           f"with comparisons like j <= i, combined with &")
    shape = tuple(got.shape)
    if len(shape) > len(target_shape) or broadcast_shapes(shape, target_shape) != target_shape:
        extra = ""
        if len(shape) == 3 and shape[0] == target_shape[0]:
            extra = (" A (B, T, T) mask lines up B with the HEAD axis of (B, H, T, T) scores (broadcasting aligns "
                     "from the right): add the head axis, a size-1 axis between the batch axis and the query axis")
        raise CheckFailure(f"{name} has shape {shape}, which does not broadcast to the scores' {target_shape} "
                           f"without changing them.{extra}")
    return got.expand(target_shape)


# ----------------------------------------------------------------------------- causal + padding
@checker
def check_causal_padding_mask(fn):
    """Check a mask that combines causality and key padding.

    Your function: `fn(lengths, T) -> mask`, with lengths a list of B ints and mask a bool tensor of
    shape (B, 1, T, T) (or one that broadcasts to it over the head axis): query i may attend to key j
    iff j <= i and j < lengths[b]. Checks four batches exactly; names a flipped polarity, the upper
    triangle, a missing causal or padding part, padding applied to the queries, padding off by one, a causal part
    without the diagonal, and a (B, T, T) mask.
    """
    cases = [([3, 1, 4], 4), ([2], 2), ([5, 5], 5), ([1, 3], 3)]
    for lengths, T in cases:
        B = len(lengths)
        target = (B, 1, T, T)
        answer = call_watching(fn, list(lengths), T, names=("lengths", "T"),
                               advice="Build a new list (sorted(lengths), lengths + [...]) instead of sorting or "
                                      "appending to the one you were given")
        got = _as_bool_mask(f"your mask for lengths={lengths}, T={T}", answer, target)
        pad = padding_mask(lengths, T)  # (B, 1, 1, T): keys
        causal = causal_mask(T)  # (T, T)
        expected = (pad & causal).expand(target)
        if torch.equal(got, expected):
            continue
        pad_rows = pad.transpose(-1, -2)  # (B, 1, T, 1): the same lengths applied to queries
        mistakes = {
            "the polarity is flipped: in this course True = MAY attend (torch SDPA's convention); "
            "nn.MultiheadAttention's True = ignore is the opposite": ~expected,
            "the causal part is the upper triangle (query i sees j >= i, the future): use j <= i (tril)":
                (pad & causal.T).expand(target),
            "the causal part is missing: query i must not see keys j > i": pad.expand(target),
            "the padding part is missing: keys j >= lengths[b] are padding and must be masked": causal.expand(target),
            "the padding is applied to the QUERIES (rows) instead of the KEYS (columns): a padded key must not be "
            "attended to by anyone; shape the padding as (B, 1, 1, T)": (pad_rows & causal).expand(target),
            "the padding is applied to queries and keys: masking whole rows of padded queries makes them fully "
            "masked; only the keys (columns) need it": (pad_rows & pad & causal).expand(target),
            "the padding is off by one: it lets each query see key j = lengths[b] too, the first padded key; the "
            "real keys are j = 0 .. lengths[b] - 1":
                (padding_mask([min(n + 1, T) for n in lengths], T) & causal).expand(target),
            "the causal part leaves out the diagonal: query i may attend to key i, itself, as well as to the keys "
            "before it": (pad & causal_mask(T).tril(-1)).expand(target),
        }
        for message, wrong in mistakes.items():
            if torch.equal(got, wrong):
                raise CheckFailure(f"for lengths={lengths}, T={T}: {message}.")
        b, _, i, j = (int(t) for t in torch.nonzero(got != expected)[0])
        raise CheckFailure(f"for lengths={lengths}, T={T}: entry [b={b}, 0, query {i}, key {j}] is "
                           f"{bool(got[b, 0, i, j])}, expected {bool(expected[b, 0, i, j])} "
                           f"({int((got != expected).sum())} entries wrong). "
                           f"Hint: causal (j <= i) AND key j < lengths[b].")
    return "4 batches: causal AND key padding, True = may attend, broadcasts over heads"


# ----------------------------------------------------------------------------- polarity for nn.MultiheadAttention
@checker
def check_to_key_padding_mask(fn):
    """Check the conversion of the course's padding mask for nn.MultiheadAttention.

    Your function: `fn(mask) -> key_padding_mask`, with mask (B, 1, 1, S) bool, True = real token,
    and key_padding_mask a (B, S) bool tensor, True = ignore this key (nn.MultiheadAttention's
    polarity). Checks three batches exactly; names the polarity trap, a wrong shape, a float mask and a bool mask
    negated with a minus sign.
    """
    cases = [[3, 1, 4], [2], [5, 5, 1, 2]]
    for lengths in cases:
        S = max(lengths)
        ours = padding_mask(lengths, S)  # (B, 1, 1, S)
        try:
            got = call_watching(fn, ours.clone(), names=("mask",), advice=TENSOR_ADVICE)
        except CheckFailure as failure:
            if "Negation, the `-` operator, on a bool tensor" in str(failure):
                raise CheckFailure(f"{failure}. A minus sign is arithmetic; a boolean mask is inverted with a "
                                   f"logical not, which turns every True into False and back") from None
            raise
        expected = ~ours[:, 0, 0]  # (B, S)
        name = f"your key_padding_mask for lengths={lengths}"
        got = as_tensor(name, got)
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailure(f"{name} has shape {tuple(got.shape)}; nn.MultiheadAttention wants key_padding_mask "
                               f"of shape (B, S) = {tuple(expected.shape)}: drop the two broadcast axes of size 1 "
                               f"(heads and queries) by indexing them, which keeps the batch axis even when B = 1")
        if got.dtype != torch.bool:
            raise CheckFailure(f"{name} has dtype {got.dtype}; give nn.MultiheadAttention a boolean mask "
                               f"(a float one would be ADDED to the scores)")
        if torch.equal(got, ~expected):
            raise CheckFailure(f"for lengths={lengths}: this is the polarity trap. Your mask is True for real tokens, "
                               f"but nn.MultiheadAttention reads True as 'ignore': it would attend only to padding. "
                               f"Its polarity must be the opposite of the course's: True where a key is padding.")
        if not torch.equal(got, expected):
            raise CheckFailure(f"for lengths={lengths}: {int((got != expected).sum())} entries differ; True must mark "
                               f"the padded keys (j >= length).")
    return "3 batches: True marks exactly the padded keys, shape (B, S)"


# ----------------------------------------------------------------------------- masked softmax
_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _reference_masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    s = scores.to(torch.float64).masked_fill(~mask, float("-inf"))
    w = torch.softmax(s, dim=-1)
    return torch.nan_to_num(w, nan=0.0)  # rows with nothing allowed: 0


@checker
def check_masked_softmax(fn):
    """Check a masked softmax that survives half precision and fully masked rows.

    Your function: `fn(scores, mask) -> weights`, with scores (..., T, S) a float tensor (float16,
    bfloat16, float32 or float64) and mask a bool tensor broadcastable to it, True = may attend;
    weights (..., T, S): softmax over the allowed keys, exactly 0 elsewhere, all 0 (never NaN) in a
    row with nothing allowed. Checks four cases, one per dtype, with a tolerance per dtype (in the float32
    one the masked keys score 1000 above the allowed ones); names NaN, a -1e9 fill that overflows float16,
    uniform weights in a fully masked row, a flipped mask, masking after the softmax (with or without
    renormalising: renormalising loses every row whose masked keys score far above its kept ones), a softmax
    along another axis than the keys, and float64 scores given weights of lower precision.
    """
    g = torch.Generator().manual_seed(5)
    fully_masked = torch.ones(4, 5, dtype=torch.bool)
    fully_masked[2] = False
    causal = causal_mask(4, 6)
    far_above = "float32 scores (2, T=4, S=6) with a causal mask, the masked keys scoring 1000 above the allowed ones"
    cases = [
        (far_above, torch.randn(2, 4, 6, generator=g) + 1000.0 * ~causal, causal),
        ("float16 scores with a fully masked row (query 2)", (torch.randn(4, 5, generator=g) * 4).half(),
         fully_masked),
        ("float64 scores with a fully masked row (query 2)", torch.randn(4, 5, generator=g, dtype=torch.float64),
         fully_masked),
        ("bfloat16 scores (B, H, T, S) with padding", (torch.randn(2, 3, 4, 5, generator=g) * 50).bfloat16(),
         padding_mask([5, 2], 5)),
    ]
    for what, scores, mask in cases:
        try:
            got = call_watching(fn, scores.clone(), mask.clone(), names=("scores", "mask"), advice=TENSOR_ADVICE)
        except CheckFailure as failure:
            if "overflow" in str(failure) and scores.dtype == torch.float16:
                raise CheckFailure(f"for {what}: {failure} -- a literal like -1e9 does not fit in float16 "
                                   f"(largest magnitude 65504). Fill with float('-inf') instead, and give rows with "
                                   f"nothing to attend to weights 0.") from None
            raise
        expected = _reference_masked_softmax(scores, mask)
        name = f"your weights ({what})"
        require_result(f"the weights tensor ({what})", got)
        if not isinstance(got, torch.Tensor) or not got.dtype.is_floating_point:
            raise CheckFailure(f"{name} should be a floating-point torch.Tensor; got "
                               f"{getattr(got, 'dtype', type(got).__name__)}")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailure(f"{name} have shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
        got64 = got.detach().to(torch.float64)
        full_mask = mask.expand(expected.shape)
        empty_rows = ~full_mask.any(dim=-1)  # (..., T)
        lost_rows = ~empty_rows & (torch.isnan(got64).all(dim=-1) | (got64 == 0).all(dim=-1))  # (..., T)
        masked_zero = (torch.nan_to_num(got64, nan=0.0)[~full_mask] == 0).all()
        if what == far_above and lost_rows.any() and masked_zero:
            raise CheckFailure(f"{name}: rows that have allowed keys came out all NaN or all 0. That is what you get "
                               f"when you masked after the softmax, renormalising or not: the masked keys, scoring "
                               f"1000 above the kept ones, take all of softmax(scores), the kept weights underflow to "
                               f"0 (already at a gap of about 19 in float16, 105 in float32, 750 in float64), and "
                               f"renormalising gives 0/0. Mask BEFORE the softmax: fill the masked scores with -inf, "
                               f"and do not renormalise after.")
        if torch.isnan(got64).any():
            nan_rows = torch.isnan(got64).any(dim=-1)  # (..., T)
            if empty_rows.any() and torch.equal(nan_rows, empty_rows) and torch.allclose(
                    got64[~empty_rows], expected[~empty_rows], atol=_TOL[scores.dtype], rtol=0):
                raise CheckFailure(f"{name} contain NaN only in the rows with nothing to attend to: a softmax of an "
                                   f"all -inf row is 0/0 = NaN (and so is masking after the softmax and "
                                   f"renormalising). Give such rows weights 0.")
            hint = ("a row with every key masked is softmax of all -inf = 0/0 = NaN: find such rows "
                    "(mask.any(-1) is False) and set their weights to 0") if empty_rows.any() else \
                "NaN appeared: subtract the row max before exp, and do not fill with a finite value that overflows"
            raise CheckFailure(f"{name} contain NaN. {hint}.")
        if empty_rows.any():
            empty = got64[empty_rows]
            if torch.allclose(empty, torch.full_like(empty, 1.0 / expected.shape[-1]), atol=1e-2):
                raise CheckFailure(f"{name}: the fully masked row got uniform weights 1/S. That is what a large finite "
                                   f"fill (-1e9, finfo.min) gives: every entry equal, softmax spreads evenly, and the "
                                   f"query silently averages padding. Its weights must be 0.")
        if not (got64[~full_mask] == 0).all():
            flipped = _reference_masked_softmax(scores, ~mask)
            if torch.allclose(got64, flipped, atol=_TOL[scores.dtype] * 10):
                raise CheckFailure(f"{name}: the mask polarity is flipped: True = MAY attend, so the scores to hide "
                                   f"are those where the mask is False.")
            raise CheckFailure(f"{name}: masked keys must get weight exactly 0; "
                               f"{int((got64[~full_mask] != 0).sum())} masked entries are nonzero.")
        tol = _TOL[scores.dtype]
        zeroed_late = torch.softmax(scores.to(torch.float64), dim=-1) * full_mask  # masked after, not renormalised
        late = torch.allclose(got64, zeroed_late, atol=tol, rtol=0)
        if late and not torch.allclose(got64, expected, atol=tol, rtol=0):
            raise CheckFailure(f"{name}: you masked after the softmax: the weights are softmax(scores) with the masked "
                               f"entries set to 0, so a row's kept weights sum to less than 1 (or to 0). Mask the "
                               f"scores with -inf before the softmax; renormalising afterwards is no fix, it fails "
                               f"when a masked key scores far above the kept ones.")
        if scores.dtype == torch.float64 and got.dtype != torch.float64:
            raise CheckFailure(f"{name} are {got.dtype} for float64 scores: float64 inputs ask for float64 weights, "
                               f"so compute in the scores' own precision (a float32 step loses about 9 digits)")
        if not torch.allclose(got64, expected, atol=tol, rtol=0):
            for dim in range(scores.dim() - 1):
                with torch.no_grad():
                    other = torch.nan_to_num(torch.softmax(scores.to(torch.float64).masked_fill(~mask, float("-inf")),
                                                           dim=dim), nan=0.0)
                if torch.allclose(got64, other, atol=tol, rtol=0):
                    raise CheckFailure(f"{name}: your softmax normalises along axis {dim}, not along the keys: each "
                                       f"query's weights over its keys, the LAST axis, must sum to 1")
            err = float((got64 - expected).abs().max())
            raise CheckFailure(f"{name} differ from the reference by up to {err:.2e} (tolerance {tol:.0e} for "
                               f"{scores.dtype}). Hint: softmax over the last axis (the keys) of the masked scores; "
                               f"compute it in float32 for half-precision inputs "
                               f"and keep float64 inputs in float64.")
    return "4 cases in float32, float64, float16 and bfloat16, incl. fully masked rows (weights 0, no NaN)"


# ----------------------------------------------------------------------------- a test that finds future leaks
_MISSED = {
    "into_first": "it perturbs too few positions (only the last one, or only the next one): perturb EVERY position "
                  "after i, not just the last",
    "from_last": "it checks too few positions (only position 0, or only output i): compare EVERY output up to i",
    "middle": "a leak between two middle positions, away from position 0 and from the last position: a test that "
              "perturbs only the last position or compares only position 0 cannot see it",
}


def _layers() -> list[tuple[str, object, bool, str, int, int]]:
    """(description, layer, leaks?, kind, T, d), layer mapping x (1, T, d) float64 -> (1, T, d).

    Sizes and leak positions are drawn at random (seeded), so a test cannot be tailored to them.
    """
    g = torch.Generator().manual_seed(55)

    def randint(low: int, high: int) -> int:  # low <= n <= high
        return int(torch.randint(low, high + 1, (1,), generator=g))

    def attention(d: int, edit=None):
        w_q, w_k, w_v = (torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 for _ in range(3))

        def layer(x):
            n = x.shape[1]
            scores = (x @ w_q.T) @ (x @ w_k.T).transpose(-2, -1) / d**0.5  # (1, T, T)
            if edit is not None:
                mask = torch.ones(n, n, dtype=torch.bool).tril()
                edit(mask)
                scores = scores.masked_fill(~mask, float("-inf"))
            return torch.softmax(scores, dim=-1) @ (x @ w_v.T)
        return layer

    def size() -> tuple[int, int]:
        return randint(6, 10), randint(3, 9)

    layers = []
    T, d = size()
    layers.append(("a causal layer", attention(d, lambda m: None), False, "", T, d))
    T, d = size()
    layers.append(("a layer without a mask", attention(d), True, "", T, d))
    T, d = size()
    j = randint(2, T - 2)
    layers.append((f"a layer whose position 0 also sees position {j} (T={T})",
                   attention(d, lambda m, j=j: m.__setitem__((0, j), True)), True, "into_first", T, d))
    T, d = size()
    i = randint(1, T - 3)
    layers.append((f"a layer whose position {i} also sees the last position (T={T})",
                   attention(d, lambda m, i=i: m.__setitem__((i, -1), True)), True, "from_last", T, d))
    T, d = size()
    t = randint(1, T - 4)
    layers.append((f"a layer whose position {t} also sees position {t + 2} (T={T})",
                   attention(d, lambda m, t=t: m.__setitem__((t, t + 2), True)), True, "middle", T, d))
    T, d = size()
    i = randint(1, T - 4)
    j = randint(i + 1, T - 2)
    causal = attention(d, lambda m: None)

    def direct(x, causal=causal, i=i, j=j):  # causal, plus 1e-3 of input j added to output i
        out = causal(x).clone()
        out[:, i] = out[:, i] + 1e-3 * x[:, j]
        return out
    layers.append((f"a causal layer with a leak of 1e-3 from position {j} into position {i} (T={T})", direct, True,
                   "middle", T, d))
    T, d = size()
    weak_causal = attention(d, lambda m: None)

    def weak(x, causal=weak_causal):  # causal plus a tiny leak of the next token, 1e-9 of its size
        return causal(x) + 1e-9 * torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)
    layers.append(("a causal layer with a leak of 1e-9 from the next position", weak, True, "weak", T, d))
    T, d = size()
    layers.append(("the causal layer again", attention(d, lambda m: None), False, "", T, d))
    return layers


def _always_inverted(fn) -> bool:
    """Whether the learner's test gives the wrong verdict on every one of the checker's layers."""
    for _, layer, leaks, _, T, d in _layers():
        try:
            verdict = call(fn, layer, T, d)
        except CheckFailure:
            return False
        if not isinstance(verdict, bool | np.bool_) or bool(verdict) == leaks:
            return False
    return True


def _largest_perturbation(fn, layer, T: int, d: int) -> float | None:
    """The largest difference between the inputs the learner's test feeds `layer`, or None if it cannot tell."""
    seen: list[torch.Tensor] = []

    def recording(x):
        if isinstance(x, torch.Tensor):
            seen.append(x.detach().clone().to(torch.float64))
        return layer(x)

    try:
        call(fn, recording, T, d)
    except CheckFailure:
        return None
    shaped = [x for x in seen if seen and x.shape == seen[0].shape]
    if len(shaped) < 2:
        return None
    return max(float((x - shaped[0]).abs().max()) for x in shaped[1:])


@checker
def check_future_leak_test(fn):
    """Check a test that detects whether a sequence layer lets a position see the future.

    Your function: `fn(layer, T, d) -> bool`, True when the layer leaks: when some output position i
    changes after a change of the inputs at positions > i. `layer` maps a float64 tensor (1, T, d) to
    (1, T, d). Checks eight layers of random sizes, causal ones and ones that leak: everywhere, into
    position 0, from the last position, between two middle positions only, and by as little as 1e-9;
    names a test that perturbs the past, one that perturbs or checks too few positions, one that
    misses a leak in the middle of the sequence, inverted verdicts, one whose tolerance hides a small leak, one whose
    perturbation is too small to see, float32 inputs, and a tensor returned instead of a bool.
    """
    for description, layer, leaks, kind, T, d in _layers():
        try:
            verdict = call(fn, layer, T, d, what=f", with {description}")
        except CheckFailure as failure:
            if "dtype" in str(failure) and ("float" in str(failure) or "Float" in str(failure)):
                raise CheckFailure(f"{failure}. The layer computes in float64, so the inputs your test builds must "
                                   f"be float64 too (torch.randn makes float32 unless told otherwise); float32 "
                                   f"would also round away a leak as small as 1e-9.") from None
            raise
        if isinstance(verdict, torch.Tensor) and verdict.numel() == 1 and verdict.dtype == torch.bool:
            raise CheckFailure(f"your test returned a tensor, {verdict!r}, for {description}: return a bool, True "
                               f"(the layer leaks) or False (it does not). A tensor is not a bool: `verdict is "
                               f"True` is False for it, and a list of such verdicts is a list of tensors.")
        if not isinstance(verdict, bool | np.bool_):
            raise CheckFailure(f"return True (the layer leaks) or False (it does not); got {verdict!r}")
        verdict = bool(verdict)
        if verdict and not leaks:
            if _always_inverted(fn):
                raise CheckFailure("your test's verdicts are inverted: it reports a leak for every layer without "
                                   "one and none for every layer that leaks, so it measures the right thing but "
                                   "returns the opposite. True must mean: some output changed, the layer leaks.")
            raise CheckFailure(f"your test reports a leak for {description}, which has none. Perturb only the "
                               f"FUTURE (positions > i) and compare only the outputs at positions <= i; float64 "
                               f"recomputation of the same numbers is exact, so compare exactly or with atol ~1e-12.")
        if not verdict and leaks:
            if kind == "weak":
                largest = _largest_perturbation(fn, layer, T, d)
                if largest is not None and largest < 1e-6:
                    raise CheckFailure(f"your test missed {description}: its perturbation is too small to see. The "
                                       f"inputs it gave the layer differ by at most {largest:.1e}, so the leak moves "
                                       f"the outputs by about 1e-9 times that, far below the rounding of outputs of "
                                       f"size 1 in float64 (~1e-16): the change is lost before you compare. Change "
                                       f"the future inputs by amounts of order 1, and compare exactly.")
                raise CheckFailure(f"your test missed {description}: its tolerance is too loose. A causal layer's past "
                                   f"outputs do not change AT ALL when the future changes, so compare exactly (or "
                                   f"with atol ~1e-12 in float64).")
            if kind in _MISSED:
                raise CheckFailure(f"your test missed {description}: {_MISSED[kind]}. For every i < T-1, perturb all "
                                   f"positions after i and compare all outputs up to i.")
            raise CheckFailure(f"your test missed the leak of {description}: perturb the inputs after position i and "
                               f"check whether the outputs up to i change.")
    return "8 layers of random sizes: causal ones pass; leaks everywhere, at either end, in the middle and of 1e-9 " \
           "are caught"

"""The notebook-04 checkers accept the reference and reject planted wrong solutions with useful messages."""

from __future__ import annotations

import pytest
import torch

from course_lib import MultiHeadAttention, checks
from course_lib.checks import nb04


# ----------------------------------------------------------------------------- split / merge heads
def split_ref(x, num_heads):
    B, T, D = x.shape
    return x.view(B, T, num_heads, D // num_heads).transpose(1, 2)


def merge_ref(x):
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)


def test_split_heads_accepts_reference():
    result = checks.check_split_heads(split_ref)
    assert result.passed, result.message
    assert "[PASSED]" in repr(result)


@pytest.mark.parametrize("wrong, words", [
    (lambda x, H: x.reshape(x.shape[0], H, x.shape[1], -1), "split each token's features into heads first"),
    (lambda x, H: x.view(*x.shape[:2], -1, H).permute(0, 3, 1, 2), "interleaved"),
    (lambda x, H: x.view(*x.shape[:2], H, -1), "has shape"),
    (lambda x, H: None, "None"),
])
def test_split_heads_rejects_planted_mistakes(wrong, words):
    result = checks.check_split_heads(wrong)
    assert not result.passed and words in result.message, result.message


def test_merge_heads_accepts_reference():
    assert checks.check_merge_heads(merge_ref).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda x: x.reshape(x.shape[0], x.shape[2], -1), "move the head axis back behind time"),
    (lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2], -1), "interleaved"),
    (lambda x: x.transpose(1, 2), "has shape"),
])
def test_merge_heads_rejects_planted_mistakes(wrong, words):
    result = checks.check_merge_heads(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- forward
def mha_ref(x, w_q, w_k, w_v, w_o, num_heads, mask=None):
    d_head = x.shape[-1] // num_heads
    q, k, v = (split_ref(x @ w.T, num_heads) for w in (w_q, w_k, w_v))
    scores = q @ k.transpose(-2, -1) / d_head**0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return merge_ref(torch.softmax(scores, dim=-1) @ v) @ w_o.T


def mha_via_course_lib(x, w_q, w_k, w_v, w_o, num_heads, mask=None):
    m = MultiHeadAttention(x.shape[-1], num_heads, bias=False, dtype=x.dtype)
    with torch.no_grad():
        for lin, w in zip((m.q_proj, m.k_proj, m.v_proj, m.out_proj), (w_q, w_k, w_v, w_o), strict=True):
            lin.weight.copy_(w)
    return m(x, attn_mask=mask)


@pytest.mark.parametrize("solution", [mha_ref, mha_via_course_lib])
def test_mha_forward_accepts_reference(solution):
    result = checks.check_mha_forward(solution)
    assert result.passed, result.message


def _no_transpose_split(x, w_q, w_k, w_v, w_o, num_heads, mask=None):
    B, T, D = x.shape
    q, k, v = ((x @ w.T).reshape(B, num_heads, T, D // num_heads) for w in (w_q, w_k, w_v))  # no transpose
    scores = q @ k.transpose(-2, -1) / (D // num_heads) ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return merge_ref(torch.softmax(scores, dim=-1) @ v) @ w_o.T


def _variant(**changes):
    def fn(x, w_q, w_k, w_v, w_o, num_heads, mask=None):
        return nb04._mha_variant(x, w_q, w_k, w_v, w_o, num_heads, mask=None if changes.get("ignore_mask") else mask,
                                 **{k: v for k, v in changes.items() if k != "ignore_mask"})
    return fn


@pytest.mark.parametrize("wrong, words", [
    (_variant(scale="none"), "divide q k^T by sqrt(d_head)"),
    (_variant(scale="d_model"), "you scaled by sqrt(d_model)"),
    (_variant(softmax_dim=-2), "softmax runs over the queries"),
    (_variant(out_proj=False), "W_O is missing"),
    (_variant(heads=False), "ONE head"),
    (_variant(ignore_mask=True), "the mask is ignored"),
    (lambda x, wq, wk, wv, wo, H, mask=None: mha_ref(x, wq.T, wk.T, wv.T, wo.T, H, mask), "ignore nn.Linear's layout"),
    (lambda x, wq, wk, wv, wo, H, mask=None: mha_ref(x, wq, wk, wv, wo, H, None if mask is None else ~mask),
     "the mask's polarity is flipped"),
    (lambda x, wq, wk, wv, wo, H, mask=None: _no_transpose_split(x, wq, wk, wv, wo, H, mask), "without the transpose"),
    (lambda *args, **kw: mha_ref(*args, **kw).float() + 1e-3, "differs from the reference"),
    (lambda *args, **kw: mha_ref(*args, **kw).numpy(), "should be a torch.Tensor"),
])
def test_mha_forward_rejects_planted_mistakes(wrong, words):
    result = checks.check_mha_forward(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- parameter count
def count_ref(d_model, num_heads, bias=True, kdim=None, vdim=None):
    m = MultiHeadAttention(d_model, num_heads, bias=bias, kdim=kdim, vdim=vdim, device="meta")
    return sum(p.numel() for p in m.parameters())


def test_param_count_accepts_reference_and_torch():
    assert checks.check_mha_param_count(count_ref).passed
    torch_count = lambda d, h, bias=True, kdim=None, vdim=None: sum(p.numel() for p in torch.nn.MultiheadAttention(
        d, h, bias=bias, kdim=kdim, vdim=vdim, device="meta").parameters())
    assert checks.check_mha_param_count(torch_count).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda d, h, bias=True, kdim=None, vdim=None: h * count_ref(d, h, bias, kdim, vdim), "does not depend on H"),
    (lambda d, h, bias=True, kdim=None, vdim=None: count_ref(d, h, False, kdim, vdim), "biases are missing"),
    (lambda d, h, bias=True, kdim=None, vdim=None: 3 * d * d + (3 * d if bias else 0) + 0 * h, "W_O"),
    (lambda d, h, bias=True, kdim=None, vdim=None: count_ref(d, h, bias), "use kdim and vdim"),
    (lambda d, h, bias=True, kdim=None, vdim=None: "many", "return a number"),
])
def test_param_count_rejects_planted_mistakes(wrong, words):
    result = checks.check_mha_param_count(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- cross-attention, d_v != d_k
def cross_ref(x, memory, w_q, w_k, w_v, w_o, num_heads, *, split_T=True, merge_T=True, forgot_T=False,
              scale_by=None, keys_from_x=False, no_w_o=False):
    B, T, S, H = x.shape[0], x.shape[1], memory.shape[1], num_heads
    d_k, d_v = w_q.shape[0] // H, w_v.shape[0] // H
    kv_input = x if keys_from_x else memory

    def proj(t, w, out=False):
        return t @ w if forgot_T is True or (forgot_T == "inputs" and not out) else t @ w.T

    def split(t, L, d):
        return t.reshape(B, L, H, d).transpose(1, 2) if split_T else t.reshape(B, H, L, d)

    q, k, v = split(proj(x, w_q), T, d_k), split(proj(kv_input, w_k), S, d_k), split(proj(kv_input, w_v), S, d_v)
    scale = {"d_v": d_v, "d_model": x.shape[-1]}.get(scale_by, d_k) ** -0.5
    heads = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v  # (B, H, T, d_v)
    merged = heads.transpose(1, 2).reshape(B, T, H * d_v) if merge_T else heads.reshape(B, T, H * d_v)
    return merged if no_w_o else proj(merged, w_o, out=True)


def test_cross_mha_forward_accepts_reference_and_course_lib_sdpa():
    assert checks.check_cross_mha_forward(cross_ref).passed

    def with_sdpa(x, memory, w_q, w_k, w_v, w_o, H):
        from course_lib.attention import scaled_dot_product_attention
        from course_lib.mha import merge_heads, split_heads
        out = scaled_dot_product_attention(split_heads(x @ w_q.T, H), split_heads(memory @ w_k.T, H),
                                           split_heads(memory @ w_v.T, H))
        return merge_heads(out) @ w_o.T
    assert checks.check_cross_mha_forward(with_sdpa).passed


def _cross_mutating(x, memory, w_q, w_k, w_v, w_o, H):
    memory.zero_()  # its copy only: the checker's reference uses the real memory
    return cross_ref(x, memory, w_q, w_k, w_v, w_o, H)


@pytest.mark.parametrize("options, words", [
    (dict(split_T=False), "reshaped to (B, H, T, d_head) without the transpose"),
    (dict(merge_T=False), "without moving the head axis back"),
    (dict(forgot_T=True), "ignore nn.Linear's layout"),
    (dict(scale_by="d_v"), "sqrt(d_v)"),
    (dict(scale_by="d_model"), "sqrt(d_model)"),
    (dict(keys_from_x=True), "keys and values come from x"),
    (dict(no_w_o=True), "the output projection w_o is missing"),
])
def test_cross_mha_forward_rejects_planted_mistakes(options, words):
    def wrong(*args):
        try:
            return cross_ref(*args, **options)
        except RuntimeError:  # the mistake cannot run on these shapes: answer right so the checker moves on
            return cross_ref(*args)
    result = checks.check_cross_mha_forward(wrong)
    assert not result.passed and words in result.message, result.message


def test_cross_mha_forward_rejects_a_mutating_answer():
    result = checks.check_cross_mha_forward(_cross_mutating)
    assert not result.passed and "changed its input `memory` in place" in result.message, result.message


def _scales_q_in_place(x, w_q, w_k, w_v, w_o, num_heads, mask=None):
    out = mha_ref(x, w_q, w_k, w_v, w_o, num_heads, mask)  # the right answer ...
    w_q.mul_(2.0)  # ... and then the caller's weight is changed
    return out


def _split_then_scribble(x, num_heads):
    out = split_ref(x, num_heads).clone()  # the right answer ...
    x.zero_()  # ... and then the caller's tensor is overwritten
    return out


def test_an_answer_that_is_right_but_changes_its_inputs_is_named():
    result = checks.check_mha_forward(_scales_q_in_place)
    assert not result.passed and "changed its input `w_q` in place" in result.message, result.message
    result = checks.check_split_heads(_split_then_scribble)
    assert not result.passed and "changed its input `x` in place" in result.message, result.message


# ----------------------------------------------------------------------------- cost on paper
def cost_ref(B, T, S, d_model, H, d_k, d_v, kdim, vdim, *, bias=True, kv_size=None, value_dk=False, fma=2, TT=False):
    kdim, vdim = (kv_size, kv_size) if kv_size else (kdim, vdim)
    dv = d_k if value_dk else d_v
    params = H * d_k * (d_model + kdim) + H * dv * vdim + d_model * H * dv
    params += (2 * H * d_k + H * dv + d_model) if bias else 0
    return params, fma * B * H * T * (T if TT else S) * (d_k + d_v)


def test_cross_mha_cost_accepts_reference():
    assert checks.check_cross_mha_cost(cost_ref).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda *c: cost_ref(*c, bias=False), "biases are missing"),
    (lambda *c: cost_ref(*c, kv_size=c[3]), "kdim and vdim"),
    (lambda *c: cost_ref(*c, value_dk=True), "value heads have their own size"),
    (lambda *c: cost_ref(*c, fma=1), "multiply-add as 1 FLOP"),
    (lambda *c: cost_ref(*c, TT=True), "T x S"),
    (lambda *c: cost_ref(*c)[0], "pair"),
    (lambda *c: cost_ref(*c)[::-1], "wrong order, (core_flops, params)"),
    (lambda B, T, S, d_model, H, d_k, d_v, kdim, vdim: cost_ref(B, T, S, d_model, H, d_k, d_v, kdim, kdim),
     "you used kdim as the input size of W_v too"),
])
def test_cross_mha_cost_rejects_planted_mistakes(wrong, words):
    result = checks.check_cross_mha_cost(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- quiz
def test_heads_quiz_accepts_the_right_letters():
    result = checks.check_heads_quiz(lambda: "bbcb")
    assert result.passed, result.message
    assert checks.check_heads_quiz(lambda: ("B", "b", "c", "b")).passed


@pytest.mark.parametrize("wrong, words", [
    (lambda: "abcb", "head count does not appear"), (lambda: "cbcb", "multiplies the weights by about 4"),
    (lambda: "dbcb", "count each option's matrices"),
    (lambda: "bacb", "so the total grows faster than 2x"), (lambda: "bccb", "by less than 4x"),
    (lambda: "bdcb", "not cubic"),
    (lambda: "bbab", "keys of head 0"), (lambda: "bbbb", "W_O's input columns must be swapped too"),
    (lambda: "bbdb", "everything that reads them moves with them"),
    (lambda: "bbca", "that is 8 key/value heads"), (lambda: "bbcc", "that is one key/value head"),
    (lambda: "bbcd", "a shared head is stored once"),
    (lambda: "bbc", "return 4 letters"), (lambda: "bbce", "answer with one of a, b, c, d"),
])
def test_heads_quiz_rejects_wrong_answers(wrong, words):
    result = checks.check_heads_quiz(wrong)
    assert not result.passed and words in result.message, result.message


def test_heads_quiz_answers_agree_with_the_library():
    # question 1: about twice the parameters only for wider heads at the same d_model
    base = sum(p.numel() for p in MultiHeadAttention(512, 8, device="meta").parameters())
    sixteen = sum(p.numel() for p in MultiHeadAttention(512, 16, device="meta").parameters())
    wide = 4 * 512 * 1024 + 3 * 1024 + 512  # q/k/v project 512 -> 8 x 128, W_O 1024 -> 512, biases
    wider_model = sum(p.numel() for p in MultiHeadAttention(1024, 8, device="meta").parameters())
    assert sixteen == base and 1.9 < wide / base < 2.1 and wider_model / base > 3.9
    # question 2: d_model = 768, T 1024 -> 2048
    flops = lambda T, d=768: 8 * T * d * d + 4 * T * T * d  # noqa: E731
    assert 2 < flops(2048) / flops(1024) < 4
    # question 3: swapping heads 0 and 1 in W_Q, W_K, W_V (rows) and W_O (input columns) leaves the output unchanged
    torch.manual_seed(0)
    m = MultiHeadAttention(12, 3, dtype=torch.float64).eval()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    order = torch.cat([torch.arange(4, 8), torch.arange(0, 4), torch.arange(8, 12)])
    swapped = MultiHeadAttention(12, 3, dtype=torch.float64).eval()
    qkv_only = MultiHeadAttention(12, 3, dtype=torch.float64).eval()
    with torch.no_grad():
        for target in (swapped, qkv_only):
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(target, name).weight.copy_(getattr(m, name).weight[order])
                getattr(target, name).bias.copy_(getattr(m, name).bias[order])
            target.out_proj.load_state_dict(m.out_proj.state_dict())
        swapped.out_proj.weight.copy_(m.out_proj.weight[:, order])
        assert torch.allclose(swapped(x), m(x), atol=1e-12)
        assert not torch.allclose(qkv_only(x), m(x), atol=1e-6)
    # question 4: 2 key/value heads of 64 features, d_model = 512
    assert 2 * 512 * (2 * 64) == 131_072


# ----------------------------------------------------------------------------- the learner's nn.Module
class ModuleRef(torch.nn.Module):
    """The ~15-line module notebook 04's exercise asks for."""

    def __init__(self, d_model, num_heads):
        super().__init__()
        self.num_heads, self.d_head = num_heads, d_model // num_heads
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(d_model, d_model) for _ in range(3))
        self.out_proj = torch.nn.Linear(d_model, d_model)

    def heads(self, t):
        B, T, _ = t.shape
        return t.view(B, T, self.num_heads, self.d_head).transpose(1, 2)  # (B, H, T, d_head)

    def attend(self, q, k, v, attn_mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    def forward(self, x, attn_mask=None):
        B, T, D = x.shape
        out = self.attend(self.heads(self.q_proj(x)), self.heads(self.k_proj(x)), self.heads(self.v_proj(x)),
                          attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class _Unscaled(ModuleRef):
    def attend(self, q, k, v, attn_mask):
        scores = q @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.softmax(-1) @ v


class _ScaledByDModel(ModuleRef):
    def attend(self, q, k, v, attn_mask):
        return super().attend(q * (self.d_head / (self.d_head * self.num_heads)) ** 0.5, k, v, attn_mask)


class _SoftmaxOverQueries(ModuleRef):
    def attend(self, q, k, v, attn_mask):
        scores = q @ k.transpose(-2, -1) / self.d_head**0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.softmax(-2) @ v


class _NoTranspose(ModuleRef):
    def heads(self, t):
        B, T, _ = t.shape
        return t.reshape(B, self.num_heads, T, self.d_head)


class _MaskIgnored(ModuleRef):
    def attend(self, q, k, v, attn_mask):
        return super().attend(q, k, v, None)


class _MaskFlipped(ModuleRef):
    def attend(self, q, k, v, attn_mask):
        return super().attend(q, k, v, None if attn_mask is None else ~attn_mask)


class _FiniteFill(ModuleRef):
    def attend(self, q, k, v, attn_mask):
        scores = q @ k.transpose(-2, -1) / self.d_head**0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, -1e9)
        return scores.softmax(-1) @ v


class _NoGuard(ModuleRef):
    def attend(self, q, k, v, attn_mask):
        scores = q @ k.transpose(-2, -1) / self.d_head**0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.softmax(-1) @ v


class _OutWeightOnly(ModuleRef):
    def forward(self, x, attn_mask=None):
        B, T, D = x.shape
        out = self.attend(self.heads(self.q_proj(x)), self.heads(self.k_proj(x)), self.heads(self.v_proj(x)),
                          attn_mask)
        return out.transpose(1, 2).reshape(B, T, D) @ self.out_proj.weight.T


class _OtherNames(ModuleRef):
    def __init__(self, d_model, num_heads):
        super().__init__(d_model, num_heads)
        self.wq = self.q_proj
        del self.q_proj


class _NotAModule:
    def __init__(self, d_model, num_heads):
        pass


class _ChangesItsInput(ModuleRef):
    def forward(self, x, attn_mask=None):
        x.mul_(0.5)  # in place: the checker's copy, not the learner's tensor, and the output is then wrong
        return super().forward(x, attn_mask)


def test_mha_module_accepts_reference():
    result = checks.check_mha_module(ModuleRef)
    assert result.passed, result.message


@pytest.mark.parametrize("wrong, words", [
    (_Unscaled, "divide q k^T by sqrt(d_head)"),
    (_ScaledByDModel, "you scaled by sqrt(d_model)"),
    (_SoftmaxOverQueries, "softmax runs over the queries"),
    (_NoTranspose, "without the transpose"),
    (_MaskIgnored, "the mask is ignored"),
    (_MaskFlipped, "the mask's polarity is flipped"),
    (_FiniteFill, "your output there is an average of the values, not 0. That is what a finite fill such as -1e9"),
    (_NoGuard, "your output is NaN at those queries. Filling the masked scores with -inf is right"),
    (_OutWeightOnly, "out_proj's bias is missing"),
    (_OtherNames, "needs self.q_proj = nn.Linear(d_model, d_model)"),
    (_NotAModule, "should build an nn.Module"),
    (_ChangesItsInput, "changed its input `x` in place"),
])
def test_mha_module_rejects_planted_mistakes(wrong, words):
    result = checks.check_mha_module(wrong)
    assert not result.passed and words in result.message, result.message


# ----------------------------------------------------------------------------- cross-attention: mistakes that crash
_CROSS_SQUARE = "B=1, T=4, S=4, d_model=8, kdim=8, H=2, d_k=4, d_v=4"


@pytest.mark.parametrize("options, message", [
    # w_v is (6, 12) in the first case, so memory @ w_v raises there; the square case shows why
    (dict(forgot_T=True), "the projections ignore nn.Linear's layout: a weight is stored (out_features, "
                          "in_features), one ROW per output feature, so projecting row vectors multiplies by the "
                          "transposed weight (with square weights the untransposed product runs, but it computes "
                          "something else)"),
    # x @ w_q without .T, and the same for w_k and w_v, but w_o used the right way round
    (dict(forgot_T="inputs"), "the query, key and value projections ignore nn.Linear's layout (the output projection "
                              "does not): a weight is stored (out_features, in_features), one ROW per output feature, "
                              "so projecting row vectors multiplies by the transposed weight, for w_q, w_k and w_v as "
                              "for w_o"),
    # the first case has T=3 queries and S=5 keys: x's projection cannot be split into S=5 keys
    (dict(keys_from_x=True), "the keys and values come from x: in cross-attention only the queries come from x, the "
                             "keys and values from memory"),
])
def test_cross_mha_forward_names_a_mistake_that_crashes_on_the_first_case(options, message):
    result = checks.check_cross_mha_forward(lambda *args: cross_ref(*args, **options))
    assert not result.passed
    assert result.message.startswith("your function raised RuntimeError: "), result.message
    assert result.message.endswith(f". For {_CROSS_SQUARE} it runs, and its output there shows why: {message}."), \
        result.message


def _cross_keys_from_x_own_lengths(x, memory, w_q, w_k, w_v, w_o, H):
    return cross_ref(x, x, w_q, w_k, w_v, w_o, H)  # keys and values from x, split with x's own length


def test_cross_mha_forward_names_keys_from_x_where_T_differs_from_S():
    result = checks.check_cross_mha_forward(_cross_keys_from_x_own_lengths)
    assert not result.passed
    assert result.message == ("for B=2, T=3, S=5, d_model=12, kdim=12, H=3, d_k=4, d_v=2: the keys and values come "
                              "from x: in cross-attention only the queries come from x, the keys and values from "
                              "memory."), result.message


def test_cross_mha_forward_crash_without_a_named_mistake_is_reported_as_it_was():
    def crashes(x, memory, w_q, w_k, w_v, w_o, H):
        raise RuntimeError("boom")
    result = checks.check_cross_mha_forward(crashes)
    assert not result.passed and result.message.startswith("your function raised RuntimeError: boom (called with")
    assert "it runs" not in result.message, result.message

"""The notebook-12 checkers pass the reference and catch planted mistakes with a useful message."""

import math

import torch

from course_lib import checks
from course_lib.masks import causal_mask


def bytes_reference(L, H, H_kv, d, nbytes):
    return 2 * L * H_kv * d * nbytes


def test_kv_cache_bytes_checker():
    assert checks.check_kv_cache_bytes(bytes_reference).passed
    for wrong, words in ((lambda L, H, H_kv, d, b: L * H_kv * d * b, "factor 2"),
                         (lambda L, H, H_kv, d, b: 2 * L * H * d * b, "query heads"),
                         (lambda L, H, H_kv, d, b: 16 * L * H_kv * d * b, "bits"),
                         (lambda L, H, H_kv, d, b: 2 * H_kv * d * b, "one layer"),
                         (lambda L, H, H_kv, d, b: "a lot", "number")):
        r = checks.check_kv_cache_bytes(wrong)
        assert not r.passed and words in r.message, r.message


def gqa_reference(q, k, v):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n, 1), v.repeat_interleave(n, 1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~causal_mask(q.shape[-2]), float("-inf")), -1) @ v


def gqa_tiled(q, k, v):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat(1, n, 1, 1), v.repeat(1, n, 1, 1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~causal_mask(q.shape[-2]), float("-inf")), -1) @ v


def gqa_not_causal(q, k, v):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n, 1), v.repeat_interleave(n, 1)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v


def gqa_unscaled(q, k, v):
    return gqa_reference(q * math.sqrt(q.shape[-1]), k, v)


def gqa_mutating(q, k, v):
    k.mul_(3.0)  # changes its own copy only; the answer is then wrong
    return gqa_reference(q, k, v)


def gqa_float32(q, k, v):
    return gqa_reference(q.float(), k.float(), v.float())  # right, but computed in float32


def test_gqa_checker():
    assert checks.check_gqa_attention(gqa_reference).passed
    assert checks.check_gqa_attention(lambda q, k, v: gqa_reference(q, k, v).numpy()).passed  # float64 numpy too
    for wrong, words in ((gqa_tiled, "tiled"), (gqa_not_causal, "causal"), (gqa_unscaled, "sqrt(d)"),
                         (gqa_mutating, "differs"), (gqa_float32, "is float32, expected float64"),
                         (lambda q, k, v: gqa_float32(q, k, v).numpy(), "is float32, expected float64"),
                         (lambda q, k, v: gqa_reference(q, k, v).half(), "is float16, expected float64"),
                         (lambda q, k, v: gqa_reference(q, k, v) + 1e-3j, "is complex")):
        r = checks.check_gqa_attention(wrong)
        assert not r.passed and words in r.message, r.message


def rope_reference(x, offset, half=False, sign=1.0, use_offset=True):
    T, d = x.shape
    pos = torch.arange(T, dtype=torch.float64) + (offset if use_offset else 0)
    ang = pos[:, None] * 10000 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    c, s = ang.cos(), sign * ang.sin()
    if half:
        a, b = x[:, : d // 2], x[:, d // 2:]
        return torch.cat([a * c - b * s, b * c + a * s], -1)
    a, b = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2], out[:, 1::2] = a * c - b * s, b * c + a * s
    return out


def test_interleaved_rope_checker():
    assert checks.check_interleaved_rope(rope_reference).passed
    for kw, words in (({"half": True}, "rotate-half"), ({"sign": -1.0}, "wrong way"),
                      ({"use_offset": False}, "offset is ignored")):
        r = checks.check_interleaved_rope(lambda x, o, kw=kw: rope_reference(x, o, **kw))
        assert not r.passed and words in r.message, r.message

    def mutating(x, offset):
        x.zero_()
        return rope_reference(x, offset)

    r = checks.check_interleaved_rope(mutating)
    assert not r.passed


def test_interleaved_rope_checker_refuses_complex_and_float32_answers():
    # the right answer plus an imaginary part: converting it to float64 would drop the 5j and pass
    for wrong in (lambda x, o: rope_reference(x, o) + 5j, lambda x, o: rope_reference(x, o).numpy() + 5j,
                  lambda x, o: torch.complex(rope_reference(x, o), torch.zeros_like(x))):
        r = checks.check_interleaved_rope(wrong)
        assert not r.passed and "is complex" in r.message and "real" in r.message, r.message
    r = checks.check_interleaved_rope(lambda x, o: rope_reference(x.float(), o))
    assert not r.passed and "is float32, expected float64" in r.message, r.message


def test_window_receptive_field_checker():
    assert checks.check_window_receptive_field(lambda L, W: L * (W - 1) + 1).passed
    for wrong, words in ((lambda L, W: L * W, "window - 1"), (lambda L, W: W, "one layer"),
                         (lambda L, W: W ** L, "multiply"), (lambda L, W: None, "number")):
        r = checks.check_window_receptive_field(wrong)
        assert not r.passed and words in r.message, r.message


def test_checkers_never_raise():
    def boom(*args):
        raise RuntimeError("boom")

    for check in (checks.check_kv_cache_bytes, checks.check_gqa_attention, checks.check_interleaved_rope,
                  checks.check_window_receptive_field):
        r = check(boom)
        assert not r.passed and "boom" in r.message
        assert not check(lambda *a: (_ for _ in ()).throw(NotImplementedError())).passed

"""Decoding without overhead (course_lib.modern.graphed_decode): the graph-safe step over a static cache equals
MultiHeadAttention with its growing KVCache, eagerly and replayed from a traced graph (which, like a CUDA graph,
bakes in every Python value it saw); steps that are right eagerly but not graph-safe are caught by the replay."""

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch.fx.experimental.proxy_tensor import make_fx

from course_lib import KVCache, MultiHeadAttention
from course_lib.modern import DecoderAttention
from course_lib.modern.graphed_decode import GraphedDecodeStep, static_decode_step
from course_lib.modern.static_cache import StaticKVCache
from course_lib.positional import RotaryEmbedding

STEPS = 20
# float64: every path sums the same at most max_len products per score and row; reordered sums of numbers of
# size ~10 differ by a few units of 2.2e-16 times max_len, far below this
ATOL64 = 1e-12
# (d_model, heads, kv heads, batch): MHA, GQA, MQA, one head
SHAPES = [(32, 4, 4, 1), (32, 4, 2, 3), (48, 6, 1, 2), (16, 1, 1, 2)]


def _setup(d_model, heads, kv_heads, batch, *, prompt=5, room=STEPS, seed=0, dtype=torch.float64):
    """A module, its growing cache after a prompt, a static cache holding the same rows, fresh step inputs."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mha = MultiHeadAttention(d_model, heads, num_kv_heads=kv_heads, dtype=dtype).eval()
    growing = KVCache()
    with torch.no_grad():
        mha(torch.randn(batch, prompt, d_model, generator=gen, dtype=dtype), cache=growing, is_causal=True)
    static = StaticKVCache(batch, kv_heads, prompt + room, d_model // heads, dtype=dtype)
    assert growing.key is not None and growing.value is not None
    static.update(growing.key, growing.value)
    xs = torch.randn(STEPS, batch, 1, d_model, generator=gen, dtype=dtype)  # (steps, B, 1, d_model)
    return mha, growing, static, xs


def _reference(mha, growing, xs):
    with torch.no_grad():
        return [mha(x, cache=growing, is_causal=True) for x in xs]


def _traced(step, mha, cache, position, x):
    """make_fx traces the step once (running it); put the position and the host count back, as at capture."""
    start_position, start_length = position.clone(), cache.length
    with torch.no_grad():
        graph = make_fx(lambda x_: step(mha, x_, cache, position), tracing_mode="real")(x)
    position.copy_(start_position)
    cache.length = start_length
    return graph


# ----------------------------------------------------------------------------- equal to the growing cache
@pytest.mark.parametrize("shape", SHAPES)
def test_the_eager_static_step_equals_the_growing_cache(shape):
    mha, growing, static, xs = _setup(*shape)
    expected = _reference(mha, growing, xs)
    position = torch.tensor([static.length])
    address = static.key.data_ptr()
    with torch.no_grad():
        for x, ref in zip(xs, expected, strict=True):
            torch.testing.assert_close(static_decode_step(mha, x, static, position), ref, rtol=0, atol=ATOL64)
    assert int(position) == 5 + STEPS and static.key.data_ptr() == address  # advanced on the device, in place
    torch.testing.assert_close(static.key, growing.key, rtol=0, atol=ATOL64)  # every row written where it belongs
    assert static.length == 5  # the host's count is the caller's (GraphedDecodeStep keeps it)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_traced_step_replayed_step_after_step_equals_the_growing_cache(shape):
    mha, growing, static, xs = _setup(*shape)
    expected = _reference(mha, growing, xs)
    position = torch.tensor([static.length])
    graph = _traced(static_decode_step, mha, static, position, xs[0])
    assert "index_copy_" in graph.code and "add_" in graph.code  # the write and the advance are in the graph
    with torch.no_grad():
        for x, ref in zip(xs, expected, strict=True):
            torch.testing.assert_close(graph(x), ref, rtol=0, atol=ATOL64)
    assert int(position) == 5 + STEPS


@pytest.mark.parametrize("mode", ["eager", "traced"])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_graphed_step_equals_the_growing_cache_and_keeps_the_count(shape, mode):
    mha, growing, static, xs = _setup(*shape)
    expected = _reference(mha, growing, xs)
    step = GraphedDecodeStep.for_module(mha, static, xs[0], mode=mode)
    assert static.length == 5 and int(step.position) == 5  # tracing ran the step once and put the position back
    for t, (x, ref) in enumerate(zip(xs, expected, strict=True)):
        torch.testing.assert_close(step(x), ref, rtol=0, atol=ATOL64)
        assert static.length == int(step.position) == 6 + t
    torch.testing.assert_close(static.key, growing.key, rtol=0, atol=ATOL64)


def test_float32_agrees_within_float32_rounding():
    mha, growing, static, xs = _setup(64, 8, 2, 2, dtype=torch.float32)
    expected = _reference(mha, growing, xs)
    step = GraphedDecodeStep.for_module(mha, static, xs[0], mode="traced")
    worst = max(float((step(x) - ref).abs().max()) for x, ref in zip(xs, expected, strict=True))
    assert worst < 1e-5  # outputs of size ~1, sums of at most 25 terms: a few float32 roundings (1.2e-7 each)


def test_rows_not_yet_written_are_masked_whatever_they_hold():
    mha, growing, static, xs = _setup(32, 4, 2, 2)
    expected = _reference(mha, growing, xs)
    with torch.no_grad():  # garbage in the free rows (a cache reused after a longer text holds old rows)
        static.key[:, :, 5:] = 1e3 * torch.randn_like(static.key[:, :, 5:])
        static.value[:, :, 5:] = 1e3 * torch.randn_like(static.value[:, :, 5:])
    step = GraphedDecodeStep.for_module(mha, static, xs[0], mode="traced")
    for x, ref in zip(xs, expected, strict=True):
        torch.testing.assert_close(step(x), ref, rtol=0, atol=ATOL64)


# ----------------------------------------------------------------------------- steps that are not graph-safe
def _sliced_step(mha, x, cache, position):
    """Right eagerly: reads the position back to the host and slices the cache with it (a graph bakes it in)."""
    p = int(position.item())
    B, H, H_kv, d = x.shape[0], mha.num_heads, mha.num_kv_heads, mha.d_head
    q = mha.q_proj(x).view(B, H_kv, H // H_kv, d)
    cache.key[:, :, p:p + 1] = mha.k_proj(x).view(B, H_kv, 1, d)
    cache.value[:, :, p:p + 1] = mha.v_proj(x).view(B, H_kv, 1, d)
    out = F.scaled_dot_product_attention(q, cache.key[:, :, :p + 1], cache.value[:, :, :p + 1])
    position.add_(1)
    return mha.out_proj(out.reshape(B, 1, H * d))


def _update_step(mha, x, cache, position):
    """Right eagerly: writes with StaticKVCache.update, whose row is the host's Python count."""
    B, H, H_kv, d = x.shape[0], mha.num_heads, mha.num_kv_heads, mha.d_head
    q = mha.q_proj(x).view(B, H_kv, H // H_kv, d)
    keys, values = cache.update(mha.k_proj(x).view(B, H_kv, 1, d), mha.v_proj(x).view(B, H_kv, 1, d))
    position.add_(1)
    return mha.out_proj(F.scaled_dot_product_attention(q, keys, values).reshape(B, 1, H * d))


def _python_mask_step(mha, x, cache, position):
    """Right eagerly: writes at the device position but builds the mask from a Python int."""
    B, H, H_kv, d = x.shape[0], mha.num_heads, mha.num_kv_heads, mha.d_head
    q = mha.q_proj(x).view(B, H_kv, H // H_kv, d)
    keys, values = cache.write_at(mha.k_proj(x).view(B, H_kv, 1, d), mha.v_proj(x).view(B, H_kv, 1, d), position)
    filled = (torch.arange(cache.max_len, device=x.device) <= int(position)).view(1, 1, 1, -1)
    position.add_(1)
    return mha.out_proj(F.scaled_dot_product_attention(q, keys, values, attn_mask=filled).reshape(B, 1, H * d))


def _host_count_mask_step(mha, x, cache, position):
    """Right eagerly under GraphedDecodeStep, which keeps cache.length: builds the mask from that host count."""
    B, H, H_kv, d = x.shape[0], mha.num_heads, mha.num_kv_heads, mha.d_head
    q = mha.q_proj(x).view(B, H_kv, H // H_kv, d)
    keys, values = cache.write_at(mha.k_proj(x).view(B, H_kv, 1, d), mha.v_proj(x).view(B, H_kv, 1, d), position)
    filled = (torch.arange(cache.max_len, device=x.device) <= cache.length).view(1, 1, 1, -1)
    position.add_(1)
    return mha.out_proj(F.scaled_dot_product_attention(q, keys, values, attn_mask=filled).reshape(B, 1, H * d))


@pytest.mark.parametrize("planted", [_sliced_step, _update_step, _python_mask_step])
def test_a_step_that_is_right_eagerly_but_not_graph_safe_is_caught_by_the_replay(planted):
    mha, growing, static, xs = _setup(32, 4, 2, 2)
    expected = _reference(mha, growing, xs)
    start = (static.key.clone(), static.value.clone(), static.length)
    position = torch.tensor([static.length])
    with torch.no_grad():
        for x, ref in zip(xs, expected, strict=True):  # eagerly the planted step is right...
            torch.testing.assert_close(planted(mha, x, static, position), ref, rtol=0, atol=ATOL64)
    static.key.copy_(start[0])
    static.value.copy_(start[1])
    static.length = start[2]
    position.fill_(start[2])
    graph = _traced(planted, mha, static, position, xs[0])
    with torch.no_grad():
        replayed = [graph(x) for x in xs]
    torch.testing.assert_close(replayed[0], expected[0], rtol=0, atol=ATOL64)  # ...and so is the step it traced,
    errors = [float((out - ref).abs().max()) for out, ref in zip(replayed[1:], expected[1:], strict=True)]
    assert min(errors) > 1e-3  # but every later replay repeats the traced step's row


def test_the_graphed_step_runs_a_host_count_step_right_eagerly_and_wrong_replayed():
    errors = {}
    for mode in ("eager", "traced"):
        mha, growing, static, xs = _setup(32, 4, 2, 2)
        expected = _reference(mha, growing, xs)
        with torch.no_grad():
            step = GraphedDecodeStep(lambda x, p: _host_count_mask_step(mha, x, static, p), static, xs[0], mode=mode)  # noqa: B023
        errors[mode] = [float((step(x) - ref).abs().max()) for x, ref in zip(xs, expected, strict=True)]
    assert max(errors["eager"]) < ATOL64 and errors["traced"][0] < ATOL64 and min(errors["traced"][1:]) > 1e-3


# ----------------------------------------------------------------------------- the count, the buffers, rewinding
def test_a_step_past_max_len_is_refused_with_the_cache_unchanged():
    mha, growing, static, xs = _setup(32, 4, 2, 2, room=2)
    step = GraphedDecodeStep.for_module(mha, static, xs[0], mode="traced")
    step(xs[0])
    step(xs[1])
    before = (static.key.clone(), static.value.clone(), static.length, step.position.clone())
    with pytest.raises(ValueError, match="max_len=7"):
        step(xs[2])
    assert torch.equal(before[0], static.key) and torch.equal(before[1], static.value)
    assert before[2] == static.length == 7 and torch.equal(before[3], step.position)
    with pytest.raises(ValueError, match="cache is full"):
        GraphedDecodeStep.for_module(mha, static, xs[0])


def test_the_output_is_one_buffer_overwritten_by_the_next_call():
    mha, growing, static, xs = _setup(32, 4, 2, 2)
    expected = _reference(mha, growing, xs[:2])
    for mode in ("eager", "traced"):
        static.length = 5
        step = GraphedDecodeStep.for_module(mha, static, xs[0], mode=mode)
        first = step(xs[0])
        kept = first.clone()
        second = step(xs[1])
        assert second is first
        torch.testing.assert_close(kept, expected[0], rtol=0, atol=ATOL64)
        torch.testing.assert_close(first, expected[1], rtol=0, atol=ATOL64)  # the first result is gone


def test_setting_the_length_rewinds_the_device_position():
    mha, growing, static, xs = _setup(32, 4, 2, 2)
    step = GraphedDecodeStep.for_module(mha, static, xs[0], mode="traced")
    with torch.no_grad():
        for x in xs[:3]:
            mha(x, cache=growing, is_causal=True)
            step(x)
    static.length = 6  # forget the last two tokens: the next call writes row 6 again
    rewound = KVCache(key=growing.key[:, :, :6], value=growing.value[:, :, :6])
    for x in torch.randn(2, *xs[0].shape, dtype=xs.dtype):
        with torch.no_grad():
            ref = mha(x, cache=rewound, is_causal=True)
        torch.testing.assert_close(step(x), ref, rtol=0, atol=ATOL64)
    assert static.length == int(step.position) == 8


def test_the_projections_are_called_as_modules():
    mha, growing, static, xs = _setup(32, 4, 2, 2)
    calls = []
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        getattr(mha, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    position = torch.tensor([static.length])
    with torch.no_grad():
        static_decode_step(mha, xs[0], static, position)
    assert calls == ["q_proj", "k_proj", "v_proj", "out_proj"]
    mha.out_proj.register_forward_hook(lambda m, i, o: torch.zeros_like(o))  # a hook's output is used
    with torch.no_grad():
        assert not static_decode_step(mha, xs[1], static, position).any()


def test_a_pruned_projection_is_used_as_pruned():
    mha, growing, static, xs = _setup(32, 4, 2, 2)
    torch.nn.utils.prune.l1_unstructured(mha.q_proj, "weight", amount=0.5)  # weight: computed from weight_orig
    expected = _reference(mha, growing, xs[:3])
    position = torch.tensor([static.length])
    with torch.no_grad():
        for x, ref in zip(xs[:3], expected, strict=True):
            torch.testing.assert_close(static_decode_step(mha, x, static, position), ref, rtol=0, atol=ATOL64)


# ----------------------------------------------------------------------------- bad input, refused before writing
def _module(**kwargs):
    return MultiHeadAttention(32, 4, num_kv_heads=2, dtype=torch.float64, **kwargs).eval()


BAD = [
    ({"x": torch.randn(2, 2, 32, dtype=torch.float64)}, ValueError, r"x must have shape \(2, 1, 32\)"),
    ({"x": torch.randn(3, 1, 32, dtype=torch.float64)}, ValueError, r"x must have shape \(2, 1, 32\)"),
    ({"x": torch.randn(2, 1, 32)}, TypeError, "x is torch.float32"),
    ({"x": [0.0] * 32}, TypeError, "x must be a"),
    ({"position": 5}, TypeError, "position must be a"),
    ({"position": torch.tensor([5], dtype=torch.int32)}, ValueError, "position must be a \\(1,\\) int64"),
    ({"position": torch.tensor(5)}, ValueError, "position must be a \\(1,\\) int64"),
    ({"cache": StaticKVCache(2, 4, 10, 8, dtype=torch.float64)}, ValueError, "H_kv=2"),
    ({"cache": StaticKVCache(2, 2, 10, 8)}, TypeError, "cache holds torch.float32"),
    ({"cache": KVCache()}, TypeError, "cache must be a"),
    ({"mha": _module(rotary=RotaryEmbedding(8))}, ValueError, "rotary"),
    ({"mha": DecoderAttention(32, 4, window=4, dtype=torch.float64).eval()}, ValueError, "sliding window"),
    ({"mha": _module(dropout=0.1).train()}, ValueError, "mha.eval"),
    ({"mha": MultiHeadAttention(32, 4, kdim=16, dtype=torch.float64)}, ValueError, "kdim = vdim = d_model"),
    ({"mha": torch.nn.Linear(32, 32)}, TypeError, "MultiHeadAttention"),
    ({"grad": True}, ValueError, "torch.no_grad"),
    ({"autocast": True}, ValueError, "autocast"),
]


@pytest.mark.parametrize(("bad", "error", "words"), BAD)
def test_bad_input_is_refused_before_any_arithmetic_or_write(bad, error, words):
    torch.manual_seed(0)
    mha = _module()
    cache = StaticKVCache(2, 2, 10, 8, dtype=torch.float64)
    cache.update(torch.randn(2, 2, 4, 8, dtype=torch.float64), torch.randn(2, 2, 4, 8, dtype=torch.float64))
    args = {"mha": mha, "x": torch.randn(2, 1, 32, dtype=torch.float64), "cache": cache,
            "position": torch.tensor([4])} | {k: v for k, v in bad.items() if k not in ("grad", "autocast")}
    calls = []
    for module in args["mha"].modules():
        module.register_forward_hook(lambda *_: calls.append(1))
    target = args["cache"] if isinstance(args["cache"], StaticKVCache) else cache
    before = (target.key.clone(), target.value.clone(), target.length)
    position = args["position"].clone() if isinstance(args["position"], torch.Tensor) else None
    with torch.set_grad_enabled(bool(bad.get("grad"))), torch.autocast("cpu", enabled=bool(bad.get("autocast"))):
        with pytest.raises(error, match=words):
            static_decode_step(args["mha"], args["x"], args["cache"], args["position"])
    assert not calls  # no projection ran
    assert torch.equal(before[0], target.key) and torch.equal(before[1], target.value) and before[2] == target.length
    assert position is None or torch.equal(position, args["position"])


def test_the_graphed_step_refuses_an_input_unlike_the_captured_one_unchanged():
    mha, growing, static, xs = _setup(32, 4, 2, 2)
    step = GraphedDecodeStep.for_module(mha, static, xs[0], mode="traced")
    step(xs[0])
    before = (static.key.clone(), static.length, step.position.clone(), step.static_x.clone())
    for bad in (xs[1].float(), xs[1][:1]):
        with pytest.raises(ValueError, match="x must be"):
            step(bad)
    with pytest.raises(TypeError, match="x must be"):
        step("x")  # type: ignore[arg-type]
    assert torch.equal(before[0], static.key) and before[1] == static.length
    assert torch.equal(before[2], step.position) and torch.equal(before[3], step.static_x)


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"mode": "cuda_graph"}, ValueError, "needs the cache and x on a CUDA device"),
    ({"mode": "compiled"}, ValueError, "mode must be one of"),
    ({"warmup": -1}, ValueError, "warmup"),
])
def test_the_graphed_step_refuses_bad_settings(kwargs, error, words):
    if kwargs.get("mode") == "cuda_graph" and torch.cuda.is_available():
        pytest.skip("the tensors here are on the CPU; on a GPU the message is the same, this test is not needed")
    mha, growing, static, xs = _setup(32, 4, 2, 2)
    with pytest.raises(error, match=words):
        GraphedDecodeStep.for_module(mha, static, xs[0], **kwargs)


# ----------------------------------------------------------------------------- the static cache's in-place write
def test_write_at_writes_one_row_in_place_and_leaves_the_count():
    cache = StaticKVCache(2, 2, 6, 4)
    cache.update(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    address, before = cache.key.data_ptr(), cache.key.clone()
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    keys, values = cache.write_at(k, v, torch.tensor([4]))
    assert keys.data_ptr() == address and keys.shape == (2, 2, 6, 4) and cache.length == 3
    assert torch.equal(keys[:, :, 4:5], k) and torch.equal(values[:, :, 4:5], v)
    assert torch.equal(keys[:, :, [0, 1, 2, 3, 5]], before[:, :, [0, 1, 2, 3, 5]])
    with pytest.raises(TypeError, match="position must be"):
        cache.write_at(k, v, 4)  # type: ignore[arg-type]
    for position in (torch.tensor([[4]]), torch.tensor([4.0])):
        with pytest.raises(ValueError, match="position must be"):
            cache.write_at(k, v, position)
    with pytest.raises(ValueError, match="one token"):
        cache.write_at(torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4), torch.tensor([4]))
    assert torch.equal(keys[:, :, 4:5], k)


# ----------------------------------------------------------------------------- on a GPU: the CUDA graph itself
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _to_cuda(mha, growing, static, xs):
    assert growing.key is not None and growing.value is not None
    keys, values = growing.key.float().cuda(), growing.value.float().cuda()
    cuda_static = StaticKVCache(keys.shape[0], keys.shape[1], static.max_len, keys.shape[3], device="cuda")
    cuda_static.update(keys, values)
    return mha.float().cuda(), KVCache(key=keys, value=values), cuda_static, xs.float().cuda()


@CUDA
@pytest.mark.parametrize("shape", SHAPES)
def test_the_cuda_graph_equals_the_growing_cache(shape):
    mha, growing, static, xs = _to_cuda(*_setup(*shape))
    expected = _reference(mha, growing, xs)
    step = GraphedDecodeStep.for_module(mha, static, xs[0])
    assert step.mode == "cuda_graph" and step.graph is not None
    for x, ref in zip(xs, expected, strict=True):
        assert float((step(x) - ref).abs().max()) < 1e-4  # float32, two kernels summing in different orders
    assert static.length == int(step.position) == 5 + STEPS


@CUDA
def test_a_host_count_step_is_wrong_under_the_cuda_graph_too():
    mha, growing, static, xs = _to_cuda(*_setup(32, 4, 2, 2))
    expected = _reference(mha, growing, xs)
    with torch.no_grad():
        step = GraphedDecodeStep(lambda x, p: _host_count_mask_step(mha, x, static, p), static, xs[0])
    errors = [float((step(x) - ref).abs().max()) for x, ref in zip(xs, expected, strict=True)]
    assert errors[0] < 1e-4 and min(errors[1:]) > 1e-3

"""Decoding without per-token overhead: a decode step with fixed shapes, and that step in a CUDA graph.

At batch 1 a decoding step launches a few dozen small kernels, and on a GPU the host's work of
launching them (Python, torch's dispatcher, the argument checks) takes longer than the kernels.
A CUDA graph records the kernels once and replays them all with one launch. A replay runs the same
kernels on the same memory with the same shapes, and every Python value seen at capture is baked
in. So the step that is captured

- has fixed shapes: it attends over all max_len rows of a StaticKVCache and masks the rows not yet
  written (`arange(max_len) <= position`), instead of over a view of the filled rows;
- keeps its position on the device: the new token's key and value are written with `index_copy_` at
  a (1,) int64 tensor, and the position is advanced in place (`position.add_(1)`): no `.item()`, no
  Python int that changes from one step to the next;
- allocates nothing whose shape depends on the step.

`static_decode_step(mha, x, cache, position)` is that step for a course_lib MultiHeadAttention (its
projections called as modules, the module itself unchanged); `GraphedDecodeStep` captures a step once
and replays it per token, keeping on the host the count that refuses a step past max_len. Without a
GPU, `GraphedDecodeStep(mode="traced")` replays a graph traced by torch.fx's make_fx, which, like a
CUDA graph, bakes in every Python value it saw: the tests run the same replay on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from course_lib._validate import autocast_on, check_nonnegative_int, shape_str
from course_lib.mha import MultiHeadAttention
from course_lib.modern.static_cache import StaticKVCache

__all__ = ["static_decode_step", "check_static_decode", "GraphedDecodeStep", "MODES"]

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # step(x, position) -> out
MODES = ("cuda_graph", "traced", "eager")


def check_static_decode(mha: object, x: object, cache: object, position: object) -> None:
    """Every argument of `static_decode_step`, before any arithmetic (host-side: shapes, dtypes, flags)."""
    if not isinstance(mha, MultiHeadAttention):
        raise TypeError(f"mha must be a course_lib MultiHeadAttention; got {type(mha).__name__}")
    if mha.rotary is not None:
        raise ValueError("mha has rotary positions (RoPE), which rotate by a Python int offset that a captured "
                         "step would bake in; static_decode_step supports modules without rotary")
    # DecoderAttention's window and learned sinks, read without nn.Module's slow getattr (once per token)
    if vars(mha).get("window") is not None or mha._parameters.get("sink_logits") is not None:
        raise ValueError("mha has a sliding window or learned sinks (DecoderAttention); static_decode_step "
                         "attends to every filled row: use a module without them")
    if mha.kdim != mha.d_model or mha.vdim != mha.d_model:
        raise ValueError(f"decoding is self-attention: mha needs kdim = vdim = d_model ({mha.d_model}); got "
                         f"kdim={mha.kdim}, vdim={mha.vdim}")
    if mha.training and mha.dropout > 0:
        raise ValueError(f"mha is in training mode with dropout={mha.dropout}; decode in eval mode (mha.eval())")
    q_proj = mha._modules["q_proj"]  # mha.q_proj.weight, without nn.Module's slow getattr (once per token)...
    found = None if q_proj is None else q_proj._parameters.get("weight")
    # ...unless pruning or weight_norm made the weight a computed attribute
    weight: torch.Tensor = found if found is not None else mha.q_proj.weight
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("gradients are enabled: the in-place cache writes would chain every step into one "
                         "autograd graph; decode under torch.no_grad()")
    if autocast_on(weight.device.type):
        raise ValueError("autocast is on: the cache holds one dtype, so decode with the weights in that dtype "
                         "(mha.to(dtype)) and autocast off")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a (B, 1, d_model) torch.Tensor; got {type(x).__name__}")
    if not isinstance(cache, StaticKVCache):
        raise TypeError(f"cache must be a course_lib.modern.static_cache.StaticKVCache; got {type(cache).__name__}")
    if x.ndim != 3 or x.shape[1] != 1 or x.shape[2] != mha.d_model or x.shape[0] != cache.key.shape[0]:
        raise ValueError(f"x must have shape ({cache.key.shape[0]}, 1, {mha.d_model}) (the cache's batch, one "
                         f"token, d_model); got {shape_str(x.shape)}")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise TypeError(f"x is {x.dtype} on {x.device}; mha's weights are {weight.dtype} on {weight.device}")
    k, v = cache.key, cache.value
    if k.shape[1] != mha.num_kv_heads or k.shape[3] != mha.d_head or v.shape[3] != mha.d_head:
        raise ValueError(f"cache holds keys {shape_str(k.shape)} and values {shape_str(v.shape)} "
                         f"(B, H_kv, max_len, d); mha needs H_kv={mha.num_kv_heads}, d={mha.d_head}")
    if k.dtype != weight.dtype or k.device != weight.device:
        raise TypeError(f"cache holds {k.dtype} on {k.device}; mha's weights are {weight.dtype} on {weight.device}")
    if not isinstance(position, torch.Tensor):
        raise TypeError(f"position must be a (1,) int64 torch.Tensor; got {type(position).__name__}")
    if position.shape != (1,) or position.dtype != torch.int64 or position.device != k.device:
        raise ValueError(f"position must be a (1,) int64 tensor on {k.device}; got {shape_str(position.shape)} "
                         f"{position.dtype} on {position.device}")


def static_decode_step(mha: MultiHeadAttention, x: torch.Tensor, cache: StaticKVCache,
                       position: torch.Tensor) -> torch.Tensor:
    """One new token x (B, 1, d_model) through mha with a preallocated cache; -> (B, 1, d_model).

    Writes the token's key and value into row `position` of the cache, attends over the rows
    0 ... position, and advances position by one, in place: it computes what mha(x, cache=KVCache,
    is_causal=True) computes, with shapes and a Python trace that do not change from step to step, so it
    can be captured in a CUDA graph. GQA and MQA fold the query heads that share a key/value head
    into rows of one query (B, H_kv, H / H_kv, d_head): no key or value is copied.
    Not checked (that would need .item()): position < cache.max_len (GraphedDecodeStep keeps that count);
    cache.length, the host's count, is not advanced either. No gradients: call it under torch.no_grad().
    """
    check_static_decode(mha, x, cache, position)
    B, H, H_kv, d_head = x.shape[0], mha.num_heads, mha.num_kv_heads, mha.d_head
    q = mha.q_proj(x).view(B, H_kv, H // H_kv, d_head)  # (B, H_kv, group, d_head): head h = kv * group + g
    k = mha.k_proj(x).view(B, H_kv, 1, d_head)  # (B, H_kv, 1, d_head): one token, so splitting heads is a view
    v = mha.v_proj(x).view(B, H_kv, 1, d_head)
    # (B, H_kv, max_len, d_head), row `position` written in place; check_static_decode has made write_at's checks
    keys, values = cache._write_at(k, v, position)
    filled = (torch.arange(cache.max_len, device=x.device) <= position).view(1, 1, 1, -1)  # (1, 1, 1, max_len)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=filled)  # (B, H_kv, group, d_head)
    position.add_(1)  # in place: the next replay writes the next row
    return mha.out_proj(out.reshape(B, 1, H * d_head))  # heads merged in order h: (B, 1, d_model)


class GraphedDecodeStep:
    """A graph-safe decode step, captured once and replayed per token, with its position kept on both sides.

    step(x, position) -> out: a step that writes one token into `cache` at row `position` and advances
    position in place (`GraphedDecodeStep.for_module(mha, cache, x)` uses static_decode_step; the plain
    module of course_lib.bench.mha has one too). x: an input of the shape, dtype and device of every call.
    mode: "cuda_graph" (the default on a GPU): warm-up calls on a side stream, then one capture in a
    torch.cuda.CUDAGraph; "traced": one trace by torch.fx's make_fx (tracing_mode="real"), which, like a
    CUDA graph, replays the recorded operations with every Python value baked in (the CPU's stand-in,
    for tests); "eager" (the default elsewhere): the step called each time. Warm-up and tracing run the
    step on x: they write row cache.length (the next call writes it again) and leave the position as it was.
    A call copies x into the static input, runs, and returns the static output: the same tensor at
    every call, overwritten by the next one (clone it to keep it). The host's count is cache.length:
    a call with the cache full is refused before anything runs; setting cache.length (or cache.update)
    moves the position, which the next call copies to the device. In the captured modes, forward hooks
    run at warm-up and capture only, not at replay.
    """

    def __init__(self, step: Step, cache: StaticKVCache, x: torch.Tensor, *,
                 mode: Literal["cuda_graph", "traced", "eager"] | None = None, warmup: int = 3) -> None:
        if not callable(step):
            raise TypeError(f"step must be a function step(x, position) -> out; got {type(step).__name__}")
        if not isinstance(cache, StaticKVCache):
            raise TypeError(f"cache must be a StaticKVCache; got {type(cache).__name__}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor (an input like every call's); got {type(x).__name__}")
        device = cache.key.device
        if x.device != device:
            raise ValueError(f"x is on {x.device} but the cache on {device}")
        mode = ("cuda_graph" if device.type == "cuda" else "eager") if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if mode == "cuda_graph" and device.type != "cuda":
            raise ValueError(f"mode='cuda_graph' needs the cache and x on a CUDA device; they are on {device}")
        warmup = check_nonnegative_int("warmup", warmup)
        start = cache.length
        if start >= cache.max_len:
            raise ValueError(f"cache is full (length {start} of max_len={cache.max_len}): no row to decode into")
        self.cache, self.step, self.mode = cache, step, mode
        self.position = torch.full((1,), start, dtype=torch.int64, device=device)  # (1,): the row the next call writes
        self.static_x = x.detach().clone()  # (B, 1, d_model): every call copies its input here
        self.out: torch.Tensor | None = None  # the static output (a CUDA graph's: set at capture)
        self.graph: torch.cuda.CUDAGraph | None = None  # mode "cuda_graph": the captured step
        self._synced = start  # the cache.length that `position` holds
        with torch.no_grad():
            self._run = self._build(warmup)

    @classmethod
    def for_module(cls, mha: MultiHeadAttention, cache: StaticKVCache, x: torch.Tensor, *,
                   mode: Literal["cuda_graph", "traced", "eager"] | None = None,
                   warmup: int = 3) -> GraphedDecodeStep:
        """static_decode_step(mha, ., cache, .) captured: the arguments are checked now, then at capture."""
        with torch.no_grad():  # as every call runs
            check_static_decode(mha, x, cache, torch.zeros(1, dtype=torch.int64, device=cache.key.device))
        return cls(lambda x_, position: static_decode_step(mha, x_, cache, position), cache, x, mode=mode,
                   warmup=warmup)

    def _build(self, warmup: int) -> Callable[[], torch.Tensor]:
        """The function each call runs on the static buffers; -> the output."""
        start, x, position = self.cache.length, self.static_x, self.position
        if self.mode == "eager":
            return lambda: self.step(x, position)
        if self.mode == "traced":
            traced = make_fx(lambda x_: self.step(x_, position), tracing_mode="real")(x)  # runs the step once
            position.fill_(start)
            return lambda: traced(x)
        side = torch.cuda.Stream(x.device)  # warm up off the default stream, as torch's CUDA graph notes ask
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                position.fill_(start)
                self.step(x, position)
        torch.cuda.current_stream(x.device).wait_stream(side)
        position.fill_(start)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the kernels; nothing runs, so position stays at start
            out = self.step(x, position)
        self.graph, self.out = graph, out

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """One token x (shape, dtype and device of the x given at construction); -> the static output."""
        sx = self.static_x
        if x is not sx:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
            if x.shape != sx.shape or x.dtype != sx.dtype or x.device != sx.device:
                raise ValueError(f"x must be {shape_str(sx.shape)} {sx.dtype} on {sx.device}, as captured; got "
                                 f"{shape_str(x.shape)} {x.dtype} on {x.device}")
        length, max_len = self.cache.length, self.cache.max_len
        if not 0 <= length < max_len:
            raise ValueError(f"cache.length is {length}: a step needs a free row, 0 <= length < max_len={max_len} "
                             f"(allocate a larger StaticKVCache, or set cache.length to rewind)")
        if length != self._synced:  # cache.length was set or cache.update called: the device follows
            self.position.fill_(length)
        if x is not sx:
            sx.copy_(x)
        with torch.no_grad():
            out = self._run()
        if self.out is None:
            self.out = out
        elif out is not self.out:
            self.out.copy_(out)
        self.cache.length = self._synced = length + 1
        return self.out

"""Benchmark: forward + backward of three multi-head self-attention modules with the same weights.

    python -m course_lib.bench mha [--batch 8 --seq 512,1024 --d-model 768 --heads 12]
                                   [--repeats 10 --calls 5 --warmup 2 --device cpu|cuda --json PATH]
    python -m course_lib.bench mha --decode [--batch 1 --cache-len 1024 --cache-kind dynamic,static,graph ...]

- course_lib   `course_lib.MultiHeadAttention`
- torch_mha    `torch.nn.MultiheadAttention(batch_first=True)` called with need_weights=False
- plain_sdpa   the shortest module that does the job: one packed QKV Linear, a view/permute,
               `F.scaled_dot_product_attention`, the output Linear

The modules are timed by `course_lib.bench.timing.compare`: in the same interleaved rounds (the
order rotates each round, so a burst of load from elsewhere hits all of them alike), each round
taking the device time of `calls` back-to-back calls (CUDA events; perf_counter on the CPU) and the
wall time of one call followed by a synchronize. A training step is the forward pass, then backward
with a fixed output gradient (gradients for the input and every parameter). A decoding step is one
new token against a KV cache of --cache-len tokens, with one of three caches (--cache-kind):
dynamic (course_lib's KVCache, appended with torch.cat), static (preallocated, written in place at
a device-side position, attention over all its rows with a mask: course_lib.modern.graphed_decode),
graph (the static step captured in a CUDA graph and replayed; on the CPU, called eagerly).

The table gives per module the median over rounds of the per-call device time, its quartiles, the
median wall time, and the median divided by the faster baseline's (torch_mha, plain_sdpa for
training; plain_sdpa for decoding; below 1.00 is faster), with the range that the quartiles allow.

The record (--json; the vocabulary of course_lib.bench) has one row per comparison: a `run` or
`run_decode` result, i.e. its config (with "step": TRAINING_STEP or DECODE_STEP, and a decoding
row's "cache_kind"), device_info, the largest output difference between the modules, and per
module: median_s (per call, device time of back-to-back calls), q1_s, q3_s, wall_median_s,
repeats (rounds), calls, ratio_to_best_baseline, ratio_range and `device` (the DeviceTiming).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from course_lib._validate import check_nonnegative_int, check_positive_int
from course_lib.bench import write_record
from course_lib.bench.timing import DeviceTiming, compare, ratio_with_spread
from course_lib.kv_cache import KVCache
from course_lib.mha import MultiHeadAttention
from course_lib.modern.graphed_decode import GraphedDecodeStep, static_decode_step
from course_lib.modern.static_cache import StaticKVCache
from course_lib.tools.cli import choice_list, int_list, nonnegative_int, output_file, positive_int, torch_device
from course_lib.tools.device import device_facts

__all__ = ["PlainSDPAttention", "build_modules", "run", "run_decode", "training_steps", "decode_steps", "main",
           "TRAINING_STEP", "DECODE_STEP", "CACHE_KINDS"]

BASELINES = ("torch_mha", "plain_sdpa")
CACHE_KINDS = ("dynamic", "static", "graph")  # run_decode's caches (see the module docstring)
TRAINING_STEP = "forward+backward"  # config["step"] of a run() row
DECODE_STEP = "decode one token (no grad)"  # config["step"] of a run_decode() row


class PlainSDPAttention(nn.Module):
    """Self-attention in a dozen lines: the reference point for what the fused kernel alone costs."""

    def __init__(self, d_model: int, num_heads: int, device=None, dtype=None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, device=device, dtype=dtype)  # packed W_Q, W_K, W_V
        self.out = nn.Linear(d_model, d_model, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, d_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, d_head)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # (B, H, T, d_head)
        return self.out(out.transpose(1, 2).reshape(B, T, D))

    def decode(self, x: torch.Tensor, cache: list[torch.Tensor]) -> torch.Tensor:
        """One new token x (B, 1, D) against cache = [keys, values] (B, H, S, d_head), appended in place."""
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)  # (B, 1, 3, H, d_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, 1, d_head)
        cache[0] = torch.cat([cache[0], k], dim=2)  # (B, H, S + 1, d_head)
        cache[1] = torch.cat([cache[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, cache[0], cache[1])  # the newest token sees every key: no mask
        return self.out(out.transpose(1, 2).reshape(B, T, D))

    def static_decode(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      position: torch.Tensor) -> torch.Tensor:
        """One new token x (B, 1, D) written into preallocated keys/values (B, H, max_len, d_head) at row
        `position` ((1,) int64, advanced in place); attends to rows 0 ... position. Graph-safe: fixed shapes."""
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)  # (B, 1, 3, H, d_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, 1, d_head)
        keys.index_copy_(2, position, k)  # in place, at the row the device holds
        values.index_copy_(2, position, v)
        filled = (torch.arange(keys.shape[2], device=x.device) <= position).view(1, 1, 1, -1)  # (1, 1, 1, max_len)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=filled)  # (B, H, 1, d_head)
        position.add_(1)
        return self.out(out.transpose(1, 2).reshape(B, T, D))


def build_modules(d_model: int, num_heads: int, device, dtype) -> dict[str, nn.Module]:
    """Three modules computing the same function with the same weights."""
    torch_mha = nn.MultiheadAttention(d_model, num_heads, batch_first=True, device=device, dtype=dtype)
    ours = MultiHeadAttention.from_torch(torch_mha)
    plain = PlainSDPAttention(d_model, num_heads, device=device, dtype=dtype)
    with torch.no_grad():
        plain.qkv.weight.copy_(torch_mha.in_proj_weight)
        plain.qkv.bias.copy_(torch_mha.in_proj_bias)
        plain.out.weight.copy_(torch_mha.out_proj.weight)
        plain.out.bias.copy_(torch_mha.out_proj.bias)
    return {"course_lib": ours, "torch_mha": torch_mha, "plain_sdpa": plain}


def _forward(name: str, module: nn.Module, x: torch.Tensor, causal: bool) -> torch.Tensor:
    if name == "torch_mha":
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device) if causal else None
        return module(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)[0]
    return module(x, is_causal=causal)


def _step(name: str, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, causal: bool) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        for p in module.parameters():
            p.grad = None
        _forward(name, module, x, causal).backward(grad_out)

    return step


def run(
    *,
    batch: int = 8,
    seq: int = 512,
    d_model: int = 768,
    heads: int = 12,
    repeats: int = 10,
    warmup: int = 2,
    calls: int = 5,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    causal: bool = False,
    seed: int = 0,
) -> dict:
    """Time one forward+backward step of each module; return config, per-module timings and ratios.

    repeats: rounds of `compare`; calls: back-to-back calls per timed group.
    """
    check_positive_int("repeats", repeats)
    check_positive_int("calls", calls)
    check_nonnegative_int("warmup", warmup)
    device = torch.device(device)
    steps, max_diff = _training_case(batch, seq, d_model, heads, device, dtype, causal, seed)
    timed = compare(steps, device=device, warmup=warmup, rounds=repeats, calls=calls)
    return {
        "config": {"batch": batch, "seq": seq, "d_model": d_model, "heads": heads,
                   "dtype": str(dtype).replace("torch.", ""), "causal": causal,
                   "repeats": repeats, "calls": calls, "warmup": warmup, "step": TRAINING_STEP},
        "device_info": device_facts(device),
        "max_abs_output_difference": max_diff,
        "timings": _timings(timed, BASELINES),
    }


def _training_case(batch: int, seq: int, d_model: int, heads: int, device: torch.device, dtype: torch.dtype,
                   causal: bool, seed: int) -> tuple[dict[str, Callable[[], None]], float]:
    """The three modules' training steps on one input, and the largest difference between their outputs."""
    torch.manual_seed(seed)
    modules = build_modules(d_model, heads, device, dtype)
    x = torch.randn(batch, seq, d_model, device=device, dtype=dtype, requires_grad=True)  # (B, T, d_model)
    grad_out = torch.randn(batch, seq, d_model, device=device, dtype=dtype)
    with torch.no_grad():  # the three must agree before their speed means anything
        outs = {name: _forward(name, m, x, causal) for name, m in modules.items()}
    max_diff = max(float((o - outs["torch_mha"]).abs().max()) for o in outs.values())
    return {name: _step(name, m, x, grad_out, causal) for name, m in modules.items()}, max_diff


def training_steps(*, batch: int, seq: int, d_model: int, heads: int, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, causal: bool = False, seed: int = 0,
                   ) -> dict[str, Callable[[], None]]:
    """What `run` times: each module's forward+backward step, by name (to profile them, say)."""
    for name, value in (("batch", batch), ("seq", seq), ("d_model", d_model), ("heads", heads)):
        check_positive_int(name, value)
    return _training_case(batch, seq, d_model, heads, torch.device(device), dtype, causal, seed)[0]


def _timings(timed: Mapping[str, DeviceTiming], baselines: tuple[str, ...]) -> dict[str, dict]:
    """Per module: the median device time per call and its quartiles, the wall time, ratios to the best baseline."""
    best = min((timed[b] for b in baselines), key=lambda t: t.device_s)
    best_wall = min(timed[b].wall_s for b in baselines)
    timings: dict[str, dict] = {}
    for name, t in timed.items():
        spread = ratio_with_spread(t, best)
        timings[name] = {"median_s": t.device_s, "q1_s": t.device_q1_s, "q3_s": t.device_q3_s,
                         "wall_median_s": t.wall_s, "repeats": t.rounds, "calls": t.calls,
                         "ratio_to_best_baseline": spread["ratio"], "ratio_range": [spread["low"], spread["high"]],
                         "wall_ratio_to_best_baseline": t.wall_s / best_wall, "device": t.to_dict()}
    return timings


def run_decode(
    *,
    batch: int = 1,
    cache_len: int = 1024,
    d_model: int = 768,
    heads: int = 12,
    repeats: int = 50,
    warmup: int = 5,
    calls: int = 10,
    cache_kind: str = "dynamic",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    flush_l2: bool = False,
    seed: int = 0,
) -> dict:
    """Time one decoding step: one new token per sequence against a KV cache of `cache_len` positions.

    cache_kind "dynamic": course_lib `MultiHeadAttention(x, cache=KVCache, is_causal=True)`, as a decoder
    calls it, against `PlainSDPAttention.decode` (torch.cat onto the cache); "static": `static_decode_step`
    against `PlainSDPAttention.static_decode`, each writing into its preallocated cache of max_len rows
    (cache_len + 1 rounded up to a multiple of 16, which the fused GPU kernels' masks want) and attending
    over all of them with a mask; "graph": those two steps in `GraphedDecodeStep`s (a CUDA graph on a
    GPU, called eagerly on the CPU). Before each call the cache is put back to the same `cache_len`
    entries (dynamic: the old tensors; static and graph: the position, in place), so every call does the
    same work. No gradients (inference). repeats: rounds of `compare`; calls: back-to-back calls per group.
    max_abs_output_difference is course_lib against plain_sdpa; max_abs_difference_to_dynamic_cache is
    course_lib's step against MultiHeadAttention with the dynamic cache, the reference.
    """
    check_positive_int("repeats", repeats)
    check_positive_int("calls", calls)
    check_nonnegative_int("warmup", warmup)
    if cache_kind not in CACHE_KINDS:
        raise ValueError(f"cache_kind must be one of {CACHE_KINDS}; got {cache_kind!r}")
    device = torch.device(device)
    with torch.no_grad():
        steps, reference, max_len = _decode_case(cache_kind, batch, cache_len, d_model, heads, device, dtype, seed)
        out = {name: step().clone() for name, step in steps.items()}  # same weights, same cache: same answer
        timed = compare(steps, device=device, warmup=warmup, rounds=repeats, calls=calls, flush_l2=flush_l2)
    return {
        "config": {"batch": batch, "cache_len": cache_len, "d_model": d_model, "heads": heads,
                   "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "calls": calls, "warmup": warmup,
                   "step": DECODE_STEP, "cache_kind": cache_kind,
                   "max_len": cache_len + 1 if cache_kind == "dynamic" else max_len,
                   "cuda_graph": cache_kind == "graph" and device.type == "cuda", "flush_l2": flush_l2},
        "device_info": device_facts(device),
        "max_abs_output_difference": float((out["course_lib"] - out["plain_sdpa"]).abs().max()),
        "max_abs_difference_to_dynamic_cache": float((out["course_lib"] - reference).abs().max()),
        "timings": _timings(timed, ("plain_sdpa",)),
    }


def _decode_case(cache_kind: str, batch: int, cache_len: int, d_model: int, heads: int, device: torch.device,
                 dtype: torch.dtype, seed: int) -> tuple[dict[str, Callable[[], torch.Tensor]], torch.Tensor, int]:
    """Both modules' decoding steps with `cache_kind`'s cache, the reference output (MultiHeadAttention with
    the dynamic cache) and the static caches' max_len."""
    torch.manual_seed(seed)
    modules = build_modules(d_model, heads, device, dtype)
    ours, plain = cast(MultiHeadAttention, modules["course_lib"]), cast(PlainSDPAttention, modules["plain_sdpa"])
    d_head = d_model // heads
    keys, values = (torch.randn(batch, heads, cache_len, d_head, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(batch, 1, d_model, device=device, dtype=dtype)  # (B, 1, d_model): the newest token
    max_len = -(-(cache_len + 1) // 16) * 16
    reference = ours(x, cache=KVCache(key=keys, value=values), is_causal=True)
    return _decode_steps(cache_kind, ours, plain, keys, values, x, max_len), reference, max_len


def decode_steps(*, cache_kind: str, batch: int, cache_len: int, d_model: int, heads: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 ) -> dict[str, Callable[[], torch.Tensor]]:
    """What `run_decode` times: course_lib's and the plain module's decoding step, by name; call them
    under torch.no_grad()."""
    for name, value in (("batch", batch), ("cache_len", cache_len), ("d_model", d_model), ("heads", heads)):
        check_positive_int(name, value)
    if cache_kind not in CACHE_KINDS:
        raise ValueError(f"cache_kind must be one of {CACHE_KINDS}; got {cache_kind!r}")
    with torch.no_grad():
        return _decode_case(cache_kind, batch, cache_len, d_model, heads, torch.device(device), dtype, seed)[0]


def _decode_steps(kind: str, ours: MultiHeadAttention, plain: PlainSDPAttention, keys: torch.Tensor,
                  values: torch.Tensor, x: torch.Tensor, max_len: int) -> dict[str, Callable[[], torch.Tensor]]:
    """course_lib's and plain's decoding step with `kind`'s cache, each put back to cache_len tokens first."""
    B, H, cache_len, d_head = keys.shape
    if kind == "dynamic":
        our_growing, plain_growing = KVCache(), [keys, values]

        def ours_dynamic() -> torch.Tensor:
            our_growing.key, our_growing.value = keys, values
            return ours(x, cache=our_growing, is_causal=True)

        def plain_dynamic() -> torch.Tensor:
            plain_growing[:] = [keys, values]
            return plain.decode(x, plain_growing)

        return {"course_lib": ours_dynamic, "plain_sdpa": plain_dynamic}
    caches = [StaticKVCache(B, H, max_len, d_head, dtype=keys.dtype, device=keys.device) for _ in range(2)]
    for cache in caches:
        cache.update(keys, values)  # (B, H, max_len, d_head), the first cache_len rows filled
    our_cache, plain_cache = caches
    if kind == "static":
        our_position, plain_position = (torch.full((1,), cache_len, device=x.device) for _ in range(2))

        def ours_static() -> torch.Tensor:
            our_position.fill_(cache_len)
            return static_decode_step(ours, x, our_cache, our_position)

        def plain_static() -> torch.Tensor:
            plain_position.fill_(cache_len)
            return plain.static_decode(x, plain_cache.key, plain_cache.value, plain_position)

        return {"course_lib": ours_static, "plain_sdpa": plain_static}
    ours_graphed = GraphedDecodeStep.for_module(ours, our_cache, x)
    plain_graphed = GraphedDecodeStep(lambda x_, p: plain.static_decode(x_, plain_cache.key, plain_cache.value, p),
                                      plain_cache, x)

    def ours_graph() -> torch.Tensor:
        our_cache.length = cache_len  # the next call puts the device position back too
        return ours_graphed(x)

    def plain_graph() -> torch.Tensor:
        plain_cache.length = cache_len
        return plain_graphed(x)

    return {"course_lib": ours_graph, "plain_sdpa": plain_graph}


def format_table(result: dict) -> str:
    c, dev = result["config"], result["device_info"]
    lines = [
        f"MHA forward+backward  B={c['batch']} T={c['seq']} d_model={c['d_model']} H={c['heads']} {c['dtype']}"
        f"{' causal' if c['causal'] else ''}  on {dev['device_name']}  ({c['repeats']} interleaved rounds of "
        f"{c['calls']} calls)",
        f"outputs agree to {result['max_abs_output_difference']:.1e} (max abs difference)",
        f"{'module':<12} {'median ms':>10} {'q1 ms':>9} {'q3 ms':>9} {'wall ms':>9} {'ratio':>7} {'ratio range':>15}",
    ]
    for name, t in result["timings"].items():
        low, high = t["ratio_range"]
        lines.append(f"{name:<12} {t['median_s'] * 1e3:>10.2f} {t['q1_s'] * 1e3:>9.2f} {t['q3_s'] * 1e3:>9.2f} "
                     f"{t['wall_median_s'] * 1e3:>9.2f} {t['ratio_to_best_baseline']:>7.3f} "
                     f"{f'{low:.2f}-{high:.2f}':>15}")
    lines.append("per call: median (and quartiles) over rounds of back-to-back calls; wall = one call + synchronize; "
                 "ratio = median / median of the faster baseline (torch_mha, plain_sdpa), range from the quartiles")
    return "\n".join(lines)


def format_decode(result: dict) -> str:
    c, t = result["config"], result["timings"]
    ours, plain = t["course_lib"], t["plain_sdpa"]
    low, high = ours["ratio_range"]
    graph = " (CUDA graph)" if c["cuda_graph"] else " (no CUDA graph: eager)" if c["cache_kind"] == "graph" else ""
    return (f"decode step  B={c['batch']} cache={c['cache_len']} {c['cache_kind']} cache{graph} d_model={c['d_model']} "
            f"H={c['heads']} {c['dtype']} on {result['device_info']['device_name']} ({c['repeats']} interleaved "
            f"rounds of {c['calls']} calls)\n"
            f"course_lib {ours['median_s'] * 1e6:.1f} us, plain_sdpa {plain['median_s'] * 1e6:.1f} us per call "
            f"(medians; wall {ours['wall_median_s'] * 1e6:.1f} / {plain['wall_median_s'] * 1e6:.1f} us); ratio "
            f"{ours['ratio_to_best_baseline']:.2f} ({low:.2f}-{high:.2f}); outputs agree to "
            f"{result['max_abs_output_difference']:.1e}, with the dynamic cache's to "
            f"{result['max_abs_difference_to_dynamic_cache']:.1e}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m course_lib.bench mha", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq", type=int_list, default=[512], help="comma-separated sequence lengths (training step)")
    p.add_argument("--d-model", type=positive_int, default=768, help="a multiple of --heads")
    p.add_argument("--heads", type=positive_int, default=12)
    p.add_argument("--repeats", type=positive_int, default=10, help="interleaved rounds")
    p.add_argument("--calls", type=positive_int, default=None,
                   help="back-to-back calls per timed group (default 5 for training, 10 for decoding)")
    p.add_argument("--warmup", type=nonnegative_int, default=2)
    p.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--causal", action="store_true", help="causal self-attention instead of unmasked")
    p.add_argument("--decode", action="store_true",
                   help="time one decoding step (one new token, a KV cache of --cache-len) instead of training")
    p.add_argument("--cache-len", type=positive_int, default=1024)
    p.add_argument("--cache-kind", type=choice_list(CACHE_KINDS), default=("dynamic",),
                   help=f"comma-separated decoding caches, one row each: {', '.join(CACHE_KINDS)} (default dynamic)")
    p.add_argument("--json", type=output_file, default=None, help="write the record here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # every flag is checked here (course_lib.tools.cli): a bad one exits with 2
    if args.d_model % args.heads:
        parser.error(f"argument --d-model: expected a multiple of --heads ({args.heads}); got {args.d_model}")
    dtype = getattr(torch, args.dtype)
    rows = []
    if args.decode:
        shape = {"cache_len": args.cache_len, "cache_kinds": list(args.cache_kind)}
        calls = 10 if args.calls is None else args.calls
        for kind in args.cache_kind:
            rows.append(run_decode(batch=args.batch, cache_len=args.cache_len, d_model=args.d_model, heads=args.heads,
                                   repeats=args.repeats, warmup=args.warmup, calls=calls, cache_kind=kind,
                                   device=args.device, dtype=dtype))
            print(format_decode(rows[-1]), flush=True)
    else:
        shape = {"seqs": args.seq}
        calls = 5 if args.calls is None else args.calls
        for seq in args.seq:
            rows.append(run(batch=args.batch, seq=seq, d_model=args.d_model, heads=args.heads, repeats=args.repeats,
                            warmup=args.warmup, calls=calls, device=args.device, dtype=dtype, causal=args.causal))
            print(format_table(rows[-1]), flush=True)
    if args.json is not None:
        config = {"batch": args.batch, **shape, "d_model": args.d_model, "heads": args.heads, "dtype": args.dtype,
                  **({} if args.decode else {"causal": args.causal}), "repeats": args.repeats, "calls": calls,
                  "warmup": args.warmup, "step": DECODE_STEP if args.decode else TRAINING_STEP}
        write_record(args.json, {"suite": "mha", "device_info": device_facts(args.device), "config": config,
                                 "rows": rows})
    return 0

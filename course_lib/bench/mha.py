"""Benchmark: forward + backward of three multi-head self-attention modules with the same weights.

    python -m course_lib.bench mha [--batch 8 --seq 512,1024 --d-model 768 --heads 12]
                                   [--repeats 10 --warmup 2 --device cpu|cuda --json PATH]
    python -m course_lib.bench mha --decode [--batch 1 --cache-len 1024 ...]

- course_lib   `course_lib.MultiHeadAttention`
- torch_mha    `torch.nn.MultiheadAttention(batch_first=True)` called with need_weights=False
- plain_sdpa   the shortest module that does the job: one packed QKV Linear, a view/permute,
               `F.scaled_dot_product_attention`, the output Linear

The three are timed *interleaved* (one step of each, in rotating order, per repeat), so a burst
of load from elsewhere on a shared machine hits all three alike. A step is the forward pass,
then backward with a fixed output gradient (gradients for the input and every parameter).
The table gives median/min/max per step, each median divided by the faster of the two
baselines' medians (torch_mha, plain_sdpa; below 1.00 is faster than both), and the same
ratio of the fastest repeats, which other load on a shared machine disturbs less.

The record (--json; the vocabulary of course_lib.bench) has one row per comparison: a `run` or
`run_decode` result, i.e. its config (with "step": TRAINING_STEP or DECODE_STEP), device_info,
the largest output difference between the modules, and per module its times in seconds
(median_s, min_s, max_s, samples_s) and ratios.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Callable, Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from course_lib._validate import check_nonnegative_int, check_positive_int
from course_lib.bench import write_record
from course_lib.bench.timing import time_fn
from course_lib.mha import MultiHeadAttention
from course_lib.tools.cli import int_list, nonnegative_int, output_file, positive_int, torch_device
from course_lib.tools.device import device_facts

__all__ = ["PlainSDPAttention", "build_modules", "run", "run_decode", "main", "TRAINING_STEP", "DECODE_STEP"]

BASELINES = ("torch_mha", "plain_sdpa")
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
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    causal: bool = False,
    seed: int = 0,
) -> dict:
    """Time one forward+backward step of each module; return config, per-module timings and ratios."""
    check_positive_int("repeats", repeats)
    check_nonnegative_int("warmup", warmup)
    device = torch.device(device)
    torch.manual_seed(seed)
    modules = build_modules(d_model, heads, device, dtype)
    x = torch.randn(batch, seq, d_model, device=device, dtype=dtype, requires_grad=True)  # (B, T, d_model)
    grad_out = torch.randn(batch, seq, d_model, device=device, dtype=dtype)
    with torch.no_grad():  # the three must agree before their speed means anything
        outs = {name: _forward(name, m, x, causal) for name, m in modules.items()}
    max_diff = max(float((o - outs["torch_mha"]).abs().max()) for o in outs.values())
    steps = {name: _step(name, m, x, grad_out, causal) for name, m in modules.items()}
    timings = _interleaved(steps, device=device, warmup=warmup, repeats=repeats, baselines=BASELINES)
    return {
        "config": {"batch": batch, "seq": seq, "d_model": d_model, "heads": heads,
                   "dtype": str(dtype).replace("torch.", ""), "causal": causal,
                   "repeats": repeats, "warmup": warmup, "step": TRAINING_STEP},
        "device_info": device_facts(device),
        "max_abs_output_difference": max_diff,
        "timings": timings,
    }


def _interleaved(steps: Mapping[str, Callable[[], object]], *, device, warmup: int, repeats: int,
                 baselines: tuple[str, ...]) -> dict[str, dict]:
    """Warm each step up, then time one call of each per repeat in rotating order; ratios to the best baseline."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in itertools.islice(itertools.cycle(names), r % len(names), r % len(names) + len(names)):
            samples[name].append(time_fn(steps[name], device=device, warmup=0, repeats=1).median_s)
    timings: dict[str, dict] = {}
    for name, times in samples.items():
        timings[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                         "repeats": len(times), "samples_s": times}
    best_baseline = min(timings[b]["median_s"] for b in baselines)
    best_baseline_min = min(timings[b]["min_s"] for b in baselines)
    for t in timings.values():
        t["ratio_to_best_baseline"] = t["median_s"] / best_baseline
        t["min_ratio_to_best_baseline"] = t["min_s"] / best_baseline_min
    return timings


def run_decode(
    *,
    batch: int = 1,
    cache_len: int = 1024,
    d_model: int = 768,
    heads: int = 12,
    repeats: int = 50,
    warmup: int = 5,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict:
    """Time one decoding step: one new token per sequence against a KV cache of `cache_len` positions.

    course_lib: `MultiHeadAttention(x, cache=KVCache, is_causal=True)`, as a decoder calls it;
    plain_sdpa: `PlainSDPAttention.decode`, the same work with no checks. Both append to their cache
    (a copy of it, as KVCache does); before each timed step the cache is reset to the same
    `cache_len` entries, so every step does the same work. No gradients (inference).
    """
    from course_lib.kv_cache import KVCache

    check_positive_int("repeats", repeats)
    check_nonnegative_int("warmup", warmup)
    device = torch.device(device)
    torch.manual_seed(seed)
    modules = build_modules(d_model, heads, device, dtype)
    ours, plain = modules["course_lib"], cast(PlainSDPAttention, modules["plain_sdpa"])  # for plain.decode
    d_head = d_model // heads
    keys, values = (torch.randn(batch, heads, cache_len, d_head, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(batch, 1, d_model, device=device, dtype=dtype)  # (B, 1, d_model): the newest token
    our_cache, plain_cache = KVCache(), [keys, values]

    def ours_step() -> torch.Tensor:
        our_cache.key, our_cache.value = keys, values
        return ours(x, cache=our_cache, is_causal=True)

    def plain_step() -> torch.Tensor:
        plain_cache[:] = [keys, values]
        return plain.decode(x, plain_cache)

    with torch.no_grad():
        max_diff = float((ours_step() - plain_step()).abs().max())  # same weights, same cache: same answer
        timings = _interleaved({"course_lib": ours_step, "plain_sdpa": plain_step}, device=device, warmup=warmup,
                               repeats=repeats, baselines=("plain_sdpa",))
    return {
        "config": {"batch": batch, "cache_len": cache_len, "d_model": d_model, "heads": heads,
                   "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "warmup": warmup,
                   "step": DECODE_STEP},
        "device_info": device_facts(device),
        "max_abs_output_difference": max_diff,
        "timings": timings,
    }


def format_table(result: dict) -> str:
    c, dev = result["config"], result["device_info"]
    lines = [
        f"MHA forward+backward  B={c['batch']} T={c['seq']} d_model={c['d_model']} H={c['heads']} {c['dtype']}"
        f"{' causal' if c['causal'] else ''}  on {dev['device_name']}  ({c['repeats']} interleaved repeats)",
        f"outputs agree to {result['max_abs_output_difference']:.1e} (max abs difference)",
        f"{'module':<12} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'ratio':>7} {'ratio of mins':>14}",
    ]
    for name, t in result["timings"].items():
        lines.append(f"{name:<12} {t['median_s'] * 1e3:>10.1f} {t['min_s'] * 1e3:>9.1f} {t['max_s'] * 1e3:>9.1f} "
                     f"{t['ratio_to_best_baseline']:>7.3f} {t['min_ratio_to_best_baseline']:>14.3f}")
    lines.append("ratio = median / median of the faster baseline (torch_mha, plain_sdpa); ratio of mins likewise "
                 "with the fastest repeat (less sensitive to other load on a shared machine)")
    return "\n".join(lines)


def format_decode(result: dict) -> str:
    c, t = result["config"], result["timings"]
    return (f"decode step  B={c['batch']} cache={c['cache_len']} d_model={c['d_model']} H={c['heads']} {c['dtype']} "
            f"on {result['device_info']['device_name']} ({c['repeats']} interleaved repeats)\n"
            f"course_lib {t['course_lib']['median_s'] * 1e6:.1f} us, "
            f"plain_sdpa {t['plain_sdpa']['median_s'] * 1e6:.1f} us "
            f"(medians; ratio {t['course_lib']['ratio_to_best_baseline']:.2f}, ratio of mins "
            f"{t['course_lib']['min_ratio_to_best_baseline']:.2f}); outputs agree to "
            f"{result['max_abs_output_difference']:.1e}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m course_lib.bench mha", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq", type=int_list, default=[512], help="comma-separated sequence lengths (training step)")
    p.add_argument("--d-model", type=positive_int, default=768, help="a multiple of --heads")
    p.add_argument("--heads", type=positive_int, default=12)
    p.add_argument("--repeats", type=positive_int, default=10)
    p.add_argument("--warmup", type=nonnegative_int, default=2)
    p.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--causal", action="store_true", help="causal self-attention instead of unmasked")
    p.add_argument("--decode", action="store_true",
                   help="time one decoding step (one new token, a KV cache of --cache-len) instead of training")
    p.add_argument("--cache-len", type=positive_int, default=1024)
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
        shape = {"cache_len": args.cache_len}
        rows.append(run_decode(batch=args.batch, cache_len=args.cache_len, d_model=args.d_model, heads=args.heads,
                               repeats=args.repeats, warmup=args.warmup, device=args.device, dtype=dtype))
        print(format_decode(rows[-1]), flush=True)
    else:
        shape = {"seqs": args.seq}
        for seq in args.seq:
            rows.append(run(batch=args.batch, seq=seq, d_model=args.d_model, heads=args.heads, repeats=args.repeats,
                            warmup=args.warmup, device=args.device, dtype=dtype, causal=args.causal))
            print(format_table(rows[-1]), flush=True)
    if args.json is not None:
        config = {"batch": args.batch, **shape, "d_model": args.d_model, "heads": args.heads, "dtype": args.dtype,
                  **({} if args.decode else {"causal": args.causal}), "repeats": args.repeats, "warmup": args.warmup,
                  "step": DECODE_STEP if args.decode else TRAINING_STEP}
        write_record(args.json, {"suite": "mha", "device_info": device_facts(args.device), "config": config,
                                 "rows": rows})
    return 0

"""The course's Triton FlashAttention kernel vs torch SDPA's backends: forward time and TFLOP/s.

    python -m course_lib.bench flash                           # on a GPU: T = 1k..16k, d_head 64 and 128, fp16
    python -m course_lib.bench flash --seq 4096,8192 --d-head 64 --causal --json flash.json
    python -m course_lib.bench flash --device cpu --seq 32 --d-head 32 --batch 1 --heads 1 --json /tmp/f.json

Each backend (SDPA's flash, cuDNN, memory-efficient and math kernels, and ours) runs the
same forward pass on the same inputs; a backend that refuses the inputs is recorded with its
error, not dropped silently. FLOPs counted: 4 T S d per (batch, head) (two matmuls), halved
when causal. On the CPU our kernel runs in Triton's interpreter: only tiny shapes make sense
and the times say nothing about a GPU. With --json the record (see course_lib.bench) also carries
the versions of torch, triton and the other packages a run imports (`package_versions`).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from course_lib._validate import check_nonnegative_int, check_positive_int
from course_lib.bench import write_record
from course_lib.bench.timing import compare
from course_lib.cost.flops import attention_flops
from course_lib.tools.cli import choice_list, int_list, nonnegative_int, output_file, positive_int, torch_device
from course_lib.tools.device import SDPA_BACKENDS, device_facts, package_versions, sdpa_with_backend

IMPLS = (*(f"sdpa_{name}" for name in SDPA_BACKENDS), "triton")  # the attention suite's names


def _sdpa_runner(name: str, q, k, v, causal: bool):
    return lambda: sdpa_with_backend(name.removeprefix("sdpa_"), q, k, v, is_causal=causal)


def _ours_runner(q, k, v, causal: bool):
    from course_lib.kernels import flash_attention

    return lambda: flash_attention(q, k, v, is_causal=causal)


def bench_one(batch: int, heads: int, T: int, d_head: int, dtype: torch.dtype, causal: bool, device: str,
              repeats: int, warmup: int, impls: tuple[str, ...], calls: int = 5) -> list[dict]:
    """One row per implementation in impls (names from IMPLS): its forward time and error vs a float32 SDPA;
    a backend that refuses these inputs on this device gets a row with its "error" instead.

    The inputs are drawn once, on the device; the implementations that ran are timed together by
    `course_lib.bench.timing.compare` (`repeats` interleaved rounds of `calls` back-to-back calls):
    "median_s" is the median device time per call, "q1_s"/"q3_s" its quartiles, "wall_s" one call's
    wall time with its dispatch.
    """
    for name, value in (("batch", batch), ("heads", heads), ("T", T), ("d_head", d_head), ("repeats", repeats),
                        ("calls", calls)):
        check_positive_int(name, value)
    check_nonnegative_int("warmup", warmup)
    unknown = [name for name in impls if name not in IMPLS]
    if not impls or unknown:
        raise ValueError(f"impls must be one or more of {IMPLS}; got {tuple(impls)!r}")
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = torch.randn(3, batch, heads, T, d_head, device=device, generator=gen).to(dtype).unbind(0)
    flops = attention_flops(batch, heads, T, T, d_head, causal=causal)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    rows, runners = {}, {}
    for name in impls:
        row = {"impl": name, "B": batch, "H": heads, "T": T, "S": T, "d_head": d_head,
               "dtype": str(dtype).removeprefix("torch."), "causal": causal}
        rows[name] = row
        try:
            run = _ours_runner(q, k, v, causal) if name == "triton" else _sdpa_runner(name, q, k, v, causal)
            with torch.no_grad():
                row["max_abs_err_vs_fp32_sdpa"] = float((run().float() - reference).abs().max())
        except Exception as e:  # a backend that does not support these inputs on this device
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        runners[name] = run
    if runners:
        with torch.no_grad():
            timings = compare(runners, device=device, warmup=warmup, rounds=repeats, calls=calls)
        for name, t in timings.items():
            rows[name] |= {"median_s": t.device_s, "q1_s": t.device_q1_s, "q3_s": t.device_q3_s, "wall_s": t.wall_s,
                           "repeats": t.rounds, "calls": t.calls, "timing_method": t.method,
                           "tflops": flops / t.device_s / 1e12}
    return list(rows.values())


def summarize(rows: list[dict]) -> list[dict]:
    """Per configuration: our TFLOP/s over the fastest SDPA backend's (only where both were measured)."""
    out = []
    keys = sorted({(r["T"], r["d_head"], r["dtype"], r["causal"]) for r in rows})
    for key in keys:
        group = [r for r in rows if (r["T"], r["d_head"], r["dtype"], r["causal"]) == key and "tflops" in r]
        ours = [r for r in group if r["impl"] == "triton"]
        sdpa = [r for r in group if r["impl"] != "triton"]
        if ours and sdpa:
            best = max(sdpa, key=lambda r: r["tflops"])
            out.append({"T": key[0], "d_head": key[1], "dtype": key[2], "causal": key[3],
                        "ours_tflops": ours[0]["tflops"], "best_sdpa": best["impl"],
                        "best_sdpa_tflops": best["tflops"], "ratio": ours[0]["tflops"] / best["tflops"]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.bench flash", description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq", type=int_list, help="comma-separated sequence lengths "
                                                      "(default: 1024,...,16384 on a GPU, 16,32 on the CPU)")
    parser.add_argument("--d-head", type=int_list, help="comma-separated head dims (default: 64,128 on a GPU, "
                                                         "32 on the CPU)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch", type=positive_int, help="default: 4 on a GPU, 1 on the CPU")
    parser.add_argument("--heads", type=positive_int, help="default: 16 on a GPU, 2 on the CPU")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--warmup", type=nonnegative_int, default=5)
    parser.add_argument("--impls", type=choice_list(IMPLS), default=",".join(IMPLS),
                        help="comma-separated: " + ", ".join(IMPLS))
    parser.add_argument("--json", type=output_file, default=None, help="write the record here")
    args = parser.parse_args(argv)  # every flag is checked here (course_lib.tools.cli): a bad one exits with 2
    on_gpu = args.device.startswith("cuda")
    if not on_gpu:
        print("CPU: our kernel runs in Triton's interpreter; tiny shapes only, and the times say nothing about a GPU")
    if args.seq is None:
        args.seq = [1024, 2048, 4096, 8192, 16384] if on_gpu else [16, 32]
    if args.d_head is None:
        args.d_head = [64, 128] if on_gpu else [32]
    if args.batch is None:
        args.batch = 4 if on_gpu else 1
    if args.heads is None:
        args.heads = 16 if on_gpu else 2
    dtype = getattr(torch, args.dtype)
    info = device_facts(args.device)
    rows = []
    for d_head in args.d_head:
        for T in args.seq:
            for row in bench_one(args.batch, args.heads, T, d_head, dtype, args.causal, args.device,
                                 args.repeats, args.warmup, args.impls):
                rows.append(row)
                what = (f"{row['tflops']:8.2f} TFLOP/s {row['median_s'] * 1e3:9.3f} ms" if "tflops" in row
                        else row["error"])
                print(f"d_head={d_head:4d} T={T:6d} {row['impl']:20s} {what}")
    record = {"suite": "flash", "device_info": info, "versions": package_versions(),
              "config": {"dtype": args.dtype, "seqs": args.seq, "d_heads": args.d_head, "batch": args.batch,
                         "heads": args.heads, "causal": args.causal, "impls": list(args.impls),
                         "flops_per_call": "4*B*H*T*S*d_head (halved if causal)", "repeats": args.repeats,
                         "warmup": args.warmup},
              "rows": rows, "summary": summarize(rows)}
    if args.json is not None:
        write_record(args.json, record)
    return 0

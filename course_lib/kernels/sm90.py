"""What course_lib's Triton kernels compile to on Hopper (sm_90), read without a GPU.

Triton compiles ahead of time for a GPU that is not there, with the ptxas it ships, and its
cuobjdump reads the machine code back. So on any Linux x86-64 machine with Triton one can see what
the interpreter cannot: how many registers a thread needs and whether some spilled to local memory
(the stack frame), the shared memory a block takes, how many warps run (warp specialization adds a
producer warpgroup), whether tiles arrive by the Tensor Memory Accelerator (`cp.async.bulk.tensor`)
or by per-thread asynchronous copies (`cp.async.cg`), and whether the products are Hopper's wgmma.

    python -m course_lib.kernels.sm90 data/benchmarks/hopper_compile_sm90_triton3.6.0.json

writes the record that notebook 10 reads (it refuses to replace an existing file unless --force).
Must run with TRITON_INTERPRET unset: the interpreter cannot compile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

from course_lib.kernels import _flash_triton as fk

__all__ = ["compile_case", "resources", "showcase_cases", "record", "main"]

HOPPER = GPUTarget("cuda", 90, 32)
KERNELS = {"fwd": fk._attn_fwd, "fwd_ws": fk._attn_fwd_ws, "dkdv": fk._attn_bwd_dkdv, "dq": fk._attn_bwd_dq}
POINTERS = {"fwd": ("Q", "K", "V", "O"), "fwd_ws": ("Q", "K", "V", "O"), "dkdv": ("Q", "K", "V", "DO", "DK", "DV"),
            "dq": ("Q", "K", "V", "DO", "DQ")}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+)")
TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
HEAD_OFFSET = re.compile(r"tt\.addptr %(?:Q|K|V|O|DO|DK|DV|DQ), %\S+ : !tt\.ptr<\w+>, (i\d+)")


def resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack frame bytes) of the one kernel in a cubin, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        report = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    finally:
        os.unlink(f.name)
    found = RESOURCES.search(report)
    if found is None:
        raise RuntimeError(f"cuobjdump reported no registers and stack frame:\n{report[-2000:]}")
    return int(found[1]), int(found[2])


def compile_case(kind: str, dtype: str, d_head: int, causal: bool, precision: str, config: list[int],
                 warp_specialize: bool = True, mask_keys: bool = False) -> dict:
    """Compile one kernel for sm_90: `kind` "fwd", "fwd_ws", "dkdv" or "dq", `config` (BLOCK_M, BLOCK_N,
    num_warps, num_stages). Returns what the compiled code shows (see the module docstring)."""
    fn = KERNELS[kind]
    block_d = fk.block_d_for(d_head)
    block_m, block_n, warps, stages = config
    if kind == "fwd_ws":
        constants: dict[str, bool | int | str] = {
            "IS_CAUSAL": causal, "MASK_KEYS": mask_keys, "WARP_SPECIALIZE": warp_specialize,
                     "BLOCK_D": block_d, "BLOCK_M": block_m, "BLOCK_N": block_n}
    else:
        constants = {"IS_CAUSAL": causal, "DOT_PRECISION": precision, "BLOCK_D": block_d,
                     "EVEN_D": block_d == d_head, "BLOCK_M": block_m, "BLOCK_N": block_n}
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in POINTERS[kind]:
            signature[name] = "*" + TRITON_DTYPES[dtype]
        elif name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
        elif name in ("T", "S", "D", "LEN_BUCKET"):
            signature[name] = "i32"
        else:
            signature[name] = "fp32"
    aligned = [n for n in fn.arg_names if signature[n].startswith("*")]
    aligned += ["D"] if d_head % 16 == 0 and "D" in fn.arg_names else []
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    kernel = triton.compile(source, target=HOPPER, options={"num_warps": warps, "num_stages": stages})
    ttir, ptx = kernel.asm["ttir"], kernel.asm["ptx"]
    registers, stack = resources(kernel.asm["cubin"])
    return {"kind": kind, "dtype": dtype, "d_head": d_head, "causal": causal, "precision": precision,
            "config": config, "shared": kernel.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
            "tf32_dots": ttir.count("inputPrecision = tf32"),
            "tf32_mma": len(re.findall(r"mma\S*\.tf32", ptx)), "head_offsets": HEAD_OFFSET.findall(ttir),
            "registers": registers, "stack_bytes": stack, "warps": kernel.metadata.num_warps,
            "tma_copies": ptx.count("cp.async.bulk.tensor"), "thread_copies": len(re.findall(r"cp\.async\.c[ag]", ptx)),
            "setmaxnreg": ptx.count("setmaxnreg"), "triton": triton.__version__}



def showcase_cases() -> list[dict]:
    """The configs notebook 10 compares, bfloat16, d_head 128: the portable forward, the Hopper forward
    (each candidate, and once at num_warps=8, where Triton does not specialize), and the backward kernels
    with the dK/dV config that spilled before and the ones chosen now."""
    def case(kind, causal, config, **extra):
        return {"kind": kind, "dtype": "bfloat16", "d_head": 128, "causal": causal, "precision": "ieee",
                "config": list(config), **extra}

    cases = [case("fwd", causal, fk.candidate_configs("fwd", 128, 2, causal)[0]) for causal in (False, True)]
    cases += [case("fwd_ws", causal, config) for causal in (False, True)
              for config in fk.candidate_configs("fwd_ws", 128, 2, causal)]
    cases.append(case("fwd_ws", True, (128, 128, 8, 2)))  # num_warps=8: the flag is silently dropped
    cases += [case("dkdv", True, config) for config in ((32, 128, 4, 3), *fk.candidate_configs("dkdv", 128, 2, True))]
    cases += [case("dq", True, config) for config in fk.candidate_configs("dq", 128, 2, True)]
    return cases


def record(cases: list[dict] | None = None) -> dict:
    """Compile each case for sm_90 and return the record: versions, target, one row per case."""
    rows = []
    for case in cases or showcase_cases():
        row = compile_case(**case)
        row.pop("head_offsets")
        rows.append(row | {"mask_keys": case.get("mask_keys", False)})
    return {"what": "course_lib's Triton kernels compiled for sm_90 (Hopper) on a machine without a GPU",
            "target": "cuda sm_90, 32 threads per warp", "triton": triton.__version__,
            "device_info": {"device_name": "no GPU: compiled ahead of time for sm_90", "device_type": "cpu",
                            "machine": platform.machine(), "python": platform.python_version(),
                            "torch": torch.__version__, "triton": triton.__version__},
            "command": "python -m course_lib.kernels.sm90", "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the JSON file to write")
    parser.add_argument("--force", action="store_true", help="replace the file if it exists")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: the interpreter cannot compile; unset it")
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists: pass --force to replace it")
    data = record()
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}: {len(data['rows'])} kernels compiled with Triton {data['triton']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

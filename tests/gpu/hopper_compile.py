"""Compile course_lib's Triton kernels for Hopper (sm_90) without a GPU; used by test_kernels_hopper.py.

Reads a JSON list of cases on stdin ({kind, dtype, d_head, causal, precision, config}), writes a
JSON list of results: shared memory bytes, wgmma instructions, TF32 dots, the integer width of
the per-head pointer offsets, and from the compiled machine code (cuobjdump, shipped with Triton)
the registers per thread and the stack frame (bytes of registers spilled to local memory), the
warps that run (warp specialization adds a producer warpgroup), TMA copies (`cp.async.bulk.tensor`),
per-thread asynchronous copies (`cp.async.cg`/`.ca`) and register reallocations (`setmaxnreg`).
Must run with TRITON_INTERPRET unset (the interpreter cannot compile).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget

from course_lib.kernels import _flash_triton as fk

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
    registers, stack = RESOURCES.search(report).groups()
    return int(registers), int(stack)


def compile_case(kind: str, dtype: str, d_head: int, causal: bool, precision: str, config: list[int],
                 warp_specialize: bool = True, mask_keys: bool = False) -> dict:
    fn = KERNELS[kind]
    block_d = fk.block_d_for(d_head)
    block_m, block_n, warps, stages = config
    if kind == "fwd_ws":
        constants = {"IS_CAUSAL": causal, "MASK_KEYS": mask_keys, "WARP_SPECIALIZE": warp_specialize,
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


if __name__ == "__main__":
    results = []
    for case in json.load(sys.stdin):
        start = time.perf_counter()
        results.append(compile_case(**case) | {"compile_s": round(time.perf_counter() - start, 2)})
    json.dump(results, sys.stdout)

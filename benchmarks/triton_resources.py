"""Registers and spills of the Triton pair-pass kernel, compiled for a GPU without one.

    python benchmarks/triton_resources.py [--arch 90] [--warps 4 8] [--block-k 1 4]

Compiles ``confusion_kernels/triton/pair_sums.py::_pair_kernel`` ahead of time for
the given compute capability (Triton ships ptxas and cuobjdump, so no GPU and no
CUDA toolkit are needed) in each mode (row sums / with gradient, off-diagonal /
diagonal) and metric, and prints what the cubin uses per thread: registers, stack
(spilled registers; anything above 0 means local-memory traffic in the inner
loops) and the compile time. The shipped configuration is
``pair_sums._config()``; the other rows are candidates.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def compile_pair_kernel(metric: int, grad: bool, diagonal: bool, acc: str, cfg: dict, arch: int):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from confusion_kernels.triton import pair_sums

    fn = pair_sums._pair_kernel
    names = fn.arg_names
    dtype = {"fp32": torch.float32, "fp64": torch.float64}[acc]
    ints = {"N", "D", "ROUND", "T", "T_EVEN"}
    pointer = {"ONE_CLASS": "*i32", "LAB": "*i64"}
    signature, constants = {}, {}
    values = dict(METRIC=metric, GRAD=grad, DIAGONAL=diagonal,
                  ACC=pair_sums._tl_dtype(dtype), USE_DOT=acc != "fp64",
                  DOT_PRECISION="tf32" if acc == "fp32" else "ieee",
                  GRAD_PRECISION="tf32" if acc == "fp32" else "ieee", BLOCK=cfg["BLOCK"],
                  BLOCK_D=pair_sums._block_d(cfg, dtype), BLOCK_K=cfg["BLOCK_K"])
    for i, name in enumerate(names):
        if name in values:
            signature[name] = "constexpr"
            constants[(i,)] = values[name]
        elif name in ints:
            signature[name] = "i32"
        else:
            signature[name] = pointer.get(name, f"*{acc}")
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constants),
                            target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=cfg["num_warps"]))
    return kernel, time.perf_counter() - start


def resources(kernel) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pair_kernel_{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    os.remove(path)
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"{match.group(1):>4} {match.group(2):>6}" if match else "   ?      ?"


def main() -> None:
    from confusion_kernels import _metrics
    from confusion_kernels.triton import pair_sums

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--warps", type=int, nargs="+", default=None)
    p.add_argument("--block-k", type=int, nargs="+", default=None)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "fp64"], choices=["fp32", "fp64"])
    args = p.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    shipped = pair_sums._config()
    configs = [dict(shipped)]
    for warps in args.warps or []:
        for block_k in args.block_k or [shipped["BLOCK_K"]]:
            cand = dict(shipped, num_warps=warps, BLOCK_K=block_k)
            if cand not in configs:
                configs.append(cand)
    print(f"sm_{args.arch}; shipped config: {shipped}")
    print("warps BLOCK_K dtype metric       mode      block pair   regs  stack  compile s")
    for cfg in configs:
        for acc in args.dtypes:
            for metric in ("euclidean", "cosine"):
                for grad in (False, True):
                    for diagonal in (False, True):
                        kernel, seconds = compile_pair_kernel(
                            getattr(_metrics, metric.upper()), grad, diagonal, acc, cfg, args.arch)
                        print(f"{cfg['num_warps']:5d} {cfg['BLOCK_K']:7d} {acc:5s} {metric:12s} "
                              f"{'gradient' if grad else 'row sums':9s} "
                              f"{'diagonal' if diagonal else 'off-diag':12s} {resources(kernel)} "
                              f"{seconds:9.1f}", flush=True)


if __name__ == "__main__":
    main()

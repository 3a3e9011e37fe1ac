"""Roofline of the intra_inter_sums benchmark: ceilings measured once on the
device in use, and the floor time of each case.

Ceilings (measured, not datasheet numbers):
  * fp32_tflops: torch.mm of two 8192 x 8192 fp32 matrices with tf32 off
    (the FP32 FMA rate on CUDA cores; 2 flops per FMA);
  * tf32_tflops / fp16_tflops / bf16_tflops: the same product on tensor cores
    (CUDA only; used when the input dtype or allow_tf32 puts our kernels there);
  * bandwidth_gbs: a device-to-device copy of 1 GiB (read + write bytes / time).

Floor of a case = max(flops / rate, bytes / bandwidth), with this operation
model (N rows, D dimensions, P = N^2 ordered pairs):
  Gram metrics (euclidean, sqeuclidean, cosine): forward 2PD (the dot
    products) + 4P (finish the distance, label test, accumulate); backward
    4PD (the dot products again, and the weighted sum of rows) + 8P;
  difference metrics (manhattan, smooth_l1): forward 3PD + 2P, backward
    3PD (recompute) + 3PD (the gradient terms) + 4P;
  full = forward + backward. Bytes: x, labels and the outputs once per pass
  (O(N D)); every kernel here is compute-bound at these sizes, and the bytes
  matter only for tiny N.
The achieved fraction is floor / measured median time.
"""

from __future__ import annotations

import functools
import time

import torch

GRAM_METRICS = {"euclidean", "sqeuclidean", "cosine"}


def _time_ms(fn, device: str, reps: int = 10) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def measure_ceilings(device: str, size: int = 8192, copy_bytes: int = 2**30) -> dict:
    """The device's measured matrix-product rates (TFLOP/s) and copy bandwidth (GB/s)."""
    if device != "cuda":
        size, copy_bytes = min(size, 2048), min(copy_bytes, 2**28)
    out = {}
    flops = 2.0 * size ** 3
    dtypes = {"fp32": torch.float32}
    if device == "cuda":
        dtypes.update(tf32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype in dtypes.items():
            torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype)
            ms = _time_ms(functools.partial(torch.mm, a, b), device)
            out[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    src = torch.empty(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(functools.partial(dst.copy_, src), device)
    out["bandwidth_gbs"] = 2.0 * copy_bytes / (ms * 1e-3) / 1e9
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def case_work(metric: str, mode: str, n: int, d: int, itemsize: int = 4) -> tuple[float, float]:
    """(flops, bytes) of one case under the model in this module's docstring."""
    p = float(n) * n
    if metric in GRAM_METRICS:
        fwd, bwd = 2 * p * d + 4 * p, 4 * p * d + 8 * p
    else:
        fwd, bwd = 3 * p * d + 2 * p, 6 * p * d + 4 * p
    flops = {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]
    io = n * d * itemsize + 8 * n + 2 * 4 * n  # x, labels, two row sums (or their grads)
    passes = {"fwd": 1, "bwd": 2, "full": 3}[mode]  # bwd also writes dL/dx
    return flops, float(io * passes)


def rate_key(dtype: torch.dtype, allow_tf32: bool) -> str:
    """Which measured ceiling bounds our kernels for this input dtype."""
    if dtype == torch.float16:
        return "fp16_tflops"
    if dtype == torch.bfloat16:
        return "bf16_tflops"
    return "tf32_tflops" if allow_tf32 else "fp32_tflops"


def floor_ms(ceilings: dict, metric: str, mode: str, n: int, d: int, dtype: torch.dtype,
             allow_tf32: bool) -> float | None:
    """The case's roofline floor in ms, or None without ceilings."""
    if not ceilings:
        return None
    flops, nbytes = case_work(metric, mode, n, d, torch.finfo(dtype).bits // 8)
    key = rate_key(dtype, allow_tf32) if metric in GRAM_METRICS else "fp32_tflops"
    rate = ceilings.get(key) or ceilings.get("fp32_tflops")
    compute = flops / (rate * 1e12)
    memory = nbytes / (ceilings["bandwidth_gbs"] * 1e9)
    return max(compute, memory) * 1e3

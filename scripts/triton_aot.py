"""Compile every Triton launch variant ahead of time for sm_80 / sm_90, without a GPU.

    python scripts/triton_aot.py [--arch 80 90] [--jobs 2] [--out DIR] [--only SUBSTRING] [--list]

The Triton interpreter that runs our Triton tests on the CPU never generates GPU
code, so a kernel that does not compile, compiles for minutes, spills registers or
needs more shared memory than an SM has would first show up on a GPU. This script
finds those here:

1. **Capture.** Triton's driver is replaced by a stand-in that names a GPU target
   (``GPUTarget("cuda", arch, 32)``) and launches nothing. The real launchers of
   ``confusion_kernels/triton/`` are then called on small CPU tensors over the
   matrix in ``launch_cases()`` (every metric, dtype, precision mode, constexpr
   flag, block configuration, diagonal / off-diagonal, square / rectangular), and
   each ``kernel[grid](...)`` they issue is recorded: so the variants are exactly
   those the launchers produce, with the block sizes and warps they choose.
2. **Compile.** Each distinct variant is compiled by Triton's own JIT path
   (``JITFunction.run(..., warmup=True)``: the same argument specialisation as on
   a GPU, pointers 16-byte aligned) in worker processes with an empty cache, once
   per architecture, and timed.
3. **Resources.** ``cuobjdump -res-usage`` (shipped with Triton) gives registers
   and stack (spilled registers) of the cubin; Triton's metadata the shared memory;
   from these and the SM limits, the resident blocks per SM.

It fails (exit 1) when a variant does not compile, takes longer than
``--max-seconds``, spills, needs more shared memory than a block may have, or
fits fewer blocks per SM than its module's ``RESOURCE_BUDGET`` states (every kernel
needs an entry), or holds an fp32 constant in a float64 kernel. It writes
``triton_aot.csv`` and ``triton_aot.md`` (one row per variant and architecture)
into ``--out``; docs/benchmarks.md summarises a committed run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from _audit import commit, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("TRITON_INTERPRET", None)  # the launchers must choose their GPU configurations

# Per-SM limits (CUDA C Programming Guide, "Compute capabilities"): registers,
# shared memory per SM and per block (opt-in maximum), threads, resident blocks.
SM_LIMITS = {
    80: dict(regs=65536, smem_sm=167936, smem_block=166912, threads=2048, blocks=32),
    90: dict(regs=65536, smem_sm=233472, smem_block=232448, threads=2048, blocks=32),
}
# Variants allowed to spill: each names the Triton versions and the architectures it applies
# to, the kernel, a regular expression on the variant, and why it stays (with the figures
# measured). An entry that no spilling variant matches any more fails the run (when its
# architecture was compiled), so the list shrinks as the kernels improve and never hides a
# new spill.
KNOWN_SPILLS: list[dict] = [
    dict(triton_below=(3, 5), kernel=kernel, variant=r"^float64 .*USE_DOT=False .*MP=64 ",
         archs=archs,
         why="fp64 without tl.dot (Triton < 3.5): the 64 prototype slots of m = 33..64 times "
             "the broadcast product's BLOCK_K x BLOCK_DO spill 16-40 B per thread "
             "with every tile size tried (a correctness path for gradchecks; Triton >= 3.5 "
             "runs fp64 on tl.dot without spills)")
    # (Triton 3.2: _backward_f spills on sm_90 only, _backward_w on sm_80 only)
    for kernel, archs in (("affinity._backward_f_kernel", (90,)),
                          ("affinity._backward_w_kernel", (80,)))
]
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED = 1024  # shared memory the driver reserves per block (sm_80 and later)


# ---------------------------------------------------------------------------
# The stand-in driver and the capture of launches
# ---------------------------------------------------------------------------
class StandInDriver:
    """Enough of Triton's driver interface for its JIT to specialise and compile for
    ``arch``; one device id per architecture keeps their kernel caches apart."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    case: str

    @property
    def name(self) -> str:
        """module.kernel, e.g. pair_pass._pair_kernel."""
        return f"{self.kernel.fn.__module__.rsplit('.', 1)[-1]}.{self.kernel.fn.__name__}"

    def key(self) -> str:
        """What makes a compiled variant distinct (a superset of Triton's own key)."""
        import torch

        parts = [self.name]
        params = self.kernel.params
        for param, value in zip(params, self.args):
            parts.append(f"{param.name}={_describe(value, param, torch)}")
        for k in sorted(self.kwargs):
            parts.append(f"{k}={self.kwargs[k]!r}")
        return ";".join(parts)

    def constexprs(self) -> dict:
        names = {p.name for p in self.kernel.params if p.is_constexpr}
        return {k: v for k, v in self.kwargs.items() if k in names}


def _describe(value, param, torch) -> str:
    if isinstance(value, torch.Tensor):
        return f"*{str(value.dtype).replace('torch.', '')}"
    if isinstance(value, bool):
        return f"i1:{value}"
    if isinstance(value, int):
        width = "i32" if -2**31 <= value < 2**31 else "i64"
        if param.do_not_specialize:
            return width
        return f"{width}:{'one' if value == 1 else 'div16' if value % 16 == 0 else 'any'}"
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return "none"
    return repr(value)


@contextlib.contextmanager
def capture(arch: int, compile_kernels: bool):
    """Within: Triton launches are recorded in the yielded list (and compiled for
    ``arch`` when ``compile_kernels``), never run."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    original = JITFunction.run
    state = {"case": ""}

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), grid, state["case"]))
        if compile_kernels:
            return original(self, *args, grid=grid, warmup=True, **kwargs)
        return None

    saved = dict(vars(driver))  # reset_active() would create the real driver, which needs a GPU
    driver.set_active(StandInDriver(arch))
    JITFunction.run = run
    try:
        yield launches, state
    finally:
        JITFunction.run = original
        vars(driver).update(saved)


# ---------------------------------------------------------------------------
# The launch matrix: every variant the launchers can produce
# ---------------------------------------------------------------------------
def launch_cases() -> dict:
    """name -> callable that calls one launcher on small CPU tensors."""
    import torch

    from confusion_kernels import _metrics
    from confusion_kernels.triton import (affinity, class_stats, n_centroids, nearest_neighbors,
                                          pair_losses, pair_pass)
    from confusion_kernels.triton import intra_inter_sums as direct

    float_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                    "fp64": torch.float64}
    cases = {}

    def tf32_modes(dtype):  # allow_tf32 on / off (16-bit pair-pass gradients follow it too)
        return (False,) if dtype == torch.float64 else (True, False)

    def with_tf32(tf32, fn):
        def call():
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                fn()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
        return call

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    # The Gram pair pass (euclidean, sqeuclidean, cosine): both modes, diagonal and
    # off-diagonal rounds (N spans several blocks).
    n, d = 200, 64
    for dname, dtype in float_dtypes.items():
        for tf32 in tf32_modes(dtype):
            for metric in ("euclidean", "sqeuclidean", "cosine"):
                code = _metrics.METRIC_CODES[metric]
                x = torch.randn(n, d, generator=gen(0)).to(dtype)
                lab = torch.randint(0, 5, (n,), generator=gen(1))
                w = torch.rand(n, generator=gen(2), dtype=torch.float64).to(
                    dtype if dtype == torch.float64 else torch.float32)
                tag = f"{dname}{'-tf32' if tf32 else ''}-{metric}"
                cases[f"pair_pass.row_sums/{tag}"] = with_tf32(
                    tf32, lambda x=x, lab=lab, code=code: pair_pass.row_sums(x, lab, code))
                cases[f"pair_pass.weighted_with_grad/{tag}"] = with_tf32(
                    tf32, lambda x=x, lab=lab, w=w, code=code:
                    pair_pass.weighted_with_grad(x, lab, w, w, code))

    # The direct (difference-form) passes: square op (manhattan, smooth_l1) and the
    # rectangular op (every metric), with and without a left-out pair.
    for dname in ("fp32", "fp64"):  # fp16 / bf16 are widened to fp32 before the kernels
        dtype = float_dtypes[dname]
        for metric, code in _metrics.METRIC_CODES.items():
            x = torch.randn(50, 24, generator=gen(3), dtype=dtype)
            ref = torch.cat([torch.randn(30, 24, generator=gen(4), dtype=dtype), x])
            lab = torch.randint(0, 4, (50,), generator=gen(5))
            ref_lab = torch.cat([torch.randint(0, 4, (30,), generator=gen(6)), lab])
            g = torch.rand(50, generator=gen(7), dtype=dtype)
            for offset in (None, 30):
                tag = f"{dname}-{metric}-{'self' if offset is not None else 'noself'}"
                cases[f"intra_inter_sums.rect_forward/{tag}"] = (
                    lambda x=x, lab=lab, ref=ref, rl=ref_lab, o=offset, c=code:
                    direct.rect_forward(x, lab, ref, rl, o, c))
                cases[f"intra_inter_sums.rect_backward/{tag}"] = (
                    lambda x=x, lab=lab, ref=ref, rl=ref_lab, o=offset, c=code, g=g:
                    direct.rect_backward(g, g, x, lab, ref, rl, o, c))

    # Affinity: every prototype count's tile shape (MP = next power of two >= m, up to the
    # op's limit of 64, TRITON_MAX_CENTERS), both similarities, every operand dtype (16-bit f with 16-bit or
    # fp32 prototypes), tf32 on / off.
    mps = [2 ** k for k in range(7)]
    affinity_dtypes = [("fp32", torch.float32, torch.float32), ("fp16", torch.float16, torch.float16),
                       ("bf16", torch.bfloat16, torch.bfloat16),
                       ("fp16-fp32proto", torch.float16, torch.float32),
                       ("fp64", torch.float64, torch.float64)]
    for dname, fdtype, wdtype in affinity_dtypes:
        for tf32 in tf32_modes(fdtype):
            for m in mps:
                for kind in (0, 1):
                    c = 3
                    f = torch.randn(40, 32, generator=gen(8)).to(fdtype)
                    w = torch.randn(c, m, 32, generator=gen(9)).to(wdtype)
                    lab = torch.randint(0, c, (40,), generator=gen(10))
                    g = torch.rand(40, generator=gen(11)).to(torch.float64 if fdtype == torch.float64
                                                            else torch.float32)
                    tag = f"{dname}{'-tf32' if tf32 else ''}-m{m}-kind{kind}"

                    def fwd_bwd(f=f, w=w, lab=lab, g=g, kind=kind):
                        rows, d_true, active = affinity.forward(f, w, lab, 1.0, 0.5, kind)
                        affinity.backward(g, f, w, lab, d_true, active, 1.0, 0.5, kind)
                    cases[f"affinity/{tag}"] = with_tf32(tf32, fwd_bwd)

    # N-Centroids: every metric and dtype, forward and backward.
    for dname, dtype in float_dtypes.items():
        for tf32 in tf32_modes(dtype):
            for metric in n_centroids.METRIC_CODES:
                x = torch.nn.functional.normalize(torch.randn(40, 32, generator=gen(12)), dim=1)
                cen = torch.nn.functional.normalize(torch.randn(7, 32, generator=gen(13)), dim=1)
                x, cen = x.to(dtype), cen.to(dtype)
                lab = torch.randint(0, 7, (40,), generator=gen(14))
                wt = torch.rand(40, generator=gen(15)).to(dtype)
                tag = f"{dname}{'-tf32' if tf32 else ''}-{metric}"

                def ncl(x=x, cen=cen, lab=lab, wt=wt, metric=metric):
                    n_centroids.negatives_forward(x, cen, lab, metric)
                    n_centroids.negatives_backward(x, cen, lab, wt, metric)
                cases[f"n_centroids/{tag}"] = with_tf32(tf32, ncl)

    # The integer values the GPU specialises (an argument equal to 1 becomes a constant, one
    # divisible by 16 an alignment hint): one row, one dimension, sizes of 16 (fp32; the
    # interpreter runs the same shapes in tests/test_triton_specialisation.py).
    for n1, d1 in ((1, 16), (16, 1)):
        x = torch.randn(n1, d1, generator=gen(20))
        lab = torch.randint(0, 3, (n1,), generator=gen(21))
        w = torch.rand(n1, generator=gen(22))
        ref = torch.randn(16, d1, generator=gen(23))
        ref_lab = torch.randint(0, 3, (16,), generator=gen(24))
        tag = f"n{n1}-d{d1}"
        for metric in ("euclidean", "cosine"):
            code = _metrics.METRIC_CODES[metric]
            cases[f"specialised/pair_pass/{tag}-{metric}"] = (
                lambda x=x, lab=lab, w=w, code=code: (pair_pass.row_sums(x, lab, code),
                                                      pair_pass.weighted_with_grad(x, lab, w, w,
                                                                                   code)))
        for metric in ("euclidean", "manhattan"):
            code = _metrics.METRIC_CODES[metric]
            cases[f"specialised/intra_inter_sums/{tag}-{metric}"] = (
                lambda x=x, lab=lab, ref=ref, rl=ref_lab, w=w, code=code: (
                    direct.rect_forward(x, lab, ref, rl, None, code),
                    direct.rect_backward(w, w, x, lab, ref, rl, None, code)))

        def affinity_case(f=x, lab=lab, w=w, d1=d1):
            protos = torch.randn(3, 1, d1, generator=gen(25))
            rows, d_true, active = affinity.forward(f, protos, lab, 1.0, 0.5, 0)
            affinity.backward(w, f, protos, lab, d_true, active, 1.0, 0.5, 0)
        cases[f"specialised/affinity/{tag}"] = affinity_case
        for metric in ("euclidean", "great_circle"):
            def ncl_case(x=x, lab=lab, w=w, d1=d1, metric=metric):
                unit = torch.nn.functional.normalize(x, dim=1)
                cen = torch.nn.functional.normalize(torch.randn(16, d1, generator=gen(26)), dim=1)
                n_centroids.negatives_forward(unit, cen, lab, metric)
                n_centroids.negatives_backward(unit, cen, lab, w, metric)
            cases[f"specialised/n_centroids/{tag}-{metric}"] = ncl_case
        cases[f"specialised/class_stats/{tag}"] = (
            lambda x=x, lab=lab, d1=d1: class_stats.shifted_sums(
                x, lab, torch.zeros(3, d1, dtype=torch.float64), 3))

    # Widths that are not a multiple of 16 (D = 37: no alignment hint, the general variant a
    # GPU compiles for most embedding sizes), every op's kernels.
    d_odd = 37
    for dname, dtype in float_dtypes.items():
        for tf32 in tf32_modes(dtype):
            tag = f"{dname}{'-tf32' if tf32 else ''}"
            x = torch.randn(70, d_odd, generator=gen(30)).to(dtype)
            lab = torch.randint(0, 4, (70,), generator=gen(31))
            w = torch.rand(70, generator=gen(32), dtype=torch.float64).to(
                dtype if dtype == torch.float64 else torch.float32)
            for metric in ("euclidean", "cosine"):
                code = _metrics.METRIC_CODES[metric]
                cases[f"unaligned/pair_pass/{tag}-{metric}"] = with_tf32(
                    tf32, lambda x=x, lab=lab, w=w, code=code: (
                        pair_pass.row_sums(x, lab, code),
                        pair_pass.weighted_with_grad(x, lab, w, w, code)))
            for m in (1, 8, 32):
                def affinity_odd(f=x, lab=lab, w=w, m=m):
                    protos = torch.randn(4, m, d_odd, generator=gen(33)).to(f.dtype)
                    rows, d_true, active = affinity.forward(f, protos, lab, 1.0, 0.5, 0)
                    affinity.backward(w, f, protos, lab, d_true, active, 1.0, 0.5, 0)
                cases[f"unaligned/affinity/{tag}-m{m}"] = with_tf32(tf32, affinity_odd)
            for metric in n_centroids.METRIC_CODES:
                def ncl_odd(x=x, lab=lab, w=w, metric=metric):
                    unit = torch.nn.functional.normalize(x.float(), dim=1).to(x.dtype)
                    cen = torch.nn.functional.normalize(
                        torch.randn(5, d_odd, generator=gen(34)), dim=1).to(x.dtype)
                    n_centroids.negatives_forward(unit, cen, lab, metric)
                    n_centroids.negatives_backward(unit, cen, lab, w.to(x.dtype), metric)
                cases[f"unaligned/n_centroids/{tag}-{metric}"] = with_tf32(tf32, ncl_odd)
        if dtype in (torch.float32, torch.float64):
            xs = torch.randn(70, d_odd, generator=gen(35), dtype=dtype)
            labs = torch.randint(0, 5, (70,), generator=gen(36))
            cases[f"unaligned/class_stats/{dname}"] = (
                lambda xs=xs, labs=labs: class_stats.shifted_sums(
                    xs, labs, torch.zeros(5, d_odd, dtype=torch.float64), 5))

    # Pair losses: every loss, both pair values, fp32 (tf32 on / off) and fp64, forward and
    # both backward launches (the inputs are float32 or float64 there; fp16 / bf16 are
    # widened before the kernels), with a left-out pair and near pairs in the data.
    for dname in ("fp32", "fp64"):
        dtype = float_dtypes[dname]
        for tf32 in tf32_modes(dtype):
            for loss, params in (("contrastive", [0.1, 0.9]), ("supcon", [0.1]),
                                 ("ntxent", [0.07]), ("multi_similarity", [2.0, 50.0, 0.5])):
                for metric in ("euclidean", "cosine"):
                    x = torch.randn(40, 32, generator=gen(40), dtype=dtype)
                    ref = torch.cat([torch.randn(20, 32, generator=gen(41), dtype=dtype), x])
                    lab = torch.randint(0, 4, (40,), generator=gen(42))
                    ref_lab = torch.cat([torch.randint(0, 4, (20,), generator=gen(43)), lab])
                    tag = f"{dname}{'-tf32' if tf32 else ''}-{loss}-{metric}"

                    def pair_loss(x=x, lab=lab, ref=ref, rl=ref_lab, loss=loss, params=params,
                                  metric=metric):
                        rows, stats = pair_losses.forward(x, lab, ref, rl, 20, loss, params,
                                                          metric)
                        pair_losses.backward(torch.ones_like(rows), stats, x, lab, ref, rl, 20,
                                             loss, params, metric)
                    cases[f"pair_losses/{tag}"] = with_tf32(tf32, pair_loss)

    # Nearest neighbours: every KP (16 .. MAX_NEIGHBORS) and the lists beyond (k = 200 when
    # MAX_NEIGHBORS is 128, from 50 with Triton < 3.5: _collect_kernel), both key forms, fp32
    # (tf32 on / off) and fp64 (fp16 / bf16 are widened before the kernel), with and without
    # the own row left out.
    for dname in ("fp32", "fp64"):
        dtype = float_dtypes[dname]
        for tf32 in tf32_modes(dtype):
            for metric in ("euclidean", "cosine"):
                for k in (5, 20, 50, 100, 200):
                    q = torch.randn(40, 24, generator=gen(44), dtype=dtype)
                    ref = torch.randn(300, 24, generator=gen(45), dtype=dtype)
                    tag = f"{dname}{'-tf32' if tf32 else ''}-{metric}-k{k}"

                    def neighbors(q=q, ref=ref, metric=metric, k=k):
                        nearest_neighbors.nearest_neighbors(q, ref, k, metric, None)
                        nearest_neighbors.nearest_neighbors(ref, ref, k, metric, 0)
                    cases[f"nearest_neighbors/{tag}"] = with_tf32(tf32, neighbors)

    # Class statistics (float features of any dtype; fp64 sums).
    for dname, dtype in float_dtypes.items():
        feats = torch.randn(70, 48, generator=gen(16)).to(dtype)
        lab = torch.randint(0, 5, (70,), generator=gen(17))
        shift = torch.zeros(5, 48, dtype=torch.float64)
        cases[f"class_stats/{dname}"] = (
            lambda feats=feats, lab=lab, shift=shift: class_stats.shifted_sums(feats, lab, shift, 5))
    return cases


def budgets() -> dict:
    """Kernel name -> its module's RESOURCE_BUDGET entry (min_blocks_per_sm)."""
    from confusion_kernels.triton import (affinity, class_stats, n_centroids, nearest_neighbors,
                                          pair_losses, pair_pass)
    from confusion_kernels.triton import intra_inter_sums as direct

    out = {}
    for module in (pair_pass, direct, affinity, n_centroids, class_stats, pair_losses,
                   nearest_neighbors):
        short = module.__name__.rsplit(".", 1)[-1]
        out.update({f"{short}.{k}": v for k, v in getattr(module, "RESOURCE_BUDGET", {}).items()})
    return out


def collect(only: str | None) -> list[Launch]:
    """Every distinct launch of the matrix (first occurrence of each variant)."""
    cases = launch_cases()
    seen, unique = set(), []
    with capture(90, compile_kernels=False) as (launches, state):
        for name, call in cases.items():
            if only and only not in name:
                continue
            state["case"] = name
            with _quiet():
                call()
    for launch in launches:
        key = launch.key()
        if key not in seen:
            seen.add(key)
            unique.append(launch)
    return unique


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------
# Compile and measure (worker side)
# ---------------------------------------------------------------------------
def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True,
                             timeout=120).stdout
    finally:
        os.remove(path)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not match:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    reg, stack, shared, local = map(int, match.groups())
    return dict(regs=reg, stack=stack, static_smem=shared, local=local)


_PTXAS_LOGS: list[str] = []


def _record_ptxas_logs() -> None:
    """Keep what ptxas -v prints for each compile: Triton runs ptxas with -v into a
    temporary log (both 3.2 and newer) and deletes it; the log says how much of the
    stack frame is spills."""
    original = subprocess.run

    def run(cmd, *args, **kwargs):
        result = original(cmd, *args, **kwargs)
        log = kwargs.get("stderr")
        if isinstance(cmd, (list, tuple)) and os.path.basename(str(cmd[0])).startswith("ptxas") \
                and hasattr(log, "name") and os.path.exists(log.name):
            with open(log.name) as f:
                _PTXAS_LOGS.append(f.read())
        return result

    subprocess.run = run


def ptxas_report(log: str) -> dict:
    """Spill stores / loads and the stack frame from a ptxas -v log (0 when absent)."""
    def grab(pattern):
        found = re.findall(pattern, log)
        return max(map(int, found)) if found else 0
    return dict(spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"),
                stack_frame=grab(r"(\d+) bytes stack frame"))


# Approximate instructions in the PTX (each a place where the GPU's result can differ
# from the interpreter's round-to-nearest one). The kernels use round-to-nearest square
# roots and divisions (triton/_support.py: sqrt_rn, div_rn): any of FORBIDDEN_PTX fails.
APPROX_PTX = ("sqrt.approx", "div.approx", "div.full", "rcp.approx", "ex2.approx", "lg2.approx")
FORBIDDEN_PTX = ("sqrt.approx", "div.approx", "div.full", "rcp.approx")


# An fp32 constant in a float64 kernel whose value an fp32 may have rounded (a literal such
# as 0.1 that reached the IR as fp32): counted in the TTIR, fails CI. Exact small values
# (0, +-1, 0.5, ...: tl.where(c, 1.0, 0.0)) and infinities are the same in both types.
_F32_CONSTANT = re.compile(r"arith\.constant[^\n]*(?::\s*f32\b|xf32>)")
_CONSTANT_VALUE = re.compile(r"arith\.constant\s+(?:dense<)?([-+0-9.eE]+|0x[0-9A-Fa-f]+)")


def _exact_in_fp32(line: str) -> bool:
    found = _CONSTANT_VALUE.search(line)
    if not found or found.group(1).startswith("0x"):  # hex: inf / nan bit patterns
        return bool(found)
    value = float(found.group(1))
    return abs(value) < 2.0 ** 24 and (value * 1024.0).is_integer()


def is_fp64(launch: Launch) -> bool:
    """float64 accumulation, or every floating tensor argument float64."""
    import triton.language as tl

    if launch.constexprs().get("ACC") in (tl.float64, "fp64"):
        return True
    floats = [a.dtype for a in launch.args if hasattr(a, "dtype") and a.dtype.is_floating_point]
    return bool(floats) and all(str(t) == "torch.float64" for t in floats)


def f32_constants(launch: Launch, ttir: str) -> int:
    if not is_fp64(launch):
        return 0
    return sum(1 for line in ttir.splitlines()
               if _F32_CONSTANT.search(line) and not _exact_in_fp32(line))


# libdevice's float64 log (tl.log of an fp64 tensor: the pair losses' log-sum-exps) seeds its
# reciprocal with rcp.approx.ftz.f64 and refines it to full precision: counted apart, allowed.
LIBDEVICE_F64_SEED = "rcp.approx.ftz.f64"


def approx_counts(ptx: str) -> str:
    seeds = ptx.count(LIBDEVICE_F64_SEED)
    counts = {op: ptx.count(op + ".") for op in APPROX_PTX}
    counts["rcp.approx"] -= seeds
    counts["rcp.approx.ftz.f64 (libdevice log)"] = seeds
    return " ".join(f"{op}:{n}" for op, n in counts.items() if n)


def blocks_per_sm(arch: int, regs: int, warps: int, smem: int) -> int:
    lim = SM_LIMITS[arch]
    per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = lim["regs"] // (per_warp * warps)
    by_threads = lim["threads"] // (32 * warps)
    by_smem = lim["smem_sm"] // (smem + SMEM_RESERVED) if smem else lim["blocks"]
    return min(by_regs, by_threads, by_smem, lim["blocks"])


def _meta(kernel, name, default=None):
    meta = kernel.metadata
    return getattr(meta, name, meta.get(name, default) if isinstance(meta, dict) else default)


def worker(indices: list[int], arch: int, only: str | None, progress: str) -> None:
    """Compile the variants ``indices`` of collect() for ``arch``, one JSON line each."""
    unique = collect(only)
    _record_ptxas_logs()
    with capture(arch, compile_kernels=True) as (launches, state), open(progress, "a") as log:
        for i in indices:
            launch = unique[i]
            log.write(json.dumps(dict(index=i, arch=arch, started=True)) + "\n")
            log.flush()
            start = time.perf_counter()
            row = dict(index=i, arch=arch)
            _PTXAS_LOGS.clear()
            try:
                with _quiet():
                    kernel = launch.kernel.run(*launch.args, grid=launch.grid, warmup=True,
                                               **launch.kwargs)
                seconds = time.perf_counter() - start
                usage = resource_usage(kernel.asm["cubin"])
                warps = int(_meta(kernel, "num_warps"))
                smem = int(_meta(kernel, "shared", 0)) + usage["static_smem"]
                row.update(usage, seconds=round(seconds, 2), warps=warps, smem=smem,
                           blocks_per_sm=blocks_per_sm(arch, usage["regs"], warps, smem),
                           approx=approx_counts(kernel.asm["ptx"]),
                           f32_consts=f32_constants(launch, kernel.asm["ttir"]), error="",
                           **ptxas_report("\n".join(_PTXAS_LOGS)))
                if not _PTXAS_LOGS:  # no log seen: count the whole stack as spills
                    row.update(spill_stores=usage["stack"], spill_loads=usage["stack"])
            except Exception as exc:  # a compile failure is a result, not a crash
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
                # Triton's CompilationError: the location first, the cause last
                what = " / ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
                row.update(seconds=round(time.perf_counter() - start, 2),
                           error=f"{type(exc).__name__}: {what[:300]}")
            log.write(json.dumps(row) + "\n")
            log.flush()


# ---------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------
def _run_workers(count: int, arches: list[int], jobs: int, only: str | None,
                 max_seconds: float) -> list[dict]:
    """Results of every (variant, arch): one architecture after the other, its variants in
    ``jobs`` equal shares, one worker process each; a worker that hangs on a variant is
    killed (or one whose compiler crashes ends), and the rest of its share run again."""
    results: dict[tuple[int, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in arches:
            pending = list(range(count))
            while pending:
                procs = []
                for k in range(jobs):
                    idx = pending[k::jobs]
                    if not idx:
                        continue
                    progress = os.path.join(tmp, f"w{k}-{arch}-{len(results)}.jsonl")
                    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tmp, f"cache{k}-{arch}"),
                               TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(arch),
                           "--indices", ",".join(map(str, idx)), "--progress", progress]
                    if only:
                        cmd += ["--only", only]
                    procs.append((subprocess.Popen(cmd, env=env), progress, idx))
                # a worker may spend at most max_seconds on one variant (plus the capture)
                killed = [_wait_with_watchdog(proc, progress, max_seconds)
                          for proc, progress, idx in procs]
                pending = []
                for (proc, progress, idx), was_killed in zip(procs, killed):
                    done, started = _read_progress(progress)
                    for row in done:
                        results[(row["index"], row["arch"])] = row
                    why = (f"did not compile within {max_seconds:.0f} s" if was_killed else
                           f"the compiler crashed (worker exit code {proc.returncode})")
                    for i in started:
                        if (i, arch) not in results:
                            results[(i, arch)] = dict(index=i, arch=arch, error=why,
                                                      seconds=float(max_seconds) if was_killed else 0.0)
                    pending += [i for i in idx if (i, arch) not in results]
    return [results[(i, a)] for a in arches for i in range(count)]


def _read_progress(path: str) -> tuple[list[dict], list[int]]:
    done, started = [], []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                (started.append(row["index"]) if row.get("started") else done.append(row))
    return done, started


def _wait_with_watchdog(proc, progress: str, max_seconds: float) -> bool:
    """Waits for a worker; kills it (and returns True) when one variant takes longer
    than ``max_seconds``."""
    last_change, last_size = time.monotonic(), -1
    while proc.poll() is None:
        time.sleep(0.5)
        size = os.path.getsize(progress) if os.path.exists(progress) else 0
        if size != last_size:
            last_change, last_size = time.monotonic(), size
        elif size and time.monotonic() - last_change > max_seconds:
            proc.kill()
            proc.wait()
            return True
    return False


def _matches(entry: dict, r: dict) -> bool:
    """Whether a KNOWN_SPILLS entry names this row's kernel, variant and architecture."""
    return (r["kernel"] == entry["kernel"] and int(r["arch"]) in entry["archs"]
            and re.search(entry["variant"], r["variant"]) is not None)


def _known_spill(r: dict, version: tuple[int, int]) -> dict | None:
    for entry in KNOWN_SPILLS:
        if version < entry.get("triton_below", (99, 0)) and _matches(entry, r):
            return entry
    return None


def check(rows: list[dict], budget: dict, max_seconds: float,
          version: tuple[int, int] = (99, 0)) -> list[str]:
    problems = []
    used = set()
    for r in rows:
        what = f"{r['kernel']} [{r['variant']}] sm_{r['arch']}"
        if r["error"]:
            problems.append(f"{what}: {r['error']}")
            continue
        if r["seconds"] > max_seconds:
            problems.append(f"{what}: compiled in {r['seconds']:.0f} s (limit {max_seconds:.0f} s)")
        spills = r["spill_stores"] or r["spill_loads"] or r["local"]
        known = _known_spill(r, version) if spills else None
        if known:
            used.add(id(known))
            r["allowed"] = "known spill (KNOWN_SPILLS)"
        elif spills:
            problems.append(f"{what}: spills ({r['spill_stores']} B stores, {r['spill_loads']} B "
                            f"loads, {r['stack']} B stack per thread)")
        if r["smem"] > SM_LIMITS[r["arch"]]["smem_block"]:
            problems.append(f"{what}: {r['smem']} B shared memory (limit "
                            f"{SM_LIMITS[r['arch']]['smem_block']} B)")
        if r.get("f32_consts"):
            problems.append(f"{what}: {r['f32_consts']} fp32 constants in a float64 kernel "
                            "(its TTIR) that fp32 may have rounded")
        forbidden = [op for op in FORBIDDEN_PTX if op + ":" in r.get("approx", "")]
        if forbidden:
            problems.append(f"{what}: approximate {', '.join(forbidden)} in its PTX "
                            f"({r['approx']}); use sqrt_rn / div_rn")
        if r["kernel"] not in budget:
            problems.append(f"{what}: no RESOURCE_BUDGET entry in its module (what its "
                            "launcher assumes: min_blocks_per_sm)")
        need = budget.get(r["kernel"], {}).get("min_blocks_per_sm", 1)
        if r["blocks_per_sm"] < need:
            problems.append(f"{what}: {r['blocks_per_sm']} blocks/SM, its launcher assumes {need}")
    for entry in KNOWN_SPILLS:
        applies = version < entry.get("triton_below", (99, 0))
        # (an architecture not compiled in this run, e.g. `--arch 90`, leaves its entries be)
        compiled = any(_matches(entry, r) for r in rows)
        if applies and id(entry) not in used and compiled:
            problems.append(f"KNOWN_SPILLS entry for {entry['kernel']} [{entry['variant']}] matches "
                            "no spilling variant any more: remove it")
    return problems


def variant_label(launch: Launch) -> str:
    """The constexprs and warps of a launch, short."""
    skip = {"ACC"}
    parts = [f"{k}={_short(v)}" for k, v in launch.constexprs().items() if k not in skip]
    acc = launch.constexprs().get("ACC")
    dtypes = sorted({str(a.dtype).replace("torch.", "") for a in launch.args
                     if hasattr(a, "dtype") and a.dtype.is_floating_point})
    head = "/".join(dtypes) + (f" acc={_short(acc)}" if acc is not None else "")
    warps = launch.kwargs.get("num_warps")
    return " ".join([head] + parts + ([f"warps={warps}"] if warps else []))


def _short(v) -> str:
    s = str(v)
    return s.replace("fp", "f") if len(s) < 12 else s[:12]


def write_tables(rows: list[dict], out: str, header: str) -> None:
    os.makedirs(out, exist_ok=True)
    cols = ["kernel", "variant", "arch", "seconds", "regs", "spill_stores", "spill_loads", "stack",
            "local", "smem", "warps", "blocks_per_sm", "approx", "f32_consts", "error", "case"]
    with open(os.path.join(out, "triton_aot.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, "triton_aot.md"), "w") as f:
        f.write(header + "\n\n")
        f.write("| kernel | variant | sm | compile s | regs | spills B (st/ld) | stack B | smem B "
                "| warps | blocks/SM | approximate PTX | error / note |\n")
        f.write("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            spills = f"{r['spill_stores']}/{r['spill_loads']}" if "spill_stores" in r else ""
            f.write(f"| {r['kernel']} | {r['variant']} | {r['arch']} | {r['seconds']} | "
                    f"{r.get('regs', '')} | {spills} | {r.get('stack', '')} | {r.get('smem', '')} | "
                    f"{r.get('warps', '')} | {r.get('blocks_per_sm', '')} | {r.get('approx', '')} | "
                    f"{r['error'] or r.get('allowed', '')} |\n")


def summary(rows: list[dict]) -> str:
    lines = []
    for arch in sorted({r["arch"] for r in rows}):
        sel = [r for r in rows if r["arch"] == arch]
        ok = [r for r in sel if not r["error"]]
        worst = max(ok, key=lambda r: r["seconds"]) if ok else None
        lines.append(
            f"sm_{arch}: {len(sel)} variants, {len(sel) - len(ok)} failed to compile, "
            f"{sum(1 for r in ok if r['spill_stores'] or r['spill_loads'])} spill "
            f"({sum(1 for r in ok if r.get('allowed'))} of them listed in KNOWN_SPILLS), "
            f"{sum(1 for r in ok if r['stack'])} use a stack frame, total compile "
            f"{sum(r['seconds'] for r in sel):.0f} s, slowest {worst['seconds'] if worst else 0:.1f} s "
            f"({worst['kernel'] + ' ' + worst['variant'] if worst else '-'}), most registers "
            f"{max((r['regs'] for r in ok), default=0)}, least blocks/SM "
            f"{min((r['blocks_per_sm'] for r in ok), default=0)}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SM_LIMITS))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "triton-aot"))
    p.add_argument("--only", default=None, help="only the cases whose name contains this")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="compile-time limit of one variant (default 60)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--indices", help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        worker([int(i) for i in args.indices.split(",") if i], args.worker, args.only, args.progress)
        return 0

    import torch
    import triton

    start = time.perf_counter()
    unique = collect(args.only)
    if args.list:
        for i, launch in enumerate(unique):
            print(f"{i:4d} {launch.name:24s} {variant_label(launch)}   ({launch.case})")
        print(f"{len(unique)} variants")
        return 0
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(unique)} launch variants "
          f"x sm_{', sm_'.join(map(str, args.arch))}, {args.jobs} workers", flush=True)
    results = _run_workers(len(unique), args.arch, max(1, args.jobs), args.only, args.max_seconds)
    rows = []
    for r in results:
        launch = unique[r["index"]]
        rows.append(dict(r, kernel=launch.name, variant=variant_label(launch), case=launch.case))
    rows.sort(key=lambda r: (r["kernel"], r["variant"], r["arch"]))
    header = (f"Triton {triton.__version__} (torch {torch.__version__}), ahead-of-time for "
              f"sm_{', sm_'.join(map(str, args.arch))}: `python scripts/triton_aot.py`, "
              f"{time.strftime('%Y-%m-%d')}, commit {commit()}, {args.jobs} workers, "
              f"{time.perf_counter() - start:.0f} s wall")
    from confusion_kernels.triton._support import TRITON_VERSION

    problems = check(rows, budgets(), args.max_seconds, TRITON_VERSION)
    write_tables(rows, args.out, header + "\n\n" + summary(rows))
    print(summary(rows))
    return report(problems, f"{args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())

"""What the installed Triton can do, decided once for every launcher.

fp64 matrix products: ``tl.dot`` takes fp64 operands from Triton 3.5 on (DMMA on
sm_80 / sm_90). Before, the kernels multiply fp64 tiles by broadcast products
summed in registers (``x[:, :, None] * y[None, :, :]``), which need much smaller
tiles to fit the register file; each launcher picks its fp64 tiles by
``FP64_DOT``. ``scripts/triton_aot.py`` compiles both forms (newest and oldest
supported Triton) for sm_80 / sm_90 in CI.

Register budget: see MAXNREG.

Rounding: in fp32, ``tl.sqrt`` compiles to ``sqrt.approx.f32`` and ``/`` to ``div.full.f32``
on the GPU (within 1-2 ulp), while the interpreter that runs our CPU tests rounds to nearest;
the kernels use ``sqrt_rn`` / ``div_rn`` below (and multiply by constant reciprocals), so the
GPU rounds as the tests saw. ``scripts/triton_aot.py`` fails CI on an approximate square
root or division in any kernel; ``tl.exp`` (``ex2.approx``) stays in the affinity loss's
Gaussian similarity, within 2 ulp.
"""

from __future__ import annotations

import functools
import os
import re
import warnings

import torch
import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (the CPU tests) the kernels' arithmetic runs in numpy, which warns
# ("overflow", "invalid value", "divide by zero") where a GPU just computes the IEEE result
# (inf / NaN) that the kernels handle or propagate on purpose: those warnings, from Triton's
# interpreter module only, are not shown (21,700 of them in one test run).
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            module=r"triton\.runtime\.interpreter")

TRITON_VERSION: tuple[int, int] = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
FP64_DOT: bool = TRITON_VERSION >= (3, 5)


# ptxas picks a register budget by itself (seen: 128 or 168 per thread at 4 warps for
# sm_80) and spills above it. Kernels that need more pass maxnreg=MAXNREG, which lets it
# use the whole register file of a thread.
MAXNREG = 255


def use_dot(dtype: torch.dtype) -> bool:
    """True when tiles of ``dtype`` are multiplied with ``tl.dot``."""
    return dtype != torch.float64 or FP64_DOT


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision of fp32 operands, the TF32 rule of every op: "tf32" (10-bit
    mantissas) only when ``torch.backends.cuda.matmul.allow_tf32`` allows it, else exact
    ("ieee"); 16-bit operands and fp64 are exact ("ieee") as they are."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def launch_options(cfg: dict) -> dict:
    """The launch options (not constexprs) of a launcher's configuration."""
    return {k: cfg[k] for k in ("num_warps", "maxnreg") if k in cfg}


@triton.jit
def sqrt_rn(x):
    """Square root rounded to nearest (fp64's is already)."""
    if x.dtype == tl.float32:
        return tl.math.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def div_rn(x, y):
    """x / y rounded to nearest; y a tensor (fp64's division is already)."""
    if y.dtype == tl.float32:
        return tl.math.div_rn(x, y)
    else:
        return x / y


def target_programs(device: torch.device) -> int:
    """Programs that give every SM of ``device`` work (4 per SM); a small number in the
    interpreter, so that its tests run the splits too."""
    from .._backend import triton_interpreting

    if triton_interpreting():
        return 4
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * _sm_count(index)
    return 4 * 132  # ahead-of-time compiles (scripts/triton_aot.py): an H100 / H200


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def shares(n: int, programs: int, block: int, target: int) -> tuple[int, int]:
    """(splits, items per split) of a loop over n items (rows, columns) that a grid of
    ``programs`` runs whole in each program: when that grid alone is small (the affinity
    dL/dW's (class block, dim block) grid at C = 100, D = 128: 8 programs; the rectangular
    forward's row blocks at N = 4,096: 128), splitting the loop into up to target / programs
    shares, each written to its own partial sum (added afterwards in a fixed order:
    deterministic), gives the GPU about ``target`` programs. Shares are whole blocks."""
    blocks = triton.cdiv(max(n, 1), block)
    splits = max(1, min(blocks, triton.cdiv(target, max(programs, 1))))
    per_split = triton.cdiv(blocks, splits) * block
    return triton.cdiv(max(n, 1), per_split), per_split


# Widths the kernels see are multiples of this: on the GPU an integer argument divisible by
# 16 is compiled with that as a hint (aligned, vectorised row loads), and the variants
# without it (D = 37, 100, ...) spilled in the fp32 pair pass and affinity kernels (sm_90,
# scripts/triton_aot.py); an argument equal to 1 (D = 1) is compiled as a constant.
COLUMN_MULTIPLE = 16


def pad_columns(t: torch.Tensor, multiple: int = COLUMN_MULTIPLE) -> torch.Tensor:
    """``t`` [..., D] with zero columns up to a multiple of ``multiple`` (``t`` itself when D is
    one already). Zero columns change no distance, Gram entry or norm; the launchers drop the
    gradient columns they add."""
    extra = -t.shape[-1] % multiple
    return torch.nn.functional.pad(t, (0, extra)) if extra else t

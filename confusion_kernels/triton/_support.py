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

import re

import torch
import triton
import triton.language as tl

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

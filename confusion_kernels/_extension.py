"""Loads the compiled extension ``confusion_kernels._C`` if it was built.

Without it the package still works through the reference backend; one warning
says why the extension is missing.
"""

from __future__ import annotations

import warnings

import torch

try:
    from . import _C  # noqa: F401  (importing registers the torch.ops kernels)

    HAS_C = True
    IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    HAS_C = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "confusion_kernels: the C++ extension confusion_kernels._C is not available "
        f"({IMPORT_ERROR}); only the 'reference' (and 'triton') backends can run. "
        "Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


OPS = ("intra_inter_sums", "intra_inter_sums_backward", "affinity_hinge", "affinity_hinge_backward",
       "affinity_hinge_sum_with_grad", "class_shifted_sums")


def _registered_kernels() -> frozenset[tuple[str, str]]:
    if not HAS_C:
        return frozenset()
    return frozenset(
        (op, key) for op in OPS for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"confusion_kernels::{op}", key))


# Read once at import: a plain lookup keeps backend selection traceable by torch.compile.
_KERNELS = _registered_kernels()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``confusion_kernels::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    return (op, dispatch_key) in _KERNELS

"""Loads the compiled extension ``confusion_kernels._C`` if it was built.

Without it the package still works through the reference backend; one warning
says why the extension is missing.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

NOT_BUILT = ("not built: this install has no compiled confusion_kernels._C (building it needs "
             "a C++ compiler and the torch it runs with: `pip install --no-build-isolation .` "
             "in a checkout, see docs/building.md)")


def _built() -> bool:
    """Whether a compiled _C sits in the package (False: never built, e.g. no compiler)."""
    try:
        return importlib.util.find_spec(f"{__package__}._C") is not None
    except (ValueError, AttributeError, ImportError):  # a stand-in in sys.modules: try it
        return True


try:
    if not _built():
        # Python's own message for a missing submodule of a package being imported speaks
        # of a "circular import"; say what is true instead
        raise ImportError(NOT_BUILT)
    from . import _C  # noqa: F401  (importing registers the torch.ops kernels)

    HAS_C = True
    IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    HAS_C = False
    IMPORT_ERROR = str(exc) if str(exc) == NOT_BUILT else f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "confusion_kernels: the C++ extension confusion_kernels._C is not available "
        f"({IMPORT_ERROR}); only the 'reference' (and 'triton') backends can run. "
        "Build it with `pip install --no-build-isolation -e .` (a C++ compiler is needed).",
        RuntimeWarning,
        stacklevel=2,
    )


def _library_ops() -> tuple[str, ...]:
    """The ops confusion_kernels._C defined (read from the dispatcher, not a list
    kept by hand). Called at import, before the Python (Triton) ops register."""
    if not HAS_C:
        return ()
    prefix = "confusion_kernels::"
    return tuple(sorted(name[len(prefix):].split(".")[0]
                        for name in torch._C._dispatch_get_all_op_names()
                        if name.startswith(prefix)))


OPS = _library_ops()


def _registered_kernels() -> frozenset[tuple[str, str]]:
    return frozenset(
        (op, key) for op in OPS for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"confusion_kernels::{op}", key))


# Read once at import: a plain lookup keeps backend selection traceable by torch.compile.
_KERNELS = _registered_kernels()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``confusion_kernels::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    return (op, dispatch_key) in _KERNELS

"""Loads the compiled kernels: the extension ``confusion_kernels._C`` built at install time, or
else the first-use build for the installed torch (``_build.py``: from the cache, compiled now
when it is not there yet).

Without either the package still works through the reference (and Triton) backends; one
warning says why the kernels are missing and how to get them.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import _build

def _prebuilt() -> bool:
    """Whether a compiled _C sits in the package (False: never built at install time)."""
    try:
        return importlib.util.find_spec(f"{__package__}._C") is not None
    except (ValueError, AttributeError, ImportError):  # a stand-in in sys.modules: try it
        return True


def _load() -> tuple[str | None, str | None, str]:
    """(path of the loaded library, why none was loaded, how it was built)."""
    prebuilt_error = None
    if _prebuilt():
        try:
            from . import _C  # importing registers the torch.ops kernels

            return _C.__file__, None, "built at install time"
        except ImportError as exc:  # built against another torch, say
            prebuilt_error = (f"the prebuilt confusion_kernels._C does not import "
                              f"({type(exc).__name__}: {exc})")
    jit = _build.load_or_build(build=os.environ.get("CONFUSION_KERNELS_JIT", "1") != "0")
    if jit.library is not None:
        how = "built at first use" + (" (just now)" if jit.built_now else "")
        return jit.library, None, f"{how}, cache {jit.directory}"
    if prebuilt_error is not None:
        return None, f"{prebuilt_error}; and the first-use build: {jit.error}", ""
    return None, jit.error, ""


LIBRARY, IMPORT_ERROR, HOW_BUILT = _load()
HAS_C = LIBRARY is not None
if not HAS_C:
    warnings.warn(
        "confusion_kernels: the compiled kernels (confusion_kernels._C) are not available "
        f"({IMPORT_ERROR}); only the 'reference' (and 'triton') backends can run. "
        "`python -m confusion_kernels info` says more.",
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

"""Which backend runs an op: ``available_backends`` and ``select_backend``.

``backend="auto"`` picks, for the tensor's device, cuda > triton > cpu >
reference (and ``_routing.route`` takes the reference instead of cpu for
batches too small for the fused kernel to win); the environment variable
``CONFUSION_KERNELS_BACKEND`` replaces "auto" with a fixed choice. An
explicitly requested backend that cannot run
raises ``RuntimeError`` saying why; nothing falls back silently.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import _extension

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "CONFUSION_KERNELS_BACKEND"


def triton_interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def unavailable_reason(backend: str, device: torch.device | None = None,
                       op: str = "intra_inter_sums") -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` now (None when it can)."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected 'auto' or one of {list(BACKENDS)}"
    device_type = device.type if device is not None else None
    if backend == "reference":
        return None
    if backend == "cpu":
        if not _extension.HAS_C:
            return f"the compiled kernels are not available ({_extension.IMPORT_ERROR})"
        if not _extension.has_kernel(op, "CPU"):
            return f"confusion_kernels._C has no CPU kernel for {op}"
        if device_type not in (None, "cpu"):
            return f"it runs on CPU tensors, got a tensor on {device}"
        return None
    if backend == "triton":
        if not TRITON_INSTALLED:
            return "triton is not installed"
        if device_type == "cuda" or (device_type is None and torch.cuda.is_available()):
            return None
        if device_type in (None, "cpu") and triton_interpreting():
            return None
        return (f"it runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), "
                f"got a tensor on {device if device is not None else 'cpu'}")
    # cuda
    if not _extension.HAS_C:
        return f"the compiled kernels are not available ({_extension.IMPORT_ERROR})"
    if not _extension.has_kernel(op, "CUDA"):
        if _extension.has_kernel("intra_inter_sums", "CUDA"):
            return f"confusion_kernels has no CUDA C++ kernel for {op} yet (use 'triton')"
        return ("confusion_kernels._C was built without CUDA kernels (torch without CUDA, "
                "no nvcc, or CONFUSION_KERNELS_NO_CUDA=1 at build time)")
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if device_type not in (None, "cuda"):
        return f"it runs on CUDA tensors, got a tensor on {device}"
    return None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run now (for tensors on ``device`` when given)."""
    dev = torch.device(device) if device is not None else None
    return [b for b in BACKENDS if unavailable_reason(b, dev) is None]


def requested_backend(backend: str = "auto") -> str:
    """``backend``, or for "auto" the choice ``CONFUSION_KERNELS_BACKEND`` fixes ("auto" when
    it is unset or empty)."""
    if backend != "auto":
        return backend
    return os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"


def auto_requested(backend: str = "auto") -> bool:
    """Whether ``backend`` leaves the choice to the package (not fixed by the caller or by
    ``CONFUSION_KERNELS_BACKEND``)."""
    return requested_backend(backend) == "auto"


def select_backend(tensor: torch.Tensor, backend: str = "auto",
                   op: str = "intra_inter_sums") -> str:
    """The backend that runs ``op`` on ``tensor`` for the requested ``backend``."""
    if backend == "auto":
        backend = requested_backend(backend)
        if backend == "auto":
            order = ("cuda", "triton", "cpu", "reference") if tensor.is_cuda else ("cpu", "reference")
            for candidate in order:
                if unavailable_reason(candidate, tensor.device, op) is None:
                    return candidate
            return "reference"
        source = f"{ENV_VAR}={backend!r}"
    else:
        source = f"backend={backend!r}"
    reason = unavailable_reason(backend, tensor.device, op)
    if reason is not None:
        raise RuntimeError(f"confusion_kernels: {source} cannot run {op}: {reason}")
    return backend

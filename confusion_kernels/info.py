"""``python -m confusion_kernels info``: versions, the compiled extension, and for each device
which backends can run and why each other one cannot (the same answers as
``available_backends`` and ``backend=...`` errors give)."""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, _backend, _extension


def report() -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import numpy

    lines = [f"confusion_kernels {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
             f"python {platform.python_version()}, torch {torch.__version__} "
             f"(CUDA {torch.version.cuda or 'none'}), triton {triton_version}, "
             f"numpy {numpy.__version__}"]
    if _extension.HAS_C:
        cuda = "with" if _extension.has_kernel("intra_inter_sums", "CUDA") else "without"
        lines.append(f"compiled extension: {_extension._C.__file__} ({cuda} CUDA kernels; built "
                     "at install time, no build cache)")
    else:
        lines.append(f"compiled extension: {_extension.IMPORT_ERROR}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() \
            or platform.machine()
        lines.append(f"backends for {device} tensors ({name}):")
        for backend in _backend.BACKENDS:
            why = _backend.unavailable_reason(backend, torch.device(device))
            lines.append(f"  {backend:10} {'available' if why is None else 'no: ' + why}")
    if "cuda" not in devices:
        lines.append("backends for cuda tensors: no CUDA device is available")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv:
        print("usage: python -m confusion_kernels info", file=sys.stderr)
        return 2
    print(report())
    return 0

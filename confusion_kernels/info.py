"""``python -m confusion_kernels info``: versions, the compiled extension (where it is and how
it was built, the first-use build cache), and for each device which backends can run and why
each other one cannot (the same answers as ``available_backends`` and ``backend=...`` errors
give). ``python -m confusion_kernels build``: compiles the kernels now."""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, _backend, _build, _extension


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
        lines.append(f"compiled kernels: {_extension.LIBRARY} ({cuda} CUDA kernels; "
                     f"{_extension.HOW_BUILT})")
    else:
        lines.append(f"compiled kernels: {_extension.IMPORT_ERROR}")
    lines.append(f"first-use build cache: {_build.cache_dir()} (C++ compiler: "
                 f"{_build.compiler() or 'none found'})")
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


def build(argv: list[str]) -> int:
    """Compiles the kernels for this torch (when the import has not already loaded them)."""
    if argv:
        print("usage: python -m confusion_kernels build", file=sys.stderr)
        return 2
    if _extension.HAS_C:
        print(f"confusion_kernels: kernels ready: {_extension.LIBRARY} ({_extension.HOW_BUILT})")
        return 0
    result = _build.load_or_build(build=True)
    if result.library is None:
        print(f"confusion_kernels: {result.error}", file=sys.stderr)
        return 1
    print(f"confusion_kernels: kernels ready: {result.library} (cache {result.directory})")
    return 0


def main(argv: list[str]) -> int:
    if argv:
        print("usage: python -m confusion_kernels info", file=sys.stderr)
        return 2
    print(report())
    return 0

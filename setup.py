"""Builds confusion_kernels._C: C++ CPU kernels always, CUDA kernels when the
installed torch is a CUDA build and nvcc is found (a GPU is not needed).

Environment:
  CONFUSION_KERNELS_NO_CUDA=1  skip the CUDA sources
  FORCE_CUDA=1                 fail if the CUDA sources cannot be built
  TORCH_CUDA_ARCH_LIST         GPU architectures; defaults to the visible GPU,
                               or "8.0;9.0" when none is visible
  MAX_JOBS                     parallel compile jobs (ninja)
  CONFUSION_KERNELS_CPU_FLAGS  extra flags for the C++ CPU kernels; default
                               "-mavx2 -mfma" when the building x86-64 CPU
                               has them (the extension is built where it
                               runs), "" to build for baseline x86-64
  CUDA_HOME                    CUDA toolkit root; found from nvcc when unset
Install with `pip install --no-build-isolation -e .` (build isolation would
pull a second torch).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit_root(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "bin", "nvcc"))
            and os.path.isfile(os.path.join(path, "include", "cuda_runtime_api.h")))


def _toolkit_root_from_nvcc(nvcc: str) -> str | None:
    """The toolkit that `nvcc` really runs, even when it is a wrapper script."""
    candidate = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _is_toolkit_root(candidate):
        return candidate
    try:  # nvcc's dry run prints its own install location as TOP=...
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True,
                             timeout=60)
        match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if match and _is_toolkit_root(os.path.realpath(match.group(1))):
            return os.path.realpath(match.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def find_cuda_home() -> str | None:
    """CUDA_HOME if set, else the real toolkit behind nvcc, else a standard location."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root_from_nvcc(nvcc)
        if root:
            return root
    for candidate in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _is_toolkit_root(candidate):
            return candidate
    return None


def cpu_vector_flags() -> list[str]:
    """SIMD flags for the CPU kernels: CONFUSION_KERNELS_CPU_FLAGS, else AVX2+FMA
    when this x86-64 machine has them."""
    if "CONFUSION_KERNELS_CPU_FLAGS" in os.environ:
        return os.environ["CONFUSION_KERNELS_CPU_FLAGS"].split()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.findall(r"\b(avx2|fma)\b", f.read()))
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if flags == {"avx2", "fma"} else []


def shared_libstdcxx_link_args() -> list[str]:
    """Link the shared C++ runtime even where the compiler would take the static one.

    On some images the compiler's search path has libstdc++.a but no
    libstdc++.so, so `-lstdc++` pulls a static copy into the extension. That
    copy carries its own locale ids; with -Bsymbolic-functions (Ubuntu's
    Python) the extension's stream code then looks up the wrong facet and
    crashes the first time a TORCH_CHECK message formats an integer. Naming the
    libstdc++ this process (and torch) already uses keeps one runtime."""
    cxx = os.environ.get("CXX", "c++")
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if os.path.isabs(found) and os.path.exists(found):
        return []  # the compiler links the shared runtime by itself
    import torch  # noqa: F401  (maps the C++ runtime torch runs with)

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libstdc++.so" in line}
    except OSError:
        return []
    for path in sorted(paths):
        if os.path.exists(path):
            print(f"confusion_kernels: {cxx} has no shared libstdc++; linking {path}",
                  file=sys.stderr)
            return [path]
    return []


def nvcc_version(cuda_home: str) -> str | None:
    """The release nvcc under ``cuda_home`` reports, e.g. "13.0" (None if it cannot say)."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def cuda_build_plan() -> tuple[bool, str]:
    """(build CUDA?, why) decided from torch's build and nvcc, never from a GPU."""
    import torch

    if _flag("CONFUSION_KERNELS_NO_CUDA"):
        return False, "CONFUSION_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    toolkit = nvcc_version(cuda_home)
    if toolkit is not None and toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
        # torch's cpp_extension refuses to mix CUDA major versions.
        return False, (f"nvcc {toolkit} in {cuda_home} and torch's CUDA {torch.version.cuda} "
                       "differ in their major version")
    os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():  # only to pick the arch of the GPU in use
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    return True, f"CUDA {torch.version.cuda} with {cuda_home}"


def extensions():
    build_cuda, why = cuda_build_plan()
    if _flag("FORCE_CUDA") and not build_cuda:
        raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}")
    print(f"confusion_kernels: CUDA kernels {'ON' if build_cuda else 'OFF'} ({why})",
          file=sys.stderr)

    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math: lets the vectoriser turn selects around divisions into
    # blends (the kernels never rely on floating-point traps)
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *cpu_vector_flags()]  # torch picks -std
    kwargs = dict(
        name="confusion_kernels._C",
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=["-fopenmp", *shared_libstdcxx_link_args()],
    )
    if not build_cuda:
        return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)]
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return [CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                          **kwargs)]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(
    packages=find_packages(include=["confusion_kernels", "confusion_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)

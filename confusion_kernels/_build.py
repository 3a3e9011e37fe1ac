"""How the C++ / CUDA kernels are built: one set of rules for the two ways of building them.

- **Ahead of time**, by ``setup.py``, when torch is importable while the package is built
  (``pip install --no-build-isolation``, ``scripts/install.sh``): the extension module
  ``confusion_kernels._C`` sits in the package.
- **At first use**, when it was not: pip's defaults build in an isolated environment that
  cannot see the installed torch, and this package never asks pip for a second one (its
  build requirements are setuptools and wheel only). The first ``import confusion_kernels``
  then compiles the same sources with ``torch.utils.cpp_extension`` against the torch it runs
  with, printing one line while it builds, into a cache directory keyed by the torch, CUDA
  and Python versions and a hash of the sources and flags (``build_key``); every later import
  loads it from there. ``python -m confusion_kernels build`` does this ahead of time, and
  ``CONFUSION_KERNELS_JIT=0`` turns the build at import off (the cached or prebuilt kernels
  still load).

docs/building.md compares this with how flash-attn, DeepSpeed's ops and torch-scatter solve
the same problem. Nothing here imports torch at module level: ``setup.py`` loads this file by
its path, before torch may exist.

Environment (both ways):
  CONFUSION_KERNELS_NO_CUDA=1  skip the CUDA sources
  FORCE_CUDA=1                 fail if the CUDA sources cannot be built
  TORCH_CUDA_ARCH_LIST         GPU architectures; defaults to the visible GPU, else "8.0;9.0"
  MAX_JOBS                     parallel compile jobs (ninja)
  CONFUSION_KERNELS_CPU_FLAGS  extra flags for the C++ CPU kernels (default "-mavx2 -mfma"
                               when this x86-64 CPU has them; "" for baseline x86-64)
  CUDA_HOME                    CUDA toolkit root; found from nvcc when unset
  CONFUSION_KERNELS_CACHE      the first-use build cache (default
                               $XDG_CACHE_HOME/confusion_kernels or ~/.cache/confusion_kernels)
  CONFUSION_KERNELS_JIT=0      never compile at import
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_ARCH_LIST = "8.0;9.0"
SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")
JIT_NAME = "confusion_kernels_C"  # the first-use build's library (prebuilt: confusion_kernels._C)


def flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


# --- the toolchain -----------------------------------------------------------------------------

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


def nvcc_version(cuda_home: str) -> str | None:
    """The release nvcc under ``cuda_home`` reports, e.g. "13.0" (None if it cannot say)."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def compiler() -> str | None:
    """The C++ compiler a build would use ($CXX, else c++), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "c++"))


def cpu_vector_flags() -> list[str]:
    """SIMD flags for the CPU kernels: CONFUSION_KERNELS_CPU_FLAGS, else AVX2+FMA
    when this x86-64 machine has them (the kernels are built where they run)."""
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


def cuda_build_plan(apply: bool = True) -> tuple[bool, str]:
    """(build CUDA?, why) decided from torch's build and nvcc, never from a GPU. ``apply``: set
    CUDA_HOME and TORCH_CUDA_ARCH_LIST for torch's extension builder (only when building: an
    import that loads a cached build leaves the environment alone)."""
    import torch

    if flag("CONFUSION_KERNELS_NO_CUDA"):
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
    if apply:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()
    return True, f"CUDA {torch.version.cuda} with {cuda_home}"


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST if set, else the visible GPU's architecture, else "8.0;9.0"."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():  # only to pick the arch of the GPU in use
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return DEFAULT_ARCH_LIST


# --- the sources and flags ---------------------------------------------------------------------

def source_root() -> Path | None:
    """Where the C++ / CUDA sources are: ``_csrc`` inside an installed package (setup.py copies
    them there), else ``csrc`` of the checkout this package runs from."""
    package = Path(__file__).resolve().parent
    for root in (package / "_csrc", package.parent / "csrc"):
        if (root / "ops.cpp").is_file():
            return root
    return None


def sources(root: Path | str, cuda: bool) -> list[str]:
    """The translation units, relative to ``root``'s parent layout: ops.cpp, the CPU kernels,
    and with ``cuda`` the CUDA host code and kernels."""
    root = Path(root)
    files = [root / "ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if cuda:
        files += sorted((root / "cuda").glob("*.cpp")) + sorted((root / "cuda").glob("*.cu"))
    return [str(f) for f in files]


def compile_flags() -> dict[str, list[str]]:
    """The compiler flags of both builds: "cxx" (the CPU kernels and host code), "nvcc",
    "ldflags"."""
    # -fno-trapping-math: lets the vectoriser turn selects around divisions into blends (the
    # kernels never rely on floating-point traps); torch picks -std
    return {"cxx": ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                    *cpu_vector_flags()],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
            "ldflags": ["-fopenmp", *shared_libstdcxx_link_args()]}


def source_hash(root: Path | str) -> str:
    """sha256 of every source and header under ``root`` (paths and contents)."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_key(torch_version: str, cuda: str | None, python: tuple[int, int], digest: str,
              flags: dict[str, list[str]]) -> str:
    """The cache directory's name: a build is reused only by the same torch, CUDA and Python
    versions with the same sources and flags (anything else builds anew)."""
    extra = hashlib.sha256(repr(sorted(flags.items())).encode() + digest.encode()).hexdigest()
    kind = f"cuda{cuda}" if cuda else "cpu"
    safe_torch = re.sub(r"[^0-9A-Za-z.]+", "_", torch_version)
    return f"torch{safe_torch}-{kind}-py{python[0]}{python[1]}-{extra[:16]}"


def cache_dir() -> Path:
    """Where first-use builds live."""
    if os.environ.get("CONFUSION_KERNELS_CACHE"):
        return Path(os.environ["CONFUSION_KERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "confusion_kernels"


# --- the first-use build -----------------------------------------------------------------------

class JitResult:
    """The outcome of ``load_or_build``: the loaded library's path, or why there is none."""

    def __init__(self, library: str | None = None, error: str | None = None,
                 built_now: bool = False, directory: Path | None = None):
        self.library, self.error, self.built_now, self.directory = (library, error, built_now,
                                                                     directory)


def _plan(root: Path):
    """(with CUDA?, why, flags, build directory) for the sources under ``root``."""
    import torch

    cuda, why = cuda_build_plan(apply=False)
    if flag("FORCE_CUDA") and not cuda:
        raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}")
    flags = compile_flags()
    if cuda:
        flags["arch"] = [arch_list()]
    key = build_key(torch.__version__, torch.version.cuda if cuda else None,
                    sys.version_info[:2], source_hash(root), flags)
    return cuda, why, flags, cache_dir() / key


def load_or_build(build: bool = True, quiet: bool = False) -> JitResult:
    """Loads the first-use build for this torch from the cache, building it first when it is
    not there and ``build`` holds (one line on stderr while it builds, unless ``quiet``)."""
    root = source_root()
    if root is None:
        return JitResult(error="not built: this install has neither a compiled "
                               "confusion_kernels._C nor the C++ sources to build it")
    try:
        cuda, why, flags, directory = _plan(root)
    except RuntimeError as exc:
        return JitResult(error=f"not built: {exc}")
    library = directory / f"{JIT_NAME}.so"
    import torch

    if library.is_file():
        try:
            torch.ops.load_library(str(library))
            return JitResult(str(library), directory=directory)
        except OSError as exc:  # a damaged cache entry: build it again
            if not build:
                return JitResult(error=f"not loadable: {library}: {exc}")
    if not build:
        return JitResult(error="not built: no compiled confusion_kernels._C and no cached "
                               f"build for torch {torch.__version__}; building needs a C++ "
                               "compiler: `python -m confusion_kernels build` (the build at "
                               "import is off: CONFUSION_KERNELS_JIT=0)")
    if compiler() is None:
        return JitResult(error=f"not built: no C++ compiler ({os.environ.get('CXX', 'c++')}) "
                               "was found to build the kernels against the installed torch; "
                               "install one (e.g. `apt-get install g++`) and import again, or "
                               "run `python -m confusion_kernels build`")
    if shutil.which("ninja") is None:
        try:  # the ninja package's binary, when its venv's bin is not on PATH (not activated)
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except (ImportError, AttributeError):
            pass
    if shutil.which("ninja") is None:
        return JitResult(error="not built: ninja is missing (`pip install ninja`), which "
                               "torch.utils.cpp_extension needs to build the kernels")
    if not quiet:
        print(f"confusion_kernels: building the C++{' and CUDA' if cuda else ''} kernels for "
              f"torch {torch.__version__} (once; cached in {directory}) ...", file=sys.stderr,
              flush=True)
    if cuda:
        cuda_build_plan(apply=True)  # CUDA_HOME and the architectures for the builder
    directory.mkdir(parents=True, exist_ok=True)
    # (torch's extension builder logs a guess of CUDA_HOME when it is imported on a machine
    # without a GPU driver; the CUDA plan above has decided already: one line is ours to say)
    quiet_logger = logging.getLogger("torch.utils.cpp_extension")
    level = quiet_logger.level
    quiet_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet_logger.setLevel(level)

    try:
        path = cpp_extension.load(
            name=JIT_NAME, sources=sources(root, cuda), extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags["nvcc"] if cuda else None, extra_ldflags=flags["ldflags"],
            extra_include_paths=[str(root / "include")] + ([str(root / "cuda")] if cuda else []),
            build_directory=str(directory), with_cuda=cuda, is_python_module=False,
            verbose=False)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        text = str(exc).strip().splitlines()
        return JitResult(error=f"not built: the build in {directory} failed "
                               f"({text[-1] if text else type(exc).__name__})",
                         directory=directory)
    return JitResult(str(path), built_now=True, directory=directory)

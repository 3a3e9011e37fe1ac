"""Builds confusion-kernels: the Python package, the C++ / CUDA sources it ships, and, when
torch is importable at build time, the compiled extension confusion_kernels._C (C++ CPU
kernels always, CUDA kernels when torch is a CUDA build and nvcc is found; no GPU needed).

Two ways to install (docs/building.md):
  pip install .                          pip's defaults: the build cannot see your torch
                                         (build isolation) and never fetches a second one;
                                         the kernels compile once, at the first import,
                                         against the torch installed (confusion_kernels/_build.py)
  pip install --no-build-isolation .     torch present at build time: compiled now
                                         (scripts/install.sh does this)

The build switches (CONFUSION_KERNELS_NO_CUDA, FORCE_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS,
CONFUSION_KERNELS_CPU_FLAGS, CUDA_HOME) are described in confusion_kernels/_build.py, which
both ways share.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_rules():
    """confusion_kernels/_build.py by its path (importing the package would import torch)."""
    spec = importlib.util.spec_from_file_location(
        "_confusion_kernels_build", os.path.join(ROOT, "confusion_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rules = _load_build_rules()


def torch_importable() -> bool:
    return importlib.util.find_spec("torch") is not None


def extensions():
    if not torch_importable():
        if rules.flag("FORCE_CUDA"):
            raise RuntimeError("FORCE_CUDA=1 but torch is not importable while building (pip's "
                               "build isolation): install with --no-build-isolation")
        print("confusion_kernels: torch is not importable while building (pip's build "
              "isolation); the kernels will compile at the first import, against the torch "
              "installed then (`python -m confusion_kernels build` does it ahead of time)",
              file=sys.stderr)
        return []
    build_cuda, why = rules.cuda_build_plan()
    if rules.flag("FORCE_CUDA") and not build_cuda:
        raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}")
    print(f"confusion_kernels: CUDA kernels {'ON' if build_cuda else 'OFF'} ({why})",
          file=sys.stderr)

    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    flags = rules.compile_flags()
    kwargs = dict(
        name="confusion_kernels._C",
        sources=[os.path.relpath(s, ROOT) for s in rules.sources(os.path.join(ROOT, "csrc"),
                                                                 build_cuda)],
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=flags["ldflags"],
    )
    if not build_cuda:
        return [CppExtension(extra_compile_args={"cxx": flags["cxx"]}, **kwargs)]
    return [CUDAExtension(extra_compile_args={"cxx": flags["cxx"], "nvcc": flags["nvcc"]},
                          **kwargs)]


class BuildPyWithSources(build_py):
    """Also copies the C++ / CUDA sources into the package (confusion_kernels/_csrc), from
    which an install without a compiled _C builds the kernels at first use."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "confusion_kernels", "_csrc")
        source = os.path.join(ROOT, "csrc")
        for directory, _, files in os.walk(source):
            for name in files:
                if name.endswith(rules.SOURCE_SUFFIXES):
                    rel = os.path.relpath(os.path.join(directory, name), source)
                    os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
                    shutil.copy2(os.path.join(directory, name), os.path.join(target, rel))


def object_directory() -> str:
    """build/objects-<python>-<venv>: where the compiled objects of this interpreter's builds
    stay between builds. An editable install (pip install -e) otherwise compiles into a new
    temporary directory every time, so that each reinstall (scripts/install.sh with other
    extras) rebuilds every source, the CUDA ones included; here ninja recompiles only what
    changed: a source or a header it includes (ninja's depfiles), or the compile command (other
    flags, another torch)."""
    venv = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return os.path.join(ROOT, "build", f"objects-{sys.implementation.cache_tag}-{venv}")


def cmdclass():
    commands = {"build_py": BuildPyWithSources}
    if torch_importable():
        from torch.utils.cpp_extension import BuildExtension

        use_ninja = shutil.which("ninja") is not None

        class BuildExtensionKeepingObjects(BuildExtension.with_options(use_ninja=use_ninja)):
            def finalize_options(self):
                super().finalize_options()
                if use_ninja:  # (without ninja nothing is incremental: the default stays)
                    self.build_temp = object_directory()

        commands["build_ext"] = BuildExtensionKeepingObjects
    return commands


setup(
    packages=find_packages(include=["confusion_kernels", "confusion_kernels.*"]),
    ext_modules=extensions(),
    cmdclass=cmdclass(),
)

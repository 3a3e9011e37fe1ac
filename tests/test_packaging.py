"""The distribution: one version string, the license and py.typed shipped, every C++ / CUDA
source and header in the sdist (it could not build without them)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with tomllib (Python 3.11+)")

import confusion_kernels

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version_string():
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    attr = _pyproject()["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "confusion_kernels.__version__"
    assert confusion_kernels.__version__.count(".") == 2


def test_license_and_typing_marker_ship():
    project = _pyproject()["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "confusion_kernels" / "py.typed").exists()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["confusion_kernels"]
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")


def test_sdist_holds_every_source(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "csrc"], capture_output=True, text=True,
                             cwd=ROOT)
    if tracked.returncode != 0:
        pytest.skip("needs a git checkout (the list of tracked sources)")
    sources = {p for p in tracked.stdout.split() if p.endswith((".h", ".cuh", ".cpp", ".cu"))}
    # an sdist compiles nothing: no CUDA plan is needed (and FORCE_CUDA=1, which CI's pinned
    # stage exports, would refuse CONFUSION_KERNELS_NO_CUDA=1)
    env = {k: v for k, v in __import__("os").environ.items() if k != "FORCE_CUDA"}
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**env, "CONFUSION_KERNELS_NO_CUDA": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert sources <= names, sorted(sources - names)
    assert {"LICENSE", "README.md", "CHANGELOG.md", "confusion_kernels/py.typed",
            "setup.py", "pyproject.toml"} <= names
    assert not any(n.endswith(".so") for n in names)


# --- the first-use build (confusion_kernels/_build.py) ----------------------------------------

def _rules():
    from confusion_kernels import _build

    return _build


def test_build_key_separates_what_must_not_share_a_build():
    build = _rules()
    flags = {"cxx": ["-O3"], "nvcc": []}
    key = build.build_key("2.15.0+cu132", None, (3, 11), "a" * 64, flags)
    others = [build.build_key("2.14.1+cu132", None, (3, 11), "a" * 64, flags),
              build.build_key("2.15.0+cu132", "13.2", (3, 11), "a" * 64, flags),
              build.build_key("2.15.0+cu132", None, (3, 12), "a" * 64, flags),
              build.build_key("2.15.0+cu132", None, (3, 11), "b" * 64, flags),
              build.build_key("2.15.0+cu132", None, (3, 11), "a" * 64, {"cxx": ["-O2"], "nvcc": []})]
    assert len({key, *others}) == 6
    assert key == build.build_key("2.15.0+cu132", None, (3, 11), "a" * 64, dict(flags))
    assert "/" not in key and key.startswith("torch2.15.0_cu132-cpu-py311-")


def test_source_hash_follows_every_source_and_header(tmp_path):
    import shutil

    build = _rules()
    root = build.source_root()
    assert root is not None and (root / "include" / "confusion_kernels" / "spec.h").is_file()
    copy = tmp_path / "csrc"
    shutil.copytree(root, copy)
    before = build.source_hash(copy)
    assert before == build.source_hash(root)
    header = copy / "include" / "confusion_kernels" / "pair_math.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert build.source_hash(copy) != before
    assert all(s.startswith(str(root)) for s in build.sources(root, cuda=True))
    assert sum(s.endswith(".cu") for s in build.sources(root, cuda=True)) >= 1
    assert not any(s.endswith(".cu") for s in build.sources(root, cuda=False))


def test_cache_location_and_switches(monkeypatch, tmp_path):
    build = _rules()
    monkeypatch.setenv("CONFUSION_KERNELS_CACHE", str(tmp_path / "c"))
    assert build.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CONFUSION_KERNELS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_dir() == tmp_path / "xdg" / "confusion_kernels"
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert build.compiler() is None
    monkeypatch.setenv("CONFUSION_KERNELS_CACHE", str(tmp_path / "empty"))
    result = build.load_or_build(build=True, quiet=True)
    assert result.library is None and "no C++ compiler" in result.error
    result = build.load_or_build(build=False, quiet=True)
    assert result.library is None and "CONFUSION_KERNELS_JIT=0" in result.error
    assert not (tmp_path / "empty").exists()


def test_setup_needs_no_torch_to_build():
    """pyproject's build requirements hold no torch (pip's build isolation would fetch a second
    one); setup.py builds a pure package with the sources when torch is not importable."""
    requires = _pyproject()["build-system"]["requires"]
    assert not any(r.split(">")[0].split("=")[0].strip() == "torch" for r in requires), requires
    assert any(d.startswith("ninja") for d in _pyproject()["project"]["dependencies"])
    setup_py = (ROOT / "setup.py").read_text()
    assert "_csrc" in setup_py and "torch_importable" in setup_py


def test_loading_a_cached_build_leaves_the_environment_alone(monkeypatch):
    """Working out the cache key (every import of an install without a prebuilt _C) set
    CUDA_HOME and TORCH_CUDA_ARCH_LIST in the user's process; only a build may set them."""
    import os

    build = _rules()
    for name in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    cuda, _, flags, directory = build._plan(build.source_root())
    assert "CUDA_HOME" not in os.environ and "TORCH_CUDA_ARCH_LIST" not in os.environ
    assert directory.parent == build.cache_dir()
    if cuda:
        assert flags["arch"] == [build.arch_list()]

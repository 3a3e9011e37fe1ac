"""Backend discovery and selection."""

import pytest
import torch

import confusion_kernels as ck
from confusion_kernels import _backend, _build, _extension


def test_available_backends_tell_the_truth():
    backends = ck.available_backends()
    assert backends[0] == "reference"
    assert set(backends) <= set(ck.BACKENDS)
    x = torch.randn(5, 2, dtype=torch.float64,
                    device="cuda" if torch.cuda.is_available() else "cpu")
    y = torch.tensor([0, 0, 1, 1, 2], device=x.device)
    want = ck.reference.intra_inter_sums(x.cpu(), y.cpu())
    listed = ck.available_backends(x.device)
    assert "reference" in listed
    for backend in listed:  # every listed backend runs, and gives the reference's sums
        s_in, s_out = ck.intra_inter_sums(x, y, backend=backend)
        torch.testing.assert_close(s_in.cpu(), want[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s_out.cpu(), want[1], rtol=1e-10, atol=1e-12)
    for backend in set(ck.BACKENDS) - set(listed):  # every unlisted one refuses, saying why
        with pytest.raises(RuntimeError, match=f"backend='{backend}' cannot run"):
            ck.intra_inter_sums(x, y, backend=backend)
    assert ("cpu" in backends) == _extension.HAS_C


def test_auto_picks_the_fastest_for_the_device(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x = torch.randn(4, 2)
    expected = "cpu" if _extension.HAS_C else "reference"
    assert ck.select_backend(x) == expected
    if torch.cuda.is_available():
        cuda_choice = ck.select_backend(x.cuda())
        assert cuda_choice == ("cuda" if _extension.has_kernel("intra_inter_sums", "CUDA") else "triton")


def test_environment_variable_overrides_auto(monkeypatch):
    x = torch.randn(4, 2)
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert ck.select_backend(x) == "reference"
    if _extension.HAS_C:  # the variable replaces "auto" only: an explicit backend wins
        assert ck.select_backend(x, "cpu") == "cpu"
    # and it reaches the ops: a backend that cannot run there is refused through it
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")  # x is on the CPU: never runnable
    with pytest.raises(RuntimeError, match="CONFUSION_KERNELS_BACKEND='"):
        ck.intra_inter_sums(x, torch.tensor([0, 0, 1, 1]))
    monkeypatch.setenv(_backend.ENV_VAR, "bogus")
    with pytest.raises(RuntimeError, match="CONFUSION_KERNELS_BACKEND='bogus'"):
        ck.select_backend(x)


def test_build_without_cuda_is_reported():
    if _extension.has_kernel("intra_inter_sums", "CUDA"):
        pytest.skip("this build has CUDA kernels")
    reason = _backend.unavailable_reason("cuda", torch.device("cpu"))
    assert "without CUDA kernels" in reason or "not built" in reason


# How the child process loses the compiled kernels: an import of the prebuilt _C that fails
# (built against another torch, say), or an install that never built it (find_spec finds
# nothing) and then, with an empty first-use cache, either does not build at import
# (CONFUSION_KERNELS_JIT=0) or finds no C++ compiler.
_NEVER_BUILT = ("import importlib.util\nreal = importlib.util.find_spec\n"
                "importlib.util.find_spec = lambda name, *a: None if name == "
                "'confusion_kernels._C' else real(name, *a)\n")
HIDE_EXTENSION = {
    "import fails": ('import importlib.util, sys\nreal = importlib.util.find_spec\n'
                     'importlib.util.find_spec = lambda name, *a: object() if name == '
                     '"confusion_kernels._C" else real(name, *a)\n'
                     'sys.modules["confusion_kernels._C"] = None\n',
                     {"CONFUSION_KERNELS_JIT": "0"}, "the prebuilt confusion_kernels._C does "
                                                     "not import (ModuleNotFoundError"),
    "never built": (_NEVER_BUILT, {"CONFUSION_KERNELS_JIT": "0"}, "building needs a C++ compiler"),
    "no compiler": (_NEVER_BUILT, {"CXX": "/nonexistent/c++"}, "no C++ compiler"),
}


@pytest.mark.parametrize("how", sorted(HIDE_EXTENSION))
def test_without_the_extension_the_package_warns_once_and_runs_the_reference(how, tmp_path):
    """With no compiled kernels the package still imports (one warning), reports the truth
    and runs on the reference backend; backend='cpu' says why it cannot run. An install that
    never built _C warned of a "circular import" (Python's message for a missing submodule
    while its package imports); now it says "not built" and how to build."""
    import subprocess
    import sys
    import textwrap

    hide, env_flags, says = HIDE_EXTENSION[how]
    code = hide + textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import confusion_kernels as ck
        texts = [str(w.message) for w in caught if "compiled kernels" in str(w.message)]
        assert len(texts) == 1, texts
        assert "circular" not in texts[0], texts[0]
        assert ck.available_backends() in (["reference"], ["reference", "triton"])
        x = torch.randn(6, 3); y = torch.tensor([0, 0, 1, 1, 2, 2])
        assert ck.select_backend(x) == "reference"
        s_in, _ = ck.intra_inter_sums(x, y)
        try:
            ck.intra_inter_sums(x, y, backend="cpu")
        except RuntimeError as e:
            assert "not built" in str(e), str(e)
            print("error:", e)
        else:
            raise AssertionError("backend='cpu' ran without the extension")
        print("warning:", texts[0])
        print("ok")
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != _backend.ENV_VAR}
    env.update(env_flags, CONFUSION_KERNELS_CACHE=str(tmp_path / "empty-cache"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
    assert says in proc.stdout and "not built" in proc.stdout, proc.stdout
    assert not (tmp_path / "empty-cache").exists()  # nothing was compiled


def test_info_command_says_what_available_backends_says():
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != _backend.ENV_VAR}
    out = subprocess.run([sys.executable, "-m", "confusion_kernels", "info"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert f"confusion_kernels {ck.__version__}" in text and f"torch {torch.__version__}" in text
    assert f"first-use build cache: {_build.cache_dir()}" in text
    if _extension.HAS_C:
        assert f"compiled kernels: {_extension.LIBRARY}" in text
    section = text.split("backends for cpu tensors")[1].split("backends for")[0]
    listed = [line.split()[0] for line in section.splitlines()[1:] if line.strip()]
    assert listed == list(ck.BACKENDS)
    for backend in ck.BACKENDS:
        line = next(ln for ln in section.splitlines() if ln.strip().startswith(backend + " "))
        why = _backend.unavailable_reason(backend, torch.device("cpu"))
        assert ("available" in line) if why is None else (why in line), line
    bad = subprocess.run([sys.executable, "-m", "confusion_kernels", "info", "--bogus"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2

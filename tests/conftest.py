"""Shared test setup.

Without a CUDA device, Triton kernels run through Triton's CPU interpreter:
TRITON_INTERPRET must be set before triton (and so the package) is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from confusion_kernels import _backend, _spec  # noqa: E402

KERNEL_BACKENDS = ("cpu", "triton", "cuda")


def backend_device(backend: str) -> torch.device:
    """Where a backend's tensors live in these tests."""
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "triton" and not torch.cuda.is_available():
        return torch.device("cpu")  # interpreter
    return torch.device("cuda")


def require_backend(backend: str, op: str = "intra_inter_sums") -> torch.device:
    """The backend's device, or skip the test saying why the backend cannot run ``op``."""
    device = backend_device(backend)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"backend {backend!r} needs CUDA: no CUDA device is available")
    reason = _backend.unavailable_reason(backend, device, op)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
    return device


def interpreted(backend: str) -> bool:
    return backend == "triton" and not torch.cuda.is_available()


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """|actual - expected|_2 / |expected|_2 (absolute when expected is 0)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "",
               atol: float | None = None) -> None:
    """|actual - expected|_2 <= tol * |expected|_2 + atol (atol defaults to tol: an
    absolute floor for results that are 0 up to the reference's rounding)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    atol = tol if atol is None else atol
    diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).norm().item()
    bound = tol * expected.detach().double().norm().item() + atol
    assert diff <= bound, (f"{what}: error {diff:.3e} > bound {bound:.3e} "
                           f"(relative {rel_error(actual, expected):.3e}, tol {tol:.1e})")


def make_batch(n: int, d: int, num_classes: int, *, seed: int, dtype=torch.float64,
               device="cpu", duplicates: bool = True, scale: float = 1.0):
    """Random embeddings and labels; with duplicates, a few rows repeat others
    (in the same class and across classes) so zero distances occur."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, num_classes, (n,), generator=g)
    if duplicates and n >= 4:
        x[n // 2] = x[0]  # duplicate, label possibly different
        x[n - 1] = x[1]
        labels[n - 1] = labels[1]  # a same-class duplicate
    return x.to(device=device, dtype=dtype), labels.to(device)


ALL_METRICS = _spec.PAIR_METRICS  # every pair metric, in code order


def _public_losses():
    import confusion_kernels as ck

    modules = tuple(sorted(n for n in ck.__all__ if n.endswith("Loss")
                           and isinstance(getattr(ck, n), type)
                           and issubclass(getattr(ck, n), torch.nn.Module)))
    functions = tuple(sorted(n for n in ck.__all__ if n.endswith("_loss")
                             and callable(getattr(ck, n))))
    return modules, functions


# Every public loss module and loss function, read off the package: the guarantee tests are
# parametrised over these, so a new loss without its case there fails (tests/test_coverage.py).
LOSS_MODULES, LOSS_FUNCTIONS = _public_losses()
OPS = ("intra_inter_sums",)  # public ops that are not losses


def pytest_runtest_logreport(report):
    """With CK_FAILURE_LOG=<file>, every failure's traceback is appended to the file
    as soon as it happens (the GPU routine's calls are cut by time limits before
    pytest prints its summary)."""
    path = os.environ.get("CK_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"\n######## {report.nodeid} ({report.when}, {report.duration:.1f} s)\n")
            f.write(report.longreprtext[-6000:] + "\n")

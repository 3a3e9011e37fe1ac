"""No host synchronisation on the default GPU path (docs/design.md, "Host synchronisation").

Without a GPU nothing can wait for one, so the GPU path's Python runs here on CPU tensors
as a GPU's would be treated (``_CheckPolicy.cpu_as_gpu``: the data checks are left to the
kernels) under ``forbid_host_sync`` (tests/host_sync.py), which raises on every operation
that reads a device value on the host or sizes an output from the data. The Triton kernels
run in the interpreter (exempt: on a GPU that is the kernel). The CUDA C++ ops' host code is
read for the same operations (``test_cuda_host_code_has_no_sync_calls``).
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import confusion_kernels as ck
from confusion_kernels import _validation
from confusion_kernels.reference import n_centroids as ncl

from conftest import require_backend
from host_sync import HostSyncError, forbid_host_sync

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def as_on_gpu(monkeypatch):
    """CPU tensors get the data checks of GPU tensors (none on the host)."""
    monkeypatch.setattr(_validation._CheckPolicy, "cpu_as_gpu", True)
    monkeypatch.setattr(_validation._CheckPolicy, "strict", False)


def _triton() -> torch.device:
    return require_backend("triton")


# ---------------------------------------------------------------------------
# The guard itself can fail
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda t: t.sum().item(),
    lambda t: bool((t > 0).any()),
    lambda t: t.tolist(),
    lambda t: torch.nonzero(t),
    lambda t: torch.unique(t),
    lambda t: t[t > 0],
    lambda t: torch.bincount((t > 0).long()),
    lambda t: float(t.sum()),
    lambda t: int(t.argmax()),
], ids=["item", "bool", "tolist", "nonzero", "unique", "mask-index", "bincount", "float", "int"])
def test_guard_catches_syncs(call):
    t = torch.randn(7)
    with pytest.raises(HostSyncError):
        with forbid_host_sync():
            call(t)


def test_guard_lets_device_work_through():
    t = torch.randn(7, 3)
    with forbid_host_sync():
        out = (t @ t.T).relu().sum(1).sort().values.cumsum(0)
        torch.where(out > 0, out, 0.0).index_add_(0, torch.arange(7) % 2, out)
    assert out.shape == (7,)


# ---------------------------------------------------------------------------
# The default paths, forward and backward, under the guard
# ---------------------------------------------------------------------------
def _rows(n: int, d: int, classes: int, seed: int, duplicates: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    if duplicates:  # zero distances and near pairs: the exact branches run too
        x[1] = x[0]
        y[1] = y[0]
    return x, y


def _training_step(loss_fn, x, *args):
    x = x.clone().requires_grad_(True)
    loss = loss_fn(x, *args)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "manhattan",
                                    "smooth_l1"])
def test_intra_inter_sums(as_on_gpu, metric):
    device = _triton()
    x, y = _rows(37, 16, 4, 0)
    with forbid_host_sync():
        _, grad = _training_step(
            lambda x: sum(s.sum() for s in ck.intra_inter_sums(x.to(device), y.to(device),
                                                               metric, backend="triton")), x)
    assert torch.isfinite(grad).all()


def test_intra_inter_sums_against_a_reference_set(as_on_gpu):
    device = _triton()
    x, y = _rows(21, 16, 3, 1)
    ref, ref_y = _rows(33, 16, 3, 2)
    with forbid_host_sync():
        s_in, s_out = ck.intra_inter_sums(x.to(device), y.to(device), "euclidean",
                                          backend="triton", ref=ref.to(device),
                                          ref_labels=ref_y.to(device))
    assert s_in.shape == s_out.shape == (21,)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "manhattan"])
def test_as_loss_training_step(as_on_gpu, metric):
    device = _triton()
    x, y = _rows(40, 16, 5, 3)
    module = ck.ASLoss(metric=metric, backend="triton")
    with forbid_host_sync():
        loss, grad = _training_step(module, x.to(device), y.to(device))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_as_loss_with_a_memory(as_on_gpu):
    device = _triton()
    x, y = _rows(24, 16, 4, 4)
    memory = ck.CrossBatchMemory(64, 16)
    module = ck.ASLoss(backend="triton", memory=memory)
    with forbid_host_sync():
        _training_step(module, x.to(device), y.to(device))
        loss, grad = _training_step(module, x.to(device), y.to(device))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("num_centers,similarity", [(1, "gaussian"), (3, "inverse")])
def test_affinity_loss_training_step(as_on_gpu, num_centers, similarity):
    device = _triton()
    x, y = _rows(33, 16, 4, 5)
    module = ck.AffinityLoss(4, 16, num_centers=num_centers, similarity=similarity,
                             backend="triton").to(device)
    with forbid_host_sync():
        loss, grad = _training_step(module, x.to(device), y.to(device))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.isfinite(module.prototypes.grad).all()


@pytest.mark.parametrize("metric", ["great_circle", "euclidean", "cosine"])
@pytest.mark.parametrize("use_negatives", [True, False])
def test_n_centroids_training_step(as_on_gpu, metric, use_negatives):
    device = _triton()
    x, y = _rows(35, 16, 4, 6)
    module = ck.NCentroidsLoss(4, 16, metric=metric, use_negatives=use_negatives,
                               backend="triton").to(device)
    x[2] = module.centroids[(y[2] + 1) % 4]  # a row on another class's centroid: a near pair
    before = module.centroids.clone()
    with forbid_host_sync():
        loss, grad = _training_step(module, x.to(device), y.to(device))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert not torch.equal(module.centroids, before)  # the EMA step ran


def _pair_loss_step(fn, **params):
    """The Triton kernels (what auto runs on a GPU) and the reference: a reference set, a
    one-sample class and duplicates (the euclidean difference form) included."""
    device = _triton()
    x, y = _rows(30, 8, 5, 8)
    ref, ref_y = _rows(11, 8, 5, 9, duplicates=False)
    y[3] = 7  # a class with one sample and no reference
    for backend in ("triton", "reference"):
        for metric in ("euclidean", "cosine"):
            for args in ((y,), (y, ref, ref_y)):
                args = tuple(t.to(device) for t in args)
                with forbid_host_sync():
                    loss, grad = _training_step(
                        lambda a, *rest: fn(a, *rest, backend=backend, metric=metric, **params),
                        x.to(device), *args)
                assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_contrastive_loss_training_step(as_on_gpu):
    _pair_loss_step(ck.contrastive_loss, pos_margin=0.1, neg_margin=0.9)


def test_supcon_loss_training_step(as_on_gpu):
    _pair_loss_step(ck.supcon_loss)


def test_ntxent_loss_training_step(as_on_gpu):
    _pair_loss_step(ck.ntxent_loss)


def test_multi_similarity_loss_training_step(as_on_gpu):
    _pair_loss_step(ck.multi_similarity_loss)


def test_class_statistics_update(as_on_gpu):
    device = _triton()
    x, y = _rows(50, 24, 5, 7)
    stats = ck.ClassStatistics(5, 24, device=device)
    with forbid_host_sync():
        stats.update(x.to(device), y.to(device), backend="triton")
        stats.update(x.to(device), y.to(device), backend="triton")
    expected = ck.ClassStatistics(5, 24).update(x, y, backend="torch").update(x, y,
                                                                                backend="torch")
    torch.testing.assert_close(stats.mean.cpu(), expected.mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", [16, 64, 130])  # orders 7, 31 (series / recurrence), 64 (Debye)
def test_confidence_heads(as_on_gpu, dim):
    x = ncl.normalize(torch.randn(30, dim, dtype=torch.float64))
    mu = ncl.normalize(torch.randn(30, dim, dtype=torch.float64))
    kappa = torch.logspace(-2, 4, 30, dtype=torch.float64).requires_grad_(True)
    log_sigma = torch.randn(30, 1, dtype=torch.float64, requires_grad=True)
    with forbid_host_sync():
        total = ck.vmf_nll(x, mu, kappa).sum() + ck.gaussian_nll(x, mu, log_sigma).sum()
        total.backward()
    assert torch.isfinite(kappa.grad).all() and torch.isfinite(log_sigma.grad).all()
    with torch.no_grad():  # bad concentrations: NaN rows instead of an error
        bad = kappa.detach().clone()
        bad[[3, 7]] = torch.tensor([0.0, -1.0], dtype=torch.float64)
        assert ck.vmf_nll(x, mu, bad).isnan().nonzero().flatten().tolist() == [3, 7]


# ---------------------------------------------------------------------------
# What bad input does without the host checks, and with them
# ---------------------------------------------------------------------------
def test_labels_out_of_range_give_nan_rows_not_an_error(as_on_gpu):
    device = _triton()
    f, y = _rows(20, 16, 4, 8, duplicates=False)
    y[3], y[11] = 4, -1
    prototypes = torch.randn(4, 2, 16)
    rows, _, _ = torch.ops.confusion_kernels.affinity_hinge_triton(
        f.to(device), prototypes.to(device), y.to(device), 10.0, 0.5, "gaussian")
    bad = torch.zeros(20, dtype=torch.bool)
    bad[[3, 11]] = True
    assert rows.isnan().cpu().equal(bad)
    z = ncl.normalize(f)
    rows, hardest = torch.ops.confusion_kernels.n_centroids_rows_triton(
        z.to(device), ncl.normalize(torch.randn(4, 16)).to(device), y.to(device),
        "great_circle", True)
    assert rows.isnan().cpu().equal(bad)
    assert ((hardest >= 0) & (hardest < 4)).all()  # clamped: never an index out of bounds
    loss = ck.affinity_loss(f.to(device), y.to(device), prototypes.to(device), backend="triton")
    assert loss.isnan()


def test_non_finite_input_gives_nan_without_the_scan(as_on_gpu):
    device = _triton()
    x, y = _rows(20, 16, 3, 9)
    x[5, 2] = float("nan")
    with forbid_host_sync():
        loss = ck.as_loss(x.to(device), y.to(device), backend="triton")
    assert loss.isnan()
    with pytest.raises(ValueError, match="NaN or Inf"):  # asked for: scanned
        ck.as_loss(x.to(device), y.to(device), backend="triton", check_finite=True)


def test_strict_checks_raise_on_every_device(as_on_gpu):
    device = _triton()
    f, y = _rows(20, 16, 4, 10, duplicates=False)
    y[0] = 7
    with ck.strict_checks():
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
            ck.affinity_loss(f.to(device), y.to(device), torch.randn(4, 1, 16).to(device),
                             backend="triton")
        nan = f.clone()
        nan[0, 0] = float("inf")
        with pytest.raises(ValueError, match="NaN or Inf"):
            ck.intra_inter_sums(nan.to(device), y.to(device), backend="triton")
    assert not _validation._CheckPolicy.strict  # restored


def test_cpu_tensors_keep_the_host_checks():
    f, y = _rows(20, 16, 4, 11, duplicates=False)
    y[0] = 7
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        ck.affinity_loss(f, y, torch.randn(4, 1, 16), backend="reference")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ck.intra_inter_sums(torch.full((3, 2), float("nan")), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------
# The CUDA ops' host code
# ---------------------------------------------------------------------------
# Calls that read a device value on the host, or size an output from the data.
SYNC_CALLS = re.compile(r"\.item\s*<|\.item\(\)|\.cpu\(\)|\bnonzero\b|_unique2?\b|\bunique_|"
                        r"\bmasked_select\b|\bbincount\b|\.tolist\(|is_nonzero|\.to\(at::kCPU|"
                        r"_local_scalar_dense")


def _cuda_host_sources() -> list[pathlib.Path]:
    """The C++ the CUDA ops run on the host: csrc/cuda and the shared headers."""
    files = sorted((ROOT / "csrc" / "cuda").glob("*"))
    files += sorted((ROOT / "csrc" / "include" / "confusion_kernels").glob("*.h"))
    return [f for f in files if f.suffix in (".cpp", ".cu", ".cuh", ".h")]


def test_cuda_host_code_has_no_sync_calls():
    found = []
    for path in _cuda_host_sources():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//")[0]
            # check_label_range reads on the host and refuses anything but CPU tensors
            if SYNC_CALLS.search(code) and "labels.min().item" not in code:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "host synchronisation in the CUDA ops' host code:\n" + "\n".join(found)
    assert len(_cuda_host_sources()) > 10  # the scan reads the sources it should


def test_the_host_code_scan_can_fail(tmp_path):
    assert SYNC_CALLS.search("const auto u = at::_unique2(labels, true, true);")
    assert SYNC_CALLS.search("int64_t k = t.max().item<int64_t>();")
    assert not SYNC_CALLS.search("at::Tensor bad = labels.lt(0);")


# ---------------------------------------------------------------------------
# On a real GPU (skipped here): CUDA's own sync detector, and the C++ guard
# ---------------------------------------------------------------------------
def _cuda_or_skip(backend: str, op: str) -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: no CUDA device is available")
    return require_backend(backend, op)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_sync_on_a_gpu(backend):
    """torch.cuda.set_sync_debug_mode("error") raises on every synchronising CUDA call,
    C++ ops included."""
    device = _cuda_or_skip(backend, "affinity_hinge")
    x, y = _rows(300, 64, 7, 12)
    x, y = x.to(device), y.to(device)
    modules = [ck.ASLoss(backend=backend), ck.AffinityLoss(7, 64, num_centers=2, backend=backend),
               ck.NCentroidsLoss(7, 64, backend=backend)]
    modules = [m.to(device) for m in modules]
    for module in modules:  # once outside: lazy initialisation (cuBLAS handles, caches)
        _training_step(module, x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for module in modules:
            _training_step(module, x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_ops_give_nan_rows_for_labels_out_of_range():
    device = _cuda_or_skip("cuda", "affinity_hinge")
    f, y = _rows(20, 16, 4, 13, duplicates=False)
    y[3], y[11] = 4, -1
    bad = torch.zeros(20, dtype=torch.bool)
    bad[[3, 11]] = True
    rows, _, _ = torch.ops.confusion_kernels.affinity_hinge(
        f.to(device), torch.randn(4, 2, 16, device=device), y.to(device), 10.0, 0.5, "gaussian")
    assert rows.isnan().cpu().equal(bad)
    rows, hardest = torch.ops.confusion_kernels.n_centroids_rows(
        ncl.normalize(f).to(device), ncl.normalize(torch.randn(4, 16)).to(device), y.to(device),
        "great_circle", True)
    assert rows.isnan().cpu().equal(bad)
    assert ((hardest >= 0) & (hardest < 4)).all()
    torch.cuda.synchronize()  # no device assert was raised

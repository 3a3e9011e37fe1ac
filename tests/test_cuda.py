"""GPU-only checks of the cuda and triton backends (skipped without CUDA).

The CPU-side suites (test_intra_inter_sums.py, test_as_loss.py, ...) already
run every backend, cuda and triton on the GPU included, when a GPU is present.
"""

import pytest
import torch

import confusion_kernels as ck
from conftest import ALL_METRICS, make_batch, rel_error, require_backend

GPU_BACKENDS = ("cuda", "triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no CUDA device")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_bitwise_deterministic(backend, metric):
    device = require_backend(backend)
    x, labels = make_batch(3000, 40, 7, seed=1, device=device, dtype=torch.float32)
    results = []
    for _ in range(2):
        xr = x.clone().requires_grad_(True)
        s_in, s_out = ck.intra_inter_sums(xr, labels, metric, backend=backend)
        (s_in * 0.3 - s_out).sum().backward()
        results.append((s_in, s_out, xr.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def low_precision_reference(x: torch.Tensor, labels: torch.Tensor, metric: str):
    """The reference computed in x's own dtype (fp16/bf16): torch.cdist has no
    such CUDA kernel, so the distances are written out from differences."""
    if metric == "cosine":
        dist = ck.reference.pairwise_distances(x, metric=metric)
    else:
        diff = x[:, None, :] - x[None, :, :]
        if metric == "manhattan":
            dist = diff.abs().sum(-1)
        else:
            dist = diff.square().sum(-1)
            dist = dist.sqrt() if metric == "euclidean" else dist
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.where(same & ~eye, dist, 0).sum(1), torch.where(same, 0, dist).sum(1)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "manhattan", "cosine"])
def test_low_precision_within_twice_reference_error(backend, dtype, metric):
    """Error vs float64 at most 2x that of the reference computed in the same dtype
    (sizes kept small enough that the fp16 reference's sums do not overflow)."""
    device = require_backend(backend)
    x64, labels = make_batch(512, 16, 8, seed=2, device=device)
    x = x64.to(dtype)
    exact = ck.reference.intra_inter_sums(x64, labels, metric)
    ref_low = low_precision_reference(x, labels, metric)
    ours = ck.intra_inter_sums(x, labels, metric, backend=backend)
    for o, r, e in zip(ours, ref_low, exact):
        assert torch.isfinite(r).all()
        assert rel_error(o, e) <= 2 * rel_error(r, e)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n,d", [(65536, 128), (1048576, 2)])
def test_memory_linear_in_n(backend, n, d):
    """Peak memory of forward + backward stays within a bound linear in N*D."""
    device = require_backend(backend)
    x = torch.randn(n, d, device=device)
    labels = torch.randint(0, 1000, (n,), device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    xr = x.clone().requires_grad_(True)
    s_in, s_out = ck.intra_inter_sums(xr, labels, "euclidean", backend=backend, check_finite=False)
    (s_in - s_out).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    bound = 16 * (n * d * 4) + 64 * n + 2**20  # a handful of [N, D] and [N] buffers
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    assert torch.isfinite(xr.grad).all()


def test_cuda_gradcheck_on_device():
    require_backend("cuda")
    x, labels = make_batch(11, 5, 3, seed=3, device="cuda", duplicates=False)
    x.requires_grad_(True)
    for metric in ALL_METRICS:
        assert torch.autograd.gradcheck(
            lambda inp: ck.intra_inter_sums(inp, labels, metric, backend="cuda"), (x,),
            eps=1e-6, atol=1e-7, rtol=1e-6)

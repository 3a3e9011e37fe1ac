"""pytest-benchmark timings of intra_inter_sums, fwd+bwd (not part of the test suite).

    python -m pytest benchmarks/test_bench_intra_inter_sums.py --benchmark-only

Side-by-side tables with peak memory and plots: run_intra_inter_sums.py.
"""

import pytest
import torch

import confusion_kernels as ck

CASES = [(1024, 64), (4096, 2), (4096, 64)]


def fwd_bwd(x, labels, metric, backend):
    xr = x.detach().requires_grad_(True)
    s_in, s_out = ck.intra_inter_sums(xr, labels, metric, backend=backend, check_finite=False)
    torch.autograd.backward((s_in, s_out), (torch.ones_like(s_in), -torch.ones_like(s_out)))
    return xr.grad


@pytest.mark.parametrize("n,d", CASES)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("metric", ["euclidean", "manhattan", "cosine"])
def test_intra_inter_sums_fwd_bwd(benchmark, backend, metric, n, d):
    if backend not in ck.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    benchmark.group = f"{metric} N={n} D={d}"
    benchmark(fwd_bwd, x, labels, metric, backend)

"""The KeOps peer of the GPU benchmark computes what the reference computes
(values and gradients, duplicates included). Not part of the test suite:
pykeops is optional and compiles each formula on first use.

    python -m pytest benchmarks/test_keops_peer.py
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import keops_peer  # noqa: E402

import confusion_kernels as ck  # noqa: E402

METRICS = ["euclidean", "sqeuclidean", "manhattan", "smooth_l1", "cosine"]


@pytest.mark.skipif(keops_peer.available() is not None, reason=str(keops_peer.available()))
@pytest.mark.parametrize("metric", METRICS)
def test_keops_peer_matches_reference(metric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (300,), generator=g)
    x[10], y[10] = x[0], y[0]  # a duplicate: distance 0, gradient 0
    xk, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = keops_peer.intra_inter_sums(xk, y, metric)
    want = ck.reference.intra_inter_sums(xr, y, metric)
    (got[0] - 0.5 * got[1]).sum().backward()
    (want[0] - 0.5 * want[1]).sum().backward()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xk.grad, xr.grad, rtol=1e-10, atol=1e-10)

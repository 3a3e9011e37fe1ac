"""Hypothesis property tests: the CPU kernel equals the reference on random
shapes, labels, metrics and scales."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import confusion_kernels as ck
from conftest import ALL_METRICS, assert_rel, require_backend


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 90), d=st.integers(1, 20), classes=st.integers(1, 6),
       metric=st.sampled_from(ALL_METRICS), scale=st.sampled_from([1e-3, 1.0, 50.0]),
       seed=st.integers(0, 2**31 - 1), duplicate_rows=st.integers(0, 5))
def test_cpu_kernel_matches_reference(n, d, classes, metric, scale, seed, duplicate_rows):
    require_backend("cpu")
    if metric == "cosine" and d == 1:
        d = 2  # 1-D cosine is degenerate (see test_cosine_in_one_dimension)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, classes, (n,), generator=g)
    for k in range(min(duplicate_rows, n - 1)):
        x[k + 1] = x[0]
    grads = torch.randn(2, n, generator=g, dtype=torch.float64)
    results = []
    for backend in ("reference", "cpu"):
        xb = x.clone().requires_grad_(True)
        s_in, s_out = ck.intra_inter_sums(xb, labels, metric, backend=backend)
        (grads[0] * s_in + grads[1] * s_out).sum().backward()
        results.append((s_in.detach(), s_out.detach(), xb.grad))
    (ri, ro, rg), (ci, co, cg) = results
    assert_rel(ci, ri, 1e-10, "S_in", atol=1e-10 * scale)
    assert_rel(co, ro, 1e-10, "S_out", atol=1e-10 * scale)
    assert_rel(cg, rg, 1e-9, "grad", atol=1e-9 * n / min(scale, 1.0))

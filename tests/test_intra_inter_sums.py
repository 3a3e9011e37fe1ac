"""intra_inter_sums on every kernel backend against the reference.

Kernel results are compared with the float64 reference: values and gradients
(random per-row upstream gradients for S_in and S_out, so both halves of the
backward are exercised) on odd shapes, singleton classes, single-class
batches, duplicated rows and arbitrary label values.
"""

import pytest
import torch

import confusion_kernels as ck
from conftest import (ALL_METRICS, KERNEL_BACKENDS, assert_rel, interpreted, make_batch,
                      require_backend)

F64_TOL = 1e-10
F32_TOL = 1e-5


def run_with_grad(x, labels, metric, backend, seed, **kwargs):
    """(S_in, S_out, dL/dx) for L = sum(g_in * S_in + g_out * S_out)."""
    x = x.detach().clone().requires_grad_(True)
    s_in, s_out = ck.intra_inter_sums(x, labels, metric, backend=backend, **kwargs)
    g = torch.Generator().manual_seed(seed)
    g_in = torch.randn(x.shape[0], generator=g, dtype=torch.float64).to(s_in.device)
    g_out = torch.randn(x.shape[0], generator=g, dtype=torch.float64).to(s_in.device)
    (s_in.double() * g_in + s_out.double() * g_out).sum().backward()
    return s_in.detach(), s_out.detach(), x.grad


def check_against_reference(x, labels, metric, backend, tol, seed=0, **kwargs):
    ref = run_with_grad(x.detach().double().cpu(), labels.cpu(), metric, "reference", seed, **kwargs)
    out = run_with_grad(x, labels, metric, backend, seed, **kwargs)
    for name, a, b in zip(("S_in", "S_out", "grad"), out, ref):
        assert_rel(a, b, tol, f"{backend}/{metric} {name}")
    return out


def shapes_for(backend, metric):
    if interpreted(backend):  # Triton's CPU interpreter: keep it small
        shapes = [(1, 3), (2, 1), (47, 31), (70, 2)]
    else:
        shapes = [(n, d) for n in (1, 2, 47, 129, 1000) for d in (1, 2, 3, 31, 64)]
    if metric == "cosine":  # 1-D cosine is degenerate: test_cosine_in_one_dimension
        shapes = [(n, d) for n, d in shapes if d > 1]
    return shapes


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_float64_matches_reference(backend, metric):
    device = require_backend(backend)
    for n, d in shapes_for(backend, metric):
        x, labels = make_batch(n, d, 5, seed=n + 7 * d, device=device)
        check_against_reference(x, labels, metric, backend, F64_TOL, seed=n)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_float32_matches_float64_reference(backend, metric):
    device = require_backend(backend)
    for n, d in shapes_for(backend, metric):
        x, labels = make_batch(n, d, 5, seed=3 * n + d, device=device, dtype=torch.float32)
        s_in, s_out, grad = check_against_reference(x, labels, metric, backend, F32_TOL, seed=n)
        assert s_in.dtype == torch.float32 and grad.dtype == torch.float32


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_low_precision_inputs_accumulate_in_float32(backend, dtype, metric):
    """fp16/bf16 inputs: outputs are float32 and match the float64 reference on
    the same (rounded) values; the gradient comes back in the input dtype."""
    device = require_backend(backend)
    x, labels = make_batch(47, 31, 4, seed=5, device=device, dtype=dtype)
    ref = run_with_grad(x.double().cpu(), labels.cpu(), metric, "reference", 1)
    s_in, s_out, grad = run_with_grad(x, labels, metric, backend, 1)
    assert s_in.dtype == torch.float32 and s_out.dtype == torch.float32
    assert grad.dtype == dtype
    assert_rel(s_in, ref[0], F32_TOL, "S_in")
    assert_rel(s_out, ref[1], F32_TOL, "S_out")
    # the gradient is rounded once to the input dtype
    assert_rel(grad, ref[2], 2 * torch.finfo(dtype).eps, "grad")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_singleton_and_single_class_batches(backend, metric):
    device = require_backend(backend)
    x, _ = make_batch(33, 5, 1, seed=11, device=device)
    every_row_its_own_class = torch.arange(33, device=device)
    s_in, _, _ = check_against_reference(x, every_row_its_own_class, metric, backend, F64_TOL)
    assert (s_in == 0).all()
    one_class = torch.zeros(33, dtype=torch.int64, device=device)
    _, s_out, _ = check_against_reference(x, one_class, metric, backend, F64_TOL)
    assert (s_out == 0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_arbitrary_label_values(backend, metric):
    device = require_backend(backend)
    x, small = make_batch(40, 6, 3, seed=2, device=device)
    big = torch.tensor([-5, 10**9, 7], device=device)[small]
    expected = ck.intra_inter_sums(x, small, metric, backend=backend)
    got = ck.intra_inter_sums(x, big.to(torch.int32), metric, backend=backend)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    check_against_reference(x, big, metric, backend, F64_TOL)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_identical_rows_give_exact_zero_distance_and_gradient(backend, metric):
    device = require_backend(backend)
    for dtype in (torch.float64, torch.float32):
        row = torch.randn(1, 19, dtype=torch.float64) * 3
        x = row.repeat(37, 1).to(device=device, dtype=dtype).requires_grad_(True)
        labels = torch.randint(0, 3, (37,), device=device)
        s_in, s_out = ck.intra_inter_sums(x, labels, metric, backend=backend)
        assert (s_in == 0).all() and (s_out == 0).all()
        (s_in * 1.5 + s_out * -0.5).sum().backward()
        assert (x.grad == 0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_near_duplicates_far_from_origin_keep_float32_accuracy(backend, metric):
    """Tight classes at radius ~10 (where ASLoss drives embeddings): the Gram
    form alone would lose most digits here; the exact path must keep them."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(4)
    centers = torch.randn(3, 16, generator=g, dtype=torch.float64)
    centers = 10 * centers / centers.norm(dim=1, keepdim=True)
    labels = torch.randint(0, 3, (60,), generator=g)
    x = centers[labels] + 1e-3 * torch.randn(60, 16, generator=g, dtype=torch.float64)
    check_against_reference(x.float().to(device), labels.to(device), metric, backend, F32_TOL)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dim_mean_and_non_contiguous_input(backend):
    device = require_backend(backend)
    x, labels = make_batch(30, 12, 3, seed=9, device=device)
    strided = x.t().contiguous().t()  # same values, column-major strides
    assert not strided.is_contiguous()
    check_against_reference(strided, labels, "manhattan", backend, F64_TOL, dim_mean=True)
    a = ck.intra_inter_sums(x, labels, "l1_mean", backend=backend)
    b = ck.intra_inter_sums(x, labels, "manhattan", dim_mean=True, backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_gradcheck_float64(backend, metric):
    device = require_backend(backend)
    x, labels = make_batch(9, 4, 3, seed=21, device=device, duplicates=False)
    x.requires_grad_(True)

    def fn(inp):
        s_in, s_out = ck.intra_inter_sums(inp, labels, metric, backend=backend)
        return s_in, s_out

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_only_one_output_used(backend):
    """Backward with an unused output (its upstream gradient is None)."""
    device = require_backend(backend)
    x, labels = make_batch(20, 3, 2, seed=3, device=device)
    for pick in (0, 1):
        xr = x.detach().cpu().clone().requires_grad_(True)
        xk = x.detach().clone().requires_grad_(True)
        ck.intra_inter_sums(xr, labels.cpu(), backend="reference")[pick].sum().backward()
        ck.intra_inter_sums(xk, labels, backend=backend)[pick].sum().backward()
        assert_rel(xk.grad, xr.grad, F64_TOL, f"output {pick}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cosine_in_one_dimension(backend):
    """In 1-D every cosine distance is 0 or 2 and the gradient is exactly 0; a
    kernel's gradient is a difference of sums of size ~N/|x_i|, so it must be
    0 up to rounding of that size."""
    device = require_backend(backend)
    n = 300
    x, labels = make_batch(n, 1, 4, seed=8, device=device)
    s_in, s_out, grad = run_with_grad(x, labels, "cosine", backend, 2)
    ref = run_with_grad(x.cpu(), labels.cpu(), "cosine", "reference", 2)
    assert_rel(s_in, ref[0], F64_TOL, "S_in")
    assert_rel(s_out, ref[1], F64_TOL, "S_out")
    summand_scale = 4 * n / x.abs().min().item()
    assert grad.abs().max().item() <= 1e-13 * summand_scale


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cosine_eps_branch_zero_and_tiny_rows(backend):
    """|a||b| <= 1e-8 switches the cosine distance to 1 - a.b/1e-8 (gradient -b/1e-8):
    a zero row, and tiny rows whose dot product is not zero."""
    device = require_backend(backend)
    x, labels = make_batch(24, 6, 3, seed=12, duplicates=False)
    x[0] = 0.0
    x[1] = 1e-9 * x[1] / x[1].norm()
    x[2] = 2e-9 * x[2] / x[2].norm()
    for dtype, tol in ((torch.float64, F64_TOL), (torch.float32, F32_TOL)):
        check_against_reference(x.to(device=device, dtype=dtype), labels.to(device), "cosine",
                                backend, tol)

"""The rectangular form of intra_inter_sums (x against a reference set ``ref``) on every
backend: values and both gradients (x and ref) against the float64 reference, which is
itself checked against scipy's cdist; the square op as the special case ref = x; ragged
tile edges, 1-sample classes, single-class sets, duplicated rows; and the input rules."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

import confusion_kernels as ck
from conftest import ALL_METRICS, KERNEL_BACKENDS, assert_rel, interpreted, make_batch, \
    require_backend

OP = "intra_inter_sums_rect"
F64_TOL = 1e-10
F32_TOL = 1e-5


def rect_case(n, m, d, num_classes, seed, device, dtype=torch.float64, self_offset=None):
    """x [n, d] and ref [m, d] with labels; with ``self_offset`` x is rows
    self_offset .. self_offset + n of ref (a gathered batch), else independent rows
    of which one duplicates a row of ref (zero distance across the sets)."""
    ref, ref_labels = make_batch(m, d, num_classes, seed=seed, dtype=torch.float64)
    if self_offset is not None:
        x, labels = ref[self_offset:self_offset + n].clone(), ref_labels[self_offset:self_offset + n]
    else:
        x, labels = make_batch(n, d, num_classes, seed=seed + 1, dtype=torch.float64)
        if n > 1 and m > 1:
            x[n - 1] = ref[m // 2]
    return (x.to(device, dtype), labels.to(device), ref.to(device, dtype), ref_labels.to(device))


def run_with_grad(x, labels, ref, ref_labels, metric, backend, seed, self_offset=None):
    """(S_in, S_out, dL/dx, dL/dref) for L = sum(g_in S_in + g_out S_out)."""
    x = x.detach().clone().requires_grad_(True)
    ref = ref.detach().clone().requires_grad_(True)
    s_in, s_out = ck.intra_inter_sums(x, labels, metric, backend=backend, ref=ref,
                                      ref_labels=ref_labels, self_offset=self_offset)
    g = torch.Generator().manual_seed(seed)
    g_in = torch.randn(x.shape[0], generator=g, dtype=torch.float64).to(s_in.device)
    g_out = torch.randn(x.shape[0], generator=g, dtype=torch.float64).to(s_in.device)
    (s_in.double() * g_in + s_out.double() * g_out).sum().backward()
    return s_in.detach(), s_out.detach(), x.grad, ref.grad


def check_against_reference(case, metric, backend, tol, seed, self_offset):
    x, labels, ref, ref_labels = case
    expected = run_with_grad(x.double().cpu(), labels.cpu(), ref.double().cpu(),
                             ref_labels.cpu(), metric, "reference", seed, self_offset)
    actual = run_with_grad(x, labels, ref, ref_labels, metric, backend, seed, self_offset)
    for name, a, b in zip(("S_in", "S_out", "grad_x", "grad_ref"), actual, expected):
        assert_rel(a, b, tol, f"{backend}/{metric} {name} (self_offset={self_offset})")


def shapes_for(backend):
    """(N, M, D): ragged against the tiles (32 on Triton, 128 x 32 on CUDA, 256 on CPU)."""
    if interpreted(backend):
        return [(1, 1, 3), (5, 40, 3), (33, 17, 5)]
    return [(1, 1, 3), (5, 40, 3), (47, 33, 31), (130, 300, 64), (257, 513, 2)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_float64_matches_reference(backend, metric):
    device = require_backend(backend, OP)
    for n, m, d in shapes_for(backend):
        offsets = [None] + ([m - n, (m - n) // 2] if m >= n else [])
        for offset in offsets:
            case = rect_case(n, m, d, 4, seed=n + m + d, device=device, self_offset=offset)
            check_against_reference(case, metric, backend, F64_TOL, n + d, offset)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("offset", [None, 300])
def test_cpu_one_pass_backward_matches_reference(metric, offset):
    """The CPU backward of the Gram tiles for euclidean / sqeuclidean takes both gradients
    from one coefficient tile per tile pair, with row tiles of 256 dealt to groups that keep
    their own partial dL/dref: 600 rows are three ragged row tiles (three groups), 1100
    reference rows three column tiles; a duplicate row (zero distance) or a self offset
    (left-out pairs), and near-duplicate rows whose pairs the Gram form cannot resolve (the
    direct form fixes both sides of them)."""
    require_backend("cpu", OP)
    x, labels, ref, ref_labels = rect_case(600, 1100, 20, 5, seed=21, device="cpu",
                                           self_offset=offset)
    g = torch.Generator().manual_seed(5)
    for i, j in ((1, 1000), (450, 7), (599, 555)):
        x[i] = ref[j] + 1e-4 * torch.randn(20, generator=g, dtype=torch.float64)
    check_against_reference((x, labels, ref, ref_labels), metric, "cpu", F64_TOL, 3, offset)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_float32_matches_float64_reference(backend, metric):
    device = require_backend(backend, OP)
    n, m, d = (9, 37, 5) if interpreted(backend) else (70, 150, 24)
    case = rect_case(n, m, d, 3, seed=3, device=device, dtype=torch.float32, self_offset=4)
    check_against_reference(case, metric, backend, F32_TOL, 1, 4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_one_class_and_one_sample_classes(backend):
    """A single-class reference set (S_out = 0) and classes with one sample each (S_in = 0
    but for duplicates of another set's row)."""
    device = require_backend(backend, OP)
    x, _, ref, _ = rect_case(6, 20, 3, 1, seed=5, device=device)
    one = torch.zeros(6, dtype=torch.int64, device=device)
    one_ref = torch.zeros(20, dtype=torch.int64, device=device)
    check_against_reference((x, one, ref, one_ref), "euclidean", backend, F64_TOL, 2, None)
    s_in, s_out = ck.intra_inter_sums(x, one, ref=ref, ref_labels=one_ref, backend=backend)
    assert torch.all(s_out == 0) and torch.all(s_in > 0)
    distinct = torch.arange(6, device=device)
    distinct_ref = torch.arange(100, 120, device=device)
    s_in, s_out = ck.intra_inter_sums(x, distinct, ref=ref, ref_labels=distinct_ref,
                                      backend=backend)
    assert torch.all(s_in == 0) and torch.all(s_out > 0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_self_offset_gives_the_square_rows(backend, metric):
    """With x = ref[o:o+n], S(x vs ref) equals rows o..o+n of the square op on ref, and the
    gradient of a weighted sum of those rows (through x and ref) equals the square op's."""
    device = require_backend(backend, OP)
    full, full_labels = make_batch(23, 4, 3, seed=11, device=device)
    o, n = 7, 9
    g = torch.Generator().manual_seed(4)
    weights = torch.randn(2, n, generator=g, dtype=torch.float64).to(device)

    ref = full.clone().requires_grad_(True)
    s_in, s_out = ck.intra_inter_sums(ref[o:o + n], full_labels[o:o + n], metric,
                                      backend=backend, ref=ref, ref_labels=full_labels,
                                      self_offset=o)
    (weights[0] @ s_in + weights[1] @ s_out).backward()

    square = full.clone().requires_grad_(True)
    q_in, q_out = ck.intra_inter_sums(square, full_labels, metric, backend="reference")
    (weights[0] @ q_in[o:o + n] + weights[1] @ q_out[o:o + n]).backward()
    assert_rel(s_in, q_in[o:o + n], F64_TOL, "S_in")
    assert_rel(s_out, q_out[o:o + n], F64_TOL, "S_out")
    assert_rel(ref.grad, square.grad, F64_TOL, "gradient")


@pytest.mark.parametrize("metric, scipy_metric", [
    ("euclidean", "euclidean"), ("sqeuclidean", "sqeuclidean"), ("manhattan", "cityblock"),
    ("cosine", "cosine")])
def test_reference_against_scipy_cdist(metric, scipy_metric):
    x, labels, ref, ref_labels = rect_case(13, 29, 6, 3, seed=21, device="cpu", self_offset=5)
    dist = cdist(x.numpy(), ref.numpy(), scipy_metric)
    same = labels.numpy()[:, None] == ref_labels.numpy()[None, :]
    keep = np.ones_like(same)
    keep[np.arange(13), 5 + np.arange(13)] = False
    s_in, s_out = ck.intra_inter_sums(x, labels, metric, backend="reference", ref=ref,
                                      ref_labels=ref_labels, self_offset=5)
    np.testing.assert_allclose(s_in.numpy(), (dist * (same & keep)).sum(1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s_out.numpy(), (dist * (~same & keep)).sum(1), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck(backend):
    device = require_backend(backend, OP)
    x, labels, ref, ref_labels = rect_case(5, 9, 3, 2, seed=8, device=device)
    x[0] = ref[3] + 0.1  # near, not equal: the distance is differentiable
    for metric in ALL_METRICS:
        def fn(a, b):
            return ck.intra_inter_sums(a, labels, metric, backend=backend, ref=b,
                                       ref_labels=ref_labels, self_offset=None)

        assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True),
                                             ref.clone().requires_grad_(True)))


def test_dim_mean_and_aliases():
    x, labels, ref, ref_labels = rect_case(4, 10, 6, 2, seed=2, device="cpu")
    a = ck.intra_inter_sums(x, labels, "l1_mean", ref=ref, ref_labels=ref_labels, backend="cpu")
    b = ck.intra_inter_sums(x, labels, "manhattan", ref=ref, ref_labels=ref_labels,
                            backend="reference")
    assert_rel(a[0], b[0] / 6, F64_TOL, "S_in")
    assert_rel(a[1], b[1] / 6, F64_TOL, "S_out")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_input_rules(backend):
    x, labels, ref, ref_labels = rect_case(4, 10, 3, 2, seed=1, device="cpu")

    def call(**kwargs):
        args = dict(ref=ref, ref_labels=ref_labels, backend=backend)
        args.update(kwargs)
        return ck.intra_inter_sums(x, labels, **args)

    with pytest.raises(ValueError, match="ref needs ref_labels"):
        call(ref_labels=None)
    with pytest.raises(ValueError, match="need ref"):
        ck.intra_inter_sums(x, labels, ref_labels=ref_labels, backend=backend)
    with pytest.raises(ValueError, match="need ref"):
        ck.intra_inter_sums(x, labels, self_offset=0, backend=backend)
    with pytest.raises(ValueError, match="columns"):
        call(ref=ref[:, :2])
    with pytest.raises(TypeError, match="dtype"):
        call(ref=ref.float())
    with pytest.raises(ValueError, match="ref_labels has 9 entries"):
        call(ref_labels=ref_labels[:9])
    with pytest.raises(ValueError, match="self_offset must satisfy"):
        call(self_offset=7)
    with pytest.raises(ValueError, match="self_offset must satisfy"):
        call(self_offset=-1)
    with pytest.raises(TypeError, match="self_offset must be an int"):
        call(self_offset=True)
    with pytest.raises(ValueError, match="ref has no rows"):
        call(ref=ref[:0], ref_labels=ref_labels[:0])
    bad = ref.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="ref contains NaN"):
        call(ref=bad)


def test_cpp_op_refuses_bad_input():
    """Direct torch.ops calls get a RuntimeError, never an out-of-bounds read."""
    x, labels, ref, ref_labels = rect_case(4, 10, 3, 2, seed=1, device="cpu")
    rect = torch.ops.confusion_kernels.intra_inter_sums_rect
    with pytest.raises(RuntimeError, match="self_offset must satisfy"):
        rect(x, labels, ref, ref_labels, 8, "euclidean", "direct")
    with pytest.raises(RuntimeError, match="ref_labels must be int64"):
        rect(x, labels, ref, ref_labels[:5], None, "euclidean", "direct")
    with pytest.raises(RuntimeError, match="ref must be 2-D"):
        rect(x, labels, ref[:, :2], ref_labels, None, "euclidean", "direct")
    with pytest.raises(RuntimeError, match="unknown metric"):
        rect(x, labels, ref, ref_labels, None, "chebyshev", "direct")
    with pytest.raises(RuntimeError, match="unknown algorithm 'Direct'"):
        rect(x, labels, ref, ref_labels, None, "euclidean", "Direct")
    with pytest.raises(RuntimeError, match="'gram_tiles' is a Gram form .*; smooth_l1 runs"):
        rect(x, labels, ref, ref_labels, None, "smooth_l1", "gram_tiles")
    with pytest.raises(RuntimeError, match="algorithm 'pair_pass' has no kernel on cpu; it runs "
                                           "'direct' or 'gram_tiles'"):
        rect(x, labels, ref, ref_labels, None, "euclidean", "pair_pass")
    backward = torch.ops.confusion_kernels.intra_inter_sums_rect_backward
    with pytest.raises(RuntimeError, match="grad_in must be 1-D"):
        backward(torch.ones(3, dtype=torch.float64), torch.ones(4, dtype=torch.float64), x,
                 labels, ref, ref_labels, None, "euclidean", "direct")
    with pytest.raises(RuntimeError, match="algorithm 'pair_pass' has no kernel on cpu"):
        backward(torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), x,
                 labels, ref, ref_labels, None, "euclidean", "pair_pass")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_tight_clusters_far_from_the_origin(backend, metric):
    """Where a plain Gram form cancels (rows 1e3 from the origin, 1e-2 apart, exact
    duplicates): float32 stays within 1e-4 of the float64 reference."""
    device = require_backend(backend, OP)
    g = torch.Generator().manual_seed(12)
    n, m, d = (9, 40, 12) if interpreted(backend) else (60, 300, 24)
    centres = 1000.0 * torch.randn(3, d, generator=g, dtype=torch.float64)
    ref_labels = torch.randint(0, 3, (m,), generator=g)
    ref = centres[ref_labels] + 1e-2 * torch.randn(m, d, generator=g, dtype=torch.float64)
    x, labels = ref[5:5 + n].clone(), ref_labels[5:5 + n]
    ref[m - 1] = ref[0]  # a duplicated column
    case = (x.float().to(device), labels.to(device), ref.float().to(device), ref_labels.to(device))
    check_against_reference(case, metric, backend, 1e-4, 3, 5)

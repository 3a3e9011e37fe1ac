"""The one-pass ASLoss core (weighted_pair_sums) and intra_inter_sums on the same
pair pass: loss terms, row sums and gradients, against the float64
reference on shapes that stress the tiling (CPU kernel; Triton through its
interpreter without a GPU; the CUDA kernel on a GPU, and on the CPU through
tests/test_cuda_emulation.py)."""

import importlib

import pytest
import torch

import confusion_kernels as ck
from confusion_kernels._routing import loss_terms_algorithm
from conftest import interpreted, require_backend

ONE_PASS_BACKENDS = ("cpu", "triton", "cuda")

# the module (confusion_kernels.losses re-exports the function of the same name)
as_loss_module = importlib.import_module("confusion_kernels.losses.as_loss")
OP = "weighted_pair_sums_with_grad"
METRICS = ["euclidean", "sqeuclidean", "cosine"]


def _data(n, d, classes, seed, kind="random", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    if kind == "random":
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
    else:  # tight clusters far from the origin: the Gram form's hard case
        centres = 50.0 + torch.randn(classes, d, generator=g, dtype=torch.float64)
        x = centres[labels] + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(dtype), labels


def _terms_and_grad(x, labels, backend, **kw):
    xr = x.clone().requires_grad_(True)
    t = ck.as_loss_terms(xr, labels, backend=backend, **kw)
    (0.3 * t.inner - 0.7 * t.outer + 0.1 * t.boundary).backward()
    return t, xr.grad


@pytest.fixture
def count_one_pass(monkeypatch):
    calls = []
    original = as_loss_module.weighted_pair_sums

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(as_loss_module, "weighted_pair_sums", counted)
    return calls


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,d,classes,kind", [
    (300, 16, 5, "random"),      # ragged: 300 = 256 + 44
    (513, 33, 7, "random"),      # three row tiles, the last with one row
    (257, 12, 200, "random"),    # many singleton classes
    (260, 20, 1, "random"),      # a single class: outer = 0
    (300, 24, 4, "clustered"),   # tight clusters at distance ~50 from the origin
])
@pytest.mark.parametrize("reduction", ["pair_mean", "class_mean"])
@pytest.mark.parametrize("backend", ONE_PASS_BACKENDS)
def test_one_pass_matches_reference_float64(backend, metric, n, d, classes, kind, reduction,
                                            count_one_pass):
    device = require_backend(backend, OP)
    x, labels = _data(n, d, classes, seed=n + d, kind=kind)
    x[3] = x[10]  # a duplicated pair: distance 0
    got, got_grad = _terms_and_grad(x.to(device), labels.to(device), backend, metric=metric,
                                    reduction=reduction)
    want, want_grad = _terms_and_grad(x, labels, "reference", metric=metric, reduction=reduction)
    assert count_one_pass, "the one-pass op was not used"
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad.cpu(), want_grad, rtol=1e-9,
                               atol=1e-10 * float(want_grad.abs().max()))


@pytest.mark.parametrize("backend", ONE_PASS_BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kw", [dict(include_self=True), dict(dim_mean=True),
                                dict(reduction="class_mean", include_self=True)])
def test_one_pass_variants(backend, metric, kw, count_one_pass):
    device = require_backend(backend, OP)
    x, labels = _data(70, 10, 4, seed=5)
    labels[0] = 9  # a singleton class
    got, got_grad = _terms_and_grad(x.to(device), labels.to(device), backend, metric=metric, **kw)
    want, want_grad = _terms_and_grad(x, labels, "reference", metric=metric, **kw)
    assert count_one_pass
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad.cpu(), want_grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ONE_PASS_BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck(backend, metric):
    device = require_backend(backend, OP)
    x, labels = _data(13, 6, 3, seed=6) if interpreted(backend) else _data(23, 11, 3, seed=6)
    x, labels = x.to(device).requires_grad_(True), labels.to(device)
    assert torch.autograd.gradcheck(
        lambda t: ck.as_loss(t, labels, metric=metric, backend=backend), (x,))


@pytest.mark.parametrize("backend", ONE_PASS_BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_duplicates_get_zero_distance_and_gradient(backend, metric):
    device = require_backend(backend, OP)
    row = torch.randn(1, 12, dtype=torch.float64)
    x = torch.cat([row, row, row + 1.0, row + 1.0]).to(device).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1], device=device)
    t = ck.as_loss_terms(x, labels, metric=metric, backend=backend)
    assert t.inner.item() == 0.0
    t.inner.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", ONE_PASS_BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_copies_of_a_row_in_every_tile_match_reference(backend, metric, dtype):
    """Copies of one row scattered over several row tiles (within and across classes):
    their pairs take the exact form in many tile pairs, in vector lanes and in row
    tails, so a pair marked exact in one tile pair must not stay marked in the next."""
    device = require_backend(backend, OP)
    n = 300 if interpreted(backend) else 1100  # > 2 tiles of the CPU (N/4 rows) and Triton passes
    x, labels = _data(n, 13, 4, seed=11, dtype=torch.float64)
    copies = torch.randperm(n, generator=torch.Generator().manual_seed(12))[: n // 10]
    x[copies] = x[copies[0]].clone()
    got, got_grad = _terms_and_grad(x.to(dtype).to(device), labels.to(device), backend,
                                    metric=metric)
    want, want_grad = _terms_and_grad(x.to(dtype).double(), labels, "reference", metric=metric)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b, **tol)
    scale = float(want_grad.abs().max())
    torch.testing.assert_close(got_grad.double().cpu(), want_grad, rtol=tol["rtol"] * 10,
                               atol=tol["rtol"] * 10 * scale)


@pytest.mark.parametrize("backend", ONE_PASS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("metric", METRICS)
def test_low_precision_inputs(backend, dtype, metric):
    device = require_backend(backend, OP)
    x, labels = _data(300, 16, 5, seed=7, dtype=dtype)
    got, got_grad = _terms_and_grad(x.to(device), labels.to(device), backend, metric=metric)
    want, want_grad = _terms_and_grad(x.double(), labels, "reference", metric=metric)
    assert got.inner.dtype == torch.float32 and got_grad.dtype == dtype
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double().cpu(), want_grad, rtol=2e-2,
                               atol=2e-2 * float(want_grad.abs().max()))


@pytest.mark.parametrize("backend", ONE_PASS_BACKENDS)
def test_bitwise_reproducible(backend):
    device = require_backend(backend, OP)
    x, labels = _data(300, 16, 5, seed=8, dtype=torch.float32)
    x, labels = x.to(device), labels.to(device)
    first = _terms_and_grad(x, labels, backend)
    second = _terms_and_grad(x, labels, backend)
    assert torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[0], second[0]))


@pytest.mark.parametrize("backend", ONE_PASS_BACKENDS)
def test_relabelling_gives_the_same_bits(backend):
    """Classes are ordered by first appearance, not by label value (on the CPU by a hash pass
    and a counting sort, on a GPU by tensor ops): any relabelling that keeps equality (here
    reversed, negative and 2^40-sized values) gives bit-identical terms and gradient."""
    device = require_backend(backend, OP)
    n = 300 if interpreted(backend) else 700  # (the interpreter's time)
    x, labels = _data(n, 16, 9, seed=21, dtype=torch.float32)
    x[5] = x[2]  # a duplicate: an exact pair
    values = torch.tensor([-7, 2**40, 3, -(2**40), 0, 11, 5, -1, 9])[torch.arange(8, -1, -1)]
    want = _terms_and_grad(x.to(device), labels.to(device), backend)
    got = _terms_and_grad(x.to(device), values[labels].to(device), backend)
    assert torch.equal(got[1], want[1])
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))


@pytest.mark.parametrize("backend", ONE_PASS_BACKENDS)
def test_opcheck(backend):
    device = require_backend(backend, OP)
    x, labels = _data(300, 16, 5, seed=8, dtype=torch.float32)
    x, labels = x.to(device), labels.to(device)
    w = torch.rand(300, device=device)
    op = (torch.ops.confusion_kernels.weighted_pair_sums_with_grad_triton if backend == "triton"
          else torch.ops.confusion_kernels.weighted_pair_sums_with_grad)
    torch.library.opcheck(op, (x.clone().requires_grad_(True), labels, w, w.flip(0), "euclidean"))


def test_raw_op_rejects_bad_input():
    require_backend("cpu", OP)
    x, labels = _data(10, 12, 3, seed=9, dtype=torch.float32)
    op = torch.ops.confusion_kernels.weighted_pair_sums_with_grad
    w = torch.ones(10)
    with pytest.raises(RuntimeError, match="Gram form only"):
        op(x, labels, w, w, "manhattan")
    with pytest.raises(RuntimeError, match="weights must be floating"):
        op(x, labels, w[:9], w, "euclidean")
    with pytest.raises(RuntimeError, match="unknown metric"):
        op(x, labels, w, w, "chebyshev")


def test_when_the_one_pass_applies():
    """The router's rule (confusion_kernels/_routing.py) for the ASLoss terms with a gradient."""
    require_backend("cpu", OP)

    def one_pass(backend, metric, dim, needs_grad=True):
        x = torch.zeros(3, dim)
        return loss_terms_algorithm(backend, metric, x, needs_grad) == "one_pass"

    assert one_pass("cpu", "euclidean", 64) and one_pass("cpu", "cosine", 2)
    assert not one_pass("cpu", "euclidean", 8)  # small D: the difference loops
    assert not one_pass("cpu", "manhattan", 64)
    assert not one_pass("cpu", "euclidean", 64, needs_grad=False)  # no gradient: row sums
    assert one_pass("triton", "euclidean", 4) and one_pass("triton", "cosine", 64)
    assert not one_pass("triton", "manhattan", 64)
    assert not one_pass("reference", "euclidean", 64)


# ---------------------------------------------------------------------------
# intra_inter_sums on the same pair pass: the per-row forward and the
# backward for arbitrary upstream gradients.
# ---------------------------------------------------------------------------
TILE_SHAPES = [
    (300, 16, 5, "random"),
    (1100, 20, 2, "random"),     # classes of ~550 rows: cut into two tiles each
    (700, 16, 40, "random"),     # small classes packed into shared tiles, ragged last tile
    (600, 24, 3, "clustered"),   # tight clusters at distance ~50 from the origin
    (1500, 16, 50, "clustered"),  # ~30-row classes packed into shared tiles
    (90, 12, 1, "clustered"),    # one class: S_out = 0
]


@pytest.mark.parametrize("backend", ONE_PASS_BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,d,classes,kind", TILE_SHAPES)
def test_row_sums_and_vjp_match_reference_float64(backend, metric, n, d, classes, kind):
    device = require_backend(backend)
    if interpreted(backend) and n > 512:  # interpreter time; its blocks are 32 rows
        n = 160
    x, labels = _data(n, d, classes, seed=3 * n + d, kind=kind)
    x[5] = x[17]  # a duplicated pair
    x.requires_grad_(True)
    xd = x.detach().to(device).requires_grad_(True)
    got = ck.intra_inter_sums(xd, labels.to(device), metric, backend=backend)
    want = ck.intra_inter_sums(x, labels, metric, backend="reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)
    g_in, g_out = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    got_grad = torch.autograd.grad(got, xd, (g_in.to(device), g_out.to(device)))[0].cpu()
    want_grad = torch.autograd.grad(want, x, (g_in, g_out))[0]
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9,
                               atol=1e-10 * float(want_grad.abs().max()))


@pytest.mark.parametrize("backend", ONE_PASS_BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("classes", [4, 40])  # a class per tile; many classes per tile
def test_float32_accuracy_does_not_depend_on_clustering(backend, metric, classes):
    """Tight classes far from the origin keep the float32 row sums as accurate as
    spread-out data: the tile shift, not the exact fallback, carries them."""
    device = require_backend(backend)
    errors = {}
    n = 300 if interpreted(backend) else 1100  # interpreter time
    for kind in ("random", "clustered"):
        x, labels = _data(n, 32, classes, seed=11, kind=kind)
        if metric == "cosine" and kind == "clustered":
            # cosine sees directions: classes as narrow cones (angular spread ~1e-3)
            # around random directions; tighter cones are limited by float32 unit rows
            g = torch.Generator().manual_seed(12)
            axes = torch.nn.functional.normalize(
                torch.randn(classes, 32, generator=g, dtype=torch.float64), dim=1)
            x = 50.0 * axes[labels] + 0.05 * torch.randn(n, 32, generator=g, dtype=torch.float64)
        x = x.float()  # the reference sees the float32 operands as stored
        want = ck.intra_inter_sums(x.double(), labels, metric, backend="reference")
        got = ck.intra_inter_sums(x.to(device), labels.to(device), metric, backend=backend)
        errors[kind] = max(float(((a.double().cpu() - b).abs() / b.abs().clamp_min(1e-300)).max())
                           for a, b in zip(got, want) if b.abs().max() > 0)
    bound = 2e-5 if metric == "cosine" else 1e-5
    assert errors["random"] < bound and errors["clustered"] < bound, errors


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_triton_class_sums_do_not_depend_on_the_order_of_rows(scale):
    """The class means that shift the Triton pass are summed in int64 fixed point:
    index_add_ of floats on CUDA adds in a varying order, which made the Triton
    results differ between two identical calls on an H100. Here: the same bits for
    any order of the rows (a float index_add_ fails this on CPU too), and the exact
    sums to 2^-61 * N * max|v|."""
    pytest.importorskip("triton")
    from confusion_kernels.triton.pair_pass import _class_sums
    g = torch.Generator().manual_seed(3)
    n, d = 5000, 7
    values = (torch.randn(n, d, generator=g, dtype=torch.float64) * 10 + 50) * scale
    values[:40] = values[0] * 1.5  # duplicates
    labels = torch.randint(0, 6, (n,), generator=g)
    sums = _class_sums(values, labels)
    exact = torch.zeros(n, d, dtype=torch.float64).index_add_(0, labels, values)
    bound = 2.0 ** -61 * n * values.abs().max().item()
    assert (sums - exact).abs().max().item() <= 2 * n * bound
    for seed in range(3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(_class_sums(values[perm], labels[perm]), sums)
    assert torch.equal(_class_sums(values[:0], labels[:0]), values[:0])
    zeros = _class_sums(torch.zeros(4, 2, dtype=torch.float64), torch.tensor([0, 1, 0, 3]))
    assert torch.equal(zeros, torch.zeros(4, 2, dtype=torch.float64))

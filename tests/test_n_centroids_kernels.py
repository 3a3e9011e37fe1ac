"""The fused N-Centroids op (n_centroids_rows, n_centroids_sum_with_grad) on every kernel
backend against the reference: rows, hardest negatives and gradients in float64 (gradcheck),
float32, ragged tiles, duplicates and antipodes, near pairs, K = 2, NaN, bad input, opcheck."""

from __future__ import annotations

import pytest
import torch

import confusion_kernels as ck
from confusion_kernels import _validation
from confusion_kernels.ops.n_centroids_rows import direct_gradients, n_centroids_rows
from confusion_kernels.reference import n_centroids as ncl

from conftest import assert_rel, interpreted, require_backend

BACKENDS = ("cpu", "triton", "cuda")
METRICS = ("euclidean", "cosine", "great_circle")
OP = "n_centroids_rows"


def reference_rows(z, labels, centroids, metric, use_negatives):
    """L [N] and the hardest index [N] straight from the definition."""
    x = ncl.normalize(z)
    d = ncl.sphere_distances(x, centroids.to(x.dtype), metric)
    own = d.gather(1, labels[:, None])[:, 0]
    if not use_negatives:
        return own, None
    is_own = torch.zeros_like(d, dtype=torch.bool).scatter_(1, labels[:, None], True)
    hardest, index = d.masked_fill(is_own, float("inf")).min(1)
    mean = d.masked_fill(is_own, 0.0).sum(1) / (d.shape[1] - 1)
    return own - hardest - mean, index


def make_problem(n, k, d, *, seed, dtype=torch.float64, device="cpu", special=True):
    """Rows with own-centroid duplicates, duplicates of other centroids, antipodes of both and
    rows a small angle away from another class's centroid (near pairs in the Gram form)."""
    g = torch.Generator().manual_seed(seed)
    c = ncl.normalize(torch.randn(k, d, generator=g, dtype=torch.float64))
    labels = torch.randint(0, k, (n,), generator=g)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * 3.0
    if special and n >= 12:
        other = (labels + 1) % k
        z[0:2] = c[labels[0:2]] * 2.5           # on the own centroid (distance 0)
        z[2:4] = c[other[2:4]] * 0.5            # on another centroid
        z[4] = -c[labels[4]]                    # antipode of the own centroid
        z[5] = -c[other[5]] * 7.0               # antipode of another centroid
        z[6:9] = c[other[6:9]] + 1e-3 * torch.randn(3, d, generator=g, dtype=torch.float64)
        z[9] = -c[other[9]] + 1e-3 * torch.randn(d, generator=g, dtype=torch.float64)
    return z.to(device=device, dtype=dtype), labels.to(device), c.to(device=device, dtype=dtype)


def rows_op(backend):
    return (torch.ops.confusion_kernels.n_centroids_rows_triton if backend == "triton"
            else torch.ops.confusion_kernels.n_centroids_rows)


SHAPES = [(12, 2, 3), (37, 5, 6), (70, 33, 17)]
CPU_SHAPES = SHAPES + [(300, 600, 9)]  # ragged cpu tiles: 256 rows x 512 centroids


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_angles_over_the_half_circle(backend):
    """float32 great-circle distances from rows at every angle to two negative centroids (0 to
    pi, near 0, near pi/2, near pi, exactly on and opposite them): the CPU tiles take the angle
    from a float polynomial (both folds and the swap at pi/2), checked against float64."""
    device = require_backend(backend, OP)
    c = torch.eye(3, dtype=torch.float64)  # negatives c0, c1; every row's own class is c2
    theta = torch.cat([torch.linspace(0, torch.pi, 181, dtype=torch.float64),
                       torch.tensor([1e-6, 1e-3, torch.pi / 8, torch.pi / 2 - 1e-4,
                                     torch.pi - 1e-3, torch.pi - 1e-6], dtype=torch.float64)])
    z = torch.stack([theta.cos(), theta.sin(), 0.3 * torch.ones_like(theta)], 1) * 2.0
    labels = torch.full((theta.shape[0],), 2)
    expected, _ = reference_rows(z, labels, c, "great_circle", True)
    got = rows_op(backend)(z.float().to(device), c.float().to(device), labels.to(device),
                           "great_circle", True)[0]
    assert_rel(got.double().cpu(), expected, 1e-6, "rows", atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("use_negatives", [True, False])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_rows_and_gradients_match_reference_float64(backend, metric, use_negatives, shape):
    device = require_backend(backend, OP)
    if shape not in SHAPES and interpreted(backend):
        pytest.skip("the ragged-tile shape is for compiled kernels (the interpreter is slow)")
    n, k, d = shape
    z, labels, c = make_problem(n, k, d, seed=n + k, device=device)
    z.requires_grad_(True)
    expected, expected_index = reference_rows(z, labels, c, metric, use_negatives)
    rows, hardest = rows_op(backend)(z, c, labels, metric, use_negatives)
    assert_rel(rows, expected, 1e-12, "rows")
    if use_negatives:
        # ties between negatives may pick another index, never another distance
        chosen = ncl.sphere_distances(ncl.normalize(z.detach()), c, metric).gather(
            1, hardest[:, None])[:, 0]
        best = ncl.sphere_distances(ncl.normalize(z.detach()), c, metric).gather(
            1, expected_index[:, None])[:, 0]
        assert (hardest != labels).all()
        assert_rel(chosen, best, 1e-12, "hardest distance")
    else:
        assert (hardest == -1).all()
    upstream = torch.randn(n, dtype=torch.float64, device=device)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), z, retain_graph=True)
    (grad,) = torch.autograd.grad((rows * upstream).sum(), z)
    assert_rel(grad, expected_grad, 1e-11, "grad z")
    # the loss path (cpu / cuda: loss and gradient from one pass)
    loss = ck.n_centroids_loss(z, labels, c, metric=metric, use_negatives=use_negatives,
                               backend=backend)
    (loss_grad,) = torch.autograd.grad(loss, z)
    assert_rel(loss, expected.mean(), 1e-12, "loss")
    (expected_loss_grad,) = torch.autograd.grad(expected.mean(), z)
    assert_rel(loss_grad, expected_loss_grad, 1e-11, "loss grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck(backend, metric):
    device = require_backend(backend, OP)
    z, labels, c = make_problem(13, 4, 5, seed=3, device=device, special=False)
    z.requires_grad_(True)
    torch.autograd.gradcheck(lambda t: rows_op(backend)(t, c, labels, metric, True)[0], (z,))
    torch.autograd.gradcheck(
        lambda t: ck.n_centroids_loss(t, labels, c, metric=metric, backend=backend), (z,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_float32_within_tolerance(backend, metric):
    """float32 against the float64 reference, with rows 1e-2 away from another class's
    centroid (Gram-form near pairs). Exact duplicates are left out here: the direction of
    x - c at |x - c| ~ 1e-8 is rounding noise in either precision."""
    device = require_backend(backend, OP)
    z, labels, c = make_problem(70, 33, 17, seed=5, device=device, special=False)
    other = (labels[:6] + 1) % 33
    z[:6] = c[other] + 1e-2 * torch.randn(6, 17, dtype=torch.float64, device=device)
    expected, _ = reference_rows(z.requires_grad_(True), labels, c, metric, True)
    (expected_grad,) = torch.autograd.grad(expected.mean(), z)
    z32 = z.detach().float().requires_grad_(True)
    loss = ck.n_centroids_loss(z32, labels, c.float(), metric=metric, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32
    assert_rel(loss, expected.mean(), 1e-5, "loss", atol=1e-6)
    assert_rel(z32.grad, expected_grad, 1e-4, "grad", atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_two_classes_and_single_class_batches(backend, metric):
    """K = 2: one negative per row, hardest = mean; a batch of one class only."""
    device = require_backend(backend, OP)
    z, labels, c = make_problem(25, 2, 4, seed=8, device=device)
    rows, hardest = rows_op(backend)(z, c, labels, metric, True)
    assert (hardest == 1 - labels).all()
    assert_rel(rows, reference_rows(z, labels, c, metric, True)[0], 1e-12, "K = 2")
    one_class = torch.full_like(labels, 1)
    rows, hardest = rows_op(backend)(z, c, one_class, metric, True)
    assert (hardest == 0).all()
    assert_rel(rows, reference_rows(z, one_class, c, metric, True)[0], 1e-12, "one class")


@pytest.mark.parametrize("backend", BACKENDS)
def test_antipodes_and_duplicates_have_finite_exact_gradients(backend):
    """At d = 0 and at the antipode the norm terms have gradient 0 (as torch's norm at 0); the
    great-circle distance of an antipode is pi."""
    device = require_backend(backend, OP)
    # centroids whose normalisation is exact on every device (components 0, +-1/2, +-1): where
    # |c| rounds to 1 +- ulp, normalize(c) moves off c by an ulp and the angle's gradient there
    # is a unit vector in the rounding's direction (seen on an H200), not the 0 of d = 0
    c = torch.tensor([[0.5, -0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, -0.5, -0.5]],
                     dtype=torch.float64, device=device)
    z = torch.stack([c[0], -c[0], c[1] * 3, -c[2]]).requires_grad_(True)
    labels = torch.tensor([0, 0, 0, 2], device=device)
    rows, _ = rows_op(backend)(z, c, labels, "great_circle", False)
    assert_rel(rows, torch.tensor([0.0, torch.pi, float(reference_rows(
        z[2:3].detach(), labels[2:3], c, "great_circle", False)[0]), torch.pi],
        dtype=torch.float64), 1e-12, "angles")
    rows.sum().backward()
    assert torch.isfinite(z.grad).all()
    assert_rel(z.grad[[0, 1, 3]], torch.zeros(3, 4, dtype=torch.float64), 0, "grad", atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_input(backend):
    """The loss refuses non-finite z when it scans (ValueError: check_finite=True, and by
    default on CPU tensors), else gives NaN; NaN centroids give a NaN loss; the op wrapper,
    which does not scan, gives NaN rows (non-finite in, NaN out)."""
    device = require_backend(backend, OP)
    z, labels, c = make_problem(12, 3, 4, seed=4, device=device, special=False)
    bad = z.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ck.n_centroids_loss(bad, labels, c, backend=backend, check_finite=True)
    if _validation.host_checks(bad):
        with pytest.raises(ValueError, match="NaN or Inf"):
            ck.n_centroids_loss(bad, labels, c, backend=backend)
    else:  # GPU tensors are not scanned by default (docs/design.md, "Host synchronisation")
        assert torch.isnan(ck.n_centroids_loss(bad, labels, c, backend=backend))
    rows = n_centroids_rows(bad, labels, c, metric="great_circle", use_negatives=True,
                            backend=backend)
    assert torch.isnan(rows[3]) and torch.isfinite(rows[torch.arange(12) != 3]).all()
    bad_c = c.clone()
    bad_c[1, 0] = float("inf")
    assert torch.isnan(ck.n_centroids_loss(z, labels, bad_c, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_out_of_range_raise_before_any_kernel(backend):
    device = require_backend(backend, OP)
    z, labels, c = make_problem(12, 3, 4, seed=4, device=device, special=False)
    labels[2] = 3
    if not _validation.host_checks(z):  # GPU tensors: clamped for indexing, NaN loss
        assert torch.isnan(ck.n_centroids_loss(z, labels, c, backend=backend))
        with ck.strict_checks(), pytest.raises(ValueError, match="labels"):
            ck.n_centroids_loss(z, labels, c, backend=backend)
        return
    with pytest.raises(ValueError, match="labels"):
        ck.n_centroids_loss(z, labels, c, backend=backend)


# (forward op, backward op, exception) of each backend's registered ops
CHECKED_OPS = {"cpu": ("n_centroids_rows", "n_centroids_rows_backward", RuntimeError),
               "triton": ("n_centroids_rows_triton", "n_centroids_rows_triton_backward", ValueError)}


@pytest.mark.parametrize("backend", sorted(CHECKED_OPS))
def test_ops_check_their_inputs_themselves(backend):
    """Direct calls of the registered ops (C++ and Triton) raise, never read out of bounds."""
    require_backend(backend, OP)
    forward_name, backward_name, error = CHECKED_OPS[backend]
    forward = getattr(torch.ops.confusion_kernels, forward_name)
    backward = getattr(torch.ops.confusion_kernels, backward_name)
    z, c = torch.randn(3, 4), ncl.normalize(torch.randn(3, 4))
    labels = torch.tensor([0, 1, 2])
    bad_forward = [((z, c, torch.tensor([0, 1, 5]), "cosine", True), r"labels must lie in \[0, 3\)"),
                   ((z, c, labels, "manhattan", True), "unknown metric"),
                   ((z, c[:1], torch.zeros(3, dtype=torch.long), "cosine", True), "K >= 2"),
                   ((z, c[:, :2], labels, "cosine", True), "centroids|D ="),]
    for args, match in bad_forward:
        with pytest.raises(error, match=match):
            forward(*args)
    with pytest.raises(error, match=r"hardest must lie in \[0, 3\)"):
        backward(torch.ones(3), z, c, labels, torch.tensor([1, -1, 0]), "cosine", True)
    with pytest.raises(error, match="grad_rows"):
        backward(torch.ones(2), z, c, labels, torch.tensor([1, 2, 0]), "cosine", True)
    if backend == "cpu":
        with pytest.raises(error, match="K >= 2"):
            torch.ops.confusion_kernels.n_centroids_sum_with_grad(
                z, c[:1], torch.zeros(3, dtype=torch.long), "cosine", True)


def test_direct_gradients_match_autograd():
    """The closed-form pair gradient used by the triton backward (sphere_math.h's formula)."""
    x = ncl.normalize(torch.randn(20, 6, dtype=torch.float64)).requires_grad_(True)
    c = ncl.normalize(torch.randn(20, 6, dtype=torch.float64))
    w = torch.randn(20, dtype=torch.float64)
    for metric in METRICS:
        d = ncl.sphere_distances(x, c, metric).diagonal()
        (expected,) = torch.autograd.grad((w * d).sum(), x)
        assert_rel(direct_gradients(x.detach(), c, w, metric), expected, 1e-12, metric)


def test_module_trains_the_same_on_every_available_backend():
    """NCentroidsLoss with a kernel backend follows the reference: same losses and centroids
    over a few training steps."""
    require_backend("cpu", OP)
    results = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        net = torch.nn.Linear(6, 4).double()
        criterion = ck.NCentroidsLoss(5, 4, backend=backend)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(5):
            xb = torch.randn(40, 6, generator=g, dtype=torch.float64)
            yb = torch.randint(0, 5, (40,), generator=g)
            loss = criterion(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results[backend] = (torch.tensor(losses), criterion.centroids.clone())
    assert_rel(results["cpu"][0], results["reference"][0], 1e-10, "losses")
    assert_rel(results["cpu"][1], results["reference"][1], 1e-10, "centroids")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    device = require_backend(backend, OP)
    z, labels, c = make_problem(9, 3, 4, seed=12, device=device, special=False)
    z.requires_grad_(True)
    for metric in METRICS:
        torch.library.opcheck(rows_op(backend), (z, c, labels, metric, True))
    if backend == "cpu":
        torch.library.opcheck(torch.ops.confusion_kernels.n_centroids_sum_with_grad,
                              (z, c, labels, "great_circle", True))
        hardest = torch.ops.confusion_kernels.n_centroids_rows(z, c, labels, "euclidean", True)[1]
        torch.library.opcheck(torch.ops.confusion_kernels.n_centroids_rows_backward,
                              (torch.randn(9, dtype=torch.float64), z.detach(), c, labels,
                               hardest, "euclidean", True))

"""The public N-Centroids API: n_centroids_loss against the reference definition, the
module's EMA update against the reference's plain per-class loop, the alpha schedule, train /
eval behaviour, state_dict round trip, predict / distances, and input errors (labels out of
range before any kernel, unknown metric, unknown backend)."""

import pytest
import torch

import confusion_kernels as ck
from confusion_kernels.losses.n_centroids import ema_class_update
from confusion_kernels.reference import n_centroids as ncl


def _batch(n, d, k, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (2.0 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, k, (n,), generator=g)
    c = ncl.normalize(torch.randn(k, d, generator=g, dtype=torch.float64))
    return z, labels, c


@pytest.mark.parametrize("metric", ncl.METRICS)
@pytest.mark.parametrize("use_negatives", [True, False])
def test_loss_matches_reference(metric, use_negatives):
    z, labels, c = _batch(37, 9, 6, seed=1)
    z.requires_grad_(True)
    got = ck.n_centroids_loss(z, labels, c, metric=metric, use_negatives=use_negatives)
    (g_got,) = torch.autograd.grad(got, z)
    want = ncl.n_centroids_loss(z, labels, c, metric=metric, use_negatives=use_negatives)
    (g_want,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


def test_no_gradient_reaches_the_centroids_and_16_bit_inputs_give_float32():
    z, labels, c = _batch(10, 4, 3, seed=2, dtype=torch.float32)
    c = c.float().requires_grad_(True)
    z.requires_grad_(True)
    ck.n_centroids_loss(z, labels, c).backward()
    assert c.grad is None and z.grad is not None
    assert ck.n_centroids_loss(z.half(), labels, c.detach()).dtype == torch.float32


def test_ema_update_matches_the_plain_loop_and_single_sample_classes():
    z, labels, c = _batch(50, 8, 7, seed=3)
    labels[labels == 4] = 0        # class 4 absent
    labels[0] = 6                  # ... and class 6 may have one sample only
    labels[1:][labels[1:] == 6] = 5
    got = ema_class_update(c, z, labels, alpha=0.3)
    want = ncl.ema_update(c, z, labels, alpha=0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[4], c[4])


def test_module_trains_its_centroids_with_the_alpha_schedule_and_uses_the_old_ones():
    torch.manual_seed(0)
    module = ck.NCentroidsLoss(5, 6, metric="cosine", alpha0=0.5, decay=0.1).double()
    assert module.alpha == 0.5
    module.step.fill_(2000)
    assert module.alpha == pytest.approx(0.5 * 0.1 ** 2)
    z, labels, _ = _batch(20, 6, 5, seed=4)
    before = module.centroids.clone()
    loss = module(z, labels)
    # the loss used the centroids before the update
    torch.testing.assert_close(loss, ncl.n_centroids_loss(z, labels, before, metric="cosine"))
    torch.testing.assert_close(module.centroids,
                               ncl.ema_update(before, z, labels, 0.5 * 0.1 ** 2))
    assert int(module.step) == 2001
    module.eval()
    frozen = module.centroids.clone()
    module(z, labels)
    assert torch.equal(module.centroids, frozen) and int(module.step) == 2001


def test_state_dict_round_trip_predict_and_distances():
    a = ck.NCentroidsLoss(4, 3, seed=1)
    a(torch.randn(8, 3), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    b = ck.NCentroidsLoss(4, 3, seed=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.centroids, b.centroids) and int(b.step) == 1
    z = b.centroids[[2, 0, 3]] * 5.0  # on the centroids themselves
    assert b.predict(z).tolist() == [2, 0, 3]
    d = b.distances(z)
    assert d.shape == (3, 4) and torch.allclose(d[[0, 1, 2], [2, 0, 3]], torch.zeros(3), atol=1e-3)


def test_initial_centroids_are_seeded_unit_vectors():
    a, b = ck.NCentroidsLoss(6, 5, seed=3), ck.NCentroidsLoss(6, 5, seed=3)
    assert torch.equal(a.centroids, b.centroids)
    torch.testing.assert_close(a.centroids.norm(dim=1), torch.ones(6))


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 3]), torch.tensor([0, -1, 1])])
def test_labels_out_of_range_raise_value_error(labels):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ck.n_centroids_loss(torch.randn(3, 4), labels, ncl.normalize(torch.randn(3, 4)))


def test_bad_arguments():
    z, c = torch.randn(3, 4), ncl.normalize(torch.randn(3, 4))
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="metric"):
        ck.n_centroids_loss(z, y, c, metric="manhattan")
    with pytest.raises(ValueError, match=r"centroids must be \[K, D\]"):
        ck.n_centroids_loss(z, y, torch.randn(3, 5))
    with pytest.raises(ValueError, match="K >= 2"):
        ck.n_centroids_loss(z, torch.zeros(3, dtype=torch.long), c[:1])
    with pytest.raises(RuntimeError, match="unknown backend"):
        ck.n_centroids_loss(z, y, c, backend="keops")
    with pytest.raises(ValueError, match="num_classes >= 2"):
        ck.NCentroidsLoss(1, 4)


def test_confidence_reports_the_nearest_centroid_and_the_head_likelihood():
    module = ck.NCentroidsLoss(4, 5, seed=5).double()
    z, _, _ = _batch(6, 5, 4, seed=6)
    kappa = torch.tensor([0.5, 1.0, 4.0, 9.0, 20.0, 50.0], dtype=torch.float64)
    conf = module.confidence(z, kappa=kappa)
    d = ncl.sphere_distances(ncl.normalize(z), module.centroids, "great_circle")
    assert torch.equal(conf.prediction, d.argmin(1))
    torch.testing.assert_close(conf.distance, d.min(1).values)
    x = ncl.normalize(z)
    torch.testing.assert_close(conf.log_likelihood,
                               -ck.vmf_nll(x, module.centroids[conf.prediction], kappa))
    torch.testing.assert_close(conf.head, kappa)
    log_sigma = torch.full((6, 1), -1.0, dtype=torch.float64)
    g = module.confidence(z, log_sigma=log_sigma)
    torch.testing.assert_close(g.log_likelihood,
                               -ck.gaussian_nll(x, module.centroids[g.prediction], log_sigma))
    torch.testing.assert_close(g.head, torch.full((6,), 0.36787944117144233, dtype=torch.float64))
    plain = module.confidence(z)
    assert plain.head is None and plain.log_likelihood is None
    with pytest.raises(ValueError, match="not both"):
        module.confidence(z, kappa=kappa, log_sigma=log_sigma)


@pytest.mark.parametrize("metric", ncl.METRICS)
def test_row_chunks_give_the_same_loss_and_gradient(metric, monkeypatch):
    import confusion_kernels.losses.n_centroids as module

    z, labels, c = _batch(23, 5, 4, seed=7)
    z.requires_grad_(True)
    want = ncl.n_centroids_loss(z, labels, c, metric=metric)
    (g_want,) = torch.autograd.grad(want, z)
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 4 * 5 * 6)  # 6 rows per chunk: 4 chunks, ragged
    got = ck.n_centroids_loss(z, labels, c, metric=metric)
    (g_got,) = torch.autograd.grad(got, z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


def _two_training_steps(backend: str, metric: str, device, compiled: bool):
    """Gradients of two steps and the centroids after them (the EMA moves the buffer in
    place between each forward and its backward)."""
    module = ck.NCentroidsLoss(5, 8, metric=metric, backend=backend, seed=3).double().to(device)
    step = torch.compile(module, backend="aot_eager") if compiled else module
    grads = []
    for seed in (4, 5):
        z, labels, _ = _batch(23, 8, 5, seed=seed)
        z = z.to(device).requires_grad_(True)
        step(z, labels.to(device)).backward()
        grads.append(z.grad.cpu())
    return grads, module.centroids.cpu()


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("metric", ncl.METRICS)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_every_backend_trains_like_cpu(backend, metric, compiled):
    """A training step saves what its backward needs before the EMA step moves the centroid
    buffer in place (the triton and reference backends failed in backward before: "modified
    by an inplace operation")."""
    from conftest import require_backend

    device = "cpu" if backend == "reference" else require_backend(backend, "n_centroids_rows")
    require_backend("cpu", "n_centroids_rows")
    got_grads, got_centroids = _two_training_steps(backend, metric, device, compiled)
    want_grads, want_centroids = _two_training_steps("cpu", metric, "cpu", False)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_centroids, want_centroids, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e19), (torch.float32, 1e30),
                                         (torch.float64, 1e154), (torch.float64, 1e300)])
def test_scale_invariant_at_any_scale(backend, dtype, scale):
    """The loss sees z only through z / |z|: rows whose |z|^2 overflows (fp32 1.8e19, fp64
    1e154) gave zero vectors, the loss of z = 0 and a zero gradient, and moved the EMA wrongly."""
    from conftest import require_backend

    device = "cpu" if backend == "reference" else require_backend(backend, "n_centroids_rows")
    z, labels, c = _batch(19, 6, 4, seed=9, dtype=dtype)
    z, labels, c = z.to(device), labels.to(device), c.to(dtype).to(device)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)
    results = []
    for s in (1.0, scale):
        zs = (z * s).requires_grad_(True)
        loss = ck.n_centroids_loss(zs, labels, c, backend=backend)
        (grad,) = torch.autograd.grad(loss, zs)
        module = ck.NCentroidsLoss(4, 6, backend=backend).to(dtype).to(device)
        module(zs.detach(), labels)
        results.append((loss, grad * s, module.centroids))
    for got, want in zip(results[1], results[0]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **tol)


def test_inference_methods_name_what_does_not_fit():
    """Issue 26: a wrong D in confidence / predict and kappa=2.0 (a float) gave raw errors."""
    module = ck.NCentroidsLoss(3, 4)
    with pytest.raises(ValueError, match=r"z has D = 5 but the module's centroids are \[3, 4\]"):
        module.predict(torch.randn(2, 5))
    with pytest.raises(ValueError, match="D = 5"):
        module.confidence(torch.randn(2, 5))
    with pytest.raises(TypeError, match="kappa must be a tensor"):
        module.confidence(torch.randn(2, 4), kappa=2.0)
    with pytest.raises(TypeError, match="log_sigma must be a tensor"):
        module.confidence(torch.randn(2, 4), log_sigma=0.5)
    with pytest.raises(ValueError, match="on meta"):
        module.confidence(torch.randn(2, 4), kappa=torch.ones(2, device="meta"))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("metric", ["great_circle", "euclidean", "cosine"])
def test_reduction_none_sum_and_mean(backend, metric):
    """reduction="none" gives L_i [N] (written here from the distance matrix), whose mean is
    the loss and whose sum is reduction="sum", with the same gradient; the module takes it."""
    from conftest import assert_rel, require_backend

    device = torch.device("cpu") if backend == "reference" else require_backend(
        backend, "n_centroids_rows")
    g = torch.Generator().manual_seed(7)
    z = torch.randn(37, 5, generator=g, dtype=torch.float64).to(device)
    z[5] = z[0]  # a duplicate
    labels = torch.randint(0, 4, (37,), generator=g).to(device)
    c = torch.nn.functional.normalize(torch.randn(4, 5, generator=g, dtype=torch.float64),
                                      dim=1).to(device)
    z.requires_grad_(True)
    rows = ck.n_centroids_loss(z, labels, c, metric=metric, reduction="none", backend=backend)
    d = ncl.sphere_distances(ncl.normalize(z.detach()), c, metric)
    own = d[torch.arange(37), labels]
    others = d.masked_fill(torch.nn.functional.one_hot(labels, 4).bool(), float("inf"))
    mean_neg = (d.sum(1) - own) / 3
    want = own - others.min(1).values - mean_neg
    assert rows.shape == (37,)
    assert_rel(rows, want, 1e-10, "rows")
    mean = ck.n_centroids_loss(z, labels, c, metric=metric, backend=backend)
    total = ck.n_centroids_loss(z, labels, c, metric=metric, reduction="sum", backend=backend)
    assert_rel(rows.mean(), mean, 1e-12, "mean")
    assert_rel(total, 37 * mean, 1e-12, "sum")
    (g_rows,) = torch.autograd.grad(rows.sum(), z)
    (g_sum,) = torch.autograd.grad(total, z)
    assert_rel(g_rows, g_sum, 1e-9, "gradient")
    module = ck.NCentroidsLoss(4, 5, metric=metric, reduction="none", backend=backend).double()
    module.centroids = c.clone()
    module.to(device)
    assert_rel(module.eval()(z, labels), rows, 1e-12, "module")
    with pytest.raises(ValueError, match="unknown reduction 'pair_mean'"):
        ck.n_centroids_loss(z, labels, c, reduction="pair_mean")
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        ck.NCentroidsLoss(4, 5, reduction="avg")

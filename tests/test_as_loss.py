"""ASLoss terms, functional loss and module on the fused op against the reference."""

import pytest
import torch

import confusion_kernels as ck
from conftest import ALL_METRICS, KERNEL_BACKENDS, assert_rel, make_batch, require_backend

F64_TOL = 1e-10


def terms_and_grad(x, labels, backend, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    if backend == "reference":
        terms = ck.reference.as_loss_terms(x, labels, **kwargs)
    else:
        terms = ck.as_loss_terms(x, labels, backend=backend, **kwargs)
    (1.3 * terms.inner - 0.7 * terms.outer + 0.2 * terms.boundary).backward()
    return terms, x.grad


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("reduction", ["pair_mean", "class_mean"])
@pytest.mark.parametrize("include_self", [False, True])
def test_terms_match_reference(backend, metric, reduction, include_self):
    device = require_backend(backend) if backend != "reference" else torch.device("cpu")
    x, labels = make_batch(41, 7, 6, seed=13, device=device)
    labels[5] = 77  # a singleton class
    kwargs = dict(metric=metric, reduction=reduction, include_self=include_self, constraint=2.5)
    ref_terms, ref_grad = terms_and_grad(x.cpu(), labels.cpu(), "reference", **kwargs)
    terms, grad = terms_and_grad(x, labels, backend, **kwargs)
    for name, a, b in zip(ref_terms._fields, terms, ref_terms):
        assert_rel(a, b, F64_TOL, name)
    assert_rel(grad, ref_grad, F64_TOL, "grad")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_degenerate_batches(backend):
    device = require_backend(backend)
    x, _ = make_batch(12, 3, 1, seed=1, device=device)
    singletons = ck.as_loss_terms(x, torch.arange(12, device=device), backend=backend)
    assert singletons.inner.item() == 0 and singletons.outer.item() > 0
    one_class = ck.as_loss_terms(x, torch.zeros(12, dtype=torch.long, device=device), backend=backend)
    assert one_class.outer.item() == 0 and one_class.inner.item() > 0
    for reduction in ("pair_mean", "class_mean"):
        single = ck.as_loss_terms(x[:1], torch.zeros(1, dtype=torch.long, device=device),
                                  reduction=reduction, backend=backend)
        assert single.inner.item() == 0 and single.outer.item() == 0


def test_as_loss_combines_terms_with_lambdas():
    x, labels = make_batch(30, 5, 3, seed=2)
    t = ck.as_loss_terms(x, labels)
    loss = ck.as_loss(x, labels, lambda_inner=0.5, lambda_outer=0.25, lambda_boundary=2.0)
    torch.testing.assert_close(loss, 0.5 * t.inner - 0.25 * t.outer + 2.0 * t.boundary)
    default = ck.as_loss(x, labels)
    torch.testing.assert_close(default, 1e-3 * t.inner - 1e-3 * t.outer + 1e-2 * t.boundary)
    torch.testing.assert_close(default, ck.reference.as_loss(x, labels), rtol=1e-12, atol=1e-14)


def test_module_single_and_multi_layer():
    x1, labels = make_batch(25, 6, 4, seed=3)
    x2, _ = make_batch(25, 3, 4, seed=4)
    loss_fn = ck.ASLoss(metric="l2", constraint=5.0)
    single = loss_fn(x1, labels)
    torch.testing.assert_close(single, ck.as_loss(x1, labels, metric="l2", constraint=5.0))
    assert len(loss_fn.last_terms) == 1
    weighted = ck.ASLoss(metric="cosine", layer_weights=[0.3, 2.0])
    both = weighted([x1, x2], labels)
    expected = 0.3 * ck.as_loss(x1, labels, metric="cosine") + 2.0 * ck.as_loss(x2, labels, metric="cosine")
    torch.testing.assert_close(both, expected)
    assert len(weighted.last_terms) == 2
    with pytest.raises(ValueError, match="layer_weights"):
        weighted([x1], labels)
    with pytest.raises(ValueError, match="at least one"):
        loss_fn([], labels)


def test_module_trains_embeddings_apart():
    """A few optimiser steps on ASLoss alone pull classes together and push them apart."""
    torch.manual_seed(0)
    x = torch.randn(60, 8, requires_grad=True)
    labels = torch.arange(60) % 3
    loss_fn = ck.ASLoss(lambda_inner=1.0, lambda_outer=1.0, lambda_boundary=0.1, constraint=3.0)
    opt = torch.optim.SGD([x], lr=0.5)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(x, labels)
        loss.backward()
        opt.step()
        first = loss_fn.last_terms[0] if first is None else first
    last = ck.as_loss_terms(x.detach(), labels, constraint=3.0)
    assert last.inner < first.inner and last.outer > first.outer


def test_low_precision_terms_are_float32():
    x, labels = make_batch(20, 4, 2, seed=5, dtype=torch.bfloat16)
    terms = ck.as_loss_terms(x, labels)
    assert all(t.dtype == torch.float32 for t in terms)
    ref = ck.reference.as_loss_terms(x.double(), labels)
    for a, b in zip(terms, ref):
        assert_rel(a, b, 1e-5)


@pytest.mark.parametrize("backend", ("reference",) + KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine", "manhattan"])
@pytest.mark.parametrize("n,d", [(1, 3), (17, 4), (29, 12)])
def test_reduction_none_gives_per_sample_contributions(backend, metric, n, d):
    """reduction="none": c_i = l_in S_in[i] / n_in - l_out S_out[i] / n_out + l_b r_i / N,
    written here from the distance matrix; they sum to the pair_mean loss, value and
    gradient (ragged N, a duplicate, a class of one row)."""
    from confusion_kernels.reference.pairwise import pairwise_distances

    device = require_backend(backend) if backend != "reference" else torch.device("cpu")
    x, labels = make_batch(n, d, 4, seed=n + d, device=device)
    if n > 2:
        labels[-2] = 9  # a class of one row
    x.requires_grad_(True)
    lam = dict(lambda_inner=0.7, lambda_outer=0.4, lambda_boundary=0.2)
    got = ck.as_loss(x, labels, metric=metric, reduction="none", backend=backend, **lam)
    dist = pairwise_distances(x.detach(), metric=metric)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    other = labels[:, None] != labels[None, :]
    n_in, n_out = same.sum().clamp_min(1), other.sum().clamp_min(1)
    radial = (torch.linalg.vector_norm(x.detach(), dim=1) - 10.0).square()
    want = (0.7 * (dist * same).sum(1) / n_in - 0.4 * (dist * other).sum(1) / n_out
            + 0.2 * radial / n)
    assert got.shape == (n,)
    assert_rel(got, want, 1e-10, "per-sample contributions")
    total = ck.as_loss(x, labels, metric=metric, backend=backend, **lam)
    (g_none,) = torch.autograd.grad(got.sum(), x)
    (g_mean,) = torch.autograd.grad(total, x)
    assert_rel(got.sum(), total, 1e-10, "sum of the contributions")
    assert_rel(g_none, g_mean, 1e-9, "gradient")
    module = ck.ASLoss(metric, reduction="none", backend=backend, **lam)
    assert_rel(module(x, labels), got, 1e-12, "module")


def test_reduction_none_with_a_memory():
    x, labels = make_batch(11, 5, 3, seed=4)
    memory = ck.CrossBatchMemory(20, 5, dtype=torch.float64)
    memory.enqueue(*make_batch(9, 5, 3, seed=5))
    got = ck.as_loss_terms(x, labels, reduction="none", memory=memory, backend="reference")
    want = ck.as_loss_terms(x, labels, memory=memory, backend="reference")
    for a, b in zip(got, want):
        assert a.shape == (11,)
        assert_rel(a.sum(), b, 1e-12, "memory terms")
    with pytest.raises(ValueError, match="unknown reduction 'mean'"):
        ck.as_loss(x, labels, reduction="mean")

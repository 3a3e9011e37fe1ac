"""The reference itself against independent computations (scipy, numpy loops)."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

import confusion_kernels as ck
from conftest import ALL_METRICS, make_batch

SCIPY_NAMES = {"euclidean": "euclidean", "sqeuclidean": "sqeuclidean",
               "manhattan": "cityblock", "cosine": "cosine"}


def independent_distances(x: np.ndarray, metric: str) -> np.ndarray:
    if metric in SCIPY_NAMES:
        return cdist(x, x, SCIPY_NAMES[metric])
    t = np.abs(x[:, None, :] - x[None, :, :])  # smooth_l1
    return np.where(t < 1, 0.5 * t * t, t - 0.5).sum(-1)


@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("n,d", [(1, 3), (7, 1), (47, 31), (129, 64)])
def test_pairwise_distances_match_scipy(metric, n, d):
    x, _ = make_batch(n, d, 3, seed=n * 100 + d)
    ours = ck.reference.pairwise_distances(x, metric=metric).numpy()
    theirs = independent_distances(x.numpy(), metric)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alias,metric,dim_mean", [("l2", "euclidean", False), ("l1", "manhattan", False),
                                                   ("l1_mean", "manhattan", True), ("mse", "sqeuclidean", True)])
def test_metric_aliases(alias, metric, dim_mean):
    x, _ = make_batch(10, 5, 2, seed=1)
    expected = independent_distances(x.numpy(), metric) / (5 if dim_mean else 1)
    np.testing.assert_allclose(ck.reference.pairwise_distances(x, metric=alias).numpy(), expected,
                               rtol=1e-12, atol=1e-12)


def numpy_as_loss_terms(x, labels, metric, constraint, include_self, reduction):
    """ASLoss terms by explicit loops over pairs (docs/math.md, "ASLoss")."""
    dist = independent_distances(x, metric)
    n = len(labels)
    intra = [(i, j) for i in range(n) for j in range(n)
             if labels[i] == labels[j] and (i != j or include_self)]
    inter = [(i, j) for i in range(n) for j in range(n) if labels[i] != labels[j]]
    if reduction == "pair_mean":
        inner = np.mean([dist[p] for p in intra]) if intra else 0.0
        outer = np.mean([dist[p] for p in inter]) if inter else 0.0
    else:
        inner_c, outer_c = [], []
        for c in np.unique(labels):
            ci = [dist[p] for p in intra if labels[p[0]] == c]
            co = [dist[p] for p in inter if labels[p[0]] == c]
            if ci:
                inner_c.append(np.mean(ci))
            if co:
                outer_c.append(np.mean(co))
        inner = np.mean(inner_c) if inner_c else 0.0
        outer = np.mean(outer_c) if outer_c else 0.0
    boundary = np.mean((np.linalg.norm(x, axis=1) - constraint) ** 2)
    return inner, outer, boundary


@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("reduction", ["pair_mean", "class_mean"])
@pytest.mark.parametrize("include_self", [False, True])
def test_reference_as_loss_terms_match_loops(metric, reduction, include_self):
    x, labels = make_batch(23, 4, 5, seed=7)
    labels[0] = 99  # a singleton class
    terms = ck.reference.as_loss_terms(x, labels, metric=metric, constraint=3.0,
                                       include_self=include_self, reduction=reduction)
    expected = numpy_as_loss_terms(x.numpy(), labels.numpy(), metric, 3.0, include_self, reduction)
    np.testing.assert_allclose([t.item() for t in terms], expected, rtol=1e-12)

"""The readable N-Centroids definition (confusion_kernels/reference/n_centroids.py) against
independent formulas: scipy's cdist for the chord and cosine distances, arccos / 2 asin for
the great-circle angle, a per-sample loop for the loss, and the EMA schedule by hand.
Antipodes, a sample on its centroid, K = 2, float64 gradcheck."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from confusion_kernels.reference import n_centroids as ncl


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return ncl.normalize(torch.randn(n, d, generator=g, dtype=torch.float64))


def test_distances_match_scipy_and_the_angle():
    x, c = _unit(9, 7, 1), _unit(4, 7, 2)
    for metric, scipy_metric in (("euclidean", "euclidean"), ("cosine", "cosine")):
        got = ncl.sphere_distances(x, c, metric)
        np.testing.assert_allclose(got.numpy(), cdist(x.numpy(), c.numpy(), scipy_metric),
                                   rtol=1e-12, atol=1e-12)
    angle = np.arccos(np.clip(x.numpy() @ c.numpy().T, -1, 1))
    np.testing.assert_allclose(ncl.sphere_distances(x, c, "great_circle").numpy(), angle,
                               rtol=1e-10, atol=1e-10)
    chord = ncl.sphere_distances(x, c, "euclidean")
    torch.testing.assert_close(ncl.sphere_distances(x, c, "great_circle"),
                               2 * torch.asin(chord / 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric", ncl.METRICS)
def test_on_the_centroid_and_at_the_antipode_values_and_gradients_are_finite(metric):
    c = _unit(3, 5, 3)
    z = torch.stack([c[0] * 2.0, -c[1], c[2] + 1e-9]).requires_grad_(True)
    labels = torch.tensor([0, 0, 2])
    d = ncl.sphere_distances(ncl.normalize(z), c, metric)
    far = {"euclidean": 2.0, "cosine": 2.0, "great_circle": math.pi}[metric]
    assert d[0, 0].item() == pytest.approx(0.0, abs=1e-7)
    assert d[1, 1].item() == pytest.approx(far, abs=1e-7)
    loss = ncl.n_centroids_loss(z, labels, c, metric=metric)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("metric", ncl.METRICS)
@pytest.mark.parametrize("use_negatives", [True, False])
def test_loss_matches_a_per_sample_loop(metric, use_negatives):
    g = torch.Generator().manual_seed(4)
    z = 3.0 * torch.randn(11, 6, generator=g, dtype=torch.float64)
    c, labels = _unit(5, 6, 5), torch.randint(0, 5, (11,), generator=g)
    want = []
    for zi, yi in zip(z, labels.tolist()):
        xi = zi / zi.norm()
        d = ncl.sphere_distances(xi[None], c, metric)[0]
        neg = torch.cat([d[:yi], d[yi + 1:]])
        want.append(d[yi] - (neg.min() + neg.mean() if use_negatives else 0.0))
    got = ncl.n_centroids_loss(z, labels, c, metric=metric, use_negatives=use_negatives)
    torch.testing.assert_close(got, torch.stack(want).mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric", ncl.METRICS)
def test_gradcheck_with_two_centroids(metric):
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    c, labels = _unit(2, 4, 6), torch.tensor([0, 1, 1, 0, 1, 0])
    assert torch.autograd.gradcheck(lambda t: ncl.n_centroids_loss(t, labels, c, metric=metric),
                                    (z,))


def test_negatives_need_two_centroids():
    with pytest.raises(ValueError, match="K >= 2"):
        ncl.n_centroids_loss(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), _unit(1, 4, 7))


def test_ema_schedule_and_update():
    assert ncl.ema_alpha(0) == 0.25
    assert ncl.ema_alpha(1000) == pytest.approx(0.25 * 0.65)
    assert ncl.ema_alpha(2500, alpha0=0.5, decay=0.9) == pytest.approx(0.5 * 0.9 ** 2.5)
    c = _unit(4, 3, 8)
    z = torch.tensor([[1.0, 0, 0], [3.0, 0, 0], [0, 0, -2.0]], dtype=torch.float64)
    labels = torch.tensor([1, 1, 3])
    new = ncl.ema_update(c, z, labels, alpha=0.2)
    for k, m in ((1, torch.tensor([1.0, 0, 0])), (3, torch.tensor([0, 0, -1.0]))):
        mixed = 0.2 * m.double() + 0.8 * c[k]
        torch.testing.assert_close(new[k], mixed / mixed.norm())
    torch.testing.assert_close(new[[0, 2]], c[[0, 2]], rtol=0, atol=0)  # absent classes
    torch.testing.assert_close(new.norm(dim=1), torch.ones(4, dtype=torch.float64))

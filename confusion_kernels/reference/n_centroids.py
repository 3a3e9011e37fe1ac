"""N-Centroids loss (NCL) with EMA centroids: the readable definition.

Embeddings z [N, D] are put on the unit sphere, x_i = z_i / max(|z_i|, 1e-12), and compared
with K unit centroids c_k (buffers, moved by an exponential moving average, not by gradient):
    euclidean     d(u, v) = |u - v|                         (the chord)
    cosine        d(u, v) = 1 - u.v
    great_circle  d(u, v) = 2 atan2(|u - v|, |u + v|)       (the angle, in [0, pi])
The atan2 form of the angle is exact near 0 and near pi, where acos(u.v) loses its digits
and its gradient; the gradient of every metric is 0 where |u - v| or |u + v| is 0.
    L_i  = d(c_{y_i}, x_i) - g [ min_{k != y_i} d(c_k, x_i) + mean_{k != y_i} d(c_k, x_i) ]
    loss = mean_i L_i,  g = 1 with negatives (use_negatives=True), else 0
EMA update, after the loss (no gradient), for every class k present in the batch:
    m_k = normalize(mean_{y_i = k} x_i),   c_k <- normalize(alpha_t m_k + (1 - alpha_t) c_k),
    alpha_t = alpha0 * decay^(t / 1000), t the number of updates made before this one.
These materialise N x K x D; the kernels must agree with them.
"""

from __future__ import annotations

import torch

from .._spec import NORM_EPS, SPHERE_METRICS  # noqa: F401 (NORM_EPS re-exported)

METRICS = SPHERE_METRICS


def normalize(z: torch.Tensor) -> torch.Tensor:
    """z / max(|z|, 1e-12), row by row."""
    return z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(NORM_EPS)


def sphere_distances(x: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """d [N, K] between unit rows x [N, D] and unit centroids [K, D]."""
    if metric == "cosine":
        return 1.0 - x @ centroids.T
    chord = torch.linalg.vector_norm(x[:, None, :] - centroids[None, :, :], dim=-1)
    if metric == "euclidean":
        return chord
    if metric == "great_circle":
        across = torch.linalg.vector_norm(x[:, None, :] + centroids[None, :, :], dim=-1)
        return 2.0 * torch.atan2(chord, across)
    raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRICS)}")


def n_centroids_rows(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, *,
                     metric: str = "great_circle", use_negatives: bool = True) -> torch.Tensor:
    """L_i = d(c_{y_i}, x_i) - g (min_{k != y_i} d(c_k, x_i) + mean_{k != y_i} d(c_k, x_i)),
    [N] (g = 1 with negatives, else 0)."""
    x = normalize(z)
    d = sphere_distances(x, centroids.to(x.dtype), metric)
    own = d.gather(1, labels[:, None])[:, 0]
    if not use_negatives:
        return own
    k = d.shape[1]
    if k < 2:
        raise ValueError("negatives need at least 2 centroids (K >= 2)")
    is_own = torch.zeros_like(d, dtype=torch.bool).scatter_(1, labels[:, None], True)
    hardest = d.masked_fill(is_own, float("inf")).min(1).values
    mean_negative = d.masked_fill(is_own, 0.0).sum(1) / (k - 1)
    return own - hardest - mean_negative


def n_centroids_loss(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, *,
                     metric: str = "great_circle", use_negatives: bool = True) -> torch.Tensor:
    """mean_i [d(c_{y_i}, x_i) - g (min_{k != y_i} d(c_k, x_i) + mean_{k != y_i} d(c_k, x_i))]."""
    return n_centroids_rows(z, labels, centroids, metric=metric,
                            use_negatives=use_negatives).mean()


def ema_alpha(step: int | torch.Tensor, alpha0: float = 0.25,
              decay: float = 0.65) -> float | torch.Tensor:
    """alpha_t = alpha0 * decay^(t / 1000) (a tensor for a tensor step)."""
    return alpha0 * decay ** (step / 1000.0)


@torch.no_grad()
def ema_update(centroids: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
               alpha: float) -> torch.Tensor:
    """The centroids after one EMA step (a new tensor), class by class in a plain loop."""
    x = normalize(z.to(centroids.dtype))
    out = centroids.clone()
    for k in labels.unique().tolist():
        m = normalize(x[labels == k].mean(0))
        out[k] = normalize(alpha * m + (1.0 - alpha) * centroids[k])
    return out

"""Affinity loss (Hayat et al., ICCV 2019), docs/math.md, "Affinity loss": the readable definition.

Prototypes W [C, m, D]; s_ijt = |f_i - w_jt|^2 (the Gram form
|f|^2 + |w|^2 - 2 f.w, clamped at 0, as hand-written PyTorch computes it);
    d_ij = exp(-min_t s_ijt / sigma)            (similarity="gaussian")
    d_ij = 1 / (1 + min_t s_ijt / sigma)        (similarity="inverse")
    L_i  = sum_{j != y_i} relu(margin + d_ij - d_{i y_i})
    R(W) = (1/M) sum_{p<q} (|w_p - w_q|^2 - mu)^2, mu the mean over the M = P(P-1)/2 pairs
    loss = mean_i L_i + lambda_div R(W)
These materialise N x (C m); the kernels must agree with them.
"""

from __future__ import annotations

import torch

from .pairwise import _upcast

# Similarity names, and the codes the Triton kernels use for them (the C++ ops
# take the name and map it themselves).
SIMILARITIES = {"gaussian": 0, "inverse": 1}


def squared_distances(f: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """s [N, C, m] = |f_i - w_jt|^2 in the Gram form, clamped at 0."""
    f, w = _upcast(f), _upcast(prototypes)
    c, m, d = w.shape
    flat = w.reshape(c * m, d)
    s = (f * f).sum(1, keepdim=True) + (flat * flat).sum(1) - 2.0 * f @ flat.T
    return s.clamp_min(0).reshape(-1, c, m)


def similarity(s: torch.Tensor, sigma: float, kind: str = "gaussian") -> torch.Tensor:
    """d = exp(-s / sigma) or 1 / (1 + s / sigma)."""
    if kind == "gaussian":
        return torch.exp(-s / sigma)
    if kind == "inverse":
        return 1.0 / (1.0 + s / sigma)
    raise ValueError(f"unknown similarity {kind!r}; expected one of {list(SIMILARITIES)}")


def class_affinity(f: torch.Tensor, prototypes: torch.Tensor, *, sigma: float = 10.0,
                   similarity_kind: str = "gaussian") -> torch.Tensor:
    """d [N, C]: the similarity of the closest prototype of each class (the min
    over t routes the gradient to the first arg-min, as torch.min does)."""
    smin = squared_distances(f, prototypes).min(dim=2).values
    return similarity(smin, sigma, similarity_kind)


def affinity_hinge_rows(f: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, *,
                        sigma: float = 10.0, margin: float = 0.75,
                        similarity_kind: str = "gaussian") -> torch.Tensor:
    """L [N]: L_i = sum_{j != y_i} relu(margin + d_ij - d_{i y_i})."""
    d = class_affinity(f, prototypes, sigma=sigma, similarity_kind=similarity_kind)
    d_true = d.gather(1, labels.view(-1, 1))
    hinge = torch.relu(margin + d - d_true)
    own = torch.nn.functional.one_hot(labels, d.shape[1]).bool()
    return torch.where(own, torch.zeros_like(hinge), hinge).sum(1)


def diversity_regularizer(prototypes: torch.Tensor) -> torch.Tensor:
    """R(W) from its definition: the variance of the squared distances over all
    pairs p < q of the P = C m prototypes (0 when P < 2)."""
    w = _upcast(prototypes).reshape(-1, prototypes.shape[-1])
    p = w.shape[0]
    if p < 2:
        return w.sum() * 0.0
    i, j = torch.triu_indices(p, p, offset=1, device=w.device)
    sq = (w[i] - w[j]).square().sum(1)
    return (sq - sq.mean()).square().mean()


def affinity_loss(f: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, *,
                  sigma: float = 10.0, margin: float = 0.75, lambda_diversity: float = 1.0,
                  similarity_kind: str = "gaussian") -> torch.Tensor:
    """mean_i L_i + lambda_diversity R(W)."""
    rows = affinity_hinge_rows(f, labels, prototypes, sigma=sigma, margin=margin,
                               similarity_kind=similarity_kind)
    loss = rows.mean()
    if lambda_diversity:
        loss = loss + lambda_diversity * diversity_regularizer(prototypes).to(loss.dtype)
    return loss

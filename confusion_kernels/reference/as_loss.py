"""Reference ASLoss terms (docs/math.md, "ASLoss"), straight from the N x N distance
matrix and label masks. The fused path (``confusion_kernels.as_loss_terms``)
computes the same numbers from O(N) per-row sums."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .pairwise import _upcast, pairwise_distances


class ASLossTerms(NamedTuple):
    """inner: mean intra-class distance; outer: mean inter-class distance;
    boundary: mean (|x_i| - R)^2."""

    inner: torch.Tensor
    outer: torch.Tensor
    boundary: torch.Tensor


def _masked_mean(dist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum()
    total = torch.where(mask, dist, 0.0).sum()
    return total / count if count > 0 else total * 0.0


def as_loss_terms(x: torch.Tensor, labels: torch.Tensor, *, metric: str = "euclidean",
                  constraint: float = 10.0, include_self: bool = False,
                  reduction: str = "pair_mean", dim_mean: bool = False,
                  ref: torch.Tensor | None = None,
                  ref_labels: torch.Tensor | None = None) -> ASLossTerms:
    """inner = mean D over same-class pairs (i != j unless include_self),
    outer = mean D over different-class pairs, boundary = mean (|x_i|_2 - R)^2.
    ``reduction="class_mean"`` averages per class first (classes weigh the same).
    With ``ref`` [M, D] whose first N rows are x (a batch followed by a memory), the pairs
    are (row i of x, row j of ref), j = i being the pair left out."""
    x = _upcast(x)
    n = x.shape[0]
    if ref is None:
        ref, ref_labels = x, labels
    dist = pairwise_distances(x, _upcast(ref), metric=metric, dim_mean=dim_mean)
    same = labels[:, None] == ref_labels[None, :]
    diagonal = torch.eye(n, ref.shape[0], dtype=torch.bool, device=x.device)
    intra = same if include_self else same & ~diagonal
    inter = ~same
    if reduction == "pair_mean":
        inner = _masked_mean(dist, intra)
        outer = _masked_mean(dist, inter)
    elif reduction == "class_mean":
        inner_parts, outer_parts = [], []
        for c in torch.unique(labels):
            rows = labels == c
            row_intra = intra & rows[:, None]
            row_inter = inter & rows[:, None]
            if row_intra.any():
                inner_parts.append(_masked_mean(dist, row_intra))
            if row_inter.any():
                outer_parts.append(_masked_mean(dist, row_inter))
        zero = dist.sum() * 0.0
        inner = torch.stack(inner_parts).mean() if inner_parts else zero
        outer = torch.stack(outer_parts).mean() if outer_parts else zero
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    boundary = (torch.linalg.vector_norm(x, dim=1) - constraint).square().mean()
    return ASLossTerms(inner, outer, boundary)


def as_loss(x: torch.Tensor, labels: torch.Tensor, *, lambda_inner: float = 1e-3,
            lambda_outer: float = 1e-3, lambda_boundary: float = 1e-2, **kwargs) -> torch.Tensor:
    """lambda_inner * inner - lambda_outer * outer + lambda_boundary * boundary."""
    t = as_loss_terms(x, labels, **kwargs)
    return lambda_inner * t.inner - lambda_outer * t.outer + lambda_boundary * t.boundary

"""ASLoss (Aggregation-Separation Loss), SPEC section 2, on the fused op.

    inner    = sum_i S_in[i]  / n_in      n_in  = sum_c n_c (n_c - 1)  (+ N with include_self)
    outer    = sum_i S_out[i] / n_out     n_out = N^2 - sum_c n_c^2
    boundary = mean_i (|x_i|_2 - R)^2
    ASLoss   = lambda_inner * inner - lambda_outer * outer + lambda_boundary * boundary

``reduction="class_mean"`` averages per class first, so every class weighs the
same whatever its size. Memory is O(N*D): S_in / S_out are per-row sums.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops.intra_inter_sums import intra_inter_sums
from ..reference.as_loss import ASLossTerms
from .._validation import check_embeddings, check_labels, output_dtype

REDUCTIONS = ("pair_mean", "class_mean")


def _safe_ratio(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, 0 where count == 0."""
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def as_loss_terms(x: torch.Tensor, labels: torch.Tensor, *, metric: str = "euclidean",
                  constraint: float = 10.0, include_self: bool = False,
                  reduction: str = "pair_mean", dim_mean: bool = False, backend: str = "auto",
                  check_finite: bool = True) -> ASLossTerms:
    """The three ASLoss terms (inner, outer, boundary) of embeddings x [N, D].

    Each term is a 0-d tensor (float32 for fp16/bf16 inputs, else x's dtype).
    ``inner`` is 0 when no class has two samples, ``outer`` 0 for a single class.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    check_embeddings(x, "x", check_finite=check_finite)
    labels = check_labels(labels, x.shape[0], x.device)
    s_in, s_out = intra_inter_sums(x, labels, metric, dim_mean=dim_mean, backend=backend,
                                   check_finite=False)
    n = x.shape[0]
    _, class_index, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    counts = counts.to(s_in.dtype)
    self_pairs = 1.0 if include_self else 0.0
    if reduction == "pair_mean":
        n_in = (counts * (counts - 1)).sum() + self_pairs * n
        n_out = n * n - counts.square().sum()
        inner = _safe_ratio(s_in.sum(), n_in)
        outer = _safe_ratio(s_out.sum(), n_out)
    else:
        num_classes = counts.shape[0]
        class_in = s_in.new_zeros(num_classes).index_add(0, class_index, s_in)
        class_out = s_out.new_zeros(num_classes).index_add(0, class_index, s_out)
        pairs_in = counts * (counts - 1) + self_pairs * counts
        pairs_out = counts * (n - counts)
        inner = _class_mean(class_in, pairs_in)
        outer = _class_mean(class_out, pairs_out)
    xf = x.to(output_dtype(x.dtype))
    boundary = (torch.linalg.vector_norm(xf, dim=1) - constraint).square().mean()
    return ASLossTerms(inner, outer, boundary)


def _class_mean(class_sums: torch.Tensor, class_pairs: torch.Tensor) -> torch.Tensor:
    """Mean over classes with at least one pair of (class sum / class pairs)."""
    has_pairs = class_pairs > 0
    per_class = _safe_ratio(class_sums, class_pairs)
    return _safe_ratio(per_class.sum(), has_pairs.sum().to(per_class.dtype))


def as_loss(x: torch.Tensor, labels: torch.Tensor, *, lambda_inner: float = 1e-3,
            lambda_outer: float = 1e-3, lambda_boundary: float = 1e-2, **kwargs) -> torch.Tensor:
    """ASLoss = lambda_inner * inner - lambda_outer * outer + lambda_boundary * boundary.

    ``kwargs`` are those of :func:`as_loss_terms`.
    """
    t = as_loss_terms(x, labels, **kwargs)
    return lambda_inner * t.inner - lambda_outer * t.outer + lambda_boundary * t.boundary


class ASLoss(nn.Module):
    """Aggregation-Separation Loss over one representation or a list of layers.

    ``forward(x, labels)`` with x [N, D], or a list [x_1, x_2, ...] of
    [N, D_l] representations summed with ``layer_weights`` (default 1 each).
    The paper trains with ``0.5 * cross_entropy + 0.5 * ASLoss``.
    ``last_terms`` holds the terms of the last call (one ASLossTerms per layer).
    """

    def __init__(self, metric: str = "euclidean", *, lambda_inner: float = 1e-3,
                 lambda_outer: float = 1e-3, lambda_boundary: float = 1e-2,
                 constraint: float = 10.0, include_self: bool = False,
                 reduction: str = "pair_mean", dim_mean: bool = False,
                 layer_weights: Sequence[float] | None = None, backend: str = "auto",
                 check_finite: bool = True) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
        self.metric = metric
        self.lambda_inner = lambda_inner
        self.lambda_outer = lambda_outer
        self.lambda_boundary = lambda_boundary
        self.constraint = constraint
        self.include_self = include_self
        self.reduction = reduction
        self.dim_mean = dim_mean
        self.layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]
        self.backend = backend
        self.check_finite = check_finite
        self.last_terms: list[ASLossTerms] = []

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        layers = [x] if isinstance(x, torch.Tensor) else list(x)
        if not layers:
            raise ValueError("ASLoss needs at least one representation")
        weights = self.layer_weights if self.layer_weights is not None else [1.0] * len(layers)
        if len(weights) != len(layers):
            raise ValueError(f"layer_weights has {len(weights)} entries for {len(layers)} layers")
        total = None
        self.last_terms = []
        for weight, rep in zip(weights, layers):
            t = as_loss_terms(rep, labels, metric=self.metric, constraint=self.constraint,
                              include_self=self.include_self, reduction=self.reduction,
                              dim_mean=self.dim_mean, backend=self.backend,
                              check_finite=self.check_finite)
            self.last_terms.append(t)
            loss = (self.lambda_inner * t.inner - self.lambda_outer * t.outer
                    + self.lambda_boundary * t.boundary)
            total = weight * loss if total is None else total + weight * loss
        return total

    def extra_repr(self) -> str:
        return (f"metric={self.metric!r}, lambda_inner={self.lambda_inner}, "
                f"lambda_outer={self.lambda_outer}, lambda_boundary={self.lambda_boundary}, "
                f"constraint={self.constraint}, reduction={self.reduction!r}")

"""Affinity loss (max-margin Gaussian affinity to class prototypes; docs/math.md, "Affinity loss").

    d_ij = exp(-min_t |f_i - w_jt|^2 / sigma)                 (or 1 / (1 + s / sigma))
    loss = (1/N) sum_i sum_{j != y_i} relu(margin + d_ij - d_{i y_i}) + lambda_div R(W)
    R(W) = variance of |w_p - w_q|^2 over the pairs p < q of all P = C m prototypes
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .._routing import diversity_algorithm, route
from .._validation import (
    accumulation_dtype,
    autocast_off,
    check_all_finite,
    check_embeddings,
    check_label_range,
    check_labels,
    names_errors,
    output_dtype,
    scan_finite,
)
from ..ops.affinity_hinge import affinity_hinge_rows, affinity_hinge_sum
from ..reference import affinity as _reference


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'none'")


def _check_prototypes(prototypes: torch.Tensor, embedding_dim: int | None = None,
                      device: torch.device | None = None) -> None:
    if not isinstance(prototypes, torch.Tensor):
        raise TypeError(f"prototypes must be a torch.Tensor, got {type(prototypes).__name__}")
    if not prototypes.dtype.is_floating_point:
        raise TypeError(f"prototypes must be floating, got {prototypes.dtype}")
    if prototypes.dim() != 3 or 0 in prototypes.shape:
        raise ValueError("prototypes must be [C, m, D] with C >= 1 classes, m >= 1 centres and "
                         f"D >= 1 dimensions, got shape {tuple(prototypes.shape)}")
    if embedding_dim is not None and prototypes.shape[2] != embedding_dim:
        raise ValueError(f"prototypes have D = {prototypes.shape[2]} but the embeddings have "
                         f"D = {embedding_dim}")
    if device is not None and prototypes.device != device:
        raise ValueError(f"prototypes are on {prototypes.device} but the embeddings are on {device}")


def _check_similarity(sigma, similarity: str) -> float:
    """sigma as a float (Python and numpy numbers, 0-d tensors) after the checks."""
    if similarity not in _reference.SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; expected one of "
                         f"{list(_reference.SIMILARITIES)}")
    if isinstance(sigma, torch.Tensor) and sigma.numel() == 1 and sigma.dim() == 0:
        sigma = sigma.item()
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a real number (int, float, numpy scalar or 0-d tensor), "
                        f"got {type(sigma).__name__}")
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return sigma


def _centred_prototypes(prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [P, D] centred on its mean row, a = |w_p|^2 [P]), both float64."""
    w = prototypes.reshape(-1, prototypes.shape[-1]).double()
    w = w - w.mean(0, keepdim=True)
    return w, w.square().sum(1)


def diversity_moments(prototypes: torch.Tensor) -> torch.Tensor:
    """R(W) in closed form from moments of the centred prototypes, O(P D^2).

    With a_p = |w_p|^2 after centring (sum_p w_p = 0), s_pq = a_p + a_q - 2 w_p.w_q:
        S1 = sum_{p<q} s_pq   = P A1,                       A1 = sum_p a_p
        S2 = sum_{p<q} s_pq^2 = P A2 + A1^2 + 2 |W^T W|_F^2, A2 = sum_p a_p^2
        R  = S2 / M - (S1 / M)^2,  M = P (P - 1) / 2
    Centring removes the |sum_p w_p|^2 and (sum_p a_p w_p).(sum_p w_p) terms
    (R is shift invariant); everything is accumulated in float64.
    """
    if prototypes.shape[0] * prototypes.shape[1] < 2:
        return (prototypes.sum() * 0.0).to(output_dtype(prototypes.dtype))
    w, a = _centred_prototypes(prototypes)
    p = w.shape[0]
    a1, a2 = a.sum(), a.square().sum()
    gram = w.T @ w
    pairs = p * (p - 1) / 2.0
    s1 = p * a1
    s2 = p * a2 + a1 * a1 + 2.0 * gram.square().sum()
    mu = s1 / pairs
    return (s2 / pairs - mu * mu).to(output_dtype(prototypes.dtype))


def diversity_pairwise(prototypes: torch.Tensor) -> torch.Tensor:
    """R(W) over the dense P x P matrix of squared distances, O(P^2) memory.

    s_pq = a_p + a_q - 2 w_p.w_q of the centred prototypes in float64 (a_p = |w_p|^2),
    averaged over the off-diagonal entries (each pair twice). Dense products and
    masked sums only, so its gradient is bitwise reproducible (the index-based
    definition in ``reference`` accumulates its gradient with scatter-adds)
    and differentiable twice.
    """
    if prototypes.shape[0] * prototypes.shape[1] < 2:
        return (prototypes.sum() * 0.0).to(output_dtype(prototypes.dtype))
    w, a = _centred_prototypes(prototypes)
    p = w.shape[0]
    sq = a[:, None] + a[None, :] - 2.0 * (w @ w.T)
    off_diagonal = ~torch.eye(p, dtype=torch.bool, device=w.device)
    pairs = p * (p - 1)
    mu = torch.where(off_diagonal, sq, 0.0).sum() / pairs
    r = torch.where(off_diagonal, (sq - mu).square(), 0.0).sum() / pairs
    return r.to(output_dtype(prototypes.dtype))


@names_errors("diversity_regularizer")
def diversity_regularizer(prototypes: torch.Tensor, *, method: str = "auto") -> torch.Tensor:
    """R(W): the variance of the squared distances between all pairs of the
    P = C m prototypes [C, m, D] (0 when P < 2).

    method: "pairwise" (dense P x P squared distances, O(P^2 D) time, O(P^2)
    memory; diversity_pairwise), "moments" (closed form, O(P D^2);
    diversity_moments), or "auto" (moments when P > 2048 and P > D). Both are
    deterministic and twice differentiable.
    """
    _check_prototypes(prototypes)
    if method not in ("auto", "pairwise", "moments"):
        raise ValueError(f"method must be 'auto', 'pairwise' or 'moments', got {method!r}")
    if method == "auto":  # the router's rule (_routing.diversity_algorithm)
        method = diversity_algorithm(prototypes.shape[0] * prototypes.shape[1],
                                     prototypes.shape[2])
    if method == "moments":
        return diversity_moments(prototypes)
    return diversity_pairwise(prototypes)


@names_errors("class_affinity")
@autocast_off
def class_affinity(f: torch.Tensor, prototypes: torch.Tensor, *, sigma: float = 10.0,
                   similarity: str = "gaussian", chunk_rows: int = 4096) -> torch.Tensor:
    """d [N, C] in (0, 1]: the affinity of each row to its closest prototype of
    every class. Computed in row chunks (memory O(chunk_rows C m + N C));
    differentiable."""
    check_embeddings(f, "f")
    _check_prototypes(prototypes, f.shape[1], f.device)
    sigma = _check_similarity(sigma, similarity)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    prototypes = prototypes.to(accumulation_dtype(f.dtype))
    parts = [_reference.class_affinity(f[s:s + chunk_rows], prototypes, sigma=sigma,
                                       similarity_kind=similarity)
             for s in range(0, f.shape[0], chunk_rows)]
    return torch.cat(parts)


@names_errors("affinity_loss")
@autocast_off
def affinity_loss(f: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, *,
                  sigma: float = 10.0, margin: float = 0.75, lambda_diversity: float = 1.0,
                  similarity: str = "gaussian", backend: str = "auto",
                  check_finite: bool | None = None, reduction: str = "mean") -> torch.Tensor:
    """Affinity loss of embeddings f [N, D] with labels in [0, C) against
    prototypes [C, m, D]: mean_i L_i + lambda_diversity R(W).

    ``reduction="none"``: the per-row values L_i + lambda_diversity R(W) [N] (each row carries
    the whole regularizer, so their mean is the loss; with lambda_diversity=0 they are the
    per-row hinge losses).

    The hinge part runs fused on the chosen backend (no N x C m buffer on
    cpu / triton); gradients flow to f and to the prototypes. Returns a scalar,
    float32 for fp16/bf16 inputs.

    ``check_finite``: scan f and the prototypes for NaN/Inf first (ValueError). None (default):
    for CPU tensors and under ``strict_checks()``; on a GPU the data checks are left to the
    kernels (non-finite input or labels outside [0, C) give a NaN loss, no host wait).
    """
    check_embeddings(f, "f", check_finite=False)  # its type first: the scan reads f.device
    scan = scan_finite(check_finite, f)
    if scan:
        check_all_finite(f, "f")
    _check_prototypes(prototypes, f.shape[1], f.device)
    if scan:
        check_all_finite(prototypes, "prototypes")
    labels = check_labels(labels, f.shape[0], f.device)
    sigma = _check_similarity(sigma, similarity)
    if not (0 <= margin < 1):
        raise ValueError(f"margin must satisfy 0 <= margin < 1 (affinities lie in (0, 1]), got {margin}")
    _check_reduction(reduction)
    needs_grad = (torch.is_grad_enabled() and (f.requires_grad or prototypes.requires_grad)
                  and reduction == "mean")  # (per-row values: the rows algorithm)
    chosen = route("affinity_hinge", f, backend, needs_grad=needs_grad)
    # the kernel ops guard the range themselves; the reference indexes with torch
    check_label_range(labels, prototypes.shape[0], " (one prototype set per class)",
                      host=True if chosen.backend == "reference" else None)
    if reduction == "none":
        loss = affinity_hinge_rows(f, labels, prototypes, sigma=sigma, margin=margin,
                                   similarity=similarity, backend=chosen.backend,
                                   inputs_finite=scan)
    else:
        loss = affinity_hinge_sum(f, labels, prototypes, sigma=sigma, margin=margin,
                                  similarity=similarity, route=chosen,
                                  inputs_finite=scan) / f.shape[0]
    if lambda_diversity:
        loss = loss + lambda_diversity * diversity_regularizer(prototypes).to(loss.dtype)
    return loss


class AffinityLoss(nn.Module):
    """Affinity loss with learned prototypes [num_classes, num_centers, embedding_dim],
    initialised N(0, 1/embedding_dim).

    forward(f, labels) -> scalar loss; affinity(f) -> [N, C]; predict(f) -> [N] class ids.
    """

    def __init__(self, num_classes: int, embedding_dim: int, num_centers: int = 1,
                 sigma: float = 10.0, margin: float = 0.75, lambda_diversity: float = 1.0,
                 similarity: str = "gaussian", backend: str = "auto", reduction: str = "mean"):
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction
        if num_classes < 1 or embedding_dim < 1 or num_centers < 1:
            raise ValueError("num_classes, embedding_dim and num_centers must be >= 1")
        sigma = _check_similarity(sigma, similarity)
        if not (0 <= margin < 1):
            raise ValueError(f"margin must satisfy 0 <= margin < 1, got {margin}")
        self.sigma, self.margin, self.lambda_diversity = sigma, margin, lambda_diversity
        self.similarity, self.backend = similarity, backend
        self.prototypes = nn.Parameter(
            torch.randn(num_classes, num_centers, embedding_dim) / math.sqrt(embedding_dim))

    @names_errors("AffinityLoss")
    def forward(self, f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return affinity_loss(f, labels, self.prototypes, sigma=self.sigma, margin=self.margin,
                             lambda_diversity=self.lambda_diversity, similarity=self.similarity,
                             backend=self.backend, reduction=self.reduction)

    def affinity(self, f: torch.Tensor) -> torch.Tensor:
        return class_affinity(f, self.prototypes, sigma=self.sigma, similarity=self.similarity)

    @names_errors("AffinityLoss.predict")
    @torch.no_grad()
    def predict(self, f: torch.Tensor) -> torch.Tensor:
        return self.affinity(f).argmax(dim=1)

    def extra_repr(self) -> str:
        c, m, d = self.prototypes.shape
        return (f"num_classes={c}, num_centers={m}, embedding_dim={d}, sigma={self.sigma}, "
                f"margin={self.margin}, lambda_diversity={self.lambda_diversity}, "
                f"similarity={self.similarity!r}")

"""The fastest plain-PyTorch formulations a user would write, as baselines beside the readable
definitions (confusion_kernels.reference): the distance matrix from ``torch.cdist`` with its
default (matrix-product) mode or from the Gram form ``x @ y.T``, then masked row sums. The
reference keeps the exact difference-form distances (``donot_use_mm_for_euclid_dist``) for its
accuracy; a user after speed would not, so the suite times both and compares ours with the
faster (benchmarks/run.py: "vs eager", "vs compile").

Memory O(N x M), like the reference. Metrics without a plain form faster than the reference
(smooth_l1) return None from ``has_plain_form``'s check and get no plain provider.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

PLAIN_METRICS = ("euclidean", "sqeuclidean", "manhattan", "cosine")


def has_plain_form(metric: str) -> bool:
    return metric in PLAIN_METRICS


def distances(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """D [N, M] the way a user writes it for speed."""
    if metric == "euclidean":
        return torch.cdist(x, y)
    if metric == "sqeuclidean":
        return ((x * x).sum(1, keepdim=True) + (y * y).sum(1) - 2.0 * x @ y.T).clamp_min(0)
    if metric == "manhattan":
        return torch.cdist(x, y, p=1.0)
    if metric == "cosine":
        return 1.0 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
    raise ValueError(f"no plain formulation for {metric!r}")


def row_sums(x: torch.Tensor, labels: torch.Tensor, metric: str, ref: torch.Tensor | None = None,
             ref_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_in, S_out) of intra_inter_sums from the distance matrix and a label mask (the square
    form leaves the diagonal out; the rectangular form keeps every pair)."""
    square = ref is None
    ref, ref_labels = (x, labels) if square else (ref, ref_labels)
    d = distances(x, ref, metric)
    same = labels[:, None] == ref_labels[None, :]
    other = ~same
    if square:
        same = same & ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return (d * same).sum(1), (d * other).sum(1)


def as_loss(x: torch.Tensor, labels: torch.Tensor, metric: str, lambda_inner: float = 1e-3,
            lambda_outer: float = 1e-3, lambda_boundary: float = 1e-2,
            constraint: float = 10.0) -> torch.Tensor:
    """ASLoss (pair_mean) from the distance matrix: masked means and the boundary term."""
    d = distances(x, x, metric)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    same = (labels[:, None] == labels[None, :]) & ~eye
    other = labels[:, None] != labels[None, :]
    inner = (d * same).sum() / same.sum().clamp_min(1)
    outer = (d * other).sum() / other.sum().clamp_min(1)
    boundary = (torch.linalg.vector_norm(x, dim=1) - constraint).square().mean()
    return lambda_inner * inner - lambda_outer * outer + lambda_boundary * boundary


def pml_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("pytorch_metric_learning") is not None


def pml_contrastive_as_loss(x: torch.Tensor, labels: torch.Tensor,
                            lambda_inner: float = 1e-3, lambda_outer: float = 1e-3,
                            lambda_boundary: float = 1e-2, constraint: float = 10.0):
    """The euclidean ASLoss through pytorch-metric-learning's ContrastiveLoss (the peer users
    know): with pos_margin 0, a neg_margin far above every distance and unnormalised
    euclidean distances, its positive and negative parts are the mean same-class distance and
    a constant minus the mean other-class distance, so with equal lambdas this has ASLoss's
    gradient (its value is off by the constant lambda_outer * NEG_MARGIN). None when PML is not
    installed."""
    try:
        from pytorch_metric_learning import distances, losses
    except ImportError:
        return None
    if lambda_inner != lambda_outer:
        raise ValueError("the ContrastiveLoss peer weighs both pair terms alike")
    loss = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=NEG_MARGIN,
                                  distance=distances.LpDistance(normalize_embeddings=False))
    boundary = (torch.linalg.vector_norm(x, dim=1) - constraint).square().mean()
    return lambda_inner * loss(x, labels) + lambda_boundary * boundary


NEG_MARGIN = 1e6


def retrieval_topk(x: torch.Tensor, k: int, chunk: int = 4096,
                   topk: Callable | None = None) -> torch.Tensor:
    """Self-retrieval the way a user writes it: the unit rows' Gram product in row chunks,
    the diagonal masked, ``torch.topk`` of each chunk (``topk``: a compiled chunk step).
    Returns the indices [N, k] of the k most similar other rows."""
    u = torch.nn.functional.normalize(x, dim=1)
    step = topk or _chunk_topk
    return torch.cat([step(u[r0:r0 + chunk], u, r0, k) for r0 in range(0, u.shape[0], chunk)])


def _chunk_topk(rows: torch.Tensor, u: torch.Tensor, r0: int, k: int) -> torch.Tensor:
    sim = rows @ u.T
    idx = torch.arange(rows.shape[0], device=rows.device)
    sim[idx, idx + r0] = float("-inf")
    return torch.topk(sim, k, dim=1).indices

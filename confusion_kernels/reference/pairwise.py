"""Reference pairwise distances (docs/math.md, "Distances"): plain PyTorch, N x M memory.

Gradients are PyTorch's own: at a = b the euclidean and manhattan distances
have gradient 0 (``cdist``'s subgradient convention), as the kernels do.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._metrics import COSINE_EPS, resolve_metric


@functools.lru_cache(maxsize=None)
def cdist_twice_differentiable() -> bool:
    """Whether this torch differentiates torch.cdist twice (torch 2.6 does not)."""
    a = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(torch.cdist(a, a).sum(), a, create_graph=True)
        try:
            torch.autograd.grad(g.sum(), a)
        except NotImplementedError:  # "the derivative for '_cdist_backward' is not implemented"
            return False
    return True


def pairwise_distances(x: torch.Tensor, y: torch.Tensor | None = None,
                       metric: str = "euclidean", *, dim_mean: bool = False) -> torch.Tensor:
    """D[i, j] = D(x_i, y_j) for x [N, D], y [M, D] (y = x when omitted) -> [N, M].

    euclidean |a-b|_2, sqeuclidean |a-b|^2, manhattan sum|a_k-b_k|,
    cosine 1 - a.b / max(|a||b|, 1e-8) (computed as |a/|a| - b/|b||^2 / 2 where |a||b| > 1e-8,
    the same number without the cancellation), smooth_l1 sum h(a_k-b_k) with
    h(t) = t^2/2 if |t| < 1 else |t| - 1/2. ``dim_mean`` divides by D.
    """
    name, _, dim_mean = resolve_metric(metric, dim_mean)
    y = x if y is None else y
    if name == "euclidean":
        dist = torch.cdist(x, y, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    elif name == "sqeuclidean":
        dist = torch.cdist(x, y, p=2.0, compute_mode="donot_use_mm_for_euclid_dist").square()
    elif name == "manhattan":
        dist = torch.cdist(x, y, p=1.0)
    elif name == "cosine":
        nx, ny = torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(y, dim=1)
        norms = nx[:, None] * ny[None, :]
        gram = 1.0 - (x @ y.T) / norms.clamp_min(COSINE_EPS)
        if cdist_twice_differentiable():
            # 1 - cos = |u - v|^2 / 2 for the unit rows u, v: from their difference, so that
            # near-parallel rows keep their digits (1 - a.b / (|a||b|) cancels: in fp32 it
            # lost every digit); the eps branch |a||b| <= 1e-8 keeps the formula above.
            # (Where torch cannot differentiate cdist twice, the formula above stays, so that
            # the reference keeps its second derivatives.)
            tiny = torch.finfo(nx.dtype).tiny
            u, v = x / nx.clamp_min(tiny)[:, None], y / ny.clamp_min(tiny)[:, None]
            half_sq = torch.cdist(u, v, p=2.0,
                                  compute_mode="donot_use_mm_for_euclid_dist").square() / 2
            dist = torch.where(norms > COSINE_EPS, half_sq, gram)
        else:
            dist = gram
    else:  # smooth_l1
        dist = F.smooth_l1_loss(x[:, None, :].expand(-1, y.shape[0], -1),
                                y[None, :, :].expand(x.shape[0], -1, -1),
                                reduction="none", beta=1.0).sum(-1)
    if dim_mean:
        dist = dist / x.shape[1]
    return dist


def paired_distances(a: torch.Tensor, b: torch.Tensor, metric: str = "euclidean", *,
                     dim_mean: bool = False) -> torch.Tensor:
    """d[k] = D(a_k, b_k) for rows a [P, D], b [P, D] -> [P]: the distances of P given pairs
    (mined pairs), O(P*D) memory, the same definitions as ``pairwise_distances`` (at a = b the
    euclidean and manhattan distances have gradient 0, as there)."""
    name, _, dim_mean = resolve_metric(metric, dim_mean)
    diff = a - b
    if name == "euclidean":
        sq = diff.square().sum(1)
        dist = torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), 0.0)
    elif name == "sqeuclidean":
        dist = diff.square().sum(1)
    elif name == "manhattan":
        dist = diff.abs().sum(1)
    elif name == "cosine":
        na, nb = torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1)
        norms = na * nb
        tiny = torch.finfo(na.dtype).tiny
        u, v = a / na.clamp_min(tiny)[:, None], b / nb.clamp_min(tiny)[:, None]
        gram = 1.0 - (a * b).sum(1) / norms.clamp_min(COSINE_EPS)
        dist = torch.where(norms > COSINE_EPS, (u - v).square().sum(1) / 2, gram)
    else:  # smooth_l1
        dist = F.smooth_l1_loss(a, b, reduction="none", beta=1.0).sum(1)
    if dim_mean:
        dist = dist / a.shape[1]
    return dist


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def intra_inter_sums(x: torch.Tensor, labels: torch.Tensor, metric: str = "euclidean", *,
                     dim_mean: bool = False, ref: torch.Tensor | None = None,
                     ref_labels: torch.Tensor | None = None,
                     self_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """S_in[i] = sum_{j != i, y_j = y_i} D(x_i, x_j), S_out[i] = sum_{y_j != y_i} D(x_i, x_j).

    With ``ref`` [M, D] and ``ref_labels`` [M] the columns are the rows r_j of ref
    (labels z_j): S_in[i] = sum_{z_j = y_i} D(x_i, r_j), S_out[i] = sum_{z_j != y_i} D(x_i, r_j),
    leaving out the pair (i, self_offset + i) when ``self_offset`` is given (x_i is
    r_{self_offset + i}). The square form is ref = x, ref_labels = labels, self_offset = 0.
    fp16/bf16 inputs are computed in float32.
    """
    if ref is None:
        ref, ref_labels, self_offset = x, labels, 0
    dist = pairwise_distances(_upcast(x), _upcast(ref), metric=metric, dim_mean=dim_mean)
    same = labels[:, None] == ref_labels[None, :]
    keep = torch.ones_like(same)
    if self_offset is not None:
        rows = torch.arange(x.shape[0], device=x.device)
        keep[rows, rows + self_offset] = False
    s_in = torch.where(same & keep, dist, 0.0).sum(1)
    s_out = torch.where(same | ~keep, 0.0, dist).sum(1)
    return s_in, s_out

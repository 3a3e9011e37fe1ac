"""Retrieval: the nearest references of each query, and the metric-learning scores of them.

Queries q_i [N, D] with labels y_i, references r_j [M, D] with labels z_j, a distance d
(euclidean, sqeuclidean or cosine: ``distances``). The neighbours of q_i are the
references in the order of (d(q_i, r_j), j): nearer first, and between equal distances the
lower reference index first. With ``self_offset = o`` query i is reference o + i and is not a
neighbour of itself (self-retrieval: o = 0, the queries are the references).

From the first neighbours n_i(1), n_i(2), ... and rel_i(t) = [z_{n_i(t)} = y_i]:

    R_i         = #{j != o + i : z_j = y_i}          (the references relevant to q_i)
    P@1         = mean_i rel_i(1)
    R-precision = mean_i (1 / R_i) sum_{t <= R_i} rel_i(t)
    MAP@R       = mean_i (1 / R_i) sum_{t <= R_i} rel_i(t) P_i(t),  P_i(t) = (1/t) sum_{u <= t} rel_i(u)
    recall@k    = mean_i max_{t <= k} rel_i(t)

(MAP@R: Musgrave, Belongie and Lim, "A Metric Learning Reality Check", ECCV 2020.) A query with
R_i = 0 has nothing to retrieve and is left out of every mean, as pytorch-metric-learning's
AccuracyCalculator does. With ``per_class`` each mean is over classes of the per-class means
(its ``avg_of_avgs``).

``nearest_neighbors`` here holds a row chunk's full distance row block; the kernels
(ops/nearest_neighbors.py) stream the references instead. ``scores_from_neighbors`` is shared
by every backend: the scores are O(N K) arithmetic on the neighbours' labels.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .pairwise import pairwise_distances

# rows of queries whose distance block [rows, M] the reference holds at once
REFERENCE_ROW_CHUNK = 1024
# queries scored at once (a few [chunk, K] float64 tables)
SCORE_ROW_CHUNK = 4096


def distances(query: torch.Tensor, reference: torch.Tensor, metric: str) -> torch.Tensor:
    """[N, M]: euclidean |q - r|, sqeuclidean |q - r|^2, or cosine 1 - q.r / (|q| |r|),
    computed as |q/|q| - r/|r||^2 / 2 (no cancellation for near-parallel rows), and 1 where
    a row is zero (norm below 1e-12, F.normalize's eps)."""
    if metric != "cosine":
        return pairwise_distances(query, reference, metric)
    u = torch.nn.functional.normalize(query, dim=1)
    v = torch.nn.functional.normalize(reference, dim=1)
    half_sq = torch.cdist(u, v, compute_mode="donot_use_mm_for_euclid_dist").square() / 2
    zero = (u.square().sum(1) == 0)[:, None] | (v.square().sum(1) == 0)[None, :]
    return torch.where(zero, torch.ones_like(half_sq), half_sq)


def neighbor_count(k: int, m: int, self_offset: int | None) -> int:
    """K = min(k, M - [self_offset given]): the neighbours a query has among M references."""
    return max(0, min(k, m - (1 if self_offset is not None else 0)))


def nearest_neighbors(query: torch.Tensor, reference: torch.Tensor, k: int, metric: str,
                      self_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances [N, K], indices [N, K]) of the K = ``neighbor_count`` nearest references of
    each query, ordered by (distance, index)."""
    n = query.shape[0]
    kk = neighbor_count(k, reference.shape[0], self_offset)
    dists, idxs = [], []
    for r0 in range(0, n, REFERENCE_ROW_CHUNK):
        block = distances(query[r0:r0 + REFERENCE_ROW_CHUNK], reference, metric)
        if self_offset is not None:
            rows = torch.arange(block.shape[0], device=block.device)
            block = block.clone()
            block[rows, self_offset + r0 + rows] = float("inf")
        # a stable sort keeps equal distances in index order
        values, order = torch.sort(block, dim=1, stable=True)
        dists.append(values[:, :kk])
        idxs.append(order[:, :kk])
    if not dists:
        return query.new_empty(0, kk), torch.empty(0, kk, dtype=torch.long, device=query.device)
    return torch.cat(dists), torch.cat(idxs)


def relevant_counts(query_labels: torch.Tensor, reference_labels: torch.Tensor,
                    self_retrieval: bool) -> torch.Tensor:
    """R_i: the references sharing q_i's label, its own row left out when self-retrieving."""
    classes, counts = torch.unique(reference_labels, return_counts=True)
    pos = torch.searchsorted(classes, query_labels).clamp_max(classes.numel() - 1)
    found = classes[pos] == query_labels
    r = torch.where(found, counts[pos], torch.zeros_like(counts[pos]))
    return r - 1 if self_retrieval else r


def _class_means(values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(classes.numel(), dtype=values.dtype, device=values.device)
    sums.index_add_(0, inverse, values)
    counts = torch.bincount(inverse, minlength=classes.numel()).to(values.dtype)
    return classes, sums / counts


def _per_query(idx: torch.Tensor, y: torch.Tensor, r: torch.Tensor,
               reference_labels: torch.Tensor, ks: Sequence[int]) -> dict:
    """Each score of the queries with neighbours idx [Q, K], labels y, R_i = r (float64)."""
    rel = (reference_labels[idx] == y[:, None]).to(torch.float64)  # [Q, K]
    kk = rel.shape[1]
    t = torch.arange(1, kk + 1, dtype=torch.float64, device=rel.device)
    within_r = (t[None, :] <= r[:, None]).to(torch.float64)
    precision_at_t = rel.cumsum(1) / t
    out = {
        "precision_at_1": rel[:, 0] if kk else torch.zeros_like(r),
        "r_precision": (rel * within_r).sum(1) / r,
        "mean_average_precision_at_r": (rel * precision_at_t * within_r).sum(1) / r,
    }
    for k in ks:
        out[f"recall_at_{k}"] = rel[:, :k].amax(1) if kk else torch.zeros_like(r)
    return out


def scores_from_neighbors(neighbor_indices: torch.Tensor, query_labels: torch.Tensor,
                          reference_labels: torch.Tensor, relevant: torch.Tensor,
                          ks: Sequence[int], per_class: bool = False) -> dict:
    """P@1, R-precision, MAP@R and recall@k (module docstring) from the neighbours [N, K] in
    order, K >= max(R_i) and K >= max(ks) unless fewer references exist."""
    kept = relevant > 0
    idx = neighbor_indices[kept]
    y = query_labels[kept]
    r = relevant[kept].to(torch.float64)
    parts = [_per_query(idx[q0:q0 + SCORE_ROW_CHUNK], y[q0:q0 + SCORE_ROW_CHUNK],
                        r[q0:q0 + SCORE_ROW_CHUNK], reference_labels, ks)
             for q0 in range(0, max(1, idx.shape[0]), SCORE_ROW_CHUNK)]
    per_query = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    result: dict = {}
    classes = None
    for name, values in per_query.items():
        if per_class:
            classes, means = _class_means(values, y)
            result[name] = float(means.mean()) if means.numel() else float("nan")
            result.setdefault("per_class", {})[name] = means
        else:
            result[name] = float(values.mean()) if values.numel() else float("nan")
    if per_class:
        result["classes"] = classes if classes is not None else y.new_empty(0)
    result["num_queries"] = int(kept.sum())
    result["num_left_out"] = int((~kept).sum())
    return result


def retrieval_metrics(query: torch.Tensor, query_labels: torch.Tensor,
                      reference: torch.Tensor | None = None,
                      reference_labels: torch.Tensor | None = None, *,
                      metric: str = "euclidean", k: Sequence[int] = (1, 5, 10),
                      per_class: bool = False) -> dict:
    """The scores of the module docstring from the full distance rows (readable definition)."""
    self_retrieval = reference is None
    ref = query if self_retrieval else reference
    ref_labels = query_labels if self_retrieval else reference_labels
    relevant = relevant_counts(query_labels, ref_labels, self_retrieval)
    depth = max([int(relevant.max()) if relevant.numel() else 0, *k, 1])
    _, idx = nearest_neighbors(query, ref, depth, metric, 0 if self_retrieval else None)
    return scores_from_neighbors(idx, query_labels, ref_labels, relevant, k, per_class)

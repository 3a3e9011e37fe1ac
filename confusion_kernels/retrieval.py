"""Retrieval at any scale: ``nearest_neighbors`` and ``retrieval_metrics`` (precision@1,
R-precision, MAP@R, recall@k) without the N x M distance matrix.

Definitions: confusion_kernels/reference/retrieval.py (and docs/math.md, "Retrieval"). The
fused kernel keeps, per query, the K nearest references over reference tiles, K = the largest
number of references relevant to a query (R) or the largest k asked, whichever is larger; the
scores are then O(N K) arithmetic on the neighbours' labels. Memory O((N + M) D + N K).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._backend import auto_requested, select_backend
from ._validation import check_embeddings, check_labels, names_errors
from .ops.nearest_neighbors import check_neighbor_inputs, max_neighbors, nearest_neighbors_rows
from .reference import retrieval as _reference

__all__ = ["nearest_neighbors", "retrieval_metrics"]


def _check_rows(query: torch.Tensor, reference: torch.Tensor | None) -> None:
    check_embeddings(query, "query", check_finite=False)
    if reference is not None:
        check_embeddings(reference, "reference", check_finite=False, count="M")


def _prepared(query: torch.Tensor, reference: torch.Tensor | None, k: int, metric: str,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, int | None, str]:
    """The rows the kernels take (``_check_rows`` already passed), the self offset and the
    backend."""
    self_offset = 0 if reference is None else None
    ref = query if reference is None else reference
    check_neighbor_inputs(query, ref, k, metric, self_offset)
    # no size threshold on CPU: the fused kernel was faster than the reference from N = 16 on
    chosen = select_backend(query, backend, op="nearest_neighbors")
    depth = _reference.neighbor_count(k, ref.shape[0], self_offset)
    most = max_neighbors(chosen)
    if most is not None and depth > most:
        if not auto_requested(backend):
            raise ValueError(f"nearest_neighbors: the {chosen} kernel keeps at most {most} "
                             f"neighbours per query, {depth} asked for (backend='auto' takes "
                             f"the reference in row chunks beyond)")
        chosen = "reference"  # more neighbours than the GPU kernels keep: row chunks
    q, r = query.detach(), ref.detach()
    if q.dtype not in (torch.float32, torch.float64):
        q, r = q.float(), r.float()
    if metric == "cosine":  # unit rows; a zero row stays zero (distance 1 to every reference)
        q = torch.nn.functional.normalize(q, dim=1)
        r = q if reference is None else torch.nn.functional.normalize(r, dim=1)
    return q, r, self_offset, chosen


@names_errors("nearest_neighbors")
def nearest_neighbors(query: torch.Tensor, reference: torch.Tensor | None = None, k: int = 10,
                      *, metric: str = "euclidean", backend: str = "auto"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest references of every query, without the N x M distance matrix.

    d(q, r) = |q - r| (euclidean), |q - r|^2 (sqeuclidean) or 1 - q.r / (|q| |r|) (cosine).
    Neighbours come in the order of (distance, reference index): between equal distances the
    lower index first. With ``reference=None`` the queries are the references and a query is
    not its own neighbour.

    Returns:
        (distances [N, K], indices [N, K]) with K = min(k, number of references available),
        distances in float32 (float64 for float64 inputs). No gradient.
    """
    _check_rows(query, reference)
    q, r, self_offset, chosen = _prepared(query, reference, k, metric, backend)
    return nearest_neighbors_rows(q, r, k, metric, self_offset, chosen)


def _depths(k: int | Sequence[int]) -> tuple[int, ...]:
    ks = (k,) if isinstance(k, int) and not isinstance(k, bool) else tuple(k)
    if not ks or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ks):
        raise ValueError(f"retrieval_metrics: k must be an integer >= 1 or a non-empty "
                         f"sequence of them, got {k!r}")
    return ks


@names_errors("retrieval_metrics")
def retrieval_metrics(query: torch.Tensor, query_labels: torch.Tensor,
                      reference: torch.Tensor | None = None,
                      reference_labels: torch.Tensor | None = None, *,
                      metric: str = "euclidean", k: int | Sequence[int] = (1, 5, 10),
                      per_class: bool = False, backend: str = "auto") -> dict:
    """Precision@1, R-precision, MAP@R and recall@k of retrieving ``reference`` by ``query``.

    For query i with label y_i, R_i references share its label (its own row left out when
    ``reference`` is None) and rel_i(t) says whether its t-th nearest does:

        precision_at_1              mean_i rel_i(1)
        r_precision                 mean_i (1/R_i) sum_{t<=R_i} rel_i(t)
        mean_average_precision_at_r mean_i (1/R_i) sum_{t<=R_i} rel_i(t) P_i(t)
        recall_at_{k}               mean_i [some t <= k has rel_i(t)]

    with P_i(t) the precision of the first t neighbours (MAP@R: Musgrave et al., "A Metric
    Learning Reality Check", 2020). Queries with R_i = 0 are left out of every mean (as
    pytorch-metric-learning's AccuracyCalculator does); ``num_left_out`` counts them.
    Neighbours are ordered by (distance, reference index) (``nearest_neighbors``).

    Args:
        query: [N, D] embeddings; query_labels: [N] integer labels.
        reference, reference_labels: [M, D] and [M]; None: the queries themselves.
        metric: "euclidean" | "sqeuclidean" | "cosine".
        k: the recall depths (an integer or a sequence of them).
        per_class: average each score per query class first, then over classes (PML's
            ``avg_of_avgs``); the result also holds ``classes`` and ``per_class``
            ({score: [C] tensor}).
        backend: "auto" | "reference" | "cpu" | "triton" | "cuda" (cpu: CPU tensors; cuda
            and triton: CUDA tensors, at most 1024 neighbours per query (triton: in registers
            up to 128, 32 with Triton before 3.5, a slower path beyond). "auto" takes cuda,
            else triton, on a GPU, and the reference in row chunks beyond 1024: O(1024 M)
            memory).

    Returns:
        {"precision_at_1", "r_precision", "mean_average_precision_at_r", "recall_at_{k}"...:
        float, "num_queries": int, "num_left_out": int}. Memory O((N + M) D + N K), K the
        largest R_i or k: a class holding most of the references makes K close to M.
    """
    ks = _depths(k)
    self_retrieval = reference is None
    if self_retrieval != (reference_labels is None):
        raise ValueError("retrieval_metrics: give reference and reference_labels together "
                         "(or neither, to retrieve among the queries)")
    ref = query if self_retrieval else reference
    ref_labels = query_labels if self_retrieval else reference_labels
    _check_rows(query, reference)
    query_labels = check_labels(query_labels, query.shape[0], query.device, "query_labels")
    if not self_retrieval:
        ref_labels = check_labels(ref_labels, ref.shape[0], ref.device, "reference_labels")
    else:
        ref_labels = query_labels
    if not isinstance(per_class, bool):
        raise TypeError(f"retrieval_metrics: per_class must be a bool, got {per_class!r}")
    relevant = _reference.relevant_counts(query_labels, ref_labels, self_retrieval)
    depth = max([int(relevant.max()) if relevant.numel() else 0, *ks])
    q, r, self_offset, chosen = _prepared(query, reference, depth, metric, backend)
    _, idx = nearest_neighbors_rows(q, r, depth, metric, self_offset, chosen)
    return _reference.scores_from_neighbors(idx, query_labels, ref_labels, relevant, ks,
                                            per_class)

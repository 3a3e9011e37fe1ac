"""``nearest_neighbors``: the k nearest references of every query, streamed (docs/math.md,
"Retrieval").

Queries q [N, D] against references r [M, D] (``self_offset`` o: q_i is r_{o+i} and not its
own neighbour): (distances [N, K], indices [N, K]) with K = min(k, M - [o given]), each row in
the order of (distance, index). The C++ CPU kernel (csrc/cpu/nearest_neighbors_cpu.cpp, per
pair csrc/include/confusion_kernels/neighbor_math.h) walks reference tiles with a threshold per
query, the Triton kernel (confusion_kernels/triton/nearest_neighbors.py) keeps each query's K
best sorted in registers up to its MAX_NEIGHBORS (128) and in global memory beyond, up to
DEEP_MAX_NEIGHBORS (1024), the CUDA C++ kernel
(csrc/cuda/nearest_neighbors_cuda.cpp; K <= CUDA_MAX_NEIGHBORS, 1024) in shared memory; none
holds N x M. The reference (reference/retrieval.py) holds a row chunk's distances. No
gradient: retrieval is an evaluation.

The order is computed from the Gram form |r|^2 - 2 q.r (cosine: -q.r of the unit rows), the
distances returned from the rows themselves: in float32, references whose distances to a query
differ by less than the Gram form's rounding (about 1e-7 |q|^2) may come in either order.
"""

from __future__ import annotations

from typing import Optional  # torch 2.6 custom ops reject int | None

import torch

from .. import _extension
from .._validation import finite_rows
from ..reference import retrieval as _reference

CPP_OP = "confusion_kernels::nearest_neighbors"
TRITON_OP = "confusion_kernels::nearest_neighbors_triton"
METRICS = ("euclidean", "sqeuclidean", "cosine")
# the CUDA C++ kernel's list size (csrc/cuda/nearest_neighbors_tile.h, kMaxNeighbors)
CUDA_MAX_NEIGHBORS = 1024


def max_neighbors(backend: str) -> int | None:
    """The most neighbours per query that ``backend``'s kernel keeps (None: any number)."""
    if backend == "triton":
        from ..triton.nearest_neighbors import DEEP_MAX_NEIGHBORS

        return DEEP_MAX_NEIGHBORS
    return CUDA_MAX_NEIGHBORS if backend == "cuda" else None


def _fake(query, reference, k, metric, self_offset):
    kk = _reference.neighbor_count(k, reference.shape[0], self_offset)
    return (query.new_empty(query.shape[0], kk),
            query.new_empty(query.shape[0], kk, dtype=torch.long))


if _extension.HAS_C and _extension.has_kernel("nearest_neighbors", "CPU"):
    torch.library.register_fake(CPP_OP)(_fake)


@torch.library.custom_op(TRITON_OP, mutates_args=())
def _triton_neighbors(query: torch.Tensor, reference: torch.Tensor, k: int, metric: str,
                      self_offset: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton import nearest_neighbors as kernels

    check_neighbor_inputs(query, reference, k, metric, self_offset, scan=False)
    if query.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"nearest_neighbors: the Triton kernel takes float32 or float64, got "
                        f"{query.dtype}")
    return kernels.nearest_neighbors(query, reference, k, metric, self_offset)


_triton_neighbors.register_fake(_fake)


def check_neighbor_inputs(query: torch.Tensor, reference: torch.Tensor, k: int, metric: str,
                          self_offset: int | None, scan: bool = True) -> None:
    """ValueError / TypeError for inputs the kernels cannot order (before any kernel runs);
    ``scan``: also read the values (NaN / inf rows; a host synchronisation on a GPU)."""
    if not isinstance(query, torch.Tensor) or not isinstance(reference, torch.Tensor):
        raise TypeError("nearest_neighbors: query and reference must be tensors")
    if query.dim() != 2 or reference.dim() != 2:
        raise ValueError(f"nearest_neighbors: query and reference must be 2-D [rows, D], got "
                         f"{tuple(query.shape)} and {tuple(reference.shape)}")
    if query.shape[1] != reference.shape[1]:
        raise ValueError(f"nearest_neighbors: query has D = {query.shape[1]}, reference "
                         f"D = {reference.shape[1]}")
    if not query.is_floating_point() or query.dtype != reference.dtype:
        raise TypeError(f"nearest_neighbors: query and reference must share one floating "
                        f"dtype, got {query.dtype} and {reference.dtype}")
    if query.device != reference.device:
        raise ValueError(f"nearest_neighbors: query on {query.device}, reference on "
                         f"{reference.device}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"nearest_neighbors: k must be an integer >= 1, got {k!r}")
    if metric not in METRICS:
        raise ValueError(f"nearest_neighbors: unknown metric {metric!r}; expected one of "
                         f"{list(METRICS)}")
    if self_offset is not None and not 0 <= self_offset <= reference.shape[0] - query.shape[0]:
        raise ValueError(f"nearest_neighbors: self_offset {self_offset} puts the "
                         f"{query.shape[0]} queries outside the {reference.shape[0]} references")
    rows = (("query", query),) if reference is query else (("query", query),
                                                            ("reference", reference))
    for name, t in rows if scan else ():
        bad = ~finite_rows(t)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:5].tolist()
            raise ValueError(f"nearest_neighbors: {name} rows {rows} hold NaN or inf (a "
                             f"non-finite row has no order of neighbours)")


def nearest_neighbors_rows(query: torch.Tensor, reference: torch.Tensor, k: int, metric: str,
                           self_offset: int | None, backend: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances, indices) on ``backend`` ("reference", "cpu", "triton" or "cuda"); inputs
    checked, cosine rows already unit (or zero), float32 / float64."""
    with torch.no_grad():
        if backend == "reference":
            return _reference.nearest_neighbors(query, reference, k, metric, self_offset)
        if backend == "triton":
            return _triton_neighbors(query, reference, k, metric, self_offset)
        return torch.ops.confusion_kernels.nearest_neighbors(query, reference, k, metric,
                                                             self_offset)

"""Input checks run inside every Triton op, the Python twin of
``csrc/include/confusion_kernels/checks.h`` (which the C++ ops run).

The public functions validate first with friendlier messages; these checks
keep direct ``torch.ops.confusion_kernels.*_triton`` calls from reading out of
bounds or returning garbage: shapes, dtypes, devices, label range, names of
the metric and the similarity. Where kernels index a table with labels, the check
returns the labels to index with and the rows to poison (``guard_label_range``:
no host synchronisation on a GPU).
"""

import torch

from .._metrics import GRAM_METRICS, METRIC_CODES
from .._spec import ROW_SUMS_ALGORITHMS
from .._validation import guard_label_range
from ..reference.affinity import SIMILARITIES
from ..reference.n_centroids import METRICS as SPHERE_METRICS
from ..reference.pair_losses import PAIR_LOSS_OUTPUTS, PAIR_LOSS_STATS

# Most prototypes per class the Triton affinity kernels take: a class's next_pow2(m)
# slots are one tile, and beyond 64 the tiles no longer fit the registers and shared
# memory of an SM (scripts/triton_aot.py: spills from m = 128, more shared memory than
# a block may have from m = 1024). The cpu and cuda backends take any m.
TRITON_MAX_CENTERS = 64


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def _check_rows(op: str, name: str, x: torch.Tensor, count: str = "N") -> None:
    """x: floating 2-D [count, D] with at least one row (count: the name of its row count)."""
    if x.dim() != 2 or not x.dtype.is_floating_point:
        _fail(op, f"{name} must be a floating 2-D [{count}, D] tensor, got {x.dtype} "
                  f"{tuple(x.shape)}")
    if x.shape[0] == 0:
        _fail(op, f"{name} has no rows ({count} = 0)")


def _check_vector(op: str, name: str, v: torch.Tensor, x: torch.Tensor, *,
                  dtype: torch.dtype | None = None, count: str = "N") -> None:
    """v: 1-D of length count (x's rows) on x's device (int64 when ``dtype`` says so, else
    floating)."""
    if v.dim() != 1 or v.shape[0] != x.shape[0]:
        _fail(op, f"{name} must be 1-D of length {count} = {x.shape[0]}, got shape "
                  f"{tuple(v.shape)}")
    if dtype is not None and v.dtype != dtype:
        _fail(op, f"{name} must be {dtype}, got {v.dtype}")
    if dtype is None and not v.dtype.is_floating_point:
        _fail(op, f"{name} must be floating, got {v.dtype}")
    if v.device != x.device:
        _fail(op, f"{name} is on {v.device} but the rows are on {x.device}")


def check_row_sums(x: torch.Tensor, labels: torch.Tensor, metric: str,
                   grads: tuple[torch.Tensor, ...] = (), op: str = "intra_inter_sums_triton",
                   grad_names: tuple[str, str] = ("grad_s_in", "grad_s_out")) -> None:
    """intra_inter_sums_triton(x, labels, metric) and its backward (grads = dL/dS_in,
    dL/dS_out); ``op`` and ``grad_names`` name the op that checks (weighted_pair_sums's
    per-row weights w_in, w_out take the place of the gradients)."""
    _check_rows(op, "x", x)
    _check_vector(op, "labels", labels, x, dtype=torch.int64)
    if metric not in METRIC_CODES:
        _fail(op, f"unknown metric {metric!r}; expected one of {sorted(METRIC_CODES)}")
    for name, g in zip(grad_names, grads):
        _check_vector(op, name, g, x)


def check_algorithm(op: str, algorithm: str, metric: str, runs: tuple[str, ...]) -> None:
    """The router's algorithm (``_routing.py``): a name of ``ROW_SUMS_ALGORITHMS``, a Gram form
    only for the Gram metrics, and one that this Triton op has kernels for (``runs``)."""
    if algorithm not in ROW_SUMS_ALGORITHMS:
        _fail(op, f"unknown algorithm {algorithm!r}; expected one of {list(ROW_SUMS_ALGORITHMS)}")
    if algorithm != "direct" and METRIC_CODES[metric] not in GRAM_METRICS:
        _fail(op, f"algorithm {algorithm!r} is a Gram form (euclidean, sqeuclidean, cosine); "
                  f"{metric} runs 'direct'")
    if algorithm not in runs:
        _fail(op, f"algorithm {algorithm!r} has no Triton kernel; it runs {' or '.join(runs)}")


def check_rect_row_sums(x: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor,
                        ref_labels: torch.Tensor, self_offset: int | None, metric: str,
                        grads: tuple[torch.Tensor, ...] = ()) -> None:
    """intra_inter_sums_rect_triton(x, labels, ref, ref_labels, self_offset, metric) and its
    backward (grads = dL/dS_in, dL/dS_out)."""
    op = "intra_inter_sums_rect_triton"
    check_row_sums(x, labels, metric, grads, op=op)
    _check_rows(op, "ref", ref, count="M")
    if ref.shape[1] != x.shape[1] or ref.dtype != x.dtype or ref.device != x.device:
        _fail(op, f"ref must be [M, {x.shape[1]}] {x.dtype} on {x.device}, got "
                  f"{tuple(ref.shape)} {ref.dtype} on {ref.device}")
    _check_vector(op, "ref_labels", ref_labels, ref, dtype=torch.int64, count="M")
    if self_offset is not None and not 0 <= self_offset <= ref.shape[0] - x.shape[0]:
        _fail(op, f"self_offset must satisfy 0 <= self_offset and self_offset + N <= M "
                  f"(N = {x.shape[0]}, M = {ref.shape[0]}), got {self_offset}")


def check_affinity(f: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor,
                   sigma: float, similarity: str, per_row: tuple[torch.Tensor, ...] = ()
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """affinity_hinge_triton(f, prototypes, labels, ...) and its backward
    (per_row = grad_rows, d_true, active); returns (labels to index with, bad rows or None)."""
    op = "affinity_hinge_triton"
    _check_rows(op, "f", f)
    if not prototypes.dtype.is_floating_point or prototypes.dim() != 3:
        _fail(op, f"prototypes must be a floating [C, m, D] tensor, got {prototypes.dtype} "
                  f"{tuple(prototypes.shape)}")
    c, m, d = prototypes.shape
    if c == 0 or m == 0 or d != f.shape[1]:
        _fail(op, f"prototypes must be [C, m, D] with C, m > 0 and D = {f.shape[1]}, got "
                  f"{tuple(prototypes.shape)}")
    if m > TRITON_MAX_CENTERS:
        _fail(op, f"the triton backend takes at most {TRITON_MAX_CENTERS} prototypes per class, "
                  f"got m = {m}; use backend='cpu' or 'cuda'")
    if prototypes.device != f.device:
        _fail(op, f"prototypes are on {prototypes.device} but f is on {f.device}")
    _check_vector(op, "labels", labels, f, dtype=torch.int64)
    if not sigma > 0:
        _fail(op, f"sigma must be > 0, got {sigma}")
    if similarity not in SIMILARITIES:
        _fail(op, f"unknown similarity {similarity!r}; expected one of {sorted(SIMILARITIES)}")
    for name, v in zip(("grad_rows", "d_true", "active"), per_row):
        _check_vector(op, name, v, f)
    # kernels index per-class data with the labels
    return guard_label_range(labels, c, f" ({op})")


def check_n_centroids(z: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor,
                      metric: str, use_negatives: bool, grad_rows: torch.Tensor | None = None,
                      hardest: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """n_centroids_rows_triton(z, centroids, labels, metric, use_negatives) and its backward;
    returns (labels to index with, bad rows or None, hardest to index with)."""
    op = "n_centroids_rows_triton"
    _check_rows(op, "z", z)
    if (centroids.dim() != 2 or not centroids.dtype.is_floating_point
            or centroids.shape[1] != z.shape[1] or centroids.device != z.device):
        _fail(op, f"centroids must be a floating [K, {z.shape[1]}] tensor on {z.device}, got "
                  f"{centroids.dtype} {tuple(centroids.shape)} on {centroids.device}")
    k = centroids.shape[0]
    if k < (2 if use_negatives else 1):
        _fail(op, f"needs {'K >= 2 centroids with use_negatives' if use_negatives else 'K >= 1'}"
                  f", got K = {k}")
    if metric not in SPHERE_METRICS:
        _fail(op, f"unknown metric {metric!r}; expected one of {list(SPHERE_METRICS)}")
    _check_vector(op, "labels", labels, z, dtype=torch.int64)
    labels, bad = guard_label_range(labels, k, f" ({op})")  # kernels index the centroids
    if grad_rows is not None:
        _check_vector(op, "grad_rows", grad_rows, z)
    if hardest is not None:
        _check_vector(op, "hardest", hardest, z, dtype=torch.int64)
        if use_negatives:  # kernels index the centroids with them too
            hardest, bad_hardest = guard_label_range(hardest, k, f" ({op})", name="hardest")
            bad = bad if bad_hardest is None else bad_hardest | bad
    return labels, bad, hardest


PAIR_LOSSES = {"contrastive": 2, "supcon": 1, "ntxent": 1, "multi_similarity": 3}  # parameters


def check_pair_loss(x: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor,
                    ref_labels: torch.Tensor, self_offset: int | None, loss: str,
                    params: list[float], metric: str,
                    grads: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """pair_loss_stats_triton(x, labels, ref, ref_labels, self_offset, loss, params, metric)
    and its backward (grads = (grad_rows, stats)): the C++ op's rules (pair_losses_cpu.cpp);
    labels are compared, never used as indices, so any int64 value is valid."""
    op = "pair_loss_stats_triton"
    if x.dim() != 2 or ref.dim() != 2:
        _fail(op, f"x and ref must be 2-D, got {x.dim()}-D and {ref.dim()}-D")
    if x.dtype not in (torch.float32, torch.float64) or ref.dtype != x.dtype:
        _fail(op, f"x and ref must both be float32 or both float64, got {x.dtype} and "
                  f"{ref.dtype}")
    if ref.shape[1] != x.shape[1] or ref.device != x.device:
        _fail(op, f"ref must be [M, {x.shape[1]}] on {x.device}, got {tuple(ref.shape)} on "
                  f"{ref.device}")
    _check_vector(op, "labels", labels, x, dtype=torch.int64)
    _check_vector(op, "ref_labels", ref_labels, ref, dtype=torch.int64, count="M")
    if self_offset is not None and not 0 <= self_offset <= ref.shape[0] - x.shape[0]:
        _fail(op, f"self_offset must satisfy 0 <= self_offset and self_offset + N <= M "
                  f"(N = {x.shape[0]}, M = {ref.shape[0]}), got {self_offset}")
    if loss not in PAIR_LOSSES:
        _fail(op, f"unknown loss {loss!r}; expected one of {list(PAIR_LOSSES)}")
    if len(params) != PAIR_LOSSES[loss]:
        _fail(op, f"{loss} takes {PAIR_LOSSES[loss]} parameters, got {len(params)}")
    if metric not in ("euclidean", "cosine"):
        _fail(op, f"unknown metric {metric!r}; expected 'euclidean' or 'cosine'")
    if grads is not None:
        grad_rows, stats = grads
        for name, t, width in (("grad_rows", grad_rows, PAIR_LOSS_OUTPUTS[loss]),
                               ("stats", stats, PAIR_LOSS_STATS)):
            if t.dim() != 2 or tuple(t.shape) != (x.shape[0], width) or \
                    not t.dtype.is_floating_point or t.device != x.device:
                _fail(op, f"{name} must be floating [{x.shape[0]}, {width}] on {x.device}, got "
                          f"{t.dtype} {tuple(t.shape)} on {t.device}")

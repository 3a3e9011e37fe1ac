"""How an op runs: the backend and the algorithm, decided in one place.

``route(op, x, backend, ...)`` returns a ``Route(backend, algorithm)``. The backend comes from
``select_backend`` (``backend=`` or ``CONFUSION_KERNELS_BACKEND``); the algorithm from the
rules below, which no other module repeats: the C++ and Triton row-sum ops receive the
algorithm's name and run it (or refuse it), they never choose by themselves.

Algorithms (``_spec.ROW_SUMS_ALGORITHMS`` are the row-sum ops' kernels):

===============  ==========================================================================
reference        the PyTorch definition (``confusion_kernels.reference``), N x N memory
direct           difference form: D(x_i, x_j) from x_i - x_j for every pair; every metric
pair_pass        Gram form |a|^2 + |b|^2 - 2 a.b, each unordered pair once (square op)
gram_tiles       Gram form on full tiles, each pair once per row block (CUDA's square op on
                 tensor cores; the CPU's rectangular op)
one_pass         ASLoss terms: the two weighted sums and their gradient in one pair pass
                 (``weighted_pair_sums_with_grad``); the backward only scales them
sum_with_grad    affinity / N-Centroids training: sum_i L_i and its gradients in one pass
rows             affinity / N-Centroids: per-row losses, the backward recomputes
sums             class statistics: per-class shifted sums
streaming        pair losses (contrastive, SupCon, NT-Xent, Multi-Similarity): per-row
                 statistics streamed over reference tiles; the backward recomputes the tiles
pairwise         diversity regularizer: the P x P squared distances between prototypes
moments          diversity regularizer: the closed form from moments, O(P D^2)
===============  ==========================================================================

Rules (each measured or forced by a kernel's limits; docs/design.md, "Routing"):

- ``backend="auto"`` on CPU takes the reference for batches of fewer rows than
  ``CPU_FUSED_MIN_ROWS`` gives for the op (``op[metric]`` for the pair ops; a metric not
  measured takes the largest of its op): there the eager definition beats the fused kernel's
  fixed costs.
  The numbers are those of the committed measurement ``CROSSOVER_SOURCE``
  (``benchmarks/run.py --suite crossover``; a test checks that they agree). An explicit
  ``backend="cpu"`` always runs the fused kernel. The rectangular op has no threshold: it
  carries the global batch and the cross-batch memory, where a few query rows meet many
  reference rows and the reference's N x M x D buffer is what must be avoided.

- euclidean / sqeuclidean with D <= ``DIRECT_MAX_DIM`` take ``direct`` on cpu and cuda: a
  K <= 8 matrix product does too little work per output. Triton's pair pass takes any D.
- Cosine takes the Gram form at any D on cpu; on cuda from D > ``DIRECT_MAX_DIM``.
- cuda's square op: ``gram_tiles``, except fp64 and cosine in fp16 / bf16, which have no
  full-tile kernel (16-bit operands would round cosine's unit rows): ``pair_pass``.
  ``CONFUSION_KERNELS_CUDA_EXACT=1`` sends every cuda case of the square op to ``direct``,
  ``CONFUSION_KERNELS_CUDA_PAIR_PASS=1`` its Gram cases to ``pair_pass`` (for comparisons
  and as escape hatches; docs/building.md).
- The rectangular op: ``gram_tiles`` on cpu where the square op takes the Gram form,
  ``direct`` on triton and cuda (exact per pair).
- ``as_loss_terms`` with a gradient to compute: ``one_pass`` where the backend has it for the
  metric (triton: the Gram metrics at any D; cpu / cuda: cosine at any D, euclidean /
  sqeuclidean from D > ``DIRECT_MAX_DIM``), else the square op's algorithm, twice (forward,
  then a recomputing backward). The two cuda environment variables above do not change it.
- Affinity and N-Centroids: ``sum_with_grad`` on cpu / cuda when a gradient is needed, else
  ``rows``.
- The affinity loss's diversity regularizer R(W) over P prototypes of dimension D: ``pairwise``
  (the P x P squared distances, O(P^2 D)) up to ``PAIRWISE_MAX_PROTOTYPES`` prototypes or
  while P <= D, else ``moments`` (the closed form, O(P D^2) time, no P x P buffer).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from . import _extension
from ._backend import auto_requested, select_backend
from ._metrics import GRAM_METRICS, METRIC_CODES
from ._spec import DIRECT_MAX_DIM

# the names of _metrics.GRAM_METRICS (euclidean, sqeuclidean, cosine)
GRAM_METRIC_NAMES = frozenset(name for name, code in METRIC_CODES.items() if code in GRAM_METRICS)
# Above this many prototypes (and P > D) R(W) takes the O(P D^2) moment form.
PAIRWISE_MAX_PROTOTYPES = 2048
# backend="auto" on CPU: the fewest rows for which the fused kernel is faster than the eager
# definition at every measured size (benchmarks/crossover.py's thresholds of this file). An op
# without a key (the rectangular op) always runs fused.
CROSSOVER_SOURCE = "benchmarks/results/2026-12-07k-crossover-x86_64/crossover.csv"
CPU_FUSED_MIN_ROWS = {
    "as_loss_terms[euclidean]": 128,
    "as_loss_terms[sqeuclidean]": 128,
    "as_loss_terms[manhattan]": 128,
    "as_loss_terms[cosine]": 64,
    "intra_inter_sums[euclidean]": 256,
    "intra_inter_sums[cosine]": 64,
    "affinity_hinge": 0,
    "n_centroids_rows": 0,
    "class_shifted_sums": 0,
    "pair_loss[cosine]": 0,
    "pair_loss[euclidean]": 64,
}


def cpu_fused_min_rows(op: str, metric: str | None = None) -> int:
    """The fewest rows from which ``backend="auto"`` runs ``op`` fused on CPU."""
    if f"{op}[{metric}]" in CPU_FUSED_MIN_ROWS:
        return CPU_FUSED_MIN_ROWS[f"{op}[{metric}]"]
    return max((n for key, n in CPU_FUSED_MIN_ROWS.items()
                if key == op or key.startswith(f"{op}[")), default=0)
CUDA_EXACT_ENV = "CONFUSION_KERNELS_CUDA_EXACT"
CUDA_PAIR_PASS_ENV = "CONFUSION_KERNELS_CUDA_PAIR_PASS"
# route's ops, and the op whose kernel availability decides the backend for each.
_KERNEL_OF = {
    "intra_inter_sums": "intra_inter_sums",
    "intra_inter_sums_rect": "intra_inter_sums_rect",
    "as_loss_terms": "intra_inter_sums",
    "affinity_hinge": "affinity_hinge",
    "n_centroids_rows": "n_centroids_rows",
    "class_shifted_sums": "class_shifted_sums",
    "pair_loss": "pair_loss_stats",
}
OPS = tuple(_KERNEL_OF)


class Route(NamedTuple):
    """Which backend runs an op, and with which algorithm."""

    backend: str
    algorithm: str


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _takes_gram_form(backend: str, metric: str, dim: int) -> bool:
    """Whether the square row-sum op of ``backend`` runs a Gram form for (metric, D)."""
    if metric not in GRAM_METRIC_NAMES:
        return False
    if backend == "triton":
        return True
    if backend == "cpu" and metric == "cosine":
        return True
    return dim > DIRECT_MAX_DIM


def square_algorithm(backend: str, metric: str, x: torch.Tensor) -> str:
    """The algorithm of the square row-sum op (``intra_inter_sums``) on ``backend``."""
    if backend == "reference":
        return "reference"
    if backend == "cuda" and _env_flag(CUDA_EXACT_ENV):
        return "direct"
    if not _takes_gram_form(backend, metric, x.shape[1]):
        return "direct"
    if backend != "cuda":
        return "pair_pass"
    no_full_tiles = x.dtype == torch.float64 or (
        metric == "cosine" and x.dtype in (torch.float16, torch.bfloat16))
    return "pair_pass" if no_full_tiles or _env_flag(CUDA_PAIR_PASS_ENV) else "gram_tiles"


def rect_algorithm(backend: str, metric: str, x: torch.Tensor) -> str:
    """The algorithm of the rectangular row-sum op (``intra_inter_sums_rect``)."""
    if backend == "reference":
        return "reference"
    if backend == "cpu" and _takes_gram_form(backend, metric, x.shape[1]):
        return "gram_tiles"
    return "direct"


def _has_kernel(op: str, backend: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(backend)
    return key is not None and _extension.has_kernel(op, key)


def loss_terms_algorithm(backend: str, metric: str, x: torch.Tensor, needs_grad: bool) -> str:
    """``one_pass`` or the square op's algorithm for the ASLoss terms."""
    if not needs_grad or metric not in GRAM_METRIC_NAMES:
        return square_algorithm(backend, metric, x)
    if backend == "triton":
        return "one_pass"
    if _has_kernel("weighted_pair_sums_with_grad", backend) and (
            metric == "cosine" or x.shape[1] > DIRECT_MAX_DIM):
        return "one_pass"
    return square_algorithm(backend, metric, x)


def per_row_algorithm(backend: str, op: str, needs_grad: bool) -> str:
    """``sum_with_grad`` (cpu / cuda, training) or ``rows`` for affinity / N-Centroids."""
    if backend == "reference":
        return "reference"
    fused = {"affinity_hinge": "affinity_hinge_sum_with_grad",
             "n_centroids_rows": "n_centroids_sum_with_grad"}[op]
    return "sum_with_grad" if needs_grad and _has_kernel(fused, backend) else "rows"


def diversity_algorithm(num_prototypes: int, dim: int) -> str:
    """``pairwise`` or ``moments`` for the diversity regularizer of P prototypes in D dims."""
    if num_prototypes > PAIRWISE_MAX_PROTOTYPES and num_prototypes > dim:
        return "moments"
    return "pairwise"


def route(op: str, x: torch.Tensor, backend: str = "auto", *, metric: str | None = None,
          needs_grad: bool = False) -> Route:
    """The backend and algorithm that run ``op`` on ``x``.

    Args:
        op: one of ``OPS``.
        x: the rows (embeddings, features): their device, dtype and D decide.
        backend: "auto" | "reference" | "cpu" | "triton" | "cuda" (``select_backend``'s
            rules: an explicit backend that cannot run raises RuntimeError).
        metric: the canonical metric name (row-sum ops and ``as_loss_terms``).
        needs_grad: a gradient will be computed (``as_loss_terms``, affinity, N-Centroids).
    """
    if op not in _KERNEL_OF:
        raise ValueError(f"unknown op {op!r}; expected one of {list(OPS)}")
    chosen = select_backend(x, backend, op=_KERNEL_OF[op])
    if chosen == "cpu" and x.shape[0] < cpu_fused_min_rows(op, metric) and auto_requested(backend):
        chosen = "reference"
    if op == "intra_inter_sums":
        return Route(chosen, square_algorithm(chosen, metric, x))
    if op == "intra_inter_sums_rect":
        return Route(chosen, rect_algorithm(chosen, metric, x))
    if op == "as_loss_terms":
        return Route(chosen, loss_terms_algorithm(chosen, metric, x, needs_grad))
    if op == "class_shifted_sums":
        return Route(chosen, "reference" if chosen == "reference" else "sums")
    if op == "pair_loss":
        return Route(chosen, "reference" if chosen == "reference" else "streaming")
    return Route(chosen, per_row_algorithm(chosen, op, needs_grad))

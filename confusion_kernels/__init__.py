"""confusion-kernels: fused GPU/CPU kernels for losses that clarify confusion
between classes (ASLoss, Affinity loss, ...), each checked against a plain PyTorch reference.

Backends: "reference" (PyTorch), "cpu" (C++/OpenMP), "triton", "cuda" (CUDA
C++); ``backend="auto"`` picks the fastest one for the tensor's device, and
``route(op, x, ...)`` says which backend and kernel algorithm an op will run.
"""

from . import analysis, reference
from ._backend import BACKENDS, available_backends, select_backend
from ._metrics import resolve_metric
from ._routing import Route, route
from ._validation import set_strict_checks, strict_checks
from .analysis import ClassStatistics, GAPRecorder, similar_labels, welch_t_test
from .losses.affinity import (
    AffinityLoss,
    affinity_loss,
    class_affinity,
    diversity_moments,
    diversity_regularizer,
)
from .losses.as_loss import ASLoss, as_loss, as_loss_terms
from .losses.confidence import gaussian_nll, vmf_nll
from .losses.memory import CrossBatchMemory
from .losses.n_centroids import NCentroidsLoss, n_centroids_loss
from .losses.pair_losses import (contrastive_loss, multi_similarity_loss, ntxent_loss,
                                 supcon_loss)
from .ops.intra_inter_sums import intra_inter_sums
from .reference.as_loss import ASLossTerms
from .retrieval import nearest_neighbors, retrieval_metrics
from .special import log_bessel_iv

__version__ = "0.1.0"

__all__ = [
    "ASLoss",
    "CrossBatchMemory",
    "ClassStatistics",
    "GAPRecorder",
    "analysis",
    "similar_labels",
    "welch_t_test",
    "AffinityLoss",
    "affinity_loss",
    "class_affinity",
    "diversity_moments",
    "diversity_regularizer",
    "ASLossTerms",
    "BACKENDS",
    "as_loss",
    "as_loss_terms",
    "available_backends",
    "gaussian_nll",
    "log_bessel_iv",
    "NCentroidsLoss",
    "n_centroids_loss",
    "contrastive_loss",
    "supcon_loss",
    "ntxent_loss",
    "multi_similarity_loss",
    "intra_inter_sums",
    "nearest_neighbors",
    "retrieval_metrics",
    "reference",
    "resolve_metric",
    "Route",
    "route",
    "select_backend",
    "set_strict_checks",
    "strict_checks",
    "vmf_nll",
]

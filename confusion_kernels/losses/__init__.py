"""User-facing losses (nn.Module and functional forms)."""

from .affinity import (AffinityLoss, affinity_loss, class_affinity, diversity_moments,
                       diversity_pairwise, diversity_regularizer)
from .as_loss import ASLoss, as_loss, as_loss_terms
from .confidence import gaussian_nll, log_vmf_normalizer, vmf_nll
from .memory import CrossBatchMemory
from .n_centroids import (Confidence, NCentroidsLoss, class_sums, ema_class_update, ema_from_sums,
                          n_centroids_loss)
from .pair_losses import contrastive_loss, multi_similarity_loss, ntxent_loss, supcon_loss

__all__ = ["ASLoss", "AffinityLoss", "Confidence", "CrossBatchMemory", "NCentroidsLoss",
           "affinity_loss", "as_loss", "as_loss_terms", "class_affinity", "class_sums",
           "diversity_moments", "diversity_pairwise", "diversity_regularizer", "ema_class_update",
           "contrastive_loss", "ema_from_sums", "gaussian_nll", "log_vmf_normalizer",
           "multi_similarity_loss", "n_centroids_loss", "ntxent_loss", "supcon_loss", "vmf_nll"]

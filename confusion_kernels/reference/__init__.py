"""Readable PyTorch definitions of every op: each module's docstring states its formulas.

They may materialise N x N matrices; the kernels must agree with them."""

from . import affinity, n_centroids, pair_losses, retrieval
from .as_loss import ASLossTerms, as_loss, as_loss_terms
from .pairwise import intra_inter_sums, pairwise_distances

__all__ = ["ASLossTerms", "affinity", "n_centroids", "pair_losses", "retrieval", "as_loss", "as_loss_terms", "intra_inter_sums", "pairwise_distances"]

"""Autograd-aware ops with backend dispatch."""

from .intra_inter_sums import intra_inter_sums

__all__ = ["intra_inter_sums"]

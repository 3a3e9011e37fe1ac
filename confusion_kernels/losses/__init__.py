"""User-facing losses (nn.Module and functional forms)."""

from .as_loss import ASLoss, as_loss, as_loss_terms
from .memory import CrossBatchMemory

__all__ = ["ASLoss", "CrossBatchMemory", "as_loss", "as_loss_terms"]

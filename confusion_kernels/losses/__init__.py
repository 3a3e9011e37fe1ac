"""User-facing losses (nn.Module and functional forms)."""

from .as_loss import ASLoss, as_loss, as_loss_terms

__all__ = ["ASLoss", "as_loss", "as_loss_terms"]

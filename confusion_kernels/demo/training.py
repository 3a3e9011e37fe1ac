"""One small network and six ways to train it. Every method uses the same network, optimiser
(Adam, lr 3e-3), batch size, epochs and seed; only the loss differs:

    CE                          cross-entropy on the classifier's logits
    CE + ASLoss                 0.5 CE + 0.5 ASLoss(z)  (the ASLoss paper's weights, defaults)
    CE + ASLoss (class_mean)    the same, ASLoss averaged per class first
    Affinity (m=1), (m=5)       the affinity loss on z, m prototypes per class (no CE);
                                prediction: the class of largest affinity
    CE + NCL                    CE + the N-Centroids loss on z (great circle, EMA rate 0.01);
                                prediction: the nearest centroid
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import confusion_kernels as ck

from .data import NUM_CLASSES, DigitsSplit

LEARNING_RATE = 3e-3


class Net(nn.Module):
    """64 pixels -> hidden features h [64] (the internal statistics) -> representation z [dim]
    -> logits [classes]."""

    def __init__(self, dim: int, classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.rep = nn.Linear(64, dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.body(x)
        z = self.rep(h)
        return h, z, self.classifier(z)


@dataclass(frozen=True)
class Method:
    name: str
    key: str


METHODS = (
    Method("CE", "ce"),
    Method("CE + ASLoss", "ce_as"),
    Method("CE + ASLoss (class_mean)", "ce_as_class"),
    Method("Affinity (m=1)", "affinity1"),
    Method("Affinity (m=5)", "affinity5"),
    Method("CE + NCL", "ce_ncl"),
)


@dataclass
class Trained:
    """A trained network with its loss module (prototypes, centroids)."""

    method: Method
    net: Net
    criterion: nn.Module | None

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.net.eval()
        return self.net(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        _, z, logits = self.outputs(x)
        if isinstance(self.criterion, ck.AffinityLoss):
            return self.criterion.predict(z)
        if isinstance(self.criterion, ck.NCentroidsLoss):
            return self.criterion.confidence(z).prediction
        return logits.argmax(1)

    def prototypes(self) -> torch.Tensor | None:
        """The affinity prototypes [C, m, D] or the NCL centroids [C, D], for the plots."""
        if isinstance(self.criterion, ck.AffinityLoss):
            return self.criterion.prototypes.detach()
        if isinstance(self.criterion, ck.NCentroidsLoss):
            return self.criterion.centroids.detach()
        return None


def _criterion(method: Method, dim: int, classes: int, seed: int, backend: str) -> nn.Module | None:
    if method.key == "ce":
        return None
    if method.key in ("ce_as", "ce_as_class"):
        reduction = "class_mean" if method.key == "ce_as_class" else "pair_mean"
        return ck.ASLoss(reduction=reduction, backend=backend)
    if method.key.startswith("affinity"):
        return ck.AffinityLoss(classes, dim, num_centers=int(method.key[len("affinity"):]),
                               backend=backend)
    if method.key == "ce_ncl":
        return ck.NCentroidsLoss(classes, dim, metric="great_circle", alpha0=0.01, seed=seed,
                                 backend=backend)
    raise ValueError(f"unknown method {method.key!r}")


def _loss_function(method: Method, criterion: nn.Module | None) -> Callable:
    def loss(z: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if method.key == "ce":
            return F.cross_entropy(logits, y)
        if method.key in ("ce_as", "ce_as_class"):
            return 0.5 * F.cross_entropy(logits, y) + 0.5 * criterion(z, y)
        if method.key.startswith("affinity"):
            return criterion(z, y)
        return F.cross_entropy(logits, y) + criterion(z, y)

    return loss


def train(method: Method, split: DigitsSplit, *, dim: int, seed: int, epochs: int,
          batch_size: int = 64, backend: str = "auto", classes: int = NUM_CLASSES,
          on_epoch: Callable[[], None] | None = None) -> Trained:
    """Trains the network with ``method`` on ``split``'s training rows (its device)."""
    device = split.x_train.device
    torch.manual_seed(seed)
    net = Net(dim, classes).to(device)
    criterion = _criterion(method, dim, classes, seed, backend)
    if criterion is not None:
        criterion = criterion.to(device)
    params = list(net.parameters()) + (list(criterion.parameters()) if criterion else [])
    opt = torch.optim.Adam(params, lr=LEARNING_RATE)
    loss_of = _loss_function(method, criterion)
    g = torch.Generator().manual_seed(seed)
    n = split.x_train.shape[0]
    for _ in range(epochs):
        net.train()
        if criterion is not None:
            criterion.train()
        for batch in torch.randperm(n, generator=g).to(device).split(batch_size):
            _, z, logits = net(split.x_train[batch])
            loss = loss_of(z, logits, split.y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch()
    if criterion is not None:
        criterion.eval()
    return Trained(method, net, criterion)

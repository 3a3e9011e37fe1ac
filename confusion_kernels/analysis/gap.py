"""GAPRecorder: the internal-representation features of Park (Eq. 2).

For every chosen layer, the global average pool of ReLU(output) over the
spatial dimensions, [B, channels]; the layers' features are concatenated in
forward order, so feature j maps back to (layer name, channel) through
``feature_names``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .statistics import ClassStatistics


class GAPRecorder:
    """Context manager of forward hooks on the modules of ``layer_types``.

    with GAPRecorder(model) as rec:
        model(x)
        rec.features         # [B, K] of that forward
        rec.layer_names      # [(name, channels)] in forward order
        rec.update_statistics(stats, labels)
    Hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, layer_types: tuple[type, ...] = (nn.Conv2d,)):
        self.model = model
        self.layer_types = tuple(layer_types)
        self._handles: list = []
        self._outputs: list[tuple[str, torch.Tensor]] = []
        self.layer_names: list[tuple[str, int]] = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() < 2:
                raise TypeError(f"GAPRecorder: layer {name!r} returned {type(output).__name__}, "
                                "not a [B, C, ...] tensor")
            pooled = torch.relu(output.detach())
            if pooled.dim() > 2:
                pooled = pooled.flatten(2).mean(2)
            self._outputs.append((name, pooled))
        return hook

    def __enter__(self) -> "GAPRecorder":
        # each forward of the model starts a fresh record
        self._handles.append(self.model.register_forward_pre_hook(lambda m, i: self._outputs.clear()))
        for name, module in self.model.named_modules():
            if isinstance(module, self.layer_types):
                self._handles.append(module.register_forward_hook(self._hook(name)))
        if len(self._handles) == 1:
            self.remove()
            raise ValueError(f"GAPRecorder: the model has no layer of types {self.layer_types}")
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self._outputs.clear()

    @property
    def features(self) -> torch.Tensor:
        """[B, K] features of the last forward of the model."""
        if not self._outputs:
            raise RuntimeError("GAPRecorder: no forward pass recorded yet")
        self.layer_names = [(name, out.shape[1]) for name, out in self._outputs]
        return torch.cat([out for _, out in self._outputs], dim=1)

    @property
    def feature_names(self) -> list[tuple[str, int]]:
        """(layer name, channel) of every feature column."""
        if not self.layer_names:
            _ = self.features
        return [(name, ch) for name, channels in self.layer_names for ch in range(channels)]

    def update_statistics(self, stats: ClassStatistics, labels: torch.Tensor) -> torch.Tensor:
        feats = self.features
        stats.update(feats, labels)
        self.clear()
        return feats


@torch.no_grad()
def collect_statistics(model: nn.Module, batches: Iterable, num_classes: int, *,
                       layer_types: tuple[type, ...] = (nn.Conv2d,),
                       device: torch.device | str | None = None) -> tuple[ClassStatistics, list]:
    """Streams (inputs, labels) batches (e.g. a DataLoader) through ``model`` in eval mode
    (dropout off, batch norm on its running statistics; each module's own training flag is
    restored afterwards, also on an error) and returns (ClassStatistics of the GAP features,
    feature_names)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        stats = None
        with GAPRecorder(model, layer_types) as rec:
            for inputs, labels in batches:
                if device is not None:
                    inputs, labels = inputs.to(device), labels.to(device)
                rec.clear()
                model(inputs)
                feats = rec.features
                if stats is None:
                    stats = ClassStatistics(num_classes, feats.shape[1], device=feats.device)
                rec.update_statistics(stats, labels)
            if stats is None:
                raise ValueError("collect_statistics: the loader yielded no batches")
            names = rec.feature_names
    finally:
        for module, training in modes.items():
            module.training = training
    return stats, names

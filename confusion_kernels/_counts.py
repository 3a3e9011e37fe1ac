"""Per-class row counts without host synchronisation, shared by the class statistics (the
reference path in analysis/) and their Triton kernels (triton/class_stats.py)."""

from __future__ import annotations

import torch


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C] float64 number of rows per class (labels in range): an int64 ``index_add_``, exact
    in any order and with no host synchronisation (``bincount`` reads the largest label)."""
    ones = torch.ones_like(labels)
    return torch.zeros(num_classes, dtype=torch.int64, device=labels.device).index_add_(
        0, labels, ones).to(torch.float64)

"""A small speed table on this machine: each loss's forward + backward, fused (the package's
kernels on the auto-selected backend) against the eager PyTorch definition
(``confusion_kernels.reference``), one run of median timings. The full benchmarks are in
``benchmarks/``."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

import confusion_kernels as ck
from confusion_kernels import reference


def _median_ms(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    once()  # warm-up (first-call costs, Triton compilation)
    return statistics.median(once() for _ in range(repeats))


def speed_table(device: torch.device, *, quick: bool = False) -> list[dict]:
    """Rows: loss, shape, backend, fused ms, eager ms, speed-up."""
    g = torch.Generator().manual_seed(0)
    n = 1024 if quick else 4096
    d, classes = 64, 10
    repeats = 3 if quick else 5

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device).requires_grad_(True)

    x, y = leaf(n, d), torch.randint(0, classes, (n,), generator=g).to(device)
    protos = leaf(classes, 5, d)
    centroids = reference.n_centroids.normalize(torch.randn(100, d, generator=g)).to(device)
    y100 = torch.randint(0, 100, (n,), generator=g).to(device)
    cases = [
        ("ASLoss (euclidean)", f"N={n}, D={d}, C={classes}",
         lambda: ck.as_loss(x, y), lambda: reference.as_loss(x, y)),
        ("Affinity loss (m=5)", f"N={n}, D={d}, C={classes}",
         lambda: ck.affinity_loss(x, y, protos), lambda: reference.affinity.affinity_loss(x, y, protos)),
        ("N-Centroids loss (great circle)", f"N={n}, D={d}, K=100",
         lambda: ck.n_centroids_loss(x, y100, centroids),
         lambda: reference.n_centroids.n_centroids_loss(x, y100, centroids)),
    ]
    rows = []
    for name, shape, fused, eager in cases:
        fused_ms = _median_ms(fused, device, repeats)
        eager_ms = _median_ms(eager, device, repeats)
        rows.append({"loss": name, "shape": shape, "backend": ck.select_backend(x),
                     "fused_ms": fused_ms, "eager_ms": eager_ms, "speedup": eager_ms / fused_ms})
    return rows

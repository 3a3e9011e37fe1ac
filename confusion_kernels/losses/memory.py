"""CrossBatchMemory: a FIFO of the last ``size`` embeddings and labels of earlier batches.

A loss that takes ``memory=`` runs each batch's rows against the batch *and* the memory (the
rectangular form of intra_inter_sums, x_i being row i of the reference set), so a small batch
sees up to ``size`` more positives and negatives. The stored rows are detached: no gradient
reaches earlier batches (they were computed by earlier weights, as in a momentum queue).

Memory cost: ``size * D`` values of the memory's dtype plus ``size`` int64 labels; each step
costs N * (N + size) pair distances instead of N * N, with O((N + size) * D) working memory.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn


class CrossBatchMemory(nn.Module):
    """FIFO of the last ``size`` detached embeddings [size, D] and labels [size].

    ``enqueue(x, labels)`` stores a batch (the oldest rows leave first); ``contents()`` returns
    what is stored, ``reference_set(x, labels)`` the batch followed by the stored rows. The
    buffers move with ``.to()`` and are saved in the ``state_dict`` together with the fill
    state.
    """

    def __init__(self, size: int, embedding_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        for name, v in (("size", size), ("embedding_dim", embedding_dim)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"CrossBatchMemory: {name} must be an int, got {v!r}")
        if size < 1 or embedding_dim < 1:
            raise ValueError(f"size and embedding_dim must be >= 1, got {size}, {embedding_dim}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"CrossBatchMemory: dtype must be a floating dtype, got {dtype}")
        self.size = int(size)
        self.register_buffer("embeddings", torch.zeros(size, embedding_dim, dtype=dtype,
                                                       device=device))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.int64, device=device))
        self.filled = 0   # rows stored, at most size
        self.next_row = 0  # where the next row goes

    def reset(self) -> None:
        self.filled = self.next_row = 0

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Store the rows of x [N, D] (detached) and their labels [N]; of a batch larger than
        the memory only the last ``size`` rows stay."""
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError("CrossBatchMemory: x must be a floating tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point \
                or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError("CrossBatchMemory: labels must be an integer tensor, got "
                            f"{getattr(labels, 'dtype', type(labels).__name__)} (floats would be "
                            "truncated, bools read as 0 / 1)")
        if x.dim() != 2 or x.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"CrossBatchMemory: x must be [N, {self.embeddings.shape[1]}], got "
                             f"shape {tuple(x.shape)}")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"CrossBatchMemory: labels must be [{x.shape[0]}], got shape "
                             f"{tuple(labels.shape)}")
        x, labels = x[-self.size:], labels[-self.size:]
        n = x.shape[0]
        rows = (self.next_row + torch.arange(n, device=self.embeddings.device)) % self.size
        self.embeddings[rows] = x.detach().to(self.embeddings)
        self.labels[rows] = labels.to(self.labels)
        self.next_row = (self.next_row + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [filled, D], labels [filled]) stored now (storage order)."""
        return self.embeddings[:self.filled], self.labels[:self.filled]

    def reference_set(self, x: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cat(x, stored rows in x's dtype), cat(labels, stored labels)): x_i is row i."""
        stored, stored_labels = self.contents()
        return (torch.cat([x, stored.to(device=x.device, dtype=x.dtype)]),
                torch.cat([labels.to(torch.int64), stored_labels.to(labels.device)]))

    def get_extra_state(self) -> Any:
        return {"filled": self.filled, "next_row": self.next_row}

    def set_extra_state(self, state: Any) -> None:
        filled, next_row = int(state["filled"]), int(state["next_row"])
        if not (0 <= filled <= self.size and 0 <= next_row < self.size):
            raise ValueError(f"CrossBatchMemory: a saved state of filled = {filled}, next_row = "
                             f"{next_row} does not fit a memory of size {self.size}")
        self.filled, self.next_row = filled, next_row

    def extra_repr(self) -> str:
        return f"size={self.size}, embedding_dim={self.embeddings.shape[1]}, filled={self.filled}"

"""The torch.distributed calls the losses and statistics use (no transport of our own).

``group=None`` is the default process group. Every helper raises a clear RuntimeError when
torch.distributed is unavailable or no process group is initialised, instead of silently
computing a per-rank result where the caller asked for a global one.
"""

from __future__ import annotations

import torch


def require_process_group(what: str) -> None:
    """Raise unless torch.distributed is available and a process group is initialised."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"{what} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(f"{what} needs an initialised process group "
                           "(torch.distributed.init_process_group) before the first call")


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The element-wise sum over the ranks of ``group`` (a new tensor; no autograd)."""
    import torch.distributed as dist

    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_gather_same_shape(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's copy of a tensor that has the same shape on every rank, in rank order."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    return parts

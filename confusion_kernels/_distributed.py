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


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: the gradient passes unchanged (see sum_over_ranks)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        return all_reduce_sum(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_over_ranks(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """T = sum_r t_r over the ranks, differentiable, for a loss that every rank evaluates in
    full: L = f(T) on every rank. Rank r's backward takes dL/dt_r = f'(T) (the identity),
    so that with the gathered columns (``gather_rows``) each rank ends with exactly its
    own rows' share of dL/dx; an all-reduce in backward would count every rank's copy of
    L and multiply the gradient by the world size."""
    return _SumOverRanks.apply(tensor, group)


def _gather_padded(tensor: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Every rank's ``tensor`` (first dimension sizes[r]), concatenated in rank order: padded
    to the largest size for the all-gather, the padding dropped after it."""
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor.detach()
    parts = all_gather_same_shape(padded, group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def rows_per_rank(n: int, device: torch.device, group=None) -> list[int]:
    """Every rank's number of rows, in rank order (one small all-gather)."""
    counts = all_gather_same_shape(torch.tensor([n], dtype=torch.int64, device=device), group)
    return [int(c.item()) for c in counts]


class _GatherRows(torch.autograd.Function):
    """Forward: the rows of every rank concatenated in rank order. Backward: the sum over
    ranks of the gradient of the concatenation, this rank's slice (an all-reduce)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], offset: int, group) -> torch.Tensor:
        ctx.offset, ctx.rows, ctx.group = offset, x.shape[0], group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = all_reduce_sum(grad.contiguous(), ctx.group)
        return total[ctx.offset:ctx.offset + ctx.rows], None, None, None


def gather_rows(x: torch.Tensor, labels: torch.Tensor, group=None
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(rows of every rank [M, D] with autograd, their labels [M], this rank's offset):
    ranks may hold different numbers of rows; x_i is row offset + i of the result."""
    import torch.distributed as dist

    sizes = rows_per_rank(x.shape[0], x.device, group)
    offset = sum(sizes[:dist.get_rank(group)])
    rows = _GatherRows.apply(x, sizes, offset, group)
    return rows, _gather_padded(labels, sizes, group), offset

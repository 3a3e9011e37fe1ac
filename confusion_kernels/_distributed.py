"""The torch.distributed calls the losses and statistics use (no transport of our own).

``group=None`` is the default process group. Every helper raises a clear RuntimeError when
torch.distributed is unavailable or no process group is initialised, instead of silently
computing a per-rank result where the caller asked for a global one.

Before its first data collective every global computation calls ``agree``: one all-gather of
a small per-rank descriptor (the outcome of this rank's input checks, its row count, and the
settings, dtypes and shapes that must be equal on every rank). So a rank whose input fails
its checks, or whose settings differ from the others', makes every rank raise the same error
at the same point, instead of raising alone while the others wait in the next collective
until the process group's timeout (or reinterpret each other's bytes).
"""

from __future__ import annotations

from typing import Any

import torch

# the exception types a rank's failed check is re-raised as on every rank
_RERAISED = {"ValueError": ValueError, "TypeError": TypeError, "RuntimeError": RuntimeError}


def require_process_group(what: str) -> None:
    """Raise unless torch.distributed is available and a process group is initialised."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"{what} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(f"{what} needs an initialised process group "
                           "(torch.distributed.init_process_group) before the first call")


def agree(what: str, rows: int, settings: dict[str, Any], error: BaseException | None = None,
          group=None) -> list[int]:
    """Every rank's row count, in rank order, once every rank has passed its checks and all
    ranks agree on ``settings``; else the same exception on every rank.

    ``error``: the exception this rank's input checks raised (None: they passed). Every rank
    then raises an exception of the same type (ValueError, TypeError or RuntimeError) naming
    the first failing rank and its message. ``settings``: name -> a picklable value that must
    be equal on every rank (loss options, dtype, feature dimension, whether a backward will
    run, ...); a difference raises ValueError on every rank, naming the setting and each
    rank's value. One ``all_gather_object`` (a host synchronisation, as reading the row
    counts already was)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    outcome = None if error is None else (type(error).__name__, str(error))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (outcome, int(rows), dict(settings)), group=group)
    failed = [(r, o) for r, (o, _, _) in enumerate(gathered) if o is not None]
    if failed:
        first, (kind, text) = failed[0]
        more = (f" (rank{'s' if len(failed) > 2 else ''} "
                f"{', '.join(str(r) for r, _ in failed[1:])} failed too)" if len(failed) > 1 else "")
        raise _RERAISED.get(kind, ValueError)(
            f"{what}: the input of rank {first} of {world} failed its checks: {text}{more}"
        ) from error
    for name in settings:
        values = [s.get(name) for _, _, s in gathered]
        if any(v != values[0] for v in values[1:]):
            each = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise ValueError(f"{what}: the ranks disagree on {name} ({each}); every rank of a "
                             "global computation must use the same settings")
    names = [set(s) for _, _, s in gathered]
    if any(n != names[0] for n in names[1:]):
        raise ValueError(f"{what}: the ranks disagree on which settings they check "
                         f"({names}); are they running the same version?")
    return [n for _, n, _ in gathered]


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


def gather_rows(x: torch.Tensor, labels: torch.Tensor, sizes: list[int], group=None
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(rows of every rank [M, D] with autograd, their labels [M], this rank's offset), given
    every rank's row count (``agree``): ranks may hold different numbers of rows, none
    included; x_i is row offset + i of the result."""
    import torch.distributed as dist

    offset = sum(sizes[:dist.get_rank(group)])
    rows = _GatherRows.apply(x, sizes, offset, group)
    return rows, _gather_padded(labels, sizes, group), offset


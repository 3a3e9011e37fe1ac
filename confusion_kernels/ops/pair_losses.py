"""``pair_loss_rows``: the fused per-row outputs and statistics of the pair losses
(Contrastive, SupCon, NT-Xent, Multi-Similarity; docs/math.md, "Pair losses").

Rows x [N, D] against references r [M, D] (``self_offset`` o: x_i is r_{o+i}, that pair left
out). The C++ CPU kernel (csrc/cpu/pair_losses_cpu.cpp) and the Triton kernels
(confusion_kernels/triton/pair_losses.py), per pair
csrc/include/confusion_kernels/pair_loss_math.h, stream reference tiles and never hold
N x M; the backward recomputes them from x, r and the saved per-row statistics (O(N) state).
Returns ``(rows [N, R], stats [N, 4])``: the outputs with a gradient (R = 2 for contrastive:
the sums of l+ and l-; else the row's loss) and the statistics the reducers read (the counts
of non-zero hinges, |P|).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence  # torch 2.6 custom ops reject list[float]

import torch

from .. import _extension
from ..reference.pair_losses import PAIR_LOSS_OUTPUTS, PAIR_LOSS_STATS
from ._op_checks import check_pair_loss
from ._registration import refuse_double_backward

CPP_OP = "confusion_kernels::pair_loss_stats"
CPP_BACKWARD_OP = "confusion_kernels::pair_loss_backward"
TRITON_OP = "confusion_kernels::pair_loss_stats_triton"
TRITON_BACKWARD_OP = "confusion_kernels::pair_loss_backward_triton"


def _fake_stats(x, labels, ref, ref_labels, self_offset, loss, params, metric):
    return (x.new_empty(x.shape[0], PAIR_LOSS_OUTPUTS[loss]),
            x.new_empty(x.shape[0], PAIR_LOSS_STATS))


def _fake_backward(grad_rows, stats, x, labels, ref, ref_labels, self_offset, loss, params,
                   metric):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(ref, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    x, labels, ref, ref_labels, self_offset, loss, params, metric = inputs
    _, stats = output
    ctx.save_for_backward(x, labels, ref, ref_labels, stats)
    ctx.args = (self_offset, loss, params, metric)
    ctx.mark_non_differentiable(stats)


def _backward_with(backward_op: Callable) -> Callable:
    def backward(ctx, grad_rows, grad_stats):
        refuse_double_backward("pair losses")
        x, labels, ref, ref_labels, stats = ctx.saved_tensors
        if grad_rows is None:
            grad_rows = stats.new_zeros(stats.shape[0], PAIR_LOSS_OUTPUTS[ctx.args[1]])
        grad_x, grad_ref = backward_op(grad_rows, stats, x, labels, ref, ref_labels, *ctx.args)
        return grad_x, None, grad_ref, None, None, None, None, None
    return backward


if _extension.HAS_C and _extension.has_kernel("pair_loss_stats", "CPU"):
    torch.library.register_fake(CPP_OP)(_fake_stats)
    torch.library.register_fake(CPP_BACKWARD_OP)(_fake_backward)
    torch.library.register_autograd(
        CPP_OP, _backward_with(torch.ops.confusion_kernels.pair_loss_backward),
        setup_context=_setup_context)


@torch.library.custom_op(TRITON_OP, mutates_args=())
def _triton_stats(x: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor,
                  ref_labels: torch.Tensor, self_offset: Optional[int], loss: str,
                  params: Sequence[float], metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton import pair_losses as kernels

    check_pair_loss(x, labels, ref, ref_labels, self_offset, loss, params, metric)
    return kernels.forward(x, labels, ref, ref_labels, self_offset, loss, params, metric)


@torch.library.custom_op(TRITON_BACKWARD_OP, mutates_args=())
def _triton_backward(grad_rows: torch.Tensor, stats: torch.Tensor, x: torch.Tensor,
                     labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor,
                     self_offset: Optional[int], loss: str, params: Sequence[float],
                     metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton import pair_losses as kernels

    check_pair_loss(x, labels, ref, ref_labels, self_offset, loss, params, metric,
                    (grad_rows, stats))
    return kernels.backward(grad_rows, stats, x, labels, ref, ref_labels, self_offset, loss,
                            params, metric)


_triton_stats.register_fake(_fake_stats)
_triton_backward.register_fake(_fake_backward)
torch.library.register_autograd(TRITON_OP, _backward_with(_triton_backward),
                                setup_context=_setup_context)


def pair_loss_rows(x: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor,
                   ref_labels: torch.Tensor, self_offset: int | None, loss: str,
                   params: list[float], metric: str, backend: str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's (rows, stats) on ``backend`` ("cpu": the C++ op, "triton"); x and
    ref float32 or float64, already normalised where the loss's distance normalises."""
    op = _triton_stats if backend == "triton" else torch.ops.confusion_kernels.pair_loss_stats
    return op(x, labels, ref, ref_labels, self_offset, loss, [float(p) for p in params], metric)

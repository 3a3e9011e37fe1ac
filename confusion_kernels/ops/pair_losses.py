"""``pair_loss_rows``: the fused per-row outputs and statistics of the pair losses
(Contrastive, SupCon, NT-Xent, Multi-Similarity; docs/math.md, "Pair losses").

Rows x [N, D] against references r [M, D] (``self_offset`` o: x_i is r_{o+i}, that pair left
out). The C++ CPU kernel (csrc/cpu/pair_losses_cpu.cpp, per pair
csrc/include/confusion_kernels/pair_loss_math.h) streams reference tiles and never holds
N x M; the backward recomputes them from x, r and the saved per-row statistics (O(N) state).
Returns ``(rows [N, R], stats [N, 4])``: the outputs with a gradient (R = 2 for contrastive:
the sums of l+ and l-; else the row's loss) and the statistics the reducers read (the counts
of non-zero hinges, |P|).
"""

from __future__ import annotations

import torch

from .. import _extension
from ._registration import refuse_double_backward

CPP_OP = "confusion_kernels::pair_loss_stats"
CPP_BACKWARD_OP = "confusion_kernels::pair_loss_backward"


def outputs_of(loss: str) -> int:
    """R, the per-row outputs with a gradient."""
    return 2 if loss == "contrastive" else 1


def _fake_stats(x, labels, ref, ref_labels, self_offset, loss, params, metric):
    return x.new_empty(x.shape[0], outputs_of(loss)), x.new_empty(x.shape[0], 4)


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


def _backward(ctx, grad_rows, grad_stats):
    refuse_double_backward("pair losses")
    x, labels, ref, ref_labels, stats = ctx.saved_tensors
    if grad_rows is None:
        grad_rows = stats.new_zeros(stats.shape[0], outputs_of(ctx.args[1]))
    grad_x, grad_ref = torch.ops.confusion_kernels.pair_loss_backward(
        grad_rows, stats, x, labels, ref, ref_labels, *ctx.args)
    return grad_x, None, grad_ref, None, None, None, None, None


if _extension.HAS_C and _extension.has_kernel("pair_loss_stats", "CPU"):
    torch.library.register_fake(CPP_OP)(_fake_stats)
    torch.library.register_fake(CPP_BACKWARD_OP)(_fake_backward)
    torch.library.register_autograd(CPP_OP, _backward, setup_context=_setup_context)


def pair_loss_rows(x: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor,
                   ref_labels: torch.Tensor, self_offset: int | None, loss: str,
                   params: list[float], metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's (rows, stats); x and ref float32 or float64, already normalised where
    the loss's distance normalises."""
    return torch.ops.confusion_kernels.pair_loss_stats(x, labels, ref, ref_labels, self_offset,
                                                       loss, [float(p) for p in params], metric)

"""Fake-tensor and autograd rules shared by the kernel-backed ops, and the NaN-policy mask
their per-row results get.

An op ``fwd(x, labels, metric_name, algorithm) -> (S_in, S_out)`` with a backward op
``bwd(grad_in, grad_out, x, labels, metric, algorithm) -> grad_x`` gets the same rules
whichever backend (C++ or Triton) implements it; the backward runs the forward's algorithm
(the router's choice, ``_routing.py``).
"""

from __future__ import annotations

from typing import Callable

import torch

from .._validation import accumulation_dtype as _accumulation
from .._validation import all_finite, finite_rows


def fake_row_sums(x: torch.Tensor, labels: torch.Tensor, metric: str, algorithm: str):
    acc = _accumulation(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape[0], dtype=acc)


def fake_row_sums_backward(grad_in, grad_out, x: torch.Tensor, labels, metric: str,
                           algorithm: str):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def fake_rect_row_sums(x: torch.Tensor, labels, ref, ref_labels, self_offset, metric: str,
                       algorithm: str):
    return fake_row_sums(x, labels, metric, algorithm)


def fake_rect_row_sums_backward(grad_in, grad_out, x: torch.Tensor, labels, ref: torch.Tensor,
                                ref_labels, self_offset, metric: str, algorithm: str):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(ref, memory_format=torch.contiguous_format))


def refuse_double_backward(op: str) -> None:
    """The kernels' backward ops have no derivative of their own. Under
    ``create_graph=True`` (grad mode on inside backward) their result would
    enter the graph as a constant and a second derivative would be silently
    wrong, so every kernel backend raises instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: double backward (create_graph=True: gradient penalties, Hessian-vector "
            "products) is not supported by the fused kernels; use backend='reference' for "
            "higher-order gradients")


def _upstream(grad_in, grad_out, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dS_in and dL/dS_out, zeros in the accumulation dtype where autograd passes None."""
    if grad_in is None or grad_out is None:
        zeros = x.new_zeros(x.shape[0], dtype=_accumulation(x.dtype))
        grad_in = zeros if grad_in is None else grad_in
        grad_out = zeros if grad_out is None else grad_out
    return grad_in, grad_out


def register_row_sums_autograd(fwd_name: str, bwd: Callable) -> None:
    """Autograd of ``fwd_name``: save x and labels (O(N*D)), recompute in backward."""

    def setup_context(ctx, inputs, output):
        x, labels, metric, algorithm = inputs
        ctx.save_for_backward(x, labels)
        ctx.metric, ctx.algorithm = metric, algorithm

    def backward(ctx, grad_in, grad_out):
        refuse_double_backward("intra_inter_sums")
        x, labels = ctx.saved_tensors
        grad_in, grad_out = _upstream(grad_in, grad_out, x)
        return bwd(grad_in, grad_out, x, labels, ctx.metric, ctx.algorithm), None, None, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def register_rect_row_sums_autograd(fwd_name: str, bwd: Callable) -> None:
    """Autograd of the rectangular ``fwd(x, labels, ref, ref_labels, self_offset, metric,
    algorithm)`` with ``bwd(grad_in, grad_out, x, labels, ref, ref_labels, self_offset, metric,
    algorithm) -> (grad_x, grad_ref)``: saves the inputs (O((N + M)*D)), recomputes in
    backward."""

    def setup_context(ctx, inputs, output):
        x, labels, ref, ref_labels, self_offset, metric, algorithm = inputs
        ctx.save_for_backward(x, labels, ref, ref_labels)
        ctx.self_offset, ctx.metric, ctx.algorithm = self_offset, metric, algorithm

    def backward(ctx, grad_in, grad_out):
        refuse_double_backward("intra_inter_sums")
        x, labels, ref, ref_labels = ctx.saved_tensors
        grad_in, grad_out = _upstream(grad_in, grad_out, x)
        grad_x, grad_ref = bwd(grad_in, grad_out, x, labels, ref, ref_labels, ctx.self_offset,
                               ctx.metric, ctx.algorithm)
        return grad_x, None, grad_ref, None, None, None, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def register_sum_with_grad_autograd(op_name: str, loss: str, num_inputs: int) -> None:
    """Autograd of an op ``(inputs...) -> (total, grad_0, ..., grad_k)`` that returns
    sum_i L_i together with its gradients for its first k + 1 inputs, computed in the forward
    pass (one pass over the tiles, no recomputation): backward scales the saved gradients by
    the scalar upstream gradient; the other ``num_inputs - k - 1`` inputs get None."""

    def setup_context(ctx, inputs, output):
        grads = output[1:]
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(*grads)

    def backward(ctx, grad_total, *_grad_grads):
        refuse_double_backward(loss)
        grads = ctx.saved_tensors
        return (*(grad_total * g for g in grads), *([None] * (num_inputs - len(grads))))

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


def nonfinite_rows(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[N]: 0 where row rows_i and the whole table (prototypes, centroids) are finite, NaN
    elsewhere (no host sync). A kernel's min over the table would turn NaN into a plausible
    number; adding this to its per-row result keeps the NaN policy: non-finite in, NaN out."""
    ok = finite_rows(rows) & all_finite(table)
    return torch.where(ok, 0.0, float("nan")).to(_accumulation(rows.dtype))

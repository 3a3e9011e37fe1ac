"""Fake-tensor and autograd rules shared by the kernel-backed ops.

An op ``fwd(x, labels, metric_name) -> (S_in, S_out)`` with a backward op
``bwd(grad_in, grad_out, x, labels, metric) -> grad_x`` gets the same rules
whichever backend (C++ or Triton) implements it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .._validation import accumulation_dtype as _accumulation


def fake_row_sums(x: torch.Tensor, labels: torch.Tensor, metric: str):
    acc = _accumulation(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape[0], dtype=acc)


def fake_row_sums_backward(grad_in, grad_out, x: torch.Tensor, labels, metric: str):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


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


def register_row_sums_autograd(fwd_name: str, bwd: Callable) -> None:
    """Autograd of ``fwd_name``: save x and labels (O(N*D)), recompute in backward."""

    def setup_context(ctx, inputs, output):
        x, labels, metric = inputs
        ctx.save_for_backward(x, labels)
        ctx.metric = metric

    def backward(ctx, grad_in, grad_out):
        refuse_double_backward("intra_inter_sums")
        x, labels = ctx.saved_tensors
        acc = _accumulation(x.dtype)
        if grad_in is None:
            grad_in = x.new_zeros(x.shape[0], dtype=acc)
        if grad_out is None:
            grad_out = x.new_zeros(x.shape[0], dtype=acc)
        return bwd(grad_in, grad_out, x, labels, ctx.metric), None, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)

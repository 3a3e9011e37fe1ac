"""``affinity_hinge``: the fused, differentiable per-row hinge of the affinity loss.

    d_ij = sim(min_t |f_i - w_jt|^2),  L_i = sum_{j != y_i} relu(margin + d_ij - d_{i y_i})

Backends: ``reference`` (N x C m PyTorch), ``cpu`` and ``cuda`` (C++,
torch.ops; csrc/include/confusion_kernels/affinity_tiles.h), ``triton``
(Python custom op). Every kernel backend streams prototype tiles
and never holds N x (C m); backward recomputes the tiles from f, W and the
forward's per-row d_true and active-hinge counts (O(N) saved state).
"""

from __future__ import annotations

import torch

from .. import _extension
from .._routing import Route
from .._validation import accumulation_dtype as _accumulation
from .._validation import compiled_index, poison_all, poison_rows
from ..reference import affinity as _reference
from ._op_checks import check_affinity
from ._registration import (
    nonfinite_rows,
    refuse_double_backward,
    register_sum_with_grad_autograd,
)

CPP_OP = "confusion_kernels::affinity_hinge"
CPP_BACKWARD_OP = "confusion_kernels::affinity_hinge_backward"
TRITON_OP = "confusion_kernels::affinity_hinge_triton"
TRITON_BACKWARD_OP = "confusion_kernels::affinity_hinge_triton_backward"


def _fake_forward(f, prototypes, labels, sigma, margin, similarity):
    rows = f.new_empty(f.shape[0], dtype=_accumulation(f.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


def _fake_backward(grad_rows, f, prototypes, labels, d_true, active, sigma, margin, similarity):
    return (torch.empty_like(f, memory_format=torch.contiguous_format),
            torch.empty_like(prototypes, memory_format=torch.contiguous_format))


def _register_autograd(op_name: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        f, prototypes, labels, sigma, margin, similarity = inputs
        _, d_true, active = output
        ctx.save_for_backward(f, prototypes, labels, d_true, active)
        ctx.params = (sigma, margin, similarity)
        ctx.mark_non_differentiable(d_true, active)

    def backward(ctx, grad_rows, _grad_d_true, _grad_active):
        refuse_double_backward("affinity_hinge")
        f, prototypes, labels, d_true, active = ctx.saved_tensors
        if grad_rows is None:
            return None, None, None, None, None, None
        grad_f, grad_w = backward_op(grad_rows, f, prototypes, labels, d_true, active, *ctx.params)
        return grad_f, grad_w, None, None, None, None

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


CPP_SUM_OP = "confusion_kernels::affinity_hinge_sum_with_grad"


def _fake_sum_with_grad(f, prototypes, labels, sigma, margin, similarity):
    total = f.new_empty((), dtype=_accumulation(f.dtype))
    return (total, torch.empty_like(f, memory_format=torch.contiguous_format),
            torch.empty_like(prototypes, memory_format=torch.contiguous_format))


if _extension.HAS_C and (_extension.has_kernel("affinity_hinge", "CPU")
                         or _extension.has_kernel("affinity_hinge", "CUDA")):
    torch.library.register_fake(CPP_OP)(_fake_forward)
    torch.library.register_fake(CPP_BACKWARD_OP)(_fake_backward)
    _register_autograd(CPP_OP, lambda *a: torch.ops.confusion_kernels.affinity_hinge_backward(*a))
if _extension.HAS_C and (_extension.has_kernel("affinity_hinge_sum_with_grad", "CPU")
                         or _extension.has_kernel("affinity_hinge_sum_with_grad", "CUDA")):
    torch.library.register_fake(CPP_SUM_OP)(_fake_sum_with_grad)
    register_sum_with_grad_autograd(CPP_SUM_OP, "affinity_loss", num_inputs=6)


@torch.library.custom_op(TRITON_OP, mutates_args=())
def _triton_forward(f: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, sigma: float,
                    margin: float, similarity: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton import affinity as kernels

    labels, bad = check_affinity(f, prototypes, labels, sigma, similarity)
    rows, d_true, active = kernels.forward(f, prototypes, labels, sigma, margin,
                                           _reference.SIMILARITIES[similarity])
    return poison_rows(rows, bad), d_true, active


@torch.library.custom_op(TRITON_BACKWARD_OP, mutates_args=())
def _triton_backward(grad_rows: torch.Tensor, f: torch.Tensor, prototypes: torch.Tensor,
                     labels: torch.Tensor, d_true: torch.Tensor, active: torch.Tensor, sigma: float,
                     margin: float, similarity: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton import affinity as kernels

    labels, bad = check_affinity(f, prototypes, labels, sigma, similarity,
                                 (grad_rows, d_true, active))
    grad_f, grad_w = kernels.backward(grad_rows, f, prototypes, labels, d_true, active, sigma,
                                      margin, _reference.SIMILARITIES[similarity])
    return poison_rows(grad_f, bad), poison_all(grad_w, bad)


_triton_forward.register_fake(_fake_forward)
_triton_backward.register_fake(_fake_backward)
_register_autograd(TRITON_OP, _triton_backward)


def affinity_hinge_rows(f: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, *,
                        sigma: float, margin: float, similarity: str, backend: str,
                        inputs_finite: bool = False) -> torch.Tensor:
    """L [N] on an already selected backend (inputs validated by the caller;
    ``inputs_finite``: the caller has scanned f and the prototypes)."""
    if backend == "reference":
        # one dtype policy for every backend: the prototypes join f's accumulation dtype
        index, bad = compiled_index(labels, prototypes.shape[0])
        rows = _reference.affinity_hinge_rows(f, index, prototypes.to(_accumulation(f.dtype)),
                                              sigma=sigma, margin=margin,
                                              similarity_kind=similarity)
        return poison_rows(rows, bad)
    if backend == "triton":
        rows = _triton_forward(f, prototypes, labels, float(sigma), float(margin), similarity)[0]
    else:
        rows = torch.ops.confusion_kernels.affinity_hinge(f, prototypes, labels, float(sigma),
                                                          float(margin), similarity)[0]
    return rows if inputs_finite else rows + nonfinite_rows(f, prototypes)


def affinity_hinge_sum(f: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, *,
                       sigma: float, margin: float, similarity: str, route: Route,
                       inputs_finite: bool = False) -> torch.Tensor:
    """sum_i L_i (a scalar) by the router's choice (``_routing.route("affinity_hinge")``):
    ``sum_with_grad`` (cpu / cuda, a gradient needed) computes the gradients in the forward
    pass as well (one pass over the tiles instead of a forward and a recomputing backward);
    ``rows`` and ``reference`` sum the per-row losses."""
    if route.algorithm == "sum_with_grad":
        total = torch.ops.confusion_kernels.affinity_hinge_sum_with_grad(
            f, prototypes, labels, float(sigma), float(margin), similarity)[0]
        return total if inputs_finite else total + nonfinite_rows(f, prototypes).sum()
    return affinity_hinge_rows(f, labels, prototypes, sigma=sigma, margin=margin,
                               similarity=similarity, backend=route.backend,
                               inputs_finite=inputs_finite).sum()

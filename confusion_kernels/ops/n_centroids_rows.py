"""``n_centroids_rows``: the fused, differentiable per-row N-Centroids loss.

    x_i = z_i / max(|z_i|, 1e-12)
    L_i = d(x_i, c_{y_i}) - g [ d(x_i, c_{h_i}) + mean_{k != y_i} d(x_i, c_k) ],
    h_i = argmin_{k != y_i} d(x_i, c_k),  g = 1 with negatives, else 0

Backends: ``cpu`` and ``cuda`` (C++, torch.ops; csrc/include/confusion_kernels/
n_centroids_tiles.h), ``triton`` (Python custom op; confusion_kernels/triton/n_centroids.py).
No gradient flows into the centroids (they move by EMA). Every kernel backend streams centroid
tiles and never holds N x K; backward recomputes them from z, the centroids and the forward's
hardest index (O(N) saved state). The cpu / cuda training path (a scalar loss that needs a
gradient) computes the loss and its gradient in one pass (``n_centroids_sum_with_grad``).
"""

from __future__ import annotations

import torch

from .. import _extension
from .._routing import Route
from .._validation import accumulation_dtype as _accumulation
from .._validation import poison_rows
from ..reference import n_centroids as _reference
from ._op_checks import check_n_centroids
from ._registration import (
    nonfinite_rows,
    refuse_double_backward,
    register_sum_with_grad_autograd,
)

CPP_OP = "confusion_kernels::n_centroids_rows"
CPP_BACKWARD_OP = "confusion_kernels::n_centroids_rows_backward"
CPP_SUM_OP = "confusion_kernels::n_centroids_sum_with_grad"
TRITON_OP = "confusion_kernels::n_centroids_rows_triton"
TRITON_BACKWARD_OP = "confusion_kernels::n_centroids_rows_triton_backward"


def _chords(x: torch.Tensor, c_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.linalg.vector_norm(x - c_rows, dim=-1),
            torch.linalg.vector_norm(x + c_rows, dim=-1))


def direct_distances(x: torch.Tensor, c_rows: torch.Tensor, metric: str) -> torch.Tensor:
    """d(x_i, c_rows_i) of paired rows (any leading shape), from differences (exact)."""
    if metric == "cosine":
        return 1.0 - (x * c_rows).sum(-1)
    a, b = _chords(x, c_rows)
    return a if metric == "euclidean" else 2.0 * torch.atan2(a, b)


def direct_gradients(x: torch.Tensor, c_rows: torch.Tensor, weight: torch.Tensor,
                     metric: str) -> torch.Tensor:
    """weight_i dd(x_i, c_rows_i)/dx_i = weight (p (x - c) + q (x + c)), with p = 0 where
    |x - c| = 0 and q = 0 where |x + c| = 0 (sphere_math.h: sphere_distance_grad)."""
    if metric == "cosine":
        return -weight[..., None] * c_rows
    a, b = _chords(x, c_rows)
    if metric == "euclidean":
        p = torch.where(a > 0, 1.0 / torch.where(a > 0, a, 1.0), 0.0)
        q = torch.zeros_like(p)
    else:
        s = a * a + b * b
        p = torch.where(a > 0, 2.0 * b / torch.where(a > 0, a * s, 1.0), 0.0)
        q = torch.where(b > 0, -2.0 * a / torch.where(b > 0, b * s, 1.0), 0.0)
    return (weight * p)[..., None] * (x - c_rows) + (weight * q)[..., None] * (x + c_rows)


def through_normalisation(z: torch.Tensor, x: torch.Tensor, grad_x: torch.Tensor) -> torch.Tensor:
    """dL/dz from dL/dx through x = z / max(|z|, 1e-12)."""
    n = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    radial = (grad_x * x).sum(1, keepdim=True)
    return torch.where(n >= _reference.NORM_EPS, (grad_x - x * radial) / n,
                       grad_x / _reference.NORM_EPS)


def _fake_forward(z, centroids, labels, metric, use_negatives):
    rows = z.new_empty(z.shape[0], dtype=_accumulation(z.dtype))
    return rows, z.new_empty(z.shape[0], dtype=torch.int64)


def _fake_backward(grad_rows, z, centroids, labels, hardest, metric, use_negatives):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _fake_sum_with_grad(z, centroids, labels, metric, use_negatives):
    total = z.new_empty((), dtype=_accumulation(z.dtype))
    return total, torch.empty_like(z, memory_format=torch.contiguous_format)


def _register_autograd(op_name: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        z, centroids, labels, metric, use_negatives = inputs
        ctx.save_for_backward(z, centroids, labels, output[1])
        ctx.params = (metric, use_negatives)
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_rows, _grad_hardest):
        refuse_double_backward("n_centroids_loss")
        z, centroids, labels, hardest = ctx.saved_tensors
        if grad_rows is None:
            return None, None, None, None, None
        return backward_op(grad_rows, z, centroids, labels, hardest, *ctx.params), \
            None, None, None, None

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


if _extension.HAS_C and (_extension.has_kernel("n_centroids_rows", "CPU")
                         or _extension.has_kernel("n_centroids_rows", "CUDA")):
    torch.library.register_fake(CPP_OP)(_fake_forward)
    torch.library.register_fake(CPP_BACKWARD_OP)(_fake_backward)
    torch.library.register_fake(CPP_SUM_OP)(_fake_sum_with_grad)
    _register_autograd(CPP_OP,
                       lambda *a: torch.ops.confusion_kernels.n_centroids_rows_backward(*a))
    register_sum_with_grad_autograd(CPP_SUM_OP, "n_centroids_loss", num_inputs=5)


@torch.library.custom_op(TRITON_OP, mutates_args=())
def _triton_forward(z: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, metric: str,
                    use_negatives: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton import n_centroids as kernels

    labels, bad, _ = check_n_centroids(z, centroids, labels, metric, use_negatives)
    acc = _accumulation(z.dtype)
    x = _reference.normalize(z.to(acc)).contiguous()
    c = centroids.to(acc).contiguous()
    own = direct_distances(x, c[labels], metric)
    if not use_negatives:
        return poison_rows(own, bad), torch.full_like(labels, -1)
    hardest, sums = kernels.negatives_forward(x, c, labels.contiguous(), metric)
    rows = own - direct_distances(x, c[hardest], metric) - sums / (c.shape[0] - 1)
    return poison_rows(rows, bad), hardest


@torch.library.custom_op(TRITON_BACKWARD_OP, mutates_args=())
def _triton_backward(grad_rows: torch.Tensor, z: torch.Tensor, centroids: torch.Tensor,
                     labels: torch.Tensor, hardest: torch.Tensor, metric: str,
                     use_negatives: bool) -> torch.Tensor:
    from ..triton import n_centroids as kernels

    labels, bad, hardest = check_n_centroids(z, centroids, labels, metric, use_negatives,
                                             grad_rows, hardest)
    acc = _accumulation(z.dtype)
    zz = z.to(acc)
    x = _reference.normalize(zz).contiguous()
    c = centroids.to(acc).contiguous()
    g = grad_rows.to(acc)
    grad_x = direct_gradients(x, c[labels], g, metric)
    if use_negatives:
        grad_x = grad_x + direct_gradients(x, c[hardest], -g, metric) + kernels.negatives_backward(
            x, c, labels.contiguous(), g / -(c.shape[0] - 1), metric)
    return poison_rows(through_normalisation(zz, x, grad_x).to(z.dtype), bad)


_triton_forward.register_fake(_fake_forward)
_triton_backward.register_fake(_fake_backward)
_register_autograd(TRITON_OP, _triton_backward)


def n_centroids_rows(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, *,
                     metric: str, use_negatives: bool, backend: str) -> torch.Tensor:
    """L [N] on an already selected kernel backend (inputs validated by the caller)."""
    centroids = centroids.detach()
    if backend == "triton":
        rows = _triton_forward(z, centroids, labels, metric, use_negatives)[0]
    else:
        rows = torch.ops.confusion_kernels.n_centroids_rows(z, centroids, labels, metric,
                                                            use_negatives)[0]
    return rows + nonfinite_rows(z, centroids)


def n_centroids_sum(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, *,
                    metric: str, use_negatives: bool, route: Route) -> torch.Tensor:
    """sum_i L_i on a kernel backend by the router's choice (``_routing.route(
    "n_centroids_rows")``): ``sum_with_grad`` (cpu / cuda, a gradient needed) gives loss and
    gradient in one pass, ``rows`` sums the per-row losses."""
    centroids = centroids.detach()
    if route.algorithm == "sum_with_grad":
        total = torch.ops.confusion_kernels.n_centroids_sum_with_grad(z, centroids, labels, metric,
                                                                      use_negatives)[0]
        return total + nonfinite_rows(z, centroids).sum()
    return n_centroids_rows(z, labels, centroids, metric=metric, use_negatives=use_negatives,
                            backend=route.backend).sum()

"""``intra_inter_sums``: the fused, differentiable per-row sums behind ASLoss.

    S_in[i]  = sum_{j != i, y_j == y_i} D(x_i, x_j)
    S_out[i] = sum_{j : y_j != y_i}     D(x_i, x_j)

and its rectangular form against a reference set ``ref`` [M, D] (labels z):
S_in[i] = sum_{z_j == y_i} D(x_i, r_j), S_out[i] = sum_{z_j != y_i} D(x_i, r_j),
leaving out the pair (i, self_offset + i) when x_i is row self_offset + i of ref.

Backends: ``reference`` (N x N PyTorch), ``cpu`` (C++/OpenMP, torch.ops),
``cuda`` (CUDA C++, torch.ops), ``triton`` (Python custom op). The backend and the
kernel algorithm (direct, pair_pass, gram_tiles) are chosen once, by
``_routing.route``; every op takes the algorithm's name and runs it. The C++ ops'
schemas live in csrc/ops.cpp; their fake and autograd rules are registered
here, so every backend is usable under torch.compile and opcheck.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension
from .. import reference as _reference
from .._metrics import METRIC_CODES, resolve_metric
from .._routing import Route, route
from .._scaling import common_scale, rescale_large_rows
from .._validation import autocast_off, check_embeddings, check_labels, names_errors
from ._op_checks import check_algorithm, check_rect_row_sums, check_row_sums
from ._registration import (
    fake_rect_row_sums,
    fake_rect_row_sums_backward,
    fake_row_sums,
    fake_row_sums_backward,
    register_rect_row_sums_autograd,
    register_row_sums_autograd,
)

CPP_OP = "confusion_kernels::intra_inter_sums"
CPP_BACKWARD_OP = "confusion_kernels::intra_inter_sums_backward"
TRITON_OP = "confusion_kernels::intra_inter_sums_triton"
TRITON_BACKWARD_OP = "confusion_kernels::intra_inter_sums_triton_backward"
CPP_RECT_OP = "confusion_kernels::intra_inter_sums_rect"
CPP_RECT_BACKWARD_OP = "confusion_kernels::intra_inter_sums_rect_backward"
TRITON_RECT_OP = "confusion_kernels::intra_inter_sums_rect_triton"
TRITON_RECT_BACKWARD_OP = "confusion_kernels::intra_inter_sums_rect_triton_backward"

if _extension.HAS_C:
    torch.library.register_fake(CPP_OP)(fake_row_sums)
    torch.library.register_fake(CPP_BACKWARD_OP)(fake_row_sums_backward)
    register_row_sums_autograd(
        CPP_OP, lambda *a: torch.ops.confusion_kernels.intra_inter_sums_backward(*a))
if _extension.HAS_C and _extension.has_kernel("intra_inter_sums_rect", "CPU"):
    torch.library.register_fake(CPP_RECT_OP)(fake_rect_row_sums)
    torch.library.register_fake(CPP_RECT_BACKWARD_OP)(fake_rect_row_sums_backward)
    register_rect_row_sums_autograd(
        CPP_RECT_OP, lambda *a: torch.ops.confusion_kernels.intra_inter_sums_rect_backward(*a))


# The Triton square op runs 'pair_pass' (each unordered pair once) or 'direct'.
_TRITON_SQUARE = ("direct", "pair_pass")


@torch.library.custom_op(TRITON_OP, mutates_args=())
def _triton_forward(x: torch.Tensor, labels: torch.Tensor, metric: str,
                    algorithm: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton import intra_inter_sums as kernels

    check_row_sums(x, labels, metric)
    check_algorithm(TRITON_OP.split("::")[1], algorithm, metric, _TRITON_SQUARE)
    code = METRIC_CODES[metric]
    if algorithm == "pair_pass":
        from ..triton import pair_pass

        return pair_pass.row_sums(x, labels, code)
    return kernels.forward(x, labels, code)


@torch.library.custom_op(TRITON_BACKWARD_OP, mutates_args=())
def _triton_backward(grad_in: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor,
                     labels: torch.Tensor, metric: str, algorithm: str) -> torch.Tensor:
    from ..triton import intra_inter_sums as kernels

    check_row_sums(x, labels, metric, (grad_in, grad_out))
    check_algorithm(TRITON_BACKWARD_OP.split("::")[1], algorithm, metric, _TRITON_SQUARE)
    code = METRIC_CODES[metric]
    if algorithm == "pair_pass":  # dL/dx = d(sum g_in S_in + g_out S_out)/dx, one pair pass
        from ..triton import pair_pass

        _, _, g_same, g_other = pair_pass.weighted_with_grad(x, labels, grad_in, grad_out, code)
        return (g_same + g_other).to(x.dtype)
    return kernels.backward(grad_in, grad_out, x, labels, code)


_triton_forward.register_fake(fake_row_sums)
_triton_backward.register_fake(fake_row_sums_backward)
register_row_sums_autograd(TRITON_OP, _triton_backward)


@torch.library.custom_op(TRITON_RECT_OP, mutates_args=())
def _triton_rect_forward(x: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor,
                         ref_labels: torch.Tensor, self_offset: Optional[int],
                         metric: str, algorithm: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton import intra_inter_sums as kernels

    check_rect_row_sums(x, labels, ref, ref_labels, self_offset, metric)
    check_algorithm(TRITON_RECT_OP.split("::")[1], algorithm, metric, ("direct",))
    return kernels.rect_forward(x, labels, ref, ref_labels, self_offset, METRIC_CODES[metric])


@torch.library.custom_op(TRITON_RECT_BACKWARD_OP, mutates_args=())
def _triton_rect_backward(grad_in: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor,
                          labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor,
                          self_offset: Optional[int], metric: str, algorithm: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton import intra_inter_sums as kernels

    check_rect_row_sums(x, labels, ref, ref_labels, self_offset, metric, (grad_in, grad_out))
    check_algorithm(TRITON_RECT_BACKWARD_OP.split("::")[1], algorithm, metric, ("direct",))
    return kernels.rect_backward(grad_in, grad_out, x, labels, ref, ref_labels, self_offset,
                                 METRIC_CODES[metric])


_triton_rect_forward.register_fake(fake_rect_row_sums)
_triton_rect_backward.register_fake(fake_rect_row_sums_backward)
register_rect_row_sums_autograd(TRITON_RECT_OP, _triton_rect_backward)


def _check_reference_set(x: torch.Tensor, ref: torch.Tensor | None, ref_labels, self_offset,
                         check_finite: bool | None):
    """Validates the rectangular form's inputs; returns ref_labels as int64 (None without ref)."""
    if ref is None:
        if ref_labels is not None or self_offset is not None:
            raise ValueError("intra_inter_sums: ref_labels and self_offset need ref")
        return None
    if ref_labels is None:
        raise ValueError("intra_inter_sums: ref needs ref_labels (one label per row of ref)")
    check_embeddings(ref, "ref", check_finite=check_finite, count="M")
    if ref.shape[1] != x.shape[1]:
        raise ValueError(f"intra_inter_sums: ref must have x's {x.shape[1]} columns, got shape "
                         f"{tuple(ref.shape)}")
    if ref.dtype != x.dtype:
        raise TypeError(f"intra_inter_sums: ref must have x's dtype {x.dtype}, got {ref.dtype}")
    if ref.device != x.device:
        raise ValueError(f"intra_inter_sums: ref is on {ref.device} but x is on {x.device}")
    ref_labels = check_labels(ref_labels, ref.shape[0], x.device, "ref_labels")
    if self_offset is not None:
        if isinstance(self_offset, bool) or not isinstance(self_offset, int):
            raise TypeError(f"intra_inter_sums: self_offset must be an int or None, got "
                            f"{type(self_offset).__name__}")
        if self_offset < 0 or self_offset + x.shape[0] > ref.shape[0]:
            raise ValueError(f"intra_inter_sums: self_offset must satisfy 0 <= self_offset and "
                             f"self_offset + N <= M (N = {x.shape[0]}, M = {ref.shape[0]}), got "
                             f"{self_offset}")
    return ref_labels


@names_errors("intra_inter_sums")
@autocast_off
def intra_inter_sums(x: torch.Tensor, labels: torch.Tensor, metric: str = "euclidean", *,
                     dim_mean: bool = False, backend: str = "auto",
                     check_finite: bool | None = None,
                     ref: torch.Tensor | None = None, ref_labels: torch.Tensor | None = None,
                     self_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of distances to same-class and other-class rows.

    Args:
        x: embeddings [N, D], fp16/bf16/fp32/fp64 (any strides).
        labels: integer labels [N]; any values, only equality matters.
        metric: "euclidean" ("l2"), "sqeuclidean", "manhattan" ("l1"), "cosine",
            "smooth_l1"; aliases "l1_mean", "mse" imply ``dim_mean``.
        dim_mean: divide every distance by D.
        backend: "auto" | "reference" | "cpu" | "triton" | "cuda".
        check_finite: scan x (and ref) for NaN/Inf first (ValueError). None (default):
            for CPU tensors, and on any device under ``strict_checks()``; on a GPU the scan
            (a host synchronisation) is skipped and non-finite input gives NaN sums.
        ref: optional reference set [M, D] (x's dtype and device): the columns are its
            rows instead of x's (a gathered global batch, a memory of past batches).
        ref_labels: integer labels [M] of ref (required with ref).
        self_offset: x_i is row ``self_offset + i`` of ref, and that pair is left out
            (as the diagonal is in the square form); None: no pair is left out.

    Returns:
        (S_in [N], S_out [N]), float32 for fp16/bf16 inputs, else x's dtype;
        differentiable w.r.t. x (and ref) with O((N + M)*D) memory (no N x M
        buffers) on the kernel backends. The rectangular form runs Gram-form tiles on
        cpu for euclidean / sqeuclidean (D > 8) and cosine, recomputing the pairs the Gram
        form cannot resolve from differences, and the difference form on triton and cuda
        (``_routing.route`` states every rule).
    """
    check_embeddings(x, "x", check_finite=check_finite)
    labels = check_labels(labels, x.shape[0], x.device)
    ref_labels = _check_reference_set(x, ref, ref_labels, self_offset, check_finite)
    name, _, dim_mean = resolve_metric(metric, dim_mean)
    op = "intra_inter_sums" if ref is None else "intra_inter_sums_rect"
    return checked_row_sums(x, labels, name, route(op, x, backend, metric=name), ref=ref,
                            ref_labels=ref_labels, self_offset=self_offset, dim_mean=dim_mean)


def checked_row_sums(x: torch.Tensor, labels: torch.Tensor, name: str, chosen: Route, *,
                     ref: torch.Tensor | None = None, ref_labels: torch.Tensor | None = None,
                     self_offset: int | None = None, dim_mean: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """intra_inter_sums on inputs that its caller has already validated (x, int64 labels on
    x's device, ref and ref_labels likewise, the canonical metric name) with the route
    (backend and algorithm) its caller chose: the public functions validate and route once
    at their entry and call this, so a check runs once and its message names the function
    the user called. The registered ops still check their own inputs and refuse an
    algorithm they have no kernel for (a direct torch.ops call)."""
    if name == "cosine":  # the kernels square the norms (the eps floor then applies to the
        x = rescale_large_rows(x)  # rescaled ones: only for a row of norm below ~1e-26)
        ref = None if ref is None else rescale_large_rows(ref)
    scaled = common_scale(name, x, *(() if ref is None else (ref,)))
    if scaled is not None:  # euclidean / sqeuclidean: one power of two for all rows
        x = x * scaled[0].to(x.dtype)
        ref = None if ref is None else ref * scaled[0].to(ref.dtype)
    if chosen.backend == "reference":
        s_in, s_out = _reference.intra_inter_sums(x, labels, name, ref=ref, ref_labels=ref_labels,
                                                  self_offset=self_offset)
    elif ref is not None:
        rect = _triton_rect_forward if chosen.backend == "triton" else \
            torch.ops.confusion_kernels.intra_inter_sums_rect
        s_in, s_out = rect(x, labels, ref, ref_labels, self_offset, name, chosen.algorithm)
    elif chosen.backend == "triton":
        s_in, s_out = _triton_forward(x, labels, name, chosen.algorithm)
    else:
        s_in, s_out = torch.ops.confusion_kernels.intra_inter_sums(x, labels, name,
                                                                   chosen.algorithm)
    if scaled is not None:
        s_in, s_out = s_in * scaled[1].to(s_in.dtype), s_out * scaled[1].to(s_out.dtype)
    if dim_mean and x.shape[1] > 0:
        s_in, s_out = s_in / x.shape[1], s_out / x.shape[1]
    return s_in, s_out

"""Scale-invariant quantities of rows whose squared norm would overflow.

The cosine distance and the N-Centroids loss depend on a row only through its direction,
but every backend squares the row's entries (|x|^2 in the norm, the Gram form): in fp32 a
row with entries of 1e19 (fp64: 1e154) overflows to inf, and its direction becomes 0 or NaN.
"""

from __future__ import annotations

import torch

from ._validation import reads_for_free

# Rows whose largest |x_ik| exceeds this (by the dtype the kernels compute in) are rescaled:
# D x (2^40)^2 stays below fp32's 2^128 for any D < 2^48; likewise 2^400 for fp64.
RESCALE_ABOVE = {torch.float32: 2.0 ** 40, torch.float64: 2.0 ** 400}


def rescale_large_rows(x: torch.Tensor) -> torch.Tensor:
    """x with every row whose largest |x_ik| exceeds ``RESCALE_ABOVE`` divided by a power of
    two (exact) that brings that entry into [0.5, 1); other rows unchanged.

    For quantities that do not depend on a row's scale (its direction): autograd carries the
    factor back (d/dx = c d/d(c x)). Only large rows change, so a floor such as
    max(|x|, eps) applies as before to every row that could reach it.
    """
    top = x.detach().abs().amax(-1, keepdim=True) if x.shape[-1] else x.new_zeros(
        *x.shape[:-1], 1)
    if reads_for_free(top) and not bool((top > RESCALE_ABOVE[_work_dtype(x)]).any()):
        return x  # no row to rescale: on the host, where asking costs nothing, the input
        # itself (no multiplication by one, no autograd node)
    down, _ = _scale_down(top.to(_work_dtype(x)))
    return x * down.to(x.dtype)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scale_down(top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2^-e, e) where top (a largest |entry|, float32 or float64) exceeds ``RESCALE_ABOVE``,
    with top < 2^e; (1, 0) elsewhere."""
    _, exponent = torch.frexp(top)
    exponent = torch.where(top > RESCALE_ABOVE[top.dtype], exponent, 0)
    return torch.ldexp(torch.ones_like(top), -exponent), exponent


# Degree of each metric in the scale of its rows: D(c a, c b) = c^p D(a, b).
HOMOGENEOUS_DEGREE = {"euclidean": 1, "sqeuclidean": 2}


def common_scale(metric: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a homogeneous metric (euclidean: degree 1, sqeuclidean: 2): (factor for the rows,
    factor for the sums), powers of two (exact) that bring the largest |entry| of all
    ``tensors`` below 1 when it exceeds ``RESCALE_ABOVE`` (1 and 1 otherwise), so that the
    kernels' squares cannot overflow while the true sums are finite (fp32 entries of 1e20:
    true sums ~1e22, but NaN or inf from inf - inf). None for other metrics, and for CPU
    tensors that need no scaling. No host synchronisation on a GPU: the factors are
    tensors."""
    degree = HOMOGENEOUS_DEGREE.get(metric)
    if degree is None or not all(t.numel() for t in tensors):
        return None
    work = _work_dtype(tensors[0])
    top = torch.stack([t.detach().abs().amax().to(work) for t in tensors]).amax()
    if reads_for_free(top) and not float(top) > RESCALE_ABOVE[work]:
        return None  # nothing to scale (NaN included: its factors would be 1 too)
    down, exponent = _scale_down(top)
    return down, torch.ldexp(torch.ones_like(top), degree * exponent)

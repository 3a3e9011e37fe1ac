"""Triton kernels of ClassStatistics.update on CUDA tensors: per class, the sums of
(x - shift_y) and (x - shift_y)^2 over a batch of features [B, K], in float64.

Deterministic: the per-class sums are formed from integers. Adding floats with
atomics depends on the order in which the GPU's threads arrive; adding integers does
not. Two passes over the features, each program owning BLOCK_B rows x BLOCK_K features:

  amax    per (class, feature) the largest |x - shift_y|, by an atomic max of its bits
          (for non-negative floats the int64 bit patterns order as the values do);
  sums    each (x - shift_y) and (x - shift_y)^2 times a power of two chosen per
          (class, feature) from that bound and the class count, so that no sum can
          pass 2^61, truncated to int64 and added atomically (exact in any order).

Each sum is then within count * 2^-61 * bound of the exact one (relative to the
largest term of its class and feature, not to the largest feature overall). A NaN or
Inf feature makes its (class, feature) sums NaN, as a float sum would. The class
counts are an exact integer index_add.
"""

import torch
import triton
import triton.language as tl

from .._counts import class_counts

RESOURCE_BUDGET = {"_amax_kernel": dict(min_blocks_per_sm=2),
                   "_fixed_point_sums_kernel": dict(min_blocks_per_sm=2)}


@triton.jit
def _shifted(X, LAB, SHIFT, B, K, stride_x, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """(x - shift_y in fp64, offsets into the [C, K] sums, mask) of this program's tile."""
    # int64 offsets: rows * stride_x and lab * K can pass 2**31 for large batches.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < B
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    lab = tl.load(LAB + rows, mask=rmask, other=0)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float64)
    at = lab[:, None] * K + cols[None, :]
    shift = tl.load(SHIFT + at, mask=mask, other=0.0)
    return x - shift, at, mask


@triton.jit
def _amax_kernel(X, LAB, SHIFT, AMAX_BITS, B, K, stride_x,
                 BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    d, at, mask = _shifted(X, LAB, SHIFT, B, K, stride_x, BLOCK_B, BLOCK_K)
    bits = tl.abs(d).to(tl.int64, bitcast=True)
    tl.atomic_max(AMAX_BITS + at, bits, mask=mask)


@triton.jit
def _fixed_point_sums_kernel(X, LAB, SHIFT, SCALE1, SCALE2, S1, S2, B, K, stride_x,
                             BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    d, at, mask = _shifted(X, LAB, SHIFT, B, K, stride_x, BLOCK_B, BLOCK_K)
    scale1 = tl.load(SCALE1 + at, mask=mask, other=0.0)
    scale2 = tl.load(SCALE2 + at, mask=mask, other=0.0)
    ok = mask & (tl.abs(d) <= 1.0e300)  # non-finite terms are marked after the kernel
    q1 = tl.where(ok, d * scale1, 0.0).to(tl.int64)
    q2 = tl.where(ok, d * d * scale2, 0.0).to(tl.int64)
    tl.atomic_add(S1 + at, q1, mask=mask)
    tl.atomic_add(S2 + at, q2, mask=mask)


def _power_of_two_scale(bound: torch.Tensor) -> torch.Tensor:
    """2^(61 - e) with bound < 2^e: terms of magnitude <= bound / count sum below 2^61
    (0 where the bound is not finite: those sums become NaN)."""
    finite = torch.isfinite(bound)
    _, exponent = torch.frexp(torch.where(finite, bound, 0.0))
    scale = torch.ldexp(torch.ones_like(bound), (61 - exponent).clamp(-1000, 1000))
    return torch.where(finite, scale, 0.0)


BLOCK_B, BLOCK_K = 32, 64


def grid(b: int, k: int) -> tuple[int, int]:
    """One program per BLOCK_B rows x BLOCK_K features."""
    return triton.cdiv(b, BLOCK_B), triton.cdiv(k, BLOCK_K)


def shifted_sums(features: torch.Tensor, labels: torch.Tensor, shift: torch.Tensor,
                 num_classes: int):
    """(count [C], sum(x - shift_y) [C, K], sum((x - shift_y)^2) [C, K]), float64."""
    b, k = features.shape
    labels = labels.contiguous()
    x = features if features.stride(1) == 1 else features.contiguous()
    shift = shift.to(torch.float64).contiguous()
    count = class_counts(labels, num_classes)
    amax_bits = torch.zeros(num_classes, k, dtype=torch.int64, device=features.device)
    s1 = torch.zeros_like(amax_bits)
    s2 = torch.zeros_like(amax_bits)
    if b and k:
        _amax_kernel[grid(b, k)](x, labels, shift, amax_bits, b, k, x.stride(0),
                                 BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K)
    amax = amax_bits.view(torch.float64)
    n = count[:, None].clamp_min(1)
    scale1 = _power_of_two_scale(amax * n)
    scale2 = _power_of_two_scale(amax * amax * n)
    if b and k:
        _fixed_point_sums_kernel[grid(b, k)](x, labels, shift, scale1, scale2, s1, s2, b, k,
                                             x.stride(0), BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K)
    return count, _unscale(s1, scale1), _unscale(s2, scale2)


def _unscale(fixed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float64 sums of the int64 fixed-point ones; NaN where the scale is 0."""
    ok = scale > 0
    return torch.where(ok, fixed.to(torch.float64) / torch.where(ok, scale, 1.0), float("nan"))

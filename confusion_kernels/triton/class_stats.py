"""Triton kernel of ClassStatistics.update on CUDA tensors: one pass over the
features [B, K] adds, per row, (x - shift_y) and (x - shift_y)^2 into the
float64 per-class sums [C, K]. One program owns BLOCK_B rows x BLOCK_K
features; the adds are atomic (the order of float64 additions may vary between
runs, by the last bits only). The class counts are an exact bincount.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _shifted_sums_kernel(X, LAB, SHIFT, S1, S2, B, K, stride_x,
                         BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # int64 offsets: rows * stride_x and lab * K can pass 2**31 for large batches.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < B
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    lab = tl.load(LAB + rows, mask=rmask, other=0)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float64)
    shift = tl.load(SHIFT + lab[:, None] * K + cols[None, :], mask=mask, other=0.0)
    d = x - shift
    tl.atomic_add(S1 + lab[:, None] * K + cols[None, :], d, mask=mask)
    tl.atomic_add(S2 + lab[:, None] * K + cols[None, :], d * d, mask=mask)


def shifted_sums(features: torch.Tensor, labels: torch.Tensor, shift: torch.Tensor,
                 num_classes: int):
    """(count [C], sum(x - shift_y) [C, K], sum((x - shift_y)^2) [C, K]), float64."""
    b, k = features.shape
    labels = labels.contiguous()
    x = features if features.stride(1) == 1 else features.contiguous()
    s1 = torch.zeros(num_classes, k, dtype=torch.float64, device=features.device)
    s2 = torch.zeros_like(s1)
    block_b, block_k = 32, 64
    _shifted_sums_kernel[(triton.cdiv(b, block_b), triton.cdiv(k, block_k))](
        x, labels, shift.contiguous(), s1, s2, b, k, x.stride(0),
        BLOCK_B=block_b, BLOCK_K=block_k)
    count = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    return count, s1, s2

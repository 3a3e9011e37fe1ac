"""Triton kernels of ``intra_inter_sums`` for the metrics without a Gram form
(manhattan, smooth_l1), and the difference-form helpers of the Gram pass.

Forward: one program owns ``BLOCK_M`` rows and streams column tiles; per row it
keeps S_in and S_out (O(N) output, no N x N memory). Backward: one program
owns ``BLOCK_M`` rows x ``BLOCK_DO`` output dimensions and recomputes the
distance tiles it needs. Distances come from per-dimension differences.

euclidean / sqeuclidean / cosine run on the triangular Gram-form pass of
``pair_sums.py``, which calls ``_direct_distance`` here for the pairs the Gram
form cannot resolve. The per-pair formulas are those of
``csrc/include/confusion_kernels/pair_math.h``.
"""

import torch
import triton
import triton.language as tl

from .. import _metrics
from .._backend import triton_interpreting
from .._validation import accumulation_dtype

# Globals read inside @triton.jit functions must be constexpr.
EUCLIDEAN = tl.constexpr(_metrics.EUCLIDEAN)
MANHATTAN = tl.constexpr(_metrics.MANHATTAN)
COSINE = tl.constexpr(_metrics.COSINE)
SMOOTH_L1 = tl.constexpr(_metrics.SMOOTH_L1)
COSINE_EPS = tl.constexpr(_metrics.COSINE_EPS)


# ---------------------------------------------------------------------------
# Tile helpers
# ---------------------------------------------------------------------------
@triton.jit
def _direct_sums(X, stride, rows, cols, rmask, cmask, D,
                 METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-pair sums over all of D from differences: (acc, dot) of [BLOCK_M, BLOCK_N].
    For cosine X holds the unit rows: acc = |a_hat - b_hat|^2, dot = cos(a, b)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        xi = tl.load(X + rows[:, None] * stride + ks[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0).to(ACC)
        xj = tl.load(X + cols[:, None] * stride + ks[None, :],
                     mask=cmask[:, None] & kmask[None, :], other=0.0).to(ACC)
        a = xi[:, None, :]
        b = xj[None, :, :]
        if METRIC == COSINE:
            # unit rows come from memory: no product here that the compiler
            # could fuse into an FMA, so identical rows give exactly 0
            t = a - b
            acc += tl.sum(t * t, axis=2)
            dot += tl.sum(a * b, axis=2)
        else:
            t = a - b
            if METRIC == MANHATTAN:
                term = tl.abs(t)
            elif METRIC == SMOOTH_L1:
                at = tl.abs(t)
                term = tl.where(at < 1.0, 0.5 * t * t, at - 0.5)
            else:
                term = t * t
            acc += tl.sum(term, axis=2)
    return acc, dot


@triton.jit
def _direct_distance(X, stride, rows, cols, rmask, cmask, n2_i, n2_j, D,
                     METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Exact distances of a [BLOCK_M, BLOCK_N] tile (X: unit rows for cosine)."""
    acc, dot = _direct_sums(X, stride, rows, cols, rmask, cmask, D, METRIC, ACC, BLOCK_M,
                            BLOCK_N, BLOCK_K)
    if METRIC == COSINE:
        norm_ij = tl.sqrt(n2_i)[:, None] * tl.sqrt(n2_j)[None, :]
        # a.b = |a||b| cos(a, b) on the eps branch
        dist = tl.where(norm_ij > COSINE_EPS, 0.5 * acc, 1.0 - norm_ij * dot / COSINE_EPS)
    elif METRIC == EUCLIDEAN:
        dist = tl.sqrt(acc)
    else:
        dist = acc
    return dist


@triton.jit
def _column_tile(LAB, NORM2, c0, rows, rmask, N, BLOCK_N: tl.constexpr):
    """Columns [c0, c0 + BLOCK_N): indices, mask, labels, squared norms, and the
    mask of valid (row, column) pairs (both in range, not the diagonal)."""
    cols = tl.arange(0, BLOCK_N).to(tl.int64) + c0  # int64: cols * stride can pass 2**31
    cmask = cols < N
    lab_j = tl.load(LAB + cols, mask=cmask, other=0)
    n2_j = tl.load(NORM2 + cols, mask=cmask, other=0.0)
    valid = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
    return cols, cmask, lab_j, n2_j, valid


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------
@triton.jit
def _forward_kernel(XA, LAB, NORM2, S_IN, S_OUT, N, D, stride,
                    METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * stride
    rmask = rows < N
    lab_i = tl.load(LAB + rows, mask=rmask, other=0)
    n2_i = tl.load(NORM2 + rows, mask=rmask, other=0.0)
    s_in = tl.zeros((BLOCK_M,), dtype=ACC)
    s_out = tl.zeros((BLOCK_M,), dtype=ACC)
    for c0 in range(0, N, BLOCK_N):
        cols, cmask, lab_j, n2_j, valid = _column_tile(LAB, NORM2, c0, rows, rmask, N, BLOCK_N)
        dist = _direct_distance(XA, stride, rows, cols, rmask, cmask, n2_i, n2_j, D, METRIC,
                                ACC, BLOCK_M, BLOCK_N, BLOCK_K)
        dist = tl.where(valid, dist, 0.0).to(ACC)
        same = lab_i[:, None] == lab_j[None, :]
        s_in += tl.sum(tl.where(same, dist, 0.0), axis=1)
        s_out += tl.sum(tl.where(same, 0.0, dist), axis=1)
    tl.store(S_IN + rows, s_in, mask=rmask)
    tl.store(S_OUT + rows, s_out, mask=rmask)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------
@triton.jit
def _exact_grad(coef, xi, xj, METRIC: tl.constexpr):
    """sum_j coef[i, j] * dD(x_i, x_j)/dx_i over the output dims held in xi / xj
    (manhattan, smooth_l1)."""
    t = xi[:, None, :] - xj[None, :, :]
    if METRIC == MANHATTAN:
        contrib = coef[:, :, None] * tl.where(t > 0, 1.0, tl.where(t < 0, -1.0, 0.0))
    else:  # SMOOTH_L1: clipped to [-1, 1] by comparisons, which keep NaN (tl.maximum drops it)
        contrib = coef[:, :, None] * tl.where(t < -1.0, -1.0, tl.where(t > 1.0, 1.0, t))
    return tl.sum(contrib, axis=1)


@triton.jit
def _backward_kernel(XA, LAB, NORM2, G_IN, G_OUT, GRAD, N, D, stride,
                     METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * stride
    rmask = rows < N
    ko = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    komask = ko < D
    lab_i = tl.load(LAB + rows, mask=rmask, other=0)
    n2_i = tl.load(NORM2 + rows, mask=rmask, other=0.0)
    gi_in = tl.load(G_IN + rows, mask=rmask, other=0.0)
    gi_out = tl.load(G_OUT + rows, mask=rmask, other=0.0)
    xi = tl.load(XA + rows[:, None] * stride + ko[None, :],
                 mask=rmask[:, None] & komask[None, :], other=0.0)
    grad = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    for c0 in range(0, N, BLOCK_N):
        cols, cmask, lab_j, n2_j, valid = _column_tile(LAB, NORM2, c0, rows, rmask, N, BLOCK_N)
        gj_in = tl.load(G_IN + cols, mask=cmask, other=0.0)
        gj_out = tl.load(G_OUT + cols, mask=cmask, other=0.0)
        same = lab_i[:, None] == lab_j[None, :]
        coef = tl.where(same, gi_in[:, None] + gj_in[None, :], gi_out[:, None] + gj_out[None, :])
        coef = tl.where(valid, coef, 0.0)
        xj = tl.load(XA + cols[:, None] * stride + ko[None, :],
                     mask=cmask[:, None] & komask[None, :], other=0.0)
        grad += _exact_grad(coef, xi, xj, METRIC)
    tl.store(GRAD + rows[:, None] * stride + ko[None, :], grad,
             mask=rmask[:, None] & komask[None, :])


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _config() -> dict:
    if triton_interpreting():
        # numpy does the work: large tiles mean fewer interpreted steps.
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_DO=32, num_warps=4)
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=8, BLOCK_DO=16, num_warps=4)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def forward(x: torch.Tensor, labels: torch.Tensor, metric: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S_in, S_out of ``x`` [N, D] (any float dtype) and int64 ``labels`` [N]
    for a metric without a Gram form."""
    acc = accumulation_dtype(x.dtype)
    cfg = _config()
    xa = x.to(acc).contiguous()
    norm2 = torch.zeros(xa.shape[0], dtype=acc, device=x.device)  # read by cosine only
    n, d = xa.shape
    s_in = torch.empty(n, dtype=acc, device=x.device)
    s_out = torch.empty(n, dtype=acc, device=x.device)
    block_m = cfg["BLOCK_M"]
    _forward_kernel[(triton.cdiv(n, block_m),)](
        xa, labels.contiguous(), norm2, s_in, s_out, n, d, d,
        METRIC=metric, ACC=_tl_dtype(acc), BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return s_in, s_out


def backward(grad_in: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor,
             labels: torch.Tensor, metric: int) -> torch.Tensor:
    """dL/dx from per-row upstream gradients of S_in and S_out (no Gram form)."""
    acc = accumulation_dtype(x.dtype)
    cfg = _config()
    xa = x.to(acc).contiguous()
    n, d = xa.shape
    grad = torch.empty_like(xa)
    if d == 0:
        return grad.to(x.dtype)
    norm2 = torch.zeros(n, dtype=acc, device=x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_DO"]))
    _backward_kernel[grid](
        xa, labels.contiguous(), norm2, grad_in.to(acc).contiguous(),
        grad_out.to(acc).contiguous(), grad, n, d, d,
        METRIC=metric, ACC=_tl_dtype(acc), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], BLOCK_DO=cfg["BLOCK_DO"], num_warps=cfg["num_warps"])
    return grad.to(x.dtype)

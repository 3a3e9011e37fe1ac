"""Triton kernels of ``intra_inter_sums`` for the metrics without a Gram form
(manhattan, smooth_l1), of its rectangular form (every metric), and the
difference-form helpers of the Gram pass.

Forward: one program owns ``BLOCK_M`` rows and streams column tiles; per row it
keeps S_in and S_out (O(N) output, no N x N memory). Backward: one program
owns ``BLOCK_M`` rows x ``BLOCK_DO`` output dimensions and recomputes the
distance tiles it needs. Distances come from per-dimension differences.

euclidean / sqeuclidean / cosine run on the pair pass (Gram form) of
``pair_pass.py``, which calls ``_direct_distance`` here for the pairs the Gram
form cannot resolve. The per-pair formulas are those of
``csrc/include/confusion_kernels/pair_math.h``.
"""

import torch
import triton
import triton.language as tl

from .. import _metrics
from .._backend import triton_interpreting
from .._validation import accumulation_dtype
from ._support import MAXNREG, div_rn, launch_options, shares, sqrt_rn, target_programs

# Globals read inside @triton.jit functions must be constexpr.
EUCLIDEAN = tl.constexpr(_metrics.EUCLIDEAN)
MANHATTAN = tl.constexpr(_metrics.MANHATTAN)
COSINE = tl.constexpr(_metrics.COSINE)
SMOOTH_L1 = tl.constexpr(_metrics.SMOOTH_L1)
COSINE_EPS = tl.constexpr(_metrics.COSINE_EPS)
INV_COSINE_EPS = tl.constexpr(1.0 / _metrics.COSINE_EPS)  # x / eps as a multiply
# What the launchers assume of each kernel's occupancy (scripts/triton_aot.py fails a
# variant that fits fewer blocks per SM): grids are sized from the SM count
# (_support.target_programs), one resident block per SM.
RESOURCE_BUDGET = {"_forward_kernel": dict(min_blocks_per_sm=1),
                   "_backward_kernel": dict(min_blocks_per_sm=1)}


# ---------------------------------------------------------------------------
# Tile helpers
# ---------------------------------------------------------------------------
@triton.jit
def _direct_sums(XA, XB, stride, rows, cols, rmask, cmask, D,
                 METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-pair sums over all of D from differences of rows of XA and XB: (acc, dot)
    of [BLOCK_M, BLOCK_N]. For cosine the sides hold the unit rows:
    acc = |a_hat - b_hat|^2, dot = cos(a, b)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        xi = tl.load(XA + rows[:, None] * stride + ks[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0).to(ACC)
        xj = tl.load(XB + cols[:, None] * stride + ks[None, :],
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
def _direct_distance(XA, XB, stride, rows, cols, rmask, cmask, n2_i, n2_j, D,
                     METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Exact distances of a [BLOCK_M, BLOCK_N] tile (unit rows for cosine, with the
    squared norms n2 of the rows before normalising)."""
    acc, dot = _direct_sums(XA, XB, stride, rows, cols, rmask, cmask, D, METRIC, ACC, BLOCK_M,
                            BLOCK_N, BLOCK_K)
    if METRIC == COSINE:
        norm_ij = sqrt_rn(n2_i)[:, None] * sqrt_rn(n2_j)[None, :]
        # a.b = |a||b| cos(a, b) on the eps branch
        dist = tl.where(norm_ij > COSINE_EPS, 0.5 * acc, 1.0 - norm_ij * dot * INV_COSINE_EPS)
    elif METRIC == EUCLIDEAN:
        dist = sqrt_rn(acc)
    else:
        dist = acc
    return dist


@triton.jit
def _column_tile(LAB_B, NORM2_B, c0, rows, rmask, M, SHIFT, HAS_SELF: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Columns [c0, c0 + BLOCK_N) of side b: indices, mask, labels, squared norms, and
    the mask of valid (row, column) pairs (both in range, not the left-out pair
    column - row == SHIFT)."""
    cols = tl.arange(0, BLOCK_N).to(tl.int64) + c0  # int64: cols * stride can pass 2**31
    cmask = cols < M
    lab_j = tl.load(LAB_B + cols, mask=cmask, other=0)
    n2_j = tl.load(NORM2_B + cols, mask=cmask, other=0.0)
    valid = rmask[:, None] & cmask[None, :]
    if HAS_SELF:
        valid = valid & ((cols[None, :] - rows[:, None]) != SHIFT)
    return cols, cmask, lab_j, n2_j, valid


# ---------------------------------------------------------------------------
# Forward: rows of side a against the columns of side b
# (csrc/include/confusion_kernels/pair_sides.h)
# ---------------------------------------------------------------------------
@triton.jit
def _forward_kernel(XA, LAB_A, NORM2_A, XB, LAB_B, NORM2_B, S_IN, S_OUT, N, M, D, stride, SHIFT,
                    COLS_PER_SPLIT, HAS_SELF: tl.constexpr, METRIC: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Grid (row blocks, column splits): program (r, s) adds the columns
    [s COLS_PER_SPLIT, (s + 1) COLS_PER_SPLIT) into row s of the [splits, N] partial sums."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * stride
    rmask = rows < N
    split = tl.program_id(1).to(tl.int64)
    lab_i = tl.load(LAB_A + rows, mask=rmask, other=0)
    n2_i = tl.load(NORM2_A + rows, mask=rmask, other=0.0)
    s_in = tl.zeros((BLOCK_M,), dtype=ACC)
    s_out = tl.zeros((BLOCK_M,), dtype=ACC)
    for c0 in range(0, COLS_PER_SPLIT, BLOCK_N):
        cols, cmask, lab_j, n2_j, valid = _column_tile(LAB_B, NORM2_B, split * COLS_PER_SPLIT + c0,
                                                       rows, rmask, M, SHIFT, HAS_SELF, BLOCK_N)
        dist = _direct_distance(XA, XB, stride, rows, cols, rmask, cmask, n2_i, n2_j, D, METRIC,
                                ACC, BLOCK_M, BLOCK_N, BLOCK_K)
        dist = tl.where(valid, dist, 0.0).to(ACC)
        same = lab_i[:, None] == lab_j[None, :]
        s_in += tl.sum(tl.where(same, dist, 0.0), axis=1)
        s_out += tl.sum(tl.where(same, 0.0, dist), axis=1)
    tl.store(S_IN + split * N + rows, s_in, mask=rmask)
    tl.store(S_OUT + split * N + rows, s_out, mask=rmask)


# ---------------------------------------------------------------------------
# Backward: grad_a[i] = sum_j c_ij dD(a_i, b_j)/da_i
# ---------------------------------------------------------------------------
@triton.jit
def _exact_grad(coef, dist, xi, xj, n2_i, n2_j, METRIC: tl.constexpr):
    """sum_j coef[i, j] * dD(a_i, b_j)/da_i over the output dims held in xi / xj (unit
    rows for cosine; the formulas of pair_math.h / pair_sides.h)."""
    t = xi[:, None, :] - xj[None, :, :]
    if METRIC == MANHATTAN:
        contrib = coef[:, :, None] * tl.where(t > 0, 1.0, tl.where(t < 0, -1.0, 0.0))
    elif METRIC == SMOOTH_L1:  # clipped to [-1, 1] by comparisons, which keep NaN
        contrib = coef[:, :, None] * tl.where(t < -1.0, -1.0, tl.where(t > 1.0, 1.0, t))
    elif METRIC == EUCLIDEAN:
        w = tl.where(dist > 0.0, div_rn(coef, tl.where(dist > 0.0, dist, 1.0)), 0.0)
        contrib = w[:, :, None] * t
    elif METRIC == COSINE:
        na = sqrt_rn(n2_i)[:, None]
        nb = sqrt_rn(n2_j)[None, :]
        regular = na * nb > COSINE_EPS
        alpha = tl.where(regular, div_rn(-coef, tl.where(regular, na, 1.0)), 0.0)
        gamma = tl.where(regular, 0.0, -coef * nb * INV_COSINE_EPS)
        contrib = (alpha[:, :, None] * (xj[None, :, :] - xi[:, None, :])
                   + (alpha * dist)[:, :, None] * xi[:, None, :]
                   + gamma[:, :, None] * xj[None, :, :])
    else:  # sqeuclidean
        contrib = (2.0 * coef)[:, :, None] * t
    return tl.sum(contrib, axis=1)


@triton.jit
def _backward_kernel(XA, LAB_A, NORM2_A, GA_IN, GA_OUT, XB, LAB_B, NORM2_B, GB_IN, GB_OUT, GRAD,
                     N, M, D, stride, SHIFT, HAS_SELF: tl.constexpr, METRIC: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * stride
    rmask = rows < N
    ko = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    komask = ko < D
    lab_i = tl.load(LAB_A + rows, mask=rmask, other=0)
    n2_i = tl.load(NORM2_A + rows, mask=rmask, other=0.0)
    gi_in = tl.load(GA_IN + rows, mask=rmask, other=0.0)
    gi_out = tl.load(GA_OUT + rows, mask=rmask, other=0.0)
    xi = tl.load(XA + rows[:, None] * stride + ko[None, :],
                 mask=rmask[:, None] & komask[None, :], other=0.0)
    grad = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    for c0 in range(0, M, BLOCK_N):
        cols, cmask, lab_j, n2_j, valid = _column_tile(LAB_B, NORM2_B, c0, rows, rmask, M, SHIFT,
                                                       HAS_SELF, BLOCK_N)
        gj_in = tl.load(GB_IN + cols, mask=cmask, other=0.0)
        gj_out = tl.load(GB_OUT + cols, mask=cmask, other=0.0)
        same = lab_i[:, None] == lab_j[None, :]
        coef = tl.where(same, gi_in[:, None] + gj_in[None, :], gi_out[:, None] + gj_out[None, :])
        coef = tl.where(valid, coef, 0.0)
        if METRIC == EUCLIDEAN or METRIC == COSINE:
            dist = _direct_distance(XA, XB, stride, rows, cols, rmask, cmask, n2_i, n2_j, D,
                                    METRIC, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            dist = coef  # unused by the other metrics
        xj = tl.load(XB + cols[:, None] * stride + ko[None, :],
                     mask=cmask[:, None] & komask[None, :], other=0.0)
        grad += _exact_grad(coef, dist, xi, xj, n2_i, n2_j, METRIC)
    tl.store(GRAD + rows[:, None] * stride + ko[None, :], grad,
             mask=rmask[:, None] & komask[None, :])


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _config(dtype: torch.dtype = torch.float32, metric: int = _metrics.EUCLIDEAN) -> dict:
    """Tiles of the direct passes. Their products are broadcasts over
    [BLOCK_M, BLOCK_N, BLOCK_K] (distances) and [BLOCK_M, BLOCK_N, BLOCK_DO]
    (gradient terms) in registers: these are the largest tiles that compile
    without spilling for sm_80 / sm_90 (scripts/triton_aot.py), fp64 on half the rows,
    cosine (three gradient terms per pair) on half the columns."""
    if triton_interpreting():
        # numpy does the work: large tiles mean fewer interpreted steps.
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_DO=32, num_warps=4)
    rows = 16 if dtype == torch.float64 else 32
    cols = 8 if metric == _metrics.COSINE else 16
    return dict(BLOCK_M=rows, BLOCK_N=cols, BLOCK_K=4, BLOCK_DO=8, num_warps=8, maxnreg=MAXNREG)


def launch_grids(n: int, d: int, cfg: dict, m: int | None = None,
                 target: int = 1) -> dict[str, tuple[int, ...]]:
    """Grids of the direct passes of n rows of d dimensions against m columns (default n):
    the forward's columns split (``_support.shares``) until there are about ``target``
    programs, e.g. 4,096 rows against 65,536 (the rectangular benchmark) would otherwise be
    128 programs on 132 SMs; ``column_splits`` is (splits, columns per split)."""
    m = n if m is None else m
    row_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    splits, per_split = shares(m, row_blocks, cfg["BLOCK_N"], target)
    return dict(forward=(row_blocks, splits), column_splits=(splits, per_split),
                backward=(row_blocks, triton.cdiv(d, cfg["BLOCK_DO"])))


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _Side:
    """One side of a direct pass: rows in the accumulation dtype (unit rows for
    cosine), labels, squared norms (read by cosine only) and upstream weights."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, metric: int,
                 g_in: torch.Tensor | None = None, g_out: torch.Tensor | None = None):
        acc = accumulation_dtype(x.dtype)
        xa = x.to(acc)
        n = xa.shape[0]
        self.norm2 = torch.zeros(n, dtype=acc, device=x.device)
        if metric == _metrics.COSINE:
            self.norm2 = (xa * xa).sum(1)
            norms = self.norm2.sqrt()[:, None]
            xa = torch.where(norms > 0, xa / torch.where(norms > 0, norms, 1.0), 0.0)
        self.rows = xa.contiguous()
        self.labels = labels.contiguous()
        zeros = torch.zeros(n, dtype=acc, device=x.device)
        self.g_in = zeros if g_in is None else g_in.to(acc).contiguous()
        self.g_out = zeros if g_out is None else g_out.to(acc).contiguous()
        self.n = n


def _self_args(shift: int | None) -> dict:
    return dict(SHIFT=0 if shift is None else shift, HAS_SELF=shift is not None)


def row_sums(a: _Side, b: _Side, shift: int | None, metric: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """S_in, S_out of the rows of ``a`` against the columns of ``b``, the pair
    (i, i + shift) left out (none when ``shift`` is None)."""
    cfg = _config(a.rows.dtype, metric)
    d = a.rows.shape[1]
    grids = launch_grids(a.n, d, cfg, b.n, target_programs(a.rows.device))
    splits, per_split = grids["column_splits"]
    s_in = torch.empty(splits, a.n, dtype=a.rows.dtype, device=a.rows.device)
    s_out = torch.empty_like(s_in)
    _forward_kernel[grids["forward"]](
        a.rows, a.labels, a.norm2, b.rows, b.labels, b.norm2, s_in, s_out, a.n, b.n, d, d,
        COLS_PER_SPLIT=per_split, **_self_args(shift), METRIC=metric, ACC=_tl_dtype(a.rows.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        **launch_options(cfg))
    if splits == 1:
        return s_in[0], s_out[0]
    return s_in.sum(0), s_out.sum(0)  # the partial sums in a fixed order: deterministic


def row_grad(a: _Side, b: _Side, shift: int | None, metric: int) -> torch.Tensor:
    """sum_j c_ij dD(a_i, b_j)/da_i for every row of ``a`` (accumulation dtype);
    c_ij from both sides' upstream weights."""
    cfg = _config(a.rows.dtype, metric)
    d = a.rows.shape[1]
    grad = torch.empty_like(a.rows)
    if d == 0:
        return grad
    _backward_kernel[launch_grids(a.n, d, cfg)["backward"]](
        a.rows, a.labels, a.norm2, a.g_in, a.g_out, b.rows, b.labels, b.norm2, b.g_in, b.g_out,
        grad, a.n, b.n, d, d, **_self_args(shift), METRIC=metric, ACC=_tl_dtype(a.rows.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_DO=cfg["BLOCK_DO"], **launch_options(cfg))
    return grad


def forward(x: torch.Tensor, labels: torch.Tensor, metric: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S_in, S_out of ``x`` [N, D] (any float dtype) and int64 ``labels`` [N]."""
    side = _Side(x, labels, metric)
    return row_sums(side, side, 0, metric)


def backward(grad_in: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor,
             labels: torch.Tensor, metric: int) -> torch.Tensor:
    """dL/dx from per-row upstream gradients of S_in and S_out."""
    side = _Side(x, labels, metric, grad_in, grad_out)
    return row_grad(side, side, 0, metric).to(x.dtype)


def rect_forward(x: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor,
                 ref_labels: torch.Tensor, self_offset: int | None, metric: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """S_in, S_out of the rows of ``x`` against the rows of ``ref``."""
    return row_sums(_Side(x, labels, metric), _Side(ref, ref_labels, metric), self_offset, metric)


def rect_backward(grad_in: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor,
                  labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor,
                  self_offset: int | None, metric: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dref): x as the rows with its upstream weights, then ref as the rows
    with the weights on the column side and the left-out pair at -self_offset."""
    xs = _Side(x, labels, metric, grad_in, grad_out)
    refs = _Side(ref, ref_labels, metric)
    swapped = None if self_offset is None else -self_offset
    return (row_grad(xs, refs, self_offset, metric).to(x.dtype),
            row_grad(refs, xs, swapped, metric).to(ref.dtype))

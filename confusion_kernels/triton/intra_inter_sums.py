"""Triton kernels of ``intra_inter_sums`` (SPEC section 2).

Forward: one program owns ``BLOCK_M`` rows and streams column tiles; per row it
keeps S_in and S_out (O(N) output, no N x N memory). Backward: one program
owns ``BLOCK_M`` rows x ``BLOCK_DO`` output dimensions and recomputes the
distance tiles it needs.

euclidean / sqeuclidean / cosine use the Gram form (``tl.dot``, fp32
accumulation; fp16/bf16 operands use the tensor cores). Pairs where the Gram
form loses its digits (duplicated rows, near neighbours) are recomputed from
per-dimension differences, which gives distance 0 and gradient 0 for
identical rows. manhattan / smooth_l1, and fp64 inputs, always use the
difference form. The per-pair formulas are those of
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
SQEUCLIDEAN = tl.constexpr(_metrics.SQEUCLIDEAN)
MANHATTAN = tl.constexpr(_metrics.MANHATTAN)
COSINE = tl.constexpr(_metrics.COSINE)
SMOOTH_L1 = tl.constexpr(_metrics.SMOOTH_L1)
COSINE_EPS = tl.constexpr(_metrics.COSINE_EPS)
GRAM_EXACT_FRACTION = tl.constexpr(_metrics.GRAM_EXACT_FRACTION)


# ---------------------------------------------------------------------------
# Tile helpers
# ---------------------------------------------------------------------------
@triton.jit
def _safe_inverse(v):
    ok = v > 0
    return tl.where(ok, 1.0 / tl.where(ok, v, 1.0), 0.0)


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
def _gram_dot(X, stride, rows, cols, rmask, cmask, D, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        kmask = ks < D
        xi = tl.load(X + rows[:, None] * stride + ks[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        xj = tl.load(X + cols[:, None] * stride + ks[None, :],
                     mask=cmask[:, None] & kmask[None, :], other=0.0)
        dot += tl.dot(xi, tl.trans(xj), input_precision=DOT_PRECISION)
    return dot


@triton.jit
def _gram_distance(dot, n2_i, n2_j, METRIC: tl.constexpr):
    """Gram-form distances and the mask of pairs that need the exact form
    (pair_math.h: gram_distance)."""
    if METRIC == COSINE:  # dot is the cosine of the unit rows
        dist = 1.0 - dot
        regular = n2_i[:, None] * n2_j[None, :] > COSINE_EPS * COSINE_EPS
        exact = (dist <= GRAM_EXACT_FRACTION) | (regular == 0)
    else:
        nsum = n2_i[:, None] + n2_j[None, :]
        d2 = nsum - 2.0 * dot
        d2 = tl.where(d2 < 0.0, 0.0, d2)  # not tl.maximum: NaN must pass through
        exact = d2 <= nsum * GRAM_EXACT_FRACTION
        if METRIC == EUCLIDEAN:
            dist = tl.sqrt(d2)
        else:
            dist = d2
    return dist, exact


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
def _forward_kernel(XG, XA, LAB, NORM2, S_IN, S_OUT, N, D, stride,
                    METRIC: tl.constexpr, USE_GRAM: tl.constexpr, ACC: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * stride
    rmask = rows < N
    lab_i = tl.load(LAB + rows, mask=rmask, other=0)
    n2_i = tl.load(NORM2 + rows, mask=rmask, other=0.0)
    s_in = tl.zeros((BLOCK_M,), dtype=ACC)
    s_out = tl.zeros((BLOCK_M,), dtype=ACC)
    for c0 in range(0, N, BLOCK_N):
        cols, cmask, lab_j, n2_j, valid = _column_tile(LAB, NORM2, c0, rows, rmask, N, BLOCK_N)
        if USE_GRAM:
            dot = _gram_dot(XG, stride, rows, cols, rmask, cmask, D, BLOCK_M, BLOCK_N, BLOCK_D,
                            DOT_PRECISION)
            dist, exact = _gram_distance(dot, n2_i, n2_j, METRIC)
            exact = exact & valid
            if tl.max(exact.to(tl.int32)) > 0:
                exact_dist = _direct_distance(XA, stride, rows, cols, rmask, cmask, n2_i, n2_j,
                                              D, METRIC, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
                dist = tl.where(exact, exact_dist, dist)
        else:
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
def _exact_grad(X, stride, rows, cols, rmask, cmask, n2_i, n2_j, coef, xi, xj, D,
                METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_j coef[i, j] * dD(x_i, x_j)/dx_i over the output dims held in xi / xj
    (X, xi, xj: unit rows for cosine)."""
    a = xi[:, None, :]
    b = xj[None, :, :]
    if METRIC == EUCLIDEAN:
        dist = _direct_distance(X, stride, rows, cols, rmask, cmask, n2_i, n2_j, D, METRIC, ACC,
                                BLOCK_M, BLOCK_N, BLOCK_K)
        scale = coef * _safe_inverse(dist)
        contrib = scale[:, :, None] * (a - b)
    elif METRIC == SQEUCLIDEAN:
        contrib = (2.0 * coef)[:, :, None] * (a - b)
    elif METRIC == MANHATTAN:
        t = a - b
        contrib = coef[:, :, None] * tl.where(t > 0, 1.0, tl.where(t < 0, -1.0, 0.0))
    elif METRIC == SMOOTH_L1:
        t = a - b  # clipped to [-1, 1] by comparisons, which keep NaN (tl.maximum drops it)
        contrib = coef[:, :, None] * tl.where(t < -1.0, -1.0, tl.where(t > 1.0, 1.0, t))
    else:  # COSINE
        dist = _direct_distance(X, stride, rows, cols, rmask, cmask, n2_i, n2_j, D, METRIC, ACC,
                                BLOCK_M, BLOCK_N, BLOCK_K)
        norm_i = tl.sqrt(n2_i)
        norm_j = tl.sqrt(n2_j)
        regular = (norm_i[:, None] * norm_j[None, :]) > COSINE_EPS
        # dD/da = -(1/|a|) ((b_hat - a_hat) + D a_hat); eps branch: -b/eps = -|b| b_hat/eps
        reg = (-coef * _safe_inverse(norm_i)[:, None])[:, :, None] * ((b - a) + dist[:, :, None] * a)
        deg = (-coef * norm_j[None, :] / COSINE_EPS)[:, :, None] * b
        contrib = tl.where(regular[:, :, None], reg, deg)
    return tl.sum(contrib, axis=1)


@triton.jit
def _backward_kernel(XG, XA, LAB, NORM2, G_IN, G_OUT, GRAD, N, D, stride,
                     METRIC: tl.constexpr, USE_GRAM: tl.constexpr, ACC: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
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
    self_coef = tl.zeros((BLOCK_M,), dtype=ACC)
    for c0 in range(0, N, BLOCK_N):
        cols, cmask, lab_j, n2_j, valid = _column_tile(LAB, NORM2, c0, rows, rmask, N, BLOCK_N)
        gj_in = tl.load(G_IN + cols, mask=cmask, other=0.0)
        gj_out = tl.load(G_OUT + cols, mask=cmask, other=0.0)
        same = lab_i[:, None] == lab_j[None, :]
        coef = tl.where(same, gi_in[:, None] + gj_in[None, :], gi_out[:, None] + gj_out[None, :])
        coef = tl.where(valid, coef, 0.0)
        xj = tl.load(XA + cols[:, None] * stride + ko[None, :],
                     mask=cmask[:, None] & komask[None, :], other=0.0)
        if USE_GRAM:
            dot = _gram_dot(XG, stride, rows, cols, rmask, cmask, D, BLOCK_M, BLOCK_N, BLOCK_D,
                            DOT_PRECISION)
            dist, exact = _gram_distance(dot, n2_i, n2_j, METRIC)
            exact = exact & valid
            # dD/dx_i = self * op(x_i) + other * op(x_j) on pairs that keep the Gram form
            # (op: the row, or the unit row for cosine; pair_math.h: gram_grad_coefficients).
            if METRIC == EUCLIDEAN:
                s = _safe_inverse(dist)
                o = -s
            elif METRIC == SQEUCLIDEAN:
                s = tl.full((BLOCK_M, BLOCK_N), 2.0, tl.float32)
                o = -s
            else:
                inv_norm = _safe_inverse(tl.sqrt(n2_i))[:, None]
                s = dot * inv_norm
                o = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) - inv_norm
            w = tl.where(exact, 0.0, coef)
            self_coef += tl.sum(w * s, axis=1)
            xj_g = tl.load(XG + cols[:, None] * stride + ko[None, :],
                           mask=cmask[:, None] & komask[None, :], other=0.0).to(tl.float32)
            grad += tl.dot((w * o).to(tl.float32), xj_g, input_precision=DOT_PRECISION)
            if tl.max(exact.to(tl.int32)) > 0:
                grad += _exact_grad(XA, stride, rows, cols, rmask, cmask, n2_i, n2_j,
                                    tl.where(exact, coef, 0.0), xi, xj, D, METRIC, ACC,
                                    BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            grad += _exact_grad(XA, stride, rows, cols, rmask, cmask, n2_i, n2_j, coef, xi, xj,
                                D, METRIC, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
    if USE_GRAM:
        xi_g = tl.load(XG + rows[:, None] * stride + ko[None, :],
                       mask=rmask[:, None] & komask[None, :], other=0.0).to(ACC)
        grad += self_coef[:, None] * xi_g
    tl.store(GRAD + rows[:, None] * stride + ko[None, :], grad,
             mask=rmask[:, None] & komask[None, :])


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _config(x: torch.Tensor, metric: int) -> dict:
    use_gram = metric in _metrics.GRAM_METRICS and x.dtype != torch.float64
    if triton_interpreting():
        # numpy does the work: large tiles mean fewer interpreted steps.
        return dict(USE_GRAM=use_gram, BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, BLOCK_K=32,
                    BLOCK_DO=32, num_warps=4)
    if use_gram:
        return dict(USE_GRAM=True, BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, BLOCK_K=4, BLOCK_DO=32,
                    num_warps=4)
    return dict(USE_GRAM=False, BLOCK_M=32, BLOCK_N=32, BLOCK_D=16, BLOCK_K=8, BLOCK_DO=16,
                num_warps=4)


def _dot_precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _exact_operands(xa: torch.Tensor, norm2: torch.Tensor, metric: int) -> torch.Tensor:
    """Rows the difference form reads: x (accumulation dtype), or for cosine the
    unit rows x/|x| (a division: exactly +-1 in one dimension; zero rows stay 0)."""
    if metric != _metrics.COSINE:
        return xa
    norms = norm2.sqrt()[:, None]
    return torch.where(norms > 0, xa / norms, torch.zeros_like(xa)).contiguous()


def _gram_operands(x: torch.Tensor, xa: torch.Tensor, metric: int) -> torch.Tensor:
    """Rows the Gram form multiplies: x itself (fp16/bf16 stay so for the tensor
    cores), or the unit rows for cosine."""
    return xa if metric == _metrics.COSINE else x.contiguous()


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def forward(x: torch.Tensor, labels: torch.Tensor, metric: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S_in, S_out of ``x`` [N, D] (any float dtype) and int64 ``labels`` [N]."""
    acc = accumulation_dtype(x.dtype)
    cfg = _config(x, metric)
    xa = x.to(acc).contiguous()
    norm2 = (xa * xa).sum(1).contiguous()
    xa = _exact_operands(xa, norm2, metric)
    xg = _gram_operands(x, xa, metric) if cfg["USE_GRAM"] else xa
    n, d = xa.shape
    s_in = torch.empty(n, dtype=acc, device=x.device)
    s_out = torch.empty(n, dtype=acc, device=x.device)
    block_m = cfg["BLOCK_M"]
    _forward_kernel[(triton.cdiv(n, block_m),)](
        xg, xa, labels.contiguous(), norm2, s_in, s_out, n, d, d,
        METRIC=metric, USE_GRAM=cfg["USE_GRAM"], ACC=_tl_dtype(acc),
        DOT_PRECISION=_dot_precision(x), BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return s_in, s_out


def backward(grad_in: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor,
             labels: torch.Tensor, metric: int) -> torch.Tensor:
    """dL/dx from per-row upstream gradients of S_in and S_out."""
    acc = accumulation_dtype(x.dtype)
    cfg = _config(x, metric)
    xa = x.to(acc).contiguous()
    n, d = xa.shape
    grad = torch.empty_like(xa)
    if d == 0:
        return grad.to(x.dtype)
    norm2 = (xa * xa).sum(1).contiguous()
    xa = _exact_operands(xa, norm2, metric)
    xg = _gram_operands(x, xa, metric) if cfg["USE_GRAM"] else xa
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_DO"]))
    _backward_kernel[grid](
        xg, xa, labels.contiguous(), norm2, grad_in.to(acc).contiguous(),
        grad_out.to(acc).contiguous(), grad, n, d, d,
        METRIC=metric, USE_GRAM=cfg["USE_GRAM"], ACC=_tl_dtype(acc),
        DOT_PRECISION=_dot_precision(x), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"], BLOCK_DO=cfg["BLOCK_DO"],
        num_warps=cfg["num_warps"])
    return grad.to(x.dtype)

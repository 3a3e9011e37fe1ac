"""Triton kernels of the pair pass (Gram metrics: euclidean, sqeuclidean, cosine).

Two modes over the same schedule, each unordered pair of rows computed once:

* ``row_sums``: S_in[i], S_out[i] of ``intra_inter_sums`` (each distance is
  added to both of its rows);
* ``weighted_with_grad``: t_in = sum_i w_in[i] S_in[i], t_out likewise, and
  dt_in/dx, dt_out/dx (the one-pass ASLoss core, and the backward of
  ``intra_inter_sums`` with the upstream gradients as weights).

Schedule. The rows are sorted by label and cut into T blocks of BLOCK rows.
The T (T - 1) / 2 off-diagonal block pairs are visited in T' - 1 rounds of a
round-robin tournament (T' = T rounded up to even; the circle method): in a
round every block meets exactly one other block, so the programs of a round
update disjoint rows with plain loads and stores. A last round takes the
diagonal blocks. Rounds are separate launches on one stream, so the order of
every addition is fixed: deterministic, no atomics, O(N * D) memory.

Accuracy. Each block pair is shifted before the Gram form
|a - b|^2 = |a|^2 + |b|^2 - 2 a.b: by the class mean when its row block holds one
class, else by the block's mean, and then the same-class pairs of the tile are
formed again around their class mean. So the operands of a close pair are as
small as its class's spread, and the close pairs of a trained (clustered)
embedding keep their digits. Pairs the
Gram form still cannot resolve (d^2 <= (|a|^2 + |b|^2) / 16, duplicates, and
cosine pairs on the eps branch) take the difference form. fp16/bf16 inputs are
read as stored and shifted in fp32, never rounded again (see ``_precisions_of``).
"""

import torch
import triton
import triton.language as tl

from .. import _metrics
from .._backend import triton_interpreting
from .._validation import accumulation_dtype
from ._support import (FP64_DOT, MAXNREG, div_rn, dot_precision, launch_options, pad_columns,
                       sqrt_rn, use_dot)
from .intra_inter_sums import _direct_distance

EUCLIDEAN = tl.constexpr(_metrics.EUCLIDEAN)
SQEUCLIDEAN = tl.constexpr(_metrics.SQEUCLIDEAN)
COSINE = tl.constexpr(_metrics.COSINE)
COSINE_EPS = tl.constexpr(_metrics.COSINE_EPS)
INV_COSINE_EPS = tl.constexpr(1.0 / _metrics.COSINE_EPS)
GRAM_EXACT_FRACTION = tl.constexpr(_metrics.GRAM_EXACT_FRACTION)
# What the launchers assume of each kernel's occupancy (scripts/triton_aot.py fails a
# variant that fits fewer blocks per SM): the pair pass sizes its rounds from N alone and
# needs one resident block per SM.
RESOURCE_BUDGET = {"_pair_kernel": dict(min_blocks_per_sm=1)}


@triton.jit
def _mm(x, y, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """x @ y: tl.dot, or for fp64 before Triton 3.5 (see _support.py) a broadcast
    product summed in ACC."""
    if USE_DOT:
        return tl.dot(x, y, input_precision=PRECISION, out_dtype=ACC)
    else:
        return tl.sum(x[:, :, None] * y[None, :, :], axis=1)


@triton.jit
def _safe_inverse(v):
    ok = v > 0
    return tl.where(ok, div_rn(1.0, tl.where(ok, v, 1.0)), 0.0)


@triton.jit
def _block_pair(ROUND, T_EVEN, DIAGONAL: tl.constexpr):
    """(P, Q) of this program: round ROUND of the circle method over T_EVEN
    blocks (block T_EVEN - 1 fixed, the others rotating), or (p, p) in the
    diagonal round. Blocks >= T are padding (the program has no work)."""
    k = tl.program_id(0)
    if DIAGONAL:
        p = k
        q = k
    else:
        ring = T_EVEN - 1
        if k == 0:
            p = ROUND
            q = T_EVEN - 1
        else:
            p = (ROUND + k) % ring
            q = (ROUND - k + ring) % ring
    lo = tl.minimum(p, q)
    hi = tl.maximum(p, q)
    return lo, hi


@triton.jit(do_not_specialize=["ROUND", "T", "T_EVEN"])  # one compile for every round
def _pair_kernel(Z, SHIFT, ONE_CLASS, U, NC, LAB, SQ, W_IN, W_OUT, T_IN, T_OUT, G_IN, G_OUT,
                 XR, GX_IN, GX_OUT, N, D, ROUND, T, T_EVEN,
                 METRIC: tl.constexpr, GRAD: tl.constexpr, DIAGONAL: tl.constexpr,
                 ACC: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 GRAD_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    p, q = _block_pair(ROUND, T_EVEN, DIAGONAL)
    if q < T:
        rows = p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: rows * D can pass 2**31
        cols = q.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < N
        cmask = cols < N
        valid = rmask[:, None] & cmask[None, :]
        if DIAGONAL:
            valid = valid & (cols[None, :] > rows[:, None])  # each unordered pair once
        lab_i = tl.load(LAB + rows, mask=rmask, other=0)
        lab_j = tl.load(LAB + cols, mask=cmask, other=0)
        same = lab_i[:, None] == lab_j[None, :]
        shift_row = SHIFT + p.to(tl.int64) * D

        # Phase 1: Gram form of the shifted operands, and their norms.
        dot = tl.zeros((BLOCK, BLOCK), dtype=ACC)
        na = tl.zeros((BLOCK,), dtype=ACC)
        nb = tl.zeros((BLOCK,), dtype=ACC)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            kmask = ks < D
            m = tl.load(shift_row + ks, mask=kmask, other=0.0)
            a = tl.load(Z + rows[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0) - m[None, :]
            b = tl.load(Z + cols[:, None] * D + ks[None, :], mask=cmask[:, None] & kmask[None, :],
                        other=0.0) - m[None, :]
            na += tl.sum(a * a, axis=1)
            nb += tl.sum(b * b, axis=1)
            dot += _mm(a, tl.trans(b), USE_DOT, DOT_PRECISION, ACC)
        nsum = na[:, None] + nb[None, :]
        d2 = nsum - 2.0 * dot
        # A row block holding several classes: its same-class pairs again, around
        # their class mean (U = z - mean of its class), so that a tight class far
        # from the block mean keeps its digits. A one-class block is shifted by
        # its class mean already.
        if (tl.load(ONE_CLASS + p) == 0) & (tl.max((same & valid).to(tl.int32)) > 0):
            dot_c = tl.zeros((BLOCK, BLOCK), dtype=ACC)
            for k0 in range(0, D, BLOCK_D):
                ks = k0 + tl.arange(0, BLOCK_D)
                kmask = ks < D
                u_i = tl.load(U + rows[:, None] * D + ks[None, :],
                              mask=rmask[:, None] & kmask[None, :], other=0.0)
                u_j = tl.load(U + cols[:, None] * D + ks[None, :],
                              mask=cmask[:, None] & kmask[None, :], other=0.0)
                dot_c += _mm(u_i, tl.trans(u_j), USE_DOT, DOT_PRECISION, ACC)
            nc_i = tl.load(NC + rows, mask=rmask, other=0.0)
            nc_j = tl.load(NC + cols, mask=cmask, other=0.0)
            nsum = tl.where(same, nc_i[:, None] + nc_j[None, :], nsum)
            d2 = tl.where(same, nsum - 2.0 * dot_c, d2)
        d2 = tl.where(d2 < 0.0, 0.0, d2)  # not tl.maximum: NaN must pass through
        exact = d2 <= nsum * GRAM_EXACT_FRACTION
        if METRIC == COSINE:
            sq_i = tl.load(SQ + rows, mask=rmask, other=0.0)
            sq_j = tl.load(SQ + cols, mask=cmask, other=0.0)
            regular = sq_i[:, None] * sq_j[None, :] > COSINE_EPS * COSINE_EPS
            exact = exact | (regular == 0)
            dist = 0.5 * d2
        elif METRIC == EUCLIDEAN:
            dist = sqrt_rn(d2)
        else:
            dist = d2
        exact = exact & valid
        if tl.max(exact.to(tl.int32)) > 0:  # rare once shifted: the difference form
            if METRIC == COSINE:
                exact_dist = _direct_distance(Z, Z, D, rows, cols, rmask, cmask, sq_i, sq_j, D,
                                              METRIC, ACC, BLOCK, BLOCK, BLOCK_K)
            else:
                exact_dist = _direct_distance(Z, Z, D, rows, cols, rmask, cmask, na, nb, D,
                                              METRIC, ACC, BLOCK, BLOCK, BLOCK_K)
            dist = tl.where(exact, exact_dist, dist)
        dist = tl.where(valid, dist, 0.0)

        if GRAD:
            wi_in = tl.load(W_IN + rows, mask=rmask, other=0.0)
            wi_out = tl.load(W_OUT + rows, mask=rmask, other=0.0)
            wj_in = tl.load(W_IN + cols, mask=cmask, other=0.0)
            wj_out = tl.load(W_OUT + cols, mask=cmask, other=0.0)
            pw = tl.where(same, wi_in[:, None] + wj_in[None, :], wi_out[:, None] + wj_out[None, :])
            pw = tl.where(valid, pw, 0.0)
            wd = pw * dist
            t_in = tl.sum(tl.where(same, wd, 0.0), axis=1)
            t_out = tl.sum(tl.where(same, 0.0, wd), axis=1)
            tl.store(T_IN + rows, tl.load(T_IN + rows, mask=rmask, other=0.0) + t_in, mask=rmask)
            tl.store(T_OUT + rows, tl.load(T_OUT + rows, mask=rmask, other=0.0) + t_out,
                     mask=rmask)
            # dD/d(operand of row i) = coef * (a_i - b_j), operands in the shifted space
            if METRIC == EUCLIDEAN:
                coef = pw * _safe_inverse(dist)
            elif METRIC == SQEUCLIDEAN:
                coef = 2.0 * pw
            else:
                coef = tl.where(regular, pw, 0.0)
                # eps branch: D = 1 - x_i.x_j / eps, dD/dx_i = -x_j / eps (in x space)
                irregular = valid & (regular == 0)
                if tl.max(irregular.to(tl.int32)) > 0:
                    w_eps = tl.where(irregular, -pw * INV_COSINE_EPS, 0.0)
                    _add_linear_grads(XR, GX_IN, GX_OUT, tl.where(same, w_eps, 0.0),
                                      tl.where(same, 0.0, w_eps), rows, cols, rmask, cmask,
                                      D, DIAGONAL, ACC, USE_DOT, GRAD_PRECISION, BLOCK, BLOCK_D)
            if tl.max(exact.to(tl.int32)) > 0:  # their gradients from differences too
                w_exact = tl.where(exact, coef, 0.0)
                coef = tl.where(exact, 0.0, coef)
                _add_exact_grads(Z, G_IN, G_OUT, tl.where(same, w_exact, 0.0),
                                 tl.where(same, 0.0, w_exact), rows, cols, rmask, cmask, D,
                                 DIAGONAL, ACC, BLOCK, BLOCK_K)
                tl.debug_barrier()  # the next update reads what this one stored
            w_same = tl.where(same, coef, 0.0)
            w_other = tl.where(same, 0.0, coef)
            _add_difference_grads(Z, U, shift_row, G_IN, G_OUT, w_same, w_other, rows, cols, rmask,
                                  cmask, D, DIAGONAL, ACC, USE_DOT, GRAD_PRECISION, BLOCK,
                                  BLOCK_D)
        else:
            d_same = tl.where(same, dist, 0.0)
            d_other = tl.where(same, 0.0, dist)
            if DIAGONAL:  # rows == cols: row and column sums in one update
                r_in = tl.sum(d_same, axis=1) + tl.sum(d_same, axis=0)
                r_out = tl.sum(d_other, axis=1) + tl.sum(d_other, axis=0)
                tl.store(T_IN + rows, tl.load(T_IN + rows, mask=rmask, other=0.0) + r_in,
                         mask=rmask)
                tl.store(T_OUT + rows, tl.load(T_OUT + rows, mask=rmask, other=0.0) + r_out,
                         mask=rmask)
            else:
                tl.store(T_IN + rows, tl.load(T_IN + rows, mask=rmask, other=0.0)
                         + tl.sum(d_same, axis=1), mask=rmask)
                tl.store(T_OUT + rows, tl.load(T_OUT + rows, mask=rmask, other=0.0)
                         + tl.sum(d_other, axis=1), mask=rmask)
                tl.store(T_IN + cols, tl.load(T_IN + cols, mask=cmask, other=0.0)
                         + tl.sum(d_same, axis=0), mask=cmask)
                tl.store(T_OUT + cols, tl.load(T_OUT + cols, mask=cmask, other=0.0)
                         + tl.sum(d_other, axis=0), mask=cmask)


@triton.jit
def _add_difference_grads(Z, U, shift_row, G_IN, G_OUT, w_same, w_other, rows, cols, rmask, cmask,
                          D, DIAGONAL: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """G[i] += sum_j W_ij (a_i - b_j) and G[j] += sum_i W_ij (b_j - a_i) for both
    coefficient matrices (same class into G_IN, other class into G_OUT). Any common
    shift of a pair's operands gives the same sums: the same-class pairs use the
    class-centred rows U, the other pairs the block-shifted rows."""
    if DIAGONAL:  # one block: the symmetric coefficients, one update per row
        w_same = w_same + tl.trans(w_same)
        w_other = w_other + tl.trans(w_other)
    rs_same = tl.sum(w_same, axis=1)
    rs_other = tl.sum(w_other, axis=1)
    cs_same = tl.sum(w_same, axis=0)
    cs_other = tl.sum(w_other, axis=0)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        kmask = ks < D
        m = tl.load(shift_row + ks, mask=kmask, other=0.0)
        rk = rmask[:, None] & kmask[None, :]
        ck = cmask[:, None] & kmask[None, :]
        a = tl.load(Z + rows[:, None] * D + ks[None, :], mask=rk, other=0.0) - m[None, :]
        b = tl.load(Z + cols[:, None] * D + ks[None, :], mask=ck, other=0.0) - m[None, :]
        a = tl.where(rk, a, 0.0)
        b = tl.where(ck, b, 0.0)
        u_i = tl.load(U + rows[:, None] * D + ks[None, :], mask=rk, other=0.0)
        u_j = tl.load(U + cols[:, None] * D + ks[None, :], mask=ck, other=0.0)
        g_rows = G_IN + rows[:, None] * D + ks[None, :]
        o_rows = G_OUT + rows[:, None] * D + ks[None, :]
        gi = rs_same[:, None] * u_i - _mm(w_same, u_j, USE_DOT, DOT_PRECISION, ACC)
        oi = rs_other[:, None] * a - _mm(w_other, b, USE_DOT, DOT_PRECISION, ACC)
        tl.store(g_rows, tl.load(g_rows, mask=rk, other=0.0) + gi, mask=rk)
        tl.store(o_rows, tl.load(o_rows, mask=rk, other=0.0) + oi, mask=rk)
        if not DIAGONAL:
            g_cols = G_IN + cols[:, None] * D + ks[None, :]
            o_cols = G_OUT + cols[:, None] * D + ks[None, :]
            gj = cs_same[:, None] * u_j - _mm(tl.trans(w_same), u_i, USE_DOT, DOT_PRECISION, ACC)
            oj = cs_other[:, None] * b - _mm(tl.trans(w_other), a, USE_DOT, DOT_PRECISION, ACC)
            tl.store(g_cols, tl.load(g_cols, mask=ck, other=0.0) + gj, mask=ck)
            tl.store(o_cols, tl.load(o_cols, mask=ck, other=0.0) + oj, mask=ck)


@triton.jit
def _add_exact_grads(Z, G_IN, G_OUT, w_same, w_other, rows, cols, rmask, cmask, D,
                     DIAGONAL: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """The same updates as _add_difference_grads from explicit differences z_i - z_j
    (the pairs the Gram form could not resolve: no cancellation against a shift)."""
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        rk = rmask[:, None] & kmask[None, :]
        ck = cmask[:, None] & kmask[None, :]
        zi = tl.load(Z + rows[:, None] * D + ks[None, :], mask=rk, other=0.0)
        zj = tl.load(Z + cols[:, None] * D + ks[None, :], mask=ck, other=0.0)
        diff = zi[:, None, :] - zj[None, :, :]
        gi = tl.sum(w_same[:, :, None] * diff, axis=1)
        oi = tl.sum(w_other[:, :, None] * diff, axis=1)
        gj = -tl.sum(w_same[:, :, None] * diff, axis=0)
        oj = -tl.sum(w_other[:, :, None] * diff, axis=0)
        g_rows = G_IN + rows[:, None] * D + ks[None, :]
        o_rows = G_OUT + rows[:, None] * D + ks[None, :]
        if DIAGONAL:  # rows == cols: both sides of every pair in one update
            gi += gj
            oi += oj
        tl.store(g_rows, tl.load(g_rows, mask=rk, other=0.0) + gi, mask=rk)
        tl.store(o_rows, tl.load(o_rows, mask=rk, other=0.0) + oi, mask=rk)
        if not DIAGONAL:
            g_cols = G_IN + cols[:, None] * D + ks[None, :]
            o_cols = G_OUT + cols[:, None] * D + ks[None, :]
            tl.store(g_cols, tl.load(g_cols, mask=ck, other=0.0) + gj, mask=ck)
            tl.store(o_cols, tl.load(o_cols, mask=ck, other=0.0) + oj, mask=ck)


@triton.jit
def _add_linear_grads(XR, GX_IN, GX_OUT, w_same, w_other, rows, cols, rmask, cmask, D,
                      DIAGONAL: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
                      DOT_PRECISION: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """GX[i] += sum_j W_ij x_j and GX[j] += sum_i W_ij x_i (the cosine eps branch)."""
    if DIAGONAL:
        w_same = w_same + tl.trans(w_same)
        w_other = w_other + tl.trans(w_other)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        kmask = ks < D
        rk = rmask[:, None] & kmask[None, :]
        ck = cmask[:, None] & kmask[None, :]
        xi = tl.load(XR + rows[:, None] * D + ks[None, :], mask=rk, other=0.0)
        xj = tl.load(XR + cols[:, None] * D + ks[None, :], mask=ck, other=0.0)
        g_rows = GX_IN + rows[:, None] * D + ks[None, :]
        o_rows = GX_OUT + rows[:, None] * D + ks[None, :]
        tl.store(g_rows, tl.load(g_rows, mask=rk, other=0.0)
                 + _mm(w_same, xj, USE_DOT, DOT_PRECISION, ACC), mask=rk)
        tl.store(o_rows, tl.load(o_rows, mask=rk, other=0.0)
                 + _mm(w_other, xj, USE_DOT, DOT_PRECISION, ACC), mask=rk)
        if not DIAGONAL:
            g_cols = GX_IN + cols[:, None] * D + ks[None, :]
            o_cols = GX_OUT + cols[:, None] * D + ks[None, :]
            tl.store(g_cols, tl.load(g_cols, mask=ck, other=0.0)
                     + _mm(tl.trans(w_same), xi, USE_DOT, DOT_PRECISION, ACC), mask=ck)
            tl.store(o_cols, tl.load(o_cols, mask=ck, other=0.0)
                     + _mm(tl.trans(w_other), xi, USE_DOT, DOT_PRECISION, ACC), mask=ck)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _config(dtype: torch.dtype = torch.float32, grad: bool = False,
            metric: int = _metrics.EUCLIDEAN) -> dict:
    """Tile sizes and warps. Each choice is the largest tile that compiles without
    spilling for sm_80 and sm_90 (scripts/triton_aot.py fails CI otherwise): the
    gradient mode holds about a dozen BLOCK x BLOCK tiles live, the row-sum mode
    a few; fp32 products without tf32 run on the FMA units and need smaller chunks
    of D; fp64 without tl.dot (Triton < 3.5) multiplies by broadcast products."""
    if triton_interpreting():  # numpy does the work: few, large steps
        return dict(BLOCK=32, BLOCK_D=32, BLOCK_K=32, num_warps=4)
    # tl.dot needs BLOCK_D >= 16 on Triton 3.2
    if dtype == torch.float64:
        if FP64_DOT:
            return dict(BLOCK=32, BLOCK_D=16, BLOCK_K=1, num_warps=8 if grad else 4,
                        maxnreg=MAXNREG)
        return dict(BLOCK=16, BLOCK_D=4, BLOCK_K=1, num_warps=4, maxnreg=MAXNREG)
    if grad:  # cosine carries the eps-branch terms too: more warps for the same tile
        warps = 8 if metric == _metrics.COSINE else 4
        return dict(BLOCK=32, BLOCK_D=16, BLOCK_K=1, num_warps=warps, maxnreg=MAXNREG)
    if _precisions_of(dtype)[0] == "tf32":
        return dict(BLOCK=64, BLOCK_D=16, BLOCK_K=1, num_warps=8, maxnreg=MAXNREG)
    # fp32 on the FMA units ("ieee") and the three-pass tf32x3 of 16-bit inputs
    return dict(BLOCK=32, BLOCK_D=16, BLOCK_K=1, num_warps=4, maxnreg=MAXNREG)


def _tl_dtype(dtype: torch.dtype):
    return {torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


def _precisions_of(dtype: torch.dtype) -> tuple[str, str]:
    """tl.dot precisions of the distances and of the gradient products.

    Distances: fp16/bf16 inputs are used as stored (rounded once, at the input):
    the shifted rows stay fp32 and the products use three tf32 passes (split
    operands, about fp32 accuracy on the tensor cores), so norms and dot
    products come from the same values. fp32: tf32 when torch allows it, else
    exact fp32. Gradients follow the TF32 rule of every op (_support.dot_precision) as
    fp32 products: for 16-bit inputs too, they are on fp32 shifted rows. fp64 exact.
    """
    grad = dot_precision(torch.float32) if dtype != torch.float64 else "ieee"
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32x3", grad
    return dot_precision(dtype), grad


def _class_sums(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Row sums of ``values`` [N, D] (finite) per label, [N, D] float64, the same bits on
    every run.

    ``index_add_`` on CUDA adds floats with atomics in a varying order, which made the
    shifts, and so the last bits of every distance, change between runs (seen on an
    H100). The sums are formed in int64 fixed point instead: integer adds are exact in
    any order. The scale is a power of two with N * max|v| < 2^61, so no sum overflows
    and each is within N * max|v| * 2^-61 of the exact one (the shifts only need to be
    near the class means).
    """
    n, d = values.shape
    v = values.double()
    bound = (v.abs().amax() if v.numel() else v.new_zeros(())) * max(n, 1)
    _, exponent = torch.frexp(bound.clamp_max(torch.finfo(torch.float64).max))  # bound < 2^e
    scale = torch.ldexp(v.new_ones(()), (61 - exponent).clamp_max(1000))
    fixed = torch.round(v * scale).to(torch.int64)
    sums = torch.zeros(n, d, dtype=torch.int64, device=values.device).index_add_(0, labels, fixed)
    return sums.double() / scale


def _dense_ids(labels: torch.Tensor) -> torch.Tensor:
    """[N] ids in [0, number of classes) with equal ids for equal labels, ordered as the
    labels' values: what ``torch.unique(return_inverse=True)`` returns, from a sort and a
    cumulative sum, so no output size hangs on the data (no host synchronisation)."""
    values, order = torch.sort(labels, stable=True)
    starts = torch.ones_like(values)
    starts[1:] = values[1:] != values[:-1]
    return torch.empty_like(labels).scatter_(0, order, starts.cumsum(0) - 1)


class _SortedRows:
    """Label-sorted rows and what the pass reads of them (see the module docstring)."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, metric: int, block: int):
        acc = accumulation_dtype(x.dtype)
        n, d = x.shape
        # classes ordered by first appearance: relabelling keeps the order of additions
        inverse = _dense_ids(labels)
        # (sized N, not the number of classes: no host synchronisation; unused
        # slots keep N and sort last)
        first = torch.full((n,), n, dtype=torch.int64, device=x.device).scatter_reduce(
            0, inverse, torch.arange(n, device=x.device), "amin")
        rank = torch.empty_like(first)
        rank[torch.argsort(first)] = torch.arange(first.numel(), device=x.device)
        key = rank[inverse]
        self.perm = torch.argsort(key, stable=True)
        self.labels = key[self.perm].contiguous()
        self.xr = x.to(acc)[self.perm].contiguous()  # rows (the cosine eps branch reads them)
        if metric == _metrics.COSINE:
            x64 = self.xr.double()
            sq64 = (x64 * x64).sum(1)
            norms = sq64.sqrt()[:, None]
            top = torch.finfo(acc).max
            self.sq = sq64.clamp_max(top).to(acc).contiguous()
            self.z = torch.where(norms > 0, x64 / norms, torch.zeros_like(x64)).to(acc).contiguous()
        else:
            self.sq = torch.zeros(n, dtype=acc, device=x.device)
            self.z = self.xr
        self.blocks = triton.cdiv(n, block)
        # class means of the finite rows; U = every row minus its class mean, NC = |U|^2
        finite = torch.isfinite(self.z).all(1, keepdim=True)
        kept = torch.where(finite, self.z, 0.0)
        counts = torch.zeros(n, 1, dtype=torch.int64, device=x.device).index_add_(
            0, self.labels, finite.to(torch.int64))
        means = (_class_sums(kept, self.labels) / counts.clamp_min(1)).to(acc)
        self.u = (self.z - means[self.labels]).contiguous()
        self.nc = (self.u * self.u).sum(1).contiguous()
        # the shift of every block pair: the class mean of a one-class row block,
        # else the mean of the block's finite rows
        pad = self.blocks * block - n
        in_range = torch.arange(self.blocks * block, device=x.device) < n
        rows = torch.cat([kept, kept.new_zeros(pad, d)]).view(self.blocks, block, d)
        count = (torch.cat([finite, finite.new_zeros(pad, 1)]).view(self.blocks, block, 1)
                 & in_range.view(self.blocks, block, 1)).sum(1).clamp_min(1).to(acc)
        first = self.labels[::block] if n else self.labels
        last = self.labels[torch.clamp(torch.arange(1, self.blocks + 1, device=x.device) * block,
                                       max=n) - 1] if n else self.labels
        self.one_class = (first == last).to(torch.int32).contiguous()
        block_mean = rows.sum(1) / count
        self.shift = torch.where(self.one_class[:, None].bool(), means[first], block_mean).contiguous()

    def unsort(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(v)
        out[self.perm] = v
        return out


def launch_grids(n: int, cfg: dict) -> list[tuple[int, ...]]:
    """The grid of every launch of one pass over n rows: T' - 1 rounds of T' / 2 block
    pairs (T' = T rounded up to even), then the diagonal round of T blocks."""
    t = triton.cdiv(n, cfg["BLOCK"])
    t_even = t + (t % 2)
    return [(t_even // 2,)] * (t_even - 1) + [(t,)]


def _launch_rounds(s: _SortedRows, x: torch.Tensor, metric: int, grad: bool, bufs: dict,
                   cfg: dict) -> None:
    n, d = s.z.shape
    t = s.blocks
    t_even = t + (t % 2)
    grids = launch_grids(n, cfg)
    distance_precision, grad_precision = _precisions_of(x.dtype)
    common = dict(METRIC=metric, GRAD=grad, ACC=_tl_dtype(s.z.dtype),
                  USE_DOT=use_dot(s.z.dtype), DOT_PRECISION=distance_precision,
                  GRAD_PRECISION=grad_precision, BLOCK=cfg["BLOCK"], BLOCK_D=cfg["BLOCK_D"],
                  BLOCK_K=cfg["BLOCK_K"], **launch_options(cfg))
    args = (s.z, s.shift, s.one_class, s.u, s.nc, s.labels, s.sq, bufs["w_in"], bufs["w_out"],
            bufs["t_in"], bufs["t_out"], bufs["g_in"], bufs["g_out"], s.xr, bufs["gx_in"],
            bufs["gx_out"])
    for r in range(t_even - 1):
        _pair_kernel[grids[r]](*args, n, d, r, t, t_even, DIAGONAL=False, **common)
    _pair_kernel[grids[-1]](*args, n, d, 0, t, t_even, DIAGONAL=True, **common)


def row_sums(x: torch.Tensor, labels: torch.Tensor, metric: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_in, S_out) [N] of x [N, D] (Gram metrics), each unordered pair once."""
    cfg = _config(x.dtype, grad=False, metric=metric)
    x = pad_columns(x)  # widths a multiple of 16 (_support)
    s = _SortedRows(x, labels, metric, cfg["BLOCK"])
    n = x.shape[0]
    s_in = torch.zeros(n, dtype=s.z.dtype, device=x.device)
    s_out = torch.zeros_like(s_in)
    if n and x.shape[1]:
        bufs = dict(w_in=s_in, w_out=s_in, t_in=s_in, t_out=s_out, g_in=s.z, g_out=s.z,
                    gx_in=s.z, gx_out=s.z)  # the row-sum mode reads no weights, writes no grads
        _launch_rounds(s, x, metric, False, bufs, cfg)
    return s.unsort(s_in), s.unsort(s_out)


def weighted_with_grad(x: torch.Tensor, labels: torch.Tensor, w_in: torch.Tensor,
                       w_out: torch.Tensor, metric: int):
    """(t_in, t_out, dt_in/dx, dt_out/dx), all in the accumulation dtype."""
    cfg = _config(x.dtype, grad=True, metric=metric)
    d = x.shape[1]
    x = pad_columns(x)  # widths a multiple of 16 (_support); their gradient columns dropped
    s = _SortedRows(x, labels, metric, cfg["BLOCK"])
    acc = s.z.dtype
    n = x.shape[0]
    t_in = torch.zeros(n, dtype=acc, device=x.device)
    t_out = torch.zeros_like(t_in)
    g_in = torch.zeros_like(s.z)
    g_out = torch.zeros_like(s.z)
    cosine = metric == _metrics.COSINE
    gx_in = torch.zeros_like(s.z) if cosine else g_in
    gx_out = torch.zeros_like(s.z) if cosine else g_out
    if n and x.shape[1]:
        bufs = dict(w_in=w_in.to(acc)[s.perm].contiguous(), w_out=w_out.to(acc)[s.perm].contiguous(),
                    t_in=t_in, t_out=t_out, g_in=g_in, g_out=g_out, gx_in=gx_in, gx_out=gx_out)
        _launch_rounds(s, x, metric, True, bufs, cfg)
    if cosine:  # unit-row gradients to x: (g - u (u.g)) / |x|, plus the eps-branch terms
        inv = _safe_inv_norm(s.sq)
        g_in = (g_in - s.z * (g_in * s.z).sum(1, keepdim=True)) * inv + gx_in
        g_out = (g_out - s.z * (g_out * s.z).sum(1, keepdim=True)) * inv + gx_out
    return (t_in.sum(), t_out.sum(), s.unsort(g_in)[:, :d].contiguous(),
            s.unsort(g_out)[:, :d].contiguous())


def _safe_inv_norm(sq: torch.Tensor) -> torch.Tensor:
    norms = sq.sqrt()[:, None]
    return torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)

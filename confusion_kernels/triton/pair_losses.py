"""Triton kernels of the pair losses (Contrastive, SupCon, NT-Xent, Multi-Similarity): rows
x [N, D] against references r [M, D], nothing of size N x M held (docs/math.md, "Pair
losses"; per pair the formulas of csrc/include/confusion_kernels/pair_loss_math.h, the
readable definition in confusion_kernels/reference/pair_losses.py).

  _stats_kernel  grid (row blocks, column splits): each program walks its split's reference
                 tiles in order and keeps its rows' accumulators (online log-sum-exps, sums,
                 counts); the launcher merges the splits in a fixed order and finishes the
                 statistics st[4] (the CPU kernel's layout, pair_loss_math.h) and the per-row
                 outputs, O(N) work. NT-Xent runs it twice: its positives need the
                 log-sum-exp over all its negatives first.
  _grad_kernel   grid (row blocks, reference splits) for dL/dx, (reference blocks, row
                 splits) for dL/dr: a program recomputes its rows (references) against the
                 tiles of the other side in its split, forms dLoss/dm_ij per pair from the
                 saved statistics and adds C r (C^T x) into its split's partial, which the
                 launcher adds in split order.

The splits (``_support.shares``) give a GPU about 4 programs per SM where the row blocks alone
would not (N = 4,096: 128 row blocks for 132 SMs); the partials cost splits x N x 4 and
splits x N x D.

m_ij is the cosine x_i . r_j of the rows as given (the caller normalises) or the euclidean
|x_i - r_j|: from the Gram form, and from differences where that cancels
(d^2 <= (|x_i|^2 + |r_j|^2) / 16, pair_math.h's rule), for the distance and for its gradient
terms. Each output element is owned by one program, its tiles and the splits added in a fixed
order: no atomics, the same bits on every run. Constants travel as a tensor of the rows'
dtype (exact in fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _metrics
from .._backend import triton_interpreting
from ..reference.pair_losses import PAIR_LOSS_OUTPUTS, PAIR_LOSS_STATS
from ._support import (FP64_DOT, MAXNREG, div_rn, dot_precision, launch_options, pad_columns,
                       shares, sqrt_rn, target_programs)
from ._support import use_dot as use_dot_for
from .affinity import _dot_nn
from .intra_inter_sums import _direct_distance
from .n_centroids import _gram

# pair_loss_math.h's PairLoss codes
LOSS_CODES = {"contrastive": 0, "supcon": 1, "ntxent": 2, "multi_similarity": 3}
CONTRASTIVE = tl.constexpr(LOSS_CODES["contrastive"])
SUPCON = tl.constexpr(LOSS_CODES["supcon"])
NTXENT = tl.constexpr(LOSS_CODES["ntxent"])
MULTI_SIMILARITY = tl.constexpr(LOSS_CODES["multi_similarity"])
EUCLIDEAN = tl.constexpr(_metrics.EUCLIDEAN)
EXACT_FRACTION = tl.constexpr(_metrics.GRAM_EXACT_FRACTION)
# What the launchers assume of each kernel's occupancy (scripts/triton_aot.py fails a
# variant that fits fewer blocks per SM): one resident block per SM.
RESOURCE_BUDGET = {"_stats_kernel": dict(min_blocks_per_sm=1),
                   "_grad_kernel": dict(min_blocks_per_sm=1)}


# ---------------------------------------------------------------------------
# Tile helpers
# ---------------------------------------------------------------------------
@triton.jit
def _pairs(RLAB, rows, rmask, lab_i, cols, cmask, SHIFT):
    """(valid, same) of a tile: both in range and not the left-out pair (column - row ==
    SHIFT; M when there is none, which no pair reaches); same label."""
    lab_j = tl.load(RLAB + cols, mask=cmask, other=0)
    valid = rmask[:, None] & cmask[None, :] & ((cols[None, :] - rows[:, None]) != SHIFT)
    return valid, lab_i[:, None] == lab_j[None, :]


@triton.jit
def _values(X, R, XN, RN, rows, rmask, cols, cmask, valid, D, IS_COSINE: tl.constexpr,
            ACC: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """(m, near) of a tile: m_ij from the Gram form, near marking the valid euclidean pairs
    taken from differences (all False for cosine)."""
    g = _gram(X, R, rows, rmask, cols, cmask, D, ACC, USE_DOT, PREC, BLOCK_M, BLOCK_N, BLOCK_D)
    if IS_COSINE:
        m = g
        near = valid & (valid == 0)
    else:
        xn = tl.load(XN + rows, mask=rmask, other=0.0)
        rn = tl.load(RN + cols, mask=cmask, other=0.0)
        s = xn[:, None] + rn[None, :]
        d2 = s - 2.0 * g
        d2 = tl.where(d2 < 0.0, 0.0, d2)  # not tl.maximum: NaN must pass through
        near = valid & (d2 <= EXACT_FRACTION * s)
        m = sqrt_rn(d2)
        if tl.max(near.to(tl.int32)) > 0:  # the difference form for those pairs
            exact = _direct_distance(X, R, D, rows, cols, rmask, cmask, xn, rn, D, EUCLIDEAN,
                                     ACC, BLOCK_M, BLOCK_N, BLOCK_K)
            m = tl.where(near, exact, m)
    return m, near


@triton.jit
def _lse_add(mx, sm, v, keep):
    """Adds e^v of the kept pairs of each row to the online log-sum-exp (mx, sm)."""
    v = tl.where(keep, v, float("-inf"))
    top = tl.max(v, axis=1)
    new = tl.where(top > mx, top, mx)
    safe = tl.where(new == float("-inf"), 0.0, new)  # no term yet: e^(-inf - 0) = 0
    sm = sm * tl.exp(mx - safe) + tl.sum(tl.exp(v - safe[:, None]), axis=1)
    return new, sm


@triton.jit
def _log1p(u):
    """log(1 + u) for u >= 0, accurate for small u (log(w) u / (w - 1), w = 1 + u)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * div_rn(u, tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _softplus_share(d):
    """(log(1 + e^d), 1 / (1 + e^d)): NT-Xent's l_ij and s_ij for d = lse_Q - z_ij."""
    big = d > 0.0
    soft = tl.where(big, d + _log1p(tl.exp(-d)), _log1p(tl.exp(tl.where(big, 0.0, d))))
    ones = tl.zeros_like(d) + 1.0
    return soft, div_rn(ones, 1.0 + tl.exp(d))


@triton.jit
def _coefficients(LOSS: tl.constexpr, m, same, valid, st0, st1, st2, st3, g0, g1, sign,
                  p_a, p_b, p_c, scale_p, scale_q):
    """dL/dm_ij of every pair of the tile (pair_loss_coefficient_from_exp), 0 off ``valid``;
    st*, g* the rows' statistics and upstream gradients."""
    if LOSS == CONTRASTIVE:
        hp = same & (sign * (m - p_a) > 0.0)
        hn = (same == 0) & (sign * (p_b - m) > 0.0)
        c = tl.where(hp, (g0 * sign)[:, None], 0.0) - tl.where(hn, (g1 * sign)[:, None], 0.0)
    elif LOSS == SUPCON:
        has_pos = st3 > 0.0
        inv_p = div_rn(tl.zeros_like(st3) + 1.0, tl.where(has_pos, st3, 1.0))
        e = tl.exp(m * scale_p - st0[:, None])
        c = (g0 * scale_p)[:, None] * (e - tl.where(same, inv_p[:, None], 0.0))
        c = tl.where(has_pos[:, None], c, 0.0)
    elif LOSS == NTXENT:
        d = st0[:, None] - m * scale_p  # lse_Q - z
        _, share = _softplus_share(d)
        neg = (g0 * scale_p)[:, None] * tl.exp(-d) * st1[:, None]
        c = tl.where(same, (g0 * scale_p)[:, None] * (share - 1.0), neg)
    else:  # multi_similarity
        ep = tl.exp((m - p_c) * scale_p - st0[:, None])
        eq = tl.exp((p_c - m) * scale_q - st2[:, None])
        c = tl.where(same, ep, -eq) * (g0 * sign)[:, None]
    return tl.where(valid, c, 0.0)


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------
# N, M, SHIFT not specialised (an argument equal to 1 or divisible by 16 would otherwise be
# its own compile); D is a multiple of 16 (the launchers pad it): aligned row loads.
@triton.jit(do_not_specialize=["N", "M", "SHIFT", "COLS_PER_SPLIT"])
def _stats_kernel(X, R, XN, RN, LAB, RLAB, PARAMS, LSE_Q, PART, N, M, D, SHIFT, COLS_PER_SPLIT,
                  LOSS: tl.constexpr, SECOND: tl.constexpr, IS_COSINE: tl.constexpr,
                  ACC: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Grid (row blocks, column splits): program (r, s) walks the reference tiles of columns
    [s COLS_PER_SPLIT, (s + 1) COLS_PER_SPLIT) in order and writes its rows' accumulators to
    PART[s] [N, 4]: contrastive (sum l+, count, sum l-, count); supcon (max, sum) of e^z over
    P u Q, sum_P z, |P|; ntxent (max, sum) over Q, or with SECOND (LSE_Q known) W, sum_P l,
    |P| in slots 1-3; multi_similarity (max, sum) over P and over Q (the "+ 1" added when
    the splits are merged)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * D
    rmask = rows < N
    split = tl.program_id(1).to(tl.int64)
    lab_i = tl.load(LAB + rows, mask=rmask, other=0)
    p_a = tl.load(PARAMS + 0)
    p_b = tl.load(PARAMS + 1)
    p_c = tl.load(PARAMS + 2)
    scale_p = tl.load(PARAMS + 3)  # supcon / ntxent: z = m scale_p; ms: alpha sign
    scale_q = tl.load(PARAMS + 4)  # ms: beta sign
    if IS_COSINE:
        sign = -1.0
    else:
        sign = 1.0
    zero = tl.zeros((BLOCK_M,), dtype=ACC)
    st0 = zero
    st1 = zero
    st2 = zero
    st3 = zero
    if LOSS != CONTRASTIVE and not SECOND:  # online log-sum-exps start empty
        st0 = zero + float("-inf")
    if LOSS == MULTI_SIMILARITY:
        st2 = zero + float("-inf")
    if SECOND:
        lse_q = tl.load(LSE_Q + rows, mask=rmask, other=0.0)
    for c0 in range(0, COLS_PER_SPLIT, BLOCK_N):
        cols = split * COLS_PER_SPLIT + c0 + tl.arange(0, BLOCK_N)
        cmask = cols < M
        valid, same = _pairs(RLAB, rows, rmask, lab_i, cols, cmask, SHIFT)
        pos = valid & same
        neg = valid & (same == 0)
        if SECOND:  # NT-Xent's positives: only the tiles holding one
            if tl.max(pos.to(tl.int32)) > 0:
                m, near = _values(X, R, XN, RN, rows, rmask, cols, cmask, valid, D, IS_COSINE,
                                  ACC, USE_DOT, PREC, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
                soft, share = _softplus_share(lse_q[:, None] - m * scale_p)
                st1 += tl.sum(tl.where(pos, 1.0 - share, 0.0), axis=1)
                st2 += tl.sum(tl.where(pos, soft, 0.0), axis=1)
                st3 += tl.sum(pos.to(ACC), axis=1)
        else:
            m, near = _values(X, R, XN, RN, rows, rmask, cols, cmask, valid, D, IS_COSINE, ACC,
                              USE_DOT, PREC, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
            if LOSS == CONTRASTIVE:
                hp = pos & (sign * (m - p_a) > 0.0)
                hn = neg & (sign * (p_b - m) > 0.0)
                st0 += tl.sum(tl.where(hp, sign * (m - p_a), 0.0), axis=1)
                st1 += tl.sum(hp.to(ACC), axis=1)
                st2 += tl.sum(tl.where(hn, sign * (p_b - m), 0.0), axis=1)
                st3 += tl.sum(hn.to(ACC), axis=1)
            elif LOSS == SUPCON:
                z = m * scale_p
                st0, st1 = _lse_add(st0, st1, z, valid)
                st2 += tl.sum(tl.where(pos, z, 0.0), axis=1)
                st3 += tl.sum(pos.to(ACC), axis=1)
            elif LOSS == NTXENT:
                st0, st1 = _lse_add(st0, st1, m * scale_p, neg)
            else:
                st0, st1 = _lse_add(st0, st1, (m - p_c) * scale_p, pos)
                st2, st3 = _lse_add(st2, st3, (p_c - m) * scale_q, neg)
    out = PART + split * N * 4 + rows * 4
    tl.store(out, st0, mask=rmask)
    tl.store(out + 1, st1, mask=rmask)
    tl.store(out + 2, st2, mask=rmask)
    tl.store(out + 3, st3, mask=rmask)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------
@triton.jit(do_not_specialize=["N", "M", "SHIFT", "PER_SPLIT"])
def _grad_kernel(X, R, XN, RN, LAB, RLAB, PARAMS, STATS, G, OUT, N, M, D, SHIFT, PER_SPLIT,
                 FOR_REFS: tl.constexpr, STEP: tl.constexpr, LOSS: tl.constexpr,
                 IS_COSINE: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
                 PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (own blocks, splits). OUT[s] (zeros on entry) += dL/dx of this program's BLOCK_M
    rows (FOR_REFS False: over the reference tiles of split s, PER_SPLIT columns each) or
    dL/dr of its BLOCK_N references (FOR_REFS: over the row tiles of split s).
    dm/dx_i = r_j (cosine), (x_i - r_j) / m (euclidean; dm/dr_j the opposite)."""
    p_a = tl.load(PARAMS + 0)
    p_b = tl.load(PARAMS + 1)
    p_c = tl.load(PARAMS + 2)
    scale_p = tl.load(PARAMS + 3)
    scale_q = tl.load(PARAMS + 4)
    if IS_COSINE:
        sign = -1.0
    else:
        sign = 1.0
    own = tl.program_id(0).to(tl.int64)  # int64: rows * D
    split = tl.program_id(1).to(tl.int64)
    if FOR_REFS:
        OUT += split * M * D
    else:
        OUT += split * N * D
    for t in range(0, PER_SPLIT, STEP):  # STEP: BLOCK_M (FOR_REFS) or BLOCK_N
        t0 = split * PER_SPLIT + t
        if FOR_REFS:
            rows = t0 + tl.arange(0, BLOCK_M)
            cols = own * BLOCK_N + tl.arange(0, BLOCK_N)
        else:
            rows = own * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = t0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        cmask = cols < M
        lab_i = tl.load(LAB + rows, mask=rmask, other=0)
        valid, same = _pairs(RLAB, rows, rmask, lab_i, cols, cmask, SHIFT)
        m, near = _values(X, R, XN, RN, rows, rmask, cols, cmask, valid, D, IS_COSINE, ACC,
                          USE_DOT, PREC, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
        st0 = tl.load(STATS + rows * 4, mask=rmask, other=0.0)
        st1 = tl.load(STATS + rows * 4 + 1, mask=rmask, other=0.0)
        st2 = tl.load(STATS + rows * 4 + 2, mask=rmask, other=0.0)
        st3 = tl.load(STATS + rows * 4 + 3, mask=rmask, other=0.0)
        if LOSS == CONTRASTIVE:
            g0 = tl.load(G + rows * 2, mask=rmask, other=0.0)
            g1 = tl.load(G + rows * 2 + 1, mask=rmask, other=0.0)
        else:
            g0 = tl.load(G + rows, mask=rmask, other=0.0)
            g1 = g0
        c = _coefficients(LOSS, m, same, valid, st0, st1, st2, st3, g0, g1, sign, p_a, p_b,
                          p_c, scale_p, scale_q)
        if not IS_COSINE:  # dm/dx_i = (x_i - r_j) / m: 0 for a duplicate
            c = tl.where(m > 0.0, div_rn(c, tl.where(m > 0.0, m, 1.0)), 0.0)
            c_near = tl.where(near, c, 0.0)
            c = tl.where(near, 0.0, c)  # not inside the branch: that spilled on sm_80 / sm_90
            if tl.max(near.to(tl.int32)) > 0:  # their terms from explicit differences
                _add_near_terms(X, R, OUT, c_near, rows, rmask, cols, cmask, D, FOR_REFS)
                tl.debug_barrier()  # the update below reads what this one stored
        if FOR_REFS:
            scale = tl.sum(c, axis=0)  # euclidean: + colsum(C) r_j - C^T x
        else:
            scale = tl.sum(c, axis=1)  # euclidean: + rowsum(C) x_i - C r
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            rk = rmask[:, None] & dmask[None, :]
            ck = cmask[:, None] & dmask[None, :]
            x = tl.load(X + rows[:, None] * D + ds[None, :], mask=rk, other=0.0)
            r = tl.load(R + cols[:, None] * D + ds[None, :], mask=ck, other=0.0)
            if FOR_REFS:
                term = _dot_nn(tl.trans(c), x, USE_DOT, ACC, PREC)
                if not IS_COSINE:
                    term = scale[:, None] * r - term
                dst = OUT + cols[:, None] * D + ds[None, :]
                tl.store(dst, tl.load(dst, mask=ck, other=0.0) + term, mask=ck)
            else:
                term = _dot_nn(c, r, USE_DOT, ACC, PREC)
                if not IS_COSINE:
                    term = scale[:, None] * x - term
                dst = OUT + rows[:, None] * D + ds[None, :]
                tl.store(dst, tl.load(dst, mask=rk, other=0.0) + term, mask=rk)
        tl.debug_barrier()  # the next tile reads what this one stored


@triton.jit
def _add_near_terms(X, R, OUT, w, rows, rmask, cols, cmask, D, FOR_REFS: tl.constexpr):
    """OUT[i] += sum_j w_ij (x_i - r_j) (or OUT[j] += sum_i w_ij (r_j - x_i) with FOR_REFS)
    from explicit differences, one dimension at a time (2-D tiles only: a 3-D broadcast here
    spilled on sm_80 / sm_90): no cancellation for the close pairs."""
    for k in range(0, D):
        x = tl.load(X + rows * D + k, mask=rmask, other=0.0)
        r = tl.load(R + cols * D + k, mask=cmask, other=0.0)
        diff = x[:, None] - r[None, :]
        if FOR_REFS:
            dst = OUT + cols * D + k
            tl.store(dst, tl.load(dst, mask=cmask, other=0.0) - tl.sum(w * diff, axis=0),
                     mask=cmask)
        else:
            dst = OUT + rows * D + k
            tl.store(dst, tl.load(dst, mask=rmask, other=0.0) + tl.sum(w * diff, axis=1),
                     mask=rmask)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _config(dtype: torch.dtype) -> dict:
    """Tiles and warps: BLOCK_M x BLOCK_N pair tiles from BLOCK_D-wide Gram chunks; the
    difference form of close pairs over BLOCK_K dimensions at a time. On the GPU: 32 x 32
    tiles on 8 warps (the euclidean gradient holds about a dozen tiles live: on 4 warps it
    spilled 30-880 B per thread for sm_80 / sm_90, scripts/triton_aot.py); fp64 without
    tl.dot (Triton < 3.5) multiplies by broadcast products, on 16 x 16 tiles."""
    if triton_interpreting():  # numpy does the work: few, large steps
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, BLOCK_K=32, num_warps=4)
    if dtype == torch.float64 and not FP64_DOT:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=4, BLOCK_K=1, num_warps=4, maxnreg=MAXNREG)
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=16, BLOCK_K=1, num_warps=8, maxnreg=MAXNREG)


def _params(loss: str, params: list[float], cosine: bool, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """[a, b, c, scale_p, scale_q, 1/a, 1/b] in the rows' dtype (pair_loss_math.h's
    PairLossParams; scale_p = -sign / tau for SupCon and NT-Xent, alpha sign and beta sign
    for Multi-Similarity)."""
    sign = -1.0 if cosine else 1.0
    a, b, c = (list(params) + [0.0, 0.0])[:3]
    if loss in ("supcon", "ntxent"):
        scale_p, scale_q = -sign / a, 0.0
    elif loss == "multi_similarity":
        scale_p, scale_q = a * sign, b * sign
    else:
        scale_p = scale_q = 0.0
    inv_a = 1.0 / a if a else 0.0
    inv_b = 1.0 / b if b else 0.0
    values = torch.tensor([a, b, c, scale_p, scale_q, inv_a, inv_b], dtype=dtype)
    return values.to(device, non_blocking=True)  # a copy from the host: no wait on the device


class _Operands:
    """Contiguous rows and references, their squared norms (euclidean), labels, constants."""

    def __init__(self, x, labels, ref, ref_labels, self_offset, loss, params, metric):
        self.x = pad_columns(x).contiguous()  # zero columns change no pair value
        self.ref = pad_columns(ref).contiguous()
        self.labels = labels.contiguous()
        self.ref_labels = ref_labels.contiguous()
        self.cosine = metric == "cosine"
        self.xn = (self.x * self.x).sum(1)
        self.rn = (self.ref * self.ref).sum(1)
        self.n, self.d = self.x.shape
        self.m = self.ref.shape[0]
        self.loss = loss
        self.params = _params(loss, params, self.cosine, self.x.dtype, self.x.device)
        self.cfg = _config(self.x.dtype)
        # the left-out pair: column - row == shift (M when there is none: no pair reaches it)
        self.shift = self.m if self_offset is None else int(self_offset)
        self.common = dict(
            LOSS=LOSS_CODES[loss], IS_COSINE=self.cosine,
            ACC=tl.float64 if self.x.dtype == torch.float64 else tl.float32,
            USE_DOT=use_dot_for(self.x.dtype),
            PREC=dot_precision(self.x.dtype), BLOCK_M=self.cfg["BLOCK_M"],
            BLOCK_N=self.cfg["BLOCK_N"], BLOCK_D=self.cfg["BLOCK_D"],
            BLOCK_K=self.cfg["BLOCK_K"], **launch_options(self.cfg))


def launch_grids(n: int, m: int, cfg: dict, target: int = 1) -> dict[str, tuple[int, ...]]:
    """Grids of the statistics (row blocks, column splits) and of the two gradient launches
    (own blocks, splits of the other side), each split until there are about ``target``
    programs (``_support.shares``: at N = M = 4,096 the 128 row blocks alone would leave
    SMs of an H100 idle); ``*_splits`` are (splits, items per split)."""
    row_blocks, ref_blocks = triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(m, cfg["BLOCK_N"])
    cols = shares(m, row_blocks, cfg["BLOCK_N"], target)
    refs_for_x = shares(m, row_blocks, cfg["BLOCK_N"], target)
    rows_for_ref = shares(n, ref_blocks, cfg["BLOCK_M"], target)
    return dict(stats=(row_blocks, cols[0]), stats_splits=cols,
                grad_x=(row_blocks, refs_for_x[0]), grad_x_splits=refs_for_x,
                grad_ref=(ref_blocks, rows_for_ref[0]), grad_ref_splits=rows_for_ref)


def _merge_lse(mx: torch.Tensor, sm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log sum_s sm[s] e^mx[s], that sum at the largest mx) of the splits' online
    log-sum-exps [S, N] (mx = -inf: no term), added in a fixed order."""
    top = mx.amax(0)
    safe = torch.where(top == float("-inf"), 0.0, top)
    total = (sm * torch.exp(mx - safe)).sum(0)
    lse = torch.where(total > 0, safe + torch.log(torch.where(total > 0, total, 1.0)),
                      float("-inf"))
    return lse, total


def _run_stats(o: _Operands, lse_q: torch.Tensor | None = None) -> torch.Tensor:
    """The splits' accumulators [S, N, 4] (``lse_q``: NT-Xent's second walk)."""
    grids = launch_grids(o.n, o.m, o.cfg, target_programs(o.x.device))
    splits, per_split = grids["stats_splits"]
    part = torch.empty(splits, o.n, PAIR_LOSS_STATS, dtype=o.x.dtype, device=o.x.device)
    _stats_kernel[grids["stats"]](
        o.x, o.ref, o.xn, o.rn, o.labels, o.ref_labels, o.params,
        o.xn if lse_q is None else lse_q, part, o.n, o.m, o.d, o.shift, per_split,
        SECOND=lse_q is not None, **o.common)
    return part


def forward(x: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor,
            self_offset: int | None, loss: str, params: list[float], metric: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [N, R], stats [N, 4]) as the CPU kernel returns them (x, ref float32 or
    float64 of one dtype, int64 labels; x_i is ref_{self_offset + i}, that pair left out):
    the splits' accumulators merged in a fixed order and finished here (O(N) work)."""
    o = _Operands(x, labels, ref, ref_labels, self_offset, loss, params, metric)
    if o.n == 0:
        return o.x.new_zeros(0, PAIR_LOSS_OUTPUTS[loss]), o.x.new_zeros(0, PAIR_LOSS_STATS)
    part = _run_stats(o)
    if loss == "contrastive":
        stats = part.sum(0)
        return stats[:, 0::2].contiguous(), stats
    if loss == "supcon":
        lse, total = _merge_lse(part[:, :, 0], part[:, :, 1])
        sum_z, count = part[:, :, 2].sum(0), part[:, :, 3].sum(0)
        has_pos = count > 0
        row = torch.where(has_pos, lse - sum_z / torch.where(has_pos, count, 1.0), 0.0)
        return row[:, None], torch.stack([lse, total, sum_z, count], 1)
    if loss == "ntxent":
        lse_q = _merge_lse(part[:, :, 0], part[:, :, 1])[0].contiguous()
        second = _run_stats(o, lse_q).sum(0)
        stats = torch.cat([lse_q[:, None], second[:, 1:]], 1)
        return second[:, 2:3].contiguous(), stats
    one = torch.zeros_like(part[:1, :, 0])  # the "+ 1": e^0 at max 0, once
    lse_p, total_p = _merge_lse(torch.cat([part[:, :, 0], one]),
                                torch.cat([part[:, :, 1], one + 1]))
    lse_n, total_n = _merge_lse(torch.cat([part[:, :, 2], one]),
                                torch.cat([part[:, :, 3], one + 1]))
    row = lse_p * o.params[5] + lse_n * o.params[6]
    return row[:, None], torch.stack([lse_p, total_p, lse_n, total_n], 1)


def backward(grad_rows: torch.Tensor, stats: torch.Tensor, x: torch.Tensor,
             labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor,
             self_offset: int | None, loss: str, params: list[float], metric: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dref) from the upstream gradient of the rows and the forward's stats."""
    o = _Operands(x, labels, ref, ref_labels, self_offset, loss, params, metric)
    g = grad_rows.to(o.x.dtype).contiguous()
    st = stats.to(o.x.dtype).contiguous()
    d = x.shape[1]  # the gradients without the padding columns
    if o.n == 0 or o.m == 0 or o.d == 0:
        return torch.zeros_like(x), torch.zeros_like(ref)
    grids = launch_grids(o.n, o.m, o.cfg, target_programs(o.x.device))
    grads = []
    for for_refs, rows in ((False, o.n), (True, o.m)):
        name = "grad_ref" if for_refs else "grad_x"
        splits, per_split = grids[name + "_splits"]
        out = torch.zeros(splits, rows, o.d, dtype=o.x.dtype, device=o.x.device)
        _grad_kernel[grids[name]](
            o.x, o.ref, o.xn, o.rn, o.labels, o.ref_labels, o.params, st, g, out, o.n, o.m,
            o.d, o.shift, per_split, FOR_REFS=for_refs,
            STEP=o.cfg["BLOCK_M" if for_refs else "BLOCK_N"], **o.common)
        grads.append((out[0] if splits == 1 else out.sum(0))[:, :d].contiguous())
    return grads[0], grads[1]

"""Triton kernels of the N-Centroids loss: the pass over every centroid.

The own and the hardest centroid are one pair per row and are computed exactly in PyTorch
(``direct_distances``). The kernels handle what needs every centroid, per row block and
centroid block, from one Gram product per dimension chunk:

  negatives_forward   grid (row blocks):            first arg-min over k != y_i, sum of the
                                                    distances over k != y_i, near-pair count
  negatives_backward  grid (row blocks, dim blocks): w_i sum_{k != y_i} dd(x_i, c_k)/dx
                                                    = w_i (sum_k alpha_ik x_i + sum_k beta_ik c_k)

with a = |x - c|, b = |x + c| from the Gram form and the per-pair formulas of
``csrc/include/confusion_kernels/sphere_math.h``. Where the Gram form cancels (a^2, or b^2 for
the angle, below 1/16 of |x|^2 + |c|^2) a pair is "near": the kernels count it per row and
leave it out, and a second launch (``_exact_forward_kernel``, ``_exact_backward_kernel``)
recomputes the rows of every row block that has one from differences, exactly; the other
blocks read their counts and stop (near pairs are rare: a row close to a centroid that is not
its own). Which rows those are stays on the device: no host synchronisation. The angle 2 atan2(a, b) is computed in the kernel by four
half-angle steps and a short odd series (Triton has no portable atan2). Each output element is
owned by one program: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from .._spec import GRAM_EXACT_FRACTION, SPHERE_METRICS
from ._support import MAXNREG, div_rn, dot_precision, pad_columns, sqrt_rn
from ._support import use_dot as use_dot_for
from .affinity import _dot_nn, _dot_nt
from .intra_inter_sums import _tl_dtype

METRIC_CODES = {name: code for code, name in enumerate(SPHERE_METRICS)}  # _spec.py
CHORD = tl.constexpr(METRIC_CODES["euclidean"])
COSINE = tl.constexpr(METRIC_CODES["cosine"])
GREAT_CIRCLE = tl.constexpr(METRIC_CODES["great_circle"])
EXACT_FRACTION = tl.constexpr(GRAM_EXACT_FRACTION)  # _spec.py (spec.h: kGramExactFraction)
# What the launchers assume of each kernel's occupancy (scripts/triton_aot.py fails a
# variant that fits fewer blocks per SM): one resident block per SM.
RESOURCE_BUDGET = {"_forward_kernel": dict(min_blocks_per_sm=1),
                   "_backward_kernel": dict(min_blocks_per_sm=1),
                   "_exact_forward_kernel": dict(min_blocks_per_sm=1),
                   "_exact_backward_kernel": dict(min_blocks_per_sm=1)}


@triton.jit
def _half_angle_atan2(a, b):
    """atan2(a, b) for a, b >= 0: four half-angle steps atan2(a, b) = 2 atan2(a, b + |(a, b)|)
    bring the angle below pi/32, where atan(r) = r - r^3/3 + ... converges to double
    precision in nine terms."""
    for _ in tl.static_range(4):
        b = b + sqrt_rn(a * a + b * b)
    r = div_rn(a, tl.where(b > 0.0, b, 1.0))  # a = b = 0 only for two zero vectors: r = 0
    r2 = r * r
    p = 1.0 / 17.0
    p = 1.0 / 15.0 - r2 * p
    p = 1.0 / 13.0 - r2 * p
    p = 1.0 / 11.0 - r2 * p
    p = 1.0 / 9.0 - r2 * p
    p = 1.0 / 7.0 - r2 * p
    p = 1.0 / 5.0 - r2 * p
    p = 1.0 / 3.0 - r2 * p
    p = 1.0 - r2 * p
    return 16.0 * r * p


@triton.jit
def _pair_terms(g, xn, cn, METRIC: tl.constexpr):
    """(d, alpha, beta, near) per pair from the Gram tile (sphere_math.h)."""
    s = xn[:, None] + cn[None, :]
    # not tl.maximum: on the GPU it drops a NaN (max.f32 returns the other operand), the
    # interpreter's numpy keeps it; a comparison keeps it on both
    a2 = s - 2.0 * g
    a2 = tl.where(a2 < 0.0, 0.0, a2)
    b2 = s + 2.0 * g
    b2 = tl.where(b2 < 0.0, 0.0, b2)
    a = sqrt_rn(a2)
    b = sqrt_rn(b2)
    floor = EXACT_FRACTION * s
    if METRIC == COSINE:
        d = 1.0 - g
        alpha = tl.zeros_like(g)
        beta = tl.zeros_like(g) - 1.0
        near = a2 < -1.0  # never
    elif METRIC == CHORD:
        d = a
        near = a2 <= floor
        p = tl.where(near, 0.0, div_rn(1.0, tl.where(near, 1.0, a)))
        alpha = p
        beta = -p
    else:
        d = 2.0 * _half_angle_atan2(a, b)
        near = (a2 <= floor) | (b2 <= floor)
        safe_a = tl.where(near, 1.0, a)
        safe_b = tl.where(near, 1.0, b)
        ss = safe_a * safe_a + safe_b * safe_b
        p = div_rn(2.0 * safe_b, safe_a * ss)
        q = div_rn(-2.0 * safe_a, safe_b * ss)
        alpha = tl.where(near, 0.0, p + q)
        beta = tl.where(near, 0.0, q - p)
    return d, alpha, beta, near


@triton.jit
def _gram(X, C, rows, rmask, cols, cmask, D, ACC: tl.constexpr, USE_DOT: tl.constexpr,
          PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
          BLOCK_D: tl.constexpr):
    g = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        x = tl.load(X + rows[:, None] * D + ds[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0)
        c = tl.load(C + cols[:, None] * D + ds[None, :], mask=cmask[:, None] & dmask[None, :],
                    other=0.0)
        g += _dot_nt(x, c, USE_DOT, ACC, PREC)
    return g


@triton.jit
def _centroid_block(X, C, CN, rows, rmask, lab, xn, k0, K, D, METRIC: tl.constexpr,
                    ACC: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The rows against centroids k0 .. k0 + BLOCK_K: (cols, cmask, neg, d, alpha, beta, near),
    neg marking the pairs that are negatives (valid row and centroid, not the own class)."""
    cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    cmask = cols < K
    g = _gram(X, C, rows, rmask, cols, cmask, D, ACC, USE_DOT, PREC, BLOCK_M, BLOCK_K, BLOCK_D)
    cn = tl.load(CN + cols, mask=cmask, other=0.0)
    d, alpha, beta, near = _pair_terms(g, xn, cn, METRIC)
    neg = rmask[:, None] & cmask[None, :] & (cols[None, :] != lab[:, None])
    return cols, cmask, neg, d, alpha, beta, near


@triton.jit
def _forward_kernel(X, C, XN, CN, LAB, BEST_K, SUM, NEAR, N, K, D,
                    METRIC: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * D
    rmask = rows < N
    lab = tl.load(LAB + rows, mask=rmask, other=-1)
    xn = tl.load(XN + rows, mask=rmask, other=0.0)
    best = tl.full((BLOCK_M,), float("inf"), dtype=ACC)
    best_k = tl.full((BLOCK_M,), -1, dtype=tl.int64)
    total = tl.zeros((BLOCK_M,), dtype=ACC)
    near_count = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols, cmask, neg, d, alpha, beta, near = _centroid_block(
            X, C, CN, rows, rmask, lab, xn, k0, K, D, METRIC, ACC, USE_DOT, PREC, BLOCK_M,
            BLOCK_K, BLOCK_D)
        total += tl.sum(tl.where(neg, d, 0.0), axis=1)
        near_count += tl.sum(tl.where(neg & near, 1, 0), axis=1)
        masked = tl.where(neg, d, float("inf"))
        tile_best = tl.min(masked, axis=1)
        tile_k = k0 + tl.argmin(masked, axis=1, tie_break_left=True).to(tl.int64)
        better = (tile_best < best) | ((best_k < 0) & (tl.sum(tl.where(neg, 1, 0), axis=1) > 0))
        best = tl.where(better, tile_best, best)
        best_k = tl.where(better, tile_k, best_k)
    tl.store(BEST_K + rows, best_k, mask=rmask)
    tl.store(SUM + rows, total, mask=rmask)
    tl.store(NEAR + rows, near_count, mask=rmask)


@triton.jit
def _backward_kernel(X, C, XN, CN, LAB, W, GRAD_X, NEAR, N, K, D,
                     METRIC: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
                     PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * D
    rmask = rows < N
    dims = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dims < D
    lab = tl.load(LAB + rows, mask=rmask, other=-1)
    xn = tl.load(XN + rows, mask=rmask, other=0.0)
    w = tl.load(W + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    x_coef = tl.zeros((BLOCK_M,), dtype=ACC)
    near_count = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols, cmask, neg, d, alpha, beta, near = _centroid_block(
            X, C, CN, rows, rmask, lab, xn, k0, K, D, METRIC, ACC, USE_DOT, PREC, BLOCK_M,
            BLOCK_K, BLOCK_D)
        near_count += tl.sum(tl.where(neg & near, 1, 0), axis=1)
        x_coef += tl.sum(tl.where(neg, alpha, 0.0), axis=1)
        coef = tl.where(neg, beta, 0.0) * w[:, None]
        c = tl.load(C + cols[:, None] * D + dims[None, :], mask=cmask[:, None] & dmask[None, :],
                    other=0.0).to(ACC)
        acc += _dot_nn(coef, c, USE_DOT, ACC, PREC)
    x = tl.load(X + rows[:, None] * D + dims[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0).to(ACC)
    grad = acc + (w * x_coef)[:, None] * x
    tl.store(GRAD_X + rows[:, None] * D + dims[None, :], grad, mask=rmask[:, None] & dmask[None, :])
    if tl.program_id(1) == 0:
        tl.store(NEAR + rows, near_count, mask=rmask)


@triton.jit
def _exact_chords(X, C, rows, rmask, cols, cmask, D, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """(a, b) = (|x - c|, |x + c|) [BLOCK_M, BLOCK_K] from differences (no cancellation)."""
    a2 = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    b2 = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        x = tl.load(X + rows[:, None] * D + ds[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0).to(ACC)
        c = tl.load(C + cols[:, None] * D + ds[None, :], mask=cmask[:, None] & dmask[None, :],
                    other=0.0).to(ACC)
        diff = x[:, None, :] - c[None, :, :]
        both = x[:, None, :] + c[None, :, :]
        a2 += tl.sum(diff * diff, axis=2)
        b2 += tl.sum(both * both, axis=2)
    return sqrt_rn(a2), sqrt_rn(b2)


@triton.jit
def _exact_forward_kernel(X, C, LAB, NEAR, BEST_K, SUM, N, K, D,
                          METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The forward's rows with a near pair, again from differences (other rows untouched)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    near = tl.load(NEAR + rows, mask=rmask, other=0)
    if tl.max(near, axis=0) > 0:
        lab = tl.load(LAB + rows, mask=rmask, other=-1)
        best = tl.full((BLOCK_M,), float("inf"), dtype=ACC)
        best_k = tl.full((BLOCK_M,), -1, dtype=tl.int64)
        total = tl.zeros((BLOCK_M,), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            cmask = cols < K
            a, b = _exact_chords(X, C, rows, rmask, cols, cmask, D, ACC, BLOCK_M, BLOCK_K,
                                 BLOCK_D)
            if METRIC == CHORD:
                d = a
            else:
                d = 2.0 * _half_angle_atan2(a, b)
            neg = rmask[:, None] & cmask[None, :] & (cols[None, :] != lab[:, None])
            total += tl.sum(tl.where(neg, d, 0.0), axis=1)
            masked = tl.where(neg, d, float("inf"))
            tile_best = tl.min(masked, axis=1)
            tile_k = k0 + tl.argmin(masked, axis=1, tie_break_left=True).to(tl.int64)
            better = (tile_best < best) | ((best_k < 0)
                                           & (tl.sum(tl.where(neg, 1, 0), axis=1) > 0))
            best = tl.where(better, tile_best, best)
            best_k = tl.where(better, tile_k, best_k)
        redo = rmask & (near > 0)
        tl.store(BEST_K + rows, best_k, mask=redo)
        tl.store(SUM + rows, total, mask=redo)


@triton.jit
def _exact_backward_kernel(X, C, LAB, W, NEAR, GRAD_X, N, K, D,
                           METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_DO: tl.constexpr):
    """The backward's rows with a near pair, again from differences: w_i sum_{k != y_i}
    (p (x_i - c_k) + q (x_i + c_k)) (ops/n_centroids_rows.direct_gradients), each product
    taken with the difference itself."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    near = tl.load(NEAR + rows, mask=rmask, other=0)
    if tl.max(near, axis=0) > 0:
        dims = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        dmask = dims < D
        lab = tl.load(LAB + rows, mask=rmask, other=-1)
        w = tl.load(W + rows, mask=rmask, other=0.0).to(ACC)
        x = tl.load(X + rows[:, None] * D + dims[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0).to(ACC)
        acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            cmask = cols < K
            a, b = _exact_chords(X, C, rows, rmask, cols, cmask, D, ACC, BLOCK_M, BLOCK_K,
                                 BLOCK_D)
            neg = rmask[:, None] & cmask[None, :] & (cols[None, :] != lab[:, None])
            if METRIC == CHORD:
                p = tl.where(a > 0.0, div_rn(1.0, tl.where(a > 0.0, a, 1.0)), 0.0)
                q = tl.zeros_like(p)
            else:
                s = a * a + b * b
                p = tl.where(a > 0.0, div_rn(2.0 * b, tl.where(a > 0.0, a * s, 1.0)), 0.0)
                q = tl.where(b > 0.0, div_rn(-2.0 * a, tl.where(b > 0.0, b * s, 1.0)), 0.0)
            p = tl.where(neg, p, 0.0)[:, :, None]
            q = tl.where(neg, q, 0.0)[:, :, None]
            c = tl.load(C + cols[:, None] * D + dims[None, :],
                        mask=cmask[:, None] & dmask[None, :], other=0.0).to(ACC)
            # p (x - c) from the difference itself: p x - p c would cancel (p ~ 1 / |x - c|)
            acc += tl.sum(p * (x[:, None, :] - c[None, :, :]) + q * (x[:, None, :] + c[None, :, :]),
                          axis=1)
        grad = acc * w[:, None]
        redo = rmask & (near > 0)
        tl.store(GRAD_X + rows[:, None] * D + dims[None, :], grad,
                 mask=redo[:, None] & dmask[None, :])


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _config(x: torch.Tensor) -> dict:
    """Row and centroid blocks, dimension chunk and warps: the largest that compile
    without spilling for sm_80 / sm_90 (scripts/triton_aot.py); fp64 on half-size blocks."""
    if triton_interpreting():
        block, warps, block_do = 16, 4, 32
    elif x.dtype == torch.float64:
        block, warps, block_do = 32, 8, 32
    else:
        block, warps, block_do = 64, 8, 32
        if dot_precision(x.dtype) == "ieee":
            block = 32  # fp32 on the FMA units, and 16-bit inputs: 64 x 64 blocks spilled
    use_dot = use_dot_for(x.dtype)
    # broadcast products (fp64 before Triton 3.5) hold BLOCK_M x BLOCK_K x BLOCK_D values
    block_d = 32 if triton_interpreting() else 16 if use_dot else 4
    if not use_dot and not triton_interpreting():
        block_do = 4
    cfg = dict(BLOCK_M=block, BLOCK_K=block, BLOCK_D=block_d, USE_DOT=use_dot,
               PREC=dot_precision(x.dtype), num_warps=warps,
               BLOCK_DO=block_do)
    if not triton_interpreting():
        cfg["maxnreg"] = MAXNREG
    return cfg


def _exact_config() -> dict:
    """Tiles of the exact (difference) kernels: BLOCK_M x BLOCK_K x BLOCK_D products."""
    if triton_interpreting():
        return dict(BLOCK_M=16, BLOCK_K=16, BLOCK_D=32, BLOCK_DO=32)
    return dict(BLOCK_M=16, BLOCK_K=16, BLOCK_D=8, BLOCK_DO=8, num_warps=4, maxnreg=MAXNREG)


def launch_grids(n: int, dim: int, cfg: dict) -> dict[str, tuple[int, ...]]:
    """Grids of the forward (row blocks) and backward (row blocks x dimension blocks), and of
    their exact passes over the rows with a near pair."""
    blocks = triton.cdiv(n, cfg["BLOCK_M"])
    exact = _exact_config()
    exact_blocks = triton.cdiv(n, exact["BLOCK_M"])
    return dict(forward=(blocks,), backward=(blocks, triton.cdiv(dim, cfg["BLOCK_DO"])),
                exact_forward=(exact_blocks,),
                exact_backward=(exact_blocks, triton.cdiv(dim, exact["BLOCK_DO"])))


def _norms(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.square().sum(1).contiguous(), centroids.square().sum(1).contiguous()


def negatives_forward(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor,
                      metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(hardest index [N], sum over negatives [N]) of unit rows x against the centroids."""
    x, centroids = (pad_columns(t).contiguous() for t in (x, centroids))  # (see _support)
    n, dim = x.shape
    k = centroids.shape[0]
    cfg = _config(x)
    xn, cn = _norms(x, centroids)
    blocks = triton.cdiv(n, cfg["BLOCK_M"])
    # per-row outputs padded to whole row blocks: Triton 3.2's interpreter corrupts the heap
    # on masked-off integer stores past the end of a buffer
    padded = blocks * cfg["BLOCK_M"]
    best_k = torch.empty(padded, dtype=torch.int64, device=x.device)
    sums = torch.empty(padded, dtype=x.dtype, device=x.device)
    near = torch.empty(padded, dtype=torch.int32, device=x.device)
    _forward_kernel[launch_grids(n, dim, cfg)["forward"]](
        x, centroids, xn, cn, labels, best_k, sums, near, n, k, dim,
        METRIC=METRIC_CODES[metric], ACC=_tl_dtype(x.dtype),
        **{k: v for k, v in cfg.items() if k != "BLOCK_DO"})
    if metric != "cosine":  # (the cosine distance 1 - g has no near pairs)
        _exact_forward_kernel[launch_grids(n, dim, cfg)["exact_forward"]](
            x, centroids, labels, near, best_k, sums, n, k, dim,
            METRIC=METRIC_CODES[metric], ACC=_tl_dtype(x.dtype),
            **{k: v for k, v in _exact_config().items() if k != "BLOCK_DO"})
    return best_k[:n], sums[:n]


def negatives_backward(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor,
                       weight: torch.Tensor, metric: str) -> torch.Tensor:
    """dL/dx [N, D] of sum_i weight_i sum_{k != y_i} d(x_i, c_k)."""
    width = x.shape[1]
    x, centroids = (pad_columns(t).contiguous() for t in (x, centroids))  # (see _support)
    n, dim = x.shape
    k = centroids.shape[0]
    cfg = _config(x)
    xn, cn = _norms(x, centroids)
    grad = torch.empty_like(x)
    blocks = triton.cdiv(n, cfg["BLOCK_M"])
    near = torch.empty(blocks * cfg["BLOCK_M"], dtype=torch.int32, device=x.device)  # padded
    _backward_kernel[launch_grids(n, dim, cfg)["backward"]](
        x, centroids, xn, cn, labels, weight.contiguous(), grad, near, n, k, dim,
        METRIC=METRIC_CODES[metric], ACC=_tl_dtype(x.dtype), **cfg)
    if metric != "cosine":
        _exact_backward_kernel[launch_grids(n, dim, cfg)["exact_backward"]](
            x, centroids, labels, weight.contiguous(), near, grad, n, k, dim,
            METRIC=METRIC_CODES[metric], ACC=_tl_dtype(x.dtype), **_exact_config())
    return grad[:, :width]  # (the zero columns' gradient dropped)

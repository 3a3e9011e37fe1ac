"""Triton kernels of the affinity loss rows (docs/math.md, "Affinity loss").

A class tile holds BLOCK_C classes x MP (= next power of two >= m) prototype
slots; its squared distances to a row block come from one product per
dimension chunk (Gram form, fp32 accumulation; ``tl.dot`` on GPU, fp16/bf16
operands on the tensor cores), reshaped to [rows, classes, MP] for the min
over the m prototypes (first arg-min, as torch.min). Nothing of size
N x (C m) is stored:

  forward     grid (row blocks):             L_i, d_true_i, active_i
  backward_f  grid (row blocks, dim blocks):  dL/df = 2 rowsum(A) f - 2 A W
  backward_w  grid (class blocks, dim blocks, row splits): dL/dW = 2 colsum(A) W - 2 A^T f,
              one partial sum per share of the rows, added in a fixed order
where A holds, per row and class, the coefficient dL_i/ds at the arg-min
prototype. Each output element is owned by one program and summed in a fixed
order: no atomics, deterministic. The per-pair formulas are those of
``csrc/include/confusion_kernels/affinity_math.h``.
"""

import struct

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from .._validation import accumulation_dtype
from ._support import (MAXNREG, div_rn, dot_precision, launch_options, pad_columns, shares,
                       target_programs)
from ._support import use_dot as use_dot_for
from .intra_inter_sums import _tl_dtype

INVERSE = tl.constexpr(1)
# What the launchers assume of each kernel's occupancy (scripts/triton_aot.py fails a
# variant that fits fewer blocks per SM): grids are sized from the SM count
# (_support.target_programs), one resident block per SM.
RESOURCE_BUDGET = {"_forward_kernel": dict(min_blocks_per_sm=1),
                   "_backward_f_kernel": dict(min_blocks_per_sm=1),
                   "_backward_w_kernel": dict(min_blocks_per_sm=1)}


@triton.jit
def _scalar(hi, lo, ACC: tl.constexpr):
    """A float kernel argument in ACC: Triton passes Python floats as fp32, so the
    launchers send hi = fp32(v) and lo = v - hi (about 48 bits together)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _similarity(s, sigma, KIND: tl.constexpr):
    if KIND == INVERSE:
        return div_rn(1.0, 1.0 + div_rn(s, sigma))
    return tl.exp(div_rn(-s, sigma))


@triton.jit
def _similarity_grad(d, sigma, KIND: tl.constexpr):
    if KIND == INVERSE:
        return div_rn(-d * d, sigma)
    return div_rn(-d, sigma)


@triton.jit
def _dot_nt(a, b, USE_DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """a [M, K] . b[N, K]^T -> [M, N] in ACC."""
    if USE_DOT:
        return tl.dot(a, tl.trans(b), out_dtype=ACC, input_precision=PREC)
    return tl.sum(a.to(ACC)[:, None, :] * b.to(ACC)[None, :, :], axis=2)


@triton.jit
def _dot_nn(a, b, USE_DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """a [M, K] . b [K, N] -> [M, N] in ACC (a, b already in ACC)."""
    if USE_DOT:
        return tl.dot(a, b, out_dtype=ACC, input_precision=PREC)
    return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _class_tile(F, W, WN, FN_rows, rows, rmask, c0, C, M, D,
                ACC: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, MP: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """(smin [BM, BC], arg [BM, BC], cmask [BC]) of the rows against classes
    c0 .. c0 + BC: the smallest squared distance over each class's m
    prototypes, and the first prototype reaching it."""
    slots = tl.arange(0, BLOCK_C * MP).to(tl.int64)  # int64: prototype * D
    cls = c0 + slots // MP
    t = slots % MP
    smask = (cls < C) & (t < M)
    proto = cls * M + t
    g = tl.zeros((BLOCK_M, BLOCK_C * MP), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        f = tl.load(F + rows[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(W + proto[:, None] * D + ks[None, :], mask=smask[:, None] & kmask[None, :],
                    other=0.0)
        g += _dot_nt(f, w, USE_DOT, ACC, PREC)
    wn = tl.load(WN + proto, mask=smask, other=0.0)
    s = FN_rows[:, None] + wn[None, :] - 2.0 * g
    # NaN (from a non-finite f or prototype) becomes 0 here, so that the min /
    # arg-min never sees it; the op layer makes such rows NaN (NaN policy).
    s = tl.where(s > 0.0, s, 0.0)
    s = tl.where(smask[None, :], s, float("inf"))
    s3 = tl.reshape(s, (BLOCK_M, BLOCK_C, MP))
    smin = tl.min(s3, axis=2)
    arg = tl.argmin(s3, axis=2, tie_break_left=True)
    cmask = (c0 + tl.arange(0, BLOCK_C)) < C
    return smin, arg, cmask


@triton.jit
def _coefficients(smin, arg, cmask, rows, rmask, c0, LAB, G, DTRUE, ACTIVE, sigma, margin,
                  KIND: tl.constexpr, BLOCK_C: tl.constexpr):
    """dL_i/ds_ij at the arg-min prototype, [BM, BC] (0 for masked pairs)."""
    lab = tl.load(LAB + rows, mask=rmask, other=-1)
    g = tl.load(G + rows, mask=rmask, other=0.0)
    d_true = tl.load(DTRUE + rows, mask=rmask, other=0.0)
    active = tl.load(ACTIVE + rows, mask=rmask, other=0.0)
    cls = c0 + tl.arange(0, BLOCK_C)
    d = _similarity(smin, sigma, KIND)
    own = cls[None, :] == lab[:, None]
    on = (margin + d - d_true[:, None]) > 0
    weight = tl.where(own, -active[:, None], tl.where(on, 1.0, 0.0))
    coef = g[:, None] * weight * _similarity_grad(d, sigma, KIND)
    return tl.where(rmask[:, None] & cmask[None, :], coef, 0.0)


@triton.jit
def _expand_slots(coef, arg, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, MP: tl.constexpr):
    """[BM, BC] coefficients placed at their arg-min slot of [BM, BC * MP]."""
    t = tl.arange(0, MP)
    full = tl.where(arg[:, :, None] == t[None, None, :], coef[:, :, None], 0.0)
    return tl.reshape(full, (BLOCK_M, BLOCK_C * MP))


@triton.jit
def _forward_kernel(F, W, WN, FN, LAB, ROWS, DTRUE, ACTIVE, N, C, M, D, sigma_hi, sigma_lo,
                    margin_hi, margin_lo,
                    KIND: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, MP: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    sigma, margin = _scalar(sigma_hi, sigma_lo, ACC), _scalar(margin_hi, margin_lo, ACC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * D
    rmask = rows < N
    lab = tl.load(LAB + rows, mask=rmask, other=0)
    fn = tl.load(FN + rows, mask=rmask, other=0.0)
    # d_true: the own class's m prototypes, by direct dot products
    s_true = tl.full((BLOCK_M,), float("inf"), dtype=ACC)
    for t in range(0, M):
        dot = tl.zeros((BLOCK_M,), dtype=ACC)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = rmask[:, None] & (ks < D)[None, :]
            f = tl.load(F + rows[:, None] * D + ks[None, :], mask=mask, other=0.0).to(ACC)
            w = tl.load(W + (lab * M + t)[:, None] * D + ks[None, :], mask=mask, other=0.0).to(ACC)
            dot += tl.sum(f * w, axis=1)
        wn = tl.load(WN + lab * M + t, mask=rmask, other=0.0)
        s_t = fn + wn - 2.0 * dot
        s_true = tl.minimum(s_true, tl.where(s_t > 0.0, s_t, 0.0))
    d_true = _similarity(s_true, sigma, KIND)
    total = tl.zeros((BLOCK_M,), dtype=ACC)
    count = tl.zeros((BLOCK_M,), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        smin, arg, cmask = _class_tile(F, W, WN, fn, rows, rmask, c0, C, M, D, ACC, USE_DOT, PREC,
                                       BLOCK_M, BLOCK_C, MP, BLOCK_K)
        cls = c0 + tl.arange(0, BLOCK_C)
        d = _similarity(smin, sigma, KIND)
        h = margin + d - d_true[:, None]
        on = (h > 0) & cmask[None, :] & (cls[None, :] != lab[:, None])
        total += tl.sum(tl.where(on, h, 0.0), axis=1)
        count += tl.sum(tl.where(on, 1.0, 0.0), axis=1)
    tl.store(ROWS + rows, total, mask=rmask)
    tl.store(DTRUE + rows, d_true, mask=rmask)
    tl.store(ACTIVE + rows, count, mask=rmask)


@triton.jit
def _backward_f_kernel(F, W, WN, FN, LAB, G, DTRUE, ACTIVE, GRAD_F, N, C, M, D, sigma_hi, sigma_lo,
                       margin_hi, margin_lo,
                       KIND: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, MP: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    sigma, margin = _scalar(sigma_hi, sigma_lo, ACC), _scalar(margin_hi, margin_lo, ACC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * D
    rmask = rows < N
    dims = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dims < D
    fn = tl.load(FN + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    slots = tl.arange(0, BLOCK_C * MP).to(tl.int64)  # int64: prototype * D
    for c0 in range(0, C, BLOCK_C):
        smin, arg, cmask = _class_tile(F, W, WN, fn, rows, rmask, c0, C, M, D, ACC, USE_DOT, PREC,
                                       BLOCK_M, BLOCK_C, MP, BLOCK_K)
        coef = _coefficients(smin, arg, cmask, rows, rmask, c0, LAB, G, DTRUE, ACTIVE, sigma,
                             margin, KIND, BLOCK_C)
        row_sum += tl.sum(coef, axis=1)
        a = _expand_slots(coef, arg, BLOCK_M, BLOCK_C, MP)
        cls = c0 + slots // MP
        t = slots % MP
        smask = (cls < C) & (t < M)
        w = tl.load(W + (cls * M + t)[:, None] * D + dims[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0).to(ACC)
        acc += _dot_nn(a, w, USE_DOT, ACC, PREC)
    f = tl.load(F + rows[:, None] * D + dims[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0).to(ACC)
    grad = 2.0 * row_sum[:, None] * f - 2.0 * acc
    tl.store(GRAD_F + rows[:, None] * D + dims[None, :], grad, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _backward_w_kernel(F, W, WN, FN, LAB, G, DTRUE, ACTIVE, GRAD_W, N, C, M, D, ROWS_PER_SPLIT,
                       sigma_hi, sigma_lo, margin_hi, margin_lo,
                       KIND: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, MP: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    sigma, margin = _scalar(sigma_hi, sigma_lo, ACC), _scalar(margin_hi, margin_lo, ACC)
    c0 = tl.program_id(0) * BLOCK_C
    dims = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dims < D
    split = tl.program_id(2)  # this program's share of the rows (see _support.shares)
    r_begin = split * ROWS_PER_SPLIT
    r_end = tl.minimum(N, r_begin + ROWS_PER_SPLIT)
    acc = tl.zeros((BLOCK_C * MP, BLOCK_DO), dtype=ACC)
    col_sum = tl.zeros((BLOCK_C * MP,), dtype=ACC)
    for r0 in range(r_begin, r_end, BLOCK_M):
        rows = tl.arange(0, BLOCK_M).to(tl.int64) + r0
        rmask = rows < N
        fn = tl.load(FN + rows, mask=rmask, other=0.0)
        smin, arg, cmask = _class_tile(F, W, WN, fn, rows, rmask, c0, C, M, D, ACC, USE_DOT, PREC,
                                       BLOCK_M, BLOCK_C, MP, BLOCK_K)
        coef = _coefficients(smin, arg, cmask, rows, rmask, c0, LAB, G, DTRUE, ACTIVE, sigma,
                             margin, KIND, BLOCK_C)
        a = _expand_slots(coef, arg, BLOCK_M, BLOCK_C, MP)
        col_sum += tl.sum(a, axis=0)
        f = tl.load(F + rows[:, None] * D + dims[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0).to(ACC)
        acc += _dot_nn(tl.trans(a), f, USE_DOT, ACC, PREC)
    slots = tl.arange(0, BLOCK_C * MP).to(tl.int64)  # int64: prototype * D
    cls = c0 + slots // MP
    t = slots % MP
    smask = (cls < C) & (t < M)
    proto = cls * M + t
    mask = smask[:, None] & dmask[None, :]
    w = tl.load(W + proto[:, None] * D + dims[None, :], mask=mask, other=0.0).to(ACC)
    grad = 2.0 * col_sum[:, None] * w - 2.0 * acc
    out = GRAD_W + split.to(tl.int64) * C * M * D  # int64: the partial sums of one split
    tl.store(out + proto[:, None] * D + dims[None, :], grad, mask=mask)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _split(v: float) -> tuple[float, float]:
    """(hi, lo) with hi exactly an fp32 and hi + lo = v to about 2^-48 (see ``_scalar``)."""
    hi = struct.unpack("f", struct.pack("f", float(v)))[0]  # round to nearest fp32, on the host
    return hi, float(v) - hi


def _scalars(sigma: float, margin: float) -> tuple[float, float, float, float]:
    """The kernels' sigma_hi, sigma_lo, margin_hi, margin_lo arguments."""
    return (*_split(sigma), *_split(margin))


def _config(f: torch.Tensor, m: int) -> dict:
    """A class tile of ``slots`` prototype slots (BLOCK_C classes x MP) against BLOCK_M rows:
    the largest tiles that compile without spilling for sm_80 / sm_90
    (scripts/triton_aot.py); 16-bit operands and fp64 on half the slots; the whole
    register file allowed (MAXNREG)."""
    mp = triton.next_power_of_2(m)
    use_dot = use_dot_for(f.dtype) and not triton_interpreting()
    cfg = dict(BLOCK_M=32, MP=mp, BLOCK_K=16, BLOCK_DO=32, USE_DOT=use_dot,
               PREC=dot_precision(f.dtype), num_warps=4)
    if triton_interpreting():
        slots, cfg["BLOCK_K"] = 32, 32
    elif f.dtype == torch.float32:
        slots = 64
    else:
        slots = 32
    if not triton_interpreting():
        cfg["maxnreg"] = MAXNREG
        if not use_dot:  # fp64 before Triton 3.5: broadcast products over BLOCK_K / BLOCK_DO
            cfg["BLOCK_K"], cfg["BLOCK_DO"] = 2, 4
            cfg["BLOCK_M"] = 16
    cfg["BLOCK_C"] = max(1, slots // mp)
    # a class wider than the slots (MP > slots) keeps the tile's size by taking fewer rows
    cfg["BLOCK_M"] = max(16, cfg["BLOCK_M"] * slots // max(slots, mp))
    return cfg


def _prepare(f, prototypes):
    acc = accumulation_dtype(f.dtype)
    c, m, d = prototypes.shape
    # tl.dot operands: fp16 / bf16 stay so (tensor cores) when f and the prototypes share that
    # dtype; otherwise both in the accumulation dtype, as the C++ kernels do (fp32 prototypes
    # are never rounded to f's 16-bit dtype)
    half = f.dtype in (torch.float16, torch.bfloat16) and prototypes.dtype == f.dtype
    op_dtype = f.dtype if half else acc
    fo = pad_columns(f.to(op_dtype)).contiguous()  # widths a multiple of 16 (_support)
    wo = pad_columns(prototypes.to(op_dtype).reshape(c * m, d)).contiguous()
    fn = fo.to(acc).square().sum(1).contiguous()
    wn = wo.to(acc).square().sum(1).contiguous()
    return acc, fo, wo, fn, wn, c, m, d


def forward(f: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, sigma: float,
            margin: float, similarity: int):
    """(L, d_true, active) per row; see the module docstring."""
    acc, fo, wo, fn, wn, c, m, _ = _prepare(f, prototypes)
    n, d = f.shape[0], fo.shape[1]
    cfg = _config(f, m)
    rows = torch.empty(n, dtype=acc, device=f.device)
    d_true, active = torch.empty_like(rows), torch.empty_like(rows)
    _forward_kernel[launch_grids(n, c, d, cfg, 1)["forward"]](
        fo, wo, wn, fn, labels.contiguous(), rows, d_true, active, n, c, m, d,
        *_scalars(sigma, margin), KIND=similarity, ACC=_tl_dtype(acc), USE_DOT=cfg["USE_DOT"], PREC=cfg["PREC"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], MP=cfg["MP"], BLOCK_K=cfg["BLOCK_K"],
        **launch_options(cfg))
    return rows, d_true, active


def backward(grad_rows, f, prototypes, labels, d_true, active, sigma, margin, similarity):
    """(dL/df, dL/dprototypes) from the per-row upstream gradient."""
    acc, fo, wo, fn, wn, c, m, width = _prepare(f, prototypes)
    n, d = f.shape[0], fo.shape[1]  # d: the padded width the kernels see
    cfg = _config(f, m)
    g = grad_rows.to(acc).contiguous()
    dt, ac = d_true.to(acc).contiguous(), active.to(acc).contiguous()
    lab = labels.contiguous()
    grad_f = torch.empty(n, d, dtype=acc, device=f.device)
    common = dict(KIND=similarity, ACC=_tl_dtype(acc), USE_DOT=cfg["USE_DOT"], PREC=cfg["PREC"],
                  BLOCK_M=cfg["BLOCK_M"],
                  BLOCK_C=cfg["BLOCK_C"], MP=cfg["MP"], BLOCK_K=cfg["BLOCK_K"],
                  BLOCK_DO=cfg["BLOCK_DO"], **launch_options(cfg))
    scalars = _scalars(sigma, margin)
    if d > 0:
        grids = launch_grids(n, c, d, cfg, target_programs(f.device))
        _backward_f_kernel[grids["backward_f"]](
            fo, wo, wn, fn, lab, g, dt, ac, grad_f, n, c, m, d, *scalars,
            **common)
        splits, rows_per_split = grids["row_splits"]
        partial = torch.empty(splits, c * m, d, dtype=acc, device=f.device)
        _backward_w_kernel[grids["backward_w"]](
            fo, wo, wn, fn, lab, g, dt, ac, partial, n, c, m, d, rows_per_split, *scalars,
            **common)
        grad_w = partial[0] if splits == 1 else partial.sum(0)  # fixed order: deterministic
    else:
        grad_w = torch.zeros(c * m, d, dtype=acc, device=f.device)
    # (the zero columns of _prepare dropped)
    return (grad_f[:, :width].contiguous().to(f.dtype),
            grad_w[:, :width].contiguous().view(c, m, width).to(prototypes.dtype))


def launch_grids(n: int, c: int, d: int, cfg: dict, target: int) -> dict:
    """Grids of the three kernels for n rows, c classes, d dimensions; dL/dW's rows are
    split to give about ``target`` programs (see _support.shares)."""
    grid_w = (triton.cdiv(c, cfg["BLOCK_C"]), triton.cdiv(d, cfg["BLOCK_DO"]))
    splits, rows_per_split = shares(n, grid_w[0] * grid_w[1], cfg["BLOCK_M"], target)
    return dict(forward=(triton.cdiv(n, cfg["BLOCK_M"]),),
                backward_f=(triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_DO"])),
                backward_w=(*grid_w, splits), row_splits=(splits, rows_per_split))



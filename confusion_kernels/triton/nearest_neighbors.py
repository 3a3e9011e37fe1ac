"""Triton kernel of nearest_neighbors: the K nearest references r [M, D] of every query q [N, D],
nothing of size N x M held (docs/math.md, "Retrieval"; readable definition
confusion_kernels/reference/retrieval.py, per pair the keys of
csrc/include/confusion_kernels/neighbor_math.h).

  _topk_kernel  grid (query blocks of 16): a program walks the reference tiles of KP columns
                (KP = K rounded up to a power of two, 16 .. MAX_NEIGHBORS) in order. Each pair's key
                (|r|^2 - 2 q.r; cosine -q.r of the unit rows, in fp32) and its column are
                packed into one int64 whose order is (key, column): the key's bits mapped to
                an order-preserving int32 above the column. The program keeps each row's KP
                smallest packed values sorted in registers; a tile that holds a value below a
                row's largest kept one is sorted descending, merged by an elementwise minimum
                (the KP smallest of two sorted lists, as a bitonic sequence) and that sequence
                sorted by one bitonic merge (the networks: _sort, _merge).
                Ties go to the lower column by construction.

  _collect_kernel  K beyond MAX_NEIGHBORS, up to DEEP_MAX_NEIGHBORS (1024): each row's list
                lives in global memory, buf [N, K + DEEP_REF_TILE] of packed values. One launch
                per reference tile of DEEP_REF_TILE columns: a program (16 rows) appends every
                column whose packed value is below the row's threshold (the K-th smallest kept;
                none while fewer than K are kept) at the row's next slots (a prefix sum of the
                entrants, no atomics); then torch.topk cuts each row back to its K smallest and
                gives the next threshold. Ties go to the lower column by construction here
                too. A slower path (a topk over [N, K + 1024] per tile), O(N (K + 1024))
                memory.

The launcher unpacks the columns of the first K, measures their distances again from the
rows' differences (the Gram form cancels for close pairs; fp64 rows keep fp64 distances) and
sorts them by (distance, index), in row chunks of O(chunk K D) memory. fp64 rows rank by
their key rounded to fp32: references whose distances to a query differ by less than that
rounding (about 1e-7 |q|^2) may be kept in either order at the K-th place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.retrieval import neighbor_count
from ._support import MAXNREG, TRITON_VERSION, dot_precision, launch_options
from ._support import use_dot as use_dot_for
from .n_centroids import _gram

# The most neighbours a query keeps in registers: 128; 32 with Triton before 3.5, whose code
# for the sorting networks spilled from KP = 64 on (scripts/triton_aot.py with Triton 3.2:
# 8-28 B at 64, 400-2600 B per thread at 128 and 256). KP = 256 used up to 248 registers with
# Triton 3.9 and spilled in fp64 with Triton 3.6; 16 warps do not fit the registers it needs.
MAX_NEIGHBORS = 128 if TRITON_VERSION >= (3, 5) else 32
BLOCK_M = 16
# Beyond MAX_NEIGHBORS, the lists in global memory (_collect_kernel): up to 1024, the CUDA
# kernel's depth too; reference tiles of DEEP_REF_TILE columns, blocks of DEEP_BLOCK_M rows x
# DEEP_BLOCK_N columns.
DEEP_MAX_NEIGHBORS = 1024
DEEP_REF_TILE = 1024
DEEP_BLOCK_M, DEEP_BLOCK_N = 16, 64
PACKED_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)
PACKED_MAX_INT = 0x7FFFFFFFFFFFFFFF
# What the launcher assumes of the kernels' occupancy (scripts/triton_aot.py fails a variant
# that fits fewer blocks per SM): one resident block per SM.
RESOURCE_BUDGET = {"_topk_kernel": dict(min_blocks_per_sm=1),
                   "_collect_kernel": dict(min_blocks_per_sm=1)}
EXACT_ROWS_CHUNK = 1 << 22  # chunk rows x K x D elements of the distance re-measurement


@triton.jit
def _sortable(key):
    """fp32 -> int32 in the same order (+0 and -0 equal, NaN taken as +inf)."""
    key = tl.where(key == key, key + 0.0, float("inf"))
    bits = key.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _packed_block(Q, R, RN, rows, rmask, cols, cmask, D, SHIFT, IS_COSINE: tl.constexpr,
                  ACC: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The packed (key, column) of rows x cols, PACKED_MAX where the pair does not count (a
    column past the end, or the row's own column: cols - rows == SHIFT)."""
    g = _gram(Q, R, rows, rmask, cols, cmask, D, ACC, USE_DOT, PREC, BLOCK_M, BLOCK_N, BLOCK_D)
    if IS_COSINE:
        key = -g
    else:
        rn = tl.load(RN + cols, mask=cmask, other=0.0)
        key = rn[None, :] - (g + g)
    packed = (_sortable(key.to(tl.float32)).to(tl.int64) << 32) | cols[None, :]
    valid = cmask[None, :] & ((cols[None, :] - rows[:, None]) != SHIFT)
    return tl.where(valid, packed, PACKED_MAX)


@triton.jit
def _compare_swap(x, flip, i: tl.constexpr, N_DIMS: tl.constexpr):
    """One stage of a bitonic network along the last axis of x [rows, 2^N_DIMS]: the pairs at
    distance 2^(N_DIMS - i - 1) in order (min first), or the other way where ``flip``. With
    min / max over an axis of 2 (the interpreter runs those as array operations; a combine
    function would run element by element)."""
    rows: tl.constexpr = x.shape[0]
    shape: tl.constexpr = [rows * 2**i, 2, 2 ** (N_DIMS - i - 1)]
    y = tl.reshape(x, shape)
    lo = tl.min(y, axis=1)[:, None, :]
    hi = tl.max(y, axis=1)[:, None, :]
    side = tl.arange(0, 2)[None, :, None]
    up = tl.where(side == 0, lo, hi)
    down = tl.where(side == 0, hi, lo)
    return tl.reshape(tl.where(tl.reshape(flip, shape) != 0, down, up), x.shape)


@triton.jit
def _merge(x, stage: tl.constexpr, order: tl.constexpr, N_DIMS: tl.constexpr):
    """Sorts the bitonic runs of 2^stage along the last axis: ascending (order 0), descending
    (1), or alternating from run to run (2: the inner stages of a full sort)."""
    rows: tl.constexpr = x.shape[0]
    if order == 2:
        shape: tl.constexpr = [rows * 2 ** (N_DIMS - 1 - stage), 2, 2**stage]
        flip = tl.reshape(tl.broadcast_to(tl.arange(0, 2)[None, :, None], shape), x.shape)
    else:
        flip = tl.full(x.shape, order, tl.int32)
    for i in tl.static_range(stage):
        x = _compare_swap(x, flip, i + (N_DIMS - stage), N_DIMS)
    return x


@triton.jit
def _sort(x, descending: tl.constexpr, N_DIMS: tl.constexpr):
    """x [rows, 2^N_DIMS] sorted along its last axis (a bitonic sorting network)."""
    for stage in tl.static_range(1, N_DIMS + 1):
        x = _merge(x, stage, 2 if stage < N_DIMS else descending, N_DIMS)
    return x


@triton.jit
def _topk_kernel(Q, R, RN, OUT, N, M, D, SHIFT, IS_COSINE: tl.constexpr, ACC: tl.constexpr,
                 USE_DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                 KP: tl.constexpr, LOG_KP: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < N
    best = tl.full((BLOCK_M, KP), PACKED_MAX, tl.int64)
    worst = tl.full((BLOCK_M,), PACKED_MAX, tl.int64)  # the largest value kept per row
    for c0 in range(0, M, KP):
        cols = c0 + tl.arange(0, KP).to(tl.int64)
        packed = _packed_block(Q, R, RN, rows, rmask, cols, cols < M, D, SHIFT, IS_COSINE, ACC,
                               USE_DOT, PREC, BLOCK_M, KP, BLOCK_D)
        if tl.sum((tl.min(packed, axis=1) < worst).to(tl.int32), axis=0) > 0:
            # the KP smallest of two sorted lists: the elementwise minimum of one ascending
            # and one descending is a bitonic sequence holding them; one merge sorts it
            merged = tl.minimum(best, _sort(packed, 1, LOG_KP))
            best = _merge(merged, LOG_KP, 0, LOG_KP)
            worst = tl.max(best, axis=1)
    kp = tl.arange(0, KP)
    tl.store(OUT + rows[:, None] * KP + kp[None, :], best, mask=rmask[:, None])


@triton.jit
def _collect_kernel(Q, R, RN, BUF, COUNT, THRESHOLD, N, M, D, SHIFT, C0, CAP,
                    IS_COSINE: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
                    PREC: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Appends to each row's list BUF[row, COUNT[row]:] the packed values of references
    C0 .. C0 + TILE below THRESHOLD[row], in column order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < N
    threshold = tl.load(THRESHOLD + rows, mask=rmask, other=0)
    count = tl.load(COUNT + rows, mask=rmask, other=0).to(tl.int32)  # < CAP <= 2048
    for j0 in range(0, TILE, BLOCK_N):
        cols = C0 + j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        packed = _packed_block(Q, R, RN, rows, rmask, cols, cols < M, D, SHIFT, IS_COSINE, ACC,
                               USE_DOT, PREC, BLOCK_M, BLOCK_N, BLOCK_D)
        enter = rmask[:, None] & (packed < threshold[:, None])
        slot = count[:, None] + tl.cumsum(enter.to(tl.int32), axis=1) - 1
        tl.store(BUF + rows[:, None] * CAP + slot, packed, mask=enter)
        count += tl.sum(enter.to(tl.int32), axis=1)
    tl.store(COUNT + rows, count.to(tl.int64), mask=rmask)


def _config(kp: int, dtype: torch.dtype) -> dict:
    """Blocks and warps of a KP; ptxas may use every register (MAXNREG): at its own cap of
    128 per thread the sorting networks spilled 8-36 B (scripts/triton_aot.py)."""
    dot = use_dot_for(dtype)
    if not dot:
        block_d = 4 if kp <= 64 else 2
    elif dtype == torch.float32 and dot_precision(dtype) == "ieee" and kp >= 64:
        block_d = 16  # exact fp32 products run on the FMA units; tl.dot needs 16 at least
    else:
        block_d = 32
    return dict(BLOCK_D=block_d, num_warps=4 if kp <= 64 else 8, maxnreg=MAXNREG)


def _padded(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _exact_order(q: torch.Tensor, r: torch.Tensor, idx: torch.Tensor, metric: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances, indices) of the kept columns, from the rows' differences, sorted by
    (distance, index)."""
    n, k = idx.shape
    d = q.shape[1]
    dist = torch.empty(n, k, dtype=q.dtype, device=q.device)
    step = max(1, EXACT_ROWS_CHUNK // max(1, k * d))
    r_zero = r.square().sum(1) == 0 if metric == "cosine" else None
    for r0 in range(0, n, step):
        qs = q[r0:r0 + step]
        sel = idx[r0:r0 + step]
        sq = (qs[:, None, :] - r[sel]).square().sum(-1)
        if metric == "euclidean":
            sq = sq.sqrt()
        elif metric == "cosine":
            zero = (qs.square().sum(1) == 0)[:, None] | r_zero[sel]
            sq = torch.where(zero, torch.ones_like(sq), sq / 2)
        dist[r0:r0 + step] = sq
    by_index = torch.sort(idx, dim=1).indices
    dist, idx = dist.gather(1, by_index), idx.gather(1, by_index)
    order = torch.sort(dist, dim=1, stable=True).indices
    return dist.gather(1, order), idx.gather(1, order)


def _collected(q: torch.Tensor, r: torch.Tensor, rn: torch.Tensor, kk: int, metric: str,
               shift: int, acc) -> torch.Tensor:
    """The columns [N, K] of each row's K smallest packed values (_collect_kernel's path)."""
    n, m = q.shape[0], r.shape[0]
    cap = kk + DEEP_REF_TILE
    buf = torch.full((n, cap), PACKED_MAX_INT, dtype=torch.int64, device=q.device)
    count = torch.zeros(n, dtype=torch.int64, device=q.device)
    threshold = torch.full((n,), PACKED_MAX_INT, dtype=torch.int64, device=q.device)
    cfg = _config(DEEP_BLOCK_N, q.dtype)
    grid = (triton.cdiv(n, DEEP_BLOCK_M),)
    for c0 in range(0, m, DEEP_REF_TILE):
        _collect_kernel[grid](q, r, rn, buf, count, threshold, n, m, q.shape[1], shift, c0, cap,
                              IS_COSINE=metric == "cosine", ACC=acc,
                              USE_DOT=use_dot_for(q.dtype), PREC=dot_precision(q.dtype),
                              TILE=DEEP_REF_TILE, BLOCK_M=DEEP_BLOCK_M, BLOCK_N=DEEP_BLOCK_N,
                              BLOCK_D=cfg["BLOCK_D"], **launch_options(cfg))
        # the K smallest first (the slots after a row's entries hold PACKED_MAX)
        kept = torch.topk(buf, kk, dim=1, largest=False, sorted=True).values
        buf[:, :kk] = kept
        buf[:, kk:] = PACKED_MAX_INT
        count.clamp_(max=kk)
        threshold = kept[:, kk - 1].contiguous()  # PACKED_MAX while fewer than K are kept
    # in a run every kept slot holds a column (K <= the references a row has); the clamp only
    # acts when scripts/triton_aot.py compiles the launches without running them, so that the
    # gathers after it read valid rows then too
    return (buf[:, :kk] & 0xFFFFFFFF).clamp_(max=m - 1)


def nearest_neighbors(query: torch.Tensor, reference: torch.Tensor, k: int, metric: str,
                      self_offset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances [N, K], indices [N, K]), K = neighbor_count(k, M, self_offset) <=
    DEEP_MAX_NEIGHBORS (in registers up to MAX_NEIGHBORS, beyond in global memory); float32 /
    float64 rows, cosine rows unit (or zero)."""
    n, m = query.shape[0], reference.shape[0]
    kk = neighbor_count(k, m, self_offset)
    if kk > DEEP_MAX_NEIGHBORS:
        raise ValueError(f"nearest_neighbors: the Triton kernel keeps at most "
                         f"{DEEP_MAX_NEIGHBORS} neighbours per query, {kk} were asked "
                         "(backend='cpu' on CPU tensors, or backend='reference', keeps any "
                         "number)")
    if n == 0 or kk == 0:
        return (query.new_empty(n, kk), torch.empty(n, kk, dtype=torch.long, device=query.device))
    q, r = query.contiguous(), reference.contiguous()
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    rn = r.square().sum(1) if metric != "cosine" else r.new_empty(0)
    shift = self_offset if self_offset is not None else m
    if kk > MAX_NEIGHBORS:
        return _exact_order(q, r, _collected(q, r, rn, kk, metric, shift, acc), metric)
    kp = _padded(kk)
    cfg = _config(kp, q.dtype)
    # zeros, not empty: the kernel writes every entry, but scripts/triton_aot.py compiles the
    # launch without running it, and the gathers below must read valid indices then too
    out = torch.zeros(n, kp, dtype=torch.int64, device=q.device)
    grid = (triton.cdiv(n, BLOCK_M),)
    _topk_kernel[grid](q, r, rn, out, n, m, q.shape[1], shift, IS_COSINE=metric == "cosine",
                       ACC=acc, USE_DOT=use_dot_for(q.dtype), PREC=dot_precision(q.dtype),
                       BLOCK_M=BLOCK_M, KP=kp, LOG_KP=kp.bit_length() - 1,
                       BLOCK_D=cfg["BLOCK_D"], **launch_options(cfg))
    idx = out[:, :kk] & 0xFFFFFFFF
    return _exact_order(q, r, idx, metric)

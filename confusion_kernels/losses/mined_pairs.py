"""The pair losses on mined pairs only: O(pairs * D) time and memory, any device, autograd.

A miner's ``indices_tuple`` lists pairs: (a1, p, a2, n) (positives (a1[k], p[k]), negatives
(a2[k], n[k])), or triplets (a, p, n), which PML reads as the pairs (a, p) and (a, n). As in
pytorch-metric-learning, Contrastive and NT-Xent count a pair as often as it is listed, while
SupCon and Multi-Similarity, which PML computes from masks, count each distinct pair once.
Per-anchor reductions (log-sum-exps) run as scatter reductions over the listed pairs; nothing
of size N x M is formed. The formulas are those of ``reference.pair_losses``.
"""

from __future__ import annotations

import torch

from ..reference.pair_losses import mean_nonzero


def check_indices_tuple(indices_tuple, n: int, m: int, who: str = "") -> tuple[torch.Tensor, ...]:
    """(a1, p, a2, n) as int64 from a miner's pairs (a1, p, a2, n) or triplets (a, p, n) (PML's
    convert_to_pairs), after checking them: 1-D integer tensors, the anchors within the n
    embeddings and the others within the m reference rows, partners of equal length. ``who``
    prefixes the messages (the caller's name)."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError(f"{who}indices_tuple must be (anchors, positives, negatives) or "
                         f"(anchors1, positives, anchors2, negatives), got {type(indices_tuple)}")
    anchors = (0,) if len(indices_tuple) == 3 else (0, 2)
    for k, t in enumerate(indices_tuple):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() \
                or t.dtype == torch.bool:
            raise ValueError(f"{who}indices_tuple[{k}] must be a 1-D integer tensor")
        bound, what = (n, "embeddings") if k in anchors else (m, "reference rows")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
            raise ValueError(f"{who}indices_tuple[{k}] indexes outside the {bound} {what} "
                             f"(values in [{int(t.min())}, {int(t.max())}])")
    pairs = tuple(t.to(torch.int64) for t in indices_tuple)
    if len(pairs) == 3:
        pairs = (pairs[0], pairs[1], pairs[0], pairs[2])
    if pairs[0].shape != pairs[1].shape or pairs[2].shape != pairs[3].shape:
        raise ValueError(f"{who}indices_tuple's anchors and partners differ in length")
    return pairs


def pair_values(x: torch.Tensor, ref: torch.Tensor, a: torch.Tensor, j: torch.Tensor,
                metric: str) -> torch.Tensor:
    """m of the listed pairs: |x_a - r_j| from differences (exact), or x_a . r_j."""
    if metric == "cosine":
        return (x[a] * ref[j]).sum(1)
    return torch.linalg.vector_norm(x[a] - ref[j], dim=1)


def _distinct(a: torch.Tensor, j: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = torch.unique(a * m + j)
    return key // m, key % m


def _segment_lse(v: torch.Tensor, seg: torch.Tensor, n: int, add_one: bool) -> torch.Tensor:
    """log(sum_{k: seg[k] = i} e^v[k] (+ 1)) per i < n; -inf (0 with add_one) for none."""
    floor = torch.zeros(n, dtype=v.dtype, device=v.device) if add_one else \
        torch.full((n,), float("-inf"), dtype=v.dtype, device=v.device)
    top = floor.scatter_reduce(0, seg, v.detach(), "amax", include_self=add_one)
    safe = torch.where(torch.isfinite(top), top, 0.0)
    total = torch.zeros(n, dtype=v.dtype, device=v.device).index_add(0, seg, (v - safe[seg]).exp())
    if add_one:
        total = total + (-safe).exp()
    return torch.where(total > 0, safe + total.log(), float("-inf"))


def contrastive_parts(x, ref, pairs, metric, sign, pos_margin, neg_margin):
    a1, p, a2, n = pairs
    pos = torch.relu(sign * (pair_values(x, ref, a1, p, metric) - pos_margin))
    neg = torch.relu(sign * (neg_margin - pair_values(x, ref, a2, n, metric)))
    return mean_nonzero(pos), mean_nonzero(neg)


def supcon(x, ref, pairs, metric, sign, temperature):
    a1, p, a2, n = pairs
    m = ref.shape[0]
    (pa, pj), (na, nj) = _distinct(a1, p, m), _distinct(a2, n, m)
    if pa.numel() == 0 or na.numel() == 0:
        return x.sum() * 0.0
    zp = -sign * pair_values(x, ref, pa, pj, metric) / temperature
    zn = -sign * pair_values(x, ref, na, nj, metric) / temperature
    rows = x.shape[0]
    lse = _segment_lse(torch.cat([zp, zn]), torch.cat([pa, na]), rows, add_one=False)
    count = torch.zeros(rows, dtype=x.dtype, device=x.device).index_add(0, pa, torch.ones_like(zp))
    total = torch.zeros(rows, dtype=x.dtype, device=x.device).index_add(0, pa, zp)
    per_row = torch.where(count > 0, lse - total / count.clamp_min(1), 0.0)
    return mean_nonzero(per_row)


def ntxent(x, ref, pairs, metric, sign, temperature):
    a1, p, a2, n = pairs
    if a1.numel() == 0 or a2.numel() == 0:
        return x.sum() * 0.0
    zp = -sign * pair_values(x, ref, a1, p, metric) / temperature
    zn = -sign * pair_values(x, ref, a2, n, metric) / temperature
    neg_lse = _segment_lse(zn, a2, x.shape[0], add_one=False)[a1]
    return (torch.logaddexp(zp, neg_lse) - zp).mean()


def multi_similarity(x, ref, pairs, metric, sign, alpha, beta, base):
    a1, p, a2, n = pairs
    m, rows = ref.shape[0], x.shape[0]
    (pa, pj), (na, nj) = _distinct(a1, p, m), _distinct(a2, n, m)
    pos = _segment_lse(alpha * sign * (pair_values(x, ref, pa, pj, metric) - base), pa, rows,
                       add_one=True)
    neg = _segment_lse(beta * sign * (base - pair_values(x, ref, na, nj, metric)), na, rows,
                       add_one=True)
    return (pos / alpha + neg / beta).mean()

"""Reference pair losses in pytorch-metric-learning's (PML's) form: Contrastive, SupCon,
NT-Xent and Multi-Similarity, from the dense N x M pair matrix and its masks (docs/math.md,
"Pair losses").

The pair matrix compares embeddings x [N, D] with references r [M, D] (r = x when none are
given; then each pair (i, i) is left out):

- ``metric="euclidean"``: mat_ij = |x̂_i - r̂_j|_2, a distance (PML's ``LpDistance()``; x̂ = x/|x|
  with ``normalize=True``, its default, else x̂ = x);
- ``metric="cosine"``: mat_ij = x̂_i · r̂_j, a similarity (PML's ``CosineSimilarity()``).

ς = +1 for a distance and -1 for a similarity: PML's ``distance.margin(a, b)`` is ς (a - b).
P_i / Q_i are the positive (same label) / negative (other label) references of row i, or the
mined pairs of an ``indices_tuple`` (a1, p, a2, n). With z_ij = -ς mat_ij / τ (a similarity):

- contrastive: l+_ij = relu(ς (mat_ij - m+)) on P, l-_ij = relu(ς (m- - mat_ij)) on Q; the loss is
  the mean of the non-zero l+ plus the mean of the non-zero l- (each 0 when none is non-zero),
  PML's ``AvgNonZeroReducer`` per sub-loss.
- supcon: L_i = logsumexp_{j in P_i u Q_i} z_ij - mean_{j in P_i} z_ij (0 when P_i is empty); the
  loss is the mean of the L_i > 0 (``AvgNonZeroReducer``), 0 when no pair is positive or none
  negative.
- ntxent: per positive pair, l_ij = -log(e^z_ij / (e^z_ij + sum_{k in Q_i} e^z_ik)); the loss is
  their mean (``MeanReducer``), 0 when no pair is positive or none negative.
- multi_similarity: L_i = (1/α) log(1 + sum_{j in P_i} e^{α ς (mat_ij - base)})
  + (1/β) log(1 + sum_{k in Q_i} e^{β ς (base - mat_ik)}); the loss is the mean over the N rows.

PML adds a tiny constant in two places (SupCon: |P_i| + tiny; NT-Xent: log(ratio + tiny));
these definitions leave it out: it changes a float64 value by about 1e-308.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .pairwise import _upcast

PAIR_METRICS = ("euclidean", "cosine")
# The fused kernels' per-row layout (every backend's pair_loss_stats op; pair_loss_math.h):
# the outputs with a gradient per row (contrastive: the sums of l+ and l-; the others the
# row's loss) and the statistics per row (kPairLossStats).
PAIR_LOSS_OUTPUTS = {"contrastive": 2, "supcon": 1, "ntxent": 1, "multi_similarity": 1}
PAIR_LOSS_STATS = 4


class PairSetup(NamedTuple):
    """The pair matrix, its masks, ς (+1: distance, -1: similarity) and, for mined pairs, the
    pair lists (a1, p, a2, n) with their repeats (a triplet miner repeats pairs)."""

    mat: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    sign: float
    pairs: tuple[torch.Tensor, ...] | None = None


def pair_setup(x: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor | None = None,
               ref_labels: torch.Tensor | None = None, *, metric: str = "euclidean",
               normalize: bool = True,
               indices_tuple: tuple[torch.Tensor, ...] | None = None) -> PairSetup:
    """mat [N, M] and the positive / negative masks: all pairs by label (no (i, i) without a
    reference), or exactly the pairs of ``indices_tuple`` = (a1, p, a2, n). The losses PML
    computes per pair (contrastive, NT-Xent) count a mined pair as often as it is listed; those
    it computes from the masks (SupCon, Multi-Similarity) once."""
    if metric not in PAIR_METRICS:
        raise ValueError(f"metric must be one of {PAIR_METRICS}, got {metric!r}")
    x = _upcast(x)
    self_pairs = ref is None
    if ref is None:
        ref, ref_labels = x, labels
    ref = _upcast(ref)
    if metric == "cosine" or normalize:
        x = torch.nn.functional.normalize(x, dim=1)
        ref = x if self_pairs else torch.nn.functional.normalize(ref, dim=1)
    if metric == "cosine":
        mat, sign = x @ ref.T, -1.0
    else:
        mat, sign = torch.cdist(x, ref, compute_mode="donot_use_mm_for_euclid_dist"), 1.0
    if indices_tuple is None:
        pos = labels[:, None] == ref_labels[None, :]
        neg = ~pos
        if self_pairs:
            pos = pos & ~torch.eye(*mat.shape, dtype=torch.bool, device=mat.device)
    else:
        a1, p, a2, n = indices_tuple
        pos = torch.zeros(mat.shape, dtype=torch.bool, device=mat.device)
        neg = torch.zeros_like(pos)
        pos[a1, p] = True
        neg[a2, n] = True
        return PairSetup(mat, pos, neg, sign, (a1, p, a2, n))
    return PairSetup(mat, pos, neg, sign)


def mean_nonzero(losses: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the losses > 0 (where ``mask``), 0 when there are none; no host sync."""
    kept = losses > 0 if mask is None else mask & (losses > 0)
    return torch.where(kept, losses, 0.0).sum() / kept.sum().clamp_min(1)


def _masked_logsumexp(z: torch.Tensor, mask: torch.Tensor, add_one: bool) -> torch.Tensor:
    """log(sum_{mask} e^z (+ 1)) per row; 0 for a row with an empty mask."""
    z = z.masked_fill(~mask, float("-inf"))
    if add_one:
        z = torch.cat([z, z.new_zeros(z.shape[0], 1)], dim=1)
    out = torch.logsumexp(z, dim=1)
    return torch.where(mask.any(dim=1), out, out.new_zeros(()))


def contrastive_parts(setup: PairSetup, *, pos_margin: float = 0.0,
                      neg_margin: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of the non-zero relu(ς (mat - m+)) over P, mean of the non-zero
    relu(ς (m- - mat)) over Q)."""
    mat, pos, neg, sign, pairs = setup
    if pairs is not None:  # each listed pair, repeats included
        pos_loss = torch.relu(sign * (mat[pairs[0], pairs[1]] - pos_margin))
        neg_loss = torch.relu(sign * (neg_margin - mat[pairs[2], pairs[3]]))
        return mean_nonzero(pos_loss), mean_nonzero(neg_loss)
    return (mean_nonzero(torch.relu(sign * (mat - pos_margin)), pos),
            mean_nonzero(torch.relu(sign * (neg_margin - mat)), neg))


def contrastive_loss(setup: PairSetup, *, pos_margin: float = 0.0,
                     neg_margin: float = 1.0) -> torch.Tensor:
    """The sum of the two parts of ``contrastive_parts``."""
    pos, neg = contrastive_parts(setup, pos_margin=pos_margin, neg_margin=neg_margin)
    return pos + neg


def supcon_rows(setup: PairSetup, *, temperature: float = 0.1) -> torch.Tensor:
    """L_i = logsumexp_{P_i u Q_i} z_i. - mean_{P_i} z_i. (0 where P_i is empty)."""
    mat, pos, neg, sign, _ = setup
    z = -sign * mat / temperature
    lse = _masked_logsumexp(z, pos | neg, add_one=False)
    count = pos.sum(dim=1)
    mean_pos = torch.where(pos, z, 0.0).sum(dim=1) / count.clamp_min(1)
    return torch.where(count > 0, lse - mean_pos, lse.new_zeros(()))


def supcon_loss(setup: PairSetup, *, temperature: float = 0.1) -> torch.Tensor:
    """mean of the L_i > 0; 0 when no pair is positive or none negative."""
    both = setup.pos.any() & setup.neg.any()
    return torch.where(both, mean_nonzero(supcon_rows(setup, temperature=temperature)), 0.0)


def ntxent_pairs(setup: PairSetup, *, temperature: float = 0.07) -> torch.Tensor:
    """l_ij = log(e^z_ij + sum_{Q_i} e^z_ik) - z_ij: [N, M] (0 off the positive pairs), or for
    mined pairs one per listed positive pair, each negative counted as often as it is listed."""
    mat, pos, neg, sign, pairs = setup
    z = -sign * mat / temperature
    if pairs is None:
        neg_lse = torch.logsumexp(z.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)
        return torch.where(pos, torch.logaddexp(z, neg_lse) - z, 0.0)
    a1, p, a2, n = pairs
    repeats = torch.zeros_like(z).index_put_((a2, n), torch.ones_like(z[a2, n]), accumulate=True)
    listed = (z + repeats.clamp_min(1).log()).masked_fill(repeats == 0, float("-inf"))
    neg_lse = torch.logsumexp(listed, dim=1, keepdim=True)
    return (torch.logaddexp(z, neg_lse) - z)[a1, p]


def ntxent_loss(setup: PairSetup, *, temperature: float = 0.07) -> torch.Tensor:
    """mean over positive pairs of l_ij; 0 when no pair is positive or none negative."""
    both = setup.pos.any() & setup.neg.any()
    per_pair = ntxent_pairs(setup, temperature=temperature)
    count = setup.pos.sum() if setup.pairs is None else per_pair.new_tensor(per_pair.numel())
    return torch.where(both, per_pair.sum() / count.clamp_min(1), 0.0)


def multi_similarity_rows(setup: PairSetup, *, alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5) -> torch.Tensor:
    """L_i = (1/α) log(1 + sum_P e^{α ς (mat - base)}) + (1/β) log(1 + sum_Q e^{β ς (base - mat)})."""
    mat, pos, neg, sign, _ = setup
    pos_term = _masked_logsumexp(alpha * sign * (mat - base), pos, add_one=True) / alpha
    neg_term = _masked_logsumexp(beta * sign * (base - mat), neg, add_one=True) / beta
    return pos_term + neg_term


def multi_similarity_loss(setup: PairSetup, *, alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5) -> torch.Tensor:
    """mean over the N rows of L_i."""
    return multi_similarity_rows(setup, alpha=alpha, beta=beta, base=base).mean()

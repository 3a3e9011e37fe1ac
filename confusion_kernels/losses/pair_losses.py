"""Pair losses in pytorch-metric-learning's (PML's) form, with O((N + M) D) memory on the fused
backends: ``contrastive_loss``, ``supcon_loss``, ``ntxent_loss``, ``multi_similarity_loss``
(docs/math.md, "Pair losses"; readable definitions in ``reference.pair_losses``).

Each takes ``embeddings`` [N, D] and ``labels`` [N], optionally a reference set ``ref_emb``
[M, D] with ``ref_labels`` [M] (PML's ``ref_emb``; without it the embeddings are their own
references and each pair (i, i) is left out), and returns the value PML's class gives with its
default reducer: ``metric="euclidean"`` is PML's ``LpDistance(normalize_embeddings=normalize)``,
``metric="cosine"`` its ``CosineSimilarity()``.

``indices_tuple`` (a miner's pairs (a1, p, a2, n) or triplets (a, p, n)): the loss of the listed
pairs only, O(pairs * D) on any device (``mined_pairs``), as PML computes it from them.

Backends: ``reference`` (the dense N x M definition), and fused with O((N + M) D) memory:
``cpu`` (C++), ``triton`` and ``cuda`` (CUDA C++ kernels with cuBLAS Gram tiles; what
``backend="auto"`` runs on a GPU): per-row statistics streamed over reference tiles, the
backward recomputing them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._routing import route
from .._validation import (
    autocast_off,
    check_all_finite,
    check_embeddings,
    check_labels,
    names_errors,
    output_dtype,
    scan_finite,
)
from ..ops.pair_losses import pair_loss_rows
from . import mined_pairs as _mined
from ..reference import pair_losses as _reference

PAIR_METRICS = _reference.PAIR_METRICS


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_number(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _inputs(embeddings, labels, ref_emb, ref_labels, metric, normalize, check_finite):
    """Checked, normalised (where the distance normalises) and upcast rows and references."""
    check_embeddings(embeddings, "embeddings", check_finite=False)
    if metric not in PAIR_METRICS:
        raise ValueError(f"metric must be one of {PAIR_METRICS}, got {metric!r}")
    if scan_finite(check_finite, embeddings):
        check_all_finite(embeddings, "embeddings")
    labels = check_labels(labels, embeddings.shape[0], embeddings.device)
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels go together: give both or neither")
    if ref_emb is not None:
        check_embeddings(ref_emb, "ref_emb", check_finite=False, count="M")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(f"ref_emb has D = {ref_emb.shape[1]} but the embeddings have "
                             f"D = {embeddings.shape[1]}")
        if ref_emb.device != embeddings.device:
            raise ValueError(f"ref_emb is on {ref_emb.device} but the embeddings are on "
                             f"{embeddings.device}")
        if scan_finite(check_finite, ref_emb):
            check_all_finite(ref_emb, "ref_emb")
        ref_labels = check_labels(ref_labels, ref_emb.shape[0], embeddings.device, "ref_labels")
    dtype = torch.promote_types(output_dtype(embeddings.dtype),
                                output_dtype(embeddings.dtype if ref_emb is None
                                             else ref_emb.dtype))
    x = embeddings.to(dtype)
    ref = None if ref_emb is None else ref_emb.to(dtype)
    if metric == "cosine" or normalize:
        x = torch.nn.functional.normalize(x, dim=1)
        ref = None if ref is None else torch.nn.functional.normalize(ref, dim=1)
    return x, labels, ref, ref_labels


def _pair_counts(labels, ref_labels, self_pairs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive pairs, negative pairs) as 0-d tensors from sorted labels, O((N + M) log M);
    no host sync."""
    ref_labels = labels if ref_labels is None else ref_labels
    ordered = torch.sort(ref_labels).values
    same = (torch.searchsorted(ordered, labels, right=True)
            - torch.searchsorted(ordered, labels)).sum()
    pairs = labels.shape[0] * ref_labels.shape[0]
    return same - (labels.shape[0] if self_pairs else 0), pairs - same


class _Batch(NamedTuple):
    """A checked call: rows, references (None: the rows themselves), pair counts, route."""

    x: torch.Tensor
    labels: torch.Tensor
    ref: torch.Tensor | None
    ref_labels: torch.Tensor | None
    positives: torch.Tensor  # 0-d counts
    negatives: torch.Tensor
    backend: str
    metric: str

    def value(self, loss: torch.Tensor, *, needs_both: bool = False) -> torch.Tensor:
        """``loss``, or 0 where PML's GenericPairLoss gives 0 (at most one pair of each kind;
        with ``needs_both``, SupCon's and NT-Xent's rule: no positive or no negative pair)."""
        zero = (self.positives <= 1) & (self.negatives <= 1)
        if needs_both:
            zero = zero | (self.positives == 0) | (self.negatives == 0)
        return torch.where(zero, 0.0, loss)

    def setup(self) -> _reference.PairSetup:
        # the rows are normalised already where the distance normalises
        return _reference.pair_setup(self.x, self.labels, self.ref, self.ref_labels,
                                     metric=self.metric, normalize=False)

    @property
    def refs(self) -> torch.Tensor:
        return self.x if self.ref is None else self.ref

    @property
    def sign(self) -> float:
        """ς: +1 for a distance, -1 for a similarity."""
        return -1.0 if self.metric == "cosine" else 1.0

    def mined_pairs(self, indices_tuple) -> tuple[torch.Tensor, ...] | None:
        """The checked pairs (a1, p, a2, n) of ``indices_tuple``, or None where PML gives 0
        (at most one entry in each index list)."""
        pairs = _mined.check_indices_tuple(indices_tuple, self.x.shape[0], self.refs.shape[0])
        return None if all(t.numel() <= 1 for t in pairs) else pairs

    def on_mined(self, indices_tuple, loss, *params) -> torch.Tensor:
        """``loss`` (a function of ``mined_pairs``) of the listed pairs, or PML's 0."""
        pairs = self.mined_pairs(indices_tuple)
        if pairs is None:
            return self.x.sum() * 0.0
        return loss(self.x, self.refs, pairs, self.metric, self.sign, *params)

    def fused(self, loss: str, params: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        own = self.ref is None
        return pair_loss_rows(self.x, self.labels, self.refs,
                              self.labels if own else self.ref_labels, 0 if own else None,
                              loss, params, self.metric, backend=self.backend)


def _batch(embeddings, labels, ref_emb, ref_labels, metric, normalize, backend,
           check_finite) -> _Batch:
    x, labels, ref, ref_labels = _inputs(embeddings, labels, ref_emb, ref_labels, metric,
                                         normalize, check_finite)
    chosen = route("pair_loss", x, backend, metric=metric)
    pos, neg = _pair_counts(labels, ref_labels, ref is None)
    return _Batch(x, labels, ref, ref_labels, pos, neg, chosen.backend, metric)


@names_errors("contrastive_loss")
@autocast_off
def contrastive_parts(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_margin=0.0,
                      neg_margin=1.0, metric="euclidean", normalize=True, backend="auto",
                      check_finite=None, indices_tuple=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sub-losses of ``contrastive_loss`` (their sum): the mean of the non-zero
    positive-pair hinges and that of the non-zero negative-pair hinges."""
    params = [_check_number("pos_margin", pos_margin), _check_number("neg_margin", neg_margin)]
    b = _batch(embeddings, labels, ref_emb, ref_labels, metric, normalize, backend, check_finite)
    if indices_tuple is not None:
        pairs = b.mined_pairs(indices_tuple)
        if pairs is None:
            return b.x.sum() * 0.0, b.x.sum() * 0.0
        return _mined.contrastive_parts(b.x, b.refs, pairs, metric, b.sign, *params)
    if b.backend == "reference":
        pos, neg = _reference.contrastive_parts(b.setup(), pos_margin=params[0],
                                                neg_margin=params[1])
    else:
        rows, stats = b.fused("contrastive", params)
        pos = rows[:, 0].sum() / stats[:, 1].sum().clamp_min(1)
        neg = rows[:, 1].sum() / stats[:, 3].sum().clamp_min(1)
    return b.value(pos), b.value(neg)


@names_errors("contrastive_loss")
@autocast_off
def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor,
                     ref_emb: torch.Tensor | None = None, ref_labels: torch.Tensor | None = None,
                     *, pos_margin: float = 0.0, neg_margin: float = 1.0,
                     metric: str = "euclidean", normalize: bool = True, backend: str = "auto",
                     check_finite: bool | None = None,
                     indices_tuple: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """PML's ContrastiveLoss(pos_margin, neg_margin) with its AvgNonZeroReducer:
    mean of the non-zero max(0, ς(m - m+)) over positive pairs + mean of the non-zero
    max(0, ς(m- - m)) over negative pairs (ς = +1 for the euclidean distance, -1 for cosine)."""
    pos, neg = contrastive_parts(embeddings, labels, ref_emb, ref_labels, pos_margin=pos_margin,
                                 neg_margin=neg_margin, metric=metric, normalize=normalize,
                                 backend=backend, check_finite=check_finite,
                                 indices_tuple=indices_tuple)
    return pos + neg


@names_errors("supcon_loss")
@autocast_off
def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor,
                ref_emb: torch.Tensor | None = None, ref_labels: torch.Tensor | None = None, *,
                temperature: float = 0.1, metric: str = "cosine", normalize: bool = True,
                backend: str = "auto", check_finite: bool | None = None,
                indices_tuple: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """PML's SupConLoss(temperature) with its AvgNonZeroReducer: the mean of the
    L_i = logsumexp_{P u Q} z_i. - mean_P z_i. that are > 0 (z = -ς m / τ); 0 without a
    positive or without a negative pair."""
    params = [_check_positive("temperature", temperature)]
    b = _batch(embeddings, labels, ref_emb, ref_labels, metric, normalize, backend, check_finite)
    if indices_tuple is not None:
        return b.on_mined(indices_tuple, _mined.supcon, params[0])
    if b.backend == "reference":
        return b.value(_reference.supcon_loss(b.setup(), temperature=params[0]), needs_both=True)
    return b.value(_reference.mean_nonzero(b.fused("supcon", params)[0][:, 0]), needs_both=True)


@names_errors("ntxent_loss")
@autocast_off
def ntxent_loss(embeddings: torch.Tensor, labels: torch.Tensor,
                ref_emb: torch.Tensor | None = None, ref_labels: torch.Tensor | None = None, *,
                temperature: float = 0.07, metric: str = "cosine", normalize: bool = True,
                backend: str = "auto", check_finite: bool | None = None,
                indices_tuple: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """PML's NTXentLoss(temperature) with its MeanReducer: the mean over positive pairs of
    log(e^z_ij + sum_{Q_i} e^z_ik) - z_ij (z = -ς m / τ); 0 without a positive or without a
    negative pair."""
    params = [_check_positive("temperature", temperature)]
    b = _batch(embeddings, labels, ref_emb, ref_labels, metric, normalize, backend, check_finite)
    if indices_tuple is not None:
        return b.on_mined(indices_tuple, _mined.ntxent, params[0])
    if b.backend == "reference":
        return b.value(_reference.ntxent_loss(b.setup(), temperature=params[0]), needs_both=True)
    total = b.fused("ntxent", params)[0][:, 0].sum()
    return b.value(total / b.positives.clamp_min(1), needs_both=True)


@names_errors("multi_similarity_loss")
@autocast_off
def multi_similarity_loss(embeddings: torch.Tensor, labels: torch.Tensor,
                          ref_emb: torch.Tensor | None = None,
                          ref_labels: torch.Tensor | None = None, *, alpha: float = 2.0,
                          beta: float = 50.0, base: float = 0.5, metric: str = "cosine",
                          normalize: bool = True, backend: str = "auto",
                          check_finite: bool | None = None,
                          indices_tuple: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """PML's MultiSimilarityLoss(alpha, beta, base) with its MeanReducer: the mean over rows of
    (1/α) log(1 + sum_P e^{α ς (m - base)}) + (1/β) log(1 + sum_Q e^{β ς (base - m)})."""
    params = [_check_positive("alpha", alpha), _check_positive("beta", beta),
              _check_number("base", base)]
    b = _batch(embeddings, labels, ref_emb, ref_labels, metric, normalize, backend, check_finite)
    if indices_tuple is not None:
        return b.on_mined(indices_tuple, _mined.multi_similarity, *params)
    if b.backend == "reference":
        return b.value(_reference.multi_similarity_loss(b.setup(), alpha=params[0],
                                                        beta=params[1], base=params[2]))
    return b.value(b.fused("multi_similarity", params)[0][:, 0].mean())

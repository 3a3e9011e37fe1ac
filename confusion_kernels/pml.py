"""Drop-in losses for pytorch-metric-learning (PML) code.

``pml.ASLoss``, ``pml.AffinityLoss`` and ``pml.NCentroidsLoss`` subclass PML's
``BaseMetricLossFunction``: they take our constructor arguments (plus PML's ``reducer=`` and
``embedding_regularizer=``) and are called as every PML loss is,
``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``, so miners,
reducers, ``CrossBatchMemory`` and ``DistributedLossWrapper`` work with them.

**ASLoss** returns three sub-losses, each reduced by the reducer (PML's ``MultipleReducers``)
and then summed: ``inner_loss`` = λ_in · d(a, p) over positive pairs, ``outer_loss`` =
−λ_out · d(a, n) over negative pairs, ``boundary_loss`` = λ_b · (|e_i| − R)² over the
embeddings. With the default ``MeanReducer`` this is ASLoss with ``reduction="pair_mean"``:

- no ``indices_tuple``: the fused kernels over all pairs, O(N·D) memory (``ref_emb``: the pairs
  (embedding, reference row), the rectangular op, as ``intra_inter_sums(ref=...)``);
- an ``indices_tuple`` from any miner (pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``): the
  distances of the mined pairs only, O(pairs·D), equal to the dense loss masked to those pairs.

Other reducers need per-pair losses: they run on mined pairs (an ``indices_tuple``); without
one the fused kernel never forms the N² pair losses, and the loss says so instead of forming
them. Reducers that drop losses by sign or threshold (``AvgNonZeroReducer``,
``ThresholdReducer``) would drop the outer term, which is negative by design, and are refused.
A PML ``distance=`` is refused too: ``metric=`` chooses the distance the kernels fuse.

**AffinityLoss / NCentroidsLoss** compare embeddings with learned prototypes / EMA centroids,
not with each other: ``indices_tuple`` and ``ref_emb`` do not apply and are refused. With the
mean reducer they run fused (the loss is already a mean over the embeddings); PML's other
reducers get the per-embedding losses (``reduction="none"``: NCentroidsLoss's L_i;
AffinityLoss's hinge L_i, with its diversity regularizer as a second, already reduced
sub-loss).

docs/pml.md compares these with our own ``memory=`` and ``global_batch=True``.
"""

from __future__ import annotations

import warnings

import torch

try:
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning.losses import BaseMetricLossFunction
    from pytorch_metric_learning.reducers import (
        AvgNonZeroReducer,
        MeanReducer,
        MultipleReducers,
        ThresholdReducer,
    )
except ImportError as exc:  # pragma: no cover - the optional dependency is missing
    raise ImportError("confusion_kernels.pml needs pytorch-metric-learning: "
                      "pip install pytorch-metric-learning (or the 'pml' extra)") from exc

from ._metrics import resolve_metric
from ._validation import output_dtype
from .losses import affinity as _affinity
from .losses import n_centroids as _n_centroids
from .losses import pair_losses as _pair_losses
from .losses.mined_pairs import check_indices_tuple
from .losses.as_loss import REDUCTIONS, as_loss_terms, radial_terms, term_weights
from .ops.intra_inter_sums import intra_inter_sums
from .reference.pairwise import paired_distances

__all__ = ["ASLoss", "AffinityLoss", "ContrastiveLoss", "CrossBatchMemory",
           "MultiSimilarityLoss", "NCentroidsLoss", "NTXentLoss", "SupConLoss"]

_SIGN_FILTERS = (AvgNonZeroReducer, ThresholdReducer)


def _refuse_distance(name: str, kwargs: dict) -> None:
    if kwargs.get("distance") is not None:
        raise ValueError(f"{name}: distance={type(kwargs['distance']).__name__}() cannot be fused; "
                         "the metric= argument chooses the distance")


def _reducers(module) -> list:
    reducer = module.reducer
    if isinstance(reducer, MultipleReducers):
        return [*reducer.reducers.values(), reducer.default_reducer]
    return [reducer]


def _all_means(module) -> bool:
    """Whether every reducer of ``module`` is PML's plain MeanReducer (the fused forms)."""
    return all(type(r) is MeanReducer for r in _reducers(module))


def _already_reduced(value: torch.Tensor) -> dict:
    return {"losses": value, "indices": None, "reduction_type": "already_reduced"}


def _per_element(losses: torch.Tensor) -> dict:
    """Per-embedding losses [N] for PML's reducer."""
    return {"losses": losses, "reduction_type": "element",
            "indices": torch.arange(losses.shape[0], device=losses.device)}


def _check_labels(name: str, labels, n: int, what: str = "labels") -> None:
    if labels is None:
        raise ValueError(f"{name}: {what} are needed")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name}: {what} must be 1-D of length {n}, got shape "
                         f"{tuple(labels.shape)}")


class ASLoss(BaseMetricLossFunction):
    """ASLoss as a PML loss: ``loss(embeddings, labels, indices_tuple=None, ref_emb=None,
    ref_labels=None)`` (module docstring). The arguments are those of
    ``confusion_kernels.ASLoss`` (one embeddings tensor: no ``layer_weights``), plus PML's
    ``reducer=`` and ``embedding_regularizer=``; ``global_batch`` and ``memory`` apply to the
    fused form (no ``indices_tuple``, no ``ref_emb``)."""

    def __init__(self, metric: str = "euclidean", *, lambda_inner: float = 1e-3,
                 lambda_outer: float = 1e-3, lambda_boundary: float = 1e-2,
                 constraint: float = 10.0, include_self: bool = False,
                 reduction: str = "pair_mean", dim_mean: bool = False, backend: str = "auto",
                 check_finite: bool | None = None, global_batch: bool = False, group=None,
                 memory=None, **kwargs) -> None:
        _refuse_distance("pml.ASLoss", kwargs)
        if reduction == "none":
            raise ValueError("pml.ASLoss: reduction='none': in PML the reducer decides (pass "
                             "reducer=DoNothingReducer() with a miner's pairs for per-pair "
                             "losses, or use confusion_kernels.as_loss(reduction='none'))")
        if reduction not in REDUCTIONS:
            raise ValueError(f"pml.ASLoss: unknown reduction {reduction!r}; expected one of "
                             f"{REDUCTIONS}")
        resolve_metric(metric, dim_mean)  # a clear error now, not at the first batch
        super().__init__(**kwargs)
        self.metric, self.dim_mean, self.constraint = metric, dim_mean, constraint
        self.lambda_inner, self.lambda_outer = lambda_inner, lambda_outer
        self.lambda_boundary, self.include_self, self.reduction = (lambda_boundary, include_self,
                                                                   reduction)
        self.backend, self.check_finite = backend, check_finite
        self.global_batch, self.group, self.memory = global_batch, group, memory
        for reducer in _reducers(self):
            if isinstance(reducer, _SIGN_FILTERS):
                raise ValueError(f"pml.ASLoss: reducer={type(reducer).__name__}() drops losses "
                                 "by their value, and ASLoss's outer sub-loss is negative by "
                                 "design (it rewards separation): it would be dropped")

    def _sub_loss_names(self):
        return ["inner_loss", "outer_loss", "boundary_loss"]

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None):
        """PML's forward, after checks that name the argument at fault (PML's own say only
        "Number of embeddings must equal number of labels")."""
        name = "pml.ASLoss"
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError(f"{name}: embeddings must be a 2-D [N, D] tensor")
        _check_labels(name, labels, embeddings.shape[0])
        if ref_emb is not None:
            if not isinstance(ref_emb, torch.Tensor) or ref_emb.dim() != 2 \
                    or ref_emb.shape[1] != embeddings.shape[1]:
                raise ValueError(f"{name}: ref_emb must be [M, {embeddings.shape[1]}], got "
                                 f"{tuple(getattr(ref_emb, 'shape', ()))}")
            _check_labels(name, ref_labels, ref_emb.shape[0], "ref_labels")
        elif ref_labels is not None:
            raise ValueError(f"{name}: ref_labels without ref_emb")
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """(after forward's checks; PML passes ref_emb = embeddings when none was given)"""
        name = "pml.ASLoss"
        own = ref_emb is embeddings
        if indices_tuple is None and _all_means(self):
            return self._fused_terms(embeddings, labels, None if own else ref_emb,
                                     None if own else ref_labels)
        if indices_tuple is None:
            other = next(r for r in _reducers(self) if type(r) is not MeanReducer)
            raise ValueError(f"{name}: reducer={type(other).__name__}() needs the loss of "
                             "every pair, which the fused kernel never forms (N² of them): pass "
                             "an indices_tuple (a miner's pairs or triplets), or keep the "
                             "default MeanReducer")
        return self._pair_terms(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _fused_terms(self, embeddings, labels, ref, ref_labels) -> dict:
        if ref is None:
            terms = as_loss_terms(
                embeddings, labels, metric=self.metric, constraint=self.constraint,
                include_self=self.include_self, reduction=self.reduction, dim_mean=self.dim_mean,
                backend=self.backend, check_finite=self.check_finite,
                global_batch=self.global_batch, group=self.group, memory=self.memory)
            inner, outer, boundary = terms
        else:
            if self.global_batch or self.memory is not None:
                raise ValueError("pml.ASLoss: ref_emb with global_batch or memory: the reference "
                                 "set is given, so neither applies")
            s_in, s_out = intra_inter_sums(embeddings, labels, self.metric, dim_mean=self.dim_mean,
                                           backend=self.backend, check_finite=self.check_finite,
                                           ref=ref, ref_labels=ref_labels)
            acc = s_in.dtype
            # every (embedding, reference row) pair counts, as in PML (include_self=True: a
            # reference set has no left-out diagonal)
            w_in, w_out = term_weights(labels.to(ref_labels.device), self.reduction, True, 1.0,
                                       acc, ref_labels)
            inner, outer = (w_in * s_in).sum(), (w_out * s_out).sum()
            boundary = radial_terms(embeddings, self.constraint, acc).mean()
        return {"inner_loss": _already_reduced(self.lambda_inner * inner),
                "outer_loss": _already_reduced(-self.lambda_outer * outer),
                "boundary_loss": _already_reduced(self.lambda_boundary * boundary)}

    def _pair_terms(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> dict:
        name = "pml.ASLoss"
        if self.reduction != "pair_mean":
            raise ValueError(f"{name}: reduction='class_mean' weighs pairs per class; mined "
                             "pairs and PML's reducers weigh each pair alike: use "
                             "reduction='pair_mean'")
        if self.global_batch or self.memory is not None:
            raise ValueError(f"{name}: global_batch and memory apply to the fused form (no "
                             "indices_tuple); with a miner, wrap the loss in PML's "
                             "DistributedLossWrapper / CrossBatchMemory (docs/pml.md)")
        a1, p, a2, n = check_indices_tuple(indices_tuple, embeddings.shape[0], ref_emb.shape[0],
                                           f"{name}: ")  # PML's convert_to_pairs, checked
        acc = output_dtype(embeddings.dtype)
        e, r = embeddings.to(acc), ref_emb.to(acc)
        losses = {}
        for key, (a, b), weight, kind in (
                ("inner_loss", (a1, p), self.lambda_inner, "pos_pair"),
                ("outer_loss", (a2, n), -self.lambda_outer, "neg_pair")):
            if a.numel() == 0:
                losses[key] = self.zero_loss()
                continue
            d = paired_distances(e[a], r[b], self.metric, dim_mean=self.dim_mean)
            losses[key] = {"losses": weight * d, "indices": (a, b), "reduction_type": kind}
        radial = radial_terms(embeddings, self.constraint, acc)
        losses["boundary_loss"] = _per_element(self.lambda_boundary * radial)
        return losses


class CrossBatchMemory(pml_losses.CrossBatchMemory):
    """PML's ``CrossBatchMemory``, accepting ``pml.ASLoss`` as well: PML's checks the wrapped
    loss's class name against a list of its own losses and refuses any other. Everything else
    is PML's (the memory holds detached copies of the embeddings, the batch's own rows
    included; the wrapped loss gets all (batch, memory) pairs but the self comparisons, or a
    miner's). Our ``ASLoss(memory=...)`` is the fused equivalent (docs/pml.md)."""

    @staticmethod
    def supported_losses():
        return [*pml_losses.CrossBatchMemory.supported_losses(), "ASLoss"]


class _PrototypeLoss(BaseMetricLossFunction):
    """A PML face for a loss of embeddings against a module's own class representatives: the
    loss module ``core`` (built from our arguments; PML's go to PML), its ``predict``."""

    NAME = ""

    def __init__(self, core_class, *args, **kwargs):
        pml_kwargs = {k: kwargs.pop(k) for k in ("reducer", "embedding_regularizer",
                                                 "embedding_reg_weight", "distance")
                      if k in kwargs}
        _refuse_distance(self.NAME, pml_kwargs)
        super().__init__(**pml_kwargs)
        self.core = core_class(*args, **kwargs)

    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.core.predict(embeddings)

    def _refuse_pairs(self, embeddings, labels, indices_tuple, ref_emb) -> None:
        if indices_tuple is not None:
            raise ValueError(f"{self.NAME}: indices_tuple does not apply: the loss compares "
                             "each embedding with its class's representatives, not pairs")
        if ref_emb is not embeddings:
            raise ValueError(f"{self.NAME}: ref_emb does not apply: the loss compares each "
                             "embedding with its class's representatives")
        _check_labels(self.NAME, labels, embeddings.shape[0])


class AffinityLoss(_PrototypeLoss):
    """The affinity loss as a PML loss; the arguments are those of
    ``confusion_kernels.AffinityLoss`` (its prototypes are this module's ``prototypes``)."""

    NAME = "pml.AffinityLoss"

    def _sub_loss_names(self):
        return ["loss", "diversity_loss"]

    def __init__(self, num_classes: int, embedding_dim: int, num_centers: int = 1, **kwargs):
        super().__init__(_affinity.AffinityLoss, num_classes, embedding_dim, num_centers,
                         **kwargs)

    @property
    def prototypes(self) -> torch.nn.Parameter:
        return self.core.prototypes

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """Two sub-losses: the hinge (fused mean with the MeanReducer, else the per-embedding
        hinge L_i for PML's reducer) and lambda_diversity R(W), already reduced."""
        self._refuse_pairs(embeddings, labels, indices_tuple, ref_emb)
        core = self.core
        mean = _all_means(self)
        hinge = _affinity.affinity_loss(embeddings, labels, core.prototypes, sigma=core.sigma,
                                        margin=core.margin, lambda_diversity=0.0,
                                        similarity=core.similarity, backend=core.backend,
                                        reduction="mean" if mean else "none")
        loss = _already_reduced(hinge) if mean else _per_element(hinge)
        diversity = (core.lambda_diversity * _affinity.diversity_regularizer(core.prototypes)
                     if core.lambda_diversity else hinge.new_zeros(()))
        return {"loss": loss, "diversity_loss": _already_reduced(diversity.to(hinge.dtype))}


class NCentroidsLoss(_PrototypeLoss):
    """The N-Centroids loss as a PML loss; the arguments are those of
    ``confusion_kernels.NCentroidsLoss`` (its EMA centroids move in training mode, as there)."""

    NAME = "pml.NCentroidsLoss"

    def __init__(self, num_classes: int, embedding_dim: int, **kwargs):
        super().__init__(_n_centroids.NCentroidsLoss, num_classes, embedding_dim, **kwargs)

    @property
    def centroids(self) -> torch.Tensor:
        return self.core.centroids

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self._refuse_pairs(embeddings, labels, indices_tuple, ref_emb)
        if _all_means(self):
            return {"loss": _already_reduced(self.core(embeddings, labels))}
        core = self.core  # per-embedding losses L_i for the other reducers, then the EMA step
        rows = _n_centroids.n_centroids_loss(embeddings, labels, core.centroids,
                                             metric=core.metric, use_negatives=core.use_negatives,
                                             backend=core.backend, reduction="none")
        if core.training:
            core._ema_step(embeddings, labels)
        return {"loss": _per_element(rows)}


# --- pytorch-metric-learning's pair losses, fused ---------------------------------------------
_WARNED: set[tuple[str, str]] = set()


def _warn_once(name: str, why: str) -> None:
    if (name, why) not in _WARNED:
        _WARNED.add((name, why))
        warnings.warn(f"confusion_kernels.pml.{name}: {why}; running pytorch-metric-learning's "
                      "own implementation (N x M memory). This warning is shown once.",
                      stacklevel=5)


class _FusedPairLoss:
    """Mixin for a subclass of PML's own loss class: the same constructor (plus ``backend=``),
    the same attributes, distance and reducer. ``compute_loss`` runs the fused function when
    PML would compute exactly what it computes (the class's default reducer, a distance it
    fuses; an ``indices_tuple`` takes the mined pairs only, O(pairs * D)), else PML's own code
    with a one-time warning saying why."""

    _default_reducer = MeanReducer

    def _why_not_fused(self) -> str | None:
        d = self.distance
        if type(d) is pml_distances.LpDistance:
            if d.p != 2 or d.power != 1:
                return f"LpDistance(p={d.p}, power={d.power}) is not fused (p=2, power=1 is)"
        elif type(d) is pml_distances.CosineSimilarity:
            if d.power != 1:
                return f"CosineSimilarity(power={d.power}) is not fused (power=1 is)"
        else:
            return (f"distance={type(d).__name__}() is not fused (LpDistance(p=2, power=1) "
                    "and CosineSimilarity() are)")
        default = self._default_reducer
        reducer = self.reducer  # PML wraps a loss with several sub-losses in MultipleReducers
        for r in ([reducer.reducers[k] if k in reducer.reducers else reducer.default_reducer
                   for k in self._sub_loss_names()]
                  if isinstance(reducer, MultipleReducers) else [reducer]):
            if type(r) is not default or (default is AvgNonZeroReducer
                                          and (r.low != 0 or r.high is not None)):
                return (f"reducer={type(r).__name__}() is not fused (the default "
                        f"{default.__name__}() is)")
        return None

    def _fused_call(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        own = ref_emb is embeddings
        metric = "cosine" if type(self.distance) is pml_distances.CosineSimilarity else "euclidean"
        kwargs = dict(metric=metric, normalize=self.distance.normalize_embeddings,
                      backend=self.backend, indices_tuple=indices_tuple)
        return self._fused(embeddings, labels, None if own else ref_emb,
                           None if own else ref_labels, **kwargs)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        why = self._why_not_fused()
        if why is not None or labels is None:
            _warn_once(type(self).__name__, why or "no labels")
            return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return self._fused_call(embeddings, labels, indices_tuple, ref_emb, ref_labels)


class ContrastiveLoss(_FusedPairLoss, pml_losses.ContrastiveLoss):
    """PML's ``ContrastiveLoss(pos_margin=0, neg_margin=1, **kwargs)``, fused (O(N D) memory)
    with its default distance and reducer; ``backend=`` picks ours."""

    _default_reducer = AvgNonZeroReducer

    def __init__(self, pos_margin=0, neg_margin=1, *, backend: str = "auto", **kwargs):
        super().__init__(pos_margin=pos_margin, neg_margin=neg_margin, **kwargs)
        self.backend = backend

    def _fused(self, embeddings, labels, ref_emb, ref_labels, **kwargs):
        pos, neg = _pair_losses.contrastive_parts(
            embeddings, labels, ref_emb, ref_labels, pos_margin=self.pos_margin,
            neg_margin=self.neg_margin, **kwargs)
        return {"pos_loss": _already_reduced(pos), "neg_loss": _already_reduced(neg)}


class SupConLoss(_FusedPairLoss, pml_losses.SupConLoss):
    """PML's ``SupConLoss(temperature=0.1, **kwargs)``, fused with its defaults."""

    _default_reducer = AvgNonZeroReducer

    def __init__(self, temperature=0.1, *, backend: str = "auto", **kwargs):
        super().__init__(temperature=temperature, **kwargs)
        self.backend = backend

    def _fused(self, embeddings, labels, ref_emb, ref_labels, **kwargs):
        return {"loss": _already_reduced(_pair_losses.supcon_loss(
            embeddings, labels, ref_emb, ref_labels, temperature=self.temperature, **kwargs))}


class NTXentLoss(_FusedPairLoss, pml_losses.NTXentLoss):
    """PML's ``NTXentLoss(temperature=0.07, **kwargs)``, fused with its defaults (PML's own
    forms the product of positive and negative pairs: 270 GB at N = 4096 with four samples a
    class)."""

    def __init__(self, temperature=0.07, *, backend: str = "auto", **kwargs):
        super().__init__(temperature=temperature, **kwargs)
        self.backend = backend

    def _fused(self, embeddings, labels, ref_emb, ref_labels, **kwargs):
        return {"loss": _already_reduced(_pair_losses.ntxent_loss(
            embeddings, labels, ref_emb, ref_labels, temperature=self.temperature, **kwargs))}


class MultiSimilarityLoss(_FusedPairLoss, pml_losses.MultiSimilarityLoss):
    """PML's ``MultiSimilarityLoss(alpha=2, beta=50, base=0.5, **kwargs)``, fused with its
    defaults."""

    def __init__(self, alpha=2, beta=50, base=0.5, *, backend: str = "auto", **kwargs):
        super().__init__(alpha=alpha, beta=beta, base=base, **kwargs)
        self.backend = backend

    def _fused(self, embeddings, labels, ref_emb, ref_labels, **kwargs):
        return {"loss": _already_reduced(_pair_losses.multi_similarity_loss(
            embeddings, labels, ref_emb, ref_labels, alpha=self.alpha, beta=self.beta,
            base=self.base, **kwargs))}

"""N-Centroids loss (NCL): unit embeddings pulled to their class centroid and pushed from the
hardest and the average other centroid; centroids follow the batch class means by an EMA.

    x_i = z_i / max(|z_i|, 1e-12)
    L_i = d(c_{y_i}, x_i) - g [ min_{k != y_i} d(c_k, x_i) + mean_{k != y_i} d(c_k, x_i) ]
    loss = mean_i L_i                   (g = 1 with use_negatives, else 0)
    d: euclidean |u - v|, cosine 1 - u.v, great_circle 2 atan2(|u - v|, |u + v|)
    EMA (training mode, after the loss): c_k <- normalize(a_t normalize(mean_{y_i=k} x_i)
                                                          + (1 - a_t) c_k),
    a_t = alpha0 * decay^(t / 1000) for the t-th update; classes absent from the batch keep
    their centroid.

The readable definition is confusion_kernels/reference/n_centroids.py. The cpu, triton and
cuda backends run the fused op ``n_centroids_rows`` (confusion_kernels/ops/n_centroids_rows.py):
memory O((N + K) D), nothing of size N x K. The reference backend runs the definition over row
chunks recomputed in the backward, so that its N x K x D differences never exist all at once.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from .._routing import Route, route
from .._distributed import all_reduce_sum, require_process_group
from .._scaling import rescale_large_rows
from .._validation import (
    accumulation_dtype,
    autocast_off,
    check_embeddings,
    check_label_range,
    check_labels,
    compiled_index,
    finite_rows,
    names_errors,
    output_dtype,
    poison_all,
    poison_rows,
)
from ..ops.n_centroids_rows import n_centroids_rows, n_centroids_sum
from ..reference import n_centroids as _reference
from .confidence import _per_sample, gaussian_nll, vmf_nll

__all__ = ["Confidence", "NCentroidsLoss", "n_centroids_loss", "ema_class_update", "class_sums",
           "ema_from_sums"]


class Confidence(NamedTuple):
    """What NCentroidsLoss.confidence reports per sample ([N] each).

    prediction: the nearest centroid's class; distance: d to it (the module's metric);
    head: the confidence head's value (kappa for "vmf", sigma = exp(log_sigma) averaged over
    dimensions for "gaussian"; None without a head); log_likelihood: the head's log-density of
    the unit embedding under the nearest centroid (None without a head). Low likelihood, large
    distance, small kappa or large sigma flag inputs that look unlike the training classes
    (out of distribution)."""

    prediction: torch.Tensor
    distance: torch.Tensor
    head: torch.Tensor | None
    log_likelihood: torch.Tensor | None

_OP = "n_centroids_rows"
REDUCTIONS = ("mean", "sum", "none")


def _check_metric(metric: str) -> None:
    if metric not in _reference.METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {list(_reference.METRICS)}")


def _check_inputs(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                  metric: str, backend: str, check_finite: bool | None = None,
                  allow_empty: bool = False, reduction: str = "mean") -> tuple[torch.Tensor, str]:
    """(labels as int64, the route: backend and algorithm) after the checks (``allow_empty``: z
    may have no rows, one rank's part of a global batch)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    check_embeddings(z, "z", check_finite=check_finite, allow_empty=allow_empty)
    _check_metric(metric)
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 2 \
            or centroids.shape[1] != z.shape[1]:
        shape = tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids)
        raise ValueError(f"centroids must be [K, D] with D = {z.shape[1]}, got {shape}")
    if not centroids.dtype.is_floating_point:
        raise TypeError(f"centroids must be floating, got {centroids.dtype}")
    if centroids.device != z.device:
        raise ValueError(f"centroids are on {centroids.device} but z is on {z.device}")
    labels = check_labels(labels, z.shape[0], z.device)
    chosen = route(_OP, z, backend, needs_grad=torch.is_grad_enabled() and z.requires_grad
                   and reduction != "none")  # (per-row losses: the rows algorithm)
    # the kernel ops guard the range themselves; the reference indexes with torch
    check_label_range(labels, centroids.shape[0], " (one centroid per class)",
                      host=True if chosen.backend == "reference" else None)
    return labels, chosen


@names_errors("n_centroids_loss")
@autocast_off
def n_centroids_loss(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, *,
                     metric: str = "great_circle", use_negatives: bool = True,
                     backend: str = "auto", check_finite: bool | None = None,
                     reduction: str = "mean") -> torch.Tensor:
    """The N-Centroids loss of embeddings z [N, D] (normalised here) against unit centroids
    [K, D] (no gradient flows into them). Labels must lie in [0, K); K >= 2 with negatives.

    ``check_finite``: scan z for NaN/Inf and raise ValueError (True), or not (False); None
    scans where that needs no host synchronisation (CPU tensors), as the other losses do.
    Non-finite z that is not scanned gives a NaN loss.
    ``reduction``: "mean" (the loss), "sum", or "none" (the per-row losses L_i [N], which the
    mean averages; NaN in the rows that are not finite or whose label is out of range).
    Returns a scalar ([N] for "none") in z's dtype (float32 for 16-bit inputs).
    """
    labels, chosen = _check_inputs(z, labels, centroids, metric, backend, check_finite,
                                   reduction=reduction)
    if use_negatives and centroids.shape[0] < 2:
        raise ValueError("negatives need at least 2 centroids (K >= 2)")
    return _checked_loss(z, labels, centroids, metric, use_negatives, chosen, reduction)


@autocast_off
def _checked_loss(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, metric: str,
                  use_negatives: bool, chosen: Route, reduction: str = "mean") -> torch.Tensor:
    """n_centroids_loss on inputs its caller has checked (``_check_inputs``), on ``chosen``."""
    # (backward may need the centroids: autograd saves them on the reference and triton
    # backends; NCentroidsLoss's EMA step therefore replaces its buffer, never writes into it)
    centroids = centroids.detach()
    # the loss depends on z only through z / |z|: rows whose |z|^2 would overflow are scaled
    # by a power of two first (fp32 rows of norm 1e19 became zero vectors)
    z = rescale_large_rows(z)
    out, work = output_dtype(z.dtype), accumulation_dtype(z.dtype)
    if reduction == "none":
        if chosen.backend == "reference":
            index, bad = compiled_index(labels, centroids.shape[0])
            rows = poison_rows(_reference_rows_in_chunks(z.to(work), index, centroids.to(work),
                                                         metric, use_negatives), bad)
        else:
            rows = n_centroids_rows(z, labels, centroids, metric=metric,
                                    use_negatives=use_negatives, backend=chosen.backend)
        return rows.to(out)
    if chosen.backend == "reference":
        index, bad = compiled_index(labels, centroids.shape[0])
        loss = poison_all(_reference_in_row_chunks(z.to(work), index, centroids.to(work), metric,
                                                   use_negatives), bad)
    else:
        loss = n_centroids_sum(z, labels, centroids, metric=metric,
                               use_negatives=use_negatives, route=chosen) / z.shape[0]
    return (loss * z.shape[0] if reduction == "sum" else loss).to(out)


# At most this many N x K x D difference entries are formed at a time (128 MiB in fp64).
_CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(z: torch.Tensor, centroids: torch.Tensor) -> int:
    """Rows per chunk: at most _CHUNK_ELEMENTS of the N x K x D differences at a time."""
    return max(1, _CHUNK_ELEMENTS // max(1, centroids.shape[0] * z.shape[1]))


def _in_row_chunks(fn, z: torch.Tensor, labels: torch.Tensor, rows: int) -> list[torch.Tensor]:
    """fn(z_chunk, labels_chunk) over chunks of ``rows`` rows, each recomputed in the backward
    (activation checkpointing), so memory stays O(chunk x K x D + N D) instead of O(N K D)."""
    return [torch.utils.checkpoint.checkpoint(fn, z[i:i + rows], labels[i:i + rows],
                                              use_reentrant=False)
            for i in range(0, z.shape[0], rows)]


def _reference_in_row_chunks(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                             metric: str, use_negatives: bool) -> torch.Tensor:
    """The reference loss over row chunks; the loss is a mean of per-row terms, so the chunks'
    sums give it exactly."""
    n, rows = z.shape[0], _chunk_rows(z, centroids)
    if rows >= n:
        return _reference.n_centroids_loss(z, labels, centroids, metric=metric,
                                           use_negatives=use_negatives)

    def chunk_sum(zc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return zc.shape[0] * _reference.n_centroids_loss(zc, yc, centroids, metric=metric,
                                                         use_negatives=use_negatives)

    return sum(_in_row_chunks(chunk_sum, z, labels, rows)) / n


def _reference_rows_in_chunks(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                              metric: str, use_negatives: bool) -> torch.Tensor:
    """The reference's per-row losses [N] over row chunks."""
    rows = _chunk_rows(z, centroids)

    def chunk(zc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return _reference.n_centroids_rows(zc, yc, centroids, metric=metric,
                                           use_negatives=use_negatives)

    if rows >= z.shape[0]:
        return chunk(z, labels)
    return torch.cat(_in_row_chunks(chunk, z, labels, rows))


@torch.no_grad()
def class_sums(centroids: torch.Tensor, z: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of the normalised rows [K, D] (centroids' dtype) and counts [K] (int64),
    in one pass (index_add_). Rows that are not finite or whose label lies outside [0, K)
    (possible where the data checks are left to the kernels, see _validation) are left out,
    so that a bad batch gives a NaN loss but does not corrupt the centroids."""
    x = _reference.normalize(rescale_large_rows(z.detach().to(centroids.dtype)))
    k = centroids.shape[0]
    valid = finite_rows(x) & (labels >= 0) & (labels < k)
    index = torch.where(valid, labels, 0)
    sums = torch.zeros_like(centroids).index_add_(0, index, torch.where(valid[:, None], x, 0.0))
    counts = torch.zeros(k, dtype=torch.long, device=z.device).index_add_(
        0, index, valid.to(torch.long))
    return sums, counts


@torch.no_grad()
def ema_from_sums(centroids: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
                  alpha: float | torch.Tensor) -> torch.Tensor:
    """c_k <- normalize(alpha normalize(sums_k / counts_k) + (1 - alpha) c_k) where
    counts_k > 0; the other centroids unchanged."""
    present = (counts > 0)[:, None]
    means = _reference.normalize(sums / counts.clamp_min(1)[:, None].to(centroids.dtype))
    mixed = _reference.normalize(alpha * means + (1.0 - alpha) * centroids)
    return torch.where(present, mixed, centroids)


@torch.no_grad()
def ema_class_update(centroids: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """The centroids after one EMA step, for all classes at once: per-class sums of the
    normalised rows in one pass (index_add_), then
    c_k <- normalize(alpha normalize(mean_k) + (1 - alpha) c_k) where class k is present."""
    return ema_from_sums(centroids, *class_sums(centroids, z, labels), alpha)


class NCentroidsLoss(nn.Module):
    """N-Centroids loss with EMA centroids (buffers ``centroids`` [K, D] and ``step``).

    ``forward(z, labels)`` returns the loss against the current centroids and then, in
    training mode, moves the centroids of the classes in the batch (EMA, no gradient) and
    increments ``step``. In eval mode the centroids do not move.

    Args:
        num_classes: K (>= 2 with negatives).
        embedding_dim: D.
        metric: "great_circle" (default), "euclidean" or "cosine".
        alpha0, decay: EMA rate alpha_t = alpha0 * decay^(t / 1000).
        use_negatives: include the hardest and the mean negative terms.
        seed: seed of the random unit initial centroids.
        global_batch: under torch.distributed, the EMA step uses the per-class sums and counts
            of every rank's batch (one all-reduce of [K, D] + [K]), so every rank keeps the
            same centroids: those of one process that sees the concatenated global batch.
            The loss itself stays this rank's mean (its rows do not interact across ranks);
            a rank may hold no rows (its loss is 0 and it adds nothing to the EMA). Every
            call first exchanges one small descriptor between the ranks: a rank whose input
            fails its checks makes every rank raise the same error, and ranks that differ in
            K, D, the centroids' dtype, metric, alpha0, decay, use_negatives, training mode,
            step or centroids (a checksum) raise ValueError on every rank. At the first
            call the group's first rank broadcasts its centroids, so that ranks built with
            different seeds start from the same ones.
        group: the process group for global_batch (None: the default group).
        backend: as for every op ("auto": cuda > triton > cpu > reference for the device).
        reduction: "mean" (default), "sum", or "none": the per-row losses L_i [N] (this
            rank's rows under global_batch), as ``n_centroids_loss``.
    """

    centroids: torch.Tensor
    step: torch.Tensor

    def __init__(self, num_classes: int, embedding_dim: int, metric: str = "great_circle",
                 alpha0: float = 0.25, decay: float = 0.65, *, use_negatives: bool = True,
                 seed: int = 0, backend: str = "auto", global_batch: bool = False,
                 group=None, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
        self.reduction = reduction
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError("num_classes and embedding_dim must be >= 1")
        if use_negatives and num_classes < 2:
            raise ValueError("negatives need at least 2 centroids (num_classes >= 2)")
        _check_metric(metric)
        for name, v in (("alpha0", alpha0), ("decay", decay)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"NCentroidsLoss: {name} must be a real number, got {v!r}")
        if not 0.0 < alpha0 <= 1.0 or not 0.0 < decay <= 1.0:
            raise ValueError("alpha0 and decay must lie in (0, 1]")
        self.metric, self.alpha0, self.decay = metric, float(alpha0), float(decay)
        self.use_negatives, self.backend = use_negatives, backend
        self.global_batch, self.group = bool(global_batch), group
        g = torch.Generator().manual_seed(seed)
        init = _reference.normalize(torch.randn(num_classes, embedding_dim, generator=g))
        self.register_buffer("centroids", init)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._centroids_broadcast = False  # global_batch: the first call broadcasts them

    @property
    def alpha(self) -> float:
        """The EMA rate of the next update, alpha0 * decay^(step / 1000)."""
        return _reference.ema_alpha(int(self.step), self.alpha0, self.decay)

    @names_errors("NCentroidsLoss")
    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.global_batch:
            return self._global_forward(z, labels)
        loss = n_centroids_loss(z, labels, self.centroids, metric=self.metric,
                                use_negatives=self.use_negatives, backend=self.backend,
                                reduction=self.reduction)
        if self.training:
            self._ema_step(z, labels)
        return loss

    def _global_forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """forward with global_batch: every rank's checks and settings agreed first."""
        import torch.distributed as dist

        from .._distributed import agree

        what = "NCentroidsLoss(global_batch=True)"
        require_process_group(what)
        error = None
        try:
            labels, chosen = _check_inputs(z, labels, self.centroids, self.metric, self.backend,
                                           allow_empty=True, reduction=self.reduction)
        except (ValueError, TypeError, RuntimeError) as exc:
            error = exc
        c = self.centroids
        agree(what, z.shape[0] if error is None else 0, dict(
            num_classes=c.shape[0], dim=c.shape[1], centroid_dtype=str(c.dtype),
            metric=self.metric, alpha0=self.alpha0, decay=self.decay,
            use_negatives=self.use_negatives, training=self.training, step=int(self.step),
            centroids=None if not self._centroids_broadcast
            else float(c.detach().double().sum()).hex()), error, self.group)
        if not self._centroids_broadcast:
            first = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            dist.broadcast(self.centroids, src=first, group=self.group)
            self._centroids_broadcast = True
        if z.shape[0] == 0:  # nothing here: 0 (no rows), still a function of z (empty gradient)
            loss = z.to(output_dtype(z.dtype)).sum(1 if self.reduction == "none" else None)
        else:  # checked above: not again
            loss = _checked_loss(z, labels, self.centroids, self.metric, self.use_negatives,
                                 chosen, self.reduction)
        if self.training:
            self._ema_step(z, labels)
        return loss

    def _ema_step(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        """Moves the centroids of the classes in the batch and increments ``step``."""
        sums, counts = class_sums(self.centroids, z, labels.to(torch.int64))
        if self.global_batch:
            require_process_group("NCentroidsLoss(global_batch=True)")
            sums = all_reduce_sum(sums, self.group)
            counts = all_reduce_sum(counts, self.group)
        # alpha_t as a tensor op on the step buffer: no host sync, so a compiled
        # training step (fullgraph=True) has no graph break here
        alpha = _reference.ema_alpha(self.step.to(self.centroids.dtype), self.alpha0, self.decay)
        # a new tensor, not an in-place write: what a forward saved for its backward (and what
        # a compiled graph may re-read there) keeps the centroids it was computed with
        self.centroids = ema_from_sums(self.centroids, sums, counts, alpha)
        self.step += 1

    def _unit_rows_and_distances(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x = z / |z| and d(c_k, x_i) [N, K], in z's accumulation dtype."""
        check_embeddings(z, "z")
        k, d = self.centroids.shape
        if z.shape[1] != d:
            raise ValueError(f"z has D = {z.shape[1]} but the module's centroids are [{k}, {d}]")
        if z.device != self.centroids.device:
            raise ValueError(f"z is on {z.device} but the module's centroids are on "
                             f"{self.centroids.device} (move the module with .to())")
        x = _reference.normalize(rescale_large_rows(z.to(accumulation_dtype(z.dtype))))
        return x, _reference.sphere_distances(x, self.centroids.to(x.dtype), self.metric)

    @names_errors("NCentroidsLoss.distances")
    @torch.no_grad()
    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """d(c_k, x_i) [N, K] under the module's metric."""
        return self._unit_rows_and_distances(z)[1]

    @names_errors("NCentroidsLoss.confidence")
    @torch.no_grad()
    def confidence(self, z: torch.Tensor, *, kappa: torch.Tensor | None = None,
                   log_sigma: torch.Tensor | None = None) -> Confidence:
        """Inference-time confidence of embeddings z [N, D] (see :class:`Confidence`).

        Pass the model's vMF concentration ``kappa`` ([N] or [N, 1], > 0) or its diagonal
        Normal ``log_sigma`` (broadcastable to [N, D]), or neither (distance only).
        """
        if kappa is not None and log_sigma is not None:
            raise ValueError("pass kappa (vMF head) or log_sigma (Normal head), not both")
        for name, head in (("kappa", kappa), ("log_sigma", log_sigma)):
            if head is not None and not isinstance(head, torch.Tensor):
                raise TypeError(f"{name} must be a tensor (the model's per-sample output), got "
                                f"{type(head).__name__}")
            if head is not None and head.device != z.device:
                raise ValueError(f"{name} is on {head.device} but z is on {z.device}")
        x, d = self._unit_rows_and_distances(z)
        distance, prediction = d.min(1)
        nearest = self.centroids.to(d.dtype)[prediction]
        head = log_likelihood = None
        if kappa is not None:
            head = _per_sample("kappa", kappa, x.shape[0]).to(d.dtype)  # 0-d: one for all
            log_likelihood = -vmf_nll(x, nearest, head)
        elif log_sigma is not None:
            head = torch.exp(log_sigma.to(d.dtype)).expand_as(x).mean(1)
            log_likelihood = -gaussian_nll(x, nearest, log_sigma.to(d.dtype))
        return Confidence(prediction, distance, head, log_likelihood)

    @names_errors("NCentroidsLoss.predict")
    @torch.no_grad()
    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """The nearest centroid's class [N]."""
        return self.distances(z).argmin(1)

    def extra_repr(self) -> str:
        k, d = self.centroids.shape
        return (f"num_classes={k}, embedding_dim={d}, metric={self.metric!r}, "
                f"alpha0={self.alpha0}, decay={self.decay}, use_negatives={self.use_negatives}, "
                f"global_batch={self.global_batch}")


# torch 2.6's Inductor, compiling a training step with gradients, ran the EMA's write of the
# centroid buffer before the loss kernel read it (a silently wrong loss); torch 2.15 compiles
# it correctly, and the versions in between are untested. Before 2.15 the EMA therefore stays
# eager: a compiled step is still right (the EMA is a graph break), fullgraph=True raises.
_COMPILED_EMA_MIN_TORCH = (2, 15)
if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < _COMPILED_EMA_MIN_TORCH:
    NCentroidsLoss._ema_step = torch.compiler.disable(NCentroidsLoss._ema_step)

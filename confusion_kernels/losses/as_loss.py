"""ASLoss (Aggregation-Separation Loss) on the fused op.

    inner    = sum_i S_in[i]  / n_in      n_in  = sum_c n_c (n_c - 1)  (+ N with include_self)
    outer    = sum_i S_out[i] / n_out     n_out = N^2 - sum_c n_c^2
    boundary = mean_i (|x_i|_2 - R)^2
    ASLoss   = lambda_inner * inner - lambda_outer * outer + lambda_boundary * boundary

``reduction="class_mean"`` averages per class first, so every class weighs the
same whatever its size. ``reduction="none"``: per-sample contributions of the pair_mean
loss, c_i = lambda_inner * S_in[i] / n_in - lambda_outer * S_out[i] / n_out
+ lambda_boundary * (|x_i| - R)^2 / N, [N], which sum to it (a pair's distance is shared
by its two rows). Memory is O(N*D): S_in / S_out are per-row sums.

``global_batch=True`` evaluates the loss of the batch of all ranks of a process
group: each rank's rows against the gathered rows of every rank (the rectangular
op), the terms summed over ranks.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn

from .. import _distributed
from .._metrics import resolve_metric
from .._routing import Route, route
from .._validation import (
    autocast_off,
    check_all_finite,
    check_embeddings,
    check_labels,
    names_errors,
    output_dtype,
    scan_finite,
)
from ..ops.intra_inter_sums import checked_row_sums
from ..ops.weighted_pair_sums import weighted_pair_sums
from ..reference.as_loss import ASLossTerms
from .memory import CrossBatchMemory

# the public API; radial_terms, term_weights and class_sizes are helpers of the benchmarks
__all__ = ["ASLoss", "as_loss", "as_loss_terms"]

REDUCTIONS = ("pair_mean", "class_mean", "none")


def _safe_ratio(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, 0 where count == 0."""
    return torch.where(count > 0, total / torch.where(count > 0, count, 1), 0.0)


def class_sizes(labels: torch.Tensor, among: torch.Tensor | None = None) -> torch.Tensor:
    """n_{y_i} for every row i: how many entries of ``among`` (default: labels itself) share
    row i's label. Static shapes (no torch.unique), so the loss stays one graph under
    torch.compile."""
    ordered = torch.sort(labels if among is None else among).values
    return (torch.searchsorted(ordered, labels, right=True)
            - torch.searchsorted(ordered, labels, right=False))


def radial_terms(x: torch.Tensor, constraint: float, dtype: torch.dtype) -> torch.Tensor:
    """(|x_i|_2 - R)^2 for every row, in ``dtype``: the boundary term's summands."""
    return (torch.linalg.vector_norm(x.to(dtype), dim=1) - constraint).square()


def term_weights(labels: torch.Tensor, reduction: str, include_self: bool, dim_scale: float,
                 dtype: torch.dtype, ref_labels: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_in, w_out) [N] with inner = sum_i w_in[i] S_in[i], outer = sum_i w_out[i] S_out[i].

    The columns are the rows themselves, or a reference set with labels ``ref_labels``
    [M] whose first N rows are the rows (x followed by a memory). Row i has p_i = m_c - 1
    (+ 1 with include_self) intra pairs and M - m_c inter pairs, m_c the number of
    columns with its label; its class has P_c = n_c p_i pairs, n_c its rows.
    pair_mean: 1 / sum_i p_i for every row.
    class_mean: 1 / (P_c x number of classes with such pairs).
    Weights are 0 where there is no pair to average (the term is then 0).
    ``dim_scale`` multiplies them (1/D for ``dim_mean``).
    """
    size = class_sizes(labels).to(dtype)  # n_c of each row's class among the rows
    if ref_labels is None:  # the columns are the rows: m_c = n_c
        ref_labels, columns = labels, size
    else:
        columns = class_sizes(labels, ref_labels).to(dtype)  # m_c
    per_row_in = columns - (0.0 if include_self else 1.0)
    per_row_out = ref_labels.shape[0] - columns
    weights = []
    for per_row in (per_row_in, per_row_out):
        if reduction in ("pair_mean", "none"):
            w = _safe_ratio(torch.ones_like(size), per_row.sum())
        else:
            pairs = size * per_row  # P_c
            classes = ((pairs > 0) / size).sum()
            w = _safe_ratio(_safe_ratio(torch.ones_like(size), pairs), classes)
        weights.append(w * dim_scale)
    return weights[0], weights[1]


@names_errors("as_loss_terms")
@autocast_off
def as_loss_terms(x: torch.Tensor, labels: torch.Tensor, *, metric: str = "euclidean",
                  constraint: float = 10.0, include_self: bool = False,
                  reduction: str = "pair_mean", dim_mean: bool = False, backend: str = "auto",
                  check_finite: bool | None = None, global_batch: bool = False,
                  group=None, memory: CrossBatchMemory | None = None,
                  ddp_gradient: bool = False) -> ASLossTerms:
    """The three ASLoss terms (inner, outer, boundary) of embeddings x [N, D].

    Each term is a 0-d tensor (float32 for fp16/bf16 inputs, else x's dtype); with
    ``reduction="none"`` an [N] tensor of per-sample contributions that sum to the
    ``pair_mean`` term (w_in[i] S_in[i], w_out[i] S_out[i], (|x_i| - R)^2 / N).
    ``inner`` is 0 when no class has two samples, ``outer`` 0 for a single class.
    When a gradient is needed and the backend has it (cpu and cuda: euclidean
    and sqeuclidean with D > 8, cosine; triton: euclidean, sqeuclidean, cosine),
    inner and outer and their gradients come
    from one pair pass (``weighted_pair_sums``); otherwise from
    ``intra_inter_sums``.

    With ``global_batch=True`` (an initialised torch.distributed process group, ``group``
    or the default one) the terms are those of the global batch, the concatenation of
    every rank's x in rank order (ranks may hold different N): every rank returns the
    same values, and backward (which every rank must run) leaves in x.grad exactly this
    rank's rows of the gradient of the global loss. Under DistributedDataParallel, which
    averages parameter gradients over the W ranks, multiply the loss by W to get the
    single-process gradient of the global batch, or pass ``ddp_gradient=True``: the terms
    keep their values and their gradient is multiplied by W, so that DDP's average is the
    gradient of the global loss (as PML's DistributedLossWrapper does by scaling the value).
    With ``memory`` as well, the columns are the global batch followed by the memory's rows;
    every rank must keep the same memory (``ASLoss`` enqueues the gathered global batch),
    which the ranks check by its size and fill.

    With ``memory`` (a :class:`CrossBatchMemory`), the columns are the batch followed by the
    rows stored in the memory (detached): inner and outer average over the pairs (row of x,
    column) instead of (row, row); the boundary term stays over x. The memory is only read
    here (``ASLoss`` enqueues each training batch).

    ``check_finite``: scan x (and the memory's or the ranks' rows) for NaN/Inf first
    (ValueError). None (default): for CPU tensors and under ``strict_checks()``; skipped on a
    GPU, where the scan would make the host wait (non-finite input gives NaN terms).

    Global batch guarantees: before any data moves, the ranks exchange one small descriptor
    (``_distributed.agree``), so that a rank whose input fails its checks makes every rank
    raise the same error, and ranks that differ in metric, reduction, include_self,
    constraint, dim_mean, the λ's (``as_loss`` / ``ASLoss``), dtype, D, the NaN scan or in
    whether a gradient is needed raise ValueError on every rank, naming the setting. A rank
    may hold no rows (N = 0): the terms are those of the other ranks' rows together.
    """
    return _as_loss_terms(x, labels, metric=metric, constraint=constraint,
                          include_self=include_self, reduction=reduction, dim_mean=dim_mean,
                          backend=backend, check_finite=check_finite, global_batch=global_batch,
                          group=group, memory=memory, ddp_gradient=ddp_gradient)


def _as_loss_terms(x: torch.Tensor, labels: torch.Tensor, *, metric: str, constraint: float,
                   include_self: bool, reduction: str, dim_mean: bool, backend: str,
                   check_finite: bool | None, global_batch: bool, group,
                   memory: CrossBatchMemory | None, ddp_gradient: bool = False,
                   settings: dict | None = None, enqueue: bool = False) -> ASLossTerms:
    """as_loss_terms; ``settings``: the caller's own options that every rank of a global
    batch must share too (as_loss's and ASLoss's λ's and layer weights); ``enqueue``: a global
    batch stores its gathered rows in the memory once they are read (ASLoss, training)."""
    if global_batch:
        terms = _checked_global_terms(x, labels, metric, constraint, include_self, reduction,
                                      dim_mean, backend, check_finite, group, memory,
                                      dict(settings or {}, ddp_gradient=bool(ddp_gradient)),
                                      enqueue)
        return _scaled_for_ddp(terms, group) if ddp_gradient else terms
    if ddp_gradient:
        raise ValueError("ddp_gradient=True scales the gradient of a global batch: it needs "
                         "global_batch=True")
    labels, name, _, dim_scale = _check_terms_inputs(x, labels, metric, reduction, dim_mean,
                                                     check_finite)
    acc = output_dtype(x.dtype)
    if memory is not None:
        return _memory_terms(x, labels, name, constraint, include_self, reduction, dim_scale,
                             backend, check_finite, memory)
    per_sample = reduction == "none"  # needs the row sums: never the one pass
    needs_grad = torch.is_grad_enabled() and x.requires_grad and not per_sample
    chosen = route("as_loss_terms", x, backend, metric=name, needs_grad=needs_grad)
    w_in, w_out = term_weights(labels, reduction, include_self, dim_scale, acc)
    if chosen.algorithm == "one_pass":
        inner, outer = weighted_pair_sums(x, labels, w_in, w_out, name, chosen.backend)
        return ASLossTerms(inner, outer, radial_terms(x, constraint, acc).mean())
    s_in, s_out = checked_row_sums(x, labels, name, chosen)
    return _reduce_terms(w_in * s_in, w_out * s_out, radial_terms(x, constraint, acc), per_sample)


def _reduce_terms(inner: torch.Tensor, outer: torch.Tensor, radial: torch.Tensor,
                  per_sample: bool) -> ASLossTerms:
    """The terms from the rows' contributions to inner and outer and their radial terms
    (|x_i| - R)^2: the per-sample vectors (reduction="none"), or the sums and the mean."""
    if per_sample:
        return ASLossTerms(inner, outer, radial / radial.shape[0])
    return ASLossTerms(inner.sum(), outer.sum(), radial.mean())


def _check_terms_inputs(x, labels, metric: str, reduction: str, dim_mean: bool,
                        check_finite: bool | None, allow_empty: bool = False
                        ) -> tuple[torch.Tensor, str, bool, float]:
    """(labels as int64, the metric's canonical name, the effective dim_mean, the dimension
    scale) after the checks of every as_loss_terms path (``allow_empty``: one rank's part of
    a global batch)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    check_embeddings(x, "x", check_finite=check_finite, allow_empty=allow_empty)
    labels = check_labels(labels, x.shape[0], x.device)
    name, _, dim_mean = resolve_metric(metric, dim_mean)
    return labels, name, dim_mean, 1.0 / x.shape[1] if dim_mean else 1.0  # (D >= 1: checked)


def _memory_terms(x: torch.Tensor, labels: torch.Tensor, metric: str, constraint: float,
                  include_self: bool, reduction: str, dim_scale: float, backend: str,
                  check_finite: bool | None, memory: CrossBatchMemory) -> ASLossTerms:
    """as_loss_terms of the rows of x against x followed by the memory's rows."""
    _check_memory(memory, None)
    if memory.embeddings.device != x.device:
        raise ValueError(f"the memory is on {memory.embeddings.device} but x is "
                         f"on {x.device}")
    if memory.embeddings.shape[1] != x.shape[1]:
        raise ValueError(f"the memory holds {memory.embeddings.shape[1]}-D rows, "
                         f"x has {x.shape[1]} columns")
    ref, ref_labels = memory.reference_set(x, labels)
    if scan_finite(check_finite, ref):
        check_all_finite(ref[x.shape[0]:], "the memory")
    acc = output_dtype(x.dtype)
    chosen = route("intra_inter_sums_rect", x, backend, metric=metric)
    w_in, w_out = term_weights(labels, reduction, include_self, dim_scale, acc, ref_labels)
    s_in, s_out = checked_row_sums(x, labels, metric, chosen, ref=ref, ref_labels=ref_labels,
                                   self_offset=0)
    return _reduce_terms(w_in * s_in, w_out * s_out, radial_terms(x, constraint, acc),
                         reduction == "none")


def _scaled_for_ddp(terms: ASLossTerms, group) -> ASLossTerms:
    """The terms with their values kept and their gradient times the world size W: under
    DistributedDataParallel, which averages parameter gradients over the ranks, the average
    is then the gradient of the global loss."""
    import torch.distributed as dist

    extra = dist.get_world_size(group) - 1
    return ASLossTerms(*(t + extra * (t - t.detach()) for t in terms))


def _check_memory(memory, where: str | None) -> None:
    if not isinstance(memory, CrossBatchMemory):
        raise TypeError(f"{where + ': ' if where else ''}memory must be a "
                        f"confusion_kernels.CrossBatchMemory (or None), got {type(memory).__name__}")


def _checked_global_terms(x, labels, metric, constraint, include_self, reduction, dim_mean,
                          backend, check_finite, group, memory, settings,
                          enqueue: bool = False) -> ASLossTerms:
    """_global_terms after every rank's checks and settings are agreed (``agree``)."""
    what = "global_batch=True"  # (the entry, as_loss / ASLoss / as_loss_terms, names itself)
    _distributed.require_process_group(what)
    error, name, chosen, scan, dim_scale = None, metric, None, None, 1.0
    try:
        labels, name, dim_mean, dim_scale = _check_terms_inputs(
            x, labels, metric, reduction, dim_mean, False, allow_empty=True)
        if memory is not None:
            _check_memory(memory, None)
            if memory.embeddings.device != x.device or memory.embeddings.shape[1] != x.shape[1]:
                raise ValueError(f"the memory holds {memory.embeddings.shape[1]}-D rows on "
                                 f"{memory.embeddings.device}, x is {x.shape[1]}-D on {x.device}")
        chosen = route("intra_inter_sums_rect", x, backend, metric=name)
        scan = scan_finite(check_finite, x)
    except (ValueError, TypeError, RuntimeError) as exc:
        error = exc
    ok = error is None
    agreed = dict(metric=name, reduction=reduction, include_self=include_self,
                  constraint=constraint, dim_mean=dim_mean,
                  dtype=str(x.dtype) if ok else None, dim=int(x.shape[1]) if ok else None,
                  device_type=x.device.type if ok else None, nan_scan=scan,
                  gradient=bool(ok and torch.is_grad_enabled() and x.requires_grad),
                  memory=None if memory is None else (memory.size, memory.filled,
                                                      memory.next_row), **settings)
    sizes = _distributed.agree(what, x.shape[0] if ok else 0, agreed, error, group)
    if sum(sizes) == 0:
        raise ValueError(f"{what}: the global batch has no rows (every rank's x has N = 0)")
    return _global_terms(x, labels, name, constraint, include_self, reduction, dim_scale,
                         chosen, scan, group, sizes, memory, enqueue)


def _global_terms(x: torch.Tensor, labels: torch.Tensor, metric: str, constraint: float,
                  include_self: bool, reduction: str, dim_scale: float, chosen: Route,
                  scan: bool, group, sizes: list[int], memory: CrossBatchMemory | None = None,
                  enqueue: bool = False) -> ASLossTerms:
    """as_loss_terms of the batch of all ranks: this rank's rows against the gathered rows
    (intra_inter_sums with ref and self_offset) and the memory's, weights from the global label
    counts, each term's per-rank share summed over the ranks (``_distributed.sum_over_ranks``;
    reduction="none": this rank's rows' contributions). ``enqueue``: then store the gathered
    global batch in the memory, on every rank alike (ASLoss in training mode)."""
    rows, rows_labels, offset = _distributed.gather_rows(x, labels, sizes, group)
    if scan:  # on the gathered rows: every rank raises together
        check_all_finite(rows.detach(), "x (of some rank of the global batch)")
    ref, ref_labels = rows, rows_labels  # the columns: the global batch, then the memory's rows
    if memory is not None:
        stored, stored_labels = memory.contents()
        if scan:
            check_all_finite(stored, "the memory")
        ref = torch.cat([rows, stored.to(dtype=rows.dtype)])
        ref_labels = torch.cat([rows_labels, stored_labels.to(rows_labels.device)])
        if enqueue:  # (after the copy above: the columns keep the rows stored before)
            memory.enqueue(rows.detach(), rows_labels)
    acc = output_dtype(x.dtype)
    n = x.shape[0]
    if n == 0:
        # no rows here: zero shares, which still depend on the gathered rows, so that this
        # rank's backward joins the all-reduce of _GatherRows that the other ranks run
        tie = 0.0 * ref.to(acc).sum()
        if reduction == "none":
            empty = ref.new_zeros(0, dtype=acc) + tie
            return ASLossTerms(empty, empty, empty)
        shares = ref.new_zeros(3, dtype=acc) + tie
    else:
        w_in, w_out = (w[offset:offset + n] for w in
                       term_weights(rows_labels, reduction, include_self, dim_scale, acc,
                                    ref_labels))
        s_in, s_out = checked_row_sums(x, labels, metric, chosen, ref=ref,
                                       ref_labels=ref_labels, self_offset=offset)
        inner, outer = w_in * s_in, w_out * s_out
        radial = radial_terms(x, constraint, acc)
        if reduction == "none":
            return ASLossTerms(inner, outer, radial / rows_labels.shape[0])
        shares = torch.stack([inner.sum(), outer.sum(), radial.sum() / rows_labels.shape[0]])
    inner, outer, boundary = _distributed.sum_over_ranks(shares, group).unbind()
    return ASLossTerms(inner, outer, boundary)


@names_errors("as_loss")
def as_loss(x: torch.Tensor, labels: torch.Tensor, *, lambda_inner: float = 1e-3,
            lambda_outer: float = 1e-3, lambda_boundary: float = 1e-2, **kwargs) -> torch.Tensor:
    """ASLoss = lambda_inner * inner - lambda_outer * outer + lambda_boundary * boundary.

    ``kwargs`` are those of :func:`as_loss_terms`.
    """
    options = dict(_TERM_DEFAULTS)
    unknown = set(kwargs) - set(options)
    if unknown:
        raise TypeError(f"as_loss() got unexpected keyword arguments {sorted(unknown)}")
    options.update(kwargs)
    t = _as_loss_terms(x, labels, **options, settings=dict(
        lambda_inner=lambda_inner, lambda_outer=lambda_outer, lambda_boundary=lambda_boundary))
    return lambda_inner * t.inner - lambda_outer * t.outer + lambda_boundary * t.boundary


# as_loss_terms's keyword arguments and their defaults (as_loss passes them through)
_TERM_DEFAULTS = {name: p.default for name, p in inspect.signature(as_loss_terms).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}


class ASLoss(nn.Module):
    """Aggregation-Separation Loss over one representation or a list of layers.

    ``forward(x, labels)`` with x [N, D], or a list [x_1, x_2, ...] of
    [N, D_l] representations summed with ``layer_weights`` (default 1 each).
    The paper trains with ``0.5 * cross_entropy + 0.5 * ASLoss``.
    ``global_batch=True``: the loss of the batch of all ranks (see :func:`as_loss_terms`).
    ``memory=CrossBatchMemory(size, D)``: every batch also meets the last ``size`` rows of
    earlier batches; in training mode each batch is enqueued after its loss is computed (with
    ``global_batch``, the gathered global batch, on every rank).
    ``ddp_gradient=True`` (with ``global_batch``): the gradient is scaled for DDP's averaging.
    ``last_terms`` holds the terms of the last call (one ASLossTerms per layer).
    """

    def __init__(self, metric: str = "euclidean", *, lambda_inner: float = 1e-3,
                 lambda_outer: float = 1e-3, lambda_boundary: float = 1e-2,
                 constraint: float = 10.0, include_self: bool = False,
                 reduction: str = "pair_mean", dim_mean: bool = False,
                 layer_weights: Sequence[float] | None = None, backend: str = "auto",
                 check_finite: bool | None = None, global_batch: bool = False, group=None,
                 memory: CrossBatchMemory | None = None, ddp_gradient: bool = False) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
        self.metric = metric
        self.lambda_inner = lambda_inner
        self.lambda_outer = lambda_outer
        self.lambda_boundary = lambda_boundary
        self.constraint = constraint
        self.include_self = include_self
        self.reduction = reduction
        self.dim_mean = dim_mean
        self.layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]
        self.backend = backend
        self.check_finite = check_finite
        self.global_batch = global_batch
        self.group = group
        if memory is not None:
            _check_memory(memory, "ASLoss")
        if ddp_gradient and not global_batch:
            raise ValueError("ASLoss: ddp_gradient=True needs global_batch=True")
        self.memory = memory
        self.ddp_gradient = ddp_gradient
        self.last_terms: list[ASLossTerms] = []

    @names_errors("ASLoss")
    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        layers = [x] if isinstance(x, torch.Tensor) else list(x)
        if not layers:
            raise ValueError("ASLoss needs at least one representation")
        weights = self.layer_weights if self.layer_weights is not None else [1.0] * len(layers)
        if len(weights) != len(layers):
            raise ValueError(f"layer_weights has {len(weights)} entries for {len(layers)} layers")
        if self.memory is not None and len(layers) != 1:
            raise ValueError("ASLoss with a memory takes one representation, not a list")
        total = None
        self.last_terms = []
        for layer, (weight, rep) in enumerate(zip(weights, layers)):
            t = _as_loss_terms(rep, labels, metric=self.metric, constraint=self.constraint,
                               include_self=self.include_self, reduction=self.reduction,
                               dim_mean=self.dim_mean, backend=self.backend,
                               check_finite=self.check_finite, global_batch=self.global_batch,
                               group=self.group, memory=self.memory,
                               ddp_gradient=self.ddp_gradient,
                               enqueue=self.training and self.global_batch, settings=dict(
                                   lambda_inner=self.lambda_inner,
                                   lambda_outer=self.lambda_outer,
                                   lambda_boundary=self.lambda_boundary, layers=len(layers),
                                   layer=layer, layer_weight=weight))
            self.last_terms.append(t)
            loss = (self.lambda_inner * t.inner - self.lambda_outer * t.outer
                    + self.lambda_boundary * t.boundary)
            total = weight * loss if total is None else total + weight * loss
        # (with global_batch the terms enqueued the gathered global batch, on every rank)
        if self.memory is not None and self.training and not self.global_batch:
            self.memory.enqueue(layers[0], labels)
        return total

    def extra_repr(self) -> str:
        return (f"metric={self.metric!r}, lambda_inner={self.lambda_inner}, "
                f"lambda_outer={self.lambda_outer}, lambda_boundary={self.lambda_boundary}, "
                f"constraint={self.constraint}, reduction={self.reduction!r}")

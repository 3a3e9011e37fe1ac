"""Streaming per-class feature statistics and Welch's t-test (docs/math.md, "Similar labels").

ClassStatistics keeps, per class c and feature k, the count n_c, the mean
m_ck and M2_ck = sum (x - m_ck)^2 in float64, and merges batches with Chan's
parallel update:
    n = n_a + n_b,  delta = m_b - m_a,  m = m_a + delta n_b / n,
    M2 = M2_a + M2_b + delta^2 n_a n_b / n
so statistics of different loaders or ranks combine with ``merge``. A batch's
own statistics are taken around a shift (the running mean), which keeps the
one-pass sums free of cancellation; the features are never stored.
"""

from __future__ import annotations

import math
import warnings

import torch

from .. import _extension
from .._routing import route
from .._counts import class_counts
from .._validation import (
    all_finite,
    check_labels,
    guard_label_range,
    host_checks,
    names_errors,
    poison_all,
)


if _extension.HAS_C and _extension.has_kernel("class_shifted_sums", "CPU"):
    @torch.library.register_fake("confusion_kernels::class_shifted_sums")
    def _fake_class_shifted_sums(features, labels, shift, num_classes):
        """Shapes of (count [C], s1 [C, K], s2 [C, K]), all float64 (no autograd: statistics)."""
        return (shift.new_empty(num_classes), torch.empty_like(shift), torch.empty_like(shift))


def _batch_sums(features: torch.Tensor, labels: torch.Tensor, shift: torch.Tensor,
                num_classes: int, backend: str):
    """(count [C], sum(x - shift_y) [C, K], sum((x - shift_y)^2) [C, K]) in float64, on the
    backend ``_routing.route`` picks for op "class_shifted_sums" (the rules and the
    CONFUSION_KERNELS_BACKEND variable of every op; there is no CUDA C++ kernel: "auto" takes
    Triton on a GPU)."""
    # (a backend that cannot run: select_backend's RuntimeError, which update's names_errors
    # names "ClassStatistics.update")
    chosen = route("class_shifted_sums", features,
                   "reference" if backend == "torch" else backend).backend
    if chosen == "cpu":
        return torch.ops.confusion_kernels.class_shifted_sums(features, labels, shift, num_classes)
    if chosen == "triton":
        from ..triton import class_stats

        return class_stats.shifted_sums(features, labels, shift, num_classes)
    x = features.to(torch.float64) - shift.index_select(0, labels)
    count = class_counts(labels, num_classes)
    zeros = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device)
    s1 = zeros.index_add(0, labels, x)
    s2 = zeros.index_add(0, labels, x * x)
    return count, s1, s2


def _chan(a: tuple, b: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) of two sets of statistics together (Chan's parallel update)."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    has = (n_b > 0).unsqueeze(1)
    safe = n.clamp_min(1)
    delta = mean_b - mean_a
    # per-class factors first ([C]), so that each [C, K] result is one pass over its inputs
    mean = torch.addcmul(mean_a, delta, (n_b / safe).unsqueeze(1))
    m2 = torch.add(m2_a, m2_b).addcmul_(delta.mul_(delta), (n_a * n_b / safe).unsqueeze(1))
    return n, torch.where(has, mean, mean_a), torch.where(has, m2, m2_a)


class ClassStatistics:
    """Per-class count, mean and unbiased variance of K features, streamed in float64.

    update(features [B, K], labels [B]) adds a batch (any device; one pass over
    the features: a fused Triton kernel on CUDA, a C++ kernel on CPU); merge(other) adds another
    ClassStatistics; all_reduce(group) merges those of every torch.distributed rank; counts [C],
    mean [C, K], var [C, K] (unbiased; NaN where a class has fewer than 2 samples) read the
    result.
    """

    def __init__(self, num_classes: int, num_features: int, device: torch.device | str = "cpu"):
        if num_classes < 1 or num_features < 1:
            raise ValueError("num_classes and num_features must be >= 1")
        self.num_classes, self.num_features = num_classes, num_features
        self.device = torch.device(device)
        self.counts, self.mean, self.m2 = self._zeros()
        # what the last all_reduce agreed on (the same on every rank), and what this rank
        # added since: all_reduce merges only the latter, so calling it again (or after more
        # updates) never counts a sample twice
        self._synced = self._zeros()
        self._pending = self._zeros()
        # while nothing has been synced, what this rank added is the whole statistics: one
        # Chan update per batch serves both (bit for bit the same: the same inputs)
        self._pending_is_total = True

    def _zeros(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c, k = self.num_classes, self.num_features
        return (torch.zeros(c, dtype=torch.float64, device=self.device),
                torch.zeros(c, k, dtype=torch.float64, device=self.device),
                torch.zeros(c, k, dtype=torch.float64, device=self.device))

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance [C, K] (NaN for classes with fewer than 2 samples)."""
        denom = (self.counts - 1).unsqueeze(1)
        return torch.where(denom > 0, self.m2 / denom.clamp_min(1), torch.full_like(self.m2, math.nan))

    @names_errors("ClassStatistics.update")
    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, *,
               backend: str = "auto") -> "ClassStatistics":
        """Adds a batch. backend: as for every op ("auto": Triton on CUDA tensors, the C++
        kernel on CPU tensors, else the reference; ``CONFUSION_KERNELS_BACKEND`` replaces
        "auto"), "reference" (vectorised PyTorch; "torch" is the same), "cpu" or "triton".
        A backend that cannot run raises RuntimeError saying why."""
        if backend not in ("auto", "reference", "torch", "cpu", "triton", "cuda"):
            raise ValueError("backend must be 'auto', 'reference', 'cpu', 'triton' or 'cuda', "
                             f"got {backend!r}")
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            raise ValueError(f"features must be a 2-D tensor [B, K], got {getattr(features, 'shape', None)}")
        if features.shape[1] != self.num_features:
            raise ValueError(f"features have K = {features.shape[1]}, expected {self.num_features}")
        if not features.dtype.is_floating_point:
            raise TypeError(f"features must be floating, got {features.dtype}")
        labels = check_labels(labels, features.shape[0], features.device)  # 0 rows too
        if features.shape[0] == 0:
            return self
        # on a GPU (no strict checks) labels out of range make every statistic NaN instead
        labels, bad = guard_label_range(labels, self.num_classes)
        shift = self._shift(features, labels)
        count, s1, s2 = _batch_sums(features, labels, shift, self.num_classes, backend)
        count, s1, s2 = (t.to(self.device) for t in (count, s1, s2))
        s1 = poison_all(s1, None if bad is None else bad.to(self.device))
        # a NaN / Inf feature makes its class's sums non-finite: checked on the
        # [C, K] sums instead of a second pass over the features (on the host where data
        # checks run there; elsewhere those (class, feature) statistics become NaN)
        if host_checks(features) and not bool(all_finite(s2)):
            if bool(torch.isfinite(features).all()):  # finite features: the squares overflowed
                bad = (~torch.isfinite(s2)).nonzero()[0].tolist()
                raise ValueError(
                    f"ClassStatistics: the sum of squared deviations of class {bad[0]}, feature "
                    f"{bad[1]} overflows float64 (deviations from the class mean above about "
                    "1e154); rescale the features (the statistics are left unchanged)")
            raise ValueError("features contain NaN or Inf (the statistics are left unchanged)")
        safe = count.clamp_min(1).unsqueeze(1)
        delta = s1 / safe  # batch mean - shift
        m2_b = torch.addcmul(s2, s1, delta, value=-1)  # sum (x - mean_b)^2 = s2 - s1^2 / n
        self._merge(count, shift.to(self.device) + delta, m2_b.clamp_min_(0))
        return self

    def _shift(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per class, the point the batch sums are taken around: the running mean,
        or, for a class not seen before, its first row in this batch (so the
        one-pass sums never carry |mean|^2 / variance of cancellation)."""
        shift = self.mean.to(features.device)
        empty = (self.counts == 0).to(features.device)
        # (for every class, also when none is new: deciding would make the host wait)
        order = torch.arange(labels.shape[0], device=features.device)
        first = torch.full((self.num_classes,), labels.shape[0], device=features.device,
                           dtype=torch.int64).scatter_reduce_(0, labels, order, "amin")
        fresh = empty & (first < labels.shape[0])
        rows = features.index_select(0, first.clamp_max(labels.shape[0] - 1)).to(torch.float64)
        return torch.where(fresh.unsqueeze(1), rows, shift)

    def _merge(self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        totals = _chan((self.counts, self.mean, self.m2), (n_b, mean_b, m2_b))
        self._pending = totals if self._pending_is_total else _chan(self._pending,
                                                                    (n_b, mean_b, m2_b))
        self.counts, self.mean, self.m2 = totals

    def merge(self, other: "ClassStatistics") -> "ClassStatistics":
        """Adds another ClassStatistics of the same shape (Chan's parallel merge)."""
        if not isinstance(other, ClassStatistics):
            raise TypeError(f"merge takes a ClassStatistics, got {type(other).__name__}")
        if (other.num_classes, other.num_features) != (self.num_classes, self.num_features):
            raise ValueError("cannot merge statistics of different shapes")
        self._merge(other.counts.to(self.device), other.mean.to(self.device), other.m2.to(self.device))
        return self

    @torch.no_grad()
    def all_reduce(self, group=None) -> "ClassStatistics":
        """Merges the statistics of every rank of ``group`` (torch.distributed; None: the
        default group) in place: afterwards every rank holds the same statistics, those of all
        the ranks' data together. Each rank gathers every rank's (count, mean, M2) and merges
        them in rank order with Chan's update, so the ranks agree bit for bit."""
        from .._distributed import agree, all_gather_same_shape, require_process_group

        require_process_group("ClassStatistics.all_reduce")
        # the gather needs equal shapes and dtypes: agreed first, so that a mismatch raises on
        # every rank (gloo aborted the process on a different C or D)
        agree("ClassStatistics.all_reduce", 0, dict(
            num_classes=self.num_classes, num_features=self.num_features,
            dtype=str(self.mean.dtype), device_type=self.mean.device.type), None, group)
        # only what each rank added since the last all_reduce: idempotent, and updates after
        # an all_reduce are not multiplied by the world size at the next one
        parts = [all_gather_same_shape(t, group) for t in self._pending]
        totals = self._synced
        for pending in zip(*parts):
            totals = _chan(totals, pending)
        self._synced, self._pending = totals, self._zeros()
        self._pending_is_total = False
        self.counts, self.mean, self.m2 = totals
        return self

    def rest(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, mean, M2) of "every class but c", per class c (totals minus class c,
        taken around the grand mean to limit cancellation)."""
        n_total = self.counts.sum()
        grand = (self.counts.unsqueeze(1) * self.mean).sum(0) / n_total.clamp_min(1)
        dev = self.mean - grand
        within = self.m2 + self.counts.unsqueeze(1) * dev * dev  # per class, around grand mean
        total = within.sum(0)
        n_rest = n_total - self.counts
        safe = n_rest.clamp_min(1).unsqueeze(1)
        rest_dev = -(self.counts.unsqueeze(1) * dev) / safe  # mean_rest - grand
        mean_rest = grand + rest_dev
        m2_rest = (total - within - n_rest.unsqueeze(1) * rest_dev * rest_dev).clamp_min(0)
        return n_rest, mean_rest, m2_rest

    _STATE = ("counts", "mean", "m2", "synced_counts", "synced_mean", "synced_m2",
              "pending_counts", "pending_mean", "pending_m2")

    def state_dict(self) -> dict:
        """The statistics as a dict of tensors and sizes (``torch.save``-able): counts, mean, M2,
        and what the last ``all_reduce`` agreed on and what was added since, so that a loaded
        copy merges with the other ranks exactly as this one would."""
        tensors = (self.counts, self.mean, self.m2, *self._synced, *self._pending)
        return {"num_classes": self.num_classes, "num_features": self.num_features,
                **{name: t.clone() for name, t in zip(self._STATE, tensors)}}

    def load_state_dict(self, state: dict) -> "ClassStatistics":
        """Replaces the statistics with those of ``state_dict()`` (on this object's device).
        The sizes must match; every tensor must be present with its shape."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = [k for k in ("num_classes", "num_features", *self._STATE) if k not in state]
        if missing:
            raise ValueError(f"state lacks {missing}")
        if (state["num_classes"], state["num_features"]) != (self.num_classes, self.num_features):
            raise ValueError(f"state holds {state['num_classes']} classes x "
                             f"{state['num_features']} features, this ClassStatistics "
                             f"{self.num_classes} x {self.num_features}")
        shapes = {"counts": (self.num_classes,)}
        loaded = []
        for name in self._STATE:
            t = state[name]
            want = shapes.get(name.rsplit("_", 1)[-1], (self.num_classes, self.num_features))
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                raise ValueError(f"state[{name!r}] must be a tensor of shape {want}, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
            loaded.append(t.detach().to(device=self.device, dtype=torch.float64).clone())
        self.counts, self.mean, self.m2 = loaded[:3]
        self._synced, self._pending = tuple(loaded[3:6]), tuple(loaded[6:])
        self._pending_is_total = False
        return self

    def to(self, device: torch.device | str) -> "ClassStatistics":
        """Moves the statistics to ``device`` in place (as ``nn.Module.to``) and returns self;
        later batches may come from any device."""
        self.device = torch.device(device)
        move = lambda ts: tuple(t.to(self.device) for t in ts)  # noqa: E731
        self.counts, self.mean, self.m2 = move((self.counts, self.mean, self.m2))
        self._synced, self._pending = move(self._synced), move(self._pending)
        return self

    def __repr__(self) -> str:
        return (f"ClassStatistics(num_classes={self.num_classes}, num_features={self.num_features}, "
                f"samples={int(self.counts.sum())})")


def _welch(n1, m1, v1, n2, m2, v2):
    """t and Welch-Satterthwaite df; t = 0 where both variances are 0 (docs/math.md, "Similar labels")."""
    a, b = v1 / n1, v2 / n2
    se2 = a + b
    zero = se2 == 0
    t = torch.where(zero, torch.zeros_like(se2), (m1 - m2) / se2.sqrt().masked_fill(zero, 1.0))
    df = se2 * se2 / (a * a / (n1 - 1) + b * b / (n2 - 1))
    return t, df


def _p_values(t: torch.Tensor, df: torch.Tensor, alternative: str) -> torch.Tensor:
    from scipy import stats as st

    tt, dd = t.detach().cpu().numpy(), df.detach().cpu().numpy()
    if alternative == "greater":
        p = st.t.sf(tt, dd)
    elif alternative == "less":
        p = st.t.cdf(tt, dd)
    else:
        p = 2 * st.t.sf(abs(tt), dd)
    import numpy as np

    p = np.where(np.isnan(dd) & (tt == 0), 0.5 if alternative != "two-sided" else 1.0, p)
    return torch.from_numpy(p).to(t.device)


@names_errors("welch_t_test")
def welch_t_test(stats: ClassStatistics, *, alternative: str = "greater", pairwise: bool = False):
    """Welch's t-test per class and feature.

    One-vs-rest (default): class c against all other samples; returns
    (t [C, K], df [C, K], p [C, K]). pairwise=True: class c against class c',
    (t, df, p) of shape [C, C, K]. Equal to scipy.stats.ttest_ind(a, b,
    equal_var=False, alternative=...). t and df are computed on the statistics'
    device; p uses scipy on the CPU. Where both variances are 0: t = 0 and
    p = 0.5 (one-sided) or 1 (two-sided). Classes with fewer than 2 samples
    (or no rest) give NaN.
    """
    if not isinstance(stats, ClassStatistics):
        raise TypeError(f"welch_t_test takes a ClassStatistics, got {type(stats).__name__}")
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    n, mean, var = stats.counts.unsqueeze(1), stats.mean, stats.var
    if pairwise:
        t, df = _welch(n[:, None], mean[:, None], var[:, None], n[None], mean[None], var[None])
    else:
        n_rest, mean_rest, m2_rest = stats.rest()
        denom = (n_rest - 1).unsqueeze(1)
        var_rest = torch.where(denom > 0, m2_rest / denom.clamp_min(1), torch.full_like(m2_rest, math.nan))
        t, df = _welch(n, mean, var, n_rest.unsqueeze(1), mean_rest, var_rest)
    return t, df, _p_values(t, df, alternative)


def _cosine_rows(v: torch.Tensor) -> torch.Tensor:
    v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return unit @ unit.T


def similarity_matrix(stats: ClassStatistics, *, method: str = "welch", statistic: str = "t",
                      alternative: str = "greater") -> torch.Tensor:
    """Sim [C, C] (float64) between every pair of classes, 1 on the diagonal, NaN off it for
    a class whose vector is undefined (no samples; for Welch fewer than 2 samples, or a rest of
    fewer than 2), with a warning naming those classes.

    method="welch": Sim(c, c') = cos(s^c, s^c') of the significance vectors
    s^c = (t_ck)_k, or (p_ck)_k / (-log10 p_ck)_k with statistic="p" / "neglogp";
    method="prototype": Sim = cos(m_c, m_c') of the class means.
    """
    if method not in ("welch", "prototype"):
        raise ValueError(f"method must be 'welch' or 'prototype', got {method!r}")
    if statistic not in ("t", "p", "neglogp"):
        raise ValueError(f"statistic must be 't', 'p' or 'neglogp', got {statistic!r}")
    if bool((stats.counts == 0).all()):
        raise ValueError("similar_labels: the statistics hold no samples (call update first)")
    if method == "prototype":
        vectors = stats.mean.masked_fill((stats.counts == 0)[:, None], math.nan)
    else:
        t, _, p = welch_t_test(stats, alternative=alternative)
        vectors = {"t": t, "p": p, "neglogp": -torch.log10(p.clamp_min(1e-300))}[statistic]
    vectors = vectors.to(torch.float64)
    # a class whose vector is undefined (no samples; for Welch fewer than 2, or a rest of
    # fewer than 2) has undefined similarities: NaN, never a number that could rank
    undefined = torch.isnan(vectors).all(1)
    empty = (stats.counts == 0).to(undefined.device)
    groups = [(undefined & empty, "no samples"),
              (undefined & ~empty, "fewer than 2 samples (or a rest of fewer than 2)")]
    why = [f"classes {mask.nonzero().flatten().tolist()} have {what}" for mask, what in groups
           if bool(mask.any())]
    if why:
        warnings.warn(f"similar_labels: {'; '.join(why)}: their similarities are undefined (NaN) "
                      "and they are never ranked as similar", RuntimeWarning, stacklevel=3)
    sim = _cosine_rows(vectors)
    sim = sim.masked_fill(undefined[:, None] | undefined[None, :], math.nan)
    return sim.fill_diagonal_(1.0)


@names_errors("similar_labels")
def similar_labels(stats: ClassStatistics, k: int = 5, *, method: str = "welch",
                   statistic: str = "t", alternative: str = "greater"):
    """The k most similar other classes of every class: (indices [C, k], scores [C, k]),
    the largest off-diagonal entries of each row of :func:`similarity_matrix`."""
    c = stats.num_classes
    if not 1 <= k <= c - 1:
        raise ValueError(f"k must lie in [1, {c - 1}] for {c} classes, got {k}")
    sim = similarity_matrix(stats, method=method, statistic=statistic, alternative=alternative)
    undefined = sim.isnan()
    # cosines lie in [-1, 1]: undefined ones rank after every real one, the class itself last
    sim = sim.masked_fill(undefined, -2.0).fill_diagonal_(-math.inf)
    scores, indices = sim.topk(k, dim=1)
    return indices, scores.masked_fill(undefined.gather(1, indices), math.nan)

"""Metric names, aliases, and the integer codes of the kernels.

Every registered op takes the metric's *name*; the C++ kernels map names to their codes
(``csrc/include/confusion_kernels/checks.h``), the Triton kernels use the codes below. Codes
and constants are defined once, in ``_spec.py``, which also generates the C++ header.
"""

from __future__ import annotations

from typing import NamedTuple

from ._spec import COSINE_EPS, GRAM_EXACT_FRACTION, PAIR_METRICS  # noqa: F401 (re-exported)

METRIC_CODES = {name: code for code, name in enumerate(PAIR_METRICS)}
EUCLIDEAN = METRIC_CODES["euclidean"]
SQEUCLIDEAN = METRIC_CODES["sqeuclidean"]
MANHATTAN = METRIC_CODES["manhattan"]
COSINE = METRIC_CODES["cosine"]
SMOOTH_L1 = METRIC_CODES["smooth_l1"]
# Metrics with a Gram form |a|^2 + |b|^2 - 2 a.b (matrix products).
GRAM_METRICS = frozenset({EUCLIDEAN, SQEUCLIDEAN, COSINE})

# alias -> (metric, forces dim_mean). The public ASLoss code uses nn.L1Loss /
# nn.MSELoss / nn.SmoothL1Loss, which average over the dimensions.
_ALIASES = {
    "l2": ("euclidean", False),
    "l1": ("manhattan", False),
    "squared_euclidean": ("sqeuclidean", False),
    "l1_mean": ("manhattan", True),
    "mse": ("sqeuclidean", True),
    "smooth_l1_mean": ("smooth_l1", True),
}


class ResolvedMetric(NamedTuple):
    name: str
    code: int
    dim_mean: bool


def resolve_metric(metric: str, dim_mean: bool = False) -> ResolvedMetric:
    """Canonical name, kernel code and effective ``dim_mean`` of a metric name or alias."""
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a string, got {type(metric).__name__}")
    key = metric.lower()
    if key in _ALIASES:
        key, forced = _ALIASES[key]
        dim_mean = dim_mean or forced
    if key not in METRIC_CODES:
        known = sorted(METRIC_CODES) + sorted(_ALIASES)
        raise ValueError(f"unknown metric {metric!r}; expected one of {known}")
    return ResolvedMetric(key, METRIC_CODES[key], bool(dim_mean))

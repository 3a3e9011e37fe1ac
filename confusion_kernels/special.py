"""log I_nu(kappa), the log of the modified Bessel function of the first kind, in log space.

The von Mises-Fisher normaliser of dimension D needs log I_{D/2-1}(kappa) for D up to a few
thousand and kappa from 1e-3 to 1e5, where I_nu itself under- or overflows float64 (and
``scipy.special.ive`` with it). Three regions, all in float64, none subtracting large terms:

* nu >= 50 (:data:`DEBYE_MIN_ORDER`): Debye's uniform asymptotic expansion in z = kappa/nu,
      I_nu(nu z) ~ e^{nu eta} / (sqrt(2 pi nu) (1 + z^2)^{1/4}) * sum_k u_k(t) / nu^k,
      t = 1/sqrt(1 + z^2),  eta = sqrt(1 + z^2) + log(z / (1 + sqrt(1 + z^2))),
  with the polynomials u_0..u_9 of t (generated exactly from their recurrence);
* nu < 50 and kappa^2/4 <= nu + 1: the power series
      I_nu(kappa) = (kappa/2)^nu / Gamma(nu + 1) * sum_k (kappa^2/4)^k / (k! (nu + 1)_k),
  whose terms fall at least like 1/k!, summed as log1p of the terms after the first;
* otherwise: the Debye value at nu + m (the smallest m with nu + m >= 50) and the ratios
  r_j = I_j / I_{j+1} carried down by the recurrence r_{j-1} = 2j/kappa + 1/r_j
  (stable downwards: every term is positive).

The derivative is d/dkappa log I_nu(kappa) = I_{nu+1}(kappa)/I_nu(kappa) + nu/kappa
(the vMF mean resultant length A_D(kappa) = I_{D/2}/I_{D/2-1} is its first term).
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import torch

from ._validation import host_checks, output_dtype

__all__ = ["log_bessel_iv", "bessel_iv_ratio", "DEBYE_MIN_ORDER"]

#: Orders from which the Debye expansion is used directly (below: series or recurrence).
DEBYE_MIN_ORDER = 50
_DEBYE_TERMS = 10  # u_0 .. u_9: the next term is below 1e-16 relative at nu >= 50
_SERIES_TERMS = 40  # ratio of consecutive terms <= 1/k in the series region


@lru_cache(maxsize=None)
def _debye_polynomials() -> tuple[tuple[float, ...], ...]:
    """Coefficients (in powers of t) of u_0..u_{K-1}, from
    u_{k+1}(t) = t^2 (1 - t^2)/2 * u_k'(t) + 1/8 * int_0^t (1 - 5 s^2) u_k(s) ds, u_0 = 1,
    in exact rational arithmetic."""
    polys = [[Fraction(1)]]
    for _ in range(_DEBYE_TERMS - 1):
        u = polys[-1]
        nxt = [Fraction(0)] * (len(u) + 3)
        for p, c in enumerate(u):  # t^2 (1 - t^2) / 2 * d/dt (c t^p)
            if p:
                nxt[p + 1] += c * p / 2
                nxt[p + 3] -= c * p / 2
        for p, c in enumerate(u):  # 1/8 * int_0^t (c s^p - 5 c s^{p+2}) ds
            nxt[p + 1] += c / (8 * (p + 1))
            nxt[p + 3] -= 5 * c / (8 * (p + 3))
        polys.append(nxt)
    return tuple(tuple(float(c) for c in u) for u in polys)


def _horner(coefs: tuple[float, ...], t: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(t)
    for c in reversed(coefs):
        out = out * t + c
    return out


def _log_iv_debye(nu: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """Debye's uniform expansion (nu >= DEBYE_MIN_ORDER; float64 tensors)."""
    z = kappa / nu
    root = torch.hypot(torch.ones_like(z), z)  # sqrt(1 + z^2) without overflowing z^2
    t = 1.0 / root
    eta = root + torch.log(z / (1.0 + root))
    inv_nu = 1.0 / nu
    total = torch.zeros_like(z)
    for u in reversed(_debye_polynomials()):
        total = total * inv_nu + _horner(u, t)
    out = nu * eta - 0.5 * torch.log(2.0 * math.pi * nu) + 0.5 * torch.log(t) + torch.log(total)
    return torch.where(torch.isinf(kappa), kappa, out)  # I_nu(inf) = inf


def _log_iv_series(nu: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """The power series (kappa^2/4 <= nu + 1; float64 tensors)."""
    q = 0.25 * kappa * kappa
    term = torch.ones_like(kappa)
    rest = torch.zeros_like(kappa)
    for k in range(1, _SERIES_TERMS + 1):
        term = term * q / (k * (nu + k))
        rest = rest + term
    # nu * log(kappa / 2) with 0 * log(0) = 0 (I_0(0) = 1)
    lead = torch.where(nu == 0, torch.zeros_like(kappa), nu * torch.log(0.5 * kappa))
    return lead - torch.lgamma(nu + 1.0) + torch.log1p(rest)


def _log_iv_recurrence(nu: torch.Tensor, kappa: torch.Tensor,
                       count: int | None = None) -> torch.Tensor:
    """Debye at nu + m >= DEBYE_MIN_ORDER, then m steps down the ratio recurrence
    (nu < DEBYE_MIN_ORDER; float64 tensors). ``count``: the largest m when the host knows it
    (a Python order), else read from the tensor."""
    steps = torch.ceil(DEBYE_MIN_ORDER - nu).clamp_min(0)
    top = nu + steps
    log_top = _log_iv_debye(top, kappa)
    r = torch.exp(log_top - _log_iv_debye(top + 1.0, kappa))  # I_top / I_{top+1}
    log_sum = torch.zeros_like(kappa)
    j = top
    if count is None:
        count = int(steps.max().item()) if steps.numel() else 0
    for _ in range(count):
        live = steps > 0
        r_next = 2.0 * j / kappa + 1.0 / r  # I_{j-1} / I_j
        log_sum = torch.where(live, log_sum + torch.log(r_next), log_sum)
        r = torch.where(live, r_next, r)
        j = torch.where(live, j - 1.0, j)
        steps = steps - 1
    return log_top + log_sum


def _log_iv64(nu: torch.Tensor, kappa: torch.Tensor, order: float | None = None) -> torch.Tensor:
    """log I_nu(kappa) elementwise for broadcast float64 tensors, nu >= 0, kappa >= 0.

    ``order``: the one value of nu as a Python number, when there is one (the vMF normaliser
    of dimension D: nu = D/2 - 1). Then the region is chosen on the host for the order and
    per element by torch.where for kappa, and nothing waits for the device (no host
    synchronisation); otherwise each region runs on the elements it holds."""
    nu, kappa = torch.broadcast_tensors(nu, kappa)
    if order is not None:
        if order >= DEBYE_MIN_ORDER:
            return _log_iv_debye(nu, kappa)
        series = 0.25 * kappa * kappa <= nu + 1.0
        # each region on every element, with a harmless argument where the other one applies
        in_series = _log_iv_series(nu, torch.where(series, kappa, 0.0))
        recurrence = _log_iv_recurrence(nu, torch.where(series, 1.0, kappa),
                                        math.ceil(DEBYE_MIN_ORDER - order))
        out = torch.where(series, in_series, recurrence)
        return torch.where(torch.isinf(kappa), kappa, out)
    out = torch.empty_like(kappa)
    debye = nu >= DEBYE_MIN_ORDER
    series = ~debye & (0.25 * kappa * kappa <= nu + 1.0)
    middle = ~debye & ~series
    for mask, fn in ((debye, _log_iv_debye), (series, _log_iv_series),
                     (middle, _log_iv_recurrence)):
        if mask.any():
            out[mask] = fn(nu[mask], kappa[mask])
    # kappa = 0: 0 for nu = 0 (series), -inf for nu > 0 (series or Debye); kappa = inf: inf
    return torch.where(torch.isinf(kappa), kappa, out)


def _iv_ratio64(nu: torch.Tensor, kappa: torch.Tensor, log_iv: torch.Tensor,
                order: float | None = None) -> torch.Tensor:
    """I_{nu+1}(kappa) / I_nu(kappa) from log_iv = log I_nu(kappa) (float64 tensors); 0 at
    kappa = 0, the limit (the logs give -inf - -inf there for nu > 0)."""
    above = None if order is None else order + 1.0
    ratio = torch.exp(_log_iv64(nu + 1.0, kappa, above) - log_iv)
    # kappa >> nu^2: both logs are about kappa, and their difference would keep none of the
    # ratio's digits (1e-16 instead of ~1 at nu = 1e4, kappa = 1e20); the large-argument
    # expansion gives the ratio directly there
    large = kappa > _LARGE_KAPPA * (nu + 1.0) ** 2
    ratio = torch.where(large, _large_kappa_ratio(nu, torch.where(large, kappa, 1e300)), ratio)
    return torch.where(kappa == 0, torch.zeros_like(ratio), ratio)


# kappa above this times (nu + 1)^2 uses _large_kappa_ratio: its k-th term is then below
# (1/50)^k / k!, and eight of them reach float64 precision.
_LARGE_KAPPA = 25.0


def _large_kappa_series(nu: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """sum_k (-1)^k a_k(nu) / kappa^k, a_k = prod_{j<=k} (4 nu^2 - (2j - 1)^2) / (k! 8^k):
    I_nu(kappa) = e^kappa / sqrt(2 pi kappa) times this (kappa >> nu^2)."""
    mu = 4.0 * nu * nu
    term = torch.ones_like(kappa)
    total = torch.ones_like(kappa)
    for k in range(1, 9):
        term = -term * (mu - (2 * k - 1) ** 2) / (k * 8.0 * kappa)
        total = total + term
    return total


def _large_kappa_ratio(nu: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """I_{nu+1}(kappa) / I_nu(kappa) for kappa >> nu^2, from the large-argument expansion."""
    return _large_kappa_series(nu + 1.0, kappa) / _large_kappa_series(nu, kappa)


def _as_float64(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64, device=like.device)


def bessel_iv_ratio(nu: torch.Tensor | float, kappa: torch.Tensor) -> torch.Tensor:
    """I_{nu+1}(kappa) / I_nu(kappa), elementwise (no gradient).

    The von Mises-Fisher mean resultant length A_D(kappa) is bessel_iv_ratio(D/2 - 1, kappa).
    """
    kappa64 = _checked_kappa(kappa)
    nu64, kappa64 = torch.broadcast_tensors(_checked_nu(nu, kappa64), kappa64)
    return _iv_ratio64(nu64, kappa64, _log_iv64(nu64, kappa64)).to(output_dtype(kappa.dtype))


def _checked_kappa(kappa: torch.Tensor) -> torch.Tensor:
    """kappa as float64 (detached). NaN or negative values raise where data checks run on
    the host (_validation.host_checks); elsewhere they become NaN, and give NaN."""
    if not isinstance(kappa, torch.Tensor):
        raise TypeError(f"kappa must be a tensor, got {type(kappa).__name__}")
    if not kappa.is_floating_point():
        raise TypeError(f"kappa must be a floating tensor, got {kappa.dtype}")
    k64 = kappa.detach().to(torch.float64)
    if host_checks(k64):
        if torch.isnan(k64).any() or (k64 < 0).any():
            raise ValueError("kappa must be >= 0 and not NaN")
        return k64
    return torch.where(k64 < 0, float("nan"), k64)


def _checked_nu(nu: torch.Tensor | float, kappa64: torch.Tensor) -> torch.Tensor:
    nu64 = _as_float64(nu.detach() if isinstance(nu, torch.Tensor) else nu, kappa64)
    if not torch.isfinite(nu64).all() or (nu64 < 0).any():
        raise ValueError("nu must be finite and >= 0")
    return nu64


class _LogBesselIv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kappa: torch.Tensor, kappa64: torch.Tensor,
                nu64: torch.Tensor) -> torch.Tensor:
        nu64, kappa64 = torch.broadcast_tensors(nu64, kappa64)
        log_iv = _log_iv64(nu64, kappa64)
        ctx.save_for_backward(kappa64, nu64, log_iv)
        ctx.kappa_shape = kappa.shape
        ctx.kappa_dtype = kappa.dtype
        return log_iv.to(output_dtype(kappa.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kappa64, nu64, log_iv = ctx.saved_tensors
        # d/dkappa log I_nu = I_{nu+1}/I_nu + nu/kappa; at kappa = 0 the limit is
        # 0 for nu = 0 (I_1(k) ~ k/2) and +inf for nu > 0 (log I_nu ~ nu log kappa)
        step = torch.where(nu64 == 0, torch.zeros_like(nu64), nu64 / kappa64)
        g = grad.to(torch.float64) * (_iv_ratio64(nu64, kappa64, log_iv) + step)
        # sum over the dimensions that nu broadcast kappa into
        g = g.sum_to_size(ctx.kappa_shape) if g.shape != ctx.kappa_shape else g
        return g.to(ctx.kappa_dtype), None, None


def log_bessel_iv(nu: torch.Tensor | float, kappa: torch.Tensor) -> torch.Tensor:
    """log I_nu(kappa), elementwise (broadcast), differentiable in kappa.

    d/dkappa log I_nu(kappa) = I_{nu+1}(kappa) / I_nu(kappa) + nu / kappa.

    Args:
        nu: order(s) >= 0, a number or a tensor (no gradient).
        kappa: argument(s) >= 0, floating tensor. Computed in float64; the result has
            kappa's dtype (float32 for 16-bit inputs).

    Accuracy (tests/test_special.py, against mpmath at 50 digits): relative error below
    1e-6 (in practice near 1e-13) for nu in [0, 2047] and kappa in [1e-3, 1e5], for the
    value and for the derivative; where log I_nu(kappa) is close to 0 the error is
    absolute, below 1e-12. Beyond: the value stays right up to the largest float64 (no
    square of kappa is formed) and kappa = inf gives inf; the derivative's ratio
    I_{nu+1}/I_nu comes from the large-argument expansion for kappa > 25 (nu + 1)^2 (float64
    precision), and between 1e5 and there from a difference of logs of size kappa, with a
    relative error of about kappa * 2e-16. kappa = 0 gives 0 for nu = 0 and -inf for nu > 0.

    Raises:
        ValueError: kappa < 0 or NaN, nu < 0 or not finite.
    """
    kappa64 = _checked_kappa(kappa)
    return _LogBesselIv.apply(kappa, kappa64, _checked_nu(nu, kappa64))

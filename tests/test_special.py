"""log_bessel_iv against mpmath (50 digits) and scipy: values and the kappa-derivative
I_{nu+1}/I_nu + nu/kappa over nu in [0, 2047] and kappa in [1e-3, 1e5], including where
scipy.special.ive under- or overflows, the region boundaries of the implementation, and
bad input."""

import math

import mpmath
import numpy as np
import pytest
import scipy.special
import torch

import confusion_kernels as ck
from confusion_kernels.special import DEBYE_MIN_ORDER, bessel_iv_ratio

mpmath.mp.dps = 50
# The contract is 1e-6 relative. The implementation reaches ~1e-14 for values and ~3e-11
# for the derivative (float64 spacing of log I ~ 1e5 at kappa = 1e5), so the tests hold
# it to that and a loss of accuracy fails them long before the contract is broken.
VALUE_RTOL = 1e-11
SLOPE_RTOL = 1e-10
ABS_NEAR_ZERO = 1e-12  # where log I_nu(kappa) ~ 0 the error is absolute


def _mp_log_iv(nu, kappa):
    return mpmath.log(mpmath.besseli(nu, kappa, maxterms=10**6))


def _mp_dlog_iv(nu, kappa):
    ratio = (mpmath.besseli(nu + 1, kappa, maxterms=10**6)
             / mpmath.besseli(nu, kappa, maxterms=10**6))
    return ratio + mpmath.mpf(nu) / kappa


def _check_points(nus, kappas):
    nu_t = torch.tensor(nus, dtype=torch.float64)
    k_t = torch.tensor(kappas, dtype=torch.float64, requires_grad=True)
    got = ck.log_bessel_iv(nu_t, k_t)
    got.sum().backward()
    for nu, kappa, value, slope in zip(nus, kappas, got.tolist(), k_t.grad.tolist()):
        want = float(_mp_log_iv(nu, kappa))
        err = abs(value - want)
        assert err <= max(VALUE_RTOL * abs(want), ABS_NEAR_ZERO), \
            f"log I_{nu}({kappa}): got {value!r}, mpmath {want!r}"
        want_slope = float(_mp_dlog_iv(nu, kappa))
        assert abs(slope - want_slope) <= SLOPE_RTOL * want_slope, \
            f"d/dkappa log I_{nu}({kappa}): got {slope!r}, mpmath {want_slope!r}"


GRID_NU = [0.0, 0.5, 1.0, 2.5, 10.0, 31.5, 49.0, 49.5, 50.0, 63.0, 100.0, 511.0, 2047.0]
GRID_KAPPA = [1e-3, 0.1, 1.0, 1.59, 5.0, 14.2, 30.0, 50.0, 300.0, 3e3, 1e5]


@pytest.mark.parametrize("nu", GRID_NU)
def test_grid_matches_mpmath(nu):
    _check_points([nu] * len(GRID_KAPPA), GRID_KAPPA)


def test_random_points_match_mpmath():
    g = np.random.default_rng()  # fresh points every run
    nus = np.where(g.random(40) < 0.5, g.integers(0, 2048, 40), g.uniform(0, 2047, 40))
    kappas = 10.0 ** g.uniform(-3, 5, 40)
    _check_points(nus.tolist(), kappas.tolist())


def test_region_boundaries_are_continuous():
    # the Debye / recurrence switch at nu = 50 and the series / recurrence switch at kappa^2/4 = nu + 1
    eps = 1e-9
    nus = [DEBYE_MIN_ORDER - eps, DEBYE_MIN_ORDER, 3.0, 3.0, 0.0, 0.0]
    kappas = [20.0, 20.0, 4.0 - eps, 4.0 + eps, 2.0 - eps, 2.0 + eps]
    _check_points(nus, kappas)


def test_matches_scipy_where_ive_is_finite_and_agrees_where_it_is_not():
    nu = torch.tensor([0.0, 5.0, 100.0, 400.0, 2047.0, 2047.0], dtype=torch.float64)
    kappa = torch.tensor([1e4, 0.3, 60.0, 1e5, 1e-3, 50.0], dtype=torch.float64)
    with np.errstate(all="ignore"):
        ive = scipy.special.ive(nu.numpy(), kappa.numpy())
    got = ck.log_bessel_iv(nu, kappa)
    ok = (ive > 0) & np.isfinite(ive)
    assert ok.any() and not ok.all(), "the test needs points on both sides of scipy's range"
    want = np.log(ive[ok]) + kappa.numpy()[ok]
    np.testing.assert_allclose(got.numpy()[ok], want, rtol=VALUE_RTOL)
    assert torch.isfinite(got).all()  # where ive underflowed to 0


def test_ratio_is_the_vmf_mean_resultant_length():
    kappa = torch.tensor([1e-3, 1.0, 40.0, 1e5], dtype=torch.float64)
    for dim in (2, 3, 128, 4096):
        got = bessel_iv_ratio(dim / 2 - 1, kappa)
        for g, k in zip(got.tolist(), kappa.tolist()):
            want = float(mpmath.besseli(dim / 2, k, maxterms=10**6)
                         / mpmath.besseli(dim / 2 - 1, k, maxterms=10**6))
            assert abs(g - want) <= SLOPE_RTOL * want


def test_gradcheck_and_broadcasting():
    nu = torch.tensor([[0.0], [1.5], [60.0]], dtype=torch.float64)
    kappa = torch.tensor([0.02, 3.0, 250.0, 9.0], dtype=torch.float64, requires_grad=True)
    assert ck.log_bessel_iv(nu, kappa).shape == (3, 4)
    assert torch.autograd.gradcheck(lambda k: ck.log_bessel_iv(nu, k), (kappa,))


def test_kappa_zero_and_dtypes():
    k = torch.tensor([0.0, 0.0, 2.0], dtype=torch.float32, requires_grad=True)
    out = ck.log_bessel_iv(torch.tensor([0.0, 3.0, 1.0]), k)
    assert out.dtype == torch.float32
    assert out[0].item() == 0.0 and out[1].item() == -math.inf
    out[0].backward()
    assert k.grad[0].item() == 0.0  # d/dkappa log I_0 at 0 = I_1(0)/I_0(0) = 0
    half = ck.log_bessel_iv(2.0, torch.tensor([1.0], dtype=torch.bfloat16))
    assert half.dtype == torch.float32


@pytest.mark.parametrize("nu,kappa,match", [
    (1.0, torch.tensor([-1.0]), "kappa"),
    (1.0, torch.tensor([float("nan")]), "kappa"),
    (-0.5, torch.tensor([1.0]), "nu"),
    (float("inf"), torch.tensor([1.0]), "nu"),
])
def test_bad_input_raises(nu, kappa, match):
    with pytest.raises(ValueError, match=match):
        ck.log_bessel_iv(nu, kappa)


def test_integer_kappa_is_rejected():
    with pytest.raises(TypeError, match="floating"):
        ck.log_bessel_iv(1.0, torch.tensor([2]))


@pytest.mark.parametrize("order", [0.0, 0.5, 7.0, 31.0, 49.5, 50.0, 63.0, 1000.0])
def test_order_known_on_the_host_gives_the_same_values(order):
    """The vMF path passes its order as a Python number (regions chosen without reading the
    tensor: no host synchronisation); it must equal the general, per-element path."""
    from confusion_kernels.special import _iv_ratio64, _log_iv64

    kappa = torch.cat([torch.logspace(-3, 5, 200, dtype=torch.float64),
                       torch.tensor([0.0], dtype=torch.float64)])
    nu = torch.full_like(kappa, order)
    general, known = _log_iv64(nu, kappa), _log_iv64(nu, kappa, order)
    torch.testing.assert_close(known, general, rtol=1e-14, atol=0)
    torch.testing.assert_close(_iv_ratio64(nu, kappa, known, order),
                               _iv_ratio64(nu, kappa, general), rtol=1e-14, atol=0)


@pytest.mark.parametrize("nu,kappa", [(1e4, 1e20), (0.0, 1e10), (63.0, 1e154), (63.0, 1e300),
                                      (2.5, 1e200), (1.0, 2e4), (300.0, 1e8)])
def test_huge_kappa_value_and_derivative(nu, kappa):
    """kappa^2 overflowed (NaN from 1.3e154) and the derivative's ratio, a difference of two
    logs of size kappa, kept no digit for kappa >> nu (1e-16 instead of ~1)."""
    mpmath.mp.dps = 60
    k = torch.tensor([kappa], dtype=torch.float64, requires_grad=True)
    value = ck.log_bessel_iv(nu, k)
    (grad,) = torch.autograd.grad(value.sum(), k)
    want_value = float(mpmath.log(mpmath.besseli(nu, kappa)))
    want_grad = float(mpmath.besseli(nu + 1, kappa) / mpmath.besseli(nu, kappa) + nu / kappa)
    assert value.item() == pytest.approx(want_value, rel=1e-13)
    assert grad.item() == pytest.approx(want_grad, rel=1e-12)


def test_infinite_kappa():
    k = torch.tensor([math.inf, math.inf], dtype=torch.float64)
    assert ck.log_bessel_iv(torch.tensor([3.0, 80.0], dtype=torch.float64), k).tolist() == [
        math.inf, math.inf]

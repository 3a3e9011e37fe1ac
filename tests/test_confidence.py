"""The confidence heads vmf_nll and gaussian_nll against independent formulas: mpmath
(50 digits) and scipy.stats.vonmises_fisher for the vMF density, torch.distributions.Normal
for the diagonal Normal; gradients by gradcheck and against the closed form
d NLL / d kappa = A_D(kappa) - mu.x; shapes and bad input."""

import math

import mpmath
import pytest
import scipy.stats
import torch

import confusion_kernels as ck

mpmath.mp.dps = 50


def _unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


def _mp_vmf_nll(dim, kappa, cos):
    nu = mpmath.mpf(dim) / 2 - 1
    k = mpmath.mpf(kappa)
    log_c = nu * mpmath.log(k) - mpmath.mpf(dim) / 2 * mpmath.log(2 * mpmath.pi) \
        - mpmath.log(mpmath.besseli(nu, k, maxterms=10**6))
    return -log_c - k * mpmath.mpf(cos)


@pytest.mark.parametrize("dim", [2, 3, 64, 4096])
def test_vmf_nll_matches_mpmath(dim):
    x, mu = _unit(5, dim, seed=dim), _unit(5, dim, seed=dim + 1)
    mu[0] = x[0]  # the sample on its mean direction
    kappa = torch.tensor([1e-3, 0.7, 30.0, 2e3, 1e5], dtype=torch.float64)
    got = ck.vmf_nll(x, mu, kappa)
    cos = (x * mu).sum(1)
    for g, k, c in zip(got.tolist(), kappa.tolist(), cos.tolist()):
        want = float(_mp_vmf_nll(dim, k, c))
        assert abs(g - want) <= 1e-10 * max(1.0, abs(want)), (dim, k, g, want)


@pytest.mark.parametrize("dim", [3, 10])
def test_vmf_nll_matches_scipy(dim):
    x, mu = _unit(6, dim, seed=3), _unit(1, dim, seed=4)[0]
    kappa = torch.tensor(7.5, dtype=torch.float64)
    want = -scipy.stats.vonmises_fisher(mu.numpy(), kappa.item()).logpdf(x.numpy())
    torch.testing.assert_close(ck.vmf_nll(x, mu, kappa), torch.from_numpy(want),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim", [3, 512, 4096])
def test_vmf_kappa_gradient_is_mean_resultant_length_minus_cosine(dim):
    # at small kappa and large D, log I_nu(kappa) - nu log kappa cancels; its derivative
    # I_{nu+1}/I_nu ~ kappa/(2 nu + 2) must keep its digits
    x, mu = _unit(4, dim, seed=5), _unit(4, dim, seed=6)
    kappa = torch.tensor([1e-3, 0.5, 80.0, 5e4], dtype=torch.float64, requires_grad=True)
    ck.vmf_nll(x, mu, kappa).sum().backward()
    cos = (x * mu).sum(1)
    for g, k, c in zip(kappa.grad.tolist(), kappa.tolist(), cos.tolist()):
        a = mpmath.besseli(dim / 2, k, maxterms=10**6) / mpmath.besseli(dim / 2 - 1, k, maxterms=10**6)
        want = float(a - mpmath.mpf(c))
        assert abs(g - want) <= 1e-9 * max(abs(want), float(a)), (dim, k, g, want)


def test_vmf_nll_gradcheck():
    x, mu = _unit(4, 6, seed=7), _unit(4, 6, seed=8)
    kappa = torch.tensor([0.3, 2.0, 15.0, 60.0], dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, mu, kappa))
    assert torch.autograd.gradcheck(ck.vmf_nll, inputs)


def test_vmf_nll_shapes_and_dtypes():
    x = _unit(3, 8, seed=9, dtype=torch.float32)
    mu = _unit(3, 8, seed=10, dtype=torch.float32)
    a = ck.vmf_nll(x, mu, torch.full((3, 1), 4.0))
    b = ck.vmf_nll(x, mu, torch.tensor(4.0))
    assert a.shape == (3,) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert ck.vmf_nll(x.half(), mu.half(), torch.tensor(4.0)).dtype == torch.float32


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(kappa=torch.tensor([1.0, 0.0, 1.0])), ValueError, "kappa must be > 0"),
    (dict(kappa=torch.tensor([1.0, -1.0, 1.0])), ValueError, "kappa"),
    (dict(kappa=torch.ones(2)), ValueError, "shape"),
    (dict(mu=torch.ones(3, 5, dtype=torch.float64)), ValueError, "mu"),
])
def test_vmf_nll_bad_input(kwargs, error, match):
    args = dict(x=_unit(3, 4, seed=1), mu=_unit(3, 4, seed=2),
                kappa=torch.ones(3, dtype=torch.float64))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ck.vmf_nll(**args)


@pytest.mark.parametrize("sigma_shape", [(5, 16), (5, 1), (16,), ()])
def test_gaussian_nll_matches_torch_distributions(sigma_shape):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)
    c = torch.randn(5, 16, generator=g, dtype=torch.float64)
    log_sigma = 0.5 * torch.randn(sigma_shape, generator=g, dtype=torch.float64)
    want = -torch.distributions.Normal(c, log_sigma.exp().expand(5, 16)).log_prob(x).sum(1)
    torch.testing.assert_close(ck.gaussian_nll(x, c, log_sigma), want, rtol=1e-12, atol=1e-12)


def test_gaussian_nll_large_dim_and_gradcheck():
    x = _unit(3, 4096, seed=12, dtype=torch.float32)
    c = _unit(3, 4096, seed=13, dtype=torch.float32)
    out = ck.gaussian_nll(x, c, torch.full((3, 1), -3.0))
    want = -torch.distributions.Normal(c.double(), math.exp(-3.0)).log_prob(x.double()).sum(1)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-3)
    inputs = (torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64),
              torch.randn(3, 5, dtype=torch.float64))
    inputs = tuple(t.requires_grad_(True) for t in inputs)
    assert torch.autograd.gradcheck(ck.gaussian_nll, inputs)


def test_gaussian_nll_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="log_sigma"):
        ck.gaussian_nll(x, torch.randn(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="centroids_y"):
        ck.gaussian_nll(x, torch.randn(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        ck.gaussian_nll(torch.full((3, 4), float("nan")), torch.randn(3, 4), torch.zeros(3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("log_sigma", [-50.0, -200.0, 60.0])
def test_gaussian_nll_finite_for_extreme_spreads(dtype, log_sigma):
    """log sigma = -50 in fp32 gave NaN (0 * exp(100) = 0 * inf) for a sample on its centroid;
    the value is sum_k log sigma_k + D/2 log 2 pi there, and its gradients are finite."""
    x = torch.randn(4, 3, dtype=dtype)
    c = x.clone()
    c[3, 0] += 1.0  # one sample off its centroid: +inf is right for it when sigma -> 0
    ls = torch.full((4, 3), log_sigma, dtype=dtype, requires_grad=True)
    xr = x.clone().requires_grad_(True)
    nll = ck.gaussian_nll(xr, c, ls)
    want = 3 * log_sigma + 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(nll[:3], torch.full((3,), want, dtype=dtype).to(nll.dtype))
    assert not nll.isnan().any()
    nll[:3].sum().backward()
    assert torch.isfinite(ls.grad[:3]).all() and torch.isfinite(xr.grad[:3]).all()

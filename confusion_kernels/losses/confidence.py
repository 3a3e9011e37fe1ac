"""Confidence heads of the N-Centroids loss: per-sample negative log-likelihoods of a unit
embedding x under a distribution around its class centroid, with a spread the model predicts.

* von Mises-Fisher on the sphere S^{D-1}, mean direction mu, concentration kappa > 0:
      NLL = -log C_D(kappa) - kappa mu.x,   C_D(kappa) = kappa^nu / ((2 pi)^{D/2} I_nu(kappa)),
      nu = D/2 - 1,  d NLL / d kappa = A_D(kappa) - mu.x,  A_D = I_{D/2} / I_{D/2-1}.
* Normal with diagonal covariance sigma^2 (log_sigma predicted):
      NLL = sum_k [log sigma_k + (x_k - c_k)^2 / (2 sigma_k^2)] + (D/2) log(2 pi).

Both return one value per sample ([N]); a large NLL under the nearest centroid (or a small
kappa / large sigma) marks an input the model is not confident about.
"""

from __future__ import annotations

import math

import torch

from .._validation import (
    accumulation_dtype,
    check_embeddings,
    host_checks,
    names_errors,
    output_dtype,
)
from ..special import _checked_kappa, _iv_ratio64, _log_iv64

__all__ = ["vmf_nll", "gaussian_nll", "log_vmf_normalizer"]


class _LogIvOverPower(torch.autograd.Function):
    """log(I_nu(kappa) / kappa^nu), with derivative I_{nu+1}(kappa) / I_nu(kappa).

    Written as one function because log I_nu(kappa) - nu log kappa cancels: their
    derivatives (ratio + nu/kappa) - nu/kappa would lose every digit of the ratio at
    small kappa and large nu (ratio ~ kappa / (2 nu + 2)).
    """

    @staticmethod
    def forward(ctx, kappa: torch.Tensor, k64: torch.Tensor, nu: float) -> torch.Tensor:
        nu64 = torch.full_like(k64, nu)
        log_iv = _log_iv64(nu64, k64, nu)  # the order known on the host: no host sync
        ctx.save_for_backward(k64, nu64, log_iv)
        ctx.dtype, ctx.nu = kappa.dtype, nu
        return log_iv - nu * torch.log(k64)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k64, nu64, log_iv = ctx.saved_tensors
        ratio = _iv_ratio64(nu64, k64, log_iv, ctx.nu)
        return (grad.to(torch.float64) * ratio).to(ctx.dtype), None, None


def log_vmf_normalizer(dim: int, kappa: torch.Tensor) -> torch.Tensor:
    """log C_D(kappa) = nu log kappa - (D/2) log(2 pi) - log I_nu(kappa), nu = D/2 - 1, in
    float64, differentiable in kappa (d/dkappa = -A_D(kappa)). kappa > 0."""
    if int(dim) != dim or dim < 2:
        raise ValueError(f"the vMF dimension must be an integer >= 2, got {dim}")
    k64 = _checked_kappa(kappa)
    if host_checks(k64):
        if (k64 == 0).any():
            raise ValueError("kappa must be > 0 (the vMF density at kappa = 0 is the uniform one)")
    else:  # no host check on a GPU: kappa = 0 gives NaN
        k64 = torch.where(k64 == 0, float("nan"), k64)
    return -_LogIvOverPower.apply(kappa, k64, dim / 2.0 - 1.0) - (dim / 2.0) * math.log(2.0 * math.pi)


def _per_sample(name: str, t: torch.Tensor, n: int,
                device: torch.device | None = None) -> torch.Tensor:
    """A per-sample parameter as [N]: accepts [N], [N, 1] or a 0-d tensor (on ``device``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape [N], [N, 1] or [] with N = {n}, "
                         f"got {tuple(t.shape)}")
    return t


def _matching_rows(name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] != x.shape[1] or t.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{name} must have shape [N, D] or [D] matching x {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return t


def _check_unit_rows(name: str, t: torch.Tensor) -> None:
    """ValueError unless every finite non-zero row of t has norm 1, to 1e-3 (fp16 rows
    normalised in fp16 are that close; a zero row is what normalising z = 0 gives). Checked
    on the host where that is free (``host_checks``). The vMF density lives on the sphere:
    off it, its value means nothing."""
    if not host_checks(t):
        return
    norms = torch.linalg.vector_norm(t.detach().to(accumulation_dtype(t.dtype)), dim=1)
    checked = torch.isfinite(norms) & (norms > 0)  # zero rows: the normalisation's image of 0
    off = torch.where(checked, (norms - 1.0).abs(), 0.0)
    worst = int(off.argmax())  # (x and mu hold at least one row: checked)
    if float(off[worst]) > 1e-3:
        raise ValueError(f"{name} must have unit rows (normalise them first: the density lives "
                         f"on the sphere); row {worst} has norm {float(norms[worst]):.6g}")


@names_errors("vmf_nll")
def vmf_nll(x: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """Per-sample von Mises-Fisher negative log-likelihood -log C_D(kappa) - kappa mu.x.

    Args:
        x: [N, D] unit embeddings (normalise them first: the density lives on the sphere;
            rows off the sphere by more than 1e-3 raise ValueError where the check needs no
            host synchronisation, i.e. on CPU tensors and under strict checks).
        mu: [N, D] (each sample's centroid, e.g. ``centroids[labels]``) or [D]; unit rows.
        kappa: [N], [N, 1] or [] concentrations > 0 (e.g. a softplus output of the model).

    Returns:
        [N] in x's dtype (float32 for 16-bit inputs). log C_D is computed in float64
        (``log_bessel_iv``), stable for D up to 4096 and kappa from 1e-3 to 1e5.
    """
    check_embeddings(x, "x")
    mu = _matching_rows("mu", mu, x)
    kappa = _per_sample("kappa", kappa, x.shape[0], x.device)
    _check_unit_rows("x", x)
    _check_unit_rows("mu", mu)
    out, work = output_dtype(x.dtype), accumulation_dtype(x.dtype)
    log_c = log_vmf_normalizer(x.shape[1], kappa)
    cos = (x.to(work) * mu.to(work)).sum(1)
    return (-log_c.to(work) - kappa.to(work) * cos).to(out)


@names_errors("gaussian_nll")
def gaussian_nll(x: torch.Tensor, centroids_y: torch.Tensor,
                 log_sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample diagonal-Normal negative log-likelihood
    sum_k [log sigma_k + (x_k - c_k)^2 / (2 sigma_k^2)] + (D/2) log(2 pi).

    Args:
        x: [N, D] embeddings.
        centroids_y: [N, D] (each sample's centroid) or [D].
        log_sigma: log standard deviations, broadcastable to [N, D] ([N, D], [N, 1], [D], []).

    Returns:
        [N] in x's dtype (float32 for 16-bit inputs); 1/sigma^2 is formed as exp(-2 log_sigma).
    """
    check_embeddings(x, "x")
    c = _matching_rows("centroids_y", centroids_y, x)
    if not isinstance(log_sigma, torch.Tensor):
        raise TypeError(f"log_sigma must be a torch.Tensor, got {type(log_sigma).__name__}")
    if log_sigma.device != x.device:
        raise ValueError(f"log_sigma is on {log_sigma.device} but x is on {x.device}")
    try:
        fits = torch.broadcast_shapes(log_sigma.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"log_sigma of shape {tuple(log_sigma.shape)} does not broadcast to "
                         f"x's {tuple(x.shape)}")
    out, work = output_dtype(x.dtype), accumulation_dtype(x.dtype)
    ls = log_sigma.to(work).expand(x.shape)
    diff = x.to(work) - c.to(work)
    # (x - c) / sigma with 0 where x = c: 0 * exp(-2 log sigma) was 0 * inf = NaN once
    # exp(-2 log sigma) overflowed (log sigma = -50 in fp32); the exponent is 0 there, so
    # neither the value nor the gradient meets the overflow
    z = diff * torch.exp(-torch.where(diff == 0, torch.zeros_like(ls), ls))
    nll = (ls + 0.5 * z * z).sum(1)
    return (nll + 0.5 * x.shape[1] * math.log(2.0 * math.pi)).to(out)

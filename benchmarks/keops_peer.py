"""KeOps formulation of intra_inter_sums, the peer the GPU benchmark compares with.

S_in[i] = sum_j [y_j == y_i] D(x_i, x_j), S_out[i] = sum_j [y_j != y_i] D(x_i, x_j)
as pykeops LazyTensor reductions: KeOps streams (i, j) tiles symbolically and
never forms the N x N matrix, like our kernels. Self pairs have D = 0, so they
may stay in S_in. Labels enter as float columns (exact below 2**24).
Benchmark-only code; pykeops is optional (`pip install pykeops`).
"""

from __future__ import annotations

import torch


def available() -> str | None:
    """None when pykeops imports, else the reason it cannot be used."""
    try:
        import pykeops  # noqa: F401
        from pykeops.torch import LazyTensor  # noqa: F401
    except Exception as exc:  # ImportError, or its build step failing
        return f"pykeops unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return None


def _distance(xi, xj, metric: str):
    diff = xi - xj
    if metric == "euclidean":
        return (diff ** 2).sum(-1).sqrt()  # KeOps: d sqrt(u) / du = 0 at u = 0
    if metric == "sqeuclidean":
        return (diff ** 2).sum(-1)
    if metric == "manhattan":
        return diff.abs().sum(-1)
    if metric == "smooth_l1":  # h(t) = c^2/2 + |t| - |c|, c = clamp(t, -1, 1)
        c = diff.clamp(-1.0, 1.0)
        return (0.5 * c.square() + diff.abs() - c.abs()).sum(-1)
    raise ValueError(f"no KeOps formulation for metric {metric!r}")


def intra_inter_sums(x: torch.Tensor, labels: torch.Tensor, metric: str = "euclidean"):
    """(S_in, S_out) of docs/math.md, "ASLoss" through KeOps; differentiable in x."""
    from pykeops.torch import LazyTensor

    lab = labels.to(x.dtype).reshape(-1, 1).contiguous()
    li, lj = LazyTensor(lab[:, None, :]), LazyTensor(lab[None, :, :])
    same = 1.0 - (li - lj).abs().sign()  # 1 on the same class, 0 elsewhere
    if metric == "cosine":  # 1 - <x_i/|x_i|, x_j/|x_j|> on the regular branch (|x| > 0)
        u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        ui, uj = LazyTensor(u[:, None, :]), LazyTensor(u[None, :, :])
        dist = 1.0 - (ui | uj)
        # the self pair: cos = 1 up to rounding; it is removed below
    else:
        xi, xj = LazyTensor(x[:, None, :]), LazyTensor(x[None, :, :])
        dist = _distance(xi, xj, metric)
    s_in = (dist * same).sum(dim=1).reshape(-1)
    s_out = (dist * (1.0 - same)).sum(dim=1).reshape(-1)
    if metric == "cosine":  # exclude the self pair's rounding residue
        u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        s_in = s_in - (1.0 - (u * u).sum(1))
    return s_in, s_out

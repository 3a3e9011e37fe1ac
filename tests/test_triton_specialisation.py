"""Every Triton kernel called with the integer values a GPU compiles differently.

On a GPU, Triton specialises integer arguments: one equal to 1 becomes a compile-time
constant, and one divisible by 16 carries that as a hint (aligned, vectorised loads). The
interpreter specialises nothing, so a kernel whose code is wrong only for those values
passes every other interpreter test. Here each kernel (every ``*_kernel`` of
confusion_kernels.triton) runs with shapes that give it an argument equal to 1 and one that
is a positive multiple of 16, against the reference in float64; the launches are recorded to
show that each kernel got such values (scripts/triton_aot.py compiles the same shapes for
sm_80 / sm_90, where the specialisation is real).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import inspect

import pytest
import torch

import confusion_kernels as ck
from confusion_kernels.reference import n_centroids as ncl

from conftest import assert_rel, interpreted, require_backend

MODULES = ("pair_pass", "intra_inter_sums", "affinity", "n_centroids", "class_stats")
TOL = 1e-10


def _kernels() -> list[str]:
    names = []
    for module in MODULES:
        mod = importlib.import_module(f"confusion_kernels.triton.{module}")
        names += [f"{module}.{name}" for name, obj in vars(mod).items()
                  if name.endswith("_kernel") and hasattr(obj, "fn")]
    return sorted(names)


SEEN: dict[str, set[str]] = collections.defaultdict(set)
FLOAT_ARGS: dict[str, set[str]] = collections.defaultdict(set)  # kernel -> float parameters


@contextlib.contextmanager
def _recording():
    """Records, per kernel, whether an int argument was 1 / a positive multiple of 16, and
    which parameters got a Python float."""
    from triton.runtime.interpreter import GridExecutor

    original = GridExecutor.__call__

    def launch(self, *args, **kwargs):
        name = f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"
        params = list(inspect.signature(self.fn).parameters)
        named = list(zip(params, args)) + list(kwargs.items())
        FLOAT_ARGS[name].update(p for p, a in named if isinstance(a, float))
        for a in args:
            if isinstance(a, int) and not isinstance(a, bool):
                if a == 1:
                    SEEN[name].add("one")
                if a > 0 and a % 16 == 0:
                    SEEN[name].add("div16")
        return original(self, *args, **kwargs)

    GridExecutor.__call__ = launch
    try:
        yield
    finally:
        GridExecutor.__call__ = original


@pytest.fixture(autouse=True)
def _interpreter_only():
    device = require_backend("triton")
    if not interpreted("triton"):
        pytest.skip("records interpreter launches (on a GPU the compiled kernels run)")
    with _recording():
        yield device


def _data(n: int, d: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


def _grad(out: torch.Tensor, x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), x, retain_graph=True)[0]


# (N, D): N = 1 gives one row block and one round; D = 1 and D = 16, 32 the dimension cases
SHAPES = [(1, 16), (16, 1), (32, 16), (17, 32)]


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "manhattan"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_intra_inter_sums(metric, shape):
    n, d = shape
    x, y = _data(n, d, 3, n + d)
    x.requires_grad_(True)
    got = ck.intra_inter_sums(x, y, metric, backend="triton")
    want = ck.intra_inter_sums(x, y, metric, backend="reference")
    for a, b, what in zip(got, want, ("S_in", "S_out")):
        assert_rel(a, b, TOL, what)
        assert_rel(_grad(a, x, 1), _grad(b, x, 1), TOL, f"d{what}/dx")


@pytest.mark.parametrize("n,m,offset", [(1, 16, 0), (16, 32, None), (16, 17, 1)])
def test_intra_inter_sums_rect(n, m, offset):
    ref, ref_y = _data(m, 16, 3, m)
    x, y = (ref[offset:offset + n].clone(), ref_y[offset:offset + n]) if offset is not None \
        else _data(n, 16, 3, n)
    x.requires_grad_(True)
    kwargs = dict(ref=ref, ref_labels=ref_y, self_offset=offset)
    got = ck.intra_inter_sums(x, y, "euclidean", backend="triton", **kwargs)
    want = ck.intra_inter_sums(x, y, "euclidean", backend="reference", **kwargs)
    for a, b in zip(got, want):
        assert_rel(a, b, TOL, "rect sums")
        assert_rel(_grad(a, x, 2), _grad(b, x, 2), TOL, "rect gradient")


@pytest.mark.parametrize("n,c,m,d", [(16, 1, 1, 16), (1, 16, 2, 1), (32, 3, 16, 16)])
def test_affinity(n, c, m, d):
    f, y = _data(n, d, c, n + c)
    g = torch.Generator().manual_seed(m)
    w = torch.randn(c, m, d, generator=g, dtype=torch.float64, requires_grad=True)
    f.requires_grad_(True)
    args = dict(sigma=2.0, margin=0.5, lambda_diversity=0.0)
    got = ck.affinity_loss(f, y, w, backend="triton", **args)
    want = ck.affinity_loss(f, y, w, backend="reference", **args)
    assert_rel(got, want, TOL, "affinity loss")
    for a, b in zip(torch.autograd.grad(got, (f, w)), torch.autograd.grad(want, (f, w))):
        assert_rel(a, b, TOL, "affinity gradient")


@pytest.mark.parametrize("metric", ["euclidean", "great_circle"])
@pytest.mark.parametrize("n,k,d", [(1, 16, 16), (16, 2, 1), (32, 16, 16)])
def test_n_centroids(metric, n, k, d):
    z, y = _data(n, d, k, n + k)
    c = ncl.normalize(_data(k, d, 1, k + 100)[0])
    z[0] = c[(y[0] + 1) % k]  # on another class's centroid: the exact pass runs
    z.requires_grad_(True)
    got = ck.n_centroids_loss(z, y, c, metric=metric, backend="triton")
    want = ck.n_centroids_loss(z, y, c, metric=metric, backend="reference")
    assert_rel(got, want, TOL, "N-Centroids loss")
    assert_rel(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0], TOL,
               "N-Centroids gradient")


@pytest.mark.parametrize("b,k", [(1, 16), (16, 1), (32, 48)])
def test_class_statistics(b, k):
    x, y = _data(b, k, 3, b + k)
    got = ck.ClassStatistics(3, k).update(x, y, backend="triton")
    want = ck.ClassStatistics(3, k).update(x, y, backend="torch")
    torch.testing.assert_close(got.counts, want.counts)
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.m2, want.m2, rtol=1e-10, atol=1e-12)


def test_every_kernel_got_both_specialised_values():
    """Runs last in this file (pytest keeps the order): the records of the tests above."""
    if not SEEN:
        pytest.skip("the tests above did not run (selected out)")
    missing = {name: sorted({"one", "div16"} - SEEN.get(name, set())) for name in _kernels()}
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"kernels never called with these specialised values: {missing}"
    assert len(_kernels()) >= 12


def test_float_arguments_are_fp32_pairs():
    """A Python float argument is an fp32 kernel parameter on the GPU (the interpreter keeps
    a double): an fp64 kernel would compute with a rounded sigma. The only float arguments
    are (hi, lo) pairs of fp32 numbers (affinity's sigma and margin, hi + lo = the double)."""
    if not SEEN:
        pytest.skip("the tests above did not run (selected out)")
    loose = {k: sorted(p for p in v if not p.endswith(("_hi", "_lo")))
             for k, v in FLOAT_ARGS.items()}
    loose = {k: v for k, v in loose.items() if v}
    assert not loose, f"float kernel arguments that a GPU would round to fp32: {loose}"
    assert FLOAT_ARGS["affinity._forward_kernel"] == {"sigma_hi", "sigma_lo", "margin_hi",
                                                      "margin_lo"}

"""Every op confusion_kernels registers (C++ forward and backward ops, and the Triton custom
ops) passes torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch),
and a new op cannot be added without a sample here: the registry is compared with SAMPLES."""

from __future__ import annotations

import pytest
import torch

import confusion_kernels  # noqa: F401  (registers the ops)
import confusion_kernels.analysis  # noqa: F401
from confusion_kernels import _extension
from confusion_kernels.reference import n_centroids as ncl

from conftest import make_batch, require_backend

TRITON_OPS = {"intra_inter_sums_triton", "intra_inter_sums_triton_backward",
              "affinity_hinge_triton", "affinity_hinge_triton_backward",
              "weighted_pair_sums_with_grad_triton", "n_centroids_rows_triton",
              "n_centroids_rows_triton_backward", "intra_inter_sums_rect_triton",
              "intra_inter_sums_rect_triton_backward", "pair_loss_stats_triton",
              "pair_loss_backward_triton", "nearest_neighbors_triton"}


def _rows(device, grad=True):
    x, labels = make_batch(11, 4, 3, seed=7, device=device)
    return x.requires_grad_(grad), labels


def _affinity(device):
    g = torch.Generator().manual_seed(8)
    f = torch.randn(9, 4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    w = torch.randn(3, 2, 4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    labels = torch.randint(0, 3, (9,), generator=g).to(device)
    return f, w, labels


def _ncl(device):
    g = torch.Generator().manual_seed(9)
    z = torch.randn(9, 4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    c = ncl.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64)).to(device)
    labels = torch.randint(0, 3, (9,), generator=g).to(device)
    return z, c, labels


def _affinity_backward_args(device, forward):
    f, w, labels = _affinity(device)
    _, d_true, active = forward(f, w, labels, 2.0, 0.5, "gaussian")
    return (torch.randn(9, dtype=torch.float64, device=device), f.detach(), w.detach(), labels,
            d_true, active, 2.0, 0.5, "gaussian")


def _ncl_backward_args(device, forward):
    z, c, labels = _ncl(device)
    hardest = forward(z, c, labels, "great_circle", True)[1]
    return (torch.randn(9, dtype=torch.float64, device=device), z.detach(), c, labels, hardest,
            "great_circle", True)


def _rect(device, grad=True, self_offset=2):
    x, labels = _rows(device, grad)
    g = torch.Generator().manual_seed(10)
    ref = torch.randn(16, 4, generator=g, dtype=torch.float64).to(device)
    ref[2:13] = x.detach()
    ref_labels = torch.randint(0, 3, (16,), generator=g).to(device)
    ref_labels[2:13] = labels
    return x, labels, ref.requires_grad_(grad), ref_labels, self_offset


def _rect_backward(device, metric, algorithm="direct"):
    return (torch.randn(11, dtype=torch.float64, device=device),
            torch.randn(11, dtype=torch.float64, device=device), *_rect(device, grad=False),
            metric, algorithm)


def _pair_weights(device):
    x, labels = _rows(device)
    w = torch.rand(11, dtype=torch.float64, device=device)
    return (x, labels, w, w.flip(0), "euclidean")


def _pair_loss(device, grad=True, loss="supcon", metric="cosine"):
    x, labels, ref, ref_labels, self_offset = _rect(device, grad)
    params = {"contrastive": [0.1, 0.9], "multi_similarity": [2.0, 50.0, 0.5]}.get(loss, [0.2])
    return x, labels, ref, ref_labels, self_offset, loss, params, metric


def _pair_loss_backward(device, stats_op=None):
    x, labels, ref, ref_labels, self_offset, loss, params, metric = _pair_loss(
        device, grad=False, loss="contrastive", metric="euclidean")
    _, stats = (stats_op or ops.pair_loss_stats)(x, labels, ref, ref_labels, self_offset, loss,
                                                 params, metric)
    return (torch.randn(11, 2, dtype=torch.float64, device=device), stats, x, labels, ref,
            ref_labels, self_offset, loss, params, metric)


ops = torch.ops.confusion_kernels
# op name -> (backend whose device runs it, function device -> args)
SAMPLES = {
    "intra_inter_sums": ("cpu", lambda dev: (*_rows(dev), "euclidean", "pair_pass")),
    "intra_inter_sums_backward": ("cpu", lambda dev: (
        torch.randn(11, dtype=torch.float64, device=dev),
        torch.randn(11, dtype=torch.float64, device=dev), *_rows(dev, grad=False), "cosine",
        "direct")),
    "intra_inter_sums_triton": ("triton", lambda dev: (*_rows(dev), "manhattan", "direct")),
    "intra_inter_sums_triton_backward": ("triton", lambda dev: (
        torch.randn(11, dtype=torch.float64, device=dev),
        torch.randn(11, dtype=torch.float64, device=dev), *_rows(dev, grad=False), "euclidean",
        "pair_pass")),
    "intra_inter_sums_rect": ("cpu", lambda dev: (*_rect(dev), "cosine", "gram_tiles")),
    "intra_inter_sums_rect_backward": ("cpu", lambda dev: _rect_backward(dev, "euclidean")),
    "intra_inter_sums_rect_triton": ("triton", lambda dev: (*_rect(dev, self_offset=None),
                                                            "smooth_l1", "direct")),
    "intra_inter_sums_rect_triton_backward": ("triton", lambda dev: _rect_backward(dev, "cosine")),
    "weighted_pair_sums_with_grad": ("cpu", _pair_weights),
    "weighted_pair_sums_with_grad_triton": ("triton", _pair_weights),
    "affinity_hinge": ("cpu", lambda dev: (*_affinity(dev), 2.0, 0.5, "gaussian")),
    "affinity_hinge_sum_with_grad": ("cpu", lambda dev: (*_affinity(dev), 2.0, 0.5, "inverse")),
    "affinity_hinge_backward": ("cpu", lambda dev: _affinity_backward_args(
        dev, ops.affinity_hinge)),
    "affinity_hinge_triton": ("triton", lambda dev: (*_affinity(dev), 2.0, 0.5, "gaussian")),
    "affinity_hinge_triton_backward": ("triton", lambda dev: _affinity_backward_args(
        dev, ops.affinity_hinge_triton)),
    "n_centroids_rows": ("cpu", lambda dev: (*_ncl(dev), "euclidean", True)),
    "n_centroids_sum_with_grad": ("cpu", lambda dev: (*_ncl(dev), "great_circle", True)),
    "n_centroids_rows_backward": ("cpu", lambda dev: _ncl_backward_args(
        dev, ops.n_centroids_rows)),
    "n_centroids_rows_triton": ("triton", lambda dev: (*_ncl(dev), "cosine", True)),
    "n_centroids_rows_triton_backward": ("triton", lambda dev: _ncl_backward_args(
        dev, ops.n_centroids_rows_triton)),
    "pair_loss_stats": ("cpu", lambda dev: _pair_loss(dev, loss="ntxent")),
    "pair_loss_backward": ("cpu", _pair_loss_backward),
    "pair_loss_stats_triton": ("triton", lambda dev: _pair_loss(dev, loss="multi_similarity",
                                                               metric="euclidean")),
    "pair_loss_backward_triton": ("triton", lambda dev: _pair_loss_backward(
        dev, ops.pair_loss_stats_triton)),
    "nearest_neighbors": ("cpu", lambda dev: (
        torch.randn(13, 3, dtype=torch.float64, device=dev),
        torch.randn(13, 3, dtype=torch.float64, device=dev), 4, "euclidean", None)),
    "nearest_neighbors_triton": ("triton", lambda dev: (
        torch.randn(13, 3, dtype=torch.float64, device=dev),
        torch.randn(20, 3, dtype=torch.float64, device=dev), 4, "euclidean", 2)),
    "class_shifted_sums": ("cpu", lambda dev: (
        torch.randn(10, 3, dtype=torch.float32, device=dev), torch.arange(10, device=dev) % 4,
        torch.randn(4, 3, dtype=torch.float64, device=dev), 4)),
}


def test_every_registered_op_has_a_sample():
    registered = set(_extension.OPS) | TRITON_OPS
    missing = registered - set(SAMPLES)
    assert not missing, f"ops without an opcheck sample: {sorted(missing)}"
    for name in TRITON_OPS:  # the Triton custom ops exist under these names
        assert hasattr(ops, name), name


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name):
    backend, make_args = SAMPLES[name]
    device = require_backend(backend, name)
    torch.library.opcheck(getattr(ops, name), make_args(device))


def test_custom_op_parameters_parse_on_the_oldest_torch():
    """torch 2.6 (constraints/oldest.txt) infers a custom op's schema only from typing's
    generics for its parameters (typing.Sequence[float], Optional[int]); list[float] or
    int | None made the import fail there. Read from the source: the newer torch here accepts
    both spellings."""
    import ast
    import pathlib

    import confusion_kernels.ops as ops_package

    found = 0
    for path in sorted(pathlib.Path(ops_package.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef) or not any(
                    "custom_op" in ast.unparse(d) for d in node.decorator_list):
                continue
            found += 1
            for arg in node.args.args:
                text = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                assert not any(bad in text for bad in ("list[", "tuple[", "dict[", "|")), (
                    f"{path.name}: {node.name}({arg.arg}: {text})")
    assert found >= len(TRITON_OPS)

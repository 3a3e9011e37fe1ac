"""One router (confusion_kernels/_routing.py) decides backend and algorithm for every op.

- The rules, per backend, metric, D and dtype (cuda's rules are plain functions of the input's
  dtype and D, so they are checked here without a GPU), and the two cuda switches.
- What the public functions and losses run is what ``route`` says (the ops' calls are recorded).
- Every algorithm an op runs gives the float64 reference's values and gradients, on ragged
  shapes with duplicates and singleton classes, including the ones ``auto`` never picks on
  this machine (e.g. the pair pass at D = 3, the difference form at D = 20).
- No other module decides: the small-D threshold and the cuda switches are read only here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import confusion_kernels as ck
from confusion_kernels import _routing
from confusion_kernels.reference import intra_inter_sums as reference_sums

from conftest import assert_rel, make_batch, require_backend

ROOT = Path(__file__).resolve().parents[1]
GRAM = ("euclidean", "sqeuclidean", "cosine")
F64 = torch.float64


def _x(dim: int, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(4, dim, dtype=dtype)


# --- the rules --------------------------------------------------------------------------------

@pytest.mark.parametrize("metric,dim,want", [
    ("euclidean", 8, "direct"), ("euclidean", 9, "pair_pass"), ("sqeuclidean", 64, "pair_pass"),
    ("cosine", 2, "pair_pass"), ("manhattan", 64, "direct"), ("smooth_l1", 3, "direct")])
def test_cpu_square_rules(metric, dim, want):
    assert _routing.square_algorithm("cpu", metric, _x(dim)) == want


@pytest.mark.parametrize("metric,want", [("euclidean", "pair_pass"), ("cosine", "pair_pass"),
                                         ("manhattan", "direct"), ("smooth_l1", "direct")])
def test_triton_square_takes_the_pair_pass_at_any_dimension(metric, want):
    for dim in (1, 8, 64):
        assert _routing.square_algorithm("triton", metric, _x(dim)) == want


@pytest.mark.parametrize("dtype,metric,want", [
    (torch.float32, "euclidean", "gram_tiles"), (torch.float16, "sqeuclidean", "gram_tiles"),
    (torch.bfloat16, "euclidean", "gram_tiles"), (torch.float32, "cosine", "gram_tiles"),
    (torch.float16, "cosine", "pair_pass"), (torch.bfloat16, "cosine", "pair_pass"),
    (torch.float64, "euclidean", "pair_pass"), (torch.float64, "cosine", "pair_pass"),
    (torch.float32, "manhattan", "direct")])
def test_cuda_square_rules(monkeypatch, dtype, metric, want):
    monkeypatch.delenv(_routing.CUDA_EXACT_ENV, raising=False)
    monkeypatch.delenv(_routing.CUDA_PAIR_PASS_ENV, raising=False)
    assert _routing.square_algorithm("cuda", metric, _x(32, dtype)) == want
    # small D: the difference form, cosine included (unlike the cpu)
    assert _routing.square_algorithm("cuda", metric, _x(8, dtype)) == "direct"


def test_cuda_switches(monkeypatch):
    monkeypatch.setenv(_routing.CUDA_PAIR_PASS_ENV, "1")
    assert _routing.square_algorithm("cuda", "euclidean", _x(32)) == "pair_pass"
    assert _routing.square_algorithm("cuda", "manhattan", _x(32)) == "direct"
    monkeypatch.setenv(_routing.CUDA_EXACT_ENV, "1")  # wins over the pair-pass switch
    assert _routing.square_algorithm("cuda", "euclidean", _x(32)) == "direct"
    monkeypatch.setenv(_routing.CUDA_EXACT_ENV, "0")
    monkeypatch.setenv(_routing.CUDA_PAIR_PASS_ENV, "")
    assert _routing.square_algorithm("cuda", "euclidean", _x(32)) == "gram_tiles"
    # the switches are the square op's: the one-pass ASLoss terms and the cpu keep their rules
    monkeypatch.setenv(_routing.CUDA_EXACT_ENV, "1")
    assert _routing.square_algorithm("cpu", "euclidean", _x(32)) == "pair_pass"


@pytest.mark.parametrize("backend,metric,dim,want", [
    ("cpu", "euclidean", 9, "gram_tiles"), ("cpu", "euclidean", 8, "direct"),
    ("cpu", "cosine", 2, "gram_tiles"), ("cpu", "manhattan", 64, "direct"),
    ("triton", "euclidean", 64, "direct"), ("cuda", "cosine", 64, "direct"),
    ("reference", "euclidean", 64, "reference")])
def test_rect_rules(backend, metric, dim, want):
    assert _routing.rect_algorithm(backend, metric, _x(dim)) == want


def test_per_row_rules():
    for op in ("affinity_hinge", "n_centroids_rows"):
        assert _routing.per_row_algorithm("triton", op, needs_grad=True) == "rows"
        assert _routing.per_row_algorithm("reference", op, needs_grad=True) == "reference"
        if "cpu" in ck.available_backends():
            assert _routing.per_row_algorithm("cpu", op, needs_grad=True) == "sum_with_grad"
            assert _routing.per_row_algorithm("cpu", op, needs_grad=False) == "rows"


def test_diversity_rule():
    assert _routing.diversity_algorithm(2048, 16) == "pairwise"
    assert _routing.diversity_algorithm(2049, 16) == "moments"
    assert _routing.diversity_algorithm(4096, 8192) == "pairwise"  # P <= D: pairwise is cheaper
    g = torch.Generator().manual_seed(1)
    many = torch.randn(2050, 1, 4, generator=g, dtype=F64)  # P = 2050 > 2048 and > D
    assert_rel(ck.diversity_regularizer(many), ck.diversity_moments(many), 0, "auto = moments")
    few = many[:40]
    from confusion_kernels.losses.affinity import diversity_pairwise

    assert_rel(ck.diversity_regularizer(few), diversity_pairwise(few), 0, "auto = pairwise")


def test_route_names_its_ops_and_refuses_others():
    x = torch.randn(5, 3)
    assert ck.route("intra_inter_sums", x, "reference", metric="euclidean") == \
        ck.Route("reference", "reference")
    assert ck.route("class_shifted_sums", x, "reference") == ("reference", "reference")
    with pytest.raises(ValueError, match="unknown op 'pair_sums'"):
        ck.route("pair_sums", x)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run intra_inter_sums"):
        ck.route("intra_inter_sums", x, "cuda", metric="euclidean")


# --- backend="auto" at small N on CPU -----------------------------------------------------------

def test_cpu_size_thresholds_are_the_committed_measurement():
    """CPU_FUSED_MIN_ROWS holds what benchmarks/crossover.py derives from the committed CSV
    it names (every routed key; the rectangular op is measured but never routed by size)."""
    import csv
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("crossover", root / "benchmarks" / "crossover.py")
    crossover = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crossover)
    with open(root / _routing.CROSSOVER_SOURCE) as f:
        rows = [dict(r, N=int(r["N"])) for r in csv.DictReader(f)]
    measured = crossover.thresholds(rows)
    measured.pop("intra_inter_sums_rect")
    assert measured == _routing.CPU_FUSED_MIN_ROWS
    routed = {key.split("[")[0] for key in measured}
    assert routed == set(_routing.OPS) - {"intra_inter_sums_rect"}


@pytest.mark.parametrize("op,metric", [("as_loss_terms", "euclidean"), ("as_loss_terms", "cosine"),
                                       ("intra_inter_sums", "euclidean"),
                                       ("pair_loss", "euclidean")])
def test_auto_takes_the_reference_below_the_cpu_threshold(monkeypatch, op, metric):
    require_backend("cpu")
    monkeypatch.delenv("CONFUSION_KERNELS_BACKEND", raising=False)
    need = _routing.cpu_fused_min_rows(op, metric)
    assert need > 1
    small, large = torch.randn(need - 1, 20), torch.randn(need, 20)
    assert ck.route(op, small, metric=metric).backend == "reference"
    assert ck.route(op, large, metric=metric).backend == "cpu"
    assert ck.route(op, small, "cpu", metric=metric).backend == "cpu"  # explicit: as asked
    monkeypatch.setenv("CONFUSION_KERNELS_BACKEND", "cpu")
    assert ck.route(op, small, metric=metric).backend == "cpu"


def test_unmeasured_metric_takes_its_ops_largest_threshold():
    assert _routing.cpu_fused_min_rows("as_loss_terms", "smooth_l1") == max(
        n for key, n in _routing.CPU_FUSED_MIN_ROWS.items() if key.startswith("as_loss_terms["))
    assert _routing.cpu_fused_min_rows("intra_inter_sums_rect", "euclidean") == 0
    require_backend("cpu")
    x = torch.randn(3, 20)
    assert ck.route("intra_inter_sums_rect", x, metric="euclidean").backend == "cpu"


def test_auto_small_batch_gives_the_fused_value():
    """Below the threshold auto runs the reference: the same loss and gradient as the kernel."""
    require_backend("cpu")
    x, labels = make_batch(40, 20, 4, seed=8)
    x.requires_grad_(True)
    loss = ck.as_loss(x, labels)
    (gx,) = torch.autograd.grad(loss, x)
    fused = ck.as_loss(x, labels, backend="cpu")
    (gf,) = torch.autograd.grad(fused, x)
    assert_rel(loss, fused, 1e-5, "loss")
    assert_rel(gx, gf, 1e-5, "grad")


# --- what runs is what route says --------------------------------------------------------------

class _RecordOps(TorchDispatchMode):
    """Records (op name, string arguments) of every confusion_kernels op that runs."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "confusion_kernels":
            self.calls.append((func._opname, tuple(a for a in args if isinstance(a, str))))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("metric,dim", [("euclidean", 3), ("euclidean", 20), ("cosine", 3),
                                        ("manhattan", 20)])
def test_the_ops_run_the_routed_algorithm(backend, metric, dim):
    device = require_backend(backend)
    x, labels = make_batch(11, dim, 3, seed=dim, device=device)
    x.requires_grad_(True)
    want = ck.route("intra_inter_sums", x, backend, metric=metric)
    with _RecordOps() as rec:
        s_in, s_out = ck.intra_inter_sums(x, labels, metric, backend=backend)
        (s_in.sum() + s_out.sum()).backward()
    ran = [(name, args) for name, args in rec.calls if name.startswith("intra_inter_sums")]
    assert [args for _, args in ran] == [(metric, want.algorithm)] * 2, ran
    assert len(ran) == 2 and ran[1][0].endswith("backward")


@pytest.mark.parametrize("metric,dim,want", [("euclidean", 20, "weighted_pair_sums_with_grad"),
                                             ("euclidean", 3, "intra_inter_sums"),
                                             ("manhattan", 20, "intra_inter_sums")])
def test_as_loss_runs_the_routed_path(metric, dim, want):
    require_backend("cpu")
    x, labels = make_batch(12, dim, 3, seed=5)
    x.requires_grad_(True)
    chosen = ck.route("as_loss_terms", x, "cpu", metric=metric, needs_grad=True)
    assert (chosen.algorithm == "one_pass") == want.startswith("weighted")
    with _RecordOps() as rec:
        ck.as_loss(x, labels, metric=metric, backend="cpu").backward()
    names = [name for name, _ in rec.calls]
    assert names[0] == want, names
    if want == "intra_inter_sums":
        assert rec.calls[0][1] == (metric, chosen.algorithm)


def test_losses_follow_the_per_row_route():
    require_backend("cpu", "affinity_hinge")
    g = torch.Generator().manual_seed(3)
    f = torch.randn(9, 4, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(3, 2, 4, generator=g, dtype=F64)
    labels = torch.randint(0, 3, (9,), generator=g)
    for needs_grad, want in ((True, "affinity_hinge_sum_with_grad"), (False, "affinity_hinge")):
        with _RecordOps() as rec, torch.set_grad_enabled(needs_grad):
            ck.affinity_loss(f, labels, w, backend="cpu")
        assert [name for name, _ in rec.calls] == [want]
    z = torch.randn(9, 4, generator=g, dtype=F64, requires_grad=True)
    c = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=F64), dim=1)
    for needs_grad, want in ((True, "n_centroids_sum_with_grad"), (False, "n_centroids_rows")):
        with _RecordOps() as rec, torch.set_grad_enabled(needs_grad):
            ck.n_centroids_loss(z, labels, c, backend="cpu")
        assert [name for name, _ in rec.calls] == [want]


# --- every algorithm an op runs is exact -------------------------------------------------------

def _square_op(backend: str):
    if backend == "triton":
        return torch.ops.confusion_kernels.intra_inter_sums_triton
    return torch.ops.confusion_kernels.intra_inter_sums


SQUARE_RUNS = {"cpu": ("direct", "pair_pass"), "triton": ("direct", "pair_pass")}


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("metric", GRAM)
@pytest.mark.parametrize("n,dim", [(1, 3), (13, 3), (37, 20)])
def test_every_square_algorithm_matches_the_reference(backend, metric, n, dim):
    """Both algorithms at both sides of the D threshold, N = 1 and ragged N, duplicates and
    (with 4 classes in 13 rows) classes of one row."""
    device = require_backend(backend)
    x, labels = make_batch(n, dim, 4, seed=n + dim, device=device)
    x.requires_grad_(True)
    w_in, w_out = torch.rand(n, dtype=F64, device=device), torch.rand(n, dtype=F64, device=device)
    want_in, want_out = reference_sums(x, labels, metric)
    (want_grad,) = torch.autograd.grad((w_in * want_in + w_out * want_out).sum(), x)
    for algorithm in SQUARE_RUNS[backend]:
        s_in, s_out = _square_op(backend)(x, labels, metric, algorithm)
        (grad,) = torch.autograd.grad((w_in * s_in + w_out * s_out).sum(), x)
        what = f"{backend} {algorithm} {metric} N={n} D={dim}"
        assert_rel(s_in, want_in, 1e-10, what + " S_in")
        assert_rel(s_out, want_out, 1e-10, what + " S_out")
        assert_rel(grad, want_grad, 1e-9, what + " grad")


@pytest.mark.parametrize("metric", GRAM)
def test_every_cpu_square_algorithm_passes_gradcheck(metric):
    require_backend("cpu")
    x, labels = make_batch(9, 5, 3, seed=11)
    x = x.requires_grad_(True)
    for algorithm in SQUARE_RUNS["cpu"]:
        assert torch.autograd.gradcheck(
            lambda t: _square_op("cpu")(t, labels, metric, algorithm), (x,))


@pytest.mark.parametrize("metric", GRAM)
@pytest.mark.parametrize("dim", [3, 20])
def test_every_cpu_rect_algorithm_matches_the_reference(metric, dim):
    require_backend("cpu", "intra_inter_sums_rect")
    g = torch.Generator().manual_seed(dim)
    ref = torch.randn(23, dim, generator=g, dtype=F64)
    ref_labels = torch.randint(0, 3, (23,), generator=g)
    x, labels = ref[4:15].clone(), ref_labels[4:15].clone()
    x[0] = ref[20]  # a duplicate of a row that is not x's own
    x.requires_grad_(True)
    ref.requires_grad_(True)
    want = reference_sums(x, labels, metric, ref=ref, ref_labels=ref_labels, self_offset=4)
    want_grads = torch.autograd.grad(want[0].sum() - 2 * want[1].sum(), (x, ref))
    for algorithm in ("direct", "gram_tiles"):
        got = torch.ops.confusion_kernels.intra_inter_sums_rect(x, labels, ref, ref_labels, 4,
                                                                metric, algorithm)
        grads = torch.autograd.grad(got[0].sum() - 2 * got[1].sum(), (x, ref))
        for a, b, what in zip((*got, *grads), (*want, *want_grads),
                              ("S_in", "S_out", "grad x", "grad ref")):
            assert_rel(a, b, 1e-9, f"{algorithm} {metric} D={dim} {what}")


def test_triton_refuses_what_it_has_no_kernel_for():
    device = require_backend("triton")
    x, labels = make_batch(6, 3, 2, seed=1, device=device)
    with pytest.raises(ValueError, match="algorithm 'gram_tiles' has no Triton kernel; it runs "
                                         "direct or pair_pass"):
        _square_op("triton")(x, labels, "euclidean", "gram_tiles")
    with pytest.raises(ValueError, match="'pair_pass' is a Gram form"):
        _square_op("triton")(x, labels, "manhattan", "pair_pass")
    with pytest.raises(ValueError, match="unknown algorithm 'auto'"):
        _square_op("triton")(x, labels, "euclidean", "auto")
    rect = torch.ops.confusion_kernels.intra_inter_sums_rect_triton
    with pytest.raises(ValueError, match="algorithm 'gram_tiles' has no Triton kernel; it runs "
                                         "direct"):
        rect(x, labels, x, labels, 0, "euclidean", "gram_tiles")


# --- nothing else decides ---------------------------------------------------------------------

def _sources(*patterns: str) -> list[Path]:
    return [p for pattern in patterns for p in sorted(ROOT.glob(pattern))]


def test_the_rules_live_in_the_router_only():
    """The small-D threshold and the cuda switches are read by _routing.py alone: a second
    reading (a C++ op that chooses by itself, a loss with its own rule) fails here."""
    python = _sources("confusion_kernels/**/*.py")
    cpp = _sources("csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.cuh", "csrc/**/*.h")
    offenders = []
    for path in python + cpp:
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("confusion_kernels/_routing.py", "confusion_kernels/_spec.py",
                   "csrc/include/confusion_kernels/spec.h"):
            continue
        code = "\n".join(line.split("#")[0] if path.suffix == ".py" else line.split("//")[0]
                         for line in path.read_text().splitlines())
        for name in ("DIRECT_MAX_DIM", "kDirectMaxDim", "CONFUSION_KERNELS_CUDA_EXACT",
                     "CONFUSION_KERNELS_CUDA_PAIR_PASS", "getenv"):
            if re.search(rf"\b{name}\b", code):
                offenders.append(f"{rel}: {name}")
    assert not offenders, offenders

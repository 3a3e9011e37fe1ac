"""Retrieval (ck.nearest_neighbors, ck.retrieval_metrics): the fused CPU and Triton kernels
(Triton under TRITON_INTERPRET=1 without a GPU) against the reference in float64 and against a
brute force written here from scipy's cdist, the scores against pytorch-metric-learning's
AccuracyCalculator, the tie rule, and the input rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import confusion_kernels as ck
from confusion_kernels.reference import retrieval as ref_retrieval
from conftest import require_backend

scipy_distance = pytest.importorskip("scipy.spatial.distance")

METRICS = ("euclidean", "sqeuclidean", "cosine")
FUSED = ["cpu", "triton", "cuda"]  # cuda: skipped without a GPU
# (N, M or None for self-retrieval, k): ragged against the kernel's tiles (64 or more queries,
# 512 references), k beyond the references, one query, more neighbours than one tile, the
# Triton kernel's largest KP (128), and beyond its registers (199)
SHAPES = [(130, None, 7), (70, 2100, 50), (3, None, 5), (1, 1, 3), (65, 1025, 1200),
          (200, None, 199), (150, None, 100)]


def _device(backend: str) -> torch.device:
    """The backend's device (the reference runs on CPU here), or skip saying why."""
    if backend == "reference":
        return torch.device("cpu")
    return require_backend(backend, "nearest_neighbors")


def _kernel_max(backend: str) -> int | None:
    """The most neighbours the backend's kernel keeps (triton and cuda: 1024; None: any
    number)."""
    from confusion_kernels.ops.nearest_neighbors import max_neighbors

    return max_neighbors(backend)


def _require_depth(backend: str, depth: int) -> None:
    """Skip where the backend's kernel cannot keep ``depth`` neighbours (its error:
    test_gpu_kernels_refuse_more_neighbours_than_they_keep)."""
    most = _kernel_max(backend)
    if most is not None and depth > most:
        pytest.skip(f"the {backend} kernel keeps at most {most} neighbours (with this Triton), "
                    f"the test needs {depth}")


def _rows(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype)


def _brute_force(q: np.ndarray, r: np.ndarray, k: int, metric: str, self_retrieval: bool):
    """Distances and indices from scipy's cdist and a stable argsort (ties: lower index)."""
    dist = scipy_distance.cdist(q, r, metric)
    if self_retrieval:
        np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")
    kk = min(k, r.shape[0] - int(self_retrieval))
    order = order[:, :kk]
    return np.take_along_axis(dist, order, 1), order


def _scores_brute_force(q, yq, r, yr, metric, ks, self_retrieval):
    """The scores of a loop over queries, from the full sorted distance rows."""
    dist = scipy_distance.cdist(q, r, metric)
    if self_retrieval:
        np.fill_diagonal(dist, np.inf)
    sums = {"precision_at_1": 0.0, "r_precision": 0.0, "mean_average_precision_at_r": 0.0,
            **{f"recall_at_{k}": 0.0 for k in ks}}
    counted = 0
    for i in range(q.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        if self_retrieval:
            order = order[order != i]
        rel = (yr[order] == yq[i]).astype(float)
        r_i = int(rel.sum())
        if r_i == 0:
            continue
        counted += 1
        hits = rel[:r_i]
        sums["precision_at_1"] += rel[0]
        sums["r_precision"] += hits.sum() / r_i
        sums["mean_average_precision_at_r"] += (
            hits * np.cumsum(hits) / np.arange(1, r_i + 1)).sum() / r_i
        for k in ks:
            sums[f"recall_at_{k}"] += float(rel[:k].max())
    return {key: v / counted for key, v in sums.items()}, counted


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_neighbors_equal_the_reference_and_scipy(backend, metric, shape):
    device = _device(backend)
    n, m, k = shape
    if backend == "triton" and m is not None and m > 1024:
        pytest.skip("interpreter time: the CPU tiles' ragged edges; Triton's ragged tiles are "
                    "the other shapes' (130 rows, 150 of KP = 128)")
    _require_depth(backend, min(k, (m or n) - (m is None)))
    q = _rows(n, 9, seed=n + k)
    r = None if m is None else _rows(m, 9, seed=m + 1)
    dist, idx = ck.nearest_neighbors(q.to(device), None if r is None else r.to(device), k,
                                     metric=metric, backend=backend)
    want_d, want_i = ref_retrieval.nearest_neighbors(
        q, q if r is None else r, k, metric, 0 if r is None else None)
    assert torch.equal(idx.cpu(), want_i)
    torch.testing.assert_close(dist.cpu(), want_d, rtol=1e-12, atol=1e-12)
    sd, si = _brute_force(q.numpy(), (q if r is None else r).numpy(), k, metric, r is None)
    np.testing.assert_array_equal(idx.cpu().numpy(), si)
    np.testing.assert_allclose(dist.cpu().numpy(), sd, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_float32_neighbors_are_the_float64_ones_on_separated_data(backend):
    """In float32 the order comes from the Gram form: equal to float64 for every query whose
    consecutive neighbour distances are far apart compared with that form's rounding (about
    1e-7 |q|^2 in squared distance)."""
    device = _device(backend)
    g = torch.Generator().manual_seed(3)
    small = backend == "triton"  # the interpreter: about a tenth of the work
    q = torch.randn(60 if small else 300, 16, generator=g)
    r = torch.randn(700 if small else 3000, 16, generator=g)
    d32, i32 = ck.nearest_neighbors(q.to(device), r.to(device), 20, backend=backend)
    d64, i64 = ck.nearest_neighbors(q.double(), r.double(), 20, backend="reference")
    gaps = (d64[:, 1:] - d64[:, :-1]).min(dim=1).values
    separated = gaps > 1e-4
    assert separated.float().mean() > 0.8
    assert torch.equal(i32.cpu()[separated], i64[separated])
    torch.testing.assert_close(d32.cpu().double(), d64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("metric", METRICS)
def test_ties_go_to_the_lower_reference_index(backend, metric):
    """Duplicated references (exactly equal distances, zero distances included) come in index
    order, on each side of the reference tiles."""
    device = _device(backend)
    base = _rows(40, 6, seed=5)
    r = torch.cat([base, base[:7], base, base[3:9]])  # copies across reference tiles of 512
    r = torch.cat([r, _rows(1024 - r.shape[0] + 30, 6, seed=6)])
    r[1030] = base[2]  # a copy in the third tile
    q = torch.cat([base[:5], _rows(3, 6, seed=7)])
    dist, idx = ck.nearest_neighbors(q.to(device), r.to(device), 12, metric=metric,
                                     backend=backend)
    dist, idx = dist.cpu(), idx.cpu()
    for i in range(q.shape[0]):
        for t in range(idx.shape[1] - 1):
            if dist[i, t] == dist[i, t + 1]:
                assert idx[i, t] < idx[i, t + 1], (i, t)
    # query 2 is base[2]: its copies sit at 2 (base), 42 (base[:7] from 40), 49 (base again
    # from 47; base[3:9] from 87 holds none) and 1030, all at distance 0, in index order
    copies = [2, 42, 49, 1030]
    assert idx[2, :4].tolist() == copies
    assert torch.all(dist[2, :4] <= 1e-12)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("self_retrieval", [True, False])
def test_scores_equal_a_brute_force(backend, metric, self_retrieval):
    device = _device(backend)
    g = torch.Generator().manual_seed(11)
    q = torch.randn(157, 8, generator=g, dtype=torch.float64)
    yq = torch.randint(0, 12, (157,), generator=g)
    yq[0] = 40  # a query whose label no other sample has: left out
    m = 160 if backend == "triton" else 1100  # triton: the interpreter
    r = q if self_retrieval else torch.randn(m, 8, generator=g, dtype=torch.float64)
    yr = yq if self_retrieval else torch.randint(0, 12, (m,), generator=g)
    _require_depth(backend, max(int(torch.bincount(yr).max()), 30))
    ks = (1, 4, 30)
    got = ck.retrieval_metrics(q.to(device), yq.to(device),
                               None if self_retrieval else r.to(device),
                               None if self_retrieval else yr.to(device),
                               metric=metric, k=ks, backend=backend)
    want, counted = _scores_brute_force(q.numpy(), yq.numpy(), r.numpy(), yr.numpy(), metric,
                                        ks, self_retrieval)
    assert got["num_queries"] == counted
    assert got["num_left_out"] == 157 - counted == 1
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_single_class_and_singleton_classes(backend):
    device = _device(backend)
    n = 37
    q = _rows(n, 5, seed=13).to(device)
    one = ck.retrieval_metrics(q, torch.zeros(n, dtype=torch.long, device=device),
                               k=(1, 50), backend=backend)
    assert one["precision_at_1"] == one["r_precision"] == one["recall_at_50"] == 1.0
    assert one["mean_average_precision_at_r"] == 1.0
    assert one["num_queries"] == n and one["num_left_out"] == 0
    lone = ck.retrieval_metrics(q, torch.arange(n, device=device), backend=backend)
    assert lone["num_queries"] == 0 and lone["num_left_out"] == n
    assert np.isnan(lone["precision_at_1"])


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_per_class_averages(backend):
    device = _device(backend)
    _require_depth(backend, 59)  # the class of 60
    g = torch.Generator().manual_seed(17)
    q = torch.randn(90, 4, generator=g, dtype=torch.float64)
    y = torch.cat([torch.zeros(60, dtype=torch.long), torch.ones(25, dtype=torch.long),
                   torch.full((5,), 7)])
    got = ck.retrieval_metrics(q.to(device), y.to(device), per_class=True, k=3,
                               backend=backend)
    assert got["classes"].tolist() == [0, 1, 7]
    per_query = {}
    for c in (0, 1, 7):
        mask = y == c
        # the class's mean over its queries, from the brute force on the whole set
        scores = []
        for i in mask.nonzero().flatten().tolist():
            s, _ = _scores_brute_force(q.numpy()[i:i + 1], y.numpy()[i:i + 1],
                                       np.delete(q.numpy(), i, 0), np.delete(y.numpy(), i),
                                       "euclidean", (3,), False)
            scores.append(s["r_precision"])
        per_query[c] = np.mean(scores)
    np.testing.assert_allclose(got["per_class"]["r_precision"].cpu().numpy(),
                               [per_query[c] for c in (0, 1, 7)], rtol=1e-12)
    assert got["r_precision"] == pytest.approx(np.mean(list(per_query.values())), rel=1e-12)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_equal_to_pytorch_metric_learning(backend):
    """AccuracyCalculator (its default euclidean k-NN; faiss where installed) on data without
    ties: P@1, R-precision and MAP@R, self-retrieval and a separate reference set, and its
    avg_of_avgs."""
    pytest.importorskip("faiss", reason="needs faiss-cpu for PML's AccuracyCalculator")
    acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator",
                              reason="needs pytorch-metric-learning")
    device = _device(backend)
    g = torch.Generator().manual_seed(19)
    n, nq = (250, 40) if backend == "triton" else (700, 150)  # triton: the interpreter
    x = torch.randn(n, 12, generator=g)
    y = torch.randint(0, 25, (n,), generator=g)
    y[3] = 99  # a lone query
    qx = torch.randn(nq, 12, generator=g)
    qy = torch.randint(0, 25, (nq,), generator=g)
    keys = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    for avg in (False, True):
        calc = acc.AccuracyCalculator(include=keys, avg_of_avgs=avg, device=torch.device("cpu"))
        want_self = calc.get_accuracy(x, y)
        want_ref = calc.get_accuracy(qx, qy, x, y, ref_includes_query=False)
        got_self = ck.retrieval_metrics(x.to(device), y.to(device), per_class=avg,
                                        backend=backend)
        got_ref = ck.retrieval_metrics(qx.to(device), qy.to(device), x.to(device),
                                       y.to(device), per_class=avg, backend=backend)
        for key in keys:
            assert got_self[key] == pytest.approx(want_self[key], rel=1e-6), (avg, key)
            assert got_ref[key] == pytest.approx(want_ref[key], rel=1e-6), (avg, key)


def _tied_rows(n, metric, seed):
    """Rows whose Gram products are exact in any summation order, so that equal distances tie
    exactly in every kernel's keys too: small integers; for cosine, signed multiples of the
    axes (unit after normalisation)."""
    g = torch.Generator().manual_seed(seed)
    if metric != "cosine":
        return torch.randint(-3, 4, (n, 6), generator=g).double()
    axes = torch.nn.functional.one_hot(torch.randint(0, 6, (n,), generator=g), 6).double()
    return axes * torch.randint(1, 4, (n, 1), generator=g) * (
        2 * torch.randint(0, 2, (n, 1), generator=g) - 1)


@pytest.mark.parametrize("data", ["random", "tied"])
@pytest.mark.parametrize("metric", METRICS)
def test_triton_lists_beyond_the_registers(metric, data, monkeypatch):
    """More neighbours than the Triton kernel keeps in registers (MAX_NEIGHBORS): the lists in
    global memory, cut after each reference tile (tiles of 256 here, patched from 1024, so
    that 770 references give four cuts, the last tile ragged); self retrieval and a separate
    reference set; on rows with exact ties everywhere (equal keys at the K-th place, copies in
    other tiles) the order is the reference's: ties to the lower index."""
    device = _device("triton")
    from confusion_kernels.triton import nearest_neighbors as triton_neighbors

    monkeypatch.setattr(triton_neighbors, "DEEP_REF_TILE", 256)
    k = triton_neighbors.MAX_NEIGHBORS + 7
    r = _rows(770, 6, seed=61) if data == "random" else _tied_rows(770, metric, seed=61)
    q = torch.cat([r[:5], r[300:310], _rows(15, 6, seed=62)])
    for query, refs, offset in ((q, r, None), (r, None, 0)):
        dist, idx = ck.nearest_neighbors(query.to(device), None if refs is None else
                                         refs.to(device), k, metric=metric, backend="triton")
        want_d, want_i = ref_retrieval.nearest_neighbors(query, r, k, metric, offset)
        assert torch.equal(idx.cpu(), want_i)
        torch.testing.assert_close(dist.cpu(), want_d, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_kernels_refuse_more_neighbours_than_they_keep(backend):
    device = _device(backend)
    most = _kernel_max(backend)
    q = _rows(most + 40, 4, seed=3).to(device)
    with pytest.raises(ValueError, match=f"at most {most} neighbours"):
        ck.nearest_neighbors(q, k=most + 1, backend=backend)
    # auto takes the reference beyond (on CPU tensors it takes the CPU kernel anyway)
    dist, idx = ck.nearest_neighbors(q, k=most + 1)
    assert idx.shape == (most + 40, most + 1)
    if backend == "cuda":  # the C++ op itself refuses too
        with pytest.raises(RuntimeError, match=f"at most {most} neighbours"):
            torch.ops.confusion_kernels.nearest_neighbors(q, q, most + 1, "euclidean", 0)


def test_cuda_depth_is_the_kernel_sources():
    """CUDA_MAX_NEIGHBORS (what auto routes by, on machines without a GPU too) is the list
    size the CUDA kernel was written for."""
    from pathlib import Path

    from confusion_kernels.ops.nearest_neighbors import CUDA_MAX_NEIGHBORS

    source = (Path(__file__).resolve().parents[1] / "csrc/cuda/nearest_neighbors_tile.h")
    assert f"kMaxNeighbors = {CUDA_MAX_NEIGHBORS};" in source.read_text()


@pytest.mark.parametrize("backend", ["cpu"])
def test_same_result_on_any_thread_count(backend):
    device = _device(backend)
    q = _rows(300, 20, seed=23, dtype=torch.float32).to(device)
    threads = torch.get_num_threads()
    try:
        first = ck.nearest_neighbors(q, k=40, metric="cosine", backend=backend)
        torch.set_num_threads(1)
        second = ck.nearest_neighbors(q, k=40, metric="cosine", backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_half_inputs_are_ranked_in_float32():
    q = _rows(50, 8, seed=29).to(torch.bfloat16)
    dist, idx = ck.nearest_neighbors(q, k=5)
    assert dist.dtype == torch.float32
    want_d, want_i = ref_retrieval.nearest_neighbors(q.double(), q.double(), 5, "euclidean", 0)
    torch.testing.assert_close(dist.double(), want_d, rtol=1e-5, atol=1e-5)


def test_no_gradient_and_inputs_untouched():
    q = _rows(20, 4, seed=31).requires_grad_(True)
    before = q.detach().clone()
    dist, idx = ck.nearest_neighbors(q, k=3)
    assert not dist.requires_grad
    assert torch.equal(q.detach(), before)


def test_cuda_kernel_never_holds_the_distance_matrix():
    """N = M = 16384 on the GPU: an N x M float32 buffer is 1 GiB; the kernel's largest is a
    Gram tile (2048 x 8192, 64 MiB)."""
    device = _device("cuda")
    q = _rows(16384, 16, seed=37, dtype=torch.float32).to(device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    ck.nearest_neighbors(q, k=10, backend="cuda")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated(device) - start < 16384 * 16384 * 4 // 8


def test_cpu_kernel_never_holds_the_distance_matrix():
    """N = 4096 queries against M = 4096 references: an N x M float32 buffer is 64 MiB; the
    kernel's largest allocation is a Gram tile (at most 512 x 512)."""
    from torch.profiler import ProfilerActivity, profile

    require_backend("cpu", "nearest_neighbors")
    q = _rows(4096, 16, seed=37, dtype=torch.float32)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ck.nearest_neighbors(q, k=10, backend="cpu")
    largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert largest < 4096 * 4096 * 4 // 16


BAD = [
    (lambda q, y: ck.retrieval_metrics(q, y[:-1]), ValueError, "entries"),
    (lambda q, y: ck.retrieval_metrics(q, y, q[:, :3], y), ValueError, "D = "),
    (lambda q, y: ck.retrieval_metrics(q, y, q), ValueError, "together"),
    (lambda q, y: ck.retrieval_metrics(q, y, k=0), ValueError, "k must"),
    (lambda q, y: ck.retrieval_metrics(q, y, k=(1, -2)), ValueError, "k must"),
    (lambda q, y: ck.retrieval_metrics(q, y, metric="manhattan"), ValueError, "metric"),
    (lambda q, y: ck.retrieval_metrics(q, y.float()), TypeError, "integer"),
    (lambda q, y: ck.nearest_neighbors(q, k=0), ValueError, "k must"),
    (lambda q, y: ck.nearest_neighbors(q, q.double()), TypeError, "dtype"),
    (lambda q, y: ck.nearest_neighbors(q[0]), ValueError, "2-D"),
    (lambda q, y: ck.nearest_neighbors(q, backend="cuda"), RuntimeError, "cannot run"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_raises_a_clear_error(case):
    make, exc, words = BAD[case]
    q = _rows(10, 4, seed=41, dtype=torch.float32)
    y = torch.arange(10) % 3
    with pytest.raises(exc, match=words):
        make(q, y)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_non_finite_rows_are_refused(backend):
    _device(backend)
    q = _rows(10, 4, seed=43)
    q[6, 2] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[6\] hold NaN"):
        ck.retrieval_metrics(q, torch.arange(10) % 2, backend=backend)
    r = _rows(10, 4, seed=44)
    r[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"reference rows \[1\]"):
        ck.nearest_neighbors(_rows(3, 4, seed=45), r, backend=backend)


def test_cpu_op_refuses_non_finite_inputs_called_directly():
    require_backend("cpu", "nearest_neighbors")
    q = _rows(5, 3, seed=47)
    q[2, 1] = float("nan")
    with pytest.raises(RuntimeError, match="must be finite"):
        torch.ops.confusion_kernels.nearest_neighbors(q, q, 2, "euclidean", 0)
    with pytest.raises(RuntimeError, match="self_offset"):
        torch.ops.confusion_kernels.nearest_neighbors(_rows(5, 3, seed=1), _rows(6, 3, seed=2),
                                                      2, "euclidean", 3)

"""torch.distributed features on CPU: ranks spawned with torch.multiprocessing, gloo backend.

The global batch is split unevenly over 2 and 3 ranks, one rank's part lacking a class; what
each rank ends with must equal one process that sees the whole batch (1e-9 in float64), and
the ranks must agree with each other exactly.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import pytest
import torch

import confusion_kernels as ck
from confusion_kernels.analysis.statistics import ClassStatistics

from conftest import assert_rel

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

NUM_CLASSES, DIM, STEPS = 5, 6, 3
SLICES = {2: [(0, 13), (13, 31)], 3: [(0, 9), (9, 25), (25, 31)]}  # uneven parts of 31 rows
# as_loss configurations: (metric, reduction, include_self, backend)
AS_LOSS_CASES = [("euclidean", "pair_mean", False, "cpu"), ("cosine", "class_mean", False, "cpu"),
                 ("manhattan", "pair_mean", False, "reference"),
                 ("sqeuclidean", "class_mean", True, "cpu"), ("smooth_l1", "class_mean", False, "cpu")]


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(31, DIM, generator=g, dtype=torch.float64) + 2.0
    labels = torch.randint(0, NUM_CLASSES, (31,), generator=g)
    labels[:13] %= NUM_CLASSES - 1  # rank 0 never sees the last class
    labels[13:] = torch.arange(18) % NUM_CLASSES  # every class somewhere in the batch
    return z, labels


def run_steps(z: torch.Tensor, labels: torch.Tensor, criterion: ck.NCentroidsLoss):
    """A few training-mode forward passes (EMA steps) of the criterion on shifted batches;
    then the statistics of the batch."""
    for step in range(STEPS):
        criterion(z + 0.3 * step, labels)
    stats = ClassStatistics(NUM_CLASSES, DIM).update(z, labels)
    return criterion.centroids.clone(), stats


def as_loss_with_grad(z: torch.Tensor, labels: torch.Tensor, case, **kwargs):
    """(loss, dloss/dz) of the ASLoss module for one configuration."""
    metric, reduction, include_self, backend = case
    z = z.detach().clone().requires_grad_(True)
    criterion = ck.ASLoss(metric, lambda_inner=0.7, lambda_outer=0.4, lambda_boundary=0.1,
                          constraint=2.0, reduction=reduction, include_self=include_self,
                          backend=backend, **kwargs)
    loss = criterion(z, labels)
    loss.backward()
    return loss.detach(), z.grad


def per_sample_with_grad(z: torch.Tensor, labels: torch.Tensor, **kwargs):
    """(per-sample ASLoss contributions, d(their sum)/dz) with reduction="none"."""
    z = z.detach().clone().requires_grad_(True)
    values = ck.as_loss(z, labels, metric="cosine", lambda_inner=0.7, lambda_outer=0.4,
                        lambda_boundary=0.1, constraint=2.0, reduction="none", **kwargs)
    values.sum().backward()
    return values.detach(), z.grad


def memory_steps(z: torch.Tensor, labels: torch.Tensor, **kwargs):
    """Two training steps of ASLoss with a memory (the second batch meets the first one's
    rows): (second loss, its dloss/dz)."""
    criterion = ck.ASLoss("euclidean", lambda_inner=0.7, lambda_outer=0.4, lambda_boundary=0.1,
                          constraint=2.0, memory=ck.CrossBatchMemory(50, DIM,
                                                                     dtype=torch.float64),
                          **kwargs)
    criterion(z, labels)
    z2 = (z + 0.5).detach().clone().requires_grad_(True)
    loss = criterion(z2, labels)
    loss.backward()
    return loss.detach(), z2.grad


def pml_wrapper_loss(rank: int, world: int):
    """(loss, dloss/dz) of pml.ASLoss inside PML's DistributedLossWrapper on this rank's equal
    share of the first 30 rows (PML's all_gather needs equal shares), or None without PML."""
    try:
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

        from confusion_kernels import pml
    except ImportError:
        return None
    z, labels = global_batch()
    share = 30 // world
    part = z[rank * share:(rank + 1) * share].clone().requires_grad_(True)
    wrapped = DistributedLossWrapper(pml.ASLoss(lambda_inner=0.7, lambda_outer=0.4,
                                                lambda_boundary=0.1, constraint=2.0))
    loss = wrapped(part, labels[rank * share:(rank + 1) * share])
    loss.backward()
    return loss.detach(), part.grad


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    # a hang (a rank waiting on another forever) becomes an error after 60 s
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        z, labels = global_batch()
        lo, hi = SLICES[world][rank]
        criterion = ck.NCentroidsLoss(NUM_CLASSES, DIM, global_batch=True).double()
        centroids, stats = run_steps(z[lo:hi], labels[lo:hi], criterion)
        stats.all_reduce()
        stats.all_reduce()  # idempotent: nothing new since the first
        again = ClassStatistics(NUM_CLASSES, DIM).update(z[lo:hi], labels[lo:hi]).all_reduce()
        again.update(2.0 * z[lo:hi], labels[lo:hi]).all_reduce()  # more data after a reduce
        as_losses = [as_loss_with_grad(z[lo:hi], labels[lo:hi], case, global_batch=True)
                     for case in AS_LOSS_CASES]
        torch.save({"centroids": centroids, "counts": stats.counts, "mean": stats.mean,
                    "m2": stats.m2, "as_loss": as_losses,
                    "again": (again.counts, again.mean, again.m2),
                    "pml_wrapper": pml_wrapper_loss(rank, world),
                    "per_sample": per_sample_with_grad(z[lo:hi], labels[lo:hi],
                                                       global_batch=True),
                    "memory": memory_steps(z[lo:hi], labels[lo:hi], global_batch=True),
                    "ddp": as_loss_with_grad(z[lo:hi], labels[lo:hi], AS_LOSS_CASES[1],
                                             global_batch=True, ddp_gradient=True)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # every rank has saved its results
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without the process-group teardown: torch 2.6's gloo teardown hung one rank of
    # three after the barrier in CI (futex wait, results already saved); the exit code is
    # what mp.spawn checks.
    os._exit(0)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    """(world size, what every rank saved): one spawn per world size for all the tests."""
    import torch.multiprocessing as mp

    world = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    init_file = str(out_dir / "init")
    mp.spawn(_worker, args=(world, init_file, str(out_dir)), nprocs=world, join=True)
    return world, [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def test_global_ema_and_statistics_equal_one_process(ranks):
    world, results = ranks
    z, labels = global_batch()
    centroids, stats = run_steps(z, labels, ck.NCentroidsLoss(NUM_CLASSES, DIM).double())
    for r, res in enumerate(results):
        assert_rel(res["centroids"], centroids, 1e-9, f"rank {r} centroids")
        assert torch.equal(res["counts"], stats.counts), f"rank {r} counts"
        assert_rel(res["mean"], stats.mean, 1e-9, f"rank {r} means")
        assert_rel(res["m2"], stats.m2, 1e-9, f"rank {r} M2")
        for key in ("centroids", "counts", "mean", "m2"):
            assert torch.equal(res[key], results[0][key]), f"ranks 0 and {r} differ in {key}"
    # the per-rank EMA (global_batch=False) would differ: the test can fail
    lo, hi = SLICES[world][0]
    local, _ = run_steps(z[lo:hi], labels[lo:hi], ck.NCentroidsLoss(NUM_CLASSES, DIM).double())
    assert not torch.allclose(local, centroids)


def test_statistics_all_reduce_counts_every_sample_once(ranks):
    """all_reduce twice multiplied the counts by the world size; and updates after an
    all_reduce were counted world-size times at the next one. Now each rank's samples enter
    the global statistics once, however often all_reduce runs."""
    world, results = ranks
    z, labels = global_batch()
    want = ClassStatistics(NUM_CLASSES, DIM).update(z, labels).update(2.0 * z, labels)
    for r, res in enumerate(results):
        counts, mean, m2 = res["again"]
        assert torch.equal(counts, want.counts), f"rank {r} counts"
        assert_rel(mean, want.mean, 1e-9, f"rank {r} means")
        assert_rel(m2, want.m2, 1e-9, f"rank {r} M2")


@pytest.mark.parametrize("case", AS_LOSS_CASES, ids=lambda c: "-".join(map(str, c)))
def test_global_as_loss_equals_one_process(ranks, case):
    """Every rank returns the loss of the whole batch, and its z.grad is exactly its rows of
    the single-process gradient (no double counting, nothing missing)."""
    world, results = ranks
    z, labels = global_batch()
    loss, grad = as_loss_with_grad(z, labels, case)
    index = AS_LOSS_CASES.index(case)
    for r, res in enumerate(results):
        lo, hi = SLICES[world][r]
        rank_loss, rank_grad = res["as_loss"][index]
        assert_rel(rank_loss, loss, 1e-9, f"rank {r} loss")
        assert_rel(rank_grad, grad[lo:hi], 1e-9, f"rank {r} gradient")
    # a rank on its own batch gets another loss: the test can fail
    lo, hi = SLICES[world][0]
    local, _ = as_loss_with_grad(z[lo:hi], labels[lo:hi], case)
    assert not torch.allclose(local, loss)


def test_global_per_sample_contributions_are_this_ranks_rows(ranks):
    """reduction="none" with global_batch: each rank gets its rows' contributions to the
    global loss (together: one process's vector) and its rows of the gradient of their sum."""
    world, results = ranks
    z, labels = global_batch()
    values, grad = per_sample_with_grad(z, labels)
    for r, res in enumerate(results):
        lo, hi = SLICES[world][r]
        rank_values, rank_grad = res["per_sample"]
        assert_rel(rank_values, values[lo:hi], 1e-9, f"rank {r} contributions")
        assert_rel(rank_grad, grad[lo:hi], 1e-9, f"rank {r} gradient")


def test_global_batch_with_a_memory_equals_one_process(ranks):
    """global_batch and memory together: the columns are the global batch and the memory,
    which every rank fills with the gathered global batch: each rank's loss is that of one
    process with a memory, and its gradient that process's rows."""
    world, results = ranks
    z, labels = global_batch()
    loss, grad = memory_steps(z, labels)
    for r, res in enumerate(results):
        lo, hi = SLICES[world][r]
        assert_rel(res["memory"][0], loss, 1e-9, f"rank {r} loss")
        assert_rel(res["memory"][1], grad[lo:hi], 1e-9, f"rank {r} gradient")
    assert not torch.allclose(loss, as_loss_with_grad(z + 0.5, labels, AS_LOSS_CASES[0])[0])


def test_ddp_gradient_keeps_the_value_and_scales_the_gradient(ranks):
    world, results = ranks
    z, labels = global_batch()
    loss, grad = as_loss_with_grad(z, labels, AS_LOSS_CASES[1])
    for r, res in enumerate(results):
        lo, hi = SLICES[world][r]
        assert_rel(res["ddp"][0], loss, 1e-9, f"rank {r} loss")
        assert_rel(res["ddp"][1], world * grad[lo:hi], 1e-9, f"rank {r} gradient")


def test_pml_distributed_wrapper_is_world_size_times_our_global_batch(ranks):
    """PML's DistributedLossWrapper around pml.ASLoss: the loss of the global batch times the
    world size, and each rank's rows of its gradient times the world size (PML scales for
    DDP's averaging; ours, global_batch=True, returns the global loss itself). PML's gather
    needs the same batch size on every rank; ours takes uneven ones (docs/pml.md)."""
    world, results = ranks
    if results[0]["pml_wrapper"] is None:
        pytest.skip("needs pytorch-metric-learning (the PML adapters)")
    z, labels = global_batch()
    loss, grad = as_loss_with_grad(z[:30], labels[:30], ("euclidean", "pair_mean", False, "cpu"))
    share = 30 // world
    for r, res in enumerate(results):
        rank_loss, rank_grad = res["pml_wrapper"]
        assert_rel(rank_loss, world * loss, 1e-9, f"rank {r} loss")
        assert_rel(rank_grad, world * grad[r * share:(r + 1) * share], 1e-9, f"rank {r} grad")


def test_global_features_need_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    z, labels = global_batch()
    with pytest.raises(RuntimeError, match="initialised process group"):
        ck.NCentroidsLoss(NUM_CLASSES, DIM, global_batch=True).double()(z, labels)
    with pytest.raises(RuntimeError, match="initialised process group"):
        ClassStatistics(NUM_CLASSES, DIM).update(z, labels).all_reduce()
    with pytest.raises(RuntimeError, match="initialised process group"):
        ck.as_loss(z, labels, global_batch=True)


# --- ranks that disagree, fail or hold nothing: every rank raises the same error (or works) ---
def _outcome(fn) -> tuple[str, str] | tuple[str, object]:
    """("ok", result) or (exception type, message) of one scenario on this rank."""
    try:
        return ("ok", fn())
    except (ValueError, TypeError, RuntimeError) as exc:
        return (type(exc).__name__, str(exc))


def _scenarios(rank: int) -> dict:
    """name -> a function that runs one global computation with this rank's part; rank 1 is
    the odd one out. Each must raise on both ranks at the same point, or work."""
    z, labels = global_batch()
    lo, hi = SLICES[2][rank]
    x, y = z[lo:hi].clone(), labels[lo:hi].clone()

    def as_loss(**kw):
        xx = kw.pop("x", x)
        if isinstance(xx, torch.Tensor):
            xx = xx.detach().clone().requires_grad_(True)
        loss = ck.as_loss(xx, kw.pop("labels", y), global_batch=True, backend="cpu", **kw)
        loss.backward()
        return loss.detach(), xx.grad

    def module(**kw):
        xx = x.clone().requires_grad_(True)
        loss = ck.ASLoss(global_batch=True, backend="cpu", **kw)(xx, y)
        loss.backward()
        return loss.detach()

    def no_grad():
        with torch.no_grad() if rank == 1 else contextlib.nullcontext():
            return ck.as_loss(x.clone().requires_grad_(True), y, global_batch=True).detach()

    def ncl(k=NUM_CLASSES, **kw):
        return ck.NCentroidsLoss(k, DIM, global_batch=True, **kw).double()

    def ncl_run(criterion, zz=x, yy=y, steps=2):
        for step in range(steps):
            criterion(zz + 0.3 * step, yy)
        return criterion.centroids.clone()

    def ncl_eval():
        criterion = ncl()
        if rank == 1:
            criterion.eval()
        return ncl_run(criterion)

    odd = rank == 1
    return {
        "metric": lambda: as_loss(metric="cosine" if odd else "euclidean"),
        "reduction": lambda: as_loss(reduction="class_mean" if odd else "pair_mean"),
        "include_self": lambda: as_loss(include_self=odd),
        "lambda_inner": lambda: as_loss(lambda_inner=0.5 if odd else 0.7),
        "module lambda_outer": lambda: module(lambda_outer=0.5 if odd else 0.4),
        "dtype": lambda: as_loss(x=x.to(torch.bfloat16 if odd else torch.float16)),
        "dim": lambda: as_loss(x=x[:, :5] if odd else x),
        "bad labels": lambda: as_loss(labels=y[:-1] if odd else y),
        "not a tensor": lambda: as_loss(x=x.tolist() if odd else x),
        "gradient": no_grad,
        "empty rank": lambda: as_loss(x=x[:0] if odd else x, labels=y[:0] if odd else y),
        "all empty": lambda: as_loss(x=x[:0], labels=y[:0]),
        "ncl eval": ncl_eval,
        "ncl alpha0": lambda: ncl_run(ncl(alpha0=0.3 if odd else 0.25)),
        "ncl num_classes": lambda: ncl_run(ncl(k=NUM_CLASSES + odd)),
        "ncl dtype": lambda: ncl_run(ncl().float() if odd else ncl()),
        "ncl labels": lambda: ncl_run(ncl(), yy=torch.where(y == 0, NUM_CLASSES, y) if odd else y),
        "ncl seeds": lambda: ncl_run(ncl(seed=rank)),
        "ncl empty rank": lambda: ncl_run(ncl(), zz=x[:0] if odd else x, yy=y[:0] if odd else y),
        "stats shape": lambda: ClassStatistics(NUM_CLASSES + odd, DIM).update(
            x, y).all_reduce().counts,
    }


def _odd_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = {name: _outcome(fn) for name, fn in _scenarios(rank).items()}
        torch.save(results, os.path.join(out_dir, f"odd{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)


@pytest.fixture(scope="module")
def odd_ranks(tmp_path_factory):
    """What each of 2 ranks got in every scenario of _scenarios (one spawn for all)."""
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("odd")
    mp.spawn(_odd_worker, args=(2, str(out_dir / "init"), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"odd{r}.pt", weights_only=False) for r in range(2)]


RAISES = {  # scenario: (exception type, what its message must say) on both ranks
    "metric": ("ValueError", "disagree on metric"),
    "reduction": ("ValueError", "disagree on reduction"),
    "include_self": ("ValueError", "disagree on include_self"),
    "lambda_inner": ("ValueError", "disagree on lambda_inner"),
    "module lambda_outer": ("ValueError", "disagree on lambda_outer"),
    "dtype": ("ValueError", "disagree on dtype"),
    "dim": ("ValueError", "disagree on dim"),
    "bad labels": ("ValueError", "rank 1 of 2 failed its checks: labels"),
    "not a tensor": ("TypeError", "rank 1 of 2 failed its checks: x must be a torch.Tensor"),
    "gradient": ("ValueError", "disagree on gradient"),
    "all empty": ("ValueError", "the global batch has no rows"),
    "ncl eval": ("ValueError", "disagree on training"),
    "ncl alpha0": ("ValueError", "disagree on alpha0"),
    "ncl num_classes": ("ValueError", "disagree on num_classes"),
    "ncl dtype": ("ValueError", "disagree on centroid_dtype"),
    "ncl labels": ("ValueError", "rank 1 of 2 failed its checks: labels must lie in [0, 5)"),
    "stats shape": ("ValueError", "disagree on num_classes"),
}


@pytest.mark.parametrize("scenario", sorted(RAISES))
def test_every_rank_raises_the_same_error(odd_ranks, scenario):
    """A rank that differs in a setting, dtype or shape, or whose input fails its checks,
    made the others hang in the next collective (or gloo abort, or return mixed values):
    now both ranks raise the same error at the same point, and the group stays usable."""
    kind, text = RAISES[scenario]
    outcomes = [res[scenario] for res in odd_ranks]
    for r, (got_kind, message) in enumerate(outcomes):
        assert got_kind == kind, f"rank {r}: {got_kind}: {message}"
        assert text in message, f"rank {r}: {message}"
    assert outcomes[0] == outcomes[1]


def test_an_empty_rank_is_part_of_the_global_batch(odd_ranks):
    """Rank 1 holds no rows: the loss is that of rank 0's rows alone, on both ranks, and rank
    0's gradient is the single-process one; rank 1's gradient is empty."""
    z, labels = global_batch()
    lo, hi = SLICES[2][0]
    xx = z[lo:hi].clone().requires_grad_(True)
    want = ck.as_loss(xx, labels[lo:hi], backend="cpu")
    want.backward()
    (k0, (loss0, grad0)), (k1, (loss1, grad1)) = (res["empty rank"] for res in odd_ranks)
    assert k0 == k1 == "ok"
    assert_rel(loss0, want.detach(), 1e-12, "rank 0 loss")
    assert torch.equal(loss0, loss1)
    assert_rel(grad0, xx.grad, 1e-12, "rank 0 gradient")
    assert grad1.shape == (0, DIM)


def test_ncl_ranks_start_from_the_same_centroids(odd_ranks):
    """Built with different seeds, the ranks still end with the same centroids: rank 0's,
    broadcast at the first call, moved by the global EMA (the single process on the whole
    batch, from rank 0's initial centroids); and an empty rank adds nothing to the EMA."""
    z, labels = global_batch()
    single = ck.NCentroidsLoss(NUM_CLASSES, DIM, seed=0).double()
    for step in range(2):
        single(z + 0.3 * step, labels)
    (k0, c0), (k1, c1) = (res["ncl seeds"] for res in odd_ranks)
    assert k0 == k1 == "ok"
    assert torch.equal(c0, c1)
    assert_rel(c0, single.centroids, 1e-9, "centroids")
    lo, hi = SLICES[2][0]
    alone = ck.NCentroidsLoss(NUM_CLASSES, DIM).double()
    for step in range(2):
        alone(z[lo:hi] + 0.3 * step, labels[lo:hi])
    (k0, e0), (k1, e1) = (res["ncl empty rank"] for res in odd_ranks)
    assert k0 == k1 == "ok" and torch.equal(e0, e1)
    assert_rel(e0, alone.centroids, 1e-9, "centroids with an empty rank")

"""torch.distributed features on CPU: ranks spawned with torch.multiprocessing, gloo backend.

The global batch is split unevenly over 2 and 3 ranks, one rank's part lacking a class; what
each rank ends with must equal one process that sees the whole batch (1e-9 in float64), and
the ranks must agree with each other exactly.
"""

from __future__ import annotations

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
                    "again": (again.counts, again.mean, again.m2)},
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

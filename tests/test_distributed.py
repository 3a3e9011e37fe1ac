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
        torch.save({"centroids": centroids, "counts": stats.counts, "mean": stats.mean,
                    "m2": stats.m2}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: torch 2.6's gloo teardown can hang a rank left alone
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_global_ema_and_statistics_equal_one_process(world, tmp_path):
    import torch.multiprocessing as mp

    init_file = str(tmp_path / "init")
    mp.spawn(_worker, args=(world, init_file, str(tmp_path)), nprocs=world, join=True)
    z, labels = global_batch()
    centroids, stats = run_steps(z, labels, ck.NCentroidsLoss(NUM_CLASSES, DIM).double())
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
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


def test_global_features_need_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    z, labels = global_batch()
    with pytest.raises(RuntimeError, match="initialised process group"):
        ck.NCentroidsLoss(NUM_CLASSES, DIM, global_batch=True).double()(z, labels)
    with pytest.raises(RuntimeError, match="initialised process group"):
        ClassStatistics(NUM_CLASSES, DIM).update(z, labels).all_reduce()

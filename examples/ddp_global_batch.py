"""ASLoss over the global batch of DistributedDataParallel ranks, with the Affinity loss's
prototypes kept in sync by DDP. Runs anywhere: it spawns --world CPU processes (gloo).

Each rank holds its own slice of a batch of scikit-learn's digits. The training loss of a rank
is

    W * 0.5 * ASLoss(global batch)  +  AffinityLoss(this rank's rows)

``ASLoss(global_batch=True)`` returns, on every rank, the loss of the concatenated batch and
gives each rank exactly its rows' share of the gradient. DDP then *averages* the parameter
gradients over the W ranks, so the factor W makes the ASLoss part equal to the single-process
gradient of the global batch; the Affinity part is a per-rank mean that DDP's average turns
into the global mean (equal slices here). The prototypes are an ordinary parameter of the
wrapped module, so DDP synchronises their gradients like any other weight.

The script checks both claims: after the first backward, rank 0 compares DDP's gradients with
one process that sees the whole batch; after training, every rank's prototypes are compared.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import confusion_kernels as ck

BATCH = 240  # global batch, split evenly over the ranks


class Net(nn.Module):
    """Embedding network plus the Affinity loss (its prototypes are parameters of this module,
    so the DDP wrapper synchronises them)."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
        self.affinity = ck.AffinityLoss(10, 16, num_centers=2, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


def digits_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (the same on every rank)."""
    digits = load_digits()
    g = torch.Generator().manual_seed(step)
    index = torch.randperm(len(digits.target), generator=g)[:BATCH]
    x = torch.tensor(digits.data, dtype=torch.float64)[index] / 16.0
    return x, torch.tensor(digits.target)[index]


def training_loss(net: Net, as_loss: ck.ASLoss, x, y, world: int) -> torch.Tensor:
    z = net(x)
    return world * 0.5 * as_loss(z, y) + net.affinity(z, y)


def single_process_grads(state: dict, backend: str, x, y) -> list[torch.Tensor]:
    """Gradients of 0.5 * ASLoss + AffinityLoss of one process on the whole batch."""
    net = Net(backend).double()
    net.load_state_dict(state)
    loss = training_loss(net, ck.ASLoss(backend=backend), x, y, world=1)
    loss.backward()
    return [p.grad for p in net.parameters()]


def worker(rank: int, world: int, init_file: str, steps: int, backend: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(rank)  # different on purpose: DDP broadcasts rank 0's weights
        model = DistributedDataParallel(Net(backend).double())
        net = model.module
        # the loss's collectives on their own group, apart from DDP's gradient all-reduce
        loss_group = dist.new_group(list(range(world)))
        as_loss = ck.ASLoss(backend=backend, global_batch=True, group=loss_group)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        per_rank = BATCH // world
        for step in range(steps):
            x, y = digits_batch(step)
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            if step == 0:
                initial = {k: v.clone() for k, v in net.state_dict().items()}
            z = model(x[mine])
            loss = world * 0.5 * as_loss(z, y[mine]) + net.affinity(z, y[mine])
            opt.zero_grad()
            loss.backward()
            if step == 0 and rank == 0:
                expected = single_process_grads(initial, backend, x[:per_rank * world],
                                                y[:per_rank * world])
                worst = max((p.grad - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
                            for p, e in zip(net.parameters(), expected))
                print(f"step 0: DDP gradients vs one process on the whole batch: largest "
                      f"relative difference {worst:.2e}")
            opt.step()
            if rank == 0 and (step + 1) % max(1, steps // 4) == 0:
                t = as_loss.last_terms[0]
                print(f"step {step + 1:3d}: global batch ASLoss terms inner {t.inner.item():.4f} "
                      f"outer {t.outer.item():.4f} boundary {t.boundary.item():.4f}")
        protos = [torch.empty_like(net.affinity.prototypes) for _ in range(world)]
        dist.all_gather(protos, net.affinity.prototypes.detach())
        if rank == 0:
            same = all(torch.equal(p, protos[0]) for p in protos)
            print(f"after {steps} steps the prototypes are identical on all {world} ranks: {same}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    if BATCH % args.world:
        parser.error(f"--world must divide the global batch of {BATCH}")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args.world, os.path.join(tmp, "init"), args.steps, args.backend),
                 nprocs=args.world, join=True)


if __name__ == "__main__":
    main()

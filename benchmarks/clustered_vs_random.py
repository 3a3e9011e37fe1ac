"""Clustered against random data, interleaved: the speed ratio of one op on the two.

A shared machine's speed drifts over tens of seconds, which moves whole cases of
a sequential benchmark (run_as_loss.py runs one case per process, one after the
other). Here the two inputs alternate run by run in one process, so a slow phase
hits both; the ratio of the medians is what the "no slowdown on trained
embeddings" goal is about. Data: benchmarks/bench_data.py.

  python benchmarks/clustered_vs_random.py --op as_loss --metric euclidean --n 4096 --d 64
"""

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_data  # noqa: E402

import confusion_kernels as ck  # noqa: E402


def make_step(op: str, metric: str, backend: str, x: torch.Tensor, labels: torch.Tensor):
    def step() -> None:
        if op == "intra_inter_sums":
            with torch.no_grad():
                ck.intra_inter_sums(x, labels, metric, backend=backend, check_finite=False)
            return
        xr = x.clone().requires_grad_(True)
        ck.as_loss(xr, labels, metric=metric, backend=backend, check_finite=False).backward()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=["as_loss", "intra_inter_sums"], default="as_loss",
                   help="as_loss: forward + backward; intra_inter_sums: forward")
    p.add_argument("--metric", default="euclidean")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    steps = {}
    for data in bench_data.DATA_KINDS:
        x, labels = bench_data.make_data(args.n, args.d, data, classes=args.classes)
        steps[data] = make_step(args.op, args.metric, args.backend, x, labels)
        steps[data]()  # warm-up
    times = {data: [] for data in steps}
    for _ in range(args.rounds):
        for data, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[data].append((time.perf_counter() - t0) * 1e3)
    med = {data: statistics.median(t) for data, t in times.items()}
    print(f"{args.op} {args.metric} N={args.n} D={args.d} classes={args.classes} "
          f"backend={args.backend}, {args.rounds} interleaved rounds: "
          + ", ".join(f"{data} {m:.1f} ms" for data, m in med.items())
          + f"; clustered / random = {med['clustered'] / med['random']:.2f}")


if __name__ == "__main__":
    main()

"""Time and peak memory against N for the pair ops, with the compute floor drawn in.

    python benchmarks/curves.py [--sizes 1024 2048 ...] [--ops OP ...] [--out DIR]
                                [--step-limit S]

For ASLoss (euclidean, cosine; fwd+bwd, D = 64), the rectangular op (N rows against 8 N
reference rows, D = 64), the N-Centroids loss (K = 1000, D = 128) and the affinity loss
(C = 1000 classes, m = 1 and 5 prototypes, D = 128) and the pair losses (Contrastive,
SupCon, NT-Xent, Multi-Similarity; D = 128, about four samples a class, beside
pytorch-metric-learning's classes except NT-Xent's), at each N: ours (the
cpu backend) and the fastest plain formulation, eager and torch.compile'd (the suite's
providers, benchmarks/suite_cases.py). A provider stops at the first N where one step takes
longer than --step-limit seconds or runs out of memory (the row says so). Writes curves.csv
and curves.png (log-log; the floor = flops at the product rate measured at the start).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import roofline  # noqa: E402
import run  # noqa: E402
import suite_cases  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEEP = ("ours-cpu", "eager-plain", "compile-plain", "eager", "compile", "pml")
DENSE_LIMIT_GB = 6.0  # of this machine's 24 GB: three N x M float32 buffers at most


def cases(n: int) -> dict:
    """op name (as in the CSV) -> builder of its case at N = n."""
    device = torch.device("cpu")
    return {
        "as_loss[euclidean]": lambda: suite_cases.as_loss_case(device, n, 64, "random",
                                                               "euclidean"),
        "as_loss[cosine]": lambda: suite_cases.as_loss_case(device, n, 64, "random", "cosine"),
        "intra_inter_sums_rect[euclidean]": lambda: suite_cases.rect_case(device, n, 8 * n, 64,
                                                                          "random"),
        "n_centroids_loss[great_circle]": lambda: suite_cases.n_centroids_case(
            device, n, 128, "random", 1000),
        "affinity_loss[m=1]": lambda: suite_cases.affinity_case(device, n, 128, "random", 1000, 1),
        "affinity_loss[m=5]": lambda: suite_cases.affinity_case(device, n, 128, "random", 1000, 5),
        **{f"{name}[{suite_cases.PAIR_LOSSES[name][2]}]":
           (lambda name=name: suite_cases.pair_losses_case(device, n, 128, "random", name))
           for name in suite_cases.PAIR_LOSSES},
    }


# dense N x K buffers of the plain formulations: K is the reference rows (rect), the
# prototypes (affinity) or N (the square pair ops); N-Centroids' K = 1000 stays small
def _dense_gb(op: str, n: int, k: int) -> float:
    width = k if op.startswith(("intra_inter_sums_rect", "affinity")) else n
    return 0.0 if op.startswith("n_centroids") else 3 * 4 * n * width / 1e9


def measure(sizes: list[int], step_limit: float, reps: int = 3,
            ops: list[str] | None = None) -> list[dict]:
    rows, stopped = [], set()
    for n in sizes:
        for op, make in cases(n).items():
            if ops and op not in ops:
                continue
            torch._dynamo.reset()  # one compiled lambda serves every N: keep its recompiles
            case = make()           # below Dynamo's limit (past it, "compile" runs eager)
            # the plain formulations replace the literal ones where both exist
            providers = [p for p in KEEP if p in case.steps]
            if "eager-plain" in providers:
                providers = [p for p in providers if p not in ("eager", "compile")]
            if case.op.startswith("ntxent_loss"):
                # PML's NTXentLoss forms (positive pairs) x (negative pairs): 8 GB at N = 512
                # and four samples a class, 270 GB at 4096; the machine would swap, not raise
                providers = [p for p in providers if p != "pml"]
            for provider in providers:
                key = (case.op, provider)
                row = {"op": case.op, "provider": provider, "N": n, "D": case.d, "K": case.k,
                       "flops": case.flops}
                if key in stopped:
                    continue
                dense_gb = _dense_gb(case.op, n, case.k)
                if provider != "ours-cpu" and dense_gb > DENSE_LIMIT_GB:
                    # (a dense N x M formulation this large would be killed by the OOM killer,
                    # not raise: not run)
                    row.update(status=f"not run: N x M buffers of ~{dense_gb:.0f} GB")
                    stopped.add(key)
                    rows.append(row)
                    continue
                try:
                    start = time.perf_counter()
                    case.steps[provider]()  # warm-up (and compile)
                    if time.perf_counter() - start > 3 * step_limit:
                        raise TimeoutError
                    times, peak = run.time_provider(case.steps[provider], torch.device("cpu"),
                                                    reps, step_limit)
                    median = run.quantile(times, 0.5)
                    row.update(median_ms=median, peak_mib=peak, status="ok")
                    if median > step_limit * 1e3:
                        stopped.add(key)
                except (torch.OutOfMemoryError, MemoryError):
                    row.update(status="out of memory")
                    stopped.add(key)
                except TimeoutError:
                    row.update(status=f"over {step_limit:g} s")
                    stopped.add(key)
                rows.append(row)
                print(f"{case.op} N={n} {provider}: {row.get('median_ms', float('nan')):.1f} ms "
                      f"{row.get('peak_mib', float('nan')):.0f} MiB ({row['status']})", flush=True)
            del case
    return rows


def plot(rows: list[dict], tflops: float, path: Path) -> None:
    from matplotlib.figure import Figure

    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig = Figure(figsize=(11, 3.2 * len(ops)))
    axes = fig.subplots(len(ops), 2, squeeze=False)
    for (ax_t, ax_m), op in zip(axes, ops):
        mine = [r for r in rows if r["op"] == op and r["status"] == "ok"]
        for provider in dict.fromkeys(r["provider"] for r in mine):
            pts = [r for r in mine if r["provider"] == provider]
            ax_t.loglog([r["N"] for r in pts], [r["median_ms"] for r in pts], "o-", label=provider)
            ax_m.loglog([r["N"] for r in pts], [max(r["peak_mib"], 0.1) for r in pts], "o-",
                        label=provider)
        sizes = sorted({r["N"] for r in rows if r["op"] == op})
        floor = {r["N"]: r["flops"] / (tflops * 1e12) * 1e3 for r in rows if r["op"] == op}
        ax_t.loglog(sizes, [floor[n] for n in sizes], "k--", label="floor (flops)")
        ax_t.set_title(f"{op}: median ms (fwd+bwd)", fontsize=9)
        ax_m.set_title(f"{op}: peak MiB", fontsize=9)
        ax_t.legend(fontsize=7)
        ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--ops", nargs="+", default=None, choices=list(cases(1)),
                        help="only these ops (default: all)")
    parser.add_argument("--step-limit", type=float, default=8.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    ceilings = roofline.measure_ceilings("cpu")
    rows = measure(args.sizes, args.step_limit, ops=args.ops)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / \
        f"{datetime.date.today().isoformat()}-curves-cpu"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["op", "provider", "N", "D", "K", "flops",
                                               "median_ms", "peak_mib", "status"])
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, ceilings["fp32_tflops"], out / "curves.png")
    print(f"wrote {out}/curves.csv, curves.png (product rate {ceilings['fp32_tflops']:.2f} "
          f"TFLOP/s)")
    return out


if __name__ == "__main__":
    main()

"""The pair losses against pytorch-metric-learning's classes, interleaved: the speed ratio.

The suite (run.py) and the curves (curves.py) time each provider in turn; on a shared machine
whose speed drifts over tens of seconds, a slow phase can hit one provider and not the other.
Here, for each loss, our step (fwd+bwd, backend="auto", the suite's case: D = 128, about four
samples a class, random data) and PML's alternate round by round in one process, so a slow
phase hits both; the ratio of the medians is what the "N times PML's speed" goal is about.
PML's NTXentLoss is not run (it forms (positive pairs) x (negative pairs): 270 GB at N = 4096).

  python benchmarks/pair_losses_vs_pml.py --n 4096 --rounds 15 [--out DIR]

Writes pair_losses_vs_pml.csv and .md into --out when given.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite_cases  # noqa: E402

PROVIDERS = ("ours-auto", "pml")


def measure(n: int, rounds: int, losses: list[str] | None = None) -> list[dict]:
    """One row per loss: median ms of each provider over ``rounds`` interleaved rounds (after
    a warm-up of each), and PML's median over ours."""
    rows = []
    for name in losses or list(suite_cases.PAIR_LOSSES):
        case = suite_cases.pair_losses_case(torch.device("cpu"), n, 128, "random", name)
        steps = {p: case.steps[p] for p in PROVIDERS
                 if p in case.steps and not (p == "pml" and name == "ntxent_loss")}
        for step in steps.values():
            step()  # warm-up
        times: dict[str, list[float]] = {p: [] for p in steps}
        for _ in range(rounds):
            for provider, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[provider].append((time.perf_counter() - t0) * 1e3)
        med = {p: statistics.median(t) for p, t in times.items()}
        ratio = med["pml"] / med["ours-auto"] if "pml" in med else float("nan")
        rows.append({"loss": case.op, "N": n, "rounds": rounds,
                     "ours_ms": med["ours-auto"], "pml_ms": med.get("pml", float("nan")),
                     "pml_over_ours": ratio})
        print(f"{case.op} N={n}: ours {med['ours-auto']:.1f} ms, "
              + (f"PML {med['pml']:.1f} ms, PML / ours = {ratio:.2f}" if "pml" in med
                 else "PML not run"), flush=True)
    return rows


def write(rows: list[dict], out: Path, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pair_losses_vs_pml.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [header, "", "| loss | N | ours ms | PML ms | PML / ours |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        pml = "not run" if r["pml_ms"] != r["pml_ms"] else f"{r['pml_ms']:.1f}"
        ratio = "—" if r["pml_over_ours"] != r["pml_over_ours"] else f"{r['pml_over_ours']:.2f}"
        lines.append(f"| {r['loss']} | {r['N']} | {r['ours_ms']:.1f} | {pml} | {ratio} |")
    (out / "pair_losses_vs_pml.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--losses", nargs="+", choices=list(suite_cases.PAIR_LOSSES))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = measure(args.n, args.rounds, args.losses)
    if args.out:
        header = (f"fwd+bwd, D = 128, random data, {args.rounds} interleaved rounds, "
                  f"{torch.get_num_threads()} threads, torch {torch.__version__}: "
                  f"`python benchmarks/pair_losses_vs_pml.py --n {args.n} --rounds {args.rounds}`")
        write(rows, args.out, header)


if __name__ == "__main__":
    main()

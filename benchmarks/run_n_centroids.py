"""Side-by-side benchmark of the N-Centroids loss, forward + backward (gradient for z).

Implementations, in one run:
  fused     ck.n_centroids_loss on the kernel backend ("cpu"; "cuda" and "triton" on a GPU)
  eager     the plain PyTorch formulation: one N x K cosine matrix, chord lengths from it,
            the angle 2 atan2(a, b), then gather / min / mean
  compile   torch.compile of the eager formulation
  reference ck.n_centroids_loss(backend="reference"): the definition over row chunks
Data: "random" (z ~ N(0, 1)) and "clustered" (trained-like: each row its class centroid x 10
plus N(0, 0.3^2) noise, so the own distance is small and the Gram form cancels for it).
Per case: median ms, peak memory (CPU: peak RSS of a fresh process; CUDA: max allocated above
the inputs), speed-up over eager and the fraction of the compute floor. The floor is the two
N x K x D products the fused op needs (Gram tile + coefficient tile, 4 N K D flop) at the
fp32 matrix-product rate measured in the same process just before each timed step ("x floor"
= time / floor, 1 is the limit). Writes CSV + Markdown + PNG.

  python benchmarks/run_n_centroids.py                      # CPU, N=16384 K=1000 D=128
  python benchmarks/run_n_centroids.py --device cuda --cases 65536:10000:128
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DATA = ("random", "clustered")


def make_inputs(n: int, k: int, d: int, data: str, device: str):
    import torch

    g = torch.Generator().manual_seed(0)
    c = torch.randn(k, d, generator=g)
    c = c / c.norm(dim=1, keepdim=True)
    labels = torch.randint(0, k, (n,), generator=g)
    if data == "random":
        z = torch.randn(n, d, generator=g)
    else:
        z = 10.0 * c[labels] + 0.3 * torch.randn(n, d, generator=g)
    return z.to(device), labels.to(device), c.to(device)


def eager_loss(z, labels, c):
    """The plain formulation the fused op replaces (great-circle metric)."""
    import torch

    x = torch.nn.functional.normalize(z, dim=1)
    t = x @ c.T
    a = (2 - 2 * t).clamp_min(0).sqrt()
    b = (2 + 2 * t).clamp_min(0).sqrt()
    dist = 2 * torch.atan2(a, b)
    own = dist.gather(1, labels[:, None])[:, 0]
    is_own = torch.zeros_like(dist, dtype=torch.bool).scatter_(1, labels[:, None], True)
    hardest = dist.masked_fill(is_own, float("inf")).min(1).values
    mean = dist.masked_fill(is_own, 0.0).sum(1) / (c.shape[0] - 1)
    return (own - hardest - mean).mean()


def gemm_rate(device: str, size: int = 2048):
    """A function timing one fp32 size^3 product, returning flop/s."""
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)

    def rate() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        return 2.0 * size ** 3 / (time.perf_counter() - t0)
    return rate


def run_case(impl: str, device: str, n: int, k: int, d: int, data: str, reps: int,
             max_seconds: float) -> dict:
    import torch

    import confusion_kernels as ck

    rec = dict(impl=impl, device=device, n=n, k=k, d=d, data=data)
    z, labels, c = make_inputs(n, k, d, data, device)
    if impl == "eager":
        fn = eager_loss
    elif impl == "compile":
        fn = torch.compile(eager_loss)
    else:
        backend = device if impl == "fused" else impl

        def fn(zr, yr, cr):
            return ck.n_centroids_loss(zr, yr, cr, metric="great_circle", backend=backend)

    probe = gemm_rate(device)
    floor_flop = 4.0 * n * k * d

    def step() -> tuple[float, float]:
        rate = probe()
        zr = z.detach().requires_grad_(True)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(zr, labels, c).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms / (floor_flop / rate * 1e3)

    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        step()  # warm-up (compilation, allocator)
        times, ratios, start = [], [], time.perf_counter()
        while len(times) < reps and (time.perf_counter() - start < max_seconds or len(times) < 3):
            ms, ratio = step()
            times.append(ms)
            ratios.append(ratio)
        rec.update(status="ok", median_ms=statistics.median(times), runs=len(times),
                   x_floor=statistics.median(ratios))
        if device == "cuda":
            rec["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        rec.update(status="out of memory", error=str(exc).splitlines()[0][:160])
    except RuntimeError as exc:
        rec.update(status="error", error=str(exc).splitlines()[0][:160])
    return rec


def worker(args) -> None:
    if args.mem_limit_gib > 0:
        limit = int(args.mem_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch  # noqa: F401

    import confusion_kernels  # noqa: F401

    framework = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rec = run_case(args.impl, "cpu", args.n, args.k, args.d, args.data, args.reps,
                   args.max_seconds)
    rec["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rec["framework_mib"] = framework
    print("RESULT " + json.dumps(rec))


def cpu_case(args, impl: str, n: int, k: int, d: int, data: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--n", str(n),
           "--k", str(k), "--d", str(d), "--data", data, "--reps", str(args.reps),
           "--max-seconds", str(args.max_seconds), "--mem-limit-gib", str(args.mem_limit_gib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return dict(impl=impl, device="cpu", n=n, k=k, d=d, data=data, status="error",
                error=tail[0][:160])


def write_outputs(records: list[dict], meta: dict, stem: str) -> None:
    fields = ["impl", "device", "data", "n", "k", "d", "status", "median_ms", "runs", "x_floor",
              "speedup_vs_eager", "peak_mib", "framework_mib", "error"]
    with open(stem + ".csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(records)
    lines = [f"# N-Centroids loss (great circle), forward + backward ({meta['device_name']})", ""]
    lines += [f"- {key}: {meta.get(key)}" for key in ("date", "commit", "torch", "triton",
                                                     "threads", "command")]
    lines += ["", "Median ms of loss + backward (gradient for z). x floor: time over the two "
              "N x K x D products at the fp32 product rate measured before each step (median of "
              "the ratios). Peak MiB: CPU peak RSS of a fresh process (framework included); "
              "CUDA max allocated above the inputs.", "",
              "| data | N | K | D | impl | median ms | x floor | speed-up vs eager | peak MiB |",
              "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in records:
        if r["status"] == "ok":
            lines.append(f"| {r['data']} | {r['n']} | {r['k']} | {r['d']} | {r['impl']} | "
                         f"{r['median_ms']:.1f} | {r['x_floor']:.2f} | "
                         f"{r.get('speedup_vs_eager', float('nan')):.2f} | "
                         f"{r.get('peak_mib', 0):.0f} |")
        else:
            lines.append(f"| {r['data']} | {r['n']} | {r['k']} | {r['d']} | {r['impl']} | "
                         f"{r['status']}: {r.get('error', '')[:60]} | | | |")
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    ok = [r for r in records if r["status"] == "ok"]
    cases = sorted({(r["n"], r["k"], r["d"]) for r in ok})
    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(6 * max(1, len(cases)), 4),
                             squeeze=False)
    for ax, (n, k, d) in zip(axes[0], cases):
        sub = [r for r in ok if (r["n"], r["k"], r["d"]) == (n, k, d)]
        ax.bar(range(len(sub)), [r["median_ms"] for r in sub],
               color=["tab:blue" if r["data"] == "random" else "tab:orange" for r in sub])
        ax.set_xticks(range(len(sub)), [f"{r['impl']}\n{r['data']}" for r in sub], fontsize=7)
        ax.set_ylabel("median ms, forward + backward (lower is better)")
        ax.set_title(f"N-Centroids, great circle, N={n} K={k} D={d}")
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--impls", nargs="+")
    p.add_argument("--cases", nargs="+", help="N:K:D entries")
    p.add_argument("--data", nargs="+", choices=DATA, default=list(DATA))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--max-seconds", type=float, default=30.0)
    p.add_argument("--mem-limit-gib", type=float, default=20.0)
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    for name in ("n", "k", "d"):
        p.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.data = args.data[0]
        worker(args)
        return
    cuda = args.device == "cuda"
    impls = args.impls or (["fused", "triton", "eager", "compile", "reference"] if cuda
                           else ["fused", "eager", "compile", "reference"])
    cases = args.cases or (["65536:1000:128", "65536:10000:128"] if cuda else ["16384:1000:128"])
    import run_intra_inter_sums as base

    meta = base.metadata(args.device, sys.argv, roofline_ceilings=False)
    records = []
    for case in cases:
        n, k, d = (int(v) for v in case.split(":"))
        for data in args.data:
            for impl in impls:
                rec = (run_case(impl, "cuda", n, k, d, data, args.reps, args.max_seconds) if cuda
                       else cpu_case(args, impl, n, k, d, data))
                records.append(rec)
                shown = (f"{rec['median_ms']:.1f} ms, x floor {rec['x_floor']:.2f}, peak "
                         f"{rec.get('peak_mib', 0):.0f} MiB" if rec["status"] == "ok"
                         else f"{rec['status']} {rec.get('error', '')[:80]}")
                print(f"N={n} K={k} D={d} {data:9} {impl:9} {shown}", flush=True)
    eager = {(r["n"], r["k"], r["d"], r["data"]): r["median_ms"] for r in records
             if r["impl"] == "eager" and r["status"] == "ok"}
    for r in records:
        base_ms = eager.get((r["n"], r["k"], r["d"], r["data"]))
        if base_ms and r["status"] == "ok":
            r["speedup_vs_eager"] = base_ms / r["median_ms"]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"n_centroids-{args.device}")
    write_outputs(records, meta, stem)
    print("wrote", stem + ".csv", stem + ".md", stem + ".png")


if __name__ == "__main__":
    main()

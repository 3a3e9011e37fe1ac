"""Side-by-side benchmark of the affinity loss (docs/math.md, "Affinity loss"), forward + backward.

For each (N, C, m, D): the fused op on the kernel backends ("cpu", "triton",
"cuda"), the eager PyTorch reference ("eager") and torch.compile of the
reference ("compile"). The loss is the hinge part mean_i L_i with gradients for
f and the prototypes (the diversity regularizer is the same PyTorch code for
every implementation). Median time, peak memory (CPU: peak RSS of a fresh
process with an address-space cap; CUDA: max_memory_allocated above the
inputs), and the peak relative to inputs + gradients. Writes CSV + Markdown.

  python benchmarks/run_affinity.py --device cpu      # N=4096, C m in {1000, 10000}, D=128
  python benchmarks/run_affinity.py --device cuda     # N=65536, C in {1000, 100000}, m in {1, 5}, D=512
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
OOM = "out of memory"


def run_case(impl: str, device: str, n: int, c: int, m: int, d: int, reps: int,
             max_seconds: float) -> dict:
    import torch

    import confusion_kernels as ck
    from confusion_kernels.reference import affinity as ref

    rec = dict(impl=impl, device=device, n=n, c=c, m=m, d=d)
    g = torch.Generator().manual_seed(0)
    f = torch.randn(n, d, generator=g).to(device)
    w = (torch.randn(c, m, d, generator=g) / d ** 0.5).to(device)
    labels = torch.randint(0, c, (n,), generator=g).to(device)
    kw = dict(sigma=10.0, margin=0.75)

    def eager(fr, wr):
        return ref.affinity_hinge_rows(fr, labels, wr, similarity_kind="gaussian", **kw).mean()

    if impl == "eager":
        fn = eager
    elif impl == "compile":
        fn = torch.compile(eager)
    else:  # the public loss (lambda_diversity=0: the hinge part only)
        def fn(fr, wr):
            return ck.affinity_loss(fr, labels, wr, lambda_diversity=0.0, backend=impl,
                                    check_finite=False, **kw)

    def step() -> float:
        fr = f.detach().requires_grad_(True)
        wr = w.detach().requires_grad_(True)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(fr, wr).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rec["warmup_ms"] = step()
        times, start = [], time.perf_counter()
        while len(times) < reps and (time.perf_counter() - start < max_seconds or len(times) < 3):
            times.append(step())
        rec.update(status="ok", median_ms=statistics.median(times), runs=len(times))
        if device == "cuda":
            rec["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        rec.update(status=OOM, error=str(exc).splitlines()[0][:160])
    except RuntimeError as exc:
        text = str(exc)
        rec.update(status=OOM if "alloc" in text.lower() or "memory" in text.lower() else "error",
                   error=text.splitlines()[0][:160])
    # inputs + gradients: f, W and their gradients, labels
    rec["io_mib"] = (2 * n * d * 4 + 2 * c * m * d * 4 + 8 * n) / 2**20
    return rec


def worker(args) -> None:
    if args.mem_limit_gib > 0:
        limit = int(args.mem_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import torch  # noqa: F401

    import confusion_kernels  # noqa: F401

    rec = run_case(args.impl, "cpu", args.n, args.c, args.m, args.d, args.reps, args.max_seconds)
    rec["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rec["framework_mib"] = before
    print("RESULT " + json.dumps(rec))


def cpu_case(args, impl, n, c, m, d) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--n", str(n),
           "--c", str(c), "--m", str(m), "--d", str(d), "--reps", str(args.reps),
           "--max-seconds", str(args.max_seconds), "--mem-limit-gib", str(args.mem_limit_gib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    status = OOM if "alloc" in tail[0].lower() or proc.returncode in (-9, 137) else "error"
    return dict(impl=impl, device="cpu", n=n, c=c, m=m, d=d, status=status, error=tail[0][:160])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--impls", nargs="+")
    p.add_argument("--cases", nargs="+", help="N:C:m:D entries")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=30.0)
    p.add_argument("--mem-limit-gib", type=float, default=20.0)
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("impl", "n", "c", "m", "d"):
        p.add_argument(f"--{name}", type=str if name == "impl" else int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    cuda = args.device == "cuda"
    impls = args.impls or (["cuda", "triton", "eager", "compile"] if cuda else ["cpu", "eager", "compile"])
    cases = args.cases or (["65536:1000:1:512", "65536:1000:5:512", "65536:100000:1:512",
                            "65536:100000:5:512"] if cuda else ["4096:1000:1:128", "4096:10000:1:128",
                                                                 "4096:2000:5:128"])
    import run_intra_inter_sums as base

    meta = base.metadata(args.device, sys.argv, roofline_ceilings=False)
    records = []
    for case in cases:
        n, c, m, d = (int(v) for v in case.split(":"))
        for impl in impls:
            rec = cpu_case(args, impl, n, c, m, d) if not cuda else run_case(
                impl, "cuda", n, c, m, d, args.reps, args.max_seconds)
            records.append(rec)
            shown = (f"{rec['median_ms']:.1f} ms, peak {rec.get('peak_mib', 0):.0f} MiB"
                     if rec["status"] == "ok" else f"{rec['status']} {rec.get('error', '')[:80]}")
            print(f"N={n} C={c} m={m} D={d} {impl:8} {shown}", flush=True)
    eager = {(r["n"], r["c"], r["m"], r["d"]): r.get("median_ms") for r in records
             if r["impl"] == "eager" and r["status"] == "ok"}
    for r in records:
        b = eager.get((r["n"], r["c"], r["m"], r["d"]))
        if b and r["status"] == "ok":
            r["speedup_vs_eager"] = b / r["median_ms"]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"affinity-{args.device}")
    fields = ["impl", "device", "n", "c", "m", "d", "status", "median_ms", "runs", "peak_mib",
              "framework_mib", "io_mib", "speedup_vs_eager", "error"]
    with open(stem + ".csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(records)
    with open(stem + ".md", "w") as fh:
        fh.write(f"# affinity loss benchmark, forward + backward ({meta['device_name']})\n\n")
        for key in ("date", "commit", "torch", "triton", "cuda", "threads", "command"):
            fh.write(f"- {key}: {meta.get(key)}\n")
        fh.write("\nMedian ms of loss + backward (gradients for f and W). Peak MiB: CPU peak RSS of a "
                 "fresh process (framework included, `framework` column before the case); CUDA "
                 "max_memory_allocated above the inputs. `io` = f, W, their gradients and labels.\n\n")
        fh.write("| N | C | m | D | impl | median ms | speedup vs eager | peak MiB | framework MiB | io MiB |\n")
        fh.write("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|\n")
        for r in records:
            if r["status"] == "ok":
                fh.write(f"| {r['n']} | {r['c']} | {r['m']} | {r['d']} | {r['impl']} | "
                         f"{r['median_ms']:.1f} | {r.get('speedup_vs_eager', 0):.2f} | "
                         f"{r.get('peak_mib', 0):.0f} | {r.get('framework_mib', 0):.0f} | "
                         f"{r.get('io_mib', 0):.1f} |\n")
            else:
                fh.write(f"| {r['n']} | {r['c']} | {r['m']} | {r['d']} | {r['impl']} | "
                         f"{r['status']} | | | | |\n")
    print("wrote", stem + ".csv", stem + ".md")


if __name__ == "__main__":
    main()

"""ASLoss forward + backward, side by side in one run, on random and clustered data.

Providers (fused and two-pass once per --backends entry, named "<provider>-<backend>"
except for the cpu backend):
  fused      as_loss(..., backend=B): the one-pass op when it applies
             (weighted_pair_sums: loss and gradient in one pair pass)
  two-pass   the same loss from intra_inter_sums(backend=B): its forward, then its
             backward (on cpu and triton both halves are pair passes for the
             Gram metrics; the CUDA C++ kernels still visit every ordered pair)
  eager      the PyTorch reference (torch.cdist + masks, N x N memory)
  compile    torch.compile of the reference
  gram       the fastest plain-PyTorch formulation a user would write: the Gram form
             |x_i|^2 + |x_j|^2 - 2 x_i.x_j (x @ x.T) and masked row sums (N x N memory);
             gram-compile: torch.compile of it
  keops      the same loss with S_in / S_out from pykeops LazyTensor reductions
             (benchmarks/keops_peer.py; only where pykeops imports, else "unavailable")
Data:
  random     randn(N, D), 10 labels
  clustered  10 class centres at radius 10, each row its centre + N(0, 0.3^2) per
             dimension: what a trained embedding looks like
Floor: 3 N^2 D flops (one Gram product over the unordered pairs, two products for
the gradient) at the fp32 matrix-product rate measured in the same run
(benchmarks/roofline.py; on CUDA the tf32 rate when --tf32); "x floor" = median / floor.
On CPU also "x paired": each timed step against the floor at the rate of a matrix
product timed right before it (median of the ratios), which a drifting machine
speed does not skew; the plot shows it.

Every case runs in a fresh process: on CPU peak memory is that process's peak RSS
(about 580 MiB of it the framework), on CUDA torch.cuda.max_memory_allocated.
Writes CSV, Markdown and a PNG to --out.

  python benchmarks/run_as_loss.py --sizes 4096 --dims 64 --metrics euclidean
  python benchmarks/run_as_loss.py --device cuda --backends triton cuda --sizes 65536 --dims 128 --tf32
"""

import argparse
import csv
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_data  # noqa: E402
PROVIDERS = ["fused", "two-pass", "eager", "compile", "gram", "gram-compile", "keops"]
PEERS = ("eager", "compile", "gram", "gram-compile", "keops")  # everything but ours
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


def make_data(n: int, d: int, data: str, seed: int = 0):
    return bench_data.make_data(n, d, data, classes=10, seed=seed)


def split_provider(provider: str) -> tuple[str, str]:
    """"fused-triton" -> ("fused", "triton"); "fused" -> ("fused", "cpu"); "eager" -> ("eager", "cpu")."""
    for kind in ("fused", "two-pass"):
        if provider == kind or provider.startswith(kind + "-"):
            return kind, provider[len(kind) + 1:] or "cpu"
    return provider, "cpu"


def make_loss(provider: str, metric: str, labels):
    import torch

    import confusion_kernels as ck
    from confusion_kernels.losses.as_loss import term_weights

    kind, backend = split_provider(provider)
    if kind == "fused":
        return lambda x: ck.as_loss(x, labels, metric=metric, backend=backend, check_finite=False)
    def gram_row_sums(x):  # the plain formulation: |a|^2 + |b|^2 - 2 a.b, N x N memory
        xa = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if metric == "cosine":
            u = xa / xa.norm(dim=1, keepdim=True).clamp_min(1e-12)
            dist = 1.0 - u @ u.T
        else:
            sq = (xa * xa).sum(1)
            d2 = (sq[:, None] + sq[None, :] - 2.0 * (xa @ xa.T)).clamp_min(1e-12)
            dist = d2 if metric == "sqeuclidean" else d2.sqrt()
        same = labels[:, None] == labels[None, :]
        other = torch.eye(len(labels), dtype=torch.bool, device=x.device).logical_not_()
        return torch.where(same & other, dist, 0.0).sum(1), torch.where(same, 0.0, dist).sum(1)

    def keops_row_sums(x):
        import keops_peer

        return keops_peer.intra_inter_sums(x, labels, metric)

    row_sums = {
        "two-pass": lambda x: ck.intra_inter_sums(x, labels, metric, backend=backend,
                                                  check_finite=False),
        "keops": keops_row_sums, "gram": gram_row_sums, "gram-compile": gram_row_sums,
    }.get(kind)
    if row_sums is not None:
        def from_row_sums(x):  # the ASLoss (pair_mean, the defaults) from S_in and S_out
            w_in, w_out = term_weights(labels, "pair_mean", False, 1.0, torch.float32)
            s_in, s_out = row_sums(x)
            xa = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            boundary = (torch.linalg.vector_norm(xa, dim=1) - 10.0).square().mean()
            return 1e-3 * (w_in * s_in).sum() - 1e-3 * (w_out * s_out).sum() + 1e-2 * boundary
        return torch.compile(from_row_sums) if kind == "gram-compile" else from_row_sums

    def reference(x):
        return ck.reference.as_loss(x, labels, metric=metric)

    return torch.compile(reference) if provider == "compile" else reference


def gemm_rate_probe(size: int = 2048):
    """A function that times one fp32 size^3 matrix product and returns its rate (flop/s):
    the roofline.py measurement, one sample at a time."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)

    def rate() -> float:
        t0 = time.perf_counter()
        torch.mm(a, b)
        return 2.0 * size ** 3 / (time.perf_counter() - t0)
    return rate


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    x, labels = make_data(args.n, args.d, args.data)
    x, labels = x.to(args.device, getattr(torch, DTYPES[args.dtype])), labels.to(args.device)
    rec = dict(provider=args.provider, metric=args.metric, data=args.data, n=args.n, d=args.d,
               dtype=args.dtype)
    if args.provider == "keops":
        import keops_peer

        why = keops_peer.available()
        if why:
            return dict(rec, status="unavailable", error=why)
    loss = make_loss(args.provider, args.metric, labels)

    def step() -> float:
        xr = x.clone().requires_grad_(True)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss(xr).backward()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        loss(xr).backward()
        return (time.perf_counter() - t0) * 1e3

    # CPU: the matrix-product rate is measured again right before every timed step
    # (this VM's speed drifts), and each step is set against the floor at that rate
    gemm = gemm_rate_probe() if not cuda else None
    floor_flops = 3.0 * args.n * args.n * args.d
    try:
        for _ in range(args.warmup):  # compilation, caches
            step()
        times, ratios, rates, start = [], [], [], time.perf_counter()
        while len(times) < args.reps and (time.perf_counter() - start < args.max_seconds
                                          or len(times) < args.min_reps):
            if gemm:
                rates.append(gemm())
            times.append(step())
            if gemm:
                ratios.append(times[-1] / (floor_flops / rates[-1] * 1e3))
        times.sort()
        rec.update(status="ok", median_ms=statistics.median(times),
                   p20_ms=times[int(0.2 * (len(times) - 1))],
                   p80_ms=times[int(0.8 * (len(times) - 1))], runs=len(times))
        if gemm:
            rec.update(x_floor_paired=statistics.median(ratios),
                       paired_gflops=statistics.median(rates) / 1e9)
    except (MemoryError, RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        text = str(exc)
        rec.update(status="out of memory" if "alloc" in text.lower() or isinstance(exc, MemoryError)
                   else "error", error=text.splitlines()[0][:160] if text else type(exc).__name__)
    rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        rec["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return rec


def run_case(args, provider, metric, data, n, d) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--provider", provider,
           "--metric", metric, "--data", data, "--n", str(n), "--d", str(d),
           "--reps", str(args.reps), "--max-seconds", str(args.max_seconds),
           "--min-reps", str(args.min_reps), "--warmup", str(args.warmup), "--dtypes", args.dtype,
           "--threads", str(args.threads), "--device", args.device] + (["--tf32"] if args.tf32 else [])
    limit = int(args.mem_limit_gib * 2**30)

    def cap():  # CPU only: CUDA reserves far more address space than it uses
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    base = dict(provider=provider, metric=metric, data=data, n=n, d=d, dtype=args.dtype)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              preexec_fn=cap if args.device == "cpu" else None,
                              timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return dict(base, status="timeout", error=f"over --case-timeout {args.case_timeout:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines and proc.returncode == 0:
        return json.loads(lines[-1])
    os.makedirs(args.out, exist_ok=True)  # what a failed case printed, for the record
    with open(os.path.join(args.out, f"failed-{provider}-{metric}-{data}-{args.dtype}-{n}-{d}.log"),
              "w") as f:
        f.write(f"exit code {proc.returncode}\n--- stdout\n{proc.stdout[-20000:]}\n"
                f"--- stderr\n{proc.stderr[-20000:]}\n")
    if lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or [f"no output (exit code {proc.returncode})"])[-1][:160]
    status = "out of memory" if "alloc" in tail.lower() or "memory" in tail.lower() else "error"
    return dict(base, status=status, error=tail)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[4096])
    p.add_argument("--dims", nargs="+", type=int, default=[64])
    p.add_argument("--metrics", nargs="+", default=["euclidean", "cosine"])
    p.add_argument("--data", nargs="+", default=["random", "clustered"], choices=["random", "clustered"])
    p.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backends", nargs="+", default=None,
                   help="kernel backends of fused / two-pass (default: cpu; on cuda: triton cuda)")
    p.add_argument("--tf32", action="store_true", help="CUDA: allow tf32 (and use its floor)")
    p.add_argument("--skip-eager-above", type=int, default=16384,
                   help="eager / compile / keops only up to this N (eager needs N x N memory)")
    p.add_argument("--peer-data", nargs="+", default=["random", "clustered"],
                   choices=["random", "clustered"], help="data on which eager / compile / keops run")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES),
                   help="input dtypes (fp32 floor at the fp32 / tf32 rate, bf16 / fp16 at theirs)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--min-reps", type=int, default=3, help="timed calls even past --max-seconds")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (0: the first "
                   "timed call includes compilation or a cache load)")
    p.add_argument("--max-seconds", type=float, default=30.0)
    p.add_argument("--mem-limit-gib", type=float, default=20.0, help="CPU: address-space cap per case")
    p.add_argument("--case-timeout", type=float, default=1800.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--provider", help=argparse.SUPPRESS)
    p.add_argument("--metric", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.data = args.data[0] if isinstance(args.data, list) else args.data
        args.dtype = args.dtypes[0]
        print(json.dumps(worker(args)))
        return

    import torch

    from roofline import measure_ceilings

    ceilings = measure_ceilings(args.device)
    def rate_of(dtype: str) -> float:  # flop/s of the matrix product the floor counts at
        if dtype in ("bf16", "fp16") and f"{dtype}_tflops" in ceilings:
            return ceilings[f"{dtype}_tflops"] * 1e12
        if dtype == "fp32" and args.device == "cuda" and args.tf32:
            return ceilings["tf32_tflops"] * 1e12
        return ceilings.get(f"{dtype}_tflops", ceilings["fp32_tflops"]) * 1e12
    rate = rate_of(args.dtypes[0])
    backends = args.backends or (["triton", "cuda"] if args.device == "cuda" else ["cpu"])
    providers = []
    for provider in args.providers:
        if provider in ("fused", "two-pass"):
            providers += [provider if b == "cpu" else f"{provider}-{b}" for b in backends]
        else:
            providers.append(provider)
    cases = [(n, d, metric, data, dtype, provider)
             for n in args.sizes for d in args.dims for metric in args.metrics
             for data in args.data for dtype in args.dtypes for provider in providers
             if provider not in PEERS or (n <= args.skip_eager_above and data in args.peer_data)]
    # ours first, then the peers: a run stopped at its time limit has the rows that matter most
    cases.sort(key=lambda c: c[5] in PEERS)
    records = []
    for n, d, metric, data, dtype, provider in cases:
        args.dtype = dtype
        floor_ms = 3.0 * n * n * d / rate_of(dtype) * 1e3
        rec = run_case(args, provider, metric, data, n, d)
        rec["floor_ms"] = floor_ms
        if rec.get("status") == "ok":
            rec["x_floor"] = rec["median_ms"] / floor_ms
        records.append(rec)
        print(json.dumps(rec), flush=True)
        write_reports(records, args, rate, torch.__version__)  # after every case


def write_reports(records, args, rate, torch_version) -> None:
    os.makedirs(args.out, exist_ok=True)
    commit = os.environ.get("CK_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    cuda = args.device == "cuda"
    stem = os.path.join(args.out, f"as_loss_{args.device}")
    peak = "peak_cuda_mib" if cuda else "peak_rss_mib"
    keys = ["provider", "metric", "data", "dtype", "n", "d", "status", "median_ms", "p20_ms", "p80_ms",
            "runs", "floor_ms", "x_floor", "paired_gflops", "x_floor_paired", peak, "error"]
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    eager = {(r["metric"], r["data"], r["n"], r["d"], r.get("dtype")): r.get("median_ms") for r in records
             if r["provider"] == "eager" and r.get("status") == "ok"}
    if cuda:
        import torch

        where = f"CUDA ({torch.cuda.get_device_name()})"
    else:
        where = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    precision = "tf32" if cuda and args.tf32 else "fp32"
    lines = [f"# ASLoss forward + backward, {where}",
             "", f"{dt.date.today()}, commit {commit}, torch {torch_version}, {precision} matrix-product "
             f"rate {rate / 1e9:.0f} GFLOP/s (measured in this run; bf16 / fp16 rows at their own "
             f"measured rate); floor = 3 N^2 D flops at that rate.",
             f"Command: `python benchmarks/run_as_loss.py {' '.join(sys.argv[1:])}`", "",
             *([] if cuda else [
                 "x paired: the median over the timed steps of step time / floor, the floor "
                 "at the rate of a 2048^3 product timed right before each step (robust to the "
                 "machine's speed drifting during the run)."]),
             "",
             f"| metric | data | dtype | N | D | provider | median ms | x floor | "
             f"{'' if cuda else 'x paired | '}vs eager | peak {'CUDA' if cuda else 'RSS'} MiB |",
             "|---|---|---|---:|---:|---|---:|---:|" + ("" if cuda else "---:|") + "---:|---:|"]
    for r in records:
        key = (r["metric"], r["data"], r["n"], r["d"], r.get("dtype"))
        if r.get("status") != "ok":
            lines.append(f"| {r['metric']} | {r['data']} | {r.get('dtype')} | {r['n']} | {r['d']} | "
                         f"{r['provider']} | {r.get('status')} | |{'' if cuda else ' |'} | {r.get(peak) or 0:.0f} |")
            continue
        speedup = f"{eager[key] / r['median_ms']:.1f}x" if eager.get(key) else "-"
        paired = "" if cuda else f" {r['x_floor_paired']:.2f} |"
        lines.append(f"| {r['metric']} | {r['data']} | {r.get('dtype')} | {r['n']} | {r['d']} | "
                     f"{r['provider']} | {r['median_ms']:.1f} | {r['x_floor']:.2f} |{paired} {speedup} | "
                     f"{r.get(peak) or 0:.0f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in records if r.get("status") == "ok"]
    cases = sorted({(r["metric"], r["n"], r["d"]) for r in ok})
    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(5 * max(1, len(cases)), 4), squeeze=False)
    for ax, (metric, n, d) in zip(axes[0], cases):
        sub = [r for r in ok if (r["metric"], r["n"], r["d"]) == (metric, n, d)]
        labels = [f"{r['provider']}\n{r['data']}" for r in sub]
        ax.bar(range(len(sub)), [r.get("x_floor_paired", r["x_floor"]) for r in sub],
               color=["tab:blue" if r["data"] == "random" else "tab:orange" for r in sub])
        ax.set_xticks(range(len(sub)), labels, fontsize=7)
        ax.axhline(2.5, color="gray", linestyle="--", linewidth=1)
        ax.set_ylabel(("median" if cuda else "paired") + " / compute floor (lower is better)")
        ax.set_title(f"{metric}, N={n}, D={d}")
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)


if __name__ == "__main__":
    main()

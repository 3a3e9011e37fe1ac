"""Side-by-side benchmark of intra_inter_sums / ASLoss implementations.

One run compares, for every (N, D, metric, mode):
  fused backends ("cpu", "cuda", "triton"; "cuda-pair-pass" is the cuda backend
  under CONFUSION_KERNELS_CUDA_PAIR_PASS=1), the eager PyTorch reference
  ("eager"), torch.compile of the reference ("compile") and KeOps ("keops",
  benchmarks/keops_peer.py, when pykeops is installed),
and writes CSV + Markdown + PNG plots (time and peak memory vs N; out of
memory is recorded, never crashed on). Each case also gets its roofline floor
(benchmarks/roofline.py: ceilings measured once on the same device) and the
fraction of it achieved.

CPU: every case runs in a fresh subprocess whose address space is capped
(--mem-limit-gib), so an eager N x N allocation that does not fit fails inside
that process; its peak RSS is the process's own. CUDA: one process, peak
memory from torch.cuda.max_memory_allocated, CUDA-event timing.

Examples:
  python benchmarks/run_intra_inter_sums.py --device cpu
  python benchmarks/run_intra_inter_sums.py --device cuda   # the full GPU grid:
      N = 4096 ... 1048576 (powers of 4), D in {2, 128, 512}, every metric,
      fwd / bwd / full, cuda cuda-pair-pass triton eager compile keops; cases predicted to
      take longer than --max-predicted-seconds per run are recorded as skipped.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_data  # noqa: E402
OOM = "out of memory"
ALL_METRICS = ["euclidean", "sqeuclidean", "manhattan", "cosine", "smooth_l1"]
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
PAIR_PASS = "CONFUSION_KERNELS_CUDA_PAIR_PASS"


# ---------------------------------------------------------------------------
# One case (runs in the worker)
# ---------------------------------------------------------------------------
def make_fn(impl: str, metric: str, x, labels):
    import torch

    import confusion_kernels as ck

    if impl in ("eager", "compile"):
        def ref(inp):
            return ck.reference.intra_inter_sums(inp, labels, metric)

        fn = torch.compile(ref) if impl == "compile" else ref
    elif impl == "keops":
        import keops_peer

        def fn(inp):
            return keops_peer.intra_inter_sums(inp, labels, metric)
    else:
        # "cuda-pair-pass": the cuda backend with its pair pass instead of
        # the full-tile Gram kernels (read by the extension at every call, so set for
        # the whole case).
        os.environ[PAIR_PASS] = "1" if impl == "cuda-pair-pass" else "0"
        backend = "cuda" if impl == "cuda-pair-pass" else impl

        def fn(inp):
            return ck.intra_inter_sums(inp, labels, metric, backend=backend, check_finite=False)
    return fn


def run_case(impl: str, device: str, n: int, d: int, metric: str, mode: str, reps: int,
             max_seconds: float, min_runs: int = 3, dtype: str = "float32",
             data: str = "random") -> dict:
    """Median time (ms) and peak memory (MiB) of one case, or an OOM / error record."""
    import torch

    record = dict(impl=impl, device=device, n=n, d=d, metric=metric, mode=mode, dtype=dtype,
                  data=data)
    if impl == "keops":
        import keops_peer

        reason = keops_peer.available()
        if reason is not None:
            return dict(record, status="not run", error=reason)
    x, labels = bench_data.make_data(n, d, data, classes=100, seed=n + d)
    x, labels = x.to(device=device, dtype=getattr(torch, dtype)), labels.to(device)
    g = torch.Generator().manual_seed(n + d + 1)
    g_in = torch.randn(n, generator=g).to(device)
    g_out = torch.randn(n, generator=g).to(device)
    fn = make_fn(impl, metric, x, labels)
    cuda = device == "cuda"

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(x)
            return
        xr = x.detach().requires_grad_(True)
        s_in, s_out = fn(xr)
        if mode == "bwd":
            return s_in, s_out, xr
        torch.autograd.backward((s_in, s_out), (g_in, g_out))

    def timed() -> float:
        if mode == "bwd":
            s_in, s_out, xr = step()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.autograd.backward((s_in, s_out), (g_in, g_out))
                end.record()
                torch.cuda.synchronize()
                return start.elapsed_time(end)
            t0 = time.perf_counter()
            torch.autograd.backward((s_in, s_out), (g_in, g_out))
            return (time.perf_counter() - t0) * 1e3
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3

    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        first = timed()  # warm-up (compilation, autotuning, caches)
        times = []
        budget_start = time.perf_counter()
        while len(times) < reps and (time.perf_counter() - budget_start < max_seconds or len(times) < min_runs):
            times.append(timed())
        record["median_ms"] = statistics.median(times)
        record["p20_ms"] = sorted(times)[int(0.2 * (len(times) - 1))]
        record["p80_ms"] = sorted(times)[int(0.8 * (len(times) - 1))]
        record["runs"] = len(times)
        record["warmup_ms"] = first
        if cuda:
            record["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        record["status"] = OOM
        record["error"] = str(exc).splitlines()[0][:200]
    except RuntimeError as exc:
        text = str(exc)
        if "alloc" in text.lower() or "out of memory" in text.lower():
            record["status"] = OOM
        else:
            record["status"] = "error"
        record["error"] = text.splitlines()[0][:200] if text else type(exc).__name__
    record.setdefault("status", "ok")
    return record


def worker_main(args) -> None:
    """Entry point of the per-case CPU subprocess: prints one JSON record."""
    import resource

    if args.mem_limit_gib > 0:
        limit = int(args.mem_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    rec = run_case(args.impl, "cpu", args.n, args.d, args.metric, args.mode, args.reps,
                   args.max_seconds, args.min_runs, args.dtype, args.case_data)
    rec["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    print("RESULT " + json.dumps(rec))


def run_cpu_case(args, impl, n, d, metric, mode, data) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--n", str(n),
           "--d", str(d), "--metric", metric, "--mode", mode, "--case-data", data,
           "--reps", str(args.reps),
           "--max-seconds", str(args.max_seconds), "--min-runs", str(args.min_runs),
           "--mem-limit-gib", str(args.mem_limit_gib), "--dtype", args.dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    status = OOM if proc.returncode in (-9, 137) or "alloc" in tail[0].lower() else "error"
    return dict(impl=impl, device="cpu", n=n, d=d, metric=metric, mode=mode, data=data,
                status=status,
                error=f"exit {proc.returncode}: {tail[0][:200]}")


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------
FIELDS = ["impl", "device", "dtype", "data", "metric", "mode", "n", "d", "status", "median_ms", "p20_ms",
          "p80_ms", "runs", "peak_mib", "speedup_vs_eager", "floor_ms", "of_floor", "error"]


def add_floors(records: list[dict], meta: dict) -> None:
    """floor_ms (roofline.py) and of_floor = floor / median for every timed case."""
    import torch

    import roofline

    ceilings = meta.get("ceilings") or {}
    for r in records:
        floor = roofline.floor_ms(ceilings, r["metric"], r["mode"], r["n"], r["d"],
                                  getattr(torch, r.get("dtype", "float32")),
                                  bool(meta.get("allow_tf32")))
        if floor is not None:
            r["floor_ms"] = floor
            if r["status"] == "ok":
                r["of_floor"] = floor / r["median_ms"]


def add_speedups(records: list[dict]) -> None:
    def key(r):
        return r.get("data", "random"), r["metric"], r["mode"], r["n"], r["d"]

    eager = {key(r): r.get("median_ms") for r in records if r["impl"] == "eager" and r["status"] == "ok"}
    for r in records:
        base = eager.get(key(r))
        if base and r["status"] == "ok":
            r["speedup_vs_eager"] = base / r["median_ms"]


def fmt(value, digits=1):
    return "" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def write_reports(records: list[dict], meta: dict, out_dir: str, stem: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    add_speedups(records)
    add_floors(records, meta)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w") as f:
        f.write(f"# intra_inter_sums benchmark ({meta['device_name']})\n\n")
        for key in ("date", "commit", "device_name", "torch", "triton", "cuda", "pykeops", "python",
                    "host", "threads", "dtype", "allow_tf32", "ceilings", "command"):
            f.write(f"- {key}: {meta.get(key)}\n")
        f.write("\nMedian time in ms (p20-p80) over `runs` timed runs after a warm-up, peak "
                "memory in MiB (CPU: peak RSS of a fresh process, including the framework; CUDA: "
                "max_memory_allocated above the inputs). Speedup is eager time / this time. "
                "Floor: the roofline floor of the case (benchmarks/roofline.py, from the ceilings "
                "above); of floor = floor / median.\n\n")
        f.write("Data (benchmarks/bench_data.py): random = N(0, 1) entries; clustered = 100 "
                "class centres at radius 10, rows spread N(0, 0.3^2) per dimension around them.\n\n")
        f.write("| data | metric | mode | N | D | impl | median ms | p20-p80 ms | runs | peak MiB | "
                "speedup vs eager | floor ms | of floor |\n")
        f.write("|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in sorted(records, key=lambda r: (r["metric"], r["mode"], r["d"], r["n"],
                                                r.get("data", "random"), r["impl"])):
            data = r.get("data", "random")
            if r["status"] == "ok":
                f.write(f"| {data} | {r['metric']} | {r['mode']} | {r['n']} | {r['d']} | {r['impl']} | "
                        f"{fmt(r['median_ms'], 2)} | {fmt(r['p20_ms'], 2)}-{fmt(r['p80_ms'], 2)} | "
                        f"{fmt(r.get('runs'))} | {fmt(r.get('peak_mib'), 0)} | "
                        f"{fmt(r.get('speedup_vs_eager'), 2)} | {fmt(r.get('floor_ms'), 3)} | "
                        f"{fmt(r.get('of_floor'), 3)} |\n")
            else:
                why = r.get("error", "")
                why = f" ({why[:60]})" if why and r["status"] != OOM else ""
                f.write(f"| {data} | {r['metric']} | {r['mode']} | {r['n']} | {r['d']} | {r['impl']} | "
                        f"{r['status']}{why} | | | | | {fmt(r.get('floor_ms'), 3)} | |\n")
    paths = [csv_path, md_path]
    paths += plot(records, out_dir, stem)
    return paths


def plot(records: list[dict], out_dir: str, stem: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    paths = []
    groups = sorted({(r["metric"], r["mode"], r["d"]) for r in records})
    for metric, mode, d in groups:
        sel = [r for r in records if (r["metric"], r["mode"], r["d"]) == (metric, mode, d)]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        markers = iter("osD^vP*X")
        for impl, data in sorted({(r["impl"], r.get("data", "random")) for r in sel}):
            rows = sorted((r for r in sel if (r["impl"], r.get("data", "random")) == (impl, data)),
                          key=lambda r: r["n"])
            ok = [r for r in rows if r["status"] == "ok"]
            marker = next(markers, "o")
            for ax, key in zip(axes, ("median_ms", "peak_mib")):
                line, = ax.plot([r["n"] for r in ok], [r.get(key) for r in ok], marker=marker,
                                fillstyle="none", label=f"{impl} ({data})",
                                linestyle="--" if data == "clustered" else "-")
                for r in rows:  # failures: a cross at the last good value, with the reason
                    if r["status"] in (OOM, "error"):
                        y = ok[-1].get(key) if ok else 1.0
                        ax.scatter([r["n"]], [y], marker="x", s=80, color=line.get_color())
                        ax.annotate(OOM if r["status"] == OOM else "failed", (r["n"], y),
                                    fontsize=7, textcoords="offset points", xytext=(4, 4))
        for ax, label in zip(axes, ("median time (ms)", "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"intra_inter_sums {metric} {mode}, D={d} ({records[0]['device']})")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-{metric}-{mode}-D{d}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def metadata(device: str, argv: list[str], dtype: str = "float32", roofline_ceilings: bool = True) -> dict:
    import torch

    import keops_peer
    import roofline

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    # CK_COMMIT: set by the caller where the checkout has no .git (the GPU machine)
    commit = os.environ.get("CK_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip() or "unknown"
        except OSError:
            commit = "unknown"
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    if device == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name}, {os.cpu_count()} cores"
    if keops_peer.available() is None:
        import pykeops
        keops_version = pykeops.__version__
    else:
        keops_version = "not installed"
    ceilings = roofline.measure_ceilings(device) if roofline_ceilings else {}
    return dict(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=commit,
                device_name=name, torch=torch.__version__, triton=triton_version,
                cuda=torch.version.cuda, pykeops=keops_version, python=platform.python_version(),
                host=platform.node(), threads=torch.get_num_threads(), dtype=dtype,
                allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
                ceilings={k: round(v, 1) for k, v in ceilings.items()},
                command="python " + " ".join(argv))


def predict_seconds(records: list[dict], case: dict) -> float:
    """Seconds per run predicted for `case` from the same series at a smaller N
    (time grows as N^2); 0 when there is none. A series that failed (out of
    memory, skipped) at a smaller N predicts infinity only for skips."""
    same = [r for r in records if all(r.get(k) == case.get(k) for k in ("impl", "d", "metric", "mode", "data"))
            and r["n"] < case["n"]]
    if not same:
        return 0.0
    last = max(same, key=lambda r: r["n"])
    if last["status"] == "skipped":
        return float("inf")
    if last["status"] != "ok":
        return 0.0
    return last["median_ms"] / 1e3 * (case["n"] / last["n"]) ** 2


# ---------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--impls", nargs="+",
                   help="default: cpu eager compile (CPU); cuda cuda-pair-pass triton eager "
                        "compile keops (CUDA; cuda-pair-pass: CONFUSION_KERNELS_CUDA_PAIR_PASS=1)")
    p.add_argument("--sizes", nargs="+", type=int,
                   help="default: 1024 4096 16384 65536 (CPU); 4096 ... 1048576, powers of 4 (CUDA)")
    p.add_argument("--dims", nargs="+", type=int, help="default: 2 64 (CPU); 2 128 512 (CUDA)")
    p.add_argument("--metrics", nargs="+", help="default: euclidean (CPU); all five (CUDA)")
    p.add_argument("--modes", nargs="+", choices=["fwd", "bwd", "full"],
                   help="default: full (CPU); fwd bwd full (CUDA)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--data", nargs="+", choices=list(bench_data.DATA_KINDS),
                   default=list(bench_data.DATA_KINDS), help="input kinds (default: both)")
    p.add_argument("--tf32", action="store_true",
                   help="set torch.backends.cuda.matmul.allow_tf32 (our fp32 kernels then use tf32)")
    p.add_argument("--no-roofline", action="store_true", help="do not measure the ceilings")
    p.add_argument("--max-predicted-seconds", type=float, default=0.0,
                   help="skip a case whose run is predicted (from the same series at N/4, "
                        "times 16) to take longer than this; 0: never skip")
    p.add_argument("--reps", type=int, default=None, help="timed runs per case (default 5 CPU, 20 CUDA)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="stop repeating a case after this")
    p.add_argument("--min-runs", type=int, default=3, help="timed runs per case even past --max-seconds")
    p.add_argument("--skip-eager-above", type=int, default=0,
                   help="record eager/compile as not run above this N (0: always try)")
    p.add_argument("--mem-limit-gib", type=float, default=20.0, help="CPU: address-space cap per case")
    p.add_argument("--case-timeout", type=float, default=1800.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out"))
    p.add_argument("--stem", default=None)
    p.add_argument("--report-only", metavar="JSONL",
                   help="write the CSV/Markdown/plots from a records file of an earlier run")
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, help=argparse.SUPPRESS)
    p.add_argument("--metric", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--case-data", default="random", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker and args.reps is None:
        args.reps = 5
    if args.worker:
        worker_main(args)
        return

    cuda = args.device == "cuda"
    args.sizes = args.sizes or ([4096, 16384, 65536, 262144, 1048576] if cuda else [1024, 4096, 16384, 65536])
    args.dims = args.dims or ([2, 128, 512] if cuda else [2, 64])
    args.metrics = args.metrics or (ALL_METRICS if cuda else ["euclidean"])
    args.modes = args.modes or (["fwd", "bwd", "full"] if cuda else ["full"])
    args.reps = args.reps or (20 if cuda else 5)
    if args.tf32:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = True
    stem = args.stem or f"intra_inter_sums-{args.device}"
    if args.report_only:
        with open(args.report_only) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        meta, records = lines[0], lines[1:]
        for path in write_reports(records, meta, args.out, stem):
            print("wrote", path)
        return
    impls = args.impls or (["cpu", "eager", "compile"] if args.device == "cpu"
                           else ["cuda", "cuda-pair-pass", "triton", "eager", "compile", "keops"])
    meta = metadata(args.device, sys.argv, args.dtype, not args.no_roofline)
    print("ceilings:", meta["ceilings"], flush=True)
    os.makedirs(args.out, exist_ok=True)
    # one JSON line per finished case: a run cut short still leaves its records
    jsonl = open(os.path.join(args.out, f"{stem}.jsonl"), "w")
    jsonl.write(json.dumps(meta) + "\n")
    records = []
    cases = itertools.product(args.metrics, args.modes, args.dims, args.sizes, args.data, impls)
    for metric, mode, d, n, data, impl in cases:
        base = dict(impl=impl, device=args.device, n=n, d=d, metric=metric, mode=mode,
                    dtype=args.dtype, data=data)
        predicted = predict_seconds(records, base)
        if impl in ("eager", "compile") and args.skip_eager_above and n > args.skip_eager_above:
            rec = dict(base, status="not run", error="--skip-eager-above")
        elif args.max_predicted_seconds and predicted > args.max_predicted_seconds:
            rec = dict(base, status="skipped", error=f"predicted {predicted:.0f} s per run (16 x N/4)")
        elif args.device == "cpu":
            rec = run_cpu_case(args, impl, n, d, metric, mode, data)
        else:
            rec = run_case(impl, "cuda", n, d, metric, mode, args.reps, args.max_seconds,
                           args.min_runs, args.dtype, data)
            import torch
            torch.cuda.empty_cache()
        records.append(rec)
        jsonl.write(json.dumps(rec) + "\n")
        jsonl.flush()
        shown = (f"{rec['median_ms']:.2f} ms, {rec.get('peak_mib', float('nan')):.0f} MiB"
                 if rec["status"] == "ok" else f"{rec['status']} ({rec.get('error', '')[:80]})")
        print(f"{metric:10} {mode:4} N={n:<8} D={d:<4} {data:9} {impl:15} {shown}", flush=True)
    jsonl.close()
    for path in write_reports(records, meta, args.out, stem):
        print("wrote", path)


if __name__ == "__main__":
    main()

"""The benchmark suite: every op side by side in one process, on this machine.

    python benchmarks/run.py --suite cpu|gpu|all|crossover|retrieval [--out DIR] [--reps R]
                             [--update-docs]

For each case (benchmarks/suite_cases.py: op, mode, random or clustered data, sizes) every
provider that can compute it runs (ours per backend, eager, torch.compile, KeOps where it
expresses the op and is installed): a warm-up call, then R timed calls. Recorded per row:
median, p20 and p80 time, the peak memory of the call above what was held before it (CUDA:
max_memory_allocated; CPU: the process's resident high-water mark, reset before each
provider), and the fraction of the floor: floor = max(flops / fp32 matrix-product rate,
bytes / copy bandwidth), both measured on this device at the start, divided by the median.

Writes to --out (default benchmarks/results/<date>-suite-<suite>-<device>/): suite.csv (long
format: op, provider, mode, data, N, D, K, dtype, median_ms, p20_ms, p80_ms, peak_mib,
fraction_of_floor, status, device, torch, triton, commit), suite.md (a table per op) and
suite.png (median time per provider and case); the cpu suite also measures the slowdown
under two busy background processes, as started and again in a process with
OMP_WAIT_POLICY=passive (contention.csv, benchmarks/contention.py).
--suite crossover times the fused CPU kernels against the eager definitions at N = 16 ... 1024
(benchmarks/crossover.py): crossover.csv and crossover.md, the source of the size thresholds of
backend="auto" on CPU (confusion_kernels/_routing.py, CPU_FUSED_MIN_ROWS).
--suite retrieval times self-retrieval scores on this CPU at N = 16384 and 65536 (D = 128, 1000
classes, cosine) beside faiss-cpu's exact search, the plain Gram + topk and PML's
AccuracyCalculator (suite_cases.retrieval_case).
--update-docs writes the Markdown tables
between the suite markers of docs/benchmarks.md and a one-line-per-op-and-shape summary between those
of the README (the tables there are generated, not typed).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import roofline  # noqa: E402
import suite_cases  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["op", "provider", "mode", "data", "N", "D", "K", "dtype", "median_ms", "p20_ms",
           "p80_ms", "peak_mib", "fraction_of_floor", "floor_bound", "status", "device", "torch",
           "triton", "commit"]


def commit() -> str:
    """The commit measured: $CK_COMMIT (the GPU machine has no .git), else git's HEAD."""
    if os.environ.get("CK_COMMIT"):
        return os.environ["CK_COMMIT"]
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak(device: torch.device) -> float:
    """Resets the peak-memory counter; returns what is held now (MiB)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    _malloc_trim()  # hand freed heap memory back, so that RSS counts live memory only
    try:  # Linux: writing 5 resets the resident high-water mark (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _rss_mib("VmRSS:")


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_mib("VmHWM:")


def time_provider(step, device: torch.device, reps: int, budget_s: float):
    """(times in ms, peak MiB above the start) of ``reps`` calls after one warm-up call;
    fewer calls when the warm-up says they would exceed ``budget_s``."""
    held = _reset_peak(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    reps = max(1, min(reps, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times), _peak(device) - held


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


def run_suite(suite: str, device: torch.device, reps: int, budget_s: float, ceilings: dict,
              keops: bool) -> list[dict]:
    rows = []
    versions = {"device": device_name(device), "torch": torch.__version__,
                "triton": _triton_version(), "commit": commit()}
    makers = suite_cases.suite_cases(suite, device, keops)
    for index, make in enumerate(makers):
        case = make()
        compute = case.flops / (ceilings["fp32_tflops"] * 1e12) * 1e3
        memory = case.nbytes / (ceilings["bandwidth_gbs"] * 1e9) * 1e3
        floor = max(compute, memory)
        bound = "flops" if compute >= memory else "bytes"  # which floor the fraction uses
        for provider, step in case.steps.items():
            row = {"op": case.op, "provider": provider, "mode": case.mode, "data": case.data,
                   "N": case.n, "D": case.d, "K": case.k, "dtype": "float32",
                   "floor_bound": bound, **versions}
            try:
                times, peak = time_provider(step, device, reps, budget_s)
                median = quantile(times, 0.5)
                row.update(median_ms=median, p20_ms=quantile(times, 0.2),
                           p80_ms=quantile(times, 0.8), peak_mib=peak,
                           fraction_of_floor=floor / median, status="ok")
            except torch.OutOfMemoryError:
                row.update(status="out of memory")
            except Exception as err:  # a peer that cannot run a case is reported, not fatal
                row.update(status=f"error: {type(err).__name__}: {str(err)[:120]}")
            rows.append(row)
            print(f"[{index + 1}/{len(makers)}] {case.op} {case.mode} {case.data} N={case.n} "
                  f"{provider}: {row.get('median_ms', float('nan')):.2f} ms ({row['status']})",
                  flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "-"


def _fmt(value, digits: int = 1) -> str:
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if value < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(rows: list[dict]) -> list[str]:
    """One table per op: rows = (mode, data, sizes), columns = providers' median ms, with
    the best provider's fraction of the floor and peak memory."""
    lines = []
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        providers = list(dict.fromkeys(r["provider"] for r in mine))
        lines += [f"**{op}** (median ms; peak MiB and fraction of the floor of the fastest; "
                  "floor: the flops at the measured product rate or the bytes at the measured "
                  "copy rate, whichever is larger)", "",
                  "| mode | data | N | D | K | " + " | ".join(providers)
                  + " | fastest | peak MiB | of floor | floor |",
                  "|---|---|---:|---:|---:|" + "---:|" * (len(providers) + 3) + "---|"]
        for key in dict.fromkeys((r["mode"], r["data"], r["N"], r["D"], r["K"]) for r in mine):
            group = {r["provider"]: r for r in mine
                     if (r["mode"], r["data"], r["N"], r["D"], r["K"]) == key}
            cells = []
            for p in providers:
                r = group.get(p)
                cells.append("-" if r is None else
                             _fmt(r.get("median_ms"), 2) if r["status"] == "ok" else r["status"][:20])
            ok = [r for r in group.values() if r["status"] == "ok"]
            best = min(ok, key=lambda r: r["median_ms"]) if ok else None
            lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + " | "
                         + (f"{best['provider']} | {_fmt(best['peak_mib'])} | "
                            f"{_fmt(best['fraction_of_floor'], 3)} | "
                            f"{best.get('floor_bound', '-')} |" if best else "- | - | - | - |"))
        lines.append("")
    return lines


def faster(a: dict | None, b: dict | None) -> dict | None:
    """The row with the smaller median of two (either may be missing)."""
    if a is None or b is None:
        return a or b
    return a if a["median_ms"] <= b["median_ms"] else b


def summary(rows: list[dict]) -> list[str]:
    """One line per op and shape (random data, forward + backward where measured): ours
    against eager and torch.compile, the README's speed table. Each baseline is the faster of
    the readable definition and the plain formulation (``-plain`` providers), marked "(plain)"
    when the latter won, so that no ratio flatters us against a slow formulation."""
    lines = ["| op | N | D | K | ours | eager | torch.compile | vs eager | vs compile |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for op, n, d, k in dict.fromkeys((r["op"], r["N"], r["D"], r["K"]) for r in rows):
        mine = [r for r in rows if (r["op"], r["N"], r["D"], r["K"]) == (op, n, d, k)
                and r["data"] == "random" and r["status"] == "ok"]
        modes = [r["mode"] for r in mine]
        mode = "fwd+bwd" if "fwd+bwd" in modes else (modes[0] if modes else None)
        pick = {r["provider"]: r for r in mine if r["mode"] == mode}
        ours = [r for p, r in pick.items() if p.startswith("ours-")]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        eager, comp = (faster(pick.get(name), pick.get(f"{name}-plain"))
                       for name in ("eager", "compile"))

        def ms(r):
            if not r:
                return "-"
            return f"{_fmt(r['median_ms'], 2)} ms" + (" (plain)" if r["provider"].endswith(
                "-plain") else "")

        def ratio(r):
            return f"{r['median_ms'] / best['median_ms']:.1f}×" if r else "-"

        lines.append(f"| {op} ({mode}) | {best['N']} | {best['D']} | {best['K']} | "
                     f"**{ms(best)}** ({best['provider'][5:]}) | {ms(eager)} | {ms(comp)} | "
                     f"{ratio(eager)} | {ratio(comp)} |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 2.6 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        mine = [r for r in rows if r["op"] == op and r["status"] == "ok"]
        keys = list(dict.fromkeys(f"{r['mode']} {r['data']} N={r['N']}" for r in mine))
        providers = list(dict.fromkeys(r["provider"] for r in mine))
        width = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            values = [next((r["median_ms"] for r in mine if r["provider"] == p and
                            f"{r['mode']} {r['data']} N={r['N']}" == k), 0.0) for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], values, width, label=p)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, fontsize=7)
        ax.set_ylabel("median ms")
        ax.set_title(op, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_block(path: Path, name: str, lines: list[str]) -> None:
    """Replaces the text between <!-- name:begin --> and <!-- name:end --> of ``path`` (appended
    when the markers are missing)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text()
    block = "\n".join([begin, *lines, end])
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def update_docs(rows: list[dict], header: str, suite: str) -> None:
    """The suite's tables into docs/benchmarks.md and its summary into the README."""
    replace_block(ROOT / "docs" / "benchmarks.md", f"suite:{suite}", [header, "", *markdown(rows)])
    replace_block(ROOT / "README.md", f"suite:{suite}:summary", [header, "", *summary(rows)])


def results_dir(out: str | None, kind: str, device: torch.device) -> Path:
    """--out, or benchmarks/results/<date>-<kind>-<device tag>/ (created)."""
    tag = device_name(device).split(" (")[0].replace(" ", "-").lower()
    path = Path(out) if out else ROOT / "benchmarks" / "results" / \
        f"{datetime.date.today().isoformat()}-{kind}-{tag}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_csv(path: Path, rows: list[dict], fieldnames: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def run_crossover(args) -> Path:
    """--suite crossover: crossover.csv and crossover.md (benchmarks/crossover.py)."""
    import crossover

    started = time.perf_counter()
    rows = crossover.measure(reps=args.reps or 21)
    device = torch.device("cpu")
    stamp = datetime.date.today().isoformat()
    out = results_dir(args.out, "crossover", device)
    write_csv(out / "crossover.csv", rows, list(rows[0]))
    header = (f"Crossover on {device_name(device)}, {stamp}, commit {commit()}, torch "
              f"{torch.__version__}: `python benchmarks/run.py --suite crossover` "
              f"({time.perf_counter() - started:.0f} s, median of {args.reps or 21} calls).")
    (out / "crossover.md").write_text("\n".join(["# Fused CPU kernels at small N", "", header, "",
                                                 *crossover.markdown(rows)]))
    print(f"wrote {out}/crossover.csv, crossover.md; thresholds {crossover.thresholds(rows)}")
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("cpu", "gpu", "all", "crossover", "retrieval"),
                        required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--reps", type=int, default=None, help="timed calls (5 cpu, 20 gpu)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed calls per provider and case (6 cpu, 2 gpu)")
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument("--no-contention", action="store_true",
                        help="skip the contention case of the cpu suite (benchmarks/contention.py)")
    args = parser.parse_args(argv)
    if args.suite == "crossover":
        return run_crossover(args)
    suites = ["cpu", "gpu"] if args.suite == "all" else [args.suite]
    if "gpu" in suites and not torch.cuda.is_available():
        if args.suite == "gpu":
            raise SystemExit("--suite gpu needs a CUDA device")
        suites.remove("gpu")
    out = None
    for suite in suites:
        device = torch.device("cuda" if suite == "gpu" else "cpu")  # retrieval: this CPU
        reps = args.reps or (20 if suite == "gpu" else 5)
        budget = args.budget or (2.0 if suite == "gpu" else 6.0)
        started = time.perf_counter()
        ceilings = roofline.measure_ceilings(device.type)
        import keops_peer

        keops = keops_peer.available() is None
        rows = run_suite(suite, device, reps, budget, ceilings, keops)
        stamp = datetime.date.today().isoformat()
        out = results_dir(args.out, f"suite-{suite}", device)
        write_csv(out / "suite.csv", rows, COLUMNS)
        header = (f"Suite `{suite}` on {device_name(device)}, {stamp}, commit {commit()}, "
                  f"torch {torch.__version__}, Triton {_triton_version()}: "
                  f"`python benchmarks/run.py --suite {suite}` "
                  f"({time.perf_counter() - started:.0f} s; fp32 product rate "
                  f"{ceilings['fp32_tflops']:.2f} TFLOP/s, copy {ceilings['bandwidth_gbs']:.0f} GB/s "
                  f"measured at the start). Full CSV: `{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}/suite.csv`.")
        tables = markdown(rows)
        if suite == "cpu" and not args.no_contention:
            import contention

            loaded = contention.measure(contention.default_steps())
            spin = contention.spin_after_region_ms()
            for r in loaded:
                r["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
                r["spin_after_region_ms"] = spin
            passive = contention.measure_with_env({"OMP_WAIT_POLICY": "passive"})
            write_csv(out / "contention.csv", loaded + passive, list(loaded[0]))
            tables += contention.markdown(loaded, passive)
            for r in loaded + passive:
                print(f"contention: {r['step']} (OMP_WAIT_POLICY={r['omp_wait_policy']!r}): "
                      f"{r['idle_ms']:.1f} -> {r['loaded_ms']:.1f} ms ({r['slowdown']:.1f}x)",
                      flush=True)
        (out / "suite.md").write_text("\n".join([f"# Benchmark suite: {suite}", "", header, "",
                                                 *tables]))
        plot(rows, out / "suite.png")
        if args.update_docs:
            update_docs(rows, header, suite)
        print(f"wrote {out}/suite.csv, suite.md, suite.png")
    return out


if __name__ == "__main__":
    main()

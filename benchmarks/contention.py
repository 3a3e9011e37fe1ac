"""How much an op slows down when other processes compete for the cores (a CPU training run
has data-loader workers beside it): each step's median time idle, then with ``busy`` processes
spinning beside it for a bounded time, and the ratio. The reference point is a plain matrix
product under the same load: a fused op should slow down no more than it does
(benchmarks/run.py --suite cpu runs this and writes contention.csv and a table in suite.md).

GNU OpenMP (torch's CPU threads on Linux) lets its worker threads spin for several
milliseconds after each parallel region before they sleep; beside busy processes that spinning
takes the cores the next serial step needs. ``OMP_WAIT_POLICY=passive`` makes them sleep at
once. It is read when the OpenMP runtime loads, so the suite measures it in a second process:
``python benchmarks/contention.py --json`` prints the rows of one measurement.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from typing import Callable

import torch


def _spin(deadline: float) -> None:
    """A busy process: pure Python arithmetic until the deadline (no threads, no memory)."""
    x = 0
    while time.time() < deadline:
        x += 1


class BackgroundLoad:
    """``busy`` spinning processes for at most ``seconds`` (they stop by themselves; the context
    manager also ends them on exit)."""

    def __init__(self, busy: int, seconds: float):
        self.busy, self.seconds, self.procs = busy, seconds, []

    def __enter__(self):
        ctx = mp.get_context("fork")
        deadline = time.time() + self.seconds
        self.procs = [ctx.Process(target=_spin, args=(deadline,), daemon=True)
                      for _ in range(self.busy)]
        for p in self.procs:
            p.start()
        time.sleep(0.2)  # let them get on the cores
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
            p.join(timeout=5)
        return False


def median_ms(step: Callable[[], None], reps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(steps: dict[str, Callable[[], None]], busy: int = 2, reps: int = 11,
            seconds: float = 60.0) -> list[dict]:
    """Per step: idle median, loaded median (``busy`` processes beside it), slowdown."""
    rows = []
    for name, step in steps.items():
        idle = median_ms(step, reps)
        with BackgroundLoad(busy, seconds):
            loaded = median_ms(step, reps)
        rows.append({"step": name, "busy": busy, "idle_ms": idle, "loaded_ms": loaded,
                     "slowdown": loaded / idle})
    return rows


def default_steps(n: int = 4096, d: int = 64, product: int = 2048) -> dict[str, Callable[[], None]]:
    """Every fused CPU op at the suite's shapes (fwd+bwd, random data), the ASLoss's eager
    definition, and a product. Sizes scale with ``n`` (the test runs them tiny)."""
    import confusion_kernels as ck
    from confusion_kernels import reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).requires_grad_(True)
    labels = torch.randint(0, 10, (n,), generator=g)
    rows = max(n // 4, 8)  # the rectangular op: N / 4 rows against 2 N reference rows
    q, ql = x.detach()[:rows].clone().requires_grad_(True), labels[:rows]
    ref = torch.randn(2 * n, d, generator=g).requires_grad_(True)
    ref_labels = torch.randint(0, 10, (2 * n,), generator=g)
    classes, wide = max(n // 4, 4), 2 * d  # affinity: N x (N / 4 classes), D = 2 D
    f = torch.randn(n, wide, generator=g).requires_grad_(True)
    f_labels = torch.randint(0, classes, (n,), generator=g)
    protos = torch.randn(classes, 1, wide, generator=g).requires_grad_(True)
    z = reference.n_centroids.normalize(torch.randn(4 * n, wide, generator=g)).requires_grad_(True)
    z_labels = torch.randint(0, classes, (4 * n,), generator=g)
    cents = reference.n_centroids.normalize(torch.randn(classes, wide, generator=g))
    a = torch.randn(product, product, generator=g)

    def backward(loss: torch.Tensor, *leaves: torch.Tensor) -> None:
        for t in leaves:
            t.grad = None
        loss.backward()

    def rect() -> None:
        s_in, s_out = ck.intra_inter_sums(q, ql, ref=ref, ref_labels=ref_labels, backend="cpu")
        backward(s_in.sum() + s_out.sum(), q, ref)

    return {
        f"as_loss ours-cpu (N={n}, D={d})":
            lambda: backward(ck.as_loss(x, labels, backend="cpu"), x),
        f"as_loss eager (N={n}, D={d})":
            lambda: backward(reference.as_loss(x, labels), x),
        f"intra_inter_sums rect ours-cpu (N={rows}, M={2 * n}, D={d})": rect,
        f"affinity_loss ours-cpu (N={n}, C={classes}, m=1, D={wide})":
            lambda: backward(ck.affinity_loss(f, f_labels, protos, lambda_diversity=0.0,
                                              backend="cpu"), f, protos),
        f"n_centroids_loss ours-cpu (N={4 * n}, K={classes}, D={wide})":
            lambda: backward(ck.n_centroids_loss(z, z_labels, cents, backend="cpu"), z),
        f"matrix product {product}^3": lambda: a @ a,
    }


def spin_after_region_ms(samples: int = 21) -> float:
    """CPU time (ms, median) the process burns while its main thread sleeps 200 ms right after
    a parallel region: the worker threads' spinning before they sleep."""
    import resource

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    a = torch.randn(1 << 22)
    burned = []
    for _ in range(samples):
        a.exp_().clamp_(-1.0, 1.0)  # parallel regions on every thread
        start = cpu()
        time.sleep(0.2)
        burned.append((cpu() - start) * 1e3)
    return sorted(burned)[len(burned) // 2]


def measure_with_env(env: dict[str, str], busy: int = 2, reps: int = 11,
                     seconds: float = 60.0, n: int = 4096) -> list[dict]:
    """``measure(default_steps(n))`` in a fresh Python process with ``env`` added to the
    environment (for settings read when a runtime loads, such as ``OMP_WAIT_POLICY``)."""
    cmd = [sys.executable, __file__, "--json", "--busy", str(busy), "--reps", str(reps),
           "--seconds", str(seconds), "--n", str(n)]
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], passive: list[dict] | None = None) -> list[str]:
    """The table of ``measure``'s rows; with ``passive`` (the same steps measured under
    ``OMP_WAIT_POLICY=passive``) two more columns."""
    title = (f"**Under contention** ({rows[0]['busy']} busy processes beside each step; median ms)"
             if rows else "**Under contention**")
    head, rule = "| step | idle | loaded | slowdown |", "|---|---:|---:|---:|"
    if passive:
        head += " idle (passive) | loaded (passive) | slowdown (passive) |"
        rule += "---:|---:|---:|"
    if rows and "spin_after_region_ms" in rows[0]:
        title += (f"; idle OpenMP workers burn {rows[0]['spin_after_region_ms']:.1f} ms of CPU after "
                  "a region" + (f" ({passive[0]['spin_after_region_ms']:.1f} ms passive)"
                                if passive and "spin_after_region_ms" in passive[0] else ""))
    lines = [title, "", head, rule]
    by_step = {r["step"]: r for r in passive or []}
    for r in rows:
        line = f"| {r['step']} | {r['idle_ms']:.1f} | {r['loaded_ms']:.1f} | {r['slowdown']:.1f}× |"
        if passive:
            p = by_step.get(r["step"])
            line += (f" {p['idle_ms']:.1f} | {p['loaded_ms']:.1f} | {p['slowdown']:.1f}× |" if p
                     else " – | – | – |")
        lines.append(line)
    if passive:
        lines += ["", "\"(passive)\": the same steps in a process started with "
                  "`OMP_WAIT_POLICY=passive` (OpenMP workers sleep at the end of each parallel "
                  "region instead of spinning; docs/design.md, \"Beside busy processes on CPU\")."]
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    parser.add_argument("--busy", type=int, default=2)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--n", type=int, default=4096)
    args = parser.parse_args(argv)
    rows = measure(default_steps(n=args.n), busy=args.busy, reps=args.reps, seconds=args.seconds)
    spin = spin_after_region_ms()
    for r in rows:
        r["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
        r["spin_after_region_ms"] = spin
    print(json.dumps(rows) if args.json else "\n".join(markdown(rows)))


if __name__ == "__main__":
    main()

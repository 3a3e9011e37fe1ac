"""How much an op slows down when other processes compete for the cores (a CPU training run
has data-loader workers beside it): each step's median time idle, then with ``busy`` processes
spinning beside it for a bounded time, and the ratio. The reference point is a plain matrix
product under the same load: a fused op should slow down no more than it does
(benchmarks/run.py --suite cpu runs this and writes contention.csv and a table in suite.md).
"""

from __future__ import annotations

import multiprocessing as mp
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


def measure(steps: dict[str, Callable[[], None]], busy: int = 2, reps: int = 5,
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
    """The fused ASLoss (fwd+bwd, random data) on cpu, its eager definition, and a product."""
    import confusion_kernels as ck
    from confusion_kernels import reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).requires_grad_(True)
    labels = torch.randint(0, 10, (n,), generator=g)
    a = torch.randn(product, product, generator=g)

    def fused() -> None:
        x.grad = None
        ck.as_loss(x, labels, backend="cpu").backward()

    def eager() -> None:
        x.grad = None
        reference.as_loss(x, labels).backward()

    return {f"as_loss ours-cpu (N={n}, D={d})": fused, f"as_loss eager (N={n}, D={d})": eager,
            f"matrix product {product}^3": lambda: a @ a}


def markdown(rows: list[dict]) -> list[str]:
    lines = [f"**Under contention** ({rows[0]['busy']} busy processes beside each step; median ms)"
             if rows else "**Under contention**", "",
             "| step | idle | loaded | slowdown |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['idle_ms']:.1f} | {r['loaded_ms']:.1f} | "
                     f"{r['slowdown']:.1f}× |")
    return lines + [""]

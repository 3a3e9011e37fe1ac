"""Where the fused CPU kernels overtake the eager definition, per op: the median time of both
(forward + backward where the op has a gradient) at N = 16 ... 1024 rows, and the smallest N
from which the fused kernel is the faster one at every measured size.

``backend="auto"`` sends CPU inputs with fewer rows than that to the reference
(``confusion_kernels/_routing.py``, ``CPU_FUSED_MIN_ROWS``): a small batch pays the fused
kernel's fixed costs (set-up, tiles, parallel regions) without the N^2 work that repays them.
This measurement is where those numbers come from; ``benchmarks/run.py --suite crossover``
writes crossover.csv and crossover.md, and tests/test_routing.py checks that the constants
are the ones the committed CSV gives.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

import confusion_kernels as ck
from confusion_kernels import reference
from confusion_kernels.analysis import ClassStatistics

SIZES = (16, 32, 64, 128, 256, 512, 1024)
# Within this factor the two count as a tie, and a tie goes to the fused kernel (O(N D)
# memory): timing noise on a shared machine must not move a threshold.
TIE = 1.05
Step = Callable[[], None]


def _backward(loss: torch.Tensor, *leaves: torch.Tensor) -> None:
    for t in leaves:
        t.grad = None
    loss.backward()


def _as_loss(metric: str, d: int) -> Callable[[int, torch.Generator], tuple[Step, Step]]:
    def build(n: int, g: torch.Generator) -> tuple[Step, Step]:
        x = torch.randn(n, d, generator=g).requires_grad_(True)
        y = torch.randint(0, 10, (n,), generator=g)
        return (lambda: _backward(ck.as_loss(x, y, metric=metric, backend="cpu"), x),
                lambda: _backward(reference.as_loss(x, y, metric=metric), x))
    return build


def _square_sums(metric: str, d: int) -> Callable[[int, torch.Generator], tuple[Step, Step]]:
    def build(n: int, g: torch.Generator) -> tuple[Step, Step]:
        x = torch.randn(n, d, generator=g).requires_grad_(True)
        y = torch.randint(0, 10, (n,), generator=g)

        def total(sums):
            return sums[0].sum() + sums[1].sum()
        return (lambda: _backward(total(ck.intra_inter_sums(x, y, metric, backend="cpu")), x),
                lambda: _backward(total(reference.intra_inter_sums(x, y, metric)), x))
    return build


def _rect_sums(n: int, g: torch.Generator) -> tuple[Step, Step]:
    x = torch.randn(n, 64, generator=g).requires_grad_(True)
    ref = torch.randn(2 * n, 64, generator=g).requires_grad_(True)
    y, ry = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (2 * n,), generator=g)

    def total(sums):
        return sums[0].sum() + sums[1].sum()
    return (lambda: _backward(total(ck.intra_inter_sums(x, y, ref=ref, ref_labels=ry,
                                                        backend="cpu")), x, ref),
            lambda: _backward(total(reference.intra_inter_sums(x, y, "euclidean", ref=ref,
                                                               ref_labels=ry)), x, ref))


def _affinity(n: int, g: torch.Generator) -> tuple[Step, Step]:
    # the demo's shape: D = 64, 10 classes x 5 prototypes
    f = torch.randn(n, 64, generator=g).requires_grad_(True)
    y = torch.randint(0, 10, (n,), generator=g)
    w = torch.randn(10, 5, 64, generator=g).requires_grad_(True)
    return (lambda: _backward(ck.affinity_loss(f, y, w, backend="cpu"), f, w),
            lambda: _backward(reference.affinity.affinity_loss(f, y, w), f, w))


def _n_centroids(n: int, g: torch.Generator) -> tuple[Step, Step]:
    z = reference.n_centroids.normalize(torch.randn(n, 128, generator=g)).requires_grad_(True)
    y = torch.randint(0, 100, (n,), generator=g)
    c = reference.n_centroids.normalize(torch.randn(100, 128, generator=g))
    return (lambda: _backward(ck.n_centroids_loss(z, y, c, backend="cpu"), z),
            lambda: _backward(ck.n_centroids_loss(z, y, c, backend="reference"), z))


def _class_stats(n: int, g: torch.Generator) -> tuple[Step, Step]:
    feats = torch.randn(n, 512, generator=g)
    y = torch.randint(0, 100, (n,), generator=g)
    return (lambda: ClassStatistics(100, 512).update(feats, y, backend="cpu"),
            lambda: ClassStatistics(100, 512).update(feats, y, backend="reference"))


def _pair_loss(loss: str, metric: str) -> Callable[[int, torch.Generator], tuple[Step, Step]]:
    fn = {"supcon": ck.supcon_loss, "contrastive": ck.contrastive_loss}[loss]

    def build(n: int, g: torch.Generator) -> tuple[Step, Step]:
        x = torch.randn(n, 128, generator=g).requires_grad_(True)
        y = torch.randint(0, max(n // 2, 1), (n,), generator=g)  # about two samples a class
        return (lambda: _backward(fn(x, y, metric=metric, backend="cpu"), x),
                lambda: _backward(fn(x, y, metric=metric, backend="reference"), x))
    return build


# case name -> (the routing key it decides: op or op[metric], builder(n, generator) ->
# (fused step, eager step))
CASES: dict[str, tuple[str, Callable[[int, torch.Generator], tuple[Step, Step]]]] = {
    **{f"as_loss[{metric}] D={d}": (f"as_loss_terms[{metric}]", _as_loss(metric, d))
       for metric, d in (("euclidean", 64), ("sqeuclidean", 64), ("manhattan", 64),
                         ("cosine", 128))},
    **{f"intra_inter_sums[{metric}] D={d}": (f"intra_inter_sums[{metric}]", _square_sums(metric, d))
       for metric, d in (("euclidean", 64), ("cosine", 128))},
    # measured, not routed (the rectangular op always runs fused: _routing.py says why)
    "intra_inter_sums rect M=2N D=64": ("intra_inter_sums_rect", _rect_sums),
    "affinity_loss C=10 m=5 D=64": ("affinity_hinge", _affinity),
    "n_centroids_loss K=100 D=128": ("n_centroids_rows", _n_centroids),
    "ClassStatistics.update C=100 D=512": ("class_shifted_sums", _class_stats),
    "supcon_loss[cosine] D=128": ("pair_loss[cosine]", _pair_loss("supcon", "cosine")),
    "contrastive_loss[euclidean] D=128": ("pair_loss[euclidean]",
                                          _pair_loss("contrastive", "euclidean")),
}


def median_ms(step: Step, reps: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def measure(sizes=SIZES, reps: int = 21, cases=None) -> list[dict]:
    """One row per (case, N): the fused and eager medians and their ratio."""
    rows = []
    for name, (op, build) in (cases or CASES).items():
        for n in sizes:
            fused, eager = build(n, torch.Generator().manual_seed(n))
            f_ms, e_ms = median_ms(fused, reps), median_ms(eager, reps)
            rows.append({"case": name, "op": op, "N": n, "fused_ms": f_ms, "eager_ms": e_ms,
                         "eager_over_fused": e_ms / f_ms})
            print(f"crossover: {name} N={n}: fused {f_ms:.3f} ms, eager {e_ms:.3f} ms",
                  flush=True)
    return rows


def thresholds(rows: list[dict]) -> dict[str, int]:
    """Per routing key: the smallest measured N from which the fused kernel is faster (or
    within TIE) at every larger measured N, over all of the key's cases (the largest such N among them); 0 when it
    is faster at every measured N, one more than the largest N when it never is."""
    out: dict[str, int] = {}
    for op in dict.fromkeys(r["op"] for r in rows):
        need = 0
        for case in dict.fromkeys(r["case"] for r in rows if r["op"] == op):
            mine = sorted((r for r in rows if r["case"] == case), key=lambda r: r["N"])
            start = mine[-1]["N"] + 1
            for r in reversed(mine):
                if float(r["fused_ms"]) > TIE * float(r["eager_ms"]):
                    break
                start = r["N"]
            need = max(need, start)
        out[op] = need if need > min(r["N"] for r in rows) else 0
    return out


def markdown(rows: list[dict]) -> list[str]:
    lines = ["**Fused CPU kernel against the eager definition at small N** (median ms; "
             "`backend=\"auto\"` takes the reference below each op's threshold)", "",
             "| case | N | fused | eager | eager / fused |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['N']} | {float(r['fused_ms']):.3f} | "
                     f"{float(r['eager_ms']):.3f} | {float(r['eager_over_fused']):.2f}× |")
    lines += ["", "| routing key | fused from N = |", "|---|---:|"]
    lines += [f"| {op} | {n} |" for op, n in thresholds(rows).items()]
    return lines + [""]

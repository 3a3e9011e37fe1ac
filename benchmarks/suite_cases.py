"""The cases of the benchmark suite (benchmarks/run.py): every op, each provider that can
compute it, random and clustered data.

A case builds its inputs once and returns, per provider, a step function that runs the op
(forward, or forward + backward) and returns nothing. Providers:
  ours-<backend>  the package on that backend (cpu, triton, cuda; what this machine can run)
  eager           the readable PyTorch definition (confusion_kernels.reference); for the
                  N-Centroids loss the plain N x K formulation of run_n_centroids.py
  compile         torch.compile of that definition (Inductor)
  eager-plain     the fastest plain-PyTorch formulation a user would write, where it differs
                  from the definition (plain_formulations.py: torch.cdist's matrix-product
                  mode or the Gram form x @ y.T, then masked sums): the pair ops
  compile-plain   torch.compile of it
  pml-contrastive pytorch-metric-learning's ContrastiveLoss set up to compute the euclidean
                  ASLoss's pair means (as_loss[euclidean], where PML is installed)
(the affinity reference is already the Gram form, the N-Centroids eager the plain N x K form,
the class statistics' reference vectorised index_add: they need no second formulation)
  keops           a pykeops LazyTensor formulation, where KeOps expresses the op and is installed
Each case also states its work (flops and bytes) for the floor of benchmarks/run.py: the
matrix products of the least work that computes it, e.g. for the pair sums one product over
the N^2/2 unordered pairs forward (N^2 D flops) and two more for the gradient (3 N^2 D in all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import confusion_kernels as ck
from confusion_kernels import _backend, reference
from confusion_kernels.analysis import ClassStatistics

import plain_formulations as plain
from bench_data import make_data
from run_n_centroids import eager_loss as eager_n_centroids


@dataclass
class Case:
    op: str
    mode: str          # "fwd" or "fwd+bwd"
    data: str          # "random" or "clustered"
    n: int
    d: int
    k: int             # classes, prototypes, centroids or reference rows (see the op)
    flops: float
    nbytes: float
    steps: dict[str, Callable[[], None]] = field(default_factory=dict)


def our_backends(device: torch.device, op: str) -> list[str]:
    candidates = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    return [b for b in candidates if _backend.unavailable_reason(b, device, op) is None]


def _step(loss_fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], mode: str):
    def run() -> None:
        for t in leaves:
            t.grad = None
        if mode == "fwd":
            with torch.no_grad():
                loss_fn()
        else:
            loss_fn().backward()

    return run


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _rows(n: int, d: int, data: str, classes: int, device: torch.device):
    x, labels = make_data(n, d, data, classes=classes)
    return x.to(device).requires_grad_(True), labels.to(device)


def intra_inter_sums_case(device, n, d, data, metric, mode, keops) -> Case:
    x, labels = _rows(n, d, data, 100, device)
    g_in = torch.randn(n, device=device)

    def _weighted(sums):
        return (sums[0] * g_in).sum() + sums[1].sum()

    p = float(n) * n
    case = Case(f"intra_inter_sums[{metric}]", mode, data, n, d, 100,
                flops=(1 if mode == "fwd" else 3) * p * d, nbytes=3.0 * n * d * 4)
    for b in our_backends(device, "intra_inter_sums"):
        case.steps[f"ours-{b}"] = _step(
            lambda b=b: _weighted(ck.intra_inter_sums(x, labels, metric, backend=b)), [x], mode)
    eager = lambda: _weighted(reference.intra_inter_sums(x, labels, metric))  # noqa: E731
    case.steps["eager"] = _step(eager, [x], mode)
    compiled = _compiled(lambda a, y: reference.intra_inter_sums(a, y, metric))
    case.steps["compile"] = _step(lambda: _weighted(compiled(x, labels)), [x], mode)
    if plain.has_plain_form(metric):
        case.steps["eager-plain"] = _step(lambda: _weighted(plain.row_sums(x, labels, metric)),
                                          [x], mode)
        plain_compiled = _compiled(lambda a, y: plain.row_sums(a, y, metric))
        case.steps["compile-plain"] = _step(lambda: _weighted(plain_compiled(x, labels)), [x],
                                            mode)
    if keops:
        import keops_peer

        case.steps["keops"] = _step(lambda: _weighted(keops_peer.intra_inter_sums(x, labels, metric)),
                                    [x], mode)
    return case


def as_loss_case(device, n, d, data, metric, auto: bool = False) -> Case:
    """``auto``: also what backend="auto" runs (small batches: the reference on CPU below
    the measured threshold, _routing.CPU_FUSED_MIN_ROWS)."""
    x, labels = _rows(n, d, data, 10, device)
    case = Case(f"as_loss[{metric}]", "fwd+bwd", data, n, d, 10,
                flops=3.0 * n * n * d, nbytes=3.0 * n * d * 4)
    for b in our_backends(device, "intra_inter_sums") + (["auto"] if auto else []):
        case.steps[f"ours-{b}"] = _step(lambda b=b: ck.as_loss(x, labels, metric=metric, backend=b),
                                        [x], "fwd+bwd")
    case.steps["eager"] = _step(lambda: reference.as_loss(x, labels, metric=metric), [x], "fwd+bwd")
    compiled = _compiled(lambda a, y: reference.as_loss(a, y, metric=metric))
    case.steps["compile"] = _step(lambda: compiled(x, labels), [x], "fwd+bwd")
    if metric == "euclidean" and plain.pml_available():
        # the peer users know: pytorch-metric-learning's ContrastiveLoss, the same pair means
        case.steps["pml-contrastive"] = _step(lambda: plain.pml_contrastive_as_loss(x, labels),
                                              [x], "fwd+bwd")
    if plain.has_plain_form(metric):
        case.steps["eager-plain"] = _step(lambda: plain.as_loss(x, labels, metric), [x],
                                          "fwd+bwd")
        plain_compiled = _compiled(lambda a, y: plain.as_loss(a, y, metric))
        case.steps["compile-plain"] = _step(lambda: plain_compiled(x, labels), [x], "fwd+bwd")
    return case


def affinity_case(device, n, d, data, classes, centers, auto: bool = False) -> Case:
    f, labels = _rows(n, d, data, classes, device)
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(classes, centers, d, generator=g) * 3).to(device).requires_grad_(True)
    p = classes * centers
    case = Case(f"affinity_loss[m={centers}]", "fwd+bwd", data, n, d, p,
                flops=6.0 * n * p * d, nbytes=4.0 * (n + p) * d * 2)
    for b in our_backends(device, "affinity_hinge") + (["auto"] if auto else []):
        case.steps[f"ours-{b}"] = _step(
            lambda b=b: ck.affinity_loss(f, labels, w, lambda_diversity=0.0, backend=b), [f, w],
            "fwd+bwd")
    eager = lambda: reference.affinity.affinity_loss(f, labels, w, lambda_diversity=0.0)  # noqa: E731
    case.steps["eager"] = _step(eager, [f, w], "fwd+bwd")
    compiled = _compiled(lambda a, y, p_: reference.affinity.affinity_loss(a, y, p_,
                                                                            lambda_diversity=0.0))
    case.steps["compile"] = _step(lambda: compiled(f, labels, w), [f, w], "fwd+bwd")
    return case


def n_centroids_case(device, n, d, data, k) -> Case:
    z, labels = _rows(n, d, data, k, device)
    g = torch.Generator().manual_seed(2)
    c = reference.n_centroids.normalize(torch.randn(k, d, generator=g)).to(device)
    case = Case("n_centroids_loss[great_circle]", "fwd+bwd", data, n, d, k,
                flops=4.0 * n * k * d, nbytes=4.0 * (n + k) * d * 2)
    for b in our_backends(device, "n_centroids_rows"):
        case.steps[f"ours-{b}"] = _step(lambda b=b: ck.n_centroids_loss(z, labels, c, backend=b),
                                        [z], "fwd+bwd")
    # eager: the plain N x K formulation (the readable reference broadcasts N x K x D)
    case.steps["eager"] = _step(lambda: eager_n_centroids(z, labels, c), [z], "fwd+bwd")
    compiled = _compiled(eager_n_centroids)
    case.steps["compile"] = _step(lambda: compiled(z, labels, c), [z], "fwd+bwd")
    return case


def rect_case(device, n, m, d, data) -> Case:
    x, labels = _rows(n, d, data, 10, device)
    ref, ref_labels = _rows(m, d, data, 10, device)
    case = Case("intra_inter_sums_rect[euclidean]", "fwd+bwd", data, n, d, m,
                flops=6.0 * n * m * d, nbytes=4.0 * (n + m) * d * 2)

    def total(sums):
        return sums[0].sum() + sums[1].sum()

    for b in our_backends(device, "intra_inter_sums_rect"):
        case.steps[f"ours-{b}"] = _step(lambda b=b: total(ck.intra_inter_sums(
            x, labels, ref=ref, ref_labels=ref_labels, backend=b)), [x, ref], "fwd+bwd")
    eager = lambda: total(reference.intra_inter_sums(x, labels, "euclidean", ref=ref,  # noqa: E731
                                                     ref_labels=ref_labels))
    case.steps["eager"] = _step(eager, [x, ref], "fwd+bwd")
    compiled = _compiled(lambda a, y, r, z: reference.intra_inter_sums(a, y, "euclidean", ref=r,
                                                                        ref_labels=z))
    case.steps["compile"] = _step(lambda: total(compiled(x, labels, ref, ref_labels)), [x, ref],
                                  "fwd+bwd")
    case.steps["eager-plain"] = _step(lambda: total(plain.row_sums(x, labels, "euclidean", ref,
                                                                   ref_labels)), [x, ref],
                                      "fwd+bwd")
    plain_compiled = _compiled(lambda a, y, r, z: plain.row_sums(a, y, "euclidean", r, z))
    case.steps["compile-plain"] = _step(lambda: total(plain_compiled(x, labels, ref, ref_labels)),
                                        [x, ref], "fwd+bwd")
    return case


def class_stats_case(device, n, d, data, classes) -> Case:
    feats, labels = make_data(n, d, data, classes=classes)
    feats, labels = feats.to(device), labels.to(device)
    case = Case("class_stats.update", "fwd", data, n, d, classes, flops=0.0,
                nbytes=4.0 * n * d + 8.0 * n)
    ours = "cpu" if device.type == "cpu" else "triton"
    case.steps[f"ours-{ours}"] = lambda: ClassStatistics(classes, d, device=device).update(
        feats, labels)
    case.steps["eager"] = lambda: ClassStatistics(classes, d, device=device).update(
        feats, labels, backend="reference")
    return case


PAIR_LOSSES = {  # function, PML class name, the metric of PML's default distance
    "contrastive_loss": (ck.contrastive_loss, "ContrastiveLoss", "euclidean"),
    "supcon_loss": (ck.supcon_loss, "SupConLoss", "cosine"),
    "ntxent_loss": (ck.ntxent_loss, "NTXentLoss", "cosine"),
    "multi_similarity_loss": (ck.multi_similarity_loss, "MultiSimilarityLoss", "cosine"),
}


def pair_losses_case(device, n, d, data, name) -> Case:
    """A pair loss with its defaults against pytorch-metric-learning's class (the peer users
    swap out) and the dense reference, eager and compiled. Floor: the products of the
    symmetric pass (the batch is its own reference set): half an N x N Gram product forward,
    half one and the two coefficient products backward (4 N^2 D flops)."""
    fn, pml_name, metric = PAIR_LOSSES[name]
    x, labels = _rows(n, d, data, max(n // 4, 2), device)  # about four samples a class
    case = Case(f"{name}[{metric}]", "fwd+bwd", data, n, d, max(n // 4, 2),
                flops=4.0 * n * n * d, nbytes=3.0 * n * d * 4)
    for b in our_backends(device, "pair_loss_stats") + ["auto"]:
        case.steps[f"ours-{b}"] = _step(lambda b=b: fn(x, labels, backend=b), [x], "fwd+bwd")
    case.steps["eager"] = _step(lambda: fn(x, labels, backend="reference"), [x], "fwd+bwd")
    compiled = _compiled(lambda a, y: fn(a, y, backend="reference"))
    case.steps["compile"] = _step(lambda: compiled(x, labels), [x], "fwd+bwd")
    if plain.pml_available():
        from pytorch_metric_learning import losses

        peer = getattr(losses, pml_name)()
        case.steps["pml"] = _step(lambda: peer(x, labels), [x], "fwd+bwd")
    return case


RETRIEVAL_KS = (1, 10)


def retrieval_case(device, n, d, data, classes) -> Case:
    """Self-retrieval scores (P@1, R-precision, MAP@R, recall@1/10) of N rows, cosine, against
    faiss-cpu's exact IndexFlatIP search and the plain chunked Gram + torch.topk (eager and
    compiled) for the same depth K (the largest class's R, as the scores need), each followed
    by the same O(N K) scoring; pytorch-metric-learning's AccuracyCalculator (faiss inside)
    and the dense reference up to N = 16384. Floor: the N x N Gram product, 2 N^2 D flops."""
    x, labels = make_data(n, d, data, classes=classes)
    x, labels = x.to(device), labels.to(device)
    relevant = reference.retrieval.relevant_counts(labels, labels, True)
    depth = max(int(relevant.max()), *RETRIEVAL_KS)
    case = Case("retrieval[cosine]", "fwd", data, n, d, classes, flops=2.0 * n * n * d,
                nbytes=2.0 * n * d * 4)

    def score(idx: torch.Tensor) -> None:
        reference.retrieval.scores_from_neighbors(idx, labels, labels, relevant, RETRIEVAL_KS)

    for b in our_backends(device, "nearest_neighbors") + ["auto"]:
        case.steps[f"ours-{b}"] = lambda b=b: ck.retrieval_metrics(
            x, labels, metric="cosine", k=RETRIEVAL_KS, backend=b)
    if n <= 16384:
        case.steps["eager"] = lambda: reference.retrieval.retrieval_metrics(
            x, labels, metric="cosine", k=RETRIEVAL_KS)
    case.steps["eager-plain"] = lambda: score(plain.retrieval_topk(x, depth))
    compiled = _compiled(plain._chunk_topk)
    case.steps["compile-plain"] = lambda: score(plain.retrieval_topk(x, depth, topk=compiled))
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None and device.type == "cpu":
        def faiss_step() -> None:
            u = torch.nn.functional.normalize(x, dim=1).numpy()
            index = faiss.IndexFlatIP(d)
            index.add(u)
            _, found = index.search(u, depth + 1)
            found = torch.from_numpy(found)
            rows = torch.arange(n)[:, None]
            # drop each row's own entry (first, or displaced by an exact duplicate)
            own = (found == rows).int().argmax(1, keepdim=True)
            keep = torch.ones_like(found, dtype=torch.bool).scatter_(1, own, False)
            score(found[keep].view(n, depth))

        case.steps["faiss-flatip"] = faiss_step
    if plain.pml_available() and n <= 16384:  # 51 s at N = 16384 here: minutes beyond
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=("precision_at_1", "r_precision",
                                           "mean_average_precision_at_r"), device=device)
        case.steps["pml"] = lambda: calc.get_accuracy(
            torch.nn.functional.normalize(x, dim=1), labels)
    return case


def suite_cases(suite: str, device: torch.device, keops: bool) -> list[Callable[[], Case]]:
    """Lazily built cases (inputs are made when a case runs, and freed after it)."""
    if suite == "retrieval":
        return [lambda data=data, n=n: retrieval_case(device, n, 128, data, 1000)
                for data in ("random", "clustered") for n in (16384, 65536)]
    big = suite == "gpu"
    n_pairs = 65536 if big else 4096
    cases: list[Callable[[], Case]] = []
    for data in ("random", "clustered"):
        for metric, d in (("euclidean", 128 if big else 64), ("cosine", 128)):
            for mode in ("fwd", "fwd+bwd"):
                cases.append(lambda data=data, metric=metric, d=d, mode=mode: intra_inter_sums_case(
                    device, n_pairs, d, data, metric, mode, keops))
            cases.append(lambda data=data, metric=metric, d=d: as_loss_case(
                device, n_pairs, d, data, metric))
        cases.append(lambda data=data: affinity_case(
            device, 65536 if big else 4096, 512 if big else 128, data,
            100000 if big else 1000, 1))
        cases.append(lambda data=data: affinity_case(
            device, 65536 if big else 4096, 512 if big else 128, data, 1000, 5))
        cases.append(lambda data=data: n_centroids_case(
            device, 262144 if big else 16384, 128, data, 1000))
        cases.append(lambda data=data: rect_case(
            device, 4096 if big else 1024, 65536 if big else 8192, 64, data))
        cases.append(lambda data=data: class_stats_case(
            device, 1048576 if big else 65536, 512, data, 1000))
        for name in PAIR_LOSSES:
            cases.append(lambda data=data, name=name: pair_losses_case(
                device, 65536 if big else 4096, 128, data, name))
        if not big:  # small batches and the demo's affinity shape, with what auto runs
            for n in (256, 1024):
                cases.append(lambda data=data, n=n: as_loss_case(
                    device, n, 64, data, "euclidean", auto=True))
            cases.append(lambda data=data: affinity_case(device, 4096, 64, data, 10, 5,
                                                         auto=True))
    return cases

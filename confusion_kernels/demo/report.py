"""The demo's Markdown report and figures."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from .. import analysis
from .data import MINORITY, NUM_CLASSES, DigitsSplit
from .evaluation import OodResult
from .training import Trained

SCORES = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"),
          ("minority_recall", "recall of digits 0-4"))
# retrieval among the test images in the representation (evaluation.retrieval_scores)
RETRIEVAL_SCORES = (("map_at_r", "MAP@R"), ("recall_at_1", "R@1"), ("recall_at_10", "R@10"))


def _columns(results: dict[str, list[dict[str, float]]]) -> tuple[tuple[str, str], ...]:
    """The scores every run has: the classification ones, and retrieval where measured."""
    runs = [r for rs in results.values() for r in rs]
    return tuple(c for c in SCORES + RETRIEVAL_SCORES if all(c[0] in r for r in runs))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def results_table(results: dict[str, list[dict[str, float]]]) -> list[str]:
    """Markdown rows: method, then mean ± std of every score over the seeds."""
    columns = _columns(results)
    lines = ["| method | " + " | ".join(title for _, title in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, runs in results.items():
        cells = []
        for key, _ in columns:
            m, s = mean_std([r[key] for r in runs])
            cells.append(f"{m:.3f} ± {s:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def verdicts(results: dict[str, list[dict[str, float]]], baseline: str = "CE") -> list[str]:
    """One sentence per method: does it beat the baseline on macro-F1, on the minority
    recall (and on MAP@R, where measured) by more than the spread over seeds?"""
    lines = []
    judged = [c for c in _columns(results) if c[0] in ("macro_f1", "minority_recall", "map_at_r")]
    base = {key: mean_std([r[key] for r in results[baseline]]) for key, _ in judged}
    for name, runs in results.items():
        if name == baseline:
            continue
        parts = []
        for key, title in judged:
            m, s = mean_std([r[key] for r in runs])
            diff = m - base[key][0]
            noise = max(s, base[key][1])
            if len(runs) < 2:
                parts.append(f"{title} {diff:+.3f} (one seed: no spread to judge a difference by)")
            elif abs(diff) <= noise:
                parts.append(f"{title} {diff:+.3f} (within the spread over seeds: no difference)")
            else:
                parts.append(f"{title} {diff:+.3f} ({'better' if diff > 0 else 'worse'} than {baseline})")
        lines.append(f"- **{name}**: " + "; ".join(parts) + ".")
    return lines


def figure_representation(trained: Trained, split: DigitsSplit, path: Path) -> None:
    _, z_train, _ = trained.outputs(split.x_train)
    _, z_test, _ = trained.outputs(split.x_test)
    protos = trained.prototypes()
    if protos is not None and protos.shape[-1] == 2 and protos.dim() == 2:
        # NCL centroids live on the unit circle; draw them at the embeddings' scale
        protos = protos * z_train.norm(dim=1).median()
    analysis.plot_representation((z_train.cpu(), split.y_train.cpu()),
                                 (z_test.cpu(), split.y_test.cpu()),
                                 prototypes=None if protos is None else protos.cpu(),
                                 title=trained.method.name, path=path)


def figure_confusion(trained: Trained, split: DigitsSplit, path: Path) -> np.ndarray:
    confusion = analysis.confusion_matrix(split.y_test.cpu(), trained.predict(split.x_test).cpu(),
                                          NUM_CLASSES)
    analysis.plot_confusion_matrix(confusion, title=f"{trained.method.name} (test)", path=path)
    return confusion


def similar_labels_section(ce: Trained, split: DigitsSplit, out: Path) -> list[str]:
    """Class similarity from the CE network's internal features (Welch t vectors), as a
    heatmap, with each digit's top 3."""
    h, _, _ = ce.outputs(split.x_train)
    stats = analysis.ClassStatistics(NUM_CLASSES, h.shape[1], device=h.device).update(h, split.y_train)
    sim = analysis.similarity_matrix(stats)
    analysis.plot_similarity_heatmap(sim.cpu(), title="similar labels (CE network, Welch t)",
                                     path=out / "similar_labels.png")
    idx, score = analysis.similar_labels(stats, k=3)
    lines = ["![similar labels](similar_labels.png)", "",
             "| digit | most similar digits (cosine of the t vectors) |", "|---|---|"]
    for c in range(NUM_CLASSES):
        pairs = ", ".join(f"{int(j)} ({float(s):.2f})" for j, s in zip(idx[c], score[c]))
        lines.append(f"| {c} | {pairs} |")
    return lines


def write_report(out: Path, *, header: list[str], split: DigitsSplit,
                 results: dict[str, list[dict[str, float]]], figures: dict[str, tuple[str, str]],
                 similar: list[str], ood: OodResult, speed: list[dict], seeds: int, epochs: int,
                 dim: int) -> Path:
    counts = torch.bincount(split.y_train.cpu(), minlength=NUM_CLASSES).tolist()
    lines = ["# confusion-kernels demo report", "", *header, "",
             "## Data", "",
             f"scikit-learn's digits, made imbalanced: the training split keeps 10 % of the samples "
             f"of digits {MINORITY[0]}-{MINORITY[-1]} and all of 5-9; the test split is untouched "
             f"(seed 0: {split.x_train.shape[0]} training images, per digit {counts}; "
             f"{split.x_test.shape[0]} test images).", "",
             f"## Results ({dim}-D representation, test split, mean ± std over {seeds} seed(s), "
             f"{epochs} epochs)", "",
             *results_table(results), "",
             "MAP@R and R@k: retrieval among the test images in the learned representation "
             "(each image's nearest other test images, euclidean, `ck.retrieval_metrics`): "
             "the mean average precision over its R same-digit images, and the fraction of "
             "images with a same-digit image among their k nearest.", "",
             "Against CE:", "", *verdicts(results), "",
             "## Representations (2-D runs) and confusion matrices", "",
             "Left: a run with a 2-D representation (train | test). Right: the confusion matrix "
             f"of the {dim}-D run of seed 0 on the test split.", ""]
    for name, (rep, conf) in figures.items():
        lines += [f"### {name}", "", f"![{name} 2-D representation]({rep})",
                  f"![{name} confusion matrix]({conf})", ""]
    lines += ["## Similar labels", "", *similar, "",
              "## Out of distribution: the NCL confidence", "",
              f"CE + NCL and CE trained on the training digits 0-7 (seed 0); the {ood.counts[0]} "
              f"test images of 0-7 are in distribution, the {ood.counts[1]} test 8s and 9s out of "
              "it (AUROC, in distribution = positive).", "",
              "| score | AUROC | accuracy on 0-7 |", "|---|---:|---:|",
              f"| NCL: -distance to the nearest centroid | {ood.ncl_auroc:.3f} | "
              f"{ood.known_accuracy[0]:.3f} |",
              f"| CE: max softmax | {ood.softmax_auroc:.3f} | {ood.known_accuracy[1]:.3f} |", "",
              "## Kernel speed on this machine", "",
              "Forward + backward of each loss, median of a few runs: the fused kernels against "
              "the eager PyTorch definition (`confusion_kernels.reference`).", "",
              "| loss | shape | backend | fused | eager | speed-up |", "|---|---|---|---:|---:|---:|"]
    for r in speed:
        lines.append(f"| {r['loss']} | {r['shape']} | {r['backend']} | {r['fused_ms']:.1f} ms | "
                     f"{r['eager_ms']:.1f} ms | {r['speedup']:.1f}× |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

"""Scores of a trained method: accuracy, macro-F1, mean recall of the minority digits, retrieval
(MAP@R, recall@1 and @10) in its representation; and the out-of-distribution AUROC of the NCL
confidence against CE's max softmax."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import MINORITY, DigitsSplit
from .training import METHODS, Trained, train

OOD_KNOWN = 8  # the OOD run trains on digits 0-7 and scores the test 8s and 9s as unseen


def scores(y_true: torch.Tensor, y_pred: torch.Tensor) -> dict[str, float]:
    from sklearn.metrics import f1_score, recall_score

    t, p = y_true.cpu().numpy(), y_pred.cpu().numpy()
    return {"accuracy": float((t == p).mean()),
            "macro_f1": float(f1_score(t, p, average="macro")),
            "minority_recall": float(np.mean(recall_score(t, p, labels=list(MINORITY),
                                                          average=None)))}


def retrieval_scores(trained: Trained, x: torch.Tensor, y: torch.Tensor,
                     backend: str = "auto") -> dict[str, float]:
    """MAP@R, recall@1 and recall@10 of the images x among themselves, in the representation
    z the method learned (euclidean; ck.retrieval_metrics)."""
    import confusion_kernels as ck

    _, z, _ = trained.outputs(x)
    found = ck.retrieval_metrics(z, y, k=(1, 10), backend=_retrieval_backend(backend))
    return {"map_at_r": found["mean_average_precision_at_r"],
            "recall_at_1": found["recall_at_1"], "recall_at_10": found["recall_at_10"]}


def _retrieval_backend(backend: str) -> str:
    # the losses' backend where retrieval has a kernel for it, else the package's choice
    return backend if backend in ("auto", "reference", "cpu") else "auto"


@dataclass
class OodResult:
    ncl_auroc: float       # -distance to the nearest NCL centroid
    softmax_auroc: float   # CE's max softmax (the usual baseline)
    known_accuracy: tuple[float, float]  # (NCL, CE) on the test digits 0-7
    counts: tuple[int, int]  # test rows in / out of distribution


def ood_auroc(split: DigitsSplit, *, dim: int, seed: int, epochs: int, backend: str) -> OodResult:
    """Trains CE + NCL and CE on the training digits 0-7 of ``split``; the test digits 0-7 are
    in distribution (positive), the test 8s and 9s out of it."""
    from sklearn.metrics import roc_auc_score

    known = split.restricted_to(OOD_KNOWN)
    by_key = {m.key: m for m in METHODS}
    ncl = train(by_key["ce_ncl"], known, dim=dim, seed=seed, epochs=epochs, backend=backend,
                classes=OOD_KNOWN)
    ce = train(by_key["ce"], known, dim=dim, seed=seed, epochs=epochs, backend=backend,
               classes=OOD_KNOWN)
    inside = split.y_test < OOD_KNOWN
    truth = inside.cpu().numpy().astype(int)
    _, z, _ = ncl.outputs(split.x_test)
    confidence = ncl.criterion.confidence(z)
    _, _, logits = ce.outputs(split.x_test)
    softmax = logits.softmax(1)
    y_known = split.y_test[inside]
    return OodResult(
        ncl_auroc=float(roc_auc_score(truth, (-confidence.distance).cpu().numpy())),
        softmax_auroc=float(roc_auc_score(truth, softmax.max(1).values.cpu().numpy())),
        known_accuracy=(float((confidence.prediction[inside] == y_known).float().mean()),
                        float((softmax[inside].argmax(1) == y_known).float().mean())),
        counts=(int(inside.sum()), int((~inside).sum())))

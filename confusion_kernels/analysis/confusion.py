"""Confusion analysis: which classes a model confuses (scikit-learn for the
standard metrics), and how that compares with the similar labels found from
internal representations."""

from __future__ import annotations

import numpy as np
import torch


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """[C, C] counts, row = true class, column = predicted (sklearn)."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    return sk_confusion(_numpy(y_true), _numpy(y_pred), labels=np.arange(num_classes))


def per_class_report(y_true, y_pred, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support (sklearn; 0 where undefined)."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(_numpy(y_true), _numpy(y_pred),
                                                 labels=np.arange(num_classes), zero_division=0)
    return {"precision": p, "recall": r, "f1": f, "support": s}


def most_confused_pairs(confusion, k: int = 10, *, symmetric: bool = False) -> list[tuple[int, int, int]]:
    """The k largest off-diagonal entries as (true, predicted, count), largest
    first (ties by index). symmetric=True ranks unordered pairs {a, b} by
    C[a, b] + C[b, a] and returns (a, b, total) with a < b."""
    c = _numpy(confusion).astype(np.int64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"confusion must be a square matrix, got shape {c.shape}")
    if symmetric:
        c = np.triu(c + c.T, 1)
    else:
        c = c.copy()
        np.fill_diagonal(c, 0)
    flat = np.argsort(-c, axis=None, kind="stable")
    out = []
    for idx in flat[:k]:
        i, j = divmod(int(idx), c.shape[1])
        if c[i, j] <= 0:
            break
        out.append((i, j, int(c[i, j])))
    return out


def similar_vs_confused(similar_indices, confusion, k: int | None = None) -> dict:
    """How many of the top-k similar pairs (from similar_labels, as unordered
    pairs {c, similar[c, 0]} ... ) are among the top-k confused unordered pairs.

    Returns {"k", "similar_pairs", "confused_pairs", "overlap", "fraction"}.
    """
    sim = _numpy(similar_indices)
    conf = _numpy(confusion)
    pairs = []
    for rank in range(sim.shape[1]):  # every class's first choice first
        for c in range(sim.shape[0]):
            p = tuple(sorted((c, int(sim[c, rank]))))
            if p not in pairs:
                pairs.append(p)
    k = k or sim.shape[0]
    similar = pairs[:k]
    confused = [(a, b) for a, b, _ in most_confused_pairs(conf, k, symmetric=True)]
    overlap = len(set(similar) & set(confused))
    return {"k": k, "similar_pairs": similar, "confused_pairs": confused, "overlap": overlap,
            "fraction": overlap / max(1, min(len(similar), len(confused)))}

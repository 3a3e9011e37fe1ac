"""Confusion analysis: which classes a model confuses (scikit-learn for the
standard metrics), and how that compares with the similar labels found from
internal representations."""

from __future__ import annotations

import numpy as np
import torch


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _class_ids(values, num_classes: int, name: str) -> np.ndarray:
    """values as a 1-D integer array, every entry in [0, num_classes) (ValueError)."""
    a = _numpy(values)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in "
                         f"[{a.min()}, {a.max()}]")
    return a


def _true_and_predicted(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(num_classes, (int, np.integer)) and num_classes >= 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    t = _class_ids(y_true, num_classes, "y_true")
    p = _class_ids(y_pred, num_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} and {p.shape[0]}")
    return t, p


def _positive_k(k, name: str = "k") -> int:
    if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1):
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """[C, C] counts, row = true class, column = predicted (sklearn). Labels
    outside [0, C) raise ValueError (sklearn would drop them silently)."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    t, p = _true_and_predicted(y_true, y_pred, num_classes)
    return sk_confusion(t, p, labels=np.arange(num_classes))


def per_class_report(y_true, y_pred, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support (sklearn; 0 where undefined)."""
    from sklearn.metrics import precision_recall_fscore_support

    t, pred = _true_and_predicted(y_true, y_pred, num_classes)
    p, r, f, s = precision_recall_fscore_support(t, pred, labels=np.arange(num_classes),
                                                 zero_division=0)
    return {"precision": p, "recall": r, "f1": f, "support": s}


def _square(confusion) -> np.ndarray:
    """The matrix as int64 (counts) or float64 (a normalised matrix: rates), finite and >= 0."""
    c = _numpy(confusion)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"confusion must be a square matrix, got shape {c.shape}")
    if c.dtype.kind in "fc":
        c = c.astype(np.float64)
        if not np.isfinite(c).all():
            raise ValueError("confusion contains NaN or Inf")
    elif c.dtype.kind in "iub":
        c = c.astype(np.int64)
    else:
        raise TypeError(f"confusion must hold numbers, got dtype {c.dtype}")
    if (c < 0).any():
        raise ValueError("confusion must be non-negative (counts or rates)")
    return c


def most_confused_pairs(confusion, k: int = 10, *,
                        symmetric: bool = False) -> list[tuple[int, int, int | float]]:
    """The k largest off-diagonal entries as (true, predicted, count), largest
    first (ties by index). symmetric=True ranks unordered pairs {a, b} by
    C[a, b] + C[b, a] and returns (a, b, total) with a < b. A float (normalised) matrix
    gives float values, an integer one int counts."""
    k = _positive_k(k)
    c = _square(confusion)
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
        out.append((i, j, c[i, j].item()))
    return out


def similar_vs_confused(similar_indices, confusion, k: int | None = None) -> dict:
    """How many of the top-k similar pairs (from similar_labels, as unordered
    pairs {c, similar[c, 0]} ... ) are among the top-k confused unordered pairs.

    Returns {"k", "similar_pairs", "confused_pairs", "overlap", "fraction"}.
    """
    conf = _square(confusion)
    sim = _numpy(similar_indices)
    num_classes = conf.shape[0]
    if sim.ndim != 2 or sim.shape[0] != num_classes or sim.shape[1] < 1:
        raise ValueError(f"similar_indices must be [C, k] with C = {num_classes} (the confusion "
                         f"matrix's size) and k >= 1, got shape {sim.shape}")
    _class_ids(sim.reshape(-1), num_classes, "similar_indices")
    k = num_classes if k is None else _positive_k(k)
    pairs = []
    for rank in range(sim.shape[1]):  # every class's first choice first
        for c in range(sim.shape[0]):
            p = tuple(sorted((c, int(sim[c, rank]))))
            if p not in pairs:
                pairs.append(p)
    similar = pairs[:k]
    confused = [(a, b) for a, b, _ in most_confused_pairs(conf, k, symmetric=True)]
    overlap = len(set(similar) & set(confused))
    return {"k": k, "similar_pairs": similar, "confused_pairs": confused, "overlap": overlap,
            "fraction": overlap / max(1, min(len(similar), len(confused)))}

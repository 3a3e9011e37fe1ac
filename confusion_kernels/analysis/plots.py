"""matplotlib figures of the analysis: 2-D representations, the confusion matrix and the
similar-labels table. Each returns a ``matplotlib.figure.Figure`` and saves it when given a
path.

The figures are built with matplotlib's object-oriented API, not pyplot: nothing here selects
a backend (the user's stays as it is) and no figure is registered with pyplot, so none is left
open however many are made (their memory goes with the last reference). In Jupyter a returned
figure displays as the cell's result; in a script, pass ``path=`` or call ``fig.savefig``.
"""

from __future__ import annotations

import numpy as np
import torch


def _figure(figsize):
    """A new figure that pyplot does not track (no backend chosen, nothing to close)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _numpy(a):
    return a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, float)


def _save(fig, path):
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def pca_projection(points: np.ndarray):
    """A function mapping [n, D] -> [n, 2] onto the top-2 principal axes of ``points``."""
    center = points.mean(0)
    _, _, vt = np.linalg.svd(points - center, full_matrices=False)
    axes = vt[:2].T
    if axes.shape[1] < 2:
        axes = np.pad(axes, ((0, 0), (0, 2 - axes.shape[1])))
    return lambda x: (np.asarray(x, float) - center) @ axes


def plot_representation(train, test=None, *, prototypes=None, class_names=None, projection="pca",
                        title="representation", path=None):
    """Scatter of (features, labels) for train (and test) in one panel each, one
    colour per class, with prototypes / centroids [C, D] or [C, m, D] drawn as
    stars. For D > 2 the points are projected: projection="pca" (fitted on the
    training features) or a callable [n, D] -> [n, 2]."""
    x_train, y_train = _numpy(train[0]), _numpy(train[1]).astype(int)
    panels = [("train", x_train, y_train)]
    if test is not None:
        panels.append(("test", _numpy(test[0]), _numpy(test[1]).astype(int)))
    protos = None
    if prototypes is not None:
        p = _numpy(prototypes)
        protos = (p.reshape(-1, p.shape[-1]), np.repeat(np.arange(p.shape[0]), p.size // p.shape[0] // p.shape[-1]))
    proj = (lambda x: x) if x_train.shape[1] == 2 else (
        pca_projection(x_train) if projection == "pca" else projection)
    num_classes = int(max(y.max() for _, _, y in panels)) + 1
    cmap = _colormap("tab10" if num_classes <= 10 else "tab20")
    fig = _figure((5.5 * len(panels), 5))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (name, x, y) in zip(axes[0], panels):
        xy = proj(x)
        for c in range(num_classes):
            sel = y == c
            label = class_names[c] if class_names is not None else str(c)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=cmap(c % cmap.N), label=label, alpha=0.7)
        if protos is not None:
            pxy = proj(protos[0])
            ax.scatter(pxy[:, 0], pxy[:, 1], marker="*", s=160, c=[cmap(c % cmap.N) for c in protos[1]],
                       edgecolors="black", linewidths=0.8, label="prototypes")
        ax.set_title(f"{title}: {name}")
        ax.set_aspect("equal", adjustable="datalim")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(confusion, *, class_names=None, normalize=False, title="confusion matrix",
                          path=None):
    """Heatmap of the [C, C] confusion matrix with the counts written in the cells."""
    c = _numpy(confusion)
    shown = c / np.maximum(c.sum(1, keepdims=True), 1) if normalize else c
    n = c.shape[0]
    fig = _figure((max(4, 0.5 * n + 2), max(4, 0.5 * n + 1.5)))
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    names = class_names or [str(i) for i in range(n)]
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        top = shown.max() if shown.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(c[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.5 * top else "black")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_similar_labels(indices, scores, *, class_names=None, title="similar labels", path=None):
    """Table figure: one row per class, its top-k similar classes with scores."""
    idx, sc = _numpy(indices).astype(int), _numpy(scores)
    names = class_names or [str(i) for i in range(idx.shape[0])]
    cells = [[f"{names[j]} ({s:.2f})" for j, s in zip(row_i, row_s)] for row_i, row_s in zip(idx, sc)]
    fig = _figure((2 + 1.6 * idx.shape[1], 0.6 + 0.3 * idx.shape[0]))
    ax = fig.subplots()
    ax.axis("off")
    table = ax.table(cellText=cells, rowLabels=names,
                     colLabels=[f"#{r + 1}" for r in range(idx.shape[1])], loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_similarity_heatmap(similarity, *, class_names=None, title="class similarity", path=None):
    """Heatmap of a [C, C] class-similarity matrix (e.g. ``similarity_matrix``), the values
    written in the cells; the diagonal (1 by definition) is left blank."""
    sim = np.array(_numpy(similarity), dtype=float)
    n = sim.shape[0]
    shown = sim.copy()
    np.fill_diagonal(shown, np.nan)
    fig = _figure((max(4, 0.55 * n + 2), max(4, 0.55 * n + 1.5)))
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    names = class_names or [str(i) for i in range(n)]
    ax.set_xticks(range(n), names)
    ax.set_yticks(range(n), names)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if i != j:
                    ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if abs(sim[i, j]) > 0.6 else "black")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)

"""Similar labels from internal representations and confusion analysis."""

from .confusion import confusion_matrix, most_confused_pairs, per_class_report, similar_vs_confused
from .gap import GAPRecorder, collect_statistics
from .plots import (pca_projection, plot_confusion_matrix, plot_representation,
                    plot_similar_labels, plot_similarity_heatmap)
from .statistics import ClassStatistics, similar_labels, similarity_matrix, welch_t_test

__all__ = [
    "ClassStatistics",
    "GAPRecorder",
    "collect_statistics",
    "confusion_matrix",
    "most_confused_pairs",
    "pca_projection",
    "per_class_report",
    "plot_confusion_matrix",
    "plot_representation",
    "plot_similar_labels",
    "plot_similarity_heatmap",
    "similar_labels",
    "similar_vs_confused",
    "similarity_matrix",
    "welch_t_test",
]

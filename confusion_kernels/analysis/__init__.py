"""Similar labels from internal representations and confusion analysis (SPEC section 5)."""

from .confusion import confusion_matrix, most_confused_pairs, per_class_report, similar_vs_confused
from .gap import GAPRecorder, collect_statistics
from .plots import pca_projection, plot_confusion_matrix, plot_representation, plot_similar_labels
from .statistics import ClassStatistics, similar_labels, welch_t_test

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
    "similar_labels",
    "similar_vs_confused",
    "welch_t_test",
]

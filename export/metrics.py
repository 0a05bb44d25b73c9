"""Classification metrics from probabilities: no TensorFlow, no scikit-learn needed."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from numpy.typing import NDArray


def expected_calibration_error(
    labels: NDArray[np.integer], probs: NDArray[np.floating], n_bins: int = 15
) -> tuple[float, list[dict[str, float]]]:
    """Top-label ECE with equal-width confidence bins, and the bins for a reliability plot."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    bins: list[dict[str, float]] = []
    for lo, hi in itertools.pairwise(edges):
        mask = (conf > lo) & (conf <= hi)
        if not mask.any():
            continue
        acc, mean_conf, frac = correct[mask].mean(), conf[mask].mean(), mask.mean()
        ece += frac * abs(acc - mean_conf)
        bins.append({"lo": float(lo), "hi": float(hi), "accuracy": float(acc),
                     "confidence": float(mean_conf), "count": int(mask.sum())})
    return float(ece), bins


def classification_report(
    labels: NDArray[np.integer], probs: NDArray[np.floating], classes: list[str]
) -> dict[str, Any]:
    labels = np.asarray(labels)
    pred = probs.argmax(axis=1)
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    per_class: dict[str, dict[str, float]] = {}
    recalls = []
    for i, name in enumerate(classes):
        tp = cm[i, i]
        precision = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        recall = tp / cm[i, :].sum() if cm[i, :].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall),
                           "f1": float(f1), "support": int(cm[i, :].sum())}
        if cm[i, :].sum():
            recalls.append(recall)
    ece, bins = expected_calibration_error(labels, probs)
    return {
        "n": len(labels),
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "ece": ece,
        "reliability_bins": bins,
    }

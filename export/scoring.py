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
        bins.append(
            {
                "lo": float(lo),
                "hi": float(hi),
                "accuracy": float(acc),
                "confidence": float(mean_conf),
                "count": int(mask.sum()),
            }
        )
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
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(cm[i, :].sum()),
        }
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


def group_bootstrap(
    labels: NDArray[np.integer],
    probs: NDArray[np.floating],
    groups: list[str],
    classes: list[str],
    n_resamples: int = 2000,
    seed: int = 0,
    n_bins: int = 15,
) -> dict[str, Any]:
    """95% percentile intervals for accuracy, per-class recall and ECE, resampling GROUPS.

    Images of one augmentation group are near-copies, so they are not independent: the
    resampling unit is the group. Groups are resampled with replacement within their class
    (each group holds one class), so every resample keeps the class mix of the groups.
    Per-group sufficient statistics make each resample a weighted sum.
    """
    labels = np.asarray(labels)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    correct = (pred == labels).astype(np.float64)
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    gid = np.array([index[g] for g in groups])
    n_groups = len(names)
    g_label = np.zeros(n_groups, dtype=np.int64)
    g_label[gid] = labels
    g_n = np.bincount(gid, minlength=n_groups).astype(np.float64)
    g_correct = np.bincount(gid, weights=correct, minlength=n_groups)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    g_bin_n = np.zeros((n_groups, n_bins))
    g_bin_correct = np.zeros((n_groups, n_bins))
    g_bin_conf = np.zeros((n_groups, n_bins))
    np.add.at(g_bin_n, (gid, bins), 1.0)
    np.add.at(g_bin_correct, (gid, bins), correct)
    np.add.at(g_bin_conf, (gid, bins), conf)

    rng = np.random.default_rng(seed)
    weights = np.zeros((n_resamples, n_groups))
    for c in range(len(classes)):
        members = np.flatnonzero(g_label == c)
        if len(members) == 0:
            continue
        draws = rng.choice(members, size=(n_resamples, len(members)), replace=True)
        for r in range(n_resamples):
            np.add.at(weights[r], draws[r], 1.0)
    total = weights @ g_n
    acc = (weights @ g_correct) / total
    recall = {}
    for c, name in enumerate(classes):
        mask = g_label == c
        if mask.any():
            recall[name] = (weights[:, mask] @ g_correct[mask]) / (weights[:, mask] @ g_n[mask])
    bn = weights @ g_bin_n
    ece = (np.abs(weights @ g_bin_correct - weights @ g_bin_conf)).sum(axis=1) / bn.sum(axis=1)

    def interval(samples: NDArray[np.floating]) -> list[float]:
        lo, hi = np.percentile(samples, [2.5, 97.5])
        return [float(lo), float(hi)]

    return {
        "method": f"group bootstrap, {n_resamples} resamples of groups within each class, percentile 95%",
        "groups": n_groups,
        "accuracy": interval(acc),
        "recall": {name: interval(v) for name, v in recall.items()},
        "ece": interval(ece),
    }


def report_with_intervals(
    labels: NDArray[np.integer],
    probs: NDArray[np.floating],
    groups: list[str],
    classes: list[str],
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """`classification_report` plus group-bootstrap intervals (the figures the model card quotes)."""
    report = classification_report(labels, probs, classes)
    report["groups"] = len(set(groups))
    report["ci95"] = group_bootstrap(labels, probs, groups, classes, n_resamples, seed)
    return report

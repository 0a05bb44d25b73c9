"""The ood_score of a cross-validation release: which one, each member's statistics, and the
out-of-fold scores its `ood_above` is fitted on.

Two scores, both fitted on a fold's TRAIN features only:

- `mahalanobis` (the default): distance of the GAP features to the nearest class mean under the
  tied covariance (Lee et al., 2018), as model v2 had;
- `knn`: distance to the k-th nearest neighbour among L2-normalised penultimate features
  (Sun et al., ICML 2022; export.knn_ood).

Why the default (docs/model/cv.md): at the same rate of real out-of-fold tiles referred (0.5%),
Mahalanobis caught more of every category of tests/ood_images.py than kNN did, on folds 0-2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from export.knn_ood import DEFAULT_K, KnnBank, fit_knn, knn_distance
from export.serving_graph import MahalanobisStats, fit_mahalanobis

Score = Literal["mahalanobis", "knn"]
SCORES: Final[tuple[Score, ...]] = ("mahalanobis", "knn")
DEFAULT_SCORE: Final[Score] = "mahalanobis"
TRAIN_FEATURES: Final = "train_features.npz"  # export.cv's name (not imported: that pulls TensorFlow)
OOF: Final = "oof.npz"


def fit_member(fold_dir: Path, score: Score, k: int = DEFAULT_K) -> MahalanobisStats | KnnBank:
    """A fold model's OOD statistics, from the features of its own train images."""
    with np.load(fold_dir / TRAIN_FEATURES) as f:
        if score == "knn":
            return fit_knn(f["penultimate"], k)
        n_classes = int(f["labels"].max()) + 1
        return fit_mahalanobis(f["gap"], f["labels"], n_classes)


def distance(fitted: MahalanobisStats | KnnBank, features: dict[str, NDArray[Any]]) -> NDArray[np.float64]:
    """What the member's graph answers as ood_score, in NumPy (the graph's reference)."""
    if isinstance(fitted, KnnBank):
        return knn_distance(features["penultimate"], fitted)
    return mahalanobis_distance(fitted, features["gap"])


def mahalanobis_distance(stats: MahalanobisStats, gap: NDArray[np.floating]) -> NDArray[np.float64]:
    """min over classes of ||(g - mean_c) L||, L the Cholesky factor of the tied precision."""
    z = np.asarray(gap, np.float64) @ stats.precision_chol
    centres = stats.means @ stats.precision_chol
    d2 = ((z[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    out: NDArray[np.float64] = np.sqrt(d2.min(axis=1))
    return out


def oof_scores(oof_files: NDArray[Any], fold_dirs: list[Path], score: Score, k: int = DEFAULT_K) -> NDArray[np.float64]:
    """Out-of-fold scores in the order of `oof_files`: each fold's images against its own train statistics.

    This is what a fold model's graph would answer for images it never saw, so ood_above can be
    fitted on it (the rate of real, unseen tiles referred as out of distribution).
    """
    index = {str(f): i for i, f in enumerate(oof_files)}
    scores = np.full(len(oof_files), np.nan)
    for fold_dir in fold_dirs:
        fitted = fit_member(fold_dir, score, k)
        with np.load(fold_dir / OOF) as of:
            d = distance(fitted, {"gap": of["gap"], "penultimate": of["penultimate"]})
            for name, value in zip(of["files"], d, strict=True):
                scores[index[str(name)]] = value
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} images have no out-of-fold score")
    return scores


def describe(score: Score, k: int = DEFAULT_K) -> dict[str, Any]:
    """model.json's `ood` for a release (beside each member's statistics and the out-of-fold median)."""
    if score == "knn":
        return {
            "score": "knn",
            "method": "k-th nearest-neighbour distance, normalised penultimate features; each fold's own train bank",
            "k": k,
        }
    return {
        "score": "mahalanobis",
        "method": "Mahalanobis distance of the GAP features to the nearest class mean, tied covariance; "
        "each fold's own train statistics",
    }

"""The release's OOD scores in NumPy: the Mahalanobis distance, and out-of-fold scores per fold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.cv_ood import OOF, SCORES, TRAIN_FEATURES, Score, distance, fit_member, mahalanobis_distance, oof_scores
from export.serving_graph import fit_mahalanobis


def _features(rng: np.random.Generator, n: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    labels = rng.integers(0, 3, n)
    gap = rng.normal(0, 1, (n, 6)) + labels[:, None] + shift
    return {"labels": labels, "gap": gap, "penultimate": np.abs(rng.normal(0, 1, (n, 4))) + shift}


def test_mahalanobis_distance_is_the_nearest_class_under_the_tied_precision() -> None:
    rng = np.random.default_rng(0)
    train = _features(rng, 300)
    stats = fit_mahalanobis(train["gap"], train["labels"], 3)
    query = rng.normal(0, 2, (5, 6))
    precision = stats.precision_chol @ stats.precision_chol.T
    brute = [min(float(np.sqrt((q - m) @ precision @ (q - m))) for m in stats.means) for q in query]
    np.testing.assert_allclose(mahalanobis_distance(stats, query), brute, rtol=1e-9)


@pytest.mark.parametrize("score", SCORES)
def test_each_fold_is_scored_against_its_own_train_statistics(tmp_path: Path, score: Score) -> None:
    rng = np.random.default_rng(1)
    folds, files = [], []
    for f, shift in enumerate((0.0, 5.0)):  # fold 1's train images live elsewhere
        d = tmp_path / f"fold-{f}"
        d.mkdir()
        train = _features(rng, 200, shift)
        np.savez(d / TRAIN_FEATURES, labels=train["labels"], gap=train["gap"], penultimate=train["penultimate"])
        oof = _features(rng, 10)
        names = np.array([f"f{f}_{i}.png" for i in range(10)])
        np.savez(d / OOF, files=names, gap=oof["gap"], penultimate=oof["penultimate"])
        folds.append(d)
        files.extend(names.tolist())
    order = np.array(files[::-1])  # any order: scores follow the files given
    got = oof_scores(order, folds, score, k=3)
    for d in folds:
        with np.load(d / OOF) as oof:
            want = distance(fit_member(d, score, k=3), {"gap": oof["gap"], "penultimate": oof["penultimate"]})
            idx = [int(np.flatnonzero(order == name)[0]) for name in oof["files"]]
        np.testing.assert_allclose(got[idx], want)
    # The same unseen images are far from fold 1's train data and near fold 0's.
    assert (
        got[[int(np.flatnonzero(order == f"f1_{i}.png")[0]) for i in range(10)]].mean()
        > got[[int(np.flatnonzero(order == f"f0_{i}.png")[0]) for i in range(10)]].mean()
    )

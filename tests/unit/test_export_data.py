"""Group split, metrics and calibration: pure NumPy, no TensorFlow."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.calibrate import fit_temperature, nll
from export.data import DataError, scan, split_by_group
from export.scoring import classification_report, expected_calibration_error


def make_dataset(
    root: Path,
    classes: tuple[str, ...] = ("a", "b", "c"),
    groups: int = 10,
    per_group: int = 3,
    grouped: bool = True,
    size: int = 40,
) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for g in range(groups):
            for k in range(per_group):
                # class-dependent colour so a couple of training steps can learn something
                base = np.zeros((size, size, 3), np.uint8) + np.uint8(60 * ci + 20)
                noise = rng.integers(0, 30, (size, size, 3), dtype=np.uint8)
                name = f"{cls}/{cls}{g}_{k}.jpeg"
                Image.fromarray(base + noise).save(root / name, quality=90)
                rows.append({"class": cls, "group": str(g), "file": name})
    if grouped:
        with (root / "groups.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, ["class", "group", "file"])
            w.writeheader()
            w.writerows(rows)
    return root


def test_split_keeps_every_group_on_one_side_and_stratifies(tmp_path: Path) -> None:
    ds = scan(make_dataset(tmp_path))
    assert ds.classes == ["a", "b", "c"]
    train, val = split_by_group(ds, 0.2, seed=1)
    assert not {s.group for s in train} & {s.group for s in val}
    assert len(train) + len(val) == len(ds.samples)
    # 2 of 10 groups per class, 3 images each
    assert sorted(np.bincount([s.label for s in val]).tolist()) == [6, 6, 6]


def test_group_ids_repeat_across_classes_without_merging(tmp_path: Path) -> None:
    ds = scan(make_dataset(tmp_path))
    assert len({s.group for s in ds.samples}) == 30  # "a/0" and "b/0" are different groups


def test_split_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    ds = scan(make_dataset(tmp_path))
    assert split_by_group(ds, 0.2, seed=7)[1] == split_by_group(ds, 0.2, seed=7)[1]


def test_refuses_image_level_split_without_groups(tmp_path: Path) -> None:
    ds = scan(make_dataset(tmp_path, grouped=False))
    with pytest.raises(DataError, match=r"groups\.csv"):
        split_by_group(ds, 0.2, seed=1)
    train, val = split_by_group(ds, 0.2, seed=1, allow_image_split=True)
    assert val
    assert train


def test_metrics_on_a_known_confusion() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.9 + 0.1 / 3
    r = classification_report(labels, probs, ["x", "y", "z"])
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["per_class"]["y"]["precision"] == pytest.approx(2 / 3)
    assert r["per_class"]["x"]["recall"] == pytest.approx(0.5)
    assert r["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # 10 predictions at confidence 0.8, 8 of them right
    probs = np.tile([0.8, 0.1, 0.1], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    ece, _ = expected_calibration_error(labels, probs)
    assert ece == pytest.approx(0.0, abs=1e-12)


def test_temperature_scaling_recovers_the_generating_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (20000, 3))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in p])
    overconfident = true_logits * 2.5
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(2.5, rel=0.05)
    assert nll(overconfident, labels, t) < nll(overconfident, labels, 1.0)


def test_three_way_split_keeps_the_holdout_apart_and_halves_it_by_class(tmp_path: Path) -> None:
    from export.data import split_three_way

    ds = scan(make_dataset(tmp_path))
    holdout = [f"{c}/{g}" for c in ("a", "b", "c") for g in (0, 1, 2, 3)]
    sp = split_three_way(ds, holdout, seed=5)
    train, select, test = ({s.group for s in part} for part in (sp.train, sp.select, sp.test))
    assert train == {s.group for s in ds.samples} - set(holdout)  # train = everything not held out
    assert not select & test
    assert select | test == set(holdout)
    # stratified: 2 of each class's 4 holdout groups on each side
    assert sorted(np.bincount([s.label for s in sp.select]).tolist()) == [6, 6, 6]
    assert split_three_way(ds, holdout, seed=5) == sp
    with pytest.raises(DataError, match="not in"):
        split_three_way(ds, ["a/99"], seed=5)


def test_group_bootstrap_interval_covers_the_estimate_and_widens_with_group_effects() -> None:
    from export.scoring import group_bootstrap

    classes = ["x", "y"]
    groups = [f"{c}/{g}" for c in classes for g in range(30) for _ in range(10)]
    labels = np.array([classes.index(g.split("/")[0]) for g in groups])
    # errors concentrated in whole groups (as in LC25000): groups 0-2 of class x all wrong
    wrong = np.array([g in {"x/0", "x/1", "x/2"} for g in groups])
    pred = np.where(wrong, 1 - labels, labels)
    probs = np.eye(2)[pred] * 0.9 + 0.05
    r = group_bootstrap(labels, probs, groups, classes, n_resamples=500, seed=1)
    acc = 1 - wrong.mean()
    assert r["accuracy"][0] < acc < r["accuracy"][1]
    assert r["recall"]["y"] == [1.0, 1.0]
    lo, hi = r["recall"]["x"]
    assert lo < 0.9 < hi
    assert hi - lo > 0.1  # 3 wrong groups of 30: far wider than an image-level interval would be


def test_group_bootstrap_ece_matches_the_point_estimate_when_nothing_varies() -> None:
    from export.scoring import group_bootstrap

    groups = [f"x/{g}" for g in range(5) for _ in range(4)]
    labels = np.zeros(20, dtype=np.int64)
    probs = np.tile([0.8, 0.2], (20, 1))
    probs[::4] = [0.2, 0.8]  # one error per group: every resample has accuracy 0.75
    r = group_bootstrap(labels, probs, groups, ["x", "y"], n_resamples=50)
    ece, _ = expected_calibration_error(labels, probs)
    assert r["ece"] == pytest.approx([ece, ece])
    assert r["accuracy"] == pytest.approx([0.75, 0.75])

"""The out-of-fold estimate and the decision fitted on it: pure NumPy on synthetic predictions."""

from __future__ import annotations

from typing import Any

import numpy as np

from export.cv_estimate import (
    OutOfFold,
    cross_fitted_decision,
    cross_fitted_probabilities,
    estimate_block,
    fit_serving,
    softmax,
)
from export.scoring import expected_calibration_error

CLASSES = ["a", "b", "c"]


def synthetic_oof(seed: int = 0, groups_per_class: int = 30, per_group: int = 8, folds: int = 5) -> OutOfFold:
    """Logits sharper than the truth (true T = 2), some whole groups systematically wrong."""
    rng = np.random.default_rng(seed)
    labels, groups, fold, logits = [], [], [], []
    for c in range(3):
        for g in range(groups_per_class):
            shift = rng.normal(0, 1.5, 3)  # a group effect: its images are wrong together
            for _ in range(per_group):
                z = rng.normal(0, 1, 3) + shift
                z[c] += 3.0
                logits.append(2.0 * z)
                labels.append(c)
                groups.append(f"{CLASSES[c]}/{g}")
                fold.append((c * groups_per_class + g) % folds)
    return OutOfFold(
        CLASSES,
        np.array(labels),
        np.array(logits, np.float64),
        groups,
        np.array(fold),
        ood=rng.gamma(2, 1, len(labels)),
    )


def test_estimate_block_has_the_manifest_shape_and_an_interval_around_the_point() -> None:
    oof = synthetic_oof()
    est = estimate_block(oof, n_resamples=300)
    accuracy = float((oof.logits.argmax(1) == oof.labels).mean())
    assert est["accuracy"] == accuracy  # the temperature never moves the argmax
    lo, hi = est["interval"]
    assert lo < accuracy < hi
    assert set(est["recall"]) == set(CLASSES)
    for c in CLASSES:
        r_lo, r_hi = est["recall_interval"][c]
        assert r_lo <= est["recall"][c] <= r_hi
    assert est["method"] == "5-fold grouped CV, out-of-fold"
    assert est["groups"] == 90
    assert est["images"] == 720


def test_interval_reflects_group_effects_not_image_count() -> None:
    few_big = estimate_block(synthetic_oof(per_group=40, groups_per_class=10), n_resamples=300)
    many_small = estimate_block(synthetic_oof(per_group=4, groups_per_class=100), n_resamples=300)

    def width(e: dict[str, Any]) -> float:
        return float(e["interval"][1] - e["interval"][0])

    assert width(few_big) > width(many_small)  # same 1,200 images, 30 vs 300 groups


def test_cross_fitted_temperature_never_sees_its_own_fold_and_undoes_the_sharpening() -> None:
    oof = synthetic_oof()
    probs, temps = cross_fitted_probabilities(oof)
    assert sorted(temps) == [0, 1, 2, 3, 4]
    assert all(1.3 < t < 3.0 for t in temps.values())  # logits were 2x too sharp
    f0 = oof.fold == 0
    np.testing.assert_allclose(probs[f0], softmax(oof.logits[f0] / temps[0]))
    raw_ece, _ = expected_calibration_error(oof.labels, softmax(oof.logits))
    assert estimate_block(oof, n_resamples=50)["ece"] < raw_ece  # the quoted ECE is the cross-fitted one


def test_serving_fit_gives_temperature_and_decision_with_honest_cross_fitted_coverage() -> None:
    oof = synthetic_oof()
    out = fit_serving(oof)
    assert out["temperature"] > 1.0
    d = out["decision"]
    assert 0.0 < d["refer_below"] <= 1.0
    assert d["ood_above"] > 0
    assert d["chosen_on"] == "out-of-fold predictions, 5-fold grouped CV (90 groups, 720 images)"
    cf = out["decision_cross_fitted"]
    assert 0.0 < cf["coverage"] <= 1.0
    np.testing.assert_allclose(cf["accepted_wrong"], cf["coverage"] * (1.0 - cf["accepted_accuracy"]))
    per_fold = cf["referred_out_of_distribution_per_fold"]
    assert sorted(per_fold) == ["0", "1", "2", "3", "4"]
    sizes = {f: int((oof.fold == int(f)).sum()) for f in per_fold}
    pooled = sum(per_fold[f] * sizes[f] for f in per_fold) / len(oof.labels)
    np.testing.assert_allclose(cf["referred_out_of_distribution"], pooled)


def test_cross_fitted_ood_rate_counts_a_far_group_in_the_fold_that_holds_it() -> None:
    oof = synthetic_oof()
    assert oof.ood is not None
    far = np.asarray(oof.groups) == oof.groups[int(np.flatnonzero(oof.fold == 2)[0])]
    oof.ood[far] += 1e6  # one whole group far from everything, as real far groups are
    per_fold = cross_fitted_decision(oof, softmax(oof.logits))["referred_out_of_distribution_per_fold"]
    assert per_fold["2"] >= far.sum() / (oof.fold == 2).sum()


def test_a_release_version_changes_with_anything_that_changes_the_answers() -> None:
    from export.cv_release import release_version

    members, decision = ["a" * 64, "b" * 64], {"refer_below": 0.95, "ood_above": 26.6}
    version = release_version(members, 0.70, decision)
    assert version.split("-")[1] == "cv2"
    assert version == release_version(members, 0.70, dict(reversed(decision.items())))
    assert release_version(members, 0.65, decision) != version  # the temperature is in the graph
    assert release_version(members, 0.70, {**decision, "refer_below": 0.93}) != version
    assert release_version(members[::-1], 0.70, decision) != version

"""Threshold fitting for the refer decision (pure NumPy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.decision_fit import (
    accepted_accuracy_lower_bound,
    apply,
    evaluate_decision,
    fit_decision,
    fit_ood_above,
    fit_refer_below,
    plot_risk_coverage,
    risk_coverage,
)


def test_refer_below_is_the_lowest_threshold_reaching_the_target() -> None:
    conf = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.90, 0.80, 0.70])
    correct = np.array([1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    fit = fit_refer_below(conf, correct, target=0.99)
    assert fit == {"refer_below": 0.90, "coverage": 0.75, "accuracy": 1.0}
    # 0.8 would give 6/7 = 0.857: below the target, so not chosen even though coverage is higher
    assert fit_refer_below(conf, correct, target=0.85)["refer_below"] == 0.80


def test_refer_below_takes_the_highest_coverage_even_past_a_dip() -> None:
    # accuracy dips below target at 0.97 then recovers: the lowest qualifying threshold wins
    conf = np.linspace(1.0, 0.01, 100)
    correct = np.ones(100, dtype=bool)
    correct[1] = False  # accepted accuracy at the top is 0.5, then climbs back
    fit = fit_refer_below(conf, correct, target=0.99)
    assert fit["coverage"] == 1.0
    assert fit["accuracy"] == pytest.approx(0.99)


def test_ties_are_accepted_together() -> None:
    thresholds, coverage, accuracy = risk_coverage(np.array([0.9, 0.9, 0.5]), np.array([True, False, True]))
    assert thresholds.tolist() == [0.9, 0.5]
    assert coverage.tolist() == pytest.approx([2 / 3, 1.0])
    assert accuracy.tolist() == pytest.approx([0.5, 2 / 3])


def test_unreachable_target_refers_everything() -> None:
    fit = fit_refer_below(np.array([0.9, 0.8]), np.array([False, False]))
    assert fit["coverage"] == 0.0
    assert not apply(np.array([[1.0, 0.0]]), None, fit["refer_below"], None).any()


def test_ood_above_leaves_at_most_the_allowed_share_above() -> None:
    scores = np.arange(1000, dtype=float)
    fit = fit_ood_above(scores, max_rate=0.005)
    assert fit == {"ood_above": 994.0, "ood_rate": 0.005}
    assert fit_ood_above(np.arange(100, dtype=float), 0.005)["ood_rate"] == 0.0  # 0.5 image rounds down


def test_decision_round_trip_on_another_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 500)
    probs = rng.dirichlet([1, 1, 1], 500)
    probs[np.arange(500), labels] += rng.uniform(0, 3, 500)
    probs /= probs.sum(1, keepdims=True)
    ood = rng.normal(10, 2, 500)
    decision = fit_decision(probs, labels, ood, "select groups (test)")
    assert decision["accuracy"] >= 0.99
    assert decision["ood_rate"] <= 0.005
    on_same = evaluate_decision(probs, labels, ood, decision)
    assert on_same["accepted_accuracy"] >= 0.99
    assert on_same["coverage"] <= decision["coverage"]  # the OOD gate can only refer more
    plot_risk_coverage({"s": (probs.max(1), probs.argmax(1) == labels)}, decision, tmp_path / "rc.png")
    assert (tmp_path / "rc.png").stat().st_size > 0


def _one_group_confidently_wrong() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """100 groups of 10 near-copies, all right, and one more group whose 10 images are all wrong
    at confidence 0.95: the whole-group error the cross-validation found (docs/model/cv.md)."""
    rng = np.random.default_rng(0)
    conf = np.r_[rng.uniform(0.5, 1.0, 1000), np.full(10, 0.95)]
    correct = np.r_[np.ones(1000, bool), np.zeros(10, bool)]
    groups = np.r_[np.repeat(np.arange(100), 10), np.full(10, 100)]
    return conf, correct, groups


def test_with_groups_the_target_must_hold_at_the_bootstrap_lower_bound() -> None:
    conf, correct, groups = _one_group_confidently_wrong()
    point = fit_refer_below(conf, correct, target=0.99)
    held = fit_refer_below(conf, correct, target=0.99, groups=groups)
    # The point fit accepts the wrong group (10 wrong among ~1,000 accepted: 0.99 on the nose);
    # a resample holding that group twice falls short, so the bound asks for a higher threshold.
    assert point["refer_below"] <= 0.95
    assert held["refer_below"] > 0.95
    assert held["accuracy_lower_bound"] >= 0.99
    assert held["coverage"] < point["coverage"]


def test_the_same_errors_ask_for_a_higher_threshold_when_they_come_in_groups() -> None:
    rng = np.random.default_rng(1)
    block_conf = rng.uniform(0.5, 1.0, 500)
    block_correct = rng.uniform(0.0, 1.0, 500) < block_conf**0.05  # rarer when confident
    conf = np.repeat(block_conf, 10) + rng.uniform(0, 1e-6, 5000)  # 10 near-copies each
    correct = np.repeat(block_correct, 10)
    alone = fit_refer_below(conf, correct, target=0.99, groups=np.arange(5000))
    copies = fit_refer_below(conf, correct, target=0.99, groups=np.repeat(np.arange(500), 10))
    assert copies["refer_below"] > alone["refer_below"]
    assert copies["coverage"] < alone["coverage"]


def test_the_lower_bound_never_exceeds_the_point_and_is_reproducible() -> None:
    conf, correct, groups = _one_group_confidently_wrong()
    _, _, accuracy = risk_coverage(conf, correct)
    bound = accepted_accuracy_lower_bound(conf, correct, groups)
    assert bound.shape == accuracy.shape
    assert (bound <= accuracy + 1e-12).all()
    assert (bound == accepted_accuracy_lower_bound(conf, correct, groups)).all()


def test_fit_decision_with_groups_says_how_the_target_was_held() -> None:
    conf, correct, groups = _one_group_confidently_wrong()
    labels = np.zeros(len(conf), np.int64)
    probs = np.c_[np.where(correct, conf, 1 - conf), np.where(correct, 1 - conf, conf)]
    decision = fit_decision(probs, labels, None, "out-of-fold (test)", groups=groups)
    assert "group-bootstrap lower bound" in decision["target_held_at"]
    assert decision["accuracy_lower_bound"] >= 0.99

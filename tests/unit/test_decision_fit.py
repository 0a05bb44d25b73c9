"""Threshold fitting for the refer decision (pure NumPy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.decision_fit import (
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

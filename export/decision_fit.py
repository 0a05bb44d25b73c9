"""Fitting the refer decision's thresholds (selective classification): on the SELECT groups, or
on the cross-validation's out-of-fold predictions with their groups.

- refer_below: refer when the calibrated top probability is below it. Chosen as the lowest
  threshold whose accepted predictions reach the target accuracy (0.99), i.e. the highest
  coverage that keeps that accuracy. Given the groups, the target must hold at the accepted
  accuracy's group-bootstrap lower bound, so the threshold holds on groups it never saw.
- ood_above: refer as out of distribution when ood_score exceeds it. Chosen so that at most
  `max_ood_rate` (0.5%) of the select tiles exceed it: real tissue like the training data is
  rarely refused for this reason, and far-away inputs (photographs, blank slides, noise) are.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

TARGET_ACCURACY = 0.99
MAX_OOD_RATE = 0.005
# With groups: the target must hold at this one-sided group-bootstrap lower bound, not the point.
BOUND_LEVEL = 0.95
BOUND_RESAMPLES = 1000


def _descending(
    conf: NDArray[np.floating], correct: NDArray[np.bool_]
) -> tuple[NDArray[np.intp], NDArray[np.float64], NDArray[np.float64], NDArray[np.intp]]:
    """(order, conf, correct as 0/1) by descending confidence, and the last index of each run of
    equal confidences: ties are accepted together, so those are the threshold points."""
    order = np.argsort(-np.asarray(conf, dtype=np.float64), kind="stable")
    c = np.asarray(conf, dtype=np.float64)[order]
    ok = np.asarray(correct, dtype=np.float64)[order]
    return order, c, ok, np.flatnonzero(np.r_[c[1:] != c[:-1], True])


def risk_coverage(
    conf: NDArray[np.floating], correct: NDArray[np.bool_]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """(thresholds, coverage, accepted accuracy), one point per distinct confidence, descending.

    At threshold t the accepted set is {conf >= t}.
    """
    _, c, ok, last = _descending(conf, correct)
    cum_ok = np.cumsum(ok)
    n_acc = last + 1.0
    return c[last], n_acc / len(c), cum_ok[last] / n_acc


def fit_refer_below(
    conf: NDArray[np.floating],
    correct: NDArray[np.bool_],
    target: float = TARGET_ACCURACY,
    groups: NDArray[Any] | None = None,
) -> dict[str, float]:
    """The lowest threshold whose accepted accuracy is >= target (so the highest coverage).

    With `groups`, the accepted accuracy that must reach the target is its group-bootstrap lower
    bound (`accepted_accuracy_lower_bound`), not the point: errors come in whole groups, so a
    threshold fitted to the point falls short on unseen groups (docs/model/cv.md).
    """
    thresholds, coverage, accuracy = risk_coverage(conf, correct)
    bound = accuracy if groups is None else accepted_accuracy_lower_bound(conf, correct, groups)
    ok = np.flatnonzero(bound >= target)
    if len(ok) == 0:  # not even the most confident prediction: refer everything
        return {"refer_below": 1.0 + 1e-9, "coverage": 0.0, "accuracy": float("nan")}
    i = ok[-1]  # thresholds descend, so the last qualifying point has the lowest threshold
    fit = {"refer_below": float(thresholds[i]), "coverage": float(coverage[i]), "accuracy": float(accuracy[i])}
    if groups is not None:
        fit["accuracy_lower_bound"] = float(bound[i])
    return fit


def accepted_accuracy_lower_bound(
    conf: NDArray[np.floating],
    correct: NDArray[np.bool_],
    groups: NDArray[Any],
    level: float = BOUND_LEVEL,
    n_resamples: int = BOUND_RESAMPLES,
    seed: int = 0,
) -> NDArray[np.float64]:
    """At each point of `risk_coverage`: the one-sided `level` lower bound of accepted accuracy,
    resampling whole groups with replacement (a group's images are near-copies, wrong together)."""
    order, _, ok, last = _descending(conf, correct)
    _, gid = np.unique(np.asarray(groups)[order], return_inverse=True)
    n_groups = int(gid.max()) + 1
    rng = np.random.default_rng(seed)
    accuracy = np.empty((n_resamples, len(last)))
    for b in range(n_resamples):
        weight = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[gid].astype(np.float64)
        accepted = np.cumsum(weight)[last]
        right = np.cumsum(weight * ok)[last]
        # No resampled image accepted at this threshold: nothing accepted, nothing wrong.
        accuracy[b] = np.divide(right, accepted, out=np.ones_like(right), where=accepted > 0)
    out: NDArray[np.float64] = np.quantile(accuracy, 1.0 - level, axis=0)
    return out


def fit_ood_above(scores: NDArray[np.floating], max_rate: float = MAX_OOD_RATE) -> dict[str, float]:
    """The smallest threshold with at most floor(max_rate * n) scores strictly above it."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    allowed = math.floor(max_rate * len(s))
    t = float(s[len(s) - allowed - 1])
    return {"ood_above": t, "ood_rate": float((s > t).mean())}


def apply(
    probs: NDArray[np.floating], ood: NDArray[np.floating] | None, refer_below: float, ood_above: float | None
) -> NDArray[np.bool_]:
    """True where the prediction is accepted (the same rule service/model/decision.py applies)."""
    accept = probs.max(axis=1) >= refer_below
    if ood is not None and ood_above is not None:
        accept &= ood <= ood_above
    out: NDArray[np.bool_] = accept
    return out


def fit_decision(
    probs: NDArray[np.floating],
    labels: NDArray[np.integer],
    ood: NDArray[np.floating] | None,
    chosen_on: str,
    target: float = TARGET_ACCURACY,
    max_ood_rate: float = MAX_OOD_RATE,
    groups: NDArray[Any] | None = None,
) -> dict[str, Any]:
    """The manifest's `decision` section, fitted on the select groups' outputs (or, with `groups`,
    on out-of-fold outputs, the target held at the group-bootstrap lower bound)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    decision: dict[str, Any] = {**fit_refer_below(conf, correct, target, groups), "target_accuracy": target}
    if groups is not None:
        decision["target_held_at"] = f"one-sided {BOUND_LEVEL:.0%} group-bootstrap lower bound ({BOUND_RESAMPLES}x)"
    if ood is not None:
        decision.update(fit_ood_above(ood, max_ood_rate))
    decision["chosen_on"] = chosen_on
    return decision


def evaluate_decision(
    probs: NDArray[np.floating],
    labels: NDArray[np.integer],
    ood: NDArray[np.floating] | None,
    decision: dict[str, Any],
) -> dict[str, float]:
    """Coverage and accepted accuracy of a fitted decision on another split (e.g. test)."""
    accept = apply(probs, ood, decision["refer_below"], decision.get("ood_above"))
    correct = probs.argmax(axis=1) == np.asarray(labels)
    out = {
        "coverage": float(accept.mean()),
        "accepted_accuracy": float(correct[accept].mean()) if accept.any() else float("nan"),
        "referred_low_confidence": float((probs.max(axis=1) < decision["refer_below"]).mean()),
    }
    if ood is not None and "ood_above" in decision:
        out["referred_out_of_distribution"] = float((ood > decision["ood_above"]).mean())
    return out


def plot_risk_coverage(
    curves: dict[str, tuple[NDArray[np.floating], NDArray[np.bool_]]],
    chosen: dict[str, float] | None,
    path: Path,
    title: str = "risk-coverage (select groups)",
) -> None:
    """One curve per named (confidence, correct) pair; the chosen operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (conf, correct) in curves.items():
        _, coverage, accuracy = risk_coverage(conf, correct)
        ax.plot(coverage, 1.0 - accuracy, label=name)
    ax.axhline(1.0 - TARGET_ACCURACY, color="grey", ls="--", lw=1, label="risk 0.01 (accuracy 0.99)")
    if chosen is not None:
        ax.plot(
            [chosen["coverage"]],
            [1.0 - chosen["accuracy"]],
            "o",
            color="C3",
            label=f"refer_below {chosen['refer_below']:.3f}: coverage {chosen['coverage']:.3f}",
        )
    ax.set(
        xlabel="coverage (share accepted)",
        ylabel="risk (error rate of accepted)",
        title=title,
        xlim=(0, 1),
        ylim=(0, None),
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

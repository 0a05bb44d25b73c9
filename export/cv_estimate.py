"""THE estimate from the out-of-fold predictions, and the refer decision fitted on them.

    python -m export.cv_estimate --run RUN [--out estimate.json]

Accuracy and recall with a group-bootstrap interval over all groups; temperature and thresholds
fitted on the pooled out-of-fold predictions, their figures cross-fitted (docs/model/cv.md).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from export.calibrate import fit_temperature
from export.decision_fit import apply, fit_decision
from export.scoring import classification_report, group_bootstrap


@dataclass(frozen=True)
class OutOfFold:
    classes: list[str]
    labels: NDArray[np.int64]
    logits: NDArray[np.float64]
    groups: list[str]
    fold: NDArray[np.int64]
    ood: NDArray[np.float64] | None = None  # out-of-fold OOD score (each image scored by its own fold's bank)

    @classmethod
    def load(cls, path: Path, ood: NDArray[np.floating] | None = None) -> OutOfFold:
        """A run's oof.npz (with `ood` given), or a published file (its own `ood`)."""
        with np.load(path) as f:
            if ood is None and "ood" in f.files:
                ood = f["ood"]
            return cls(
                classes=[str(c) for c in f["classes"]],
                labels=np.asarray(f["labels"], np.int64),
                logits=np.asarray(f["logits"], np.float64),
                groups=[str(g) for g in f["groups"]],
                fold=np.asarray(f["fold"], np.int64),
                ood=None if ood is None else np.asarray(ood, np.float64),
            )


def softmax(z: NDArray[np.floating]) -> NDArray[np.float64]:
    e = np.exp(np.asarray(z, np.float64) - np.max(z, axis=1, keepdims=True))
    out: NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return out


def cross_fitted_probabilities(oof: OutOfFold) -> tuple[NDArray[np.float64], dict[int, float]]:
    """Each fold's logits / T_(-fold): T fitted on the other folds' out-of-fold logits."""
    probs = np.zeros_like(oof.logits)
    temps: dict[int, float] = {}
    for f in np.unique(oof.fold):
        here = oof.fold == f
        t = fit_temperature(oof.logits[~here], oof.labels[~here])
        temps[int(f)] = t
        probs[here] = softmax(oof.logits[here] / t)
    return probs, temps


def estimate_block(oof: OutOfFold, n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The model.json `estimate` block: the figure users should expect, with group-bootstrap intervals."""
    k = len(np.unique(oof.fold))
    probs, _ = cross_fitted_probabilities(oof)  # argmax = the logits' argmax; ECE honest
    report = classification_report(oof.labels, probs, oof.classes)
    ci = group_bootstrap(oof.labels, probs, oof.groups, oof.classes, n_resamples, seed)
    return {
        "accuracy": report["accuracy"],
        "interval": ci["accuracy"],
        "recall": {c: report["per_class"][c]["recall"] for c in oof.classes},
        "recall_interval": ci["recall"],
        "ece": report["ece"],
        "ece_interval": ci["ece"],
        "method": f"{k}-fold grouped CV, out-of-fold",
        "interval_method": ci["method"],
        "groups": len(set(oof.groups)),
        "images": len(oof.labels),
        "confusion_matrix": report["confusion_matrix"],
    }


def cross_fitted_decision(oof: OutOfFold, probs: NDArray[np.float64]) -> dict[str, Any]:
    """Coverage / accepted accuracy of the decision rule when its thresholds never saw the fold, and
    the share of real tiles it refers as out of distribution, pooled and per fold (far groups come
    whole, so the rate differs from fold to fold)."""
    accepted = np.zeros(len(oof.labels), bool)
    referred_ood = np.zeros(len(oof.labels), bool)
    for f in np.unique(oof.fold):
        here = oof.fold == f
        ood_other, ood_here = (None, None) if oof.ood is None else (oof.ood[~here], oof.ood[here])
        groups = np.asarray(oof.groups)[~here]
        d = fit_decision(probs[~here], oof.labels[~here], ood_other, "other folds", groups=groups)
        accepted[here] = apply(probs[here], ood_here, d["refer_below"], d.get("ood_above"))
        if ood_here is not None and "ood_above" in d:
            referred_ood[here] = ood_here > d["ood_above"]
    correct = probs.argmax(1) == oof.labels
    out: dict[str, Any] = {
        "coverage": float(accepted.mean()),
        "accepted_accuracy": float(correct[accepted].mean()) if accepted.any() else float("nan"),
        "accepted_wrong": float((accepted & ~correct).mean()),
    }
    if oof.ood is not None:
        out["referred_out_of_distribution"] = float(referred_ood.mean())
        out["referred_out_of_distribution_per_fold"] = {
            str(int(f)): float(referred_ood[oof.fold == f].mean()) for f in np.unique(oof.fold)
        }
    return out


def fit_serving(oof: OutOfFold) -> dict[str, Any]:
    """The served ensemble's temperature and decision, fitted on ALL out-of-fold predictions.

    Caveat written into the result: the served model is the ensemble of the fold models, whose
    outputs on new images are the mean of k members, not one member's; the out-of-fold logits are
    the only honest stand-in (every member saw the other folds' images).
    """
    temperature = fit_temperature(oof.logits, oof.labels)
    probs = softmax(oof.logits / temperature)
    n_groups = len(set(oof.groups))
    chosen_on = (
        f"out-of-fold predictions, {len(np.unique(oof.fold))}-fold grouped CV ({n_groups} groups, {len(probs)} images)"
    )
    decision = fit_decision(probs, oof.labels, oof.ood, chosen_on, groups=np.asarray(oof.groups))
    cross_probs, temps = cross_fitted_probabilities(oof)
    return {
        "temperature": temperature,
        "temperature_per_fold_cross_fitted": temps,
        "decision": decision,
        "decision_cross_fitted": cross_fitted_decision(oof, cross_probs),
        "note": "fitted on single fold models' out-of-fold outputs; the served ensemble averages k members",
    }


def publish(oof: OutOfFold, files: NDArray[Any], path: Path) -> None:
    """The out-of-fold predictions behind the estimate, for anyone to recompute it (`result`):
    file, group, label, fold, logits and OOD score per image, no features (a few hundred KB)."""
    tmp = path.with_name(path.stem + ".tmp.npz")
    arrays: dict[str, NDArray[Any]] = {
        "classes": np.array(oof.classes),
        "files": np.asarray(files),
        "groups": np.array(oof.groups),
        "labels": oof.labels.astype(np.int8),
        "fold": oof.fold.astype(np.int8),
        "logits": oof.logits.astype(np.float32),  # as the run stored them: the estimate recomputes exactly
    }
    if oof.ood is not None:
        arrays["ood"] = oof.ood
    np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as its `allow_pickle`
    tmp.replace(path)


def result(oof: OutOfFold, ood: dict[str, Any] | None = None) -> dict[str, Any]:
    """What estimate.json holds: the estimate, the served temperature and decision, and `ood`
    (the score's description, export.cv_ood.describe) with the out-of-fold median."""
    out: dict[str, Any] = {"estimate": estimate_block(oof), **fit_serving(oof)}
    if oof.ood is not None and ood is not None:
        out["ood"] = {**ood, "oof_median": float(np.median(oof.ood))}
    return out


def main(argv: list[str] | None = None) -> int:
    from export.cv_ood import DEFAULT_SCORE, SCORES, describe, oof_scores
    from export.knn_ood import DEFAULT_K

    p = argparse.ArgumentParser(prog="python -m export.cv_estimate", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="an export.cv run folder with oof.npz")
    p.add_argument("--ood", choices=SCORES, default=DEFAULT_SCORE, help="the ood_score (export.cv_ood)")
    p.add_argument("--knn-k", type=int, default=DEFAULT_K, help="k of the kNN OOD score (declared, not tuned)")
    p.add_argument("--out", type=Path, default=None, help="default: RUN/estimate.json")
    p.add_argument("--publish", type=Path, default=None, help="also write the out-of-fold predictions here (.npz)")
    a = p.parse_args(argv)
    with np.load(a.run / "oof.npz") as f:
        files = f["files"]
    folds = sorted(a.run.glob("fold-*"), key=lambda d: int(d.name.split("-")[1]))
    # Each image scored by the statistics of the fold model that never saw it: what ood_above is fitted on.
    oof = OutOfFold.load(a.run / "oof.npz", oof_scores(files, folds, a.ood, a.knn_k))
    found = result(oof, describe(a.ood, a.knn_k))
    out = a.out or a.run / "estimate.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(found, indent=1) + "\n")
    tmp.replace(out)
    if a.publish is not None:
        publish(oof, files, a.publish)
    print(json.dumps(found["estimate"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

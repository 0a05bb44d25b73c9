"""A lever's effect: two cross-validation runs compared on the SAME out-of-fold images, paired.

    python -m export.cv_compare RUN_A RUN_B

Both runs use the same seed, hence the same folds, so every image was out-of-fold in both. The
difference in accuracy (B - A) gets a paired group-bootstrap interval: each resample draws groups
(within their class) and scores both runs on the same draw, so the group effects shared by both runs
cancel and the interval is much narrower than the two separate intervals suggest. Partial runs
(`--only-folds`) are compared on the folds both have finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray


def finished_folds(run: Path) -> dict[str, NDArray[Any]]:
    """files, groups, labels, logits of every finished fold of a run (done.json present)."""
    parts = []
    for d in sorted(run.glob("fold-*")):
        if (d / "done.json").exists():
            with np.load(d / "oof.npz") as f:
                parts.append({k: f[k] for k in ("files", "groups", "labels", "logits")})
    if not parts:
        raise ValueError(f"{run} has no finished fold")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def paired_difference(
    a: dict[str, NDArray[Any]], b: dict[str, NDArray[Any]], n_resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Accuracy of A and B on their common images, and B - A with a paired group-bootstrap 95% interval."""
    common = sorted(set(map(str, a["files"])) & set(map(str, b["files"])))
    if not common:
        raise ValueError("the runs share no out-of-fold image")

    def correct(run: dict[str, NDArray[Any]]) -> NDArray[np.float64]:
        index = {str(f): i for i, f in enumerate(run["files"])}
        idx = np.array([index[f] for f in common])
        out: NDArray[np.float64] = (run["logits"][idx].argmax(1) == run["labels"][idx]).astype(np.float64)
        return out

    index_a = {str(f): i for i, f in enumerate(a["files"])}
    rows = np.array([index_a[f] for f in common])
    groups, labels = a["groups"][rows].astype(str), a["labels"][rows]
    ca, cb = correct(a), correct(b)
    names, gid = np.unique(groups, return_inverse=True)
    n = np.bincount(gid).astype(np.float64)
    sa, sb = np.bincount(gid, weights=ca), np.bincount(gid, weights=cb)
    g_label = np.zeros(len(names), np.int64)
    g_label[gid] = labels
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_resamples, len(names)))
    for c in np.unique(g_label):
        members = np.flatnonzero(g_label == c)
        draws = rng.choice(members, size=(n_resamples, len(members)), replace=True)
        for r in range(n_resamples):
            np.add.at(weights[r], draws[r], 1.0)
    total = weights @ n
    diff = (weights @ sb - weights @ sa) / total
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return {
        "images": len(common),
        "groups": len(names),
        "accuracy_a": float(ca.mean()),
        "accuracy_b": float(cb.mean()),
        "difference": float(cb.mean() - ca.mean()),
        "interval": [float(lo), float(hi)],
        "method": f"paired group bootstrap, {n_resamples} resamples of groups within each class, percentile 95%",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.cv_compare", description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    a = p.parse_args(argv)
    result = paired_difference(finished_folds(a.run_a), finished_folds(a.run_b))
    print(json.dumps({"a": str(a.run_a), "b": str(a.run_b), **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A lever's effect: two cross-validation runs compared on the SAME out-of-fold images, paired.

    python -m export.cv_compare RUN_A RUN_B
    python -m export.cv_compare --model-a DIR --part test --data DATA RUN_B

Both runs use the same seed, hence the same folds, so every image was out-of-fold in both. The
difference in accuracy (B - A) gets a paired group-bootstrap interval: each resample draws groups
(within their class) and scores both runs on the same draw, so the group effects shared by both runs
cancel and the interval is much narrower than the two separate intervals suggest. Partial runs
(`--only-folds`) are compared on the folds both have finished.

`--model-a` compares a single-split model (a 3-way `split` in its manifest, e.g. model v2) on its
own `--part` groups, which it never trained on, with the run's out-of-fold predictions of the same
images, which no fold model that made them trained on either.
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


def model_part(model_dir: Path, data: Path, part: str, cache_dir: Path | None = None) -> dict[str, NDArray[Any]]:
    """files, groups, labels and probabilities (as "logits": only their argmax is used) of a
    single-split model on one part of its own split, through ONNX Runtime."""
    from export import data as data_mod
    from export.evaluate import run_outputs, split_of

    manifest = json.loads((model_dir / "model.json").read_text())
    samples = getattr(split_of(manifest, data_mod.scan(data)), part)
    images, labels = data_mod.load_arrays(samples, int(manifest["input_size"]), cache_dir)
    return {
        "files": np.array([s.rel for s in samples]),
        "groups": np.array([s.group for s in samples]),
        "labels": labels,
        "logits": run_outputs(model_dir, images)["probabilities"],
    }


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
    p.add_argument("runs", type=Path, nargs="+", help="RUN_A RUN_B, or RUN_B with --model-a")
    p.add_argument("--model-a", type=Path, default=None, help="a single-split model folder as A")
    p.add_argument("--part", default="test", choices=("select", "test"), help="with --model-a: its split part")
    p.add_argument("--data", type=Path, default=None, help="with --model-a: the data folder")
    p.add_argument("--cache-dir", type=Path, default=None)
    a = p.parse_args(argv)
    if a.model_a is not None:
        if len(a.runs) != 1 or a.data is None:
            p.error("--model-a takes one run (B) and --data")
        first, name_a = model_part(a.model_a, a.data, a.part, a.cache_dir), f"{a.model_a} ({a.part} groups)"
    else:
        if len(a.runs) != 2:
            p.error("give RUN_A RUN_B")
        first, name_a = finished_folds(a.runs[0]), str(a.runs[0])
    result = paired_difference(first, finished_folds(a.runs[-1]))
    print(json.dumps({"a": name_a, "b": str(a.runs[-1]), **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

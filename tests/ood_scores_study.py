"""Which ood_score for a cross-validation release: each candidate at the same rate of real tiles referred.

    python -m tests.ood_scores_study --run /work/runs/<cv run> --folds 0 1 2

For each score of export.cv_ood (Mahalanobis, kNN) on each feature set, and the energy score:
`ood_above` is set so that 0.5% of the run's real out-of-fold tiles exceed it (each tile against
the statistics of the fold model that never saw it), and the mean over the members' scores is
applied to the synthetic OOD set of tests/ood_images.py (built from real tiles of every group, as
tests/ood_study.py does for a release). Prints how many of each category the score alone refers.
Needs TensorFlow (the fold models give the OOD images' features).
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from export.cv_ood import mahalanobis_distance
from export.decision_fit import fit_ood_above
from export.knn_ood import KnnBank, fit_knn, knn_distance
from export.serving_graph import fit_mahalanobis
from service.model.preprocess import load_image
from tests.ood_images import ood_images
from tests.ood_study import read_groups, real_tiles_to_recolour


def energy(logits: NDArray[np.floating]) -> NDArray[np.float64]:
    """-logsumexp over classes (Liu et al., 2020)."""
    z = np.asarray(logits, np.float64)
    top = z.max(axis=1)
    out: NDArray[np.float64] = -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))
    return out


def main(argv: list[str] | None = None) -> int:
    import keras

    from export.cv import _head_outputs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--folds", type=int, nargs="+", required=True, help="finished folds (members and OOF)")
    p.add_argument("--data", type=Path, default=Path("../shared/data/lc25000-lung"))
    p.add_argument("--size", type=int, default=160)
    a = p.parse_args(argv)
    items = ood_images(real_tiles_to_recolour(read_groups(a.data)))
    x = np.stack([load_image(i.data, a.size) for i in items])
    cats = np.array([i.category for i in items])
    oof_scores: dict[str, list[np.ndarray]] = defaultdict(list)
    ood_scores: dict[str, list[np.ndarray]] = defaultdict(list)
    for f in a.folds:
        d = a.run / f"fold-{f}"
        with np.load(d / "train_features.npz") as tr, np.load(d / "oof.npz") as oof:
            model = keras.models.load_model(d / "fold.keras", compile=False)
            h = _head_outputs(model, x)
            for feat in ("gap", "penultimate"):
                bank: KnnBank = fit_knn(tr[feat], 10)
                oof_scores[f"knn, {feat}"].append(knn_distance(oof[feat], bank))
                ood_scores[f"knn, {feat}"].append(knn_distance(h[feat], bank))
                stats = fit_mahalanobis(tr[feat], tr["labels"], int(tr["labels"].max()) + 1)
                oof_scores[f"mahalanobis, {feat}"].append(mahalanobis_distance(stats, oof[feat]))
                ood_scores[f"mahalanobis, {feat}"].append(mahalanobis_distance(stats, h[feat]))
            # Energy (Liu et al., 2020): -logsumexp of the logits, larger = less like the training data.
            oof_scores["energy, logits"].append(energy(oof["logits"]))
            ood_scores["energy, logits"].append(energy(h["logits"]))
        keras.backend.clear_session()
    n = Counter(cats.tolist())
    print("| score, features | " + " | ".join(f"{c} ({n[c]})" for c in n) + " |")
    print("|---|" + "---|" * len(n))
    for name in oof_scores:
        above = fit_ood_above(np.concatenate(oof_scores[name]))["ood_above"]
        caught = np.mean(ood_scores[name], axis=0) > above
        print(f"| {name} | " + " | ".join(str(int(caught[cats == c].sum())) for c in n) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

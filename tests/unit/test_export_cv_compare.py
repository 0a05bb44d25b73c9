"""Paired comparison of two cross-validation runs on the same out-of-fold images (pure NumPy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.cv_compare import finished_folds, paired_difference


def oof(correct_rate: float, seed: int, groups: int = 40, per_group: int = 10) -> dict[str, Any]:
    """Two classes; each group is hard or easy for every run alike (a shared group effect)."""
    rng = np.random.default_rng(seed)
    ease = np.random.default_rng(99).uniform(0.5, 1.0, groups)  # the same for both runs
    files, grp, labels, logits = [], [], [], []
    for g in range(groups):
        label = g % 2
        for i in range(per_group):
            ok = rng.random() < ease[g] * correct_rate
            z = np.zeros(2)
            z[label if ok else 1 - label] = 1.0
            files.append(f"g{g}_{i}.jpeg")
            grp.append(f"c{label}/{g}")
            labels.append(label)
            logits.append(z)
    return {"files": np.array(files), "groups": np.array(grp), "labels": np.array(labels), "logits": np.array(logits)}


def test_a_run_against_itself_differs_by_exactly_zero() -> None:
    a = oof(0.9, seed=1)
    out = paired_difference(a, a, n_resamples=200)
    assert out["difference"] == 0.0
    assert out["interval"] == [0.0, 0.0]


def test_a_better_run_gets_an_interval_above_zero() -> None:
    a, b = oof(0.8, seed=1), oof(1.0, seed=2)
    out = paired_difference(a, b, n_resamples=500)
    assert out["accuracy_b"] > out["accuracy_a"]
    lo, hi = out["interval"]
    assert 0.0 < lo <= out["difference"] <= hi
    assert out["groups"] == 40


def test_only_common_images_are_compared_and_a_disjoint_pair_is_refused() -> None:
    a, b = oof(0.9, seed=1), oof(0.9, seed=2)
    half = {k: v[:200] for k, v in b.items()}
    assert paired_difference(a, half, n_resamples=50)["images"] == 200
    other = {**b, "files": np.array([f"x{f}" for f in b["files"]])}
    with pytest.raises(ValueError, match="share no"):
        paired_difference(a, other)


def test_partial_runs_contribute_their_finished_folds_only(tmp_path: Path) -> None:
    a = oof(0.9, seed=1)
    for fold, done in ((0, True), (1, False)):
        d = tmp_path / f"fold-{fold}"
        d.mkdir()
        part = slice(0, 200) if fold == 0 else slice(200, 400)
        np.savez(d / "oof.npz", **{k: v[part] for k, v in a.items()})
        if done:
            (d / "done.json").write_text("{}")
    assert len(finished_folds(tmp_path)["files"]) == 200


def test_a_single_split_model_is_scored_on_its_own_part_only(tmp_path: Path) -> None:
    from export.cv_compare import model_part
    from tests.images import noise_png
    from tests.onnx_models import CLASSES, write_model_dir

    data = tmp_path / "data"
    rows = ["class,group,file"]
    for c, cls in enumerate(CLASSES):
        (data / cls).mkdir(parents=True)
        for g in (0, 1):
            for i in (0, 1):
                rel = f"{cls}/{g}_{i}.png"
                (data / rel).write_bytes(noise_png(16, seed=10 * c + 2 * g + i))
                rows.append(f"{cls},{g},{rel}")
    (data / "groups.csv").write_text("\n".join(rows) + "\n")
    split = {"select_groups": [f"{c}/0" for c in CLASSES], "test_groups": [f"{c}/1" for c in CLASSES]}
    write_model_dir(tmp_path / "model", split=split)

    part = model_part(tmp_path / "model", data, "test")
    assert sorted(part["files"].tolist()) == sorted(f"{c}/1_{i}.png" for c in CLASSES for i in (0, 1))
    assert sorted(set(part["groups"].tolist())) == sorted(split["test_groups"])
    assert [CLASSES[label] for label in part["labels"]] == [f.split("/")[0] for f in part["files"]]
    assert part["logits"].shape == (6, 3)
    np.testing.assert_allclose(part["logits"].sum(axis=1), 1.0, rtol=1e-5)

"""Grouped k-fold cross-validation: the fold assignment (pure) and a resumable smoke run (TensorFlow)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export import cv_estimate, cv_release, model_card
from export.checkpoint import EMA, LAST, WeightEMA, recover
from export.cv import CV_JSON, DONE, OOF, CVConfig, assign_folds, run
from export.cv_ood import Score
from export.data import DataError, scan
from service.model.manifest import Manifest, sha256_file
from tests.unit.test_export_data import make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 7 groups per class, 2 images each: 21 groups over k = 3 folds
    return make_dataset(tmp_path_factory.mktemp("cv") / "data", groups=7, per_group=2, size=32)


def test_every_group_lands_in_exactly_one_fold_stratified_by_class(data: Path) -> None:
    ds = scan(data)
    folds = assign_folds(ds, 3, seed=1)
    assert set(folds) == {s.group for s in ds.samples}
    assert set(folds.values()) == {0, 1, 2}
    for label in range(len(ds.classes)):
        per_fold = Counter(folds[g] for g in {s.group for s in ds.samples if s.label == label})
        assert max(per_fold.values()) - min(per_fold.values()) <= 1  # 7 groups -> 3/2/2
    sizes = Counter(folds.values())
    assert max(sizes.values()) - min(sizes.values()) <= 1  # the deal continues across classes


def test_fold_assignment_is_deterministic_for_a_seed(data: Path) -> None:
    ds = scan(data)
    assert assign_folds(ds, 3, seed=1) == assign_folds(scan(data), 3, seed=1)
    assert assign_folds(ds, 3, seed=1) != assign_folds(ds, 3, seed=2)


def test_fold_assignment_refuses_too_few_groups(data: Path) -> None:
    with pytest.raises(DataError, match="fewer than k"):
        assign_folds(scan(data), 8, seed=1)


class Interrupted(Exception):
    """Stands for a kill after a committed epoch."""


def test_cv_run_resumes_where_it_stopped_and_pools_every_image_once(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    cfg = CVConfig(data=data, out=tmp_path / "run", folds=3, input_size=32, epochs=2, batch_size=8, max_steps=1)
    seen: list[tuple[int, int]] = []

    def stop_after_first_epoch(fold: int, row: dict[str, Any]) -> None:
        seen.append((fold, row["epoch"]))
        raise Interrupted

    with pytest.raises(Interrupted):
        run(cfg, on_epoch=stop_after_first_epoch)
    fold0 = tmp_path / "run" / "fold-0"
    assert json.loads((fold0 / "state.json").read_text())["epoch"] == 1
    assert not (fold0 / DONE).exists()

    epochs: list[tuple[int, int]] = []
    result = run(cfg, on_epoch=lambda fold, row: epochs.append((fold, row["epoch"])))
    # fold 0 continues at its second epoch; the other folds run whole
    assert epochs == [(0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert result["folds_done"] == [0, 1, 2]
    history = json.loads((fold0 / "state.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2]

    plan = json.loads((tmp_path / "run" / CV_JSON).read_text())
    with np.load(tmp_path / "run" / OOF) as oof:
        files = [str(f) for f in oof["files"]]
        assert sorted(files) == sorted(s.rel for s in scan(data).samples)  # every image out-of-fold once
        for group, fold in zip(oof["groups"], oof["fold"], strict=True):
            assert plan["folds"][str(group)] == int(fold)
        assert oof["logits"].shape == (len(files), 3)
        assert oof["penultimate"].shape[0] == len(files)

    done = (fold0 / DONE).read_text()
    again: list[tuple[int, int]] = []
    run(cfg, on_epoch=lambda fold, row: again.append((fold, row["epoch"])))
    assert again == []  # finished folds are skipped
    assert (fold0 / DONE).read_text() == done

    # THE estimate and the decision from the pooled out-of-fold predictions, with each ood_score
    # (per fold, fitted on its train features); the default, Mahalanobis, last: it stays the run's.
    published = tmp_path / "cv_oof.npz"
    for score in ("knn", "mahalanobis"):
        options = ["--ood", "knn", "--knn-k", "2"] if score == "knn" else []
        assert cv_estimate.main(["--run", str(tmp_path / "run"), "--publish", str(published), *options]) == 0
        est = json.loads((tmp_path / "run" / "estimate.json").read_text())
        assert est["ood"]["score"] == score
        # the published predictions alone give the same figures, to the last digit
        described = {k: v for k, v in est["ood"].items() if k != "oof_median"}
        assert json.loads(json.dumps(cv_estimate.result(cv_estimate.OutOfFold.load(published), described))) == est
        assert est["estimate"]["groups"] == 21
        assert est["estimate"]["method"] == "3-fold grouped CV, out-of-fold"
        assert "ood_above" in est["decision"]

        # two fold models as one served model folder: softmax(mean logits / T), the contract's outputs
        ens = tmp_path / f"ens-{score}"
        assert cv_release.main(["--run", str(tmp_path / "run"), "--out", str(ens), "--members", "0", "1"]) == 0
        check_ensemble(tmp_path / "run", ens, est["temperature"], score)
        manifest = Manifest.read(ens / "model.json").dump()
        assert manifest["sha256"] == sha256_file(ens / "model.onnx")
        assert manifest["estimate"] == est["estimate"]
        assert manifest["decision"]["refer_below"] == est["decision"]["refer_below"]
        assert manifest["ood"]["score"] == score
        if score == "knn":
            assert manifest["ood"]["members"]["1"]["k"] == manifest["ood"]["k"] == 2  # the k ood_above was fitted with
        else:
            assert manifest["ood"]["members"]["1"]["method"].startswith("Mahalanobis")
        assert manifest["parity"]["argmax_flips"] == 0
    assert sorted(manifest["training"]["folds"]) == ["0", "1", "2"]
    assert manifest["training"]["folds"]["0"]["epochs"] == 2
    card = model_card.render(manifest, cv_estimate.OutOfFold.load(published))
    assert manifest["version"] in card
    assert "3-fold grouped CV, out-of-fold" in card
    assert "real tiles referred as out of distribution" in card  # cross-fitted, pooled and per fold

    with pytest.raises(ValueError, match="another recipe"):
        run(CVConfig(data=data, out=tmp_path / "run", folds=3, input_size=32, epochs=2, hed_alpha=0.2, max_steps=1))


def _ema_file(path: Path, updates: int) -> None:
    WeightEMA([np.full(2, float(updates))], 0.9, updates).save(path)


@pytest.mark.parametrize("committed", [True, False])
def test_an_interrupted_checkpoint_commit_is_rolled_forward_or_dropped(tmp_path: Path, committed: bool) -> None:
    """A kill between the next-* files and state.json (dropped) or after state.json (rolled forward)."""
    _ema_file(tmp_path / EMA, 10)
    (tmp_path / LAST).write_bytes(b"epoch 1")
    _ema_file(tmp_path / f"next-{EMA}", 20)
    (tmp_path / f"next-{LAST}").write_bytes(b"epoch 2")
    state = {"epoch": 2 if committed else 1, "ema_updates": 20 if committed else 10}
    recover(tmp_path, state)
    assert (tmp_path / LAST).read_bytes() == (b"epoch 2" if committed else b"epoch 1")
    assert WeightEMA.load(tmp_path / EMA, 0.9).updates == (20 if committed else 10)
    assert not list(tmp_path.glob("next-*"))


def check_ensemble(run_dir: Path, ens: Path, temperature: float, score: Score) -> None:
    import keras
    import onnxruntime as ort

    from export.cv import FOLD_MODEL, _head_outputs
    from export.cv_estimate import softmax
    from export.cv_ood import distance, fit_member
    from export.model import logits_model

    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    logits = [
        logits_model(keras.models.load_model(run_dir / f"fold-{f}" / FOLD_MODEL, compile=False)).predict(
            images, verbose=0
        )
        for f in (0, 1)
    ]
    sess = ort.InferenceSession(str(ens / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert names == ["probabilities", "ood_score", "feature_maps", "cam_weights"]
    probs = sess.run(["probabilities"], {"image": images})[0]
    np.testing.assert_allclose(probs, softmax(np.mean(logits, axis=0) / temperature), atol=1e-4)
    # ood_score: the mean of the members' distances, as export.cv_ood computes the out-of-fold ones
    # that ood_above was fitted on
    expected = np.mean(
        [
            distance(
                fit_member(run_dir / f"fold-{f}", score, k=2),
                _head_outputs(keras.models.load_model(run_dir / f"fold-{f}" / FOLD_MODEL, compile=False), images),
            )
            for f in (0, 1)
        ],
        axis=0,
    )
    np.testing.assert_allclose(sess.run(["ood_score"], {"image": images})[0], expected, rtol=1e-3)

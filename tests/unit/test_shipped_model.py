"""The bundled model is what its manifest says, and its published figures recompute exactly.

The model is the ensemble of a grouped cross-validation's fold models (docs/model/cv.md). Its
figures (the estimate, the temperature, the refer decision) were computed from the run's
out-of-fold predictions, which are published as docs/model/cv_oof.npz: computing them again from
that file must give the manifest's figures, to the last digit.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.cv_estimate import OutOfFold, result
from service.model.manifest import Manifest, sha256_file
from tests.conftest import BUNDLED_MODEL, ROOT

ROLES_RANK = {"probabilities": 2, "ood_score": 1, "feature_maps": 4, "cam_weights": 3}
PUBLISHED_OOF = ROOT / "docs" / "model" / "cv_oof.npz"
# Two members at 160 px (~4 MB); the wheel and the Docker image carry the file.
MAX_MODEL_BYTES = 8 * 1024 * 1024


def _manifest() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((BUNDLED_MODEL / "model.json").read_text())
    return data


def _published() -> OutOfFold:
    return OutOfFold.load(PUBLISHED_OOF)


def test_bundled_manifest_matches_the_onnx_file() -> None:
    manifest = Manifest.read(BUNDLED_MODEL / "model.json")
    assert sha256_file(BUNDLED_MODEL / manifest.file) == manifest.sha256
    assert manifest.classes == ["lung_aca", "lung_n", "lung_scc"]
    assert (BUNDLED_MODEL / manifest.file).stat().st_size < MAX_MODEL_BYTES
    assert _manifest()["tile_source_px"] == 768


def test_declared_outputs_exist_in_the_graph_with_the_contract_shapes() -> None:
    ort = pytest.importorskip("onnxruntime")
    manifest = Manifest.read(BUNDLED_MODEL / "model.json")
    assert manifest.outputs is not None
    sess = ort.InferenceSession(str(BUNDLED_MODEL / manifest.file), providers=["CPUExecutionProvider"])
    graph = {o.name: o.shape for o in sess.get_outputs()}
    for role, name in manifest.outputs.items():
        assert len(graph[name]) == ROLES_RANK[role], role
    image = np.zeros((2, manifest.input_size, manifest.input_size, 3), np.uint8)
    probs = sess.run([manifest.outputs["probabilities"]], {manifest.input_name: image})[0]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_the_estimate_is_out_of_fold_over_every_fold_with_intervals() -> None:
    m = _manifest()
    estimate, folds = m["estimate"], int(m["ensemble"]["of_folds"])
    assert estimate["method"] == f"{folds}-fold grouped CV, out-of-fold"
    lo, hi = estimate["interval"]
    assert lo <= estimate["accuracy"] <= hi
    for name, recall in estimate["recall"].items():
        lo, hi = estimate["recall_interval"][name]
        assert lo <= recall <= hi
    oof = _published()
    assert sorted(set(oof.fold.tolist())) == list(range(folds))  # every fold's groups out of fold
    assert estimate["groups"] == len(set(oof.groups))
    assert estimate["images"] == len(oof.labels)
    assert set(m["ensemble"]["members"]) <= set(range(folds))
    # A group is one source tile's augmented copies: it is out of fold in exactly one fold.
    fold_of: dict[str, set[int]] = {}
    for group, fold in zip(oof.groups, oof.fold.tolist(), strict=True):
        fold_of.setdefault(group, set()).add(fold)
    assert all(len(f) == 1 for f in fold_of.values())


def test_the_published_figures_recompute_from_the_out_of_fold_predictions() -> None:
    m = _manifest()
    # Through JSON, as the manifest was written: tuples become lists, floats round-trip exactly.
    described = {k: v for k, v in m["ood"].items() if k not in ("oof_median", "members", "graph")}
    found = json.loads(json.dumps(result(_published(), described)))
    assert found["estimate"] == m["estimate"]
    assert found["temperature"] == m["calibration"]["temperature"]
    assert found["estimate"]["ece"] == m["calibration"]["ece_cross_fitted"]
    declared = {k: v for k, v in m["decision"].items() if k not in ("cross_fitted", "note")}
    assert found["decision"] == declared
    assert found["decision_cross_fitted"] == m["decision"]["cross_fitted"]
    assert found["ood"]["oof_median"] == m["ood"]["oof_median"]


def test_the_refer_decision_holds_its_target_at_the_group_bound() -> None:
    d = _manifest()["decision"]
    assert "out-of-fold" in d["chosen_on"]
    assert d["accuracy_lower_bound"] >= d["target_accuracy"]
    assert d["accuracy"] >= d["accuracy_lower_bound"]
    assert d["ood_rate"] <= 0.005  # real unseen tiles referred as out of distribution, out of fold


@pytest.mark.slow  # real data, and the same on every Python: not in the other-version matrix
def test_every_image_of_the_data_is_in_the_published_predictions(lc25000: Path) -> None:
    with (lc25000 / "groups.csv").open(newline="") as fh:
        rows = {row["file"]: f"{row['class']}/{row['group']}" for row in csv.DictReader(fh)}
    with np.load(PUBLISHED_OOF) as f:
        files = [str(x) for x in f["files"]]
    oof = _published()
    assert sorted(files) == sorted(rows)
    assert [rows[f] for f in files] == oof.groups
    assert [oof.classes[label] for label in oof.labels] == [rows[f].split("/")[0] for f in files]

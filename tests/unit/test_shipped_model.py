"""The bundled model is what its manifest says, and reproduces the figures it declares.

With ../shared/data present, the test-split metrics (the model card's figure) and the refer
decision are re-derived from the shipped ONNX file on real images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.model.manifest import Manifest, sha256_file
from tests.conftest import BUNDLED_MODEL

ROLES_RANK = {"probabilities": 2, "ood_score": 1, "feature_maps": 4, "cam_weights": 3}


def _manifest() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((BUNDLED_MODEL / "model.json").read_text())
    return data


def test_bundled_manifest_matches_the_onnx_file() -> None:
    manifest = Manifest.read(BUNDLED_MODEL / "model.json")
    assert sha256_file(BUNDLED_MODEL / manifest.file) == manifest.sha256
    assert manifest.classes == ["lung_aca", "lung_n", "lung_scc"]
    assert (BUNDLED_MODEL / manifest.file).stat().st_size < 5 * 1024 * 1024
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


def test_split_parts_are_disjoint_and_the_decision_was_chosen_on_select() -> None:
    m = _manifest()
    select, test = set(m["split"]["select_groups"]), set(m["split"]["test_groups"])
    assert select
    assert test
    assert not select & test
    assert m["split"]["train_groups"] == m["training_data"]["train_groups"]
    d = m["decision"]
    assert "select" in d["chosen_on"]
    assert 0.0 < d["refer_below"] <= 1.0
    assert d["accuracy"] >= d["target_accuracy"]
    assert d["ood_rate"] <= 0.005


def test_test_metrics_declare_intervals_around_the_point_estimates() -> None:
    t = _manifest()["test_metrics"]
    lo, hi = t["ci95"]["accuracy"]
    assert lo <= t["accuracy"] <= hi
    for name, pc in t["per_class"].items():
        lo, hi = t["ci95"]["recall"][name]
        assert lo <= pc["recall"] <= hi


@pytest.mark.slow  # real data, and the same on every Python: not in the other-version matrix
def test_bundled_model_reproduces_declared_test_metrics(lc25000: Path) -> None:
    from export.evaluate import evaluate_part

    declared = _manifest()["test_metrics"]
    report = evaluate_part(BUNDLED_MODEL, lc25000, "test")
    assert report["n"] == declared["n"]
    assert report["groups"] == declared["groups"]
    # the declared figures come from the same ONNX file; allow one borderline image to flip
    assert abs(report["accuracy"] - declared["accuracy"]) <= 1.0 / declared["n"] + 1e-12
    diff = np.abs(np.asarray(report["confusion_matrix"]) - np.asarray(declared["confusion_matrix"]))
    assert diff.sum() <= 2
    assert report["ece"] == pytest.approx(declared["ece"], abs=0.005)
    np.testing.assert_allclose(report["ci95"]["accuracy"], declared["ci95"]["accuracy"], atol=0.005)
    assert report["decision"]["coverage"] == pytest.approx(declared["decision"]["coverage"], abs=0.002)


@pytest.mark.slow  # real data, and the same on every Python: not in the other-version matrix
def test_declared_decision_is_the_one_select_gives(lc25000: Path) -> None:
    from export import data as data_mod
    from export.decision_fit import fit_decision
    from export.evaluate import run_outputs, split_of

    m = _manifest()
    ds = data_mod.scan(lc25000)
    samples = split_of(m, ds).select
    images, labels = data_mod.load_arrays(samples, int(m["input_size"]), None)
    out = run_outputs(BUNDLED_MODEL, np.asarray(images))
    refit = fit_decision(out["probabilities"], labels, out.get("ood_score"), "select")
    assert refit["refer_below"] == pytest.approx(m["decision"]["refer_below"], abs=1e-4)
    assert refit["coverage"] == pytest.approx(m["decision"]["coverage"], abs=0.002)
    if "ood_above" in m["decision"]:
        assert refit["ood_above"] == pytest.approx(m["decision"]["ood_above"], rel=1e-3)

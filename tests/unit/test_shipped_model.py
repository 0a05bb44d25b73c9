"""The bundled model reproduces the validation metrics its manifest declares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.manifest import Manifest, sha256_file
from tests.conftest import BUNDLED_MODEL


def test_bundled_manifest_matches_the_onnx_file() -> None:
    manifest = Manifest.read(BUNDLED_MODEL / "model.json")
    assert sha256_file(BUNDLED_MODEL / manifest.file) == manifest.sha256
    assert manifest.classes == ["lung_aca", "lung_n", "lung_scc"]
    assert (BUNDLED_MODEL / manifest.file).stat().st_size < 5 * 1024 * 1024


def test_bundled_model_reproduces_declared_validation_metrics(lc25000: Path) -> None:
    from export.evaluate import evaluate

    manifest = Manifest.read(BUNDLED_MODEL / "model.json").dump()
    declared = manifest["validation_metrics"]
    report = evaluate(BUNDLED_MODEL / "model.onnx", lc25000, validation_groups_only=True)
    assert report["n"] == declared["n"]
    # Keras (declared) and ONNX Runtime agree to ~1e-7; allow one borderline image to flip.
    assert abs(report["accuracy"] - declared["accuracy"]) <= 1.0 / declared["n"] + 1e-12
    diff = np.abs(np.asarray(report["confusion_matrix"]) - np.asarray(declared["confusion_matrix"]))
    assert diff.sum() <= 2  # at most one image moved between two cells
    assert report["ece"] == pytest.approx(declared["ece"], abs=0.005)

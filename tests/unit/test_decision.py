"""The refer decision's contract: a pure function of probabilities, ood_score, tissue check, thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest

from service.model.decision import (
    ACCEPT,
    LOW_CONFIDENCE,
    OUT_OF_DISTRIBUTION,
    Decision,
    DecisionName,
    Reason,
    Thresholds,
    decide,
    decide_batch,
)
from service.model.manifest import Manifest
from tests.onnx_models import write_model_dir

SURE = [0.01, 0.98, 0.01]
UNSURE = [0.45, 0.10, 0.45]
BOTH = Thresholds(refer_below=0.9, ood_above=40.0)


@pytest.mark.parametrize(
    ("probabilities", "ood_score", "tissue", "thresholds", "expected"),
    [
        pytest.param(SURE, 10.0, True, BOTH, ACCEPT, id="sure, in distribution, tissue"),
        pytest.param(UNSURE, 10.0, True, BOTH, LOW_CONFIDENCE, id="unsure"),
        pytest.param(SURE, 50.0, True, BOTH, OUT_OF_DISTRIBUTION, id="far from the training data"),
        pytest.param(SURE, 10.0, False, BOTH, OUT_OF_DISTRIBUTION, id="not H&E tissue"),
        pytest.param(UNSURE, 50.0, True, BOTH, OUT_OF_DISTRIBUTION, id="ood wins over low confidence"),
        pytest.param(UNSURE, None, False, BOTH, OUT_OF_DISTRIBUTION, id="tissue check wins over low confidence"),
        pytest.param(SURE, None, True, BOTH, ACCEPT, id="a model without ood_score"),
        pytest.param(UNSURE, 99.0, True, Thresholds(), ACCEPT, id="no thresholds: only the tissue check"),
        pytest.param(SURE, 99.0, False, Thresholds(), OUT_OF_DISTRIBUTION, id="no thresholds, not tissue"),
        pytest.param([0.2, 0.9, 0.1], 40.0, True, BOTH, ACCEPT, id="at both thresholds: accept"),
        pytest.param(SURE, float("nan"), True, BOTH, OUT_OF_DISTRIBUTION, id="NaN score is not in distribution"),
        pytest.param([float("nan")] * 3, 1.0, True, BOTH, LOW_CONFIDENCE, id="NaN probabilities are not sure"),
        pytest.param(UNSURE, 10.0, True, Thresholds(refer_below=0.0), ACCEPT, id="refer_below 0 turns it off"),
        pytest.param(SURE, 1e9, True, Thresholds(ood_above=float("inf")), ACCEPT, id="ood_above inf turns it off"),
    ],
)
def test_decide(
    probabilities: list[float], ood_score: float | None, tissue: bool, thresholds: Thresholds, expected: Decision
) -> None:
    assert decide(probabilities, ood_score, tissue, thresholds) == expected


def test_decisions_and_reasons_are_the_bounded_vocabulary() -> None:
    for d in (ACCEPT, LOW_CONFIDENCE, OUT_OF_DISTRIBUTION):
        assert d.decision in get_args(DecisionName)
        assert d.reason is None or d.reason in get_args(Reason)
        assert d.referred == (d.reason is not None)


def _manifest(tmp_path: Path, **overrides: Any) -> Manifest:
    return write_model_dir(tmp_path, **overrides)


def test_thresholds_come_from_the_manifest(tmp_path: Path) -> None:
    m = _manifest(tmp_path, decision={"refer_below": 0.93, "ood_above": 41.7, "coverage": 0.91})
    assert Thresholds.resolve(m, refer_below=None, ood_above=None) == Thresholds(0.93, 41.7)


def test_each_setting_overrides_its_manifest_threshold(tmp_path: Path) -> None:
    m = _manifest(tmp_path, decision={"refer_below": 0.93, "ood_above": 41.7})
    assert Thresholds.resolve(m, refer_below=0.5, ood_above=None) == Thresholds(0.5, 41.7)
    assert Thresholds.resolve(m, refer_below=None, ood_above=12.0) == Thresholds(0.93, 12.0)


def test_a_manifest_without_decision_section_has_no_thresholds(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    assert m.decision is None
    assert "decision" not in m.dump()  # not written back as null
    assert Thresholds.resolve(m, refer_below=None, ood_above=None) == Thresholds(None, None)
    assert Thresholds.resolve(m, refer_below=0.8, ood_above=None) == Thresholds(0.8, None)


def test_decide_batch_runs_the_tissue_check_unless_it_is_off() -> None:
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)  # black: not tissue
    probabilities = np.array([SURE, SURE], dtype=np.float32)
    assert decide_batch(images, probabilities, None, Thresholds()) == [OUT_OF_DISTRIBUTION] * 2
    assert decide_batch(images, probabilities, None, Thresholds(tissue_check=False)) == [ACCEPT] * 2
    scores = np.array([1.0, 99.0], dtype=np.float32)
    off = Thresholds(refer_below=0.9, ood_above=40.0, tissue_check=False)
    assert decide_batch(images, probabilities, scores, off) == [ACCEPT, OUT_OF_DISTRIBUTION]


@pytest.mark.parametrize(
    "thresholds",
    [
        Thresholds(tissue_check=False),
        Thresholds(refer_below=0.9, tissue_check=False),
        Thresholds(ood_above=40.0, tissue_check=False),
        Thresholds(refer_below=0.9, ood_above=40.0, tissue_check=False),
        # Not representable in float32: the comparison must still be decide's, on Python floats.
        Thresholds(refer_below=0.7, ood_above=0.1, tissue_check=False),
    ],
)
def test_decide_batch_decides_every_image_as_decide_does(thresholds: Thresholds) -> None:
    rng = np.random.default_rng(7)
    probabilities = rng.dirichlet([1.0, 1.0, 1.0], size=64).astype(np.float32)
    scores = rng.normal(20.0, 25.0, size=64).astype(np.float32)
    # The edges: the thresholds themselves in float32, non-finite scores and probabilities.
    probabilities[0] = [np.float32(0.7), np.float32(0.2), np.float32(0.1)]
    probabilities[1] = [np.float32(0.9), np.float32(0.05), np.float32(0.05)]
    probabilities[2] = [np.nan, 0.5, 0.5]
    probabilities[3] = [np.inf, 0.0, 0.0]
    scores[:6] = np.array([0.1, 40.0, np.nan, np.inf, -np.inf, 40.000004], dtype=np.float32)
    images = np.zeros((64, 8, 8, 3), dtype=np.uint8)
    for ood in (scores, None):
        expected = [
            decide(probabilities[i], None if ood is None else float(ood[i]), True, thresholds) for i in range(64)
        ]
        assert decide_batch(images, probabilities, ood, thresholds) == expected
    assert decide_batch(images[:0], probabilities[:0], scores[:0], thresholds) == []

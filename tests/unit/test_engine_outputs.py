"""Engine and the model v2 outputs: ood_score is fetched when the manifest lists it, and only then."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.engine import Engine
from service.errors import ModelSourceError
from service.model.manifest import Manifest
from tests.onnx_models import V2_CENTRE, model_bytes, write_model_dir, write_model_v2_dir


def _engine(folder: Path) -> Engine:
    return Engine(folder / "model.onnx", Manifest.read(folder / "model.json"), provider="cpu")


def test_infer_returns_probabilities_and_ood_score(tmp_path: Path) -> None:
    write_model_v2_dir(tmp_path)
    engine = _engine(tmp_path)
    assert engine.manifest.ood_output is not None
    batch = np.zeros((3, 128, 128, 3), dtype=np.uint8)
    batch[0] = np.asarray(V2_CENTRE, dtype=np.uint8)  # the tiny model's centre: distance 0
    out = engine.infer(batch)
    assert out.probabilities.shape == (3, 3)
    assert out.ood_score is not None
    assert out.ood_score.shape == (3,)
    assert out.ood_score.dtype == np.float32
    far = float(np.linalg.norm(V2_CENTRE))  # black images
    np.testing.assert_allclose(out.ood_score, np.array([0.0, far, far]), rtol=1e-5)
    np.testing.assert_array_equal(engine.infer(batch).probabilities, out.probabilities)
    engine.warm_up([1, 2])


def test_a_graph_with_ood_score_that_the_manifest_does_not_list_is_served_without_it(tmp_path: Path) -> None:
    write_model_v2_dir(tmp_path, outputs={"probabilities": "probabilities"})
    engine = _engine(tmp_path)
    assert engine.manifest.ood_output is None
    assert engine.infer(np.zeros((1, 128, 128, 3), dtype=np.uint8)).ood_score is None


def test_a_v1_model_has_no_ood_score(tmp_path: Path) -> None:
    write_model_dir(tmp_path)
    assert _engine(tmp_path).infer(np.zeros((2, 8, 8, 3), dtype=np.uint8)).ood_score is None


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({"probabilities": "probabilities", "ood_score": "distance"}, "ood_score output 'distance'"),
        ({"probabilities": "probabilities", "ood_score": "feature_maps"}, "expected float \\[batch\\]"),
        ({"probabilities": "logits"}, "outputs.probabilities is 'logits'"),
    ],
)
def test_a_manifest_naming_outputs_the_graph_lacks_is_refused(
    tmp_path: Path, outputs: dict[str, str], message: str
) -> None:
    write_model_v2_dir(tmp_path, outputs=outputs)
    with pytest.raises(ModelSourceError, match=message):
        _engine(tmp_path)


def test_v1_graph_with_a_manifest_claiming_ood_score_is_refused(tmp_path: Path) -> None:
    write_model_dir(tmp_path, data=model_bytes(), outputs={"ood_score": "ood_score"})
    with pytest.raises(ModelSourceError, match="ood_score"):
        _engine(tmp_path)

"""The model contract's output roles, as the manifest maps them to graph names."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from service.errors import ExplainUnavailable
from service.model.manifest import Manifest
from service.pathology.gradcam import grad_cam
from tests.onnx_models import manifest_for


def _manifest(**overrides: Any) -> Manifest:
    return Manifest.model_validate(manifest_for(b"model", **overrides))


def test_cam_outputs_follow_the_manifest_mapping() -> None:
    # A graph whose Grad-CAM outputs have other names: the manifest's `outputs` says which.
    manifest = _manifest(outputs={"probabilities": "probabilities", "feature_maps": "fm", "cam_weights": "cw"})
    assert manifest.cam_outputs(["probabilities", "fm", "cw"]) == ("fm", "cw")
    # The role names alone are not in this graph: a mapping that is ignored would find nothing.
    assert manifest.cam_outputs(["probabilities", "feature_maps"]) is None


def test_unmapped_roles_keep_their_own_names() -> None:
    manifest = _manifest()
    assert manifest.cam_outputs(["probabilities", "feature_maps", "cam_weights"]) == ("feature_maps", "cam_weights")
    assert manifest.ood_output is None
    assert manifest.tile_px == 768


def test_tile_source_px_is_read_from_the_manifest() -> None:
    assert _manifest(tile_source_px=512).tile_px == 512
    assert "tile_source_px" not in _manifest().dump()  # absent stays absent


class _Runner:
    """Records which graph outputs Grad-CAM asks for."""

    def __init__(self, manifest: Manifest, outputs: list[str]) -> None:
        self.manifest = manifest
        self.output_names = outputs
        self.asked: list[str] = []

    async def run_outputs(self, batch: NDArray[np.uint8], names: Sequence[str]) -> list[NDArray[np.float32]]:
        self.asked = list(names)
        return [np.ones((1, 2, 2, 4), np.float32), np.ones((1, 4, 3), np.float32)]


def test_grad_cam_fetches_the_mapped_outputs() -> None:
    manifest = _manifest(outputs={"feature_maps": "block4/relu", "cam_weights": "head/grad"})
    runner = _Runner(manifest, ["probabilities", "block4/relu", "head/grad"])
    cam = asyncio.run(grad_cam(runner, np.zeros((8, 8, 3), np.uint8), 1))
    assert runner.asked == ["block4/relu", "head/grad"]
    assert cam.shape == (2, 2)


def test_a_model_without_cam_outputs_cannot_be_explained() -> None:
    runner = _Runner(_manifest(), ["probabilities"])
    with pytest.raises(ExplainUnavailable):
        asyncio.run(grad_cam(runner, np.zeros((8, 8, 3), np.uint8), 0))


def test_the_estimate_block_is_read_and_kept() -> None:
    estimate = {
        "accuracy": 0.97,
        "interval": [0.955, 0.982],
        "recall": {"lung_aca": 0.95, "lung_n": 1.0, "lung_scc": 0.96},
        "method": "5-fold grouped CV, out-of-fold",
        "groups": 611,
        "ece": 0.01,
    }
    manifest = _manifest(estimate=estimate)
    assert manifest.estimate is not None
    assert manifest.estimate.interval == (0.955, 0.982)
    assert manifest.dump()["estimate"]["ece"] == 0.01  # extra keys kept verbatim
    assert "estimate" not in _manifest().dump()

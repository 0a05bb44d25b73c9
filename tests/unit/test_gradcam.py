"""Grad-CAM maths from the contract's outputs (feature_maps, cam_weights), and its pictures."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service.pathology.gradcam import class_activation, normalised, upsampled
from service.pathology.overlay import (
    CLASS_COLOURS,
    LEGEND_HEIGHT,
    TileMark,
    class_colours,
    class_map_overlay,
    heatmap_overlay,
)
from service.pathology.tiles import Tile
from tests.onnx_models import cam_model_bytes


def test_class_activation_is_relu_of_the_weighted_channel_sum() -> None:
    rng = np.random.default_rng(1)
    fmaps = rng.normal(size=(4, 5, 6)).astype(np.float32)
    weights = rng.normal(size=(6, 3)).astype(np.float32)
    for c in range(3):
        expected = np.maximum(sum(weights[k, c] * fmaps[:, :, k] for k in range(6)), 0)
        np.testing.assert_allclose(class_activation(fmaps, weights, c), expected, rtol=1e-5, atol=1e-6)


def test_class_activation_refuses_shapes_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        class_activation(np.zeros((4, 4, 5)), np.zeros((6, 3)), 0)
    with pytest.raises(ValueError, match="outside"):
        class_activation(np.zeros((4, 4, 6)), np.zeros((6, 3)), 3)


def test_normalised_divides_by_the_peak_and_keeps_an_empty_map_empty() -> None:
    np.testing.assert_allclose(normalised(np.array([[0.0, 2.0], [1.0, 4.0]])), [[0, 0.5], [0.25, 1]])
    assert not normalised(np.zeros((3, 3))).any()


def test_upsampled_keeps_a_constant_map_and_the_orientation() -> None:
    np.testing.assert_allclose(upsampled(np.full((4, 4), 0.5), 32, 16), np.full((16, 32), 0.5), atol=1e-6)
    ramp = upsampled(np.array([[0.0, 1.0]], dtype=np.float32), 64, 8)
    assert ramp.shape == (8, 64)
    assert ramp[0, 0] < ramp[0, 32] < ramp[0, 63]


def test_onnx_contract_outputs_give_a_map_that_follows_the_image() -> None:
    """On the tiny contract model, Grad-CAM from ORT outputs equals the formula, per image."""
    session = ort.InferenceSession(cam_model_bytes(32), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    images[1, :, :16] = 255  # a bright half changes where the evidence lies
    _, fmaps, weights = session.run(["probabilities", "feature_maps", "cam_weights"], {"image": images})
    maps = [class_activation(fmaps[n], weights[n], 0) for n in range(2)]
    assert maps[0].shape == (16, 16)
    assert not np.allclose(maps[0], maps[1])


def test_the_hottest_pixels_are_tinted_viridis_yellow() -> None:
    # Black under a full heat of 1: what shows is viridis' top colour (253, 231, 37) at 60% opacity.
    out = heatmap_overlay(np.zeros((1, 1, 3), dtype=np.uint8), np.ones((1, 1), dtype=np.float32))
    assert tuple(out[0, 0]) == (152, 139, 22)


def test_heatmap_overlay_leaves_cold_pixels_untouched_and_tints_hot_ones() -> None:
    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[0, 0] = 1.0
    out = heatmap_overlay(image, heat)
    assert (out[1:, 1:] == 100).all()
    assert out[0, 0, 0] > 100
    assert out[0, 0, 2] < 100
    with pytest.raises(ValueError, match="does not match"):
        heatmap_overlay(image, np.zeros((4, 4)))


def test_class_map_colours_tiles_by_class_and_hatches_referrals() -> None:
    thumb = Image.new("RGB", (200, 100), (255, 255, 255))
    colours = class_colours(["lung_aca", "lung_n", "lung_scc"])
    marks = [
        TileMark(Tile(0, 0, 768, 768), "lung_n", refer=False),
        TileMark(Tile(768, 0, 768, 768), "lung_aca", refer=True),
    ]
    out = np.asarray(class_map_overlay(thumb, (1536, 768), marks, colours))
    assert out.shape == (100 + LEGEND_HEIGHT, 200, 3)
    inside_n = out[50, 30].astype(int)
    assert inside_n[2] > inside_n[0]  # sky blue tint on white
    hatched = out[5:95, 105:195].reshape(-1, 3)
    assert (hatched.max(axis=1) < 80).any()  # dark hatch lines over the referred tile
    tinted = out[50, 150].astype(int)
    assert tinted[0] > tinted[2] or (tinted < 80).all()


def test_class_colours_are_distinct_for_unknown_classes_too() -> None:
    colours = class_colours(["lung_aca", "a", "b", "c"])
    assert colours["lung_aca"] == CLASS_COLOURS["lung_aca"]
    assert len(set(colours.values())) == 4

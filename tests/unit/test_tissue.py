"""The image-level tissue / H&E check (service.model.tissue) on images with known answers."""

from __future__ import annotations

import math
from dataclasses import astuple, replace
from pathlib import Path

import numpy as np
import pytest

from service.model.preprocess import load_image
from service.model.tissue import (
    _LIKELIHOOD_BINS,
    _LIKELIHOOD_ROWS,
    _LOG_DENSITY,
    LIMITS,
    Failure,
    check,
    check_batch,
    judge,
    measure_batch,
)
from tests.ood_images import encode, he_like_tile

S = 128


def _solid(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (S, S, 3)).copy()


def test_real_tiles_pass(real_images: list[Path]) -> None:
    for path in real_images:
        result = check(load_image(path.read_bytes(), S))
        assert result.plausible, (path.name, result)


def test_full_size_originals_pass_through_the_draft_decode(lc25000_768: Path) -> None:
    # 768 px LC25000 originals, as a client would send them (JPEG draft-mode downscaling).
    paths = sorted(lc25000_768.glob("*/*.jp*g"))
    assert paths
    for path in paths:
        result = check(load_image(path.read_bytes(), S))
        assert result.plausible, (path.name, result)


def test_synthetic_he_like_tile_passes() -> None:
    assert check(load_image(encode(he_like_tile(0)), S)).plausible


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        pytest.param(_solid((255, 255, 255)), Failure.BACKGROUND, id="white glass"),
        pytest.param(_solid((230, 130, 200)), Failure.FLAT, id="solid eosin pink"),
        pytest.param(_solid((128, 128, 128)), Failure.GREYSCALE, id="solid grey"),
        pytest.param(_solid((0, 0, 0)), Failure.DARK, id="black"),
        pytest.param(_solid((150, 100, 50)), Failure.STAIN_BROWN, id="brown"),
        pytest.param(_solid((40, 90, 200)), Failure.STAIN_BLUE_GREEN, id="blue"),
        pytest.param(_solid((230, 40, 40)), Failure.STAIN_RED, id="red"),
        pytest.param(
            np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8), Failure.NOISE, id="uniform noise"
        ),
    ],
)
def test_each_limit_catches_its_kind_of_image(image: np.ndarray, expected: Failure) -> None:
    result = check(image)
    assert expected in result.failures
    assert not result.plausible


def test_glass_only_has_no_colour_measures_and_fails_on_background() -> None:
    (m,) = measure_batch(_solid((245, 243, 247))[None])
    assert m.background == 1.0
    assert math.isnan(m.chroma)
    assert math.isnan(m.blue_over_green)
    assert math.isnan(m.likelihood)
    assert judge(m) == (Failure.BACKGROUND, Failure.FLAT)


def test_a_batch_gives_the_same_answers_as_one_image_at_a_time() -> None:
    images = np.stack(
        [load_image(encode(he_like_tile(i)), S) for i in range(3)] + [_solid((255, 255, 255)), _solid((9, 9, 9))]
    )
    together = check_batch(images)
    alone = [check(image) for image in images]
    assert [c.failures for c in together] == [c.failures for c in alone]
    np.testing.assert_allclose(
        [astuple(c.measures) for c in together], [astuple(c.measures) for c in alone], rtol=1e-6, equal_nan=True
    )


def test_likelihood_table_is_a_density_over_the_chromaticity_plane() -> None:
    assert len(_LIKELIHOOD_ROWS) == _LIKELIHOOD_BINS
    assert all(len(row) == _LIKELIHOOD_BINS for row in _LIKELIHOOD_ROWS)
    # Shares quantised to half decades: their sum is a density's up to that rounding.
    assert 0.5 < float((10.0 ** _LOG_DENSITY.astype(np.float64)).sum()) < 2.0
    # Optical-density chromaticities sum to at most 1: r + b > 1 is impossible, so never seen.
    r, b = np.divmod(np.arange(_LIKELIHOOD_BINS**2), _LIKELIHOOD_BINS)
    assert (_LOG_DENSITY[(r + b) / _LIKELIHOOD_BINS > 1.1] == _LOG_DENSITY.min()).all()


@pytest.mark.parametrize(("order", "name"), [((1, 0, 2), "GRB"), ((0, 2, 1), "RBG")])
def test_swapped_channels_are_unlikely_colours(order: tuple[int, int, int], name: str) -> None:
    tile = load_image(encode(he_like_tile(0)), S)
    (kept,) = measure_batch(tile[None])
    swapped = check(np.ascontiguousarray(tile[..., order]))
    assert kept.likelihood > LIMITS.min_likelihood
    assert swapped.measures.likelihood < LIMITS.min_likelihood - 1.0, name
    assert Failure.UNLIKELY_COLOURS in swapped.failures


def test_likelihood_limit_is_judged_alone() -> None:
    (m,) = measure_batch(load_image(encode(he_like_tile(1)), S)[None])
    assert judge(m) == ()
    assert judge(replace(m, likelihood=LIMITS.min_likelihood - 0.01)) == (Failure.UNLIKELY_COLOURS,)
    assert judge(replace(m, likelihood=float("nan"))) == ()


def test_limits_are_one_sided_and_consistent() -> None:
    assert 0.0 < LIMITS.max_background < 1.0
    assert LIMITS.min_red_over_green < LIMITS.max_red_over_green
    assert LIMITS.min_texture > 0.0
    assert LIMITS.max_roughness < 1.0


@pytest.mark.parametrize(
    "bad", [np.zeros((S, S, 3), np.uint8), np.zeros((1, S, S, 4), np.uint8), np.zeros((1, S, S, 3))]
)
def test_measure_batch_refuses_other_shapes_and_types(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        measure_batch(bad)

"""Is this plausibly an H&E tissue tile? A cheap image-level check, run on the decoded input.

The model labels anything it is given; this catches the gross cases (blank slides, photographs,
documents, other stains, noise, flat colours) with numpy only, from seven features of the uint8
(S, S, 3) array the model sees. Every limit in `LIMITS` was fitted on the train-group tiles so
each flags at most ~0.05% of real tiles. The features, the fit and the figures: docs/decision.md.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

# Optical density (log10) of each uint8 intensity, looked up instead of computed per pixel.
_OD: Final = (-np.log10((np.arange(256, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)
# A pixel whose R+G+B optical density is below this is background (glass, empty lumen).
TISSUE_OD: Final = 0.3
# Texture uses every second pixel in each direction, colour statistics every fourth: at 128 px
# that is ~4,000 and ~1,000 pixels per tile, plenty for shares and means, at a fraction of the work.
_STRIDE: Final = 2
_COLOUR_STRIDE: Final = 4
# Fewer tissue pixels than this share of the (subsampled) image: colour ratios are not measured.
_MIN_TISSUE_SHARE: Final = 0.02

# The H&E palette, in optical-density chromaticity: row i holds pixels with OD_R / OD_total in
# [i/20, (i+1)/20), column j those with OD_B / OD_total in [j/20, (j+1)/20). "#" marks the bins that
# together hold 99.9% of the tissue pixels of the train-group tiles (the rest of the plane is other
# dyes: blue/green collagen stains, hue-shifted or inverted images, and so on).
_PALETTE_BINS: Final = 20
_PALETTE_ROWS: Final = (
    "....####............",
    "...#########........",
    "..##########........",
    "###########.........",
    "##########..........",
    "########............",
    "########............",
    "#######.............",
    "####................",
    "###.................",
    "###.................",
    "#...................",
    *(["." * 20] * 8),
)
_PALETTE: Final = np.array([[c == "#" for c in row] for row in _PALETTE_ROWS], dtype=bool).ravel()

# How likely each optical-density chromaticity is in H&E, finer than the palette: row i holds
# OD_R / OD_total in [i/32, (i+1)/32), column j OD_B / OD_total in [j/32, (j+1)/32); each character
# (base 36) is -2 log10 of the share of train-group tissue pixels in that bin (every tile weighted
# equally), floored at 1e-7 ("e"). A tile's `likelihood` is the mean over its tissue pixels: swapped
# channels and rotated hues move the haematoxylin and eosin pixels to chromaticities H&E rarely
# makes, even where the tile's mean colour stays H&E-like.
_LIKELIHOOD_BINS: Final = 32
_LIKELIHOOD_ROWS: Final = (
    "eeeecb98878899aaacceeeeeeeeeeeee",
    "eedba977666788999abbeeeeeeeeeeee",
    "deba9866566777888888ceeeeeeeeeee",
    "cba98765555667777669eeeeeeeeeeee",
    "ba98765555556667668beeeeeeeeeeee",
    "988775444556666678beeeeeeeeeeeee",
    "7777654445567768abdeeeeeeeeeeeee",
    "665665444566679aceeeeeeeeeeeeeee",
    "55455444456579bceeeeeeeeeeeeeeee",
    "5434544455558beeeeeeeeeeeeeeeeee",
    "4333455556569deeeeeeeeeeeeeeeeee",
    "432245666558beeeeeeeeeeeeeeeeeee",
    "43234678767aeeeeeeeeeeeeeeeeeeee",
    "4334679989adeeeeeeeeeeeeeeeeeeee",
    "444579abbbdeeeeeeeeeeeeeeeeeeeee",
    "55568accceeeeeeeeeeeeeeeeeeeeeee",
    "65678addeeeeeeeeeeeeeeeeeeeeeeee",
    "7779acdeeeeeeeeeeeeeeeeeeeeeeeee",
    "89abcddeeeeeeeeeeeeeeeeeeeeeeeee",
    "bbcdeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    "deeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
)
_LOG_DENSITY: Final = np.array(
    [-int(c, 36) / 2.0 for row in _LIKELIHOOD_ROWS for c in row], dtype=np.float32
)  # log10 share per bin


class Failure(enum.StrEnum):
    """Why an image is not a plausible H&E tile (one of each limit below)."""

    BACKGROUND = "background"  # mostly empty glass / white
    GREYSCALE = "greyscale"  # tissue pixels without colour
    STAIN_BROWN = "stain_brown"  # blue density too high for H&E: DAB, skin, yellow
    STAIN_BLUE_GREEN = "stain_blue_green"  # red density too high: blue or green dyes
    STAIN_RED = "stain_red"  # red density too low: red-only, no haematoxylin
    OFF_PALETTE = "off_palette"  # too many pixels in colours H&E does not make
    FLAT = "flat"  # no texture: a solid colour or a gradient
    NOISE = "noise"  # texture without structure: pixel noise
    DARK = "dark"  # darker than any stained tile: black, over-exposed dyes
    UNLIKELY_COLOURS = "unlikely_colours"  # tissue colours H&E rarely makes: swapped channels, hue shifts


@dataclass(frozen=True)
class TissueLimits:
    max_background: float
    min_chroma: float
    max_blue_over_green: float
    max_red_over_green: float
    min_red_over_green: float
    max_off_palette: float
    min_texture: float
    max_roughness: float
    max_mean_density: float
    min_likelihood: float


# Fitted on LC25000 train-group tiles (see the module docstring and docs/model/ood.md).
LIMITS: Final = TissueLimits(
    max_background=0.85,
    min_chroma=31.0,
    max_blue_over_green=0.90,
    max_red_over_green=1.00,
    min_red_over_green=0.25,
    max_off_palette=0.08,
    min_texture=4.5,
    max_roughness=0.75,
    max_mean_density=1.18,
    min_likelihood=-3.01,
)


@dataclass(frozen=True)
class TissueMeasures:
    """The features of one image; NaN where there is too little tissue to measure them."""

    background: float
    chroma: float
    blue_over_green: float
    red_over_green: float
    off_palette: float
    texture: float
    roughness: float
    mean_density: float
    likelihood: float


@dataclass(frozen=True)
class TissueCheck:
    measures: TissueMeasures
    failures: tuple[Failure, ...]

    @property
    def plausible(self) -> bool:
        return not self.failures


def measure_batch(images: NDArray[np.uint8]) -> list[TissueMeasures]:
    """The features of each image of a uint8 (N, S, S, 3) batch, vectorised over the batch."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, S, S, 3), got {images.dtype} {images.shape}")
    n = images.shape[0]
    small = images[:, ::_STRIDE, ::_STRIDE]
    sparse = images[:, ::_COLOUR_STRIDE, ::_COLOUR_STRIDE]  # colour shares and means need fewer pixels
    od = _OD[sparse]  # (N, h, w, 3)
    # Channel by channel: numpy reduces a length-3 last axis several times slower.
    total = od[..., 0] + od[..., 1] + od[..., 2]
    tissue = total >= TISSUE_OD
    pixels = tissue.shape[1] * tissue.shape[2]
    counts = tissue.sum(axis=(1, 2))
    background = 1.0 - counts / pixels

    od_sums = np.einsum("nhwc,nhw->nc", od, tissue.astype(np.float32))  # per-channel density of tissue
    r8, g8, b8 = sparse[..., 0], sparse[..., 1], sparse[..., 2]
    spread = np.maximum(np.maximum(r8, g8), b8) - np.minimum(np.minimum(r8, g8), b8)  # uint8, no overflow
    chroma_sum = np.where(tissue, spread, 0).sum(axis=(1, 2), dtype=np.float64)

    # Each tissue pixel's bin in the palette plane (background pixels: any bin, masked out below).
    scale = _PALETTE_BINS / np.maximum(total, TISSUE_OD)
    row = np.minimum((od[..., 0] * scale).astype(np.intp), _PALETTE_BINS - 1)
    col = np.minimum((od[..., 2] * scale).astype(np.intp), _PALETTE_BINS - 1)
    off_palette = (tissue & ~_PALETTE[row * _PALETTE_BINS + col]).sum(axis=(1, 2))
    fine = scale * np.float32(_LIKELIHOOD_BINS / _PALETTE_BINS)
    row = np.minimum((od[..., 0] * fine).astype(np.intp), _LIKELIHOOD_BINS - 1)
    col = np.minimum((od[..., 2] * fine).astype(np.intp), _LIKELIHOOD_BINS - 1)
    log_density = np.where(tissue, _LOG_DENSITY[row * _LIKELIHOOD_BINS + col], 0.0).sum(axis=(1, 2))

    # Integer BT.601 luma (77, 150, 29) / 256: several times cheaper than a float matmul.
    wide = small.astype(np.uint16)  # 255 * 256 fits; uint8 arithmetic would wrap
    luma = 77 * wide[..., 0] + 150 * wide[..., 1] + 29 * wide[..., 2]
    grey = luma.astype(np.float32) * np.float32(1.0 / 256.0)  # (N, S/2, S/2)
    d1 = _neighbour_difference(grey, 1)
    d3 = _neighbour_difference(grey, 3)

    out: list[TissueMeasures] = []
    for i in range(n):
        enough = counts[i] >= _MIN_TISSUE_SHARE * pixels
        r, g, b = (float(v) for v in od_sums[i])
        nan = float("nan")
        out.append(
            TissueMeasures(
                background=float(background[i]),
                chroma=float(chroma_sum[i] / counts[i]) if enough else nan,
                blue_over_green=b / g if enough and g > 0 else nan,
                red_over_green=r / g if enough and g > 0 else nan,
                off_palette=float(off_palette[i] / counts[i]) if enough else nan,
                texture=float(d1[i]),
                roughness=float(d1[i] / d3[i]) if d3[i] > 0 else 0.0,
                mean_density=(r + g + b) / float(counts[i]) if enough else nan,
                likelihood=float(log_density[i] / counts[i]) if enough else nan,
            )
        )
    return out


def _neighbour_difference(grey: NDArray[np.float32], lag: int) -> NDArray[np.float32]:
    """Mean absolute difference between pixels `lag` apart, horizontally and vertically, per image."""
    dy = np.abs(grey[:, lag:, :] - grey[:, :-lag, :]).mean(axis=(1, 2))
    dx = np.abs(grey[:, :, lag:] - grey[:, :, :-lag]).mean(axis=(1, 2))
    return np.asarray((dx + dy) / 2.0, dtype=np.float32)


def judge(m: TissueMeasures, limits: TissueLimits = LIMITS) -> tuple[Failure, ...]:
    """Every limit `m` breaks (empty: a plausible H&E tile). NaN features (no tissue) pass:
    the background limit already speaks for those images."""
    failures: list[Failure] = []
    if m.background > limits.max_background:
        failures.append(Failure.BACKGROUND)
    if m.chroma < limits.min_chroma:
        failures.append(Failure.GREYSCALE)
    if m.blue_over_green > limits.max_blue_over_green:
        failures.append(Failure.STAIN_BROWN)
    if m.red_over_green > limits.max_red_over_green:
        failures.append(Failure.STAIN_BLUE_GREEN)
    if m.red_over_green < limits.min_red_over_green:
        failures.append(Failure.STAIN_RED)
    if m.off_palette > limits.max_off_palette:
        failures.append(Failure.OFF_PALETTE)
    if m.texture < limits.min_texture:
        failures.append(Failure.FLAT)
    if m.roughness > limits.max_roughness:
        failures.append(Failure.NOISE)
    if m.mean_density > limits.max_mean_density:
        failures.append(Failure.DARK)
    if m.likelihood < limits.min_likelihood:
        failures.append(Failure.UNLIKELY_COLOURS)
    return tuple(failures)


def check_batch(images: NDArray[np.uint8], limits: TissueLimits = LIMITS) -> list[TissueCheck]:
    return [TissueCheck(m, judge(m, limits)) for m in measure_batch(images)]


def check(image: NDArray[np.uint8], limits: TissueLimits = LIMITS) -> TissueCheck:
    """One uint8 (S, S, 3) image."""
    return check_batch(image[None], limits)[0]

"""PNG pictures for people: a Grad-CAM heatmap over an image, and a class map over a large image.

Pure rendering (arrays in, PNG bytes out); the colours are chosen for colour-blind readers
(viridis for the heatmap, Okabe-Ito hues for the classes) and kept in one place, so the page
draws its legend from the same values the API returns.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from service.pathology.tiles import Tile

# viridis at 0, 1/4, 1/2, 3/4, 1: perceptually uniform and readable without red/green vision.
_VIRIDIS: Final = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
# Okabe-Ito: distinguishable with every common colour-vision deficiency.
CLASS_COLOURS: Final[dict[str, str]] = {"lung_aca": "#E69F00", "lung_n": "#56B4E9", "lung_scc": "#CC79A7"}
_SPARE_COLOURS: Final = ("#009E73", "#F0E442", "#0072B2", "#D55E00", "#999999")
REFER_COLOUR: Final = "#222222"

# Strongest heatmap opacity; weak activations fade to the image so the tissue stays visible.
HEAT_ALPHA: Final = 0.6
CLASS_ALPHA: Final = 0.35
LEGEND_HEIGHT: Final = 30


def class_colours(classes: Sequence[str]) -> dict[str, str]:
    """A colour per class: the fixed ones for the LC25000 classes, spare ones for any other."""
    spare = iter(_SPARE_COLOURS * (len(classes) // len(_SPARE_COLOURS) + 1))
    return {c: CLASS_COLOURS[c] if c in CLASS_COLOURS else next(spare) for c in classes}


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # These PNGs are photographs: zlib level 1 with run-length matching after PNG's filters took
    # 38 ms for a 384 px overlay (188 kB) where the default level 6 takes several times longer.
    image.save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buf.getvalue()


def _viridis_lut() -> NDArray[np.uint8]:
    stops = np.linspace(0.0, 1.0, len(_VIRIDIS))
    levels = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(levels, stops, _VIRIDIS[:, ch]) for ch in range(3)], axis=-1)
    out: NDArray[np.uint8] = np.round(lut).astype(np.uint8)
    return out


# 256 colours: indexing a table is ~20x faster than interpolating every pixel.
_HEAT_LUT: Final = _viridis_lut()


def _levels(values: NDArray[np.floating]) -> NDArray[np.intp]:
    v = np.clip(np.nan_to_num(values.astype(np.float32)), 0.0, 1.0)
    out: NDArray[np.intp] = np.rint(v * 255.0).astype(np.intp)
    return out


def heatmap_overlay(image: NDArray[np.uint8], heat: NDArray[np.floating]) -> NDArray[np.uint8]:
    """Blend a [0, 1] heatmap of the image's size over it; opacity grows with the value."""
    if image.shape[:2] != heat.shape:
        raise ValueError(f"heatmap {heat.shape} does not match image {image.shape[:2]}")
    levels = _levels(heat)
    alpha = (np.float32(HEAT_ALPHA / 255.0) * levels.astype(np.float32))[..., None]
    blended = image.astype(np.float32) * (1.0 - alpha) + _HEAT_LUT[levels].astype(np.float32) * alpha
    out: NDArray[np.uint8] = np.rint(blended).astype(np.uint8)
    return out


@dataclass(frozen=True, slots=True)
class TileMark:
    """What the class map shows for one classified tile."""

    tile: Tile
    label: str
    refer: bool


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def class_map_overlay(
    thumbnail: Image.Image,
    source_size: tuple[int, int],
    marks: Sequence[TileMark],
    colours: Mapping[str, str],
) -> Image.Image:
    """Tiles coloured by class over a thumbnail of the image, referred tiles hatched, a legend below.

    Tiles are given in source pixels and scaled to the thumbnail. Background tiles have no
    mark, so the image shows through. The result is `LEGEND_HEIGHT` px taller than the thumbnail.
    """
    base = thumbnail.convert("RGB")
    sx = base.width / source_size[0]
    sy = base.height / source_size[1]
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    fill_alpha = round(255 * CLASS_ALPHA)
    # A border in the class colour reads even where the tint is close to the stain.
    border = max(2, round(min(sx, sy) * (marks[0].tile.width if marks else 0) / 28))
    for mark in marks:
        t = mark.tile
        box = (
            round(t.x * sx),
            round(t.y * sy),
            max(round((t.x + t.width) * sx) - 1, round(t.x * sx)),
            max(round((t.y + t.height) * sy) - 1, round(t.y * sy)),
        )
        r, g, b = _rgb(colours.get(mark.label, REFER_COLOUR))
        draw.rectangle(box, fill=(r, g, b, fill_alpha), outline=(r, g, b, 255), width=border)
        if mark.refer:
            _hatch(draw, box)
    mapped = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    return _with_legend(mapped, colours)


def _with_legend(image: Image.Image, colours: Mapping[str, str]) -> Image.Image:
    """The class colours (and the referral hatch) in a strip under the map, so the PNG stands alone."""
    out = Image.new("RGB", (image.width, image.height + LEGEND_HEIGHT), (255, 255, 255))
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=14)
    x, y = 8, image.height + 7
    entries = [*colours.items(), ("refer", REFER_COLOUR)]
    for name, colour in entries:
        box = (x, y, x + 16, y + 16)
        if name == "refer":
            draw.rectangle(box, fill=(255, 255, 255))
            _hatch(draw, box)
        else:
            draw.rectangle(box, fill=_rgb(colour), outline=(40, 40, 40))
        draw.text((x + 22, y - 1), name, fill=(20, 20, 20), font=font)
        x += 22 + round(draw.textlength(name, font=font)) + 18
    return out


def _hatch(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
    """Diagonal lines over a referred tile: 'look at this one yourself', in any colour vision."""
    x0, y0, x1, y1 = box
    step = max(4, (x1 - x0) // 6)
    r, g, b = _rgb(REFER_COLOUR)
    for offset in range(-(y1 - y0), x1 - x0, step):
        # The segment of the line x - x0 - offset = y - y0 inside the box.
        start_y = max(y0, y0 - offset)
        end_y = min(y1, y0 + (x1 - x0) - offset)
        if start_y < end_y:
            draw.line(
                [(x0 + offset + (start_y - y0), start_y), (x0 + offset + (end_y - y0), end_y)],
                fill=(r, g, b, 230),
                width=2,
            )
    draw.rectangle(box, outline=(r, g, b, 255), width=2)

"""A set of out-of-distribution images, built in code: what a lung H&E classifier must refer.

Nothing here is committed as data. Photographs come from files that ship inside installed
wheels (scikit-image's `skimage/data/*`, matplotlib's `mpl-data/sample_data/*`); everything
else is drawn with numpy and Pillow from fixed seeds, or re-stained from real H&E tiles when
`../shared/data` is present (`restained`, which needs a few real tiles).

Every image is returned *encoded* (PNG, or JPEG for photographs), so it goes through the
service's real decode and resize path exactly as an upload does.

    from tests.ood_images import ood_images
    for item in ood_images(): ...   # OodImage(category, name, data)
"""

from __future__ import annotations

import importlib.resources
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFilter, ImageFont

Array = NDArray[np.uint8]

SIZE: Final = 256  # side of the synthetic images (the service squashes everything to its input size)

# Categories, in report order.
PHOTOGRAPH: Final = "photograph"
BLANK: Final = "blank or background-only slide"
OTHER_STAIN: Final = "other stain"
NOISE: Final = "noise"
TEXT: Final = "text or document"
FLAT: Final = "solid colour or gradient"
MISCOLOURED: Final = "wrong colour handling"
CATEGORIES: Final = (PHOTOGRAPH, BLANK, OTHER_STAIN, MISCOLOURED, NOISE, TEXT, FLAT)


@dataclass(frozen=True)
class OodImage:
    category: str
    name: str
    data: bytes  # an encoded image file, as a client would upload it

    @property
    def id(self) -> str:
        return f"{self.category}: {self.name}"


def encode(pixels: Array | Image.Image, fmt: str = "PNG") -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# --- photographs shipped inside installed packages -------------------------------------------

# scikit-image's data files that are inside the wheel (the others are downloaded on first use,
# which this project never does). Licences: see skimage/data/README.txt (public domain / CC0 / CC-BY).
SKIMAGE_PHOTOS: Final = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "color.png",
    "phantom.png",
    "camera.png",
    "coins.png",
    "moon.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "cell.png",
    "horse.png",
    "logo.png",
)
MATPLOTLIB_PHOTOS: Final = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")


def _skimage_file(name: str) -> bytes:
    return (importlib.resources.files("skimage") / "data" / name).read_bytes()


def _matplotlib_file(name: str) -> bytes:
    import matplotlib

    return (Path(matplotlib.get_data_path()) / "sample_data" / name).read_bytes()


def photographs() -> Iterator[OodImage]:
    for name in SKIMAGE_PHOTOS:
        yield OodImage(PHOTOGRAPH, f"skimage {name}", _skimage_file(name))
    for name in MATPLOTLIB_PHOTOS:
        yield OodImage(PHOTOGRAPH, f"matplotlib {name}", _matplotlib_file(name))
    # A crop, as a client sending a patch of a photograph would (a face fills the frame).
    with Image.open(io.BytesIO(_skimage_file("astronaut.png"))) as img:
        yield OodImage(PHOTOGRAPH, "astronaut face crop", encode(img.convert("RGB").crop((150, 20, 350, 220)), "JPEG"))
    with Image.open(io.BytesIO(_matplotlib_file("grace_hopper.jpg"))) as img:
        yield OodImage(
            PHOTOGRAPH, "grace hopper face crop", encode(img.convert("RGB").crop((150, 80, 400, 330)), "JPEG")
        )


# --- blank and background-only slides ---------------------------------------------------------


def _solid(rgb: Sequence[int], size: int = SIZE) -> Array:
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (size, size, 3)).copy()


def _jitter(image: Array, sd: float, seed: int) -> Array:
    """Sensor noise of a real scan, so a blank slide is not mathematically flat."""
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0.0, sd, image.shape), 0, 255).astype(np.uint8)


def blank_slides() -> Iterator[OodImage]:
    yield OodImage(BLANK, "white", encode(_solid((255, 255, 255))))
    yield OodImage(BLANK, "off-white with scanner noise", encode(_jitter(_solid((244, 241, 238)), 2.0, 1)))
    yield OodImage(
        BLANK, "lavender glass (LC25000 background colour)", encode(_jitter(_solid((236, 228, 240)), 2.5, 2))
    )
    yield OodImage(BLANK, "light grey", encode(_jitter(_solid((214, 214, 214)), 1.5, 3)))

    rng = np.random.default_rng(4)
    dusty = Image.fromarray(_jitter(_solid((243, 240, 242)), 2.0, 5))
    draw = ImageDraw.Draw(dusty)
    for _ in range(40):  # dust and debris: small dark specks and a few fibres
        x, y = rng.integers(0, SIZE, 2)
        r = int(rng.integers(1, 4))
        shade = int(rng.integers(40, 160))
        draw.ellipse((int(x) - r, int(y) - r, int(x) + r, int(y) + r), fill=(shade, shade - 10, shade + 5))
    for _ in range(3):
        pts = [tuple(int(v) for v in rng.integers(0, SIZE, 2)) for _ in range(4)]
        draw.line(pts, fill=(90, 80, 100), width=1)
    yield OodImage(BLANK, "background with dust and fibres", encode(dusty))

    # The edge of a coverslip or a pen mark on empty glass.
    edge = _jitter(_solid((242, 238, 240)), 2.0, 6)
    edge[:, :18] = (60, 60, 70)
    yield OodImage(BLANK, "background with a coverslip edge", encode(edge))
    pen = Image.fromarray(_jitter(_solid((242, 238, 240)), 2.0, 7))
    ImageDraw.Draw(pen).line([(20, 200), (120, 60), (230, 90)], fill=(30, 60, 170), width=9)
    yield OodImage(BLANK, "background with a blue pen mark", encode(pen))
    # Out of focus: the blur of a scanner focused on nothing.
    blurred = Image.fromarray(_jitter(_solid((238, 226, 236)), 25.0, 8)).filter(ImageFilter.GaussianBlur(12))
    yield OodImage(BLANK, "out-of-focus background", encode(blurred))


# --- noise ------------------------------------------------------------------------------------


def noise() -> Iterator[OodImage]:
    rng = np.random.default_rng(10)
    shape = (SIZE, SIZE, 3)
    yield OodImage(NOISE, "uniform RGB", encode(rng.integers(0, 256, shape, dtype=np.uint8)))
    yield OodImage(
        NOISE, "uniform RGB, 768 px JPEG", encode(rng.integers(0, 256, (768, 768, 3), dtype=np.uint8), "JPEG")
    )
    yield OodImage(
        NOISE, "gaussian RGB (mean 128, sd 50)", encode(np.clip(rng.normal(128, 50, shape), 0, 255).astype(np.uint8))
    )
    grey = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    yield OodImage(NOISE, "uniform grey", encode(np.stack([grey] * 3, axis=-1)))
    sp = np.full((SIZE, SIZE), 128, dtype=np.uint8)
    u = rng.random((SIZE, SIZE))
    sp[u < 0.1] = 0
    sp[u > 0.9] = 255
    yield OodImage(NOISE, "salt and pepper on grey", encode(np.stack([sp] * 3, axis=-1)))
    # Noise in H&E colours: every pixel a plausible stain colour, but no structure at all.
    pink = np.clip(rng.normal((200, 120, 190), 35, shape), 0, 255).astype(np.uint8)
    yield OodImage(NOISE, "gaussian noise in H&E colours", encode(pink))
    bits = rng.integers(0, 2, (SIZE, SIZE, 3), dtype=np.uint8) * 255
    yield OodImage(NOISE, "binary RGB", encode(bits))


# --- text and documents -------------------------------------------------------------------------


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ImageFont.truetype(str(path), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


_LOREM: Final = (
    "Specimen: right upper lobe, wedge resection.",
    "Microscopic description: sections show lung",
    "parenchyma with a well-circumscribed nodule.",
    "Margins are free of tumour (> 5 mm).",
    "Lymph nodes: 0/7. pT1b pN0. Signed out.",
    "Patient ID 0000000  Accession S26-00000",
)


def text_images() -> Iterator[OodImage]:
    doc = Image.new("RGB", (600, 800), (255, 255, 255))
    draw = ImageDraw.Draw(doc)
    font = _font(18)
    for i in range(30):
        draw.text((30, 20 + i * 25), _LOREM[i % len(_LOREM)], fill=(0, 0, 0), font=font)
    yield OodImage(TEXT, "pathology report page", encode(doc))
    yield OodImage(TEXT, "pathology report, crop of a few lines", encode(doc.crop((20, 10, 276, 266)), "JPEG"))

    label = Image.new("RGB", (SIZE, SIZE), (250, 250, 245))
    d = ImageDraw.Draw(label)
    d.text((10, 40), "S26-12345 A1", fill=(0, 0, 0), font=_font(32))
    d.text((10, 110), "H&E  LUNG", fill=(20, 20, 20), font=_font(36))
    for x in range(10, 246, 6):  # a barcode
        if (x * 7919) % 3:
            d.rectangle((x, 180, x + 2, 240), fill=(0, 0, 0))
    yield OodImage(TEXT, "slide label with barcode", encode(label))

    coloured = Image.new("RGB", (SIZE, SIZE), (120, 40, 140))
    dc = ImageDraw.Draw(coloured)
    for i in range(8):
        dc.text((8, 8 + i * 31), "lung_aca 0.99", fill=(255, 200, 230), font=_font(26))
    yield OodImage(TEXT, "pink text on purple", encode(coloured))

    table = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    dt = ImageDraw.Draw(table)
    for i in range(0, SIZE, 32):
        dt.line([(0, i), (SIZE, i)], fill=(0, 0, 0), width=1)
        dt.line([(i, 0), (i, SIZE)], fill=(0, 0, 0), width=1)
    for r in range(8):
        for c in range(8):
            dt.text((c * 32 + 4, r * 32 + 8), f"{(r * 8 + c) % 97}", fill=(0, 0, 120), font=_font(12))
    yield OodImage(TEXT, "spreadsheet grid", encode(table))
    for name in ("page.png", "text.png"):
        yield OodImage(TEXT, f"skimage {name}", _skimage_file(name))


# --- solid colours and gradients ----------------------------------------------------------------

SOLIDS: Final = {
    "black": (0, 0, 0),
    "mid grey": (128, 128, 128),
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 200),
    "yellow": (240, 220, 40),
    "eosin pink": (230, 130, 200),
    "haematoxylin purple": (110, 60, 160),
    "LC25000 mean colour": (190, 140, 200),
}


def flat_images() -> Iterator[OodImage]:
    for name, rgb in SOLIDS.items():
        yield OodImage(FLAT, f"solid {name}", encode(_solid(rgb)))
    t = np.linspace(0.0, 1.0, SIZE)[None, :, None]
    for name, (a, b) in {
        "black to white": ((0, 0, 0), (255, 255, 255)),
        "pink to purple (H&E colours)": ((235, 150, 210), (90, 40, 150)),
        "red to blue": ((230, 20, 20), (20, 20, 230)),
    }.items():
        ramp = (1 - t) * np.asarray(a, float) + t * np.asarray(b, float)
        yield OodImage(FLAT, f"gradient {name}", encode(np.broadcast_to(ramp, (SIZE, SIZE, 3)).astype(np.uint8)))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    rr = np.hypot(yy - SIZE / 2, xx - SIZE / 2) / (SIZE / np.sqrt(2))
    radial = (1 - rr)[..., None] * np.asarray((200, 110, 190), float) + rr[..., None] * 255
    yield OodImage(FLAT, "radial gradient pink to white", encode(radial.astype(np.uint8)))
    checker = ((yy // 32 + xx // 32) % 2).astype(np.uint8)[..., None] * np.asarray((180, 90, 170), np.uint8)
    yield OodImage(FLAT, "checkerboard pink and black", encode((checker + 40).astype(np.uint8)))


# --- other stains -------------------------------------------------------------------------------


def _rgb2hed(rgb: Array) -> NDArray[np.float64]:
    from skimage.color import rgb2hed

    return np.asarray(rgb2hed(rgb), dtype=np.float64)


def _recolour(stains: NDArray[np.float64], vectors: NDArray[np.float64]) -> Array:
    """Beer-Lambert: stain concentrations (h, w, k) times OD vectors (k, 3) -> RGB."""
    od = stains.reshape(-1, stains.shape[-1]) @ vectors
    rgb = 255.0 * np.exp(-np.clip(od, 0.0, None) * np.log(10.0))
    return np.asarray(np.clip(rgb, 0, 255).reshape(*stains.shape[:2], 3), dtype=np.uint8)


# Optical-density colour vectors (rows), normalised: absorbance per R, G, B.
_HAEMATOXYLIN: Final = np.array([0.65, 0.70, 0.29])
_DAB: Final = np.array([0.27, 0.57, 0.78])
_WEIGERT_BLACK: Final = np.array([0.55, 0.58, 0.55])  # iron haematoxylin: near-neutral dark
_SCARLET: Final = np.array([0.05, 0.80, 0.60])  # Biebrich scarlet: red
_ANILINE_BLUE: Final = np.array([0.85, 0.45, 0.10])  # collagen blue (Masson's trichrome)
_LIGHT_GREEN: Final = np.array([0.75, 0.15, 0.65])  # collagen green (Masson-Goldner)


def _unit(v: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(v / np.linalg.norm(v), dtype=np.float64)


def restained(tiles: Sequence[Array]) -> Iterator[OodImage]:
    """Real H&E tiles re-stained as other stains (needs real tiles; uint8 RGB arrays)."""
    from skimage.color import hsv2rgb, rgb2hsv

    for i, tile in enumerate(tiles):
        hed = _rgb2hed(tile)
        h = np.clip(hed[..., 0], 0, None)[..., None]
        e = np.clip(hed[..., 1], 0, None)[..., None]
        # Scale to the OD range of the vectors below (rgb2hed works in log10 OD units).
        h, e = h * 4.0, e * 4.0
        ihc = _recolour(np.concatenate([h * 0.7, e * 2.5], -1), np.stack([_unit(_HAEMATOXYLIN), _unit(_DAB)]))
        yield OodImage(OTHER_STAIN, f"tile {i}: IHC-like (haematoxylin + DAB)", encode(ihc))
        dab_only = _recolour(
            np.concatenate([h * 0.3, (h + e) * 1.0], -1), np.stack([_unit(_HAEMATOXYLIN), _unit(_DAB)])
        )
        yield OodImage(OTHER_STAIN, f"tile {i}: DAB-dominated IHC", encode(dab_only))
        masson = _recolour(
            np.concatenate([h, e * 0.8, np.clip(0.6 - e - h, 0, None) * 0.8], -1),
            np.stack([_unit(_WEIGERT_BLACK), _unit(_SCARLET), _unit(_ANILINE_BLUE)]),
        )
        yield OodImage(OTHER_STAIN, f"tile {i}: Masson trichrome-like (blue collagen)", encode(masson))
        goldner = _recolour(
            np.concatenate([h, e * 0.5, e * 0.9], -1),
            np.stack([_unit(_WEIGERT_BLACK), _unit(_SCARLET), _unit(_LIGHT_GREEN)]),
        )
        yield OodImage(OTHER_STAIN, f"tile {i}: Masson-Goldner-like (green)", encode(goldner))
        grey = np.asarray(Image.fromarray(tile).convert("L").convert("RGB"))
        yield OodImage(OTHER_STAIN, f"tile {i}: greyscale", encode(grey))
        hsv = rgb2hsv(tile)
        for degrees in (90, 180, 270):
            rotated = hsv.copy()
            rotated[..., 0] = (rotated[..., 0] + degrees / 360.0) % 1.0
            out = (np.clip(hsv2rgb(rotated), 0, 1) * 255).astype(np.uint8)
            yield OodImage(OTHER_STAIN, f"tile {i}: hue rotated {degrees} degrees", encode(out))
        yield OodImage(OTHER_STAIN, f"tile {i}: inverted colours", encode(255 - tile))


# Hue rotations across the circle, away from 0 (a 20-degree shift is within the spread of real H&E).
HUE_DEGREES: Final = (40, 60, 120, 150, 210, 240, 300, 320)
_CHANNELS: Final = "RGB"


def miscoloured(tiles: Sequence[Array]) -> Iterator[OodImage]:
    """Real H&E tiles after a colour-handling mistake: channels permuted (an OpenCV BGR array saved
    as RGB, a planar-order mix-up), the hue rotated, saturation inverted, CMYK or YCbCr bytes read
    as RGB. Needs real tiles (uint8 RGB arrays)."""
    from itertools import permutations

    from skimage.color import hsv2rgb, rgb2hsv

    for i, tile in enumerate(tiles):
        for order in permutations(range(3)):
            if order != (0, 1, 2):
                name = "".join(_CHANNELS[c] for c in order)
                yield OodImage(
                    MISCOLOURED, f"tile {i}: channels {name}", encode(np.ascontiguousarray(tile[..., order]))
                )
        # cv2.imwrite of an RGB array: the JPEG holds BGR.
        yield OodImage(
            MISCOLOURED, f"tile {i}: BGR saved as JPEG", encode(np.ascontiguousarray(tile[..., ::-1]), "JPEG")
        )
        hsv = rgb2hsv(tile)
        for degrees in HUE_DEGREES:
            rotated = hsv.copy()
            rotated[..., 0] = (rotated[..., 0] + degrees / 360.0) % 1.0
            out = (np.clip(hsv2rgb(rotated), 0, 1) * 255).astype(np.uint8)
            yield OodImage(MISCOLOURED, f"tile {i}: hue shifted {degrees} degrees", encode(out))
        flipped = hsv.copy()
        flipped[..., 1] = 1.0 - flipped[..., 1]
        out = (np.clip(hsv2rgb(flipped), 0, 1) * 255).astype(np.uint8)
        yield OodImage(MISCOLOURED, f"tile {i}: saturation inverted", encode(out))
        image = Image.fromarray(tile)
        cmyk = np.ascontiguousarray(np.asarray(image.convert("CMYK"))[..., :3])
        yield OodImage(MISCOLOURED, f"tile {i}: CMYK bytes read as RGB", encode(cmyk))
        ycbcr = np.ascontiguousarray(np.asarray(image.convert("YCbCr")))
        yield OodImage(MISCOLOURED, f"tile {i}: YCbCr bytes read as RGB", encode(ycbcr))


def ihc_photographs() -> Iterator[OodImage]:
    """scikit-image's `ihc.png`: a real immunohistochemistry (DAB + haematoxylin) image, and crops."""
    data = _skimage_file("ihc.png")
    yield OodImage(OTHER_STAIN, "skimage ihc.png (real IHC)", data)
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
        for j, box in enumerate([(0, 0, 256, 256), (256, 0, 512, 256), (0, 256, 256, 512), (256, 256, 512, 512)]):
            yield OodImage(OTHER_STAIN, f"skimage ihc.png quarter {j}", encode(rgb.crop(box), "JPEG"))


# --- the whole set --------------------------------------------------------------------------------

Generator = Callable[[], Iterator[OodImage]]
GENERATORS: Final[tuple[Generator, ...]] = (photographs, blank_slides, ihc_photographs, noise, text_images, flat_images)


def ood_images(real_tiles: Sequence[Array] = ()) -> list[OodImage]:
    """Every out-of-distribution image; `real_tiles` adds re-stained versions of those tiles."""
    images = [item for generate in GENERATORS for item in generate()]
    images.extend(restained(real_tiles))
    images.extend(miscoloured(real_tiles))
    names = [i.id for i in images]
    assert len(names) == len(set(names)), "image names must be unique"
    return images


# --- the counterpart: a synthetic image the tissue check accepts ----------------------------------


def he_like_tile(seed: int = 0, size: int = SIZE) -> Array:
    """Pink cytoplasm, purple nuclei, a little glass: passes `service.model.tissue` without real data.

    Only for tests that need an image the tissue check lets through (e.g. with a tiny test model);
    it is not a stand-in for real tissue when judging a model.
    """
    rng = np.random.default_rng(seed)
    base = np.clip(rng.normal(0.0, 1.0, (size // 8, size // 8)), -2, 2)
    field = np.asarray(
        Image.fromarray(((base + 2) * 63).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    )
    t = field.astype(np.float64)[..., None] / 255.0
    pink, lilac = np.array([236.0, 160.0, 210.0]), np.array([200.0, 120.0, 190.0])
    img = Image.fromarray(((1 - t) * pink + t * lilac).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(size // 4):  # glass: a few small lumens
        x, y = (int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(2, size // 24 + 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(242, 236, 244))
    for _ in range(size // 2):  # nuclei
        x, y = (int(v) for v in rng.integers(0, size, 2))
        rx, ry = (int(v) for v in rng.integers(size // 64 + 2, size // 32 + 4, 2))
        shade = int(rng.integers(0, 50))
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=(90 + shade, 50 + shade, 150 + shade))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.uint8)

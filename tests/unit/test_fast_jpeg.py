"""load_image's JPEG fast path (simplejpeg): Pillow's exact pixels, and Pillow's refusals.

`decode_image(..., large_pixels=0)` takes Pillow's path for any file (the decode as it was before
the fast path); the default takes simplejpeg for the common JPEG and says which decoder ran.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.cpus import usable_cpus
from service.errors import InvalidImage
from service.model.preprocess import LARGE_DECODE_PIXELS, Decoded, decode_image
from service.settings import Settings
from tests.conftest import BUNDLED_MODEL
from tests.hostile_files import cut_at, progressive, scan_starts, segments
from tests.images import encode, jpeg_with_declared_size, noise, noise_jpeg

MODEL_SIZE: int = json.loads((BUNDLED_MODEL / "model.json").read_text())["input_size"]
SIZE = 32
TILE_SIDE = 224  # ../shared/data/lc25000-lung's tiles (its README)


def pillow(data: bytes, size: int, **kwargs: Any) -> Decoded:
    """Pillow's path, whatever the file."""
    return decode_image(data, size, large_pixels=0, **kwargs)


def odd_noise(width: int = 501, height: int = 333, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def assert_same_as_pillow(data: bytes, size: int, **kwargs: Any) -> None:
    fast = decode_image(data, size, **kwargs)
    assert fast.decoder == "simplejpeg"
    np.testing.assert_array_equal(fast.pixels, pillow(data, size, **kwargs).pixels)


# --- parity on the real data ----------------------------------------------------------------------


def _problems(path: Path, sizes: tuple[int, ...]) -> list[str]:
    data = path.read_bytes()
    problems: list[str] = []
    for size in sizes:
        fast, slow = decode_image(data, size), pillow(data, size)
        if fast.decoder != "simplejpeg":
            problems.append(f"{path.name} @ {size}: decoded by {fast.decoder}")
        if not np.array_equal(fast.pixels, slow.pixels):
            problems.append(f"{path.name} @ {size}: pixels differ from Pillow's")
    return problems


@pytest.mark.slow
def test_every_real_image_decodes_to_pillows_pixels_through_simplejpeg(lc25000: Path, lc25000_768: Path) -> None:
    # Every real image (12,381 files), each read once and decoded once per path and size: no
    # false refusal (the marker walk included), all on the fast path (so all baseline single-scan
    # JPEGs), and bytewise Pillow's array. The 224 px tiles at their own size: no DCT scaling and
    # no resize, so the decoders' arrays themselves are compared, which settles every input size
    # above 112 px (128, 160, 192, 224: none is DCT-scaled from 224) at a third of the cost. The
    # 768 px originals at the model's size, 160, 96, 300 and 400 px: DCT scales 1/4, 1/8, 1/2, none.
    tiles = sorted(lc25000.rglob("*.jpeg"))
    originals = sorted(lc25000_768.rglob("*.jpeg"))
    assert len(tiles) + len(originals) > 12_000
    jobs = [(p, (TILE_SIDE,)) for p in tiles] + [(p, (MODEL_SIZE, 160, 96, 300, 400)) for p in originals]
    # Threads: both decoders and the resize release the GIL, and CI pays this test's wall time.
    with ThreadPoolExecutor(usable_cpus()) as pool:
        problems = [problem for found in pool.map(lambda job: _problems(*job), jobs) for problem in found]
    assert problems == []


# --- parity on synthetic JPEGs (no data needed) ---------------------------------------------------


@pytest.mark.parametrize("subsampling", [0, 1, 2], ids=["4:4:4", "4:2:2", "4:2:0"])
def test_odd_sized_jpegs_match_pillow_at_every_dct_scale(subsampling: int) -> None:
    data = encode(odd_noise(), "JPEG", quality=90, subsampling=subsampling)
    for size in (40, 80, 160, 200):  # 333 px high: DCT scales 1/8, 1/4, 1/2, none
        assert_same_as_pillow(data, size)
    assert_same_as_pillow(data, 40, draft=False)


@pytest.mark.parametrize(
    "params",
    [{"restart_marker_blocks": 3}, {"quality": 100, "subsampling": 0}, {"quality": 20}, {"optimize": True}],
    ids=["restart-markers", "q100", "q20", "optimized-huffman"],
)
def test_encoder_settings_match_pillow(params: dict[str, Any]) -> None:
    data = encode(odd_noise(seed=1), "JPEG", **params)
    for size in (40, 200):
        assert_same_as_pillow(data, size)


def test_exif_orientation_1_takes_the_fast_path() -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    assert_same_as_pillow(encode(odd_noise(), "JPEG", exif=exif.tobytes()), 64)


# --- which files take which path --------------------------------------------------------------------


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(noise(64), "JPEG", exif=exif.tobytes())


def _xmp_rotated() -> bytes:
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    return encode(noise(64), "JPEG", xmp=xmp)


def _mpo() -> bytes:
    return encode(noise(64), "MPO", save_all=True, append_images=[noise(32, seed=1)])


PILLOW_ONLY: dict[str, Callable[[], bytes]] = {
    "grey JPEG": lambda: encode(noise(64).convert("L"), "JPEG"),
    "CMYK JPEG": lambda: encode(noise(64).convert("CMYK"), "JPEG"),
    "progressive JPEG": lambda: progressive(noise(64)),
    "EXIF-rotated JPEG": _exif_rotated,
    "XMP-rotated JPEG": _xmp_rotated,
    "MPO": _mpo,
    "PNG": lambda: encode(noise(64), "PNG"),
}


@pytest.mark.parametrize("name", PILLOW_ONLY)
def test_every_other_file_keeps_pillows_path(name: str) -> None:
    data = PILLOW_ONLY[name]()
    decoded = decode_image(data, SIZE)
    assert decoded.decoder == "pillow"
    np.testing.assert_array_equal(decoded.pixels, pillow(data, SIZE).pixels)


def test_a_decode_in_the_large_image_lane_keeps_pillows_cancellable_path() -> None:
    data = noise_jpeg(64)  # 48 px: no draft, a decode of 64 x 64 pixels
    assert decode_image(data, 48, large_pixels=64 * 64).decoder == "pillow"
    assert decode_image(data, 48, large_pixels=64 * 64 + 1).decoder == "simplejpeg"


@pytest.mark.usefixtures("no_lungserve_env")
def test_the_default_bound_is_the_large_image_lanes() -> None:
    # Training and the benchmarks call load_image without the setting: the same bound as serving.
    assert Settings().large_image_pixels == LARGE_DECODE_PIXELS


# --- refusals: Pillow's, through the fast path -------------------------------------------------------


def _baseline() -> bytes:
    return noise_jpeg(seed=2, quality=90)


def _cut_mid_scan() -> bytes:
    data = _baseline()
    start = scan_starts(data)[0]
    return data[: (start + len(data)) // 2]


def _scan_patched(patch: bytes) -> bytes:
    data = _baseline()
    middle = (scan_starts(data)[0] + len(data)) // 2
    return data[:middle] + patch + data[middle + len(patch) :]


def _segment_patched(marker: int, offset: int, patch: bytes) -> bytes:
    data = _baseline()
    start = next(start for found, start, _ in segments(data) if found == marker) + offset
    return data[:start] + patch + data[start + len(patch) :]


HOSTILE: dict[str, Callable[[], bytes]] = {
    "cut mid-scan": _cut_mid_scan,
    "cut at 30% and closed with EOI (grey fill)": lambda: cut_at(_baseline(), 0.3),
    "cut at 90% and closed with EOI (grey fill)": lambda: cut_at(_baseline(), 0.9),
    "header claims 300 lines": lambda: jpeg_with_declared_size(_baseline(), 224, 300),
    "header claims 7000 x 7000": lambda: jpeg_with_declared_size(_baseline(), 7000, 7000),
    "restart marker inside the scan": lambda: _scan_patched(b"\xff\xd3"),
    "bogus Huffman table": lambda: _segment_patched(0xC4, 5, b"\xff" * 16),
    "quantisation table cut short": lambda: _segment_patched(0xDB, 2, b"\x00\x02"),
    "uniform 128 grey (the fill colour)": lambda: encode(Image.new("RGB", (64, 64), (128, 128, 128)), "JPEG"),
}


def test_the_hostile_files_have_a_fast_path_header() -> None:
    # Their intact original takes the fast path: the refusals below are the fast path's.
    assert decode_image(_baseline(), SIZE).decoder == "simplejpeg"


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_jpegs_get_pillows_refusal(name: str) -> None:
    data = HOSTILE[name]()
    with pytest.raises(InvalidImage) as fast:
        decode_image(data, SIZE)
    with pytest.raises(InvalidImage) as slow:
        pillow(data, SIZE)
    assert (type(fast.value), str(fast.value)) == (type(slow.value), str(slow.value))


def test_a_libjpeg_warning_pillow_ignores_is_still_ignored() -> None:
    # JFIF version 2.01: libjpeg-turbo warns (strict simplejpeg raises), Pillow decodes the file.
    # The fast path hands it to Pillow's path instead of refusing a file that was accepted.
    data = _segment_patched(0xE0, 9, b"\x02")
    decoded = decode_image(data, SIZE)
    assert decoded.decoder == "pillow"
    np.testing.assert_array_equal(decoded.pixels, pillow(data, SIZE).pixels)

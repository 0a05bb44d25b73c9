"""load_image: formats, EXIF orientation, every pixel mode, and every way bytes can be bad."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.errors import ImageTooLarge, InvalidImage
from service.model.preprocess import DecodeAbandoned, load_image, probe_image
from tests.hostile_files import cut_after_scans, cut_at, progressive, scan_bomb
from tests.images import encode, jpeg_with_declared_size, noise_jpeg, png_header_only

SIZE = 32


def halves(width: int = 64, height: int = 32) -> Image.Image:
    """Left half red, right half blue: orientation is visible after any resize."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(arr, "RGB")


def check(out: np.ndarray, size: int = SIZE) -> None:
    assert out.shape == (size, size, 3)
    assert out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize(("fmt", "params"), [("JPEG", {"quality": 95}), ("PNG", {}), ("TIFF", {}), ("BMP", {})])
def test_decodes_every_supported_format(fmt: str, params: dict[str, object]) -> None:
    out = load_image(encode(halves(), fmt, **params), SIZE)
    check(out)
    left, right = out[:, : SIZE // 4].mean(axis=(0, 1)), out[:, -SIZE // 4 :].mean(axis=(0, 1))
    assert left[0] > 200
    assert left[2] < 60
    assert right[2] > 200
    assert right[0] < 60


def test_real_tiles_decode(real_images: list[Path]) -> None:
    for path in real_images:
        check(load_image(path.read_bytes(), 128), 128)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the red left half ends up on top
    data = encode(halves(), "JPEG", quality=95, exif=exif.tobytes())
    out = load_image(data, SIZE)
    top, bottom = out[: SIZE // 4].mean(axis=(0, 1)), out[-SIZE // 4 :].mean(axis=(0, 1))
    assert top[0] > 200
    assert top[2] < 60
    assert bottom[2] > 200
    assert bottom[0] < 60
    # Without the tag the same pixels stay left/right.
    plain = load_image(encode(halves(), "JPEG", quality=95), SIZE)
    assert plain[:, : SIZE // 4].mean(axis=(0, 1))[0] > 200


def test_grey_and_palette_modes() -> None:
    grey = Image.new("L", (40, 40), 77)
    np.testing.assert_array_equal(load_image(encode(grey, "PNG"), SIZE), np.full((SIZE, SIZE, 3), 77))
    palette = halves().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    out = load_image(encode(palette, "PNG"), SIZE)
    check(out)
    assert out[:, 0].mean(axis=0)[0] > 200


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_flattened_on_white(mode: str) -> None:
    img = Image.new(mode, (40, 40), (10, 0) if mode == "LA" else (10, 20, 30, 0))
    np.testing.assert_array_equal(load_image(encode(img, "PNG"), SIZE), np.full((SIZE, SIZE, 3), 255))
    opaque = Image.new(mode, (40, 40), (10, 255) if mode == "LA" else (10, 20, 30, 255))
    expected = (10, 10, 10) if mode == "LA" else (10, 20, 30)
    np.testing.assert_array_equal(load_image(encode(opaque, "PNG"), SIZE)[0, 0], expected)


def test_palette_with_transparency() -> None:
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0] * 256)
    data = encode(img, "PNG", transparency=0)
    np.testing.assert_array_equal(load_image(data, SIZE), np.full((SIZE, SIZE, 3), 255))


def test_cmyk() -> None:
    img = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # pure red in CMYK
    for fmt in ("JPEG", "TIFF"):
        out = load_image(encode(img, fmt), SIZE)
        check(out)
        r, g, b = out.mean(axis=(0, 1))
        assert r > 200, fmt
        assert max(g, b) < 60, fmt


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    arr = np.full((40, 40), 32768, dtype="<u2")
    img = Image.frombytes("I;16", (40, 40), arr.tobytes())
    assert img.mode == "I;16"
    out = load_image(encode(img, "PNG"), SIZE)
    check(out)
    assert 126 <= int(out.mean()) <= 130  # half of 16-bit range -> half of 8-bit, not 255


def test_large_jpeg_takes_the_draft_path_and_keeps_the_shape() -> None:
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (768, 768, 3), dtype=np.uint8), "RGB")
    data = encode(big, "JPEG", quality=90)
    with_draft, without = load_image(data, 128, draft=True), load_image(data, 128, draft=False)
    check(with_draft, 128)
    check(without, 128)
    assert not np.array_equal(with_draft, without)  # the DCT downscale really ran


def test_empty_bytes() -> None:
    with pytest.raises(InvalidImage, match="empty"):
        load_image(b"", SIZE)


@pytest.mark.parametrize("data", [b"hello, not an image", b"\x00" * 1000, b"GIF89a-ish garbage", b"%PDF-1.7\n"])
def test_garbage(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        load_image(data, SIZE)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(fmt: str) -> None:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8), "RGB")
    data = encode(img, fmt)
    with pytest.raises(InvalidImage):
        load_image(data[: len(data) // 2], SIZE)


def test_too_many_pixels_is_refused_from_the_header() -> None:
    data = encode(Image.new("L", (2000, 1000)), "PNG")
    with pytest.raises(ImageTooLarge, match="2000x1000"):
        load_image(data, SIZE, max_pixels=1_000_000)
    check(load_image(data, SIZE, max_pixels=2_000_000))


def test_decompression_bomb_is_too_large_not_a_crash() -> None:
    # 400 M pixels: beyond Pillow's own bomb limit, refused before any pixel is decoded.
    with pytest.raises(ImageTooLarge):
        load_image(png_header_only(20_000, 20_000), SIZE)
    with pytest.raises(ImageTooLarge):
        load_image(png_header_only(10_000, 6_000), SIZE, max_pixels=50_000_000)


# --- hostile inputs (issue 10, rows 1-4 and the bomb message) ---------------------------------


def test_jpeg_header_claiming_more_lines_is_invalid_not_grey() -> None:
    # Row 1: libjpeg would fill 99 % of a 7000x7000 canvas with grey and report no error.
    with pytest.raises(InvalidImage, match="truncated"):
        load_image(jpeg_with_declared_size(noise_jpeg(seed=2, quality=90), 7000, 7000), SIZE)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_jpeg_with_end_marker_is_invalid(keep: float) -> None:
    # Row 2: a cut file with EOI appended decodes "successfully" with a grey bottom.
    data = noise_jpeg(seed=2, quality=90)
    with pytest.raises(InvalidImage, match="truncated"):
        load_image(data[: int(len(data) * keep)] + b"\xff\xd9", SIZE)
    with pytest.raises(InvalidImage, match="truncated"):
        load_image(data[: int(len(data) * keep)] + b"\xff\xd9", 64, draft=True)


def test_real_tile_cut_and_closed_is_invalid(real_images: list[Path]) -> None:
    data = real_images[0].read_bytes()
    with pytest.raises(InvalidImage):
        load_image(data[: len(data) // 2] + b"\xff\xd9", 128)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "ICO", "PCX", "PPM", "TGA", "SGI", "DDS"])
def test_formats_outside_the_allow_list_are_refused(fmt: str) -> None:
    # Row 3: Pillow decodes all of these; the documented contract is JPEG, PNG, TIFF or BMP.
    data = encode(halves(), fmt)
    with pytest.raises(InvalidImage, match="expected JPEG, PNG, TIFF or BMP"):
        load_image(data, SIZE)


def test_animated_gif_is_refused() -> None:
    frames = [Image.new("P", (16, 16), i % 256) for i in range(200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidImage):
        load_image(buf.getvalue(), SIZE)


def test_eps_never_reaches_ghostscript(monkeypatch: pytest.MonkeyPatch) -> None:
    # Row 4: the EPS plugin would run `gs` on load. With the allow-list its parser never runs:
    # a `gs` that records its own start proves it.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    from PIL import EpsImagePlugin

    called: list[object] = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(a))
    with pytest.raises(InvalidImage):
        load_image(eps, SIZE)
    assert called == []


def test_bomb_message_quotes_our_setting() -> None:
    with pytest.raises(ImageTooLarge, match="LUNGSERVE_MAX_IMAGE_PIXELS = 50000000") as info:
        load_image(png_header_only(20_000, 20_000), SIZE)
    assert "400000000" in str(info.value)


def test_probe_reports_the_reduced_decode_cost_of_large_jpegs() -> None:
    rng = np.random.default_rng(3)
    big = encode(Image.fromarray(rng.integers(0, 256, (1024, 2048, 3), dtype=np.uint8), "RGB"), "JPEG")
    probe = probe_image(big, 128)
    assert (probe.format, probe.width, probe.height) == ("JPEG", 2048, 1024)
    assert probe.decode_pixels == 2048 * 1024 // 64  # 1/8 DCT scale
    png = probe_image(encode(halves(2048, 1024), "PNG"), 128)
    assert png.decode_pixels == png.width * png.height  # PNG has no reduced decode


# --- issue 22: scan budget, truncated progressive JPEGs, abandoned decodes ----------------------


def test_a_scan_bomb_is_refused_by_the_probe() -> None:
    with pytest.raises(ImageTooLarge, match="scans"):
        probe_image(scan_bomb(512, 200), 128)


def test_a_progressive_jpeg_costs_its_full_size() -> None:
    # Its coefficients are kept at full size until the last scan, whatever the draft scale.
    data = progressive(Image.effect_noise((1024, 1024), 40).convert("RGB"))
    assert probe_image(data, 128).decode_pixels == 1024 * 1024
    assert probe_image(encode(Image.new("RGB", (1024, 1024)), "JPEG"), 128).decode_pixels == 128 * 128


@pytest.mark.parametrize("cut", ["scan-1", "scan-9", "at-0.5", "at-0.97", "at-0.995"])
def test_a_truncated_progressive_jpeg_is_invalid(cut: str) -> None:
    data = progressive(Image.effect_noise((300, 300), 60).convert("RGB"))
    kind, _, where = cut.partition("-")
    truncated = cut_after_scans(data, int(where)) if kind == "scan" else cut_at(data, float(where))
    with pytest.raises(InvalidImage, match="truncated"):
        load_image(truncated, 128)
    assert load_image(data, 128).shape == (128, 128, 3)


def test_a_decode_whose_request_is_gone_stops() -> None:
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(DecodeAbandoned):
        load_image(encode(Image.new("RGB", (64, 64)), "PNG"), 32, cancelled=cancelled)


def test_real_images_saved_progressive_are_not_refused(real_images: list[Path]) -> None:
    for path in real_images:
        with Image.open(path) as img:
            data = progressive(img.convert("RGB"))
        assert load_image(data, 128).shape == (128, 128, 3)

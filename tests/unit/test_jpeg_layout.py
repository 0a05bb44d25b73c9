"""service.model.jpeg: scan counts and whole scan scripts read from the markers (issue 22)."""

from __future__ import annotations

import pytest
from PIL import Image

from service.errors import ImageTooLarge, InvalidImage
from service.model.jpeg import MAX_SCANS, MAX_SEGMENTS, read_layout
from tests.hostile_files import cut_after_scans, cut_at, progressive, scan_bomb, scan_starts
from tests.images import encode, noise


def test_baseline_and_progressive_jpegs() -> None:
    baseline = read_layout(encode(noise(64), "JPEG"))
    assert (baseline.progressive, baseline.scans, baseline.single_scan) == (False, 1, True)
    colour = read_layout(progressive(noise(64)))
    assert (colour.progressive, colour.scans, colour.single_scan) == (True, 10, False)
    grey = read_layout(progressive(noise(64).convert("L")))
    assert (grey.progressive, grey.scans) == (True, 6)


def test_an_exif_thumbnail_is_not_counted() -> None:
    thumb = encode(noise(32), "JPEG")
    exif = Image.Exif()
    exif[0x010F] = "scanner"
    raw = exif.tobytes()
    # An APP1 segment holding a whole JPEG: its SOS lies inside the segment, skipped by length.
    data = encode(noise(64), "JPEG", exif=raw + thumb)
    assert read_layout(data).scans == 1


def test_a_scan_bomb_is_refused_before_decoding() -> None:
    bomb = scan_bomb(256, MAX_SCANS)
    with pytest.raises(ImageTooLarge, match="scans"):
        read_layout(bomb)


def test_millions_of_tiny_segments_are_refused() -> None:
    data = encode(noise(16), "JPEG")
    comments = b"\xff\xfe\x00\x02" * (MAX_SEGMENTS + 1)
    with pytest.raises(ImageTooLarge, match="segments"):
        read_layout(data[:2] + comments + data[2:])


@pytest.mark.parametrize("scans", [1, 5, 9])
def test_a_progressive_jpeg_cut_at_a_scan_boundary_is_truncated(scans: int) -> None:
    with pytest.raises(InvalidImage, match="truncated"):
        read_layout(cut_after_scans(progressive(noise(96)), scans))


def test_a_cut_inside_the_last_scan_passes_the_marker_walk() -> None:
    # The scans are all there; only a strict decode sees that the last one ends early.
    data = progressive(noise(96))
    assert read_layout(cut_at(data, 0.99)).scans == 10


def test_a_jpeg_without_a_scan_is_truncated() -> None:
    data = encode(noise(64), "JPEG")
    with pytest.raises(InvalidImage):
        read_layout(data[: scan_starts(data)[0]] + b"\xff\xd9")


# Every real image's marker walk (no false refusal, all single-scan) is checked in the same pass
# that decodes them: tests/unit/test_fast_jpeg.py, so the suite reads the 12,381 files once.

"""Malicious files built in code (issue 22): JPEG scan bombs, truncated progressive JPEGs, lying TIFFs.

Each builder works on the file's structure (markers, IFD entries), so the tests show what a
crafted file does without any file kept in the repository.
"""

from __future__ import annotations

import struct

from PIL import Image

from tests.images import encode

SOI, EOI, SOS, DHT = b"\xff\xd8", b"\xff\xd9", 0xDA, 0xC4


def segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of every segment of a well-formed JPEG, a scan with its entropy data."""
    out: list[tuple[int, int, int]] = []
    pos = 2
    while pos < len(data):
        assert data[pos] == 0xFF, pos
        marker = data[pos + 1]
        if marker == EOI[1]:
            out.append((marker, pos, pos + 2))
            break
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        end = pos + 2 + length
        if marker == SOS:
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        out.append((marker, pos, end))
        pos = end
    return out


def scan_starts(data: bytes) -> list[int]:
    """Offsets of the SOS markers of a well-formed JPEG."""
    return [start for marker, start, _ in segments(data) if marker == SOS]


def progressive(img: Image.Image, quality: int = 90) -> bytes:
    return encode(img, "JPEG", quality=quality, progressive=True)


def scan_bomb(side: int, scans: int) -> bytes:
    """A flat pink side x side progressive JPEG whose cheapest AC scan is repeated `scans` times.

    A flat colour has no AC energy, so each repeated scan is a few bytes of end-of-band runs, yet the
    decoder walks every block of the image for it: thousands of scans cost minutes of CPU for a
    file of a few hundred kB (the attack of issue 22, case 1).
    """
    data = progressive(Image.new("RGB", (side, side), (200, 120, 180)))
    parts = segments(data)
    # The smallest scan with its Huffman tables in front (each progressive scan may bring its own).
    best: bytes | None = None
    for i, (marker, start, end) in enumerate(parts):
        if marker != SOS:
            continue
        head = parts[i - 1][1] if i and parts[i - 1][0] == DHT else start
        block = data[head:end]
        scan_header = data[start + 4]
        spectral_start = data[start + 5 + 2 * scan_header]
        if spectral_start > 0 and (best is None or len(block) < len(best)):
            best = block
    assert best is not None
    eoi = parts[-1][1]
    return data[:eoi] + best * scans + EOI


def cut_after_scans(data: bytes, scans: int) -> bytes:
    """The JPEG's first `scans` scans, closed with EOI (a transfer cut at a scan boundary)."""
    starts = scan_starts(data)
    return data[: starts[scans]] + EOI


def cut_at(data: bytes, fraction: float) -> bytes:
    """The JPEG cut at `fraction` of its length (likely mid-scan), closed with EOI."""
    cut = int(len(data) * fraction)
    while data[cut - 1] == 0xFF:  # never leave a half marker before the appended EOI
        cut -= 1
    return data[:cut] + EOI


def tiled_tiff_claiming(width: int, height: int, tile: int | None = None) -> bytes:
    """A tiny little-endian tiled TIFF claiming width x height pixels, with no pixel data.

    About 150 bytes: by default one tile as large as the image (a multiple of 16), so a single
    offset/bytecount pair is enough for readers that check the tile count; the pixels it points
    at are the header itself. Readers that trust the size build their grids first.
    """
    side = tile if tile is not None else -(-max(width, height) // 16) * 16
    entries = [
        (256, 4, width),  # ImageWidth, LONG
        (257, 4, height),  # ImageLength
        (258, 3, 8),  # BitsPerSample
        (259, 3, 1),  # Compression: none
        (262, 3, 1),  # Photometric: min-is-black (one sample: no BitsPerSample array needed)
        (277, 3, 1),  # SamplesPerPixel
        (284, 3, 1),  # PlanarConfiguration
        (322, 4, side),  # TileWidth
        (323, 4, side),  # TileLength
        (324, 4, 8),  # TileOffsets: the IFD itself
        (325, 4, 64),  # TileByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def nested_json(depth: int) -> bytes:
    """An OIP request whose `parameters` nest `depth` levels deep."""
    return b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"data":["x"]}],"parameters":' + (
        b"[" * depth + b"]" * depth + b"}"
    )

"""A plain (stripped, untiled) TIFF read a band of strips at a time, never decoded whole.

OpenSlide reads tiled TIFFs only, and Pillow decodes a whole image. For a stripped TIFF the
tiles of one grid row all lie in one band of rows: the strips covering it are decoded once
(raw or zlib/deflate, with or without the horizontal predictor) into that band, the band is
kept while its tiles are read, and at most `BANDS_KEPT` bands exist at once. The sizes the file
claims (width, strips) are checked before anything proportional to them is allocated. A layout
this reader does not handle (LZW, JPEG, planar, 16-bit, rotated) goes to Pillow as before.
Synchronous and blocking: call from a pool.
"""

from __future__ import annotations

import math
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from service.errors import ImageTooLarge, InvalidImage
from service.model.preprocess import RESIZE_FILTER
from service.pathology.tiles import Tile

# Two bands: the grid row being read and the next one (the workers straddle a row boundary).
BANDS_KEPT: Final = 2
MAX_BAND_BYTES: Final = 128 * 1024 * 1024
MAX_STRIPS: Final = 10_000_000
_CHUNK: Final = 1 << 20
_WANTED: Final = frozenset({256, 257, 258, 259, 262, 273, 274, 277, 278, 279, 284, 317, 322})
_INT_TYPES: Final = {1: (1, "B"), 3: (2, "H"), 4: (4, "I"), 16: (8, "Q")}  # BYTE, SHORT, LONG, LONG8
_ZLIB: Final = frozenset({8, 32946})


class NotStripTiff(Exception):
    """Not a TIFF this reader handles: the caller falls back to another reader."""


@dataclass(frozen=True)
class StripLayout:
    width: int
    height: int
    samples: int
    rows_per_strip: int
    offsets: NDArray[np.uint64]
    counts: NDArray[np.uint64]
    deflate: bool
    predictor: bool


def _read_ifd(fh: BinaryIO) -> dict[int, tuple[int, ...]]:
    head = fh.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or len(head) < 8:
        raise NotStripTiff("not a TIFF")
    magic = struct.unpack(order + "H", head[2:4])[0]
    if magic == 42:
        big, ifd = False, struct.unpack(order + "I", head[4:8])[0]
    elif magic == 43 and len(head) == 16:
        big, ifd = True, struct.unpack(order + "Q", head[8:16])[0]
    else:
        raise NotStripTiff("not a TIFF")
    fh.seek(ifd)
    raw_n = fh.read(8 if big else 2)
    entries = struct.unpack(order + ("Q" if big else "H"), raw_n)[0] if len(raw_n) == (8 if big else 2) else 0
    if not 0 < entries <= 4096:
        raise InvalidImage("the TIFF directory is corrupt")
    size = 20 if big else 12
    data = fh.read(entries * size)
    tags: dict[int, tuple[int, ...]] = {}
    for i in range(len(data) // size):
        entry = data[i * size : (i + 1) * size]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag not in _WANTED or kind not in _INT_TYPES:
            continue
        count = struct.unpack(order + ("Q" if big else "I"), entry[4:12] if big else entry[4:8])[0]
        width, code = _INT_TYPES[kind]
        if count > MAX_STRIPS:  # checked before reading anything this large
            raise InvalidImage(f"the TIFF claims {count} values for tag {tag}")
        field = entry[12:20] if big else entry[8:12]
        nbytes = width * count
        if nbytes <= len(field):
            raw = field[:nbytes]
        else:
            fh.seek(struct.unpack(order + ("Q" if big else "I"), field)[0])
            raw = fh.read(nbytes)
            if len(raw) < nbytes:
                raise InvalidImage("the TIFF is truncated")
        tags[tag] = tuple(int(v) for v in np.frombuffer(raw, dtype=np.dtype(order + code)))
    return tags


def strip_layout(path: Path) -> StripLayout:
    """The first image's strips, or NotStripTiff when another reader should take the file."""
    with path.open("rb") as fh:
        tags = _read_ifd(fh)

    def first(tag: int, default: int) -> int:
        return tags.get(tag, (default,))[0]

    if 322 in tags or first(284, 1) != 1 or first(274, 1) != 1:
        raise NotStripTiff("tiled, planar or rotated")
    samples, compression = first(277, 1), first(259, 1)
    if any(b != 8 for b in tags.get(258, (8,))) or samples not in (1, 3, 4) or compression not in (1, *_ZLIB):
        raise NotStripTiff("a sample layout or compression this reader does not decode")
    if (samples == 1) != (first(262, 2) in (0, 1)) or first(317, 1) not in (1, 2):
        raise NotStripTiff("a photometric interpretation or predictor this reader does not decode")
    width, height = first(256, 0), first(257, 0)
    if width <= 0 or height <= 0 or 273 not in tags or 279 not in tags:
        raise InvalidImage("the TIFF has no pixels")
    rows = min(max(1, first(278, height)), height)
    strips = math.ceil(height / rows)
    if len(tags[273]) < strips or len(tags[279]) < strips:
        raise InvalidImage("the TIFF lists fewer strips than its height needs")
    return StripLayout(
        width, height, samples, rows,
        np.asarray(tags[273][:strips], dtype=np.uint64), np.asarray(tags[279][:strips], dtype=np.uint64),
        compression in _ZLIB, first(317, 1) == 2,
    )  # fmt: skip


class StripTiffSlide:
    """A `Slide` over a stripped TIFF (see the module docstring)."""

    reader = "tiff-strips"

    def __init__(self, path: Path, layout: StripLayout, tile_px: int) -> None:
        band_bytes = layout.width * min(tile_px, layout.height) * layout.samples
        if band_bytes > MAX_BAND_BYTES:
            raise ImageTooLarge(
                f"the TIFF is {layout.width} px wide in strips of {layout.rows_per_strip} rows: a band of tiles "
                f"would be {band_bytes} bytes; write it tiled (pyramidal) to read it tile by tile"
            )
        self._layout = layout
        self._fh = path.open("rb")
        self._lock = threading.Lock()
        self._bands: OrderedDict[tuple[int, int], NDArray[np.uint8]] = OrderedDict()

    @property
    def width(self) -> int:
        return self._layout.width

    @property
    def height(self) -> int:
        return self._layout.height

    def describe(self) -> dict[str, Any]:
        return {"reader": self.reader, "format": "TIFF (strips)", "mpp": None, "levels": 1}

    def prepare(self) -> None:
        pass  # bands are decoded as their tiles are read

    def _rows(self, index: int, r0: int, r1: int) -> NDArray[np.uint8]:
        """Rows r0..r1 (within strip `index`), decoding no more of the strip than up to r1."""
        lay = self._layout
        rows = min(lay.rows_per_strip, lay.height - index * lay.rows_per_strip)
        row_bytes = lay.width * lay.samples
        r1 = min(r1, rows)
        count = int(lay.counts[index])
        # zlib can make a strip slightly larger than its raw rows, never twice as large.
        if count > 2 * rows * row_bytes + 65536:
            raise InvalidImage("a TIFF strip is larger than its rows")
        offset = int(lay.offsets[index])
        if not lay.deflate:  # raw rows: read just those
            self._fh.seek(offset + r0 * row_bytes)
            pixels = self._fh.read((r1 - r0) * row_bytes)
        else:
            pixels = self._inflate(offset, count, r0 * row_bytes, r1 * row_bytes)
        if len(pixels) < (r1 - r0) * row_bytes:
            raise InvalidImage("a TIFF strip is truncated")
        block = np.frombuffer(pixels, dtype=np.uint8).reshape(r1 - r0, lay.width, lay.samples)
        if lay.predictor:  # horizontal differencing (per row), mod 256
            block = np.cumsum(block, axis=1, dtype=np.uint8)
        return block

    def _inflate(self, offset: int, count: int, start: int, stop: int) -> bytes:
        """Bytes start..stop of a deflated strip, streamed: what comes before is dropped, what
        comes after is never inflated (a one-strip TIFF costs one band, not the image)."""
        self._fh.seek(offset)
        inflater = zlib.decompressobj()
        kept = bytearray()
        done = 0  # inflated bytes so far
        remaining = count
        try:
            while done < stop and remaining > 0:
                chunk = self._fh.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                while chunk and done < stop:
                    out = inflater.decompress(chunk, min(_CHUNK, stop - done))
                    chunk = inflater.unconsumed_tail
                    lo, hi = max(start - done, 0), min(stop - done, len(out))
                    if hi > lo:
                        kept += out[lo:hi]
                    done += len(out)
                    if not out:
                        break
        except zlib.error as exc:
            raise InvalidImage(f"a TIFF strip is corrupt: {exc}") from exc
        return bytes(kept)

    def _band(self, y: int, height: int) -> NDArray[np.uint8]:
        with self._lock:
            band = self._bands.get((y, height))
            if band is None:
                band = self._read_rows(y, height)
                self._bands[(y, height)] = band
                while len(self._bands) > BANDS_KEPT:
                    self._bands.popitem(last=False)
            return band

    def _read_rows(self, y: int, height: int) -> NDArray[np.uint8]:
        rps = self._layout.rows_per_strip
        parts = []
        for index in range(y // rps, (y + height - 1) // rps + 1):
            top = index * rps
            parts.append(self._rows(index, max(y, top) - top, min(y + height, top + rps) - top))
        # One strip (often the whole image, uncompressed): its rows as read, without a copy.
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _rgb(self, pixels: NDArray[np.uint8]) -> Image.Image:
        if self._layout.samples == 1:
            return Image.fromarray(pixels[:, :, 0], "L").convert("RGB")
        if self._layout.samples == 4:  # transparent pixels are white glass, as for the other readers
            rgba = Image.fromarray(np.ascontiguousarray(pixels), "RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return Image.fromarray(np.ascontiguousarray(pixels), "RGB")

    def read_tile(self, tile: Tile, size: int) -> NDArray[np.uint8]:
        band = self._band(tile.y, tile.height)
        with self._rgb(band[:, tile.x : tile.x + tile.width]) as crop:
            resized = crop.resize((size, size), RESIZE_FILTER)
        return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))

    def thumbnail(self, max_side: int) -> Image.Image:
        """Band by band, each shrunk at once: flat memory, one pass over the strips."""
        lay = self._layout
        scale = min(1.0, max_side / max(lay.width, lay.height))
        out = Image.new("RGB", (max(1, round(lay.width * scale)), max(1, round(lay.height * scale))), (255, 255, 255))
        step = 256  # rows per pass: a few MB at a time
        for y in range(0, lay.height, step):
            h = min(step, lay.height - y)
            top, bottom = round(y * scale), max(round(y * scale) + 1, round((y + h) * scale))
            with self._lock:
                rows = self._read_rows(y, h)
            with self._rgb(rows) as band:
                out.paste(band.resize((out.width, bottom - top), Image.Resampling.BILINEAR), (0, top))
        return out

    def close(self) -> None:
        self._fh.close()
        self._bands.clear()

"""A JPEG's structure from its markers, before any pixel is decoded: how many scans, and whether they are whole.

A progressive JPEG's decode cost is its pixels times its scans, and its header says neither the
scan count nor whether the file holds every scan: a few hundred kB can hold thousands of scans
(each walks every block of the image), and a file cut after any scan and closed with EOI decodes
without an error to a blurred picture. Walking the marker segments is cheap (segment lengths,
then one regex search across each scan's entropy-coded data), so both are refused before decoding.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from typing import Final

from service.errors import ImageTooLarge, InvalidImage

# libjpeg's progressive scripts have 10 scans (colour) or 6 (grey); a non-interleaved baseline
# JPEG one per component. Far above any encoder's script, far below the thousands of a bomb.
MAX_SCANS: Final = 100
# Marker segments (tables, comments, scans) in all: an honest file has tens. Each costs a step of
# this walk, so a file of millions of 4-byte comments is refused instead of walked.
MAX_SEGMENTS: Final = 10_000

_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC
_PROGRESSIVE_SOF: Final = frozenset((0xC2, 0xC6, 0xCA, 0xCE))
_SOS: Final = 0xDA
_EOI: Final = 0xD9
_STANDALONE: Final = frozenset((0x01, *range(0xD0, 0xD9)))  # TEM, RSTn, SOI: no length field
# The next marker after entropy-coded data: 0xFF not followed by a stuffed zero, a restart
# marker or another 0xFF (fill bytes).
_NEXT_MARKER: Final = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")

Data = bytes | mmap.mmap


@dataclass(frozen=True)
class JpegLayout:
    progressive: bool
    scans: int

    @property
    def single_scan(self) -> bool:
        """One baseline scan: a cut shows as libjpeg's grey fill, so no strict decode is needed."""
        return not self.progressive and self.scans == 1


@dataclass
class _Frame:
    progressive: bool = False
    components: tuple[int, ...] = ()


def read_layout(data: Data, *, max_scans: int = MAX_SCANS) -> JpegLayout:
    """Walk the markers of a JPEG; raise ImageTooLarge above `max_scans` scans and InvalidImage
    when the scans do not complete the image (a progressive file cut at a scan boundary)."""
    frame = _Frame()
    # Per component, the successive-approximation bit each coefficient was last sent down to
    # (None: never sent). A whole image ends with every coefficient of every component at bit 0.
    bits: dict[int, list[int | None]] = {}
    scans = segments = 0
    pos, end = 2, len(data)
    while pos + 1 < end:
        if data[pos] != 0xFF:
            found = _NEXT_MARKER.search(data, pos)  # stray bytes: libjpeg skips them too
            if found is None:
                break
            pos = found.start()
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1  # fill byte before a marker
            continue
        if marker == _EOI:
            break
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > end:
            break
        segments += 1
        if segments > MAX_SEGMENTS:
            raise ImageTooLarge(f"the JPEG has more than {MAX_SEGMENTS} marker segments; it is not decoded")
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segment = bytes(data[pos + 4 : pos + 2 + length])
        pos += 2 + length
        if marker in _SOF_MARKERS:
            frame = _frame(marker, segment)
            bits = {c: [None] * 64 for c in frame.components}
        elif marker == _SOS:
            scans += 1
            if scans > max_scans:
                raise ImageTooLarge(
                    f"the JPEG has more than {max_scans} scans (an encoder writes about 10); "
                    "each scan costs a pass over the whole image, so it is not decoded"
                )
            _record_scan(segment, bits)
            found = _NEXT_MARKER.search(data, pos)
            pos = found.start() if found is not None else end
    _check_complete(frame, bits, scans)
    return JpegLayout(frame.progressive, scans)


def _frame(marker: int, segment: bytes) -> _Frame:
    if len(segment) < 6:
        raise InvalidImage("image data is corrupt: the JPEG frame header is cut short")
    count = segment[5]
    ids = tuple(segment[6 + 3 * i] for i in range(count) if 6 + 3 * i < len(segment))
    return _Frame(progressive=marker in _PROGRESSIVE_SOF, components=ids)


def _record_scan(segment: bytes, bits: dict[int, list[int | None]]) -> None:
    if not segment:
        return
    count = segment[0]
    tail = 1 + 2 * count
    if len(segment) < tail + 3:
        return  # libjpeg refuses a short scan header itself
    first, last, approx = segment[tail], segment[tail + 1], segment[tail + 2]
    low = approx & 0x0F
    for i in range(count):
        coefficients = bits.get(segment[1 + 2 * i])
        if coefficients is None:
            continue
        for k in range(first, min(last, 63) + 1):
            coefficients[k] = low


def _check_complete(frame: _Frame, bits: dict[int, list[int | None]], scans: int) -> None:
    if not frame.components:
        return  # no frame header: Pillow says what is wrong with the file
    if scans == 0:
        raise InvalidImage("image data is truncated: the JPEG has no scan")
    if frame.progressive:
        whole = all(b == 0 for coefficients in bits.values() for b in coefficients)
    else:
        # Sequential scans carry all 64 coefficients of the components they name.
        whole = all(coefficients[0] is not None for coefficients in bits.values())
    if not whole:
        raise InvalidImage(
            "image data is truncated: the JPEG's scans end before every component is complete "
            "(a progressive file cut short)"
        )

"""Synthetic test images: uniform RGB noise of a given side and seed, encoded with Pillow."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def noise(size: int = 224, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def noise_jpeg(size: int = 224, seed: int = 0, **params: Any) -> bytes:
    return encode(noise(size, seed), "JPEG", **params)


def noise_png(size: int, seed: int = 0) -> bytes:
    return encode(noise(size, seed), "PNG")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that *declares* width x height (and holds almost no data): a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def jpeg_with_declared_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF header edited to claim width x height."""
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    edited = bytearray(data)
    edited[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(edited)

"""Synthetic test images: uniform RGB noise of a given side and seed, encoded with Pillow."""

from __future__ import annotations

import io
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

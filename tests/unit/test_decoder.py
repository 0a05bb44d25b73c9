"""Decoder: the request pixel allowance, the large-image lane and its heap trim."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from service.core.decode_pool import Decoder, PixelAllowance
from service.errors import ImageTooLarge, InvalidImage

pytestmark = pytest.mark.anyio


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def trims() -> list[int]:
    return []


@pytest.fixture
def decoder(trims: list[int]) -> Iterator[Decoder]:
    d = Decoder(2, max_image_pixels=10_000_000, large_image_pixels=1_000_000, trim=lambda: trims.append(1))
    yield d
    d.shutdown()


async def test_tiles_use_the_shared_pool_and_large_images_the_trimmed_lane(decoder: Decoder, trims: list[int]) -> None:
    image, seconds = await decoder.decode(png(64, 64), 32)
    assert image.shape == (32, 32, 3)
    assert seconds >= 0
    assert trims == []
    big, _ = await decoder.decode(png(1500, 1000), 32)
    assert big.shape == (32, 32, 3)
    assert int(big[..., 0].mean()) == 200
    assert trims == [1]


async def test_the_request_allowance_refuses_before_decoding(decoder: Decoder, trims: list[int]) -> None:
    allowance = PixelAllowance(2_000_000)
    await decoder.decode(png(1000, 1000), 32, allowance)
    assert allowance.used == 1_000_000
    with pytest.raises(ImageTooLarge, match="LUNGSERVE_MAX_REQUEST_PIXELS = 2000000"):
        await decoder.decode(png(1500, 1000), 32, allowance)
    assert trims == [1]  # only the first large image was decoded
    assert allowance.used == 1_000_000
    await decoder.decode(png(100, 100), 32, allowance)  # a tile still fits


async def test_errors_come_from_the_probe(decoder: Decoder) -> None:
    with pytest.raises(InvalidImage):
        await decoder.decode(b"GIF89a" + bytes(100), 32)
    with pytest.raises(ImageTooLarge, match="LUNGSERVE_MAX_IMAGE_PIXELS"):
        await decoder.decode(png(4000, 3000), 32)


def test_decoded_jpeg_cost_is_the_draft_size() -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8)).save(buf, format="JPEG")
    allowance = PixelAllowance(100_000)
    from service.model.preprocess import probe_image

    allowance.charge(probe_image(buf.getvalue(), 128))  # 2048^2 / 64 = 65,536 decoded pixels
    assert allowance.used == 65_536


async def test_one_request_charges_its_allowance_from_parallel_decodes(decoder: Decoder) -> None:
    # Probe, charge and decode run in one pool task, so a /predict-many's images charge the same
    # allowance from two threads at once: exactly as many fit as the budget allows, never more.
    allowance = PixelAllowance(5 * 100 * 100)
    outcomes = await asyncio.gather(
        *(decoder.decode(png(100, 100), 32, allowance) for _ in range(8)), return_exceptions=True
    )
    assert sum(1 for o in outcomes if isinstance(o, ImageTooLarge)) == 3
    assert sum(1 for o in outcomes if isinstance(o, tuple)) == 5
    assert allowance.used == 5 * 100 * 100

"""The runtime's batch handler: uploads decoded by the batch's own worker, one image's error its own."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from service.engine import Engine
from service.errors import InvalidImage
from service.manifest import Manifest
from service.preprocess import load_image
from service.runtime import Classified, Encoded, ModelRuntime, Undecodable
from service.settings import Settings
from tests.conftest import BUNDLED_MODEL

pytestmark = pytest.mark.anyio


def jpeg(seed: int, size: int = 300) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


async def test_a_batch_decodes_its_uploads_and_keeps_a_bad_one_to_itself() -> None:
    manifest = Manifest.read(BUNDLED_MODEL / "model.json")
    engine = Engine(BUNDLED_MODEL / manifest.file, manifest, provider="cpu")
    # A long delay: the batch goes when its last reserved item arrives, so all three share it.
    settings = Settings(provider="cpu", max_batch_size=4, queue_limit=8, max_files_per_request=8, max_batch_delay_s=1.0)
    runtime = ModelRuntime(engine, settings)
    good, other = jpeg(1), jpeg(2)
    truncated = good[: len(good) // 2]  # a JPEG signature, then too few bytes: must not be classified
    array = load_image(other, engine.input_size)
    await runtime.start()
    try:
        with runtime.reserve(3) as reservation:
            encoded, broken, (decoded, info) = await asyncio.gather(
                runtime.classify_encoded(reservation, Encoded(good, settings.max_image_pixels)),
                runtime.classify_encoded(reservation, Encoded(truncated, settings.max_image_pixels)),
                runtime.classify(reservation, array),
            )
    finally:
        await runtime.stop(drain_timeout_s=5.0)

    assert encoded[1].batch_id == broken[1].batch_id == info.batch_id  # one batch for all three
    result = encoded[0]
    assert isinstance(result, Classified)
    assert result.decode_s is not None
    assert result.infer_s is not None
    expected = engine.run(load_image(good, engine.input_size)[np.newaxis])[0]
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    failure = broken[0]
    assert isinstance(failure, Undecodable)
    assert isinstance(failure.error, InvalidImage)
    assert decoded.decode_s is None  # decoded by the caller, not by the batch
    np.testing.assert_allclose(decoded.probabilities, engine.run(array[np.newaxis])[0], atol=1e-6)

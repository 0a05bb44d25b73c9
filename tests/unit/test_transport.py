"""The transport's pieces without a connection: the shared-memory arena and the result records."""

from __future__ import annotations

import os

import numpy as np
import pytest

from service.core import transport as wire


def test_the_model_side_reads_each_image_in_place_at_any_side() -> None:
    front = wire.TensorArena.create("test-arena", 3, 8 * 8 * 3 + 5)  # slots a little larger than images
    rng = np.random.default_rng(3)
    big, small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    slots = [front.put(big), front.put(small)]
    model = wire.TensorArena(os.dup(front.fd), 3, front.slot_bytes, owner=False)  # its own descriptor
    try:
        seen = model.view(slots[0], 8)
        np.testing.assert_array_equal(seen, big)
        np.testing.assert_array_equal(model.view(slots[1], 4), small)
        assert seen.flags.c_contiguous
        assert not seen.flags.owndata  # the shared memory itself, not a copy
        front.free(slots[0])
        again = front.put(small[:, ::-1].copy())  # the slot reused by the front
        assert again == slots[0]
        np.testing.assert_array_equal(model.view(again, 4), small[:, ::-1])
        assert seen.reshape(-1)[: small.size].tobytes() == small[:, ::-1].tobytes()  # the earlier view sees it
        with pytest.raises(ValueError, match="does not fit"):
            model.view(0, 9)
        with pytest.raises(IndexError):
            model.view(3, 8)
    finally:
        model.close()
        front.close()

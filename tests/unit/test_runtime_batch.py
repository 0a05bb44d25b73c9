"""`ModelRuntime`'s batch handler: images copied into a reused per-thread buffer give the same
answers as a fresh np.stack, at every batch size, and images that do not fit fail as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.engine import Engine
from service.core.runtime import ModelRuntime
from service.settings import Settings
from tests.onnx_models import write_model_dir


@pytest.fixture
def runtime(tmp_path: Path) -> ModelRuntime:
    manifest = write_model_dir(tmp_path / "m")  # 8 px, 3 classes
    engine = Engine(tmp_path / "m" / "model.onnx", manifest, provider="cpu", intra_op_threads=1)
    return ModelRuntime(engine, Settings(max_batch_size=4, tissue_check=False))


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


def test_each_batch_size_answers_as_a_fresh_stack_does(runtime: ModelRuntime) -> None:
    # Larger than the buffer, then smaller, then full: what is left of an earlier batch in the
    # buffer never leaks into a later answer.
    for seed, n in enumerate((6, 1, 4, 2, 4)):
        images = _images(n, seed)
        expected = runtime._engine.infer(np.stack(images)).probabilities
        results = runtime._infer_batch(images)
        np.testing.assert_array_equal(np.stack([r.probabilities for r in results]), expected)


def test_views_of_shared_memory_are_copied_not_kept(runtime: ModelRuntime) -> None:
    arena = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    arena[:] = np.stack(_images(4, 9))
    batch = runtime._stack(list(arena[::-1]))
    np.testing.assert_array_equal(batch, arena[::-1])
    assert not np.shares_memory(batch, arena)


@pytest.mark.parametrize(
    "odd",
    [
        np.zeros((4, 8, 3), dtype=np.uint8),  # another shape
        np.zeros((8, 8, 3), dtype=np.float32),  # another dtype
    ],
)
def test_images_that_do_not_fit_fail_as_np_stack_would(runtime: ModelRuntime, odd: np.ndarray) -> None:
    images = [*_images(1, 0), odd, *_images(1, 1)]
    with pytest.raises(ValueError, match=r"same shape|uint8"):
        runtime._infer_batch(images)


def test_three_images_whose_rows_add_up_are_still_refused(runtime: ModelRuntime) -> None:
    # 8 + 4 + 12 rows = 3 x 8: a concatenation would fit the buffer; np.stack refuses.
    images = [np.zeros((8, 8, 3), np.uint8), np.zeros((4, 8, 3), np.uint8), np.zeros((12, 8, 3), np.uint8)]
    with pytest.raises(ValueError, match="same shape"):
        runtime._infer_batch(images)

"""LUNGSERVE_MAX_BATCH_SIZE_CUDA: the batch follows the provider the session really got."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.core.engine import CPU, CUDA
from service.core.runtime import max_batch_size_for
from service.settings import Settings

pytestmark = pytest.mark.usefixtures("no_lungserve_env")


def test_cuda_takes_its_own_batch_and_cpu_keeps_the_small_one() -> None:
    settings = Settings(max_batch_size=4, max_batch_size_cuda=64)
    assert max_batch_size_for(CUDA, settings) == 64
    assert max_batch_size_for(CPU, settings) == 4


def test_unset_means_the_same_batch_everywhere() -> None:
    settings = Settings(max_batch_size=8)
    assert max_batch_size_for(CUDA, settings) == 8


def test_it_cannot_exceed_the_queue_limit() -> None:
    with pytest.raises(ValidationError, match="LUNGSERVE_MAX_BATCH_SIZE_CUDA"):
        Settings(max_batch_size_cuda=512, queue_limit=256)

"""`BatchInfo` and `Classified` write their fields in a hand-written `__init__` (one of each is
made per image): it must take exactly the dataclass's fields, in order, and stay frozen."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import numpy as np
import pytest

from service.core.batch_types import BatchInfo
from service.core.model_client import Classified
from service.model.decision import ACCEPT, LOW_CONFIDENCE
from service.model.manifest import Manifest
from tests.onnx_models import write_model_dir


@pytest.mark.parametrize("cls", [BatchInfo, Classified])
def test_init_takes_the_fields_in_order_with_their_defaults(cls: type[Any]) -> None:
    fields = dataclasses.fields(cls)
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in parameters] == [f.name for f in fields]
    for parameter, field in zip(parameters, fields, strict=True):
        assert parameter.default is (inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default)


def test_batch_info_is_a_frozen_value() -> None:
    info = BatchInfo(3, 2, 0.001, 0.01)
    assert (info.batch_id, info.size, info.queue_wait_s, info.compute_s) == (3, 2, 0.001, 0.01)
    assert info == BatchInfo(batch_id=3, size=2, queue_wait_s=0.001, compute_s=0.01)
    assert hash(info) == hash(BatchInfo(3, 2, 0.001, 0.01))
    assert dataclasses.replace(info, size=5) == BatchInfo(3, 5, 0.001, 0.01)
    assert repr(info) == "BatchInfo(batch_id=3, size=2, queue_wait_s=0.001, compute_s=0.01)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.size = 4  # type: ignore[misc]


def test_classified_is_a_frozen_value(tmp_path: Any) -> None:
    manifest: Manifest = write_model_dir(tmp_path / "m")
    probabilities = np.array([0.1, 0.8, 0.1], dtype=np.float32)
    result = Classified(probabilities, manifest, ACCEPT)
    assert result.ood_score is None
    assert result.label == manifest.classes[1]
    assert dataclasses.replace(result, decision=LOW_CONFIDENCE).decision is LOW_CONFIDENCE
    assert Classified(probabilities, manifest, ACCEPT, 2.5).ood_score == 2.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.decision = LOW_CONFIDENCE  # type: ignore[misc]

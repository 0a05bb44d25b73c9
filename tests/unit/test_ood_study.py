"""The OOD study's group split and interval: which tiles count as held out for each manifest shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.onnx_models import write_model_dir
from tests.ood_study import Tile, split_of, wilson

TILES = [Tile(Path(f"{g}-{i}.jpeg"), g) for g in ("a/1", "a/2", "b/1", "b/2", "b/3") for i in range(2)]


def test_v1_manifest_holds_out_its_validation_groups(tmp_path: Path) -> None:
    m = write_model_dir(tmp_path, validation_groups=["a/2", "b/3"])
    train, held, named = split_of(m, TILES)
    assert (train, held, named) == ({"a/1", "b/1", "b/2"}, {"a/2", "b/3"}, "validation_groups")


@pytest.mark.parametrize("train_groups", [3, ["a/1", "b/1", "b/2"]])
def test_v2_manifest_holds_out_its_test_groups_never_the_select_ones(tmp_path: Path, train_groups: object) -> None:
    split = {"train_groups": train_groups, "select_groups": ["a/2"], "test_groups": ["b/3"]}
    m = write_model_dir(tmp_path, split=split, validation_groups=["a/2", "b/3"])
    train, held, named = split_of(m, TILES)
    assert (train, held, named) == ({"a/1", "b/1", "b/2"}, {"b/3"}, "split.test_groups")


def test_wilson_interval_brackets_the_proportion() -> None:
    lo, hi = wilson(6, 2447)
    assert lo < 6 / 2447 < hi
    assert wilson(0, 100)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson(100, 100)[1] == pytest.approx(1.0, abs=1e-12)

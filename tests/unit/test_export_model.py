"""Builder, ONNX export parity and a training smoke run (needs the `export` extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.unit.test_export_data import make_dataset

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
ort = pytest.importorskip("onnxruntime")

from export.convert import ExportError, check_parity, export  # noqa: E402
from export.model import INPUT_NAME, OUTPUT_NAME, build_model  # noqa: E402
from service.model.manifest import Manifest, sha256_file  # noqa: E402
from service.model.preprocess import RESIZE  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    keras.utils.set_random_seed(0)
    return build_model(3, input_size=32, filters=(8, 16, 32))


def test_builder_follows_the_block_design(tiny_model: Any) -> None:
    kinds = [type(layer).__name__ for layer in tiny_model.layers]
    block = ["Conv2D", "BatchNormalization", "ReLU", "MaxPooling2D"]
    assert kinds[:2] == ["InputLayer", "Rescaling"]
    assert kinds[2:14] == block * 3
    head = ["GlobalAveragePooling2D", "Dense", "BatchNormalization", "ReLU", "Dropout", "Dense", "Softmax"]
    assert kinds[14:] == head
    assert tiny_model.input.dtype == "uint8"
    probs = tiny_model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0)
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_export_matches_keras_and_writes_manifest_and_metadata(tiny_model: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "m.keras"
    ckpt.parent.mkdir()
    tiny_model.save(ckpt)
    images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    manifest = export(ckpt, tmp_path / "out", parity_images=images, version="t1")
    onnx_path = tmp_path / "out" / "model.onnx"
    on_disk = Manifest.read(tmp_path / "out" / "model.json")
    assert on_disk == manifest
    assert manifest.sha256 == sha256_file(onnx_path)
    assert manifest.input_size == 32
    assert manifest.resize == RESIZE
    assert manifest.dump()["parity"]["max_abs_diff"] <= 1e-4

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == (INPUT_NAME, "tensor(uint8)", [32, 32, 3])
    assert isinstance(inp.shape[0], str)  # dynamic batch dimension
    assert out.name == OUTPUT_NAME
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["version"] == "t1"
    assert meta["input_size"] == "32"
    assert json.loads(meta["classes"]) == manifest.classes
    # batching must not change an answer
    batch = sess.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    single = np.concatenate([sess.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + 1]})[0] for i in range(8)])
    np.testing.assert_allclose(batch, single, atol=1e-6)


def test_parity_check_fails_loudly_on_a_different_model(tiny_model: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "m.keras"
    tiny_model.save(ckpt)
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    export(ckpt, tmp_path / "out", parity_images=images)
    keras.utils.set_random_seed(99)
    other = build_model(3, input_size=32, filters=(8, 16, 32))
    with pytest.raises(ExportError, match="parity check failed"):
        check_parity(other, tmp_path / "out" / "model.onnx", images)


def test_training_checkpoints_resumes_longer_then_bundles_the_v2_graph(tmp_path: Path) -> None:
    from export.bundle import bundle
    from export.train import TrainConfig, train

    # 8 groups per class: 2 held out per class, halved into 1 select + 1 test group
    data = make_dataset(tmp_path / "data", groups=8, per_group=3)
    out = tmp_path / "run"
    cfg = TrainConfig(data=data, out=out, input_size=32, epochs=1, batch_size=8, max_steps=2)
    train(cfg)
    state = json.loads((out / "state.json").read_text())
    assert state["epoch"] == 1
    with pytest.raises(FileExistsError):
        train(cfg)  # a finished run is never overwritten silently
    cfg.epochs, cfg.resume = 2, True
    result = train(cfg)  # continues from the checkpoint, with a longer schedule
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    for name in ("best.keras", "calibrated.keras", "training.json", "training_curves.png", "parity_images.npy"):
        assert (out / name).exists(), name
    assert result["classes"] == ["a", "b", "c"]
    assert result["select"]["temperature"] > 0
    split = result["split"]
    assert len(split["select_groups"]) == len(split["test_groups"]) == 3
    assert not set(split["select_groups"]) & set(split["test_groups"])

    manifest = bundle(out, tmp_path / "model", data=data).dump()
    assert manifest["outputs"] == {n: n for n in ("probabilities", "ood_score", "feature_maps", "cam_weights")}
    assert manifest["split"]["select_groups"] == split["select_groups"]
    assert manifest["split"]["test_groups"] == split["test_groups"]
    assert manifest["tile_source_px"] == 768
    assert "select groups (3 groups" in manifest["decision"]["chosen_on"]
    assert manifest["parity"]["max_abs_diff"]["argmax_flips"] == 0
    sess = ort.InferenceSession(str(tmp_path / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == list(manifest["outputs"])

"""`lungserve export`: Keras -> ONNX with tf2onnx, a parity check, and the manifest.

The export refuses to write anything unless ONNX Runtime reproduces Keras on real
images (max |dp| <= 1e-4, identical argmax): a silently diverging conversion would
serve different answers from the ones the model card reports.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from export.model import INPUT_NAME, OUTPUT_NAME
from service.model.manifest import MANIFEST_NAME, MODEL_NAME, Manifest, sha256_file
from service.model.preprocess import RESIZE, load_image

OPSET = 18  # tf2onnx's highest
PARITY_ATOL = 1e-4
MODEL_TITLE = "lungserve-lung-cnn"


class ExportError(Exception):
    pass


def parity_images_from_dir(folder: Path, size: int, limit: int = 64) -> NDArray[np.uint8]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".tif", ".tiff"})
    if not paths:
        raise ExportError(f"no images under {folder} for the parity check")
    step = max(1, len(paths) // limit)
    return np.stack([load_image(p.read_bytes(), size) for p in paths[::step][:limit]])


def export(
    keras_path: Path,
    out_dir: Path,
    *,
    parity_images: NDArray[np.uint8] | None = None,
    version: str | None = None,
    training: dict[str, Any] | None = None,
) -> Manifest:
    """Convert `keras_path` into `out_dir/model.onnx` + `out_dir/model.json`.

    `training` (the `training.json` a `lungserve train` run writes next to its checkpoint)
    supplies classes, data summary and validation metrics for the manifest.
    """
    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx

    run_dir = keras_path.parent
    if training is None and (run_dir / "training.json").exists():
        training = json.loads((run_dir / "training.json").read_text())
    if parity_images is None and (run_dir / "parity_images.npy").exists():
        parity_images = np.load(run_dir / "parity_images.npy")
    if parity_images is None or len(parity_images) == 0:
        raise ExportError("no real images for the parity check: pass --parity-images DIR")

    model = keras.models.load_model(keras_path)
    size = int(model.input_shape[1])
    n_classes = int(model.output_shape[-1])
    classes: list[str] = list(training["classes"]) if training else [f"class_{i}" for i in range(n_classes)]
    if len(classes) != n_classes:
        raise ExportError(f"model has {n_classes} outputs but training.json names {len(classes)} classes")

    spec = (tf.TensorSpec((None, size, size, 3), tf.uint8, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    graph = proto.graph
    if len(graph.output) != 1:
        raise ExportError(f"expected one output, got {[o.name for o in graph.output]}")
    _rename_output(graph, OUTPUT_NAME)
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"

    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        tmp_model = Path(tmp) / MODEL_NAME
        onnx.save(proto, tmp_model)  # metadata is added after the parity check below
        diff = check_parity(model, tmp_model, parity_images)
        # Known before conversion so the ONNX metadata and the manifest carry the same string.
        version = version or f"{dt.date.today():%Y.%m.%d}-{sha256_file(keras_path)[:8]}"
        meta = {
            "classes": json.dumps(classes),
            "version": version,
            "input_size": str(size),
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "resize": json.dumps(RESIZE),
        }
        stamp(proto, meta)
        onnx.save(proto, tmp_model)
        sha = sha256_file(tmp_model)
        manifest_data: dict[str, Any] = {
            "name": MODEL_TITLE,
            "version": version,
            "classes": classes,
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "input_size": size,
            "input_dtype": "uint8",
            "input_layout": "NHWC RGB, raw 0-255 (scaling is inside the graph)",
            "resize": RESIZE,
            "sha256": sha,
            "file": MODEL_NAME,
            "opset": OPSET,
            "calibration": {
                "method": "temperature scaling on the validation groups",
                "temperature": (training or {}).get("validation", {}).get("temperature"),
            },
            "parity": {"images": len(parity_images), "max_abs_diff": diff},
            "exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        if training:
            manifest_data["training_data"] = training["data"]
            manifest_data["validation_groups"] = training["validation_groups"]
            val = training["validation"]
            manifest_data["validation_metrics"] = {
                k: val[k]
                for k in (
                    "n",
                    "accuracy",
                    "balanced_accuracy",
                    "per_class",
                    "confusion_matrix",
                    "ece",
                    "ece_before_calibration",
                )
            }
            manifest_data["training"] = {
                "config": training["config"],
                "best_epoch": training["best_epoch"],
                "train_seconds": training["train_seconds"],
            }
        manifest = Manifest.model_validate(manifest_data)
        (Path(tmp) / MANIFEST_NAME).write_text(json.dumps(manifest.dump(), indent=1) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        # Model first, manifest last: a reader never sees a manifest naming a missing file.
        shutil.copyfile(tmp_model, out_dir / MODEL_NAME)
        shutil.copyfile(Path(tmp) / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    return manifest


def stamp(proto: Any, meta: dict[str, str]) -> None:
    """The metadata every exported graph carries (read by Netron, ORT and `lungserve`), then a check."""
    import onnx

    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "lungserve"
    proto.doc_string = "Lung histopathology CNN (LC25000 classes); research use only, not a diagnostic device."
    onnx.checker.check_model(proto)


def check_parity(model: Any, onnx_path: Path, images: NDArray[np.uint8]) -> float:
    """Max |Keras - ORT| over `images`; raises ExportError beyond tolerance or on any argmax flip."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = np.asarray(model.predict(images, batch_size=32, verbose=0))
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    diff = float(np.abs(expected - got).max())
    flips = int((expected.argmax(1) != got.argmax(1)).sum())
    if diff > PARITY_ATOL or flips:
        raise ExportError(
            f"ONNX parity check failed on {len(images)} real images: max |dp| = {diff:.2e} "
            f"(limit {PARITY_ATOL:.0e}), {flips} argmax flips; nothing was written"
        )
    return diff


def _rename_output(graph: Any, name: str) -> None:
    old = graph.output[0].name
    if old == name:
        return
    for node in graph.node:
        for i, out in enumerate(node.output):
            if out == old:
                node.output[i] = name
        for i, inp in enumerate(node.input):
            if inp == old:
                node.input[i] = name
    graph.output[0].name = name

"""Tiny but real ONNX models + manifests for model-source tests (needs `onnx`, a dev dependency).

The graph has the service's signature: uint8 image [N, S, S, 3] -> float32 probabilities [N, C]
(cast, mean colour per image, a linear layer, softmax). `bias` changes which class wins, so two
versions give distinguishable answers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.manifest import MANIFEST_NAME, Manifest, sha256_file
from service.preprocess import RESIZE

CLASSES = ("lung_aca", "lung_n", "lung_scc")


def model_bytes(
    input_size: int = 8, n_classes: int = 3, *, bias: Sequence[float] | None = None, softmax: bool = True
) -> bytes:
    c = n_classes
    weight = np.full((3, c), 0.001, dtype=np.float32)
    b = np.asarray(bias if bias is not None else [0.0] * c, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["z0"]),
            helper.make_node("Add", ["z0", "b"], ["z"]),
            (
                helper.make_node("Softmax", ["z"], ["probabilities"], axis=1)
                if softmax
                else helper.make_node("Identity", ["z"], ["probabilities"])
            ),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", input_size, input_size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", c])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lungserve-tests")
    model.ir_version = 8  # what every onnxruntime >= 1.14 reads
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def manifest_for(data: bytes, **overrides: Any) -> dict[str, Any]:
    import hashlib

    doc: dict[str, Any] = {
        "name": "tiny",
        "version": "1",
        "classes": list(CLASSES),
        "input_name": "image",
        "output_name": "probabilities",
        "input_size": 8,
        "input_dtype": "uint8",
        "resize": dict(RESIZE),
        "sha256": hashlib.sha256(data).hexdigest(),
        "file": "model.onnx",
    }
    doc.update(overrides)
    return doc


def write_model_dir(
    folder: Path,
    *,
    data: bytes | None = None,
    version: str = "1",
    bias: Sequence[float] | None = None,
    **overrides: Any,
) -> Manifest:
    """folder/model.onnx + folder/model.json (manifest fields overridable); returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = model_bytes(bias=bias)
    doc = manifest_for(data, version=version, **overrides)
    (folder / doc["file"]).write_bytes(data)
    (folder / MANIFEST_NAME).write_text(json.dumps(doc, indent=1))
    manifest = Manifest.read(folder / MANIFEST_NAME)
    if "sha256" not in overrides:
        assert sha256_file(folder / manifest.file) == manifest.sha256
    return manifest


# The LC25000 tiles' mean colour, roughly: the tiny v2 model's "training distribution".
V2_CENTRE = (190.0, 140.0, 200.0)


def model_v2_bytes(
    input_size: int = 128,
    *,
    bias: Sequence[float] | None = None,
    centre: Sequence[float] = V2_CENTRE,
) -> bytes:
    """A tiny graph with every output of the model v2 contract (docs: notes MODEL_CONTRACT).

    probabilities [N, 3]   softmax of (mean colour @ w + bias): `bias` picks the winner
    ood_score     [N]      Euclidean distance of the image's mean colour from `centre` (grey levels)
    feature_maps  [N, S, S, 3]  ReLU(image / 255 - 0.5): the "last conv block" (K = 3 channels)
    cam_weights   [N, 3, 3]     w for every image (d logit_c / d GAP_k of a linear head)
    """
    c = len(CLASSES)
    weight = np.full((3, c), 0.001, dtype=np.float32)
    b = np.asarray(bias if bias is not None else [0.0] * c, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["z0"]),
            helper.make_node("Add", ["z0", "b"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probabilities"], axis=1),
            helper.make_node("Sub", ["m", "centre"], ["d"]),
            helper.make_node("ReduceL2", ["d"], ["ood_score"], axes=[1], keepdims=0),
            helper.make_node("Mul", ["x", "inv255"], ["x01"]),
            helper.make_node("Sub", ["x01", "half"], ["xc"]),
            helper.make_node("Relu", ["xc"], ["feature_maps"]),
            helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
            helper.make_node("Mul", ["m3", "zero"], ["zeros3"]),
            helper.make_node("Add", ["zeros3", "w"], ["cam_weights"]),
        ],
        "tiny-v2",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", input_size, input_size, 3])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", c]),
            helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("feature_maps", TensorProto.FLOAT, ["N", input_size, input_size, 3]),
            helper.make_tensor_value_info("cam_weights", TensorProto.FLOAT, ["N", 3, c]),
        ],
        initializer=[
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(np.asarray(centre, dtype=np.float32), "centre"),
            numpy_helper.from_array(np.asarray(1.0 / 255.0, dtype=np.float32), "inv255"),
            numpy_helper.from_array(np.asarray(0.5, dtype=np.float32), "half"),
            numpy_helper.from_array(np.asarray(0.0, dtype=np.float32), "zero"),
            numpy_helper.from_array(np.asarray([2], dtype=np.int64), "axis2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lungserve-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


V2_OUTPUTS = {name: name for name in ("probabilities", "ood_score", "feature_maps", "cam_weights")}


def write_model_v2_dir(
    folder: Path,
    *,
    bias: Sequence[float] | None = None,
    decision: dict[str, Any] | None = None,
    version: str = "2",
    **overrides: Any,
) -> Manifest:
    """folder/ with the tiny v2 model (input 128 px, all outputs) and its manifest.

    `decision` is the manifest's decision section (e.g. {"refer_below": 0.5, "ood_above": 60.0}).
    """
    extra: dict[str, Any] = {"input_size": 128, "outputs": dict(V2_OUTPUTS)}
    if decision is not None:
        extra["decision"] = decision
    extra.update(overrides)
    return write_model_dir(folder, data=model_v2_bytes(bias=bias), version=version, **extra)

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

from service.model.manifest import MANIFEST_NAME, Manifest, sha256_file
from service.model.preprocess import RESIZE

CLASSES = ("lung_aca", "lung_n", "lung_scc")


def _linear_head(n_classes: int, bias: Sequence[float] | None) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """image -> float -> mean colour per image `m` [N, 3] -> `m @ w + b` = logits `z` [N, C]."""
    weight = np.full((3, n_classes), 0.001, dtype=np.float32)
    b = np.asarray(bias if bias is not None else [0.0] * n_classes, dtype=np.float32)
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
    ]
    return nodes, [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(b, "b")]


def _serialized(graph: onnx.GraphProto, *, full_check: bool = False) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lungserve-tests")
    model.ir_version = 8  # what every onnxruntime >= 1.14 reads
    onnx.checker.check_model(model, full_check=full_check)
    return bytes(model.SerializeToString())


def model_bytes(
    input_size: int = 8, n_classes: int = 3, *, bias: Sequence[float] | None = None, softmax: bool = True
) -> bytes:
    c = n_classes
    head, weights = _linear_head(c, bias)
    graph = helper.make_graph(
        [
            *head,
            (
                helper.make_node("Softmax", ["z"], ["probabilities"], axis=1)
                if softmax
                else helper.make_node("Identity", ["z"], ["probabilities"])
            ),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", input_size, input_size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", c])],
        initializer=weights,
    )
    return _serialized(graph)


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
    """A tiny graph with every output of the model v2 contract (docs/model_contract.md).

    probabilities [N, 3]   softmax of (mean colour @ w + bias): `bias` picks the winner
    ood_score     [N]      Euclidean distance of the image's mean colour from `centre` (grey levels)
    feature_maps  [N, S, S, 3]  ReLU(image / 255 - 0.5): the "last conv block" (K = 3 channels)
    cam_weights   [N, 3, 3]     w for every image (d logit_c / d GAP_k of a linear head)
    """
    c = len(CLASSES)
    head, weights = _linear_head(c, bias)
    graph = helper.make_graph(
        [
            *head,
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
            *weights,
            numpy_helper.from_array(np.asarray(centre, dtype=np.float32), "centre"),
            numpy_helper.from_array(np.asarray(1.0 / 255.0, dtype=np.float32), "inv255"),
            numpy_helper.from_array(np.asarray(0.5, dtype=np.float32), "half"),
            numpy_helper.from_array(np.asarray(0.0, dtype=np.float32), "zero"),
            numpy_helper.from_array(np.asarray([2], dtype=np.int64), "axis2"),
        ],
    )
    return _serialized(graph, full_check=True)


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


CAM_OUTPUTS = {
    "probabilities": "probabilities",
    "feature_maps": "feature_maps",
    "cam_weights": "cam_weights",
}


def cam_model_bytes(input_size: int = 32, n_classes: int = 3, *, channels: int = 4, seed: int = 0) -> bytes:
    """A tiny model with the v2 contract's Grad-CAM outputs (docs/model_contract.md).

    image -> /255 -> 3x3 conv (K channels, stride 2) -> ReLU = feature_maps [N, S/2, S/2, K]
    -> GAP -> linear head -> softmax. The head is linear, so cam_weights = d logit_c / d GAP_k
    is its weight matrix, broadcast to [N, K, C]: Grad-CAM by the contract's formula.
    """
    rng = np.random.default_rng(seed)
    conv = rng.normal(0.0, 1.0, (channels, 3, 3, 3)).astype(np.float32)
    head = rng.normal(0.0, 2.0, (channels, n_classes)).astype(np.float32)
    half = input_size // 2
    nodes = [
        helper.make_node("Cast", ["image"], ["x_int"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x_int", "inv255"], ["x"]),
        helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "Conv", ["x_nchw", "conv_w"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Relu", ["conv"], ["act"]),
        helper.make_node("Transpose", ["act"], ["feature_maps"], perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["feature_maps"], ["gap"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["gap", "head_w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        # [N, 1, 1] zeros + [K, C] -> [N, K, C]: the head's weights for every image.
        helper.make_node("ReduceMean", ["gap"], ["gap_mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["gap_mean", "zero"], ["n_zeros"]),
        helper.make_node("Unsqueeze", ["n_zeros", "axis2"], ["n_zeros3"]),
        helper.make_node("Add", ["n_zeros3", "head_w"], ["cam_weights"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cam",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", input_size, input_size, 3])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_classes]),
            helper.make_tensor_value_info("feature_maps", TensorProto.FLOAT, ["N", half, half, channels]),
            helper.make_tensor_value_info("cam_weights", TensorProto.FLOAT, ["N", channels, n_classes]),
        ],
        initializer=[
            numpy_helper.from_array(np.array(1.0 / 255.0, dtype=np.float32), "inv255"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
            numpy_helper.from_array(conv, "conv_w"),
            numpy_helper.from_array(head, "head_w"),
        ],
    )
    return _serialized(graph)


def write_cam_model_dir(folder: Path, *, input_size: int = 32, seed: int = 0, **overrides: Any) -> Manifest:
    """A model folder whose model has the Grad-CAM outputs, declared in the manifest."""
    data = cam_model_bytes(input_size, seed=seed)
    return write_model_dir(folder, data=data, input_size=input_size, outputs=dict(CAM_OUTPUTS), **overrides)

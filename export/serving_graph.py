"""The serving graph: one functional Keras model with the four outputs of the model contract
(probabilities, ood_score, feature_maps, cam_weights), converted to ONNX with tf2onnx.

cam_weights are d logit_c / d GAP_k in closed form (one masked matmul through the folded head,
no gradient op in the graph); ood_score is the min-over-classes Mahalanobis distance of the GAP
features, tied covariance fitted on train-group features. Shapes and the derivations:
docs/model_contract.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from export.knn_ood import KnnBank, knn_score
from export.model import INPUT_NAME, LOGITS_LAYER

OPSET = 18  # tf2onnx's highest supported here
OUTPUTS = ("probabilities", "ood_score", "feature_maps", "cam_weights")
GAP_LAYER = "gap"
HEAD_DENSE, HEAD_BN = "dense", "dense_bn"
PENULTIMATE_LAYER = "dense_relu"  # what the logits layer reads (dropout is the identity at inference)


@dataclass(frozen=True)
class MahalanobisStats:
    means: NDArray[np.float64]  # [C, K] class means of the GAP features
    precision_chol: NDArray[np.float64]  # [K, K] L with precision = L @ L.T
    shrinkage: float  # ridge added to the covariance, as a share of its mean variance
    n: int  # training images the statistics were fitted on

    def to_json(self) -> dict[str, Any]:
        return {
            "method": "Mahalanobis, tied covariance, min over class means",
            "features": "gap",
            "dim": int(self.means.shape[1]),
            "train_images": self.n,
            "shrinkage": self.shrinkage,
        }

    def save(self, path: Path) -> None:
        np.savez(
            path,
            means=self.means,
            precision_chol=self.precision_chol,
            shrinkage=np.float64(self.shrinkage),
            n=np.int64(self.n),
        )

    @classmethod
    def load(cls, path: Path) -> MahalanobisStats:
        with np.load(path) as f:
            return cls(f["means"], f["precision_chol"], float(f["shrinkage"]), int(f["n"]))


def fit_mahalanobis(
    features: NDArray[np.floating], labels: NDArray[np.integer], n_classes: int, shrinkage: float = 1e-3
) -> MahalanobisStats:
    """Class means and the tied (pooled within-class) covariance, with a small ridge.

    The ridge keeps the covariance invertible when some GAP channels are (nearly) dead.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    means = np.stack([f[y == c].mean(axis=0) for c in range(n_classes)])
    centred = f - means[y]
    cov = centred.T @ centred / len(f)
    cov += shrinkage * float(np.mean(np.diag(cov))) * np.eye(cov.shape[0])
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2
    chol = np.asarray(np.linalg.cholesky(precision), dtype=np.float64)
    return MahalanobisStats(means, chol, shrinkage, len(f))


def last_conv_relu(model: Any) -> str:
    """Name of the last `blockN_relu` layer (the feature maps Grad-CAM uses)."""
    names: list[str] = [
        str(layer.name) for layer in model.layers if layer.name.startswith("block") and layer.name.endswith("_relu")
    ]
    if not names:
        raise ValueError("the model has no blockN_relu layer")
    return names[-1]


def gap_features_model(model: Any) -> Any:
    import keras

    return keras.Model(model.input, model.get_layer(GAP_LAYER).output)


def build_serving_model(
    model: Any, temperature: float, stats: MahalanobisStats | None, knn: KnnBank | None = None
) -> Any:
    """A functional Keras model over `model`'s layers (shared weights) with the contract's outputs.

    `model` is a trained `export.model.build_model` network *without* a temperature layer.
    Outputs in the order of OUTPUTS (ood_score omitted when `stats` and `knn` are None). With
    `knn`, ood_score is the k-th nearest-neighbour distance of the penultimate features
    (export.knn_ood) instead of the Mahalanobis distance: same output name, so the server and
    the manifest's `decision.ood_above` rule do not change.
    """
    if stats is not None and knn is not None:
        raise ValueError("one ood_score: Mahalanobis stats or a kNN bank, not both")
    import keras
    from keras import layers, ops

    logits = model.get_layer(LOGITS_LAYER).output
    probabilities = layers.Softmax(name="probabilities")(
        layers.Rescaling(1.0 / temperature, name="temperature")(logits)
    )
    gap = model.get_layer(GAP_LAYER).output
    feature_maps = model.get_layer(last_conv_relu(model)).output
    pre = model.get_layer(HEAD_BN).output  # inference-mode BatchNorm output = the ReLU's input

    bn = model.get_layer(HEAD_BN)
    w1 = np.asarray(model.get_layer(HEAD_DENSE).kernel.numpy(), dtype=np.float64)  # [K, H]
    gamma = np.asarray(bn.gamma.numpy(), np.float64) if bn.gamma is not None else 1.0
    scale = gamma / np.sqrt(np.asarray(bn.moving_variance.numpy(), np.float64) + bn.epsilon)  # [H]
    w2 = np.asarray(model.get_layer(LOGITS_LAYER).kernel.numpy(), dtype=np.float64)  # [H, C]
    scaled_w2 = (scale[:, None] * w2).astype(np.float32)  # a_j W2[j, c]
    w1_f = w1.astype(np.float32)

    class CamWeights(layers.Layer):  # type: ignore[misc]
        def call(self, pre_act: Any) -> Any:
            mask = ops.cast(ops.greater(pre_act, 0.0), "float32")  # [N, H]
            per_unit = mask[:, :, None] * ops.convert_to_tensor(scaled_w2)[None, :, :]  # [N, H, C]
            return ops.matmul(ops.convert_to_tensor(w1_f), per_unit)  # [K,H] @ [N,H,C] -> [N,K,C]

    cam_weights = CamWeights(name="cam_weights")(pre)
    feature_maps = layers.Identity(name="feature_maps")(feature_maps)
    outputs = [probabilities]
    if knn is not None:
        bank = knn  # bound for the closure: mypy does not narrow `knn` inside the class

        class KnnScore(layers.Layer):  # type: ignore[misc]
            def call(self, features: Any) -> Any:
                return knn_score(features, bank)

        outputs.append(KnnScore(name="ood_score")(model.get_layer(PENULTIMATE_LAYER).output))
    elif stats is not None:
        chol = stats.precision_chol.astype(np.float32)
        centres = (stats.means @ stats.precision_chol).astype(np.float32)  # [C, K]

        class OodScore(layers.Layer):  # type: ignore[misc]
            def call(self, g: Any) -> Any:
                z = ops.matmul(g, ops.convert_to_tensor(chol))  # [N, K]
                # the difference itself, not |z|^2 - 2 z.m + |m|^2: no cancellation in float32
                diff = z[:, None, :] - ops.convert_to_tensor(centres)[None, :, :]  # [N, C, K]
                d2 = ops.sum(diff * diff, axis=2)
                return ops.sqrt(ops.maximum(ops.min(d2, axis=1), 0.0))

        outputs.append(OodScore(name="ood_score")(gap))
    outputs += [feature_maps, cam_weights]
    return keras.Model(model.input, outputs, name="lungserve_cnn_serving")


def output_names(has_ood: bool) -> list[str]:
    return [n for n in OUTPUTS if has_ood or n != "ood_score"]


def to_onnx(serving_model: Any, input_size: int, names: list[str]) -> Any:
    """tf2onnx conversion (opset 18); graph outputs renamed to the contract names, dynamic batch."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, input_size, input_size, 3), tf.uint8, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(serving_model, input_signature=spec, opset=OPSET)
    graph = proto.graph
    if len(graph.output) != len(names):
        raise ValueError(f"expected {len(names)} outputs, got {[o.name for o in graph.output]}")
    for value, name in zip(list(graph.output), names, strict=True):
        _rename(graph, value.name, name)
    for value in [graph.input[0], *graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def _rename(graph: Any, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        for i, out in enumerate(node.output):
            if out == old:
                node.output[i] = new
        for i, inp in enumerate(node.input):
            if inp == old:
                node.input[i] = new
    for value in graph.output:
        if value.name == old:
            value.name = new


def keras_outputs(serving_model: Any, images: NDArray[np.uint8], names: list[str]) -> dict[str, NDArray[Any]]:
    outs = serving_model.predict(images, batch_size=32, verbose=0)
    return {n: np.asarray(o) for n, o in zip(names, outs, strict=True)}


def onnx_outputs(path: Path, images: NDArray[np.uint8], batch_size: int = 64) -> dict[str, NDArray[Any]]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    parts = [sess.run(names, {INPUT_NAME: images[i : i + batch_size]}) for i in range(0, len(images), batch_size)]
    return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}


def parity(expected: dict[str, NDArray[Any]], got: dict[str, NDArray[Any]]) -> dict[str, float]:
    """Max |Keras - ORT| per output, relative to the output's scale for the unbounded ones."""
    out: dict[str, float] = {}
    for name, e in expected.items():
        scale = 1.0 if name == "probabilities" else max(1.0, float(np.abs(e).max()))
        out[name] = float(np.abs(e - got[name]).max()) / scale
    out["argmax_flips"] = float((expected["probabilities"].argmax(1) != got["probabilities"].argmax(1)).sum())
    return out


def describe(names: list[str]) -> str:
    return json.dumps({n: n for n in names})

"""The serving graph's four outputs, in ONNX Runtime, against Keras and NumPy references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from export.model import LOGITS_LAYER, build_model  # noqa: E402
from export.serving_graph import (  # noqa: E402
    OUTPUTS,
    MahalanobisStats,
    build_serving_model,
    fit_mahalanobis,
    gap_features_model,
    keras_outputs,
    onnx_outputs,
    to_onnx,
)

SIZE, TEMPERATURE = 32, 0.7


def mahalanobis_numpy(features: NDArray[np.floating], stats: MahalanobisStats) -> NDArray[np.float64]:
    """The reference for the graph's ood_score: min_c sqrt((g - mu_c)^T P (g - mu_c))."""
    z = np.asarray(features, dtype=np.float64) @ stats.precision_chol
    m = stats.means @ stats.precision_chol
    d2 = ((z[:, None, :] - m[None, :, :]) ** 2).sum(axis=-1)
    out: NDArray[np.float64] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    keras.utils.set_random_seed(3)
    model = build_model(3, input_size=SIZE, filters=(4, 8, 8), dense_units=6)
    rng = np.random.default_rng(0)
    # Non-trivial BatchNorm statistics, so folding them into cam_weights is actually tested.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.3, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.3, n).astype("float32"))
    train = rng.integers(0, 256, (60, SIZE, SIZE, 3), dtype=np.uint8)
    gap = gap_features_model(model).predict(train, verbose=0)
    stats = fit_mahalanobis(gap, np.arange(60) % 3, 3)
    serving = build_serving_model(model, TEMPERATURE, stats)
    path = tmp_path_factory.mktemp("sg") / "model.onnx"
    onnx.save(to_onnx(serving, SIZE, list(OUTPUTS)), path)
    images = rng.integers(0, 256, (10, SIZE, SIZE, 3), dtype=np.uint8)
    return {
        "model": model,
        "serving": serving,
        "stats": stats,
        "path": path,
        "images": images,
        "ort": onnx_outputs(path, images, batch_size=4),
    }


def test_onnx_has_the_contract_outputs_with_a_dynamic_batch(converted: dict[str, Any]) -> None:
    sess = ort.InferenceSession(str(converted["path"]), providers=["CPUExecutionProvider"])
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert list(outs) == list(OUTPUTS)
    assert all(isinstance(shape[0], str) for shape in outs.values())
    got = converted["ort"]
    assert got["probabilities"].shape == (10, 3)
    assert got["ood_score"].shape == (10,)
    assert got["feature_maps"].shape == (10, 8, 8, 8)  # before the last block's 2x2 pool
    assert got["cam_weights"].shape == (10, 8, 3)


def test_probabilities_and_feature_maps_match_keras(converted: dict[str, Any]) -> None:
    expected = keras_outputs(converted["serving"], converted["images"], list(OUTPUTS))
    got = converted["ort"]
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=1e-5)
    np.testing.assert_allclose(got["feature_maps"], expected["feature_maps"], rtol=1e-4, atol=1e-4)
    logits = keras.Model(converted["model"].input, converted["model"].get_layer(LOGITS_LAYER).output)
    z = np.asarray(logits.predict(converted["images"], verbose=0), np.float64) / TEMPERATURE
    calibrated = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(got["probabilities"], calibrated / calibrated.sum(1, keepdims=True), atol=1e-5)


def test_ood_score_is_the_numpy_mahalanobis_distance(converted: dict[str, Any]) -> None:
    gap = gap_features_model(converted["model"]).predict(converted["images"], verbose=0)
    expected = mahalanobis_numpy(gap, converted["stats"])
    np.testing.assert_allclose(converted["ort"]["ood_score"], expected, rtol=1e-3)
    # Sanity of the reference itself: a class mean is at distance 0 from its own class.
    assert mahalanobis_numpy(converted["stats"].means[:1], converted["stats"])[0] == pytest.approx(0.0, abs=1e-6)


def _head(model: Any, g: Any) -> Any:
    h = model.get_layer("dense")(g)
    h = model.get_layer("dense_bn")(h, training=False)
    h = model.get_layer("dense_relu")(h)
    return model.get_layer(LOGITS_LAYER)(h)


def test_cam_weights_are_the_gradient_of_each_logit_wrt_the_gap_features(converted: dict[str, Any]) -> None:
    model = converted["model"]
    g = tf.constant(gap_features_model(model).predict(converted["images"], verbose=0))
    grads = []
    for c in range(3):
        with tf.GradientTape() as tape:
            tape.watch(g)
            logit = _head(model, g)[:, c]
        grads.append(tape.gradient(logit, g).numpy())
    np.testing.assert_allclose(converted["ort"]["cam_weights"], np.stack(grads, axis=-1), rtol=1e-4, atol=1e-5)


def test_grad_cam_from_cam_weights_equals_gradient_tape_grad_cam(converted: dict[str, Any]) -> None:
    """Keras Grad-CAM on the last ReLU (mean of d logit / d A) is cam_weights / (h w)."""
    model = converted["model"]
    relu = model.get_layer("block3_relu")
    maps = tf.constant(keras.Model(model.input, relu.output).predict(converted["images"], verbose=0))
    with tf.GradientTape() as tape:
        tape.watch(maps)
        g = model.get_layer("gap")(model.get_layer("block3_pool")(maps))
        logit = _head(model, g)[:, 1]
    alpha = tf.reduce_mean(tape.gradient(logit, maps), axis=[1, 2]).numpy()  # [N, K]
    hw = maps.shape[1] * maps.shape[2]
    np.testing.assert_allclose(converted["ort"]["cam_weights"][:, :, 1], alpha * hw, rtol=1e-4, atol=1e-5)
    cam_tape = np.maximum(np.einsum("nhwk,nk->nhw", maps.numpy(), alpha), 0)
    cam_ours = np.maximum(
        np.einsum("nhwk,nk->nhw", converted["ort"]["feature_maps"], converted["ort"]["cam_weights"][:, :, 1]), 0
    )
    np.testing.assert_allclose(cam_ours, cam_tape * hw, rtol=1e-3, atol=1e-4)


def test_mahalanobis_fit_recovers_a_known_covariance() -> None:
    rng = np.random.default_rng(1)
    cov = np.array([[2.0, 0.5], [0.5, 1.0]])
    x = rng.multivariate_normal([0, 0], cov, 20000)
    y = np.repeat([0, 1], 10000)
    x[y == 1] += [5.0, 0.0]
    stats = fit_mahalanobis(x, y, 2, shrinkage=0.0)
    precision = stats.precision_chol @ stats.precision_chol.T
    np.testing.assert_allclose(np.linalg.inv(precision), cov, atol=0.06)
    np.testing.assert_allclose(stats.means, [[0, 0], [5, 0]], atol=0.05)


def test_stats_round_trip(tmp_path: Path, converted: dict[str, Any]) -> None:
    from export.serving_graph import MahalanobisStats

    converted["stats"].save(tmp_path / "s.npz")
    back = MahalanobisStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.precision_chol, converted["stats"].precision_chol)
    assert back.n == 60

"""Grad-CAM served from ONNX outputs agrees with Keras GradientTape Grad-CAM, and depends on the weights.

The model is a small `export.model.build_model` network, briefly trained on real LC25000 tiles
and exported through `export.serving_graph` (the same code that builds the shipped model's
`feature_maps` and `cam_weights`). The served map is `service.pathology.gradcam.class_activation` on the
ORT outputs; the reference is Selvaraju et al.'s Grad-CAM with tf.GradientTape on the last conv
block's ReLU. Sanity check after Adebayo et al. (2018): re-initialising the weights, from the
head down through the last conv block (cascading randomisation), gives clearly different maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from service.model.preprocess import load_image
from service.pathology.gradcam import class_activation

pytestmark = pytest.mark.slow

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
ort = pytest.importorskip("onnxruntime")

from export.model import LOGITS_LAYER, build_model  # noqa: E402
from export.serving_graph import build_serving_model, last_conv_relu, output_names, to_onnx  # noqa: E402

SIZE = 64
CLASSES = ("lung_aca", "lung_n", "lung_scc")
TRAIN_PER_CLASS = 48
AGREEMENT = 0.99


def _tiles(lc25000: Path, per_class: int, offset: int) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    images, labels = [], []
    for c, name in enumerate(CLASSES):
        for path in sorted((lc25000 / name).glob("*.jpeg"))[offset : offset + per_class]:
            images.append(load_image(path.read_bytes(), SIZE))
            labels.append(c)
    return np.stack(images), np.array(labels)


@pytest.fixture(scope="module")
def trained(lc25000: Path) -> tuple[Any, NDArray[np.uint8]]:
    """A small network trained for a few epochs, and held-out real tiles to explain."""
    keras.utils.set_random_seed(0)
    model = build_model(len(CLASSES), input_size=SIZE, filters=(8, 16, 32), dense_units=16)
    x, y = _tiles(lc25000, TRAIN_PER_CLASS, 0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=4, batch_size=24, verbose=0, shuffle=True)
    held_out, _ = _tiles(lc25000, 2, 500)
    return model, held_out


def _served_maps(model: Any, images: NDArray[np.uint8]) -> tuple[NDArray[np.float32], list[NDArray[np.float32]]]:
    """Probabilities and the Grad-CAM map of the predicted class, from the ONNX serving graph in ORT."""
    names = output_names(has_ood=False)
    proto = to_onnx(build_serving_model(model, temperature=1.0, stats=None), SIZE, names)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(zip(names, session.run(names, {"image": images}), strict=True))
    probs = out["probabilities"]
    maps = [
        class_activation(out["feature_maps"][n], out["cam_weights"][n], int(np.argmax(probs[n])))
        for n in range(len(images))
    ]
    return probs, maps


def _gradient_tape_maps(model: Any, images: NDArray[np.uint8], classes: NDArray[np.int64]) -> list[NDArray[Any]]:
    """Grad-CAM by the book: alpha_k = mean_ij d logit_c / d A_ijk, map = ReLU(sum_k alpha_k A_k)."""
    grad_model = keras.Model(
        model.input, [model.get_layer(last_conv_relu(model)).output, model.get_layer(LOGITS_LAYER).output]
    )
    maps = []
    for image, c in zip(images, classes, strict=True):
        with tf.GradientTape() as tape:
            activations, logits = grad_model(image[None], training=False)
            target = logits[:, int(c)]
        grads = tape.gradient(target, activations)
        alpha = tf.reduce_mean(grads, axis=(1, 2))
        cam = tf.nn.relu(tf.reduce_sum(activations * alpha[:, None, None, :], axis=-1))
        maps.append(cam.numpy()[0])
    return maps


def _correlation(a: NDArray[Any], b: NDArray[Any]) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def test_served_gradcam_agrees_with_gradient_tape(trained: tuple[Any, NDArray[np.uint8]]) -> None:
    model, images = trained
    probs, served = _served_maps(model, images)
    reference = _gradient_tape_maps(model, images, np.argmax(probs, axis=1))
    assert any(m.max() > 0 for m in served)  # there is something to compare
    for ours, theirs in zip(served, reference, strict=True):
        assert ours.shape == theirs.shape
        assert _correlation(ours, theirs) >= AGREEMENT
        # Up to a positive constant: both normalised maps are the same picture.
        if theirs.max() > 0:
            np.testing.assert_allclose(ours / ours.max(), theirs / theirs.max(), atol=1e-3)


def test_randomised_weights_give_clearly_different_maps(trained: tuple[Any, NDArray[np.uint8]]) -> None:
    model, images = trained
    _, served = _served_maps(model, images)
    randomised = keras.models.clone_model(model)
    randomised.set_weights(model.get_weights())
    keras.utils.set_random_seed(123)
    fresh = build_model(len(CLASSES), input_size=SIZE, filters=(8, 16, 32), dense_units=16)
    # Cascading randomisation (Adebayo et al.): logits, dense head, then the last conv block.
    top = [LOGITS_LAYER, "dense_bn", "dense", "block3_bn", "block3_conv"]
    for name in top:
        randomised.get_layer(name).set_weights(fresh.get_layer(name).get_weights())
    _, random_maps = _served_maps(randomised, images)
    similarity = [_correlation(a, b) for a, b in zip(served, random_maps, strict=True)]
    assert np.mean(similarity) < 0.5, similarity

"""The lungserve CNN: the functional Keras builder (tf2onnx cannot convert Sequential)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
LOGITS_LAYER = "logits"


def build_model(
    num_classes: int,
    input_size: int = 128,
    filters: Sequence[int] = (16, 32, 64, 128, 256),
    dense_units: int = 128,
    dropout: float = 0.3,
    temperature: float = 1.0,
) -> Any:
    """uint8 RGB (N, S, S, 3) -> class probabilities (N, C).

    Blocks of Conv2D -> BatchNorm -> ReLU -> MaxPool, then GAP, Dense -> BN -> ReLU,
    Dropout and a softmax. Scaling to [-1, 1] is inside the graph, so the service feeds
    raw pixels. `temperature` divides the logits before the softmax (calibration).
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=(input_size, input_size, 3), dtype="uint8", name=INPUT_NAME)
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(inputs)
    for i, f in enumerate(filters):
        x = layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"block{i + 1}_conv")(x)
        # momentum 0.9 (Keras: 0.99) so the running statistics track the weights within an
        # epoch; with the default, validation lags training for several epochs.
        x = layers.BatchNormalization(momentum=0.9, name=f"block{i + 1}_bn")(x)
        x = layers.ReLU(name=f"block{i + 1}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{i + 1}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(dense_units, use_bias=False, name="dense")(x)
    x = layers.BatchNormalization(momentum=0.9, name="dense_bn")(x)
    x = layers.ReLU(name="dense_relu")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    logits = layers.Dense(num_classes, name=LOGITS_LAYER)(x)
    if temperature != 1.0:
        logits = layers.Rescaling(1.0 / temperature, name="temperature")(logits)
    outputs = layers.Softmax(name=OUTPUT_NAME)(logits)
    return keras.Model(inputs, outputs, name="lungserve_cnn")


def with_temperature(model: Any, temperature: float) -> Any:
    """A copy of a trained model whose logits are divided by `temperature`."""
    import keras
    from keras import layers

    logits = model.get_layer(LOGITS_LAYER).output
    scaled = layers.Rescaling(1.0 / temperature, name="temperature")(logits)
    outputs = layers.Softmax(name=OUTPUT_NAME)(scaled)
    return keras.Model(model.input, outputs, name=model.name)


def logits_model(model: Any) -> Any:
    import keras

    return keras.Model(model.input, model.get_layer(LOGITS_LAYER).output)

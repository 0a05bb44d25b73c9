"""Histology augmentation on uint8 batches, in TensorFlow (runs inside tf.data).

Tissue has no canonical orientation, so all 8 dihedral transforms are label-preserving
and each image gets its own; stain differences between labs and batches are modelled in
HED space (Tellez et al., 2019, "Quantifying the effects of data augmentation and stain
color normalization in convolutional neural networks for computational pathology",
Medical Image Analysis 58); a random zoom (scale jitter) covers magnification and
crop-size differences; mild brightness/contrast/saturation jitter covers the scanner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# skimage.color's stain matrix (Ruifrok & Johnston 2001): rows are the optical-density
# vectors of haematoxylin, eosin and DAB. rgb2hed is OD @ inv(RGB_FROM_HED); hed2rgb is
# the inverse. Kept here as constants so the augmentation needs no scikit-image.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
RGB_FROM_HED[2, :] = np.cross(RGB_FROM_HED[0, :], RGB_FROM_HED[1, :])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


@dataclass(frozen=True)
class AugmentConfig:
    zoom_min: float = 0.7  # crop side as a fraction of the image side (scale jitter)
    hed_alpha: float = 0.1  # stain-concentration gain per channel: U(1 - a, 1 + a)
    hed_beta: float = 0.05  # stain-concentration shift per channel in optical density: U(-b, b)
    colour: float = 0.1  # brightness/contrast/saturation factor jitter: U(1 - c, 1 + c)
    brightness: float = 10.0  # additive brightness in 0-255 units: U(-b, b)


def hed_jitter(x: Any, alpha: Any, beta: Any) -> Any:
    """(B,S,S,3) float RGB in 0-255 -> same, with each image's H, E, D concentrations scaled and shifted.

    Optical density OD = -log(I / 255); stain concentrations C = OD @ HED_FROM_RGB; the
    jittered C' = alpha * C + beta goes back through OD' = C' @ RGB_FROM_HED, I' = 255 exp(-OD').
    `alpha`, `beta`: (B, 1, 1, 3). This is skimage's rgb2hed/hed2rgb up to its constant scale.
    """
    import tensorflow as tf

    od = -tf.math.log(tf.maximum(x, 1.0) / 255.0)
    conc = tf.einsum("bhwc,cd->bhwd", od, tf.constant(HED_FROM_RGB, tf.float32))
    conc = conc * alpha + beta
    od2 = tf.einsum("bhwd,dc->bhwc", conc, tf.constant(RGB_FROM_HED, tf.float32))
    return 255.0 * tf.exp(-tf.maximum(od2, 0.0))


def dihedral(x: Any, flip_lr: Any, flip_ud: Any, transpose: Any) -> Any:
    """Per-image element of the dihedral group D4 (square images); the masks are (B,) booleans."""
    import tensorflow as tf

    def pick(mask: Any, a: Any, b: Any) -> Any:
        return tf.where(mask[:, None, None, None], a, b)

    x = pick(flip_lr, tf.reverse(x, axis=[2]), x)
    x = pick(flip_ud, tf.reverse(x, axis=[1]), x)
    return pick(transpose, tf.transpose(x, [0, 2, 1, 3]), x)


def augment_batch(images: Any, cfg: AugmentConfig | None = None) -> Any:
    """(B, S, S, 3) uint8 -> (B, S, S, 3) uint8, each image transformed independently."""
    import tensorflow as tf

    cfg = cfg or AugmentConfig()
    x = tf.cast(images, tf.float32)
    batch = tf.shape(x)[0]
    size = tf.shape(x)[1]

    def u(shape: Any, lo: float, hi: float) -> Any:
        return tf.random.uniform(shape, lo, hi)

    # Scale jitter: crop zoom_min..100% of the side at a random place, resize back.
    side = u([batch], cfg.zoom_min, 1.0)
    off_y = tf.random.uniform([batch]) * (1.0 - side)
    off_x = tf.random.uniform([batch]) * (1.0 - side)
    boxes = tf.stack([off_y, off_x, off_y + side, off_x + side], axis=1)
    x = tf.image.crop_and_resize(x, boxes, tf.range(batch), tf.stack([size, size]))

    coin = [tf.random.uniform([batch]) < 0.5 for _ in range(3)]
    x = dihedral(x, *coin)

    x = hed_jitter(
        x,
        u([batch, 1, 1, 3], 1.0 - cfg.hed_alpha, 1.0 + cfg.hed_alpha),
        u([batch, 1, 1, 3], -cfg.hed_beta, cfg.hed_beta),
    )

    c = cfg.colour
    grey = tf.reduce_mean(x, axis=-1, keepdims=True)
    x = grey + (x - grey) * u([batch, 1, 1, 1], 1.0 - c, 1.0 + c)
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = mean + (x - mean) * u([batch, 1, 1, 1], 1.0 - c, 1.0 + c)
    x = x + u([batch, 1, 1, 1], -cfg.brightness, cfg.brightness)
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)

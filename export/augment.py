"""Histology augmentation on uint8 batches, in TensorFlow (runs inside tf.data).

Tissue has no canonical orientation, so all 8 dihedral transforms are label-preserving;
stain and scanner differences are modelled by mild colour jitter; a mild random zoom
covers magnification differences between sources.
"""

from __future__ import annotations

from typing import Any


def augment_batch(images: Any, seed: int | None = None) -> Any:
    """(B, S, S, 3) uint8 -> (B, S, S, 3) uint8, each image transformed independently."""
    import tensorflow as tf

    x = tf.cast(images, tf.float32)
    batch = tf.shape(x)[0]
    size = tf.shape(x)[1]

    # Mild zoom: crop 80-100% of the side at a random place, resize back (bilinear).
    side = tf.random.uniform([batch], 0.8, 1.0)
    off_y = tf.random.uniform([batch]) * (1.0 - side)
    off_x = tf.random.uniform([batch]) * (1.0 - side)
    boxes = tf.stack([off_y, off_x, off_y + side, off_x + side], axis=1)
    x = tf.image.crop_and_resize(x, boxes, tf.range(batch), tf.stack([size, size]))

    # Dihedral group: per-image flips, and a rot90 per batch (over an epoch every image
    # sees every orientation; a per-image rot90 would need a gather of 4 rotations).
    x = tf.image.random_flip_left_right(x)
    x = tf.image.random_flip_up_down(x)
    x = tf.image.rot90(x, k=tf.random.uniform([], 0, 4, dtype=tf.int32))

    # Colour jitter per image: brightness, contrast, saturation (H&E stain variation).
    grey = tf.reduce_mean(x, axis=-1, keepdims=True)
    sat = tf.random.uniform([batch, 1, 1, 1], 0.85, 1.15)
    x = grey + (x - grey) * sat
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    contrast = tf.random.uniform([batch, 1, 1, 1], 0.85, 1.15)
    x = mean + (x - mean) * contrast
    x = x + tf.random.uniform([batch, 1, 1, 1], -15.0, 15.0)
    # Per-channel gain: a crude stain-intensity shift.
    x = x * tf.random.uniform([batch, 1, 1, 3], 0.95, 1.05)
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)

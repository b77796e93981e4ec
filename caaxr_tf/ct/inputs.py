"""The CT models' input: raw slice values (HU + 1024) as float, never scaled.

Training records, served images and patient folders all go through ``fit_raw``, so a slice
reaches the model the same way whichever path it came by. Real runs use the records' own
size (512x512): ``fit_raw`` is then the identity. A run at another ``image_size`` (the cheap
tests) resizes bilinearly and rounds back to whole raw units (uint16), so that the cached
records stay 2 bytes per pixel.
"""

from __future__ import annotations

import tensorflow as tf

RAW_MAX = 65535.0


def decode_raw_png(encoded: tf.Tensor) -> tf.Tensor:
    """A 16-bit greyscale PNG → uint16 ``[H, W, 1]`` holding the stored values unchanged."""
    return tf.io.decode_png(encoded, channels=1, dtype=tf.uint16)


def fit_raw(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint16 ``[..., H, W, 1]`` raw slices at ``image_size`` x ``image_size`` (uint16).

    The identity when the slices already have that size; otherwise a bilinear resize rounded
    to whole raw units."""
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    height, width = shape[-3], shape[-2]
    same = tf.logical_and(tf.equal(height, image_size), tf.equal(width, image_size))
    target_shape = tf.concat([shape[:-3], [image_size, image_size, 1]], axis=0)

    def resized() -> tf.Tensor:
        values = tf.image.resize(tf.cast(images, tf.float32), [image_size, image_size], method="bilinear")
        return tf.cast(tf.clip_by_value(tf.round(values), 0.0, RAW_MAX), tf.uint16)

    fitted = tf.cond(same, lambda: tf.reshape(tf.cast(images, tf.uint16), target_shape), resized)
    static = images.shape[:-3].concatenate([image_size, image_size, 1])
    fitted.set_shape(static)
    return fitted

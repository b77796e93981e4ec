"""The CT training augmentation of Rahimzadeh et al. (2021) as a stateless tf function.

The published code uses Keras' ``ImageDataGenerator(horizontal_flip=True, vertical_flip=True,
zoom_range=0.05, rotation_range=360, width_shift_range=0.05, height_shift_range=0.05,
shear_range=0.05)``. Per image this draws

* a rotation angle uniform in -360..360 degrees,
* a shift uniform in -5..5 % of the width and of the height,
* a shear angle uniform in -0.05..0.05 *degrees* (Keras reads ``shear_range`` as degrees,
  so the published "shear 5 %" is a shear of at most 0.05 degrees),
* two zoom factors, along x and y independently, uniform in 0.95..1.05,
* a horizontal and a vertical flip, each with probability 1/2,

and samples the input bilinearly with the nearest edge pixel outside (``fill_mode="nearest"``).
The transform is Keras' ``rotation @ shift @ shear @ zoom`` about the image centre, followed
by the flips, written for (x, y) where Keras writes (row, column): every range is symmetric, so
the distribution of transforms is the same. The centre is the exact one, ((W - 1) / 2,
(H - 1) / 2); Keras uses (H / 2 + 0.5, W / 2 + 0.5), one pixel off.

``augment_ct_batch(images, seed)`` is stateless: the same seed (shape [2]) gives the same
output, so a seeded tf.data pipeline stays reproducible with parallel map calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf


@dataclass(frozen=True)
class CTAugmentation:
    """Ranges of the random transforms (defaults: the published ImageDataGenerator)."""

    horizontal_flip: bool = True
    vertical_flip: bool = True
    rotation_degrees: float = 360.0
    width_shift: float = 0.05   # fraction of the width
    height_shift: float = 0.05  # fraction of the height
    shear_degrees: float = 0.05
    zoom: float = 0.05          # zoom factors in 1 - zoom .. 1 + zoom, x and y independent
    fill_mode: str = "NEAREST"
    interpolation: str = "BILINEAR"


PARAMETERS = ("angle", "shift_x", "shift_y", "shear", "zoom_x", "zoom_y", "flip_x", "flip_y")


def identity_parameters(batch: int) -> dict[str, tf.Tensor]:
    """Parameters that leave every image as it is (a starting point for tests and tools)."""
    zeros, ones = tf.zeros([batch]), tf.ones([batch])
    return dict(angle=zeros, shift_x=zeros, shift_y=zeros, shear=zeros, zoom_x=ones, zoom_y=ones,
                flip_x=zeros, flip_y=zeros)


def sample_ct_parameters(batch: tf.Tensor | int, seed: tf.Tensor, config: CTAugmentation = CTAugmentation()
                         ) -> dict[str, tf.Tensor]:
    """Draw one set of transform parameters per image, statelessly from ``seed`` (shape [2]).

    ``angle`` and ``shear`` are in radians, ``shift_x``/``shift_y`` in fractions of the
    width/height, ``flip_x``/``flip_y`` are 0.0 or 1.0.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), len(PARAMETERS))

    def uniform(index: int, low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([batch], seeds[index], low, high)

    radians = math.pi / 180.0
    flip = lambda index, enabled: (  # noqa: E731
        tf.cast(uniform(index, 0.0, 1.0) < 0.5, tf.float32) if enabled else tf.zeros([batch]))
    return dict(
        angle=uniform(0, -config.rotation_degrees, config.rotation_degrees) * radians,
        shift_x=uniform(1, -config.width_shift, config.width_shift),
        shift_y=uniform(2, -config.height_shift, config.height_shift),
        shear=uniform(3, -config.shear_degrees, config.shear_degrees) * radians,
        zoom_x=uniform(4, 1.0 - config.zoom, 1.0 + config.zoom),
        zoom_y=uniform(5, 1.0 - config.zoom, 1.0 + config.zoom),
        flip_x=flip(6, config.horizontal_flip),
        flip_y=flip(7, config.vertical_flip),
    )


def ct_transform_matrices(parameters: dict[str, tf.Tensor], height: tf.Tensor | int,
                          width: tf.Tensor | int) -> tf.Tensor:
    """``[B, 8]`` projective transforms mapping each output pixel (x, y) to the input point it samples.

    input = c + R(angle) (t + Shear(shear) Zoom(zoom_x, zoom_y) Flip (output - c)), with c the
    image centre and t = (shift_x * W, shift_y * H) in pixels.
    """
    height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    cos, sin = tf.cos(parameters["angle"]), tf.sin(parameters["angle"])
    shear_sin, shear_cos = tf.sin(parameters["shear"]), tf.cos(parameters["shear"])
    # Shear(s) Zoom(zx, zy) Flip = [[zx fx, -sin(s) zy fy], [0, cos(s) zy fy]]
    fx = 1.0 - 2.0 * parameters["flip_x"]
    fy = 1.0 - 2.0 * parameters["flip_y"]
    s00, s01 = parameters["zoom_x"] * fx, -shear_sin * parameters["zoom_y"] * fy
    s11 = shear_cos * parameters["zoom_y"] * fy
    # A = R S with R = [[cos, -sin], [sin, cos]]
    a00, a01 = cos * s00, cos * s01 - sin * s11
    a10, a11 = sin * s00, sin * s01 + cos * s11
    tx, ty = parameters["shift_x"] * width, parameters["shift_y"] * height
    b0 = cx + cos * tx - sin * ty - (a00 * cx + a01 * cy)
    b1 = cy + sin * tx + cos * ty - (a10 * cx + a11 * cy)
    zeros = tf.zeros_like(a00)
    return tf.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)


def apply_ct_transforms(images: tf.Tensor, parameters: dict[str, tf.Tensor],
                        config: CTAugmentation = CTAugmentation()) -> tf.Tensor:
    """Warp ``images`` ``[B, H, W, C]`` (float) by the given per-image parameters."""
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    transforms = ct_transform_matrices(parameters, shape[1], shape[2])
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
        interpolation=config.interpolation, fill_mode=config.fill_mode,
    )


def augment_ct_batch(images: tf.Tensor, seed: tf.Tensor, config: CTAugmentation = CTAugmentation()) -> tf.Tensor:
    """Random flips, rotation, shift, shear and zoom of a batch of raw CT slices ``[B, H, W, C]``.

    Values are not rescaled (raw HU + 1024 stays raw); bilinear sampling only mixes
    neighbouring values. One ``seed`` (shape [2]) per batch; the same seed gives the same output.
    """
    images = tf.convert_to_tensor(images)
    parameters = sample_ct_parameters(tf.shape(images)[0], seed, config)
    return apply_ct_transforms(images, parameters, config)

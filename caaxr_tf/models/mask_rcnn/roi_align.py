"""RoIAlign over a feature pyramid and pasting of box-relative masks into the image.

Both are built on `tf.image.crop_and_resize`, which samples bilinearly at
evenly spaced points from the first to the last pixel centre it is given and
has gradients with respect to the image. The coordinates passed to it are
chosen so that

* RoIAlign samples `sampling_ratio**2` points at the centres of the sub-bins
  of every output bin (pixel centres at half-integers, "aligned" RoIAlign) and
  averages them. A one-pixel edge-replicated border reproduces the reference
  rule for points near the border: clamp within one pixel of the map, zero
  beyond it.
* `paste_masks` samples a mask at the centre of every image pixel, with zeros
  outside the mask (like `grid_sample(..., align_corners=False)`).
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import tensorflow as tf

from caaxr_tf.models.layers import PACKAGE


def _sample_coordinates(start: tf.Tensor, end: tf.Tensor, count: int, size: tf.Tensor, pad: int):
    """crop_and_resize box coordinates sampling `count` bin centres of [start, end) (normalised).

    `size` is the map's length on this axis without the `pad` border.
    """
    step = (end - start) / count
    first = (start + 0.5 * step) * size - 0.5 + pad
    last = (start + (count - 0.5) * step) * size - 0.5 + pad
    scale = size + 2 * pad - 1
    return first / scale, last / scale


def roi_align(
    features: tf.Tensor,
    boxes: tf.Tensor,
    box_indices: tf.Tensor,
    output_size: int,
    sampling_ratio: int = 2,
) -> tf.Tensor:
    """Aligned RoIAlign of `[R, 4]` normalised boxes on `[B, h, w, C]` features -> `[R, out, out, C]` float32.

    `box_indices` `[R]` picks the image of each box.
    """
    padded = tf.pad(features, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
    shape = tf.shape(features)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    boxes = tf.cast(boxes, tf.float32)
    samples = output_size * sampling_ratio
    y1, y2 = _sample_coordinates(boxes[:, 0], boxes[:, 2], samples, height, 1)
    x1, x2 = _sample_coordinates(boxes[:, 1], boxes[:, 3], samples, width, 1)
    crops = tf.image.crop_and_resize(
        padded,
        tf.stack([y1, x1, y2, x2], axis=-1),
        tf.cast(box_indices, tf.int32),
        [samples, samples],
        method="bilinear",
        extrapolation_value=0.0,
    )
    if sampling_ratio > 1:
        crops = tf.nn.avg_pool2d(crops, sampling_ratio, sampling_ratio, "VALID")
    return crops


def roi_levels(
    boxes: tf.Tensor,
    image_size: tuple[int, int],
    min_level: int,
    max_level: int,
    canonical_size: float = 224.0,
    canonical_level: int = 4,
) -> tf.Tensor:
    """FPN level of each box: `floor(canonical_level + log2(sqrt(area in pixels) / canonical_size))`."""
    height = (boxes[..., 2] - boxes[..., 0]) * image_size[0]
    width = (boxes[..., 3] - boxes[..., 1]) * image_size[1]
    scale = tf.sqrt(tf.nn.relu(height) * tf.nn.relu(width))
    level = tf.floor(canonical_level + tf.math.log(scale / canonical_size + 1e-8) / tf.math.log(2.0))
    return tf.cast(tf.clip_by_value(level, min_level, max_level), tf.int32)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MultiLevelRoIAlign(keras.layers.Layer):
    """RoIAlign where each box reads the pyramid level that matches its size.

    Call on `(features, boxes)`: `features` is a list of maps from level
    `min_level` upwards (strides doubling), `boxes` `[B, R, 4]` normalised;
    returns `[B, R, output_size, output_size, C]`. Runs in float32.

    Args:
        output_size: side of the pooled grid (7 for boxes, 14 for masks).
        sampling_ratio: sample points per bin and axis.
        image_size: `(height, width)` of the input image in pixels, used for
            the level rule.
        min_level: pyramid level of `features[0]` (2 for P2).
        canonical_size, canonical_level: a box of `canonical_size` pixels
            reads level `canonical_level` (FPN paper: 224 -> P4).
    """

    def __init__(
        self,
        output_size: int,
        sampling_ratio: int = 2,
        image_size: Sequence[int] = (224, 224),
        min_level: int = 2,
        canonical_size: float = 224.0,
        canonical_level: int = 4,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.image_size = tuple(int(s) for s in image_size)
        self.min_level = int(min_level)
        self.canonical_size = float(canonical_size)
        self.canonical_level = int(canonical_level)
        self.built = True  # no state to create

    def call(self, features, boxes):
        batch = tf.shape(boxes)[0]
        rois = tf.shape(boxes)[1]
        flat_boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
        box_indices = tf.repeat(tf.range(batch), rois)
        max_level = self.min_level + len(features) - 1
        levels = roi_levels(
            flat_boxes, self.image_size, self.min_level, max_level, self.canonical_size, self.canonical_level
        )
        # Each level pools only its own boxes; dynamic_stitch puts them back in order.
        positions, pooled = [], []
        for offset, feature in enumerate(features):
            selected = tf.cast(tf.where(tf.equal(levels, self.min_level + offset))[:, 0], tf.int32)
            positions.append(selected)
            pooled.append(
                roi_align(
                    feature,
                    tf.gather(flat_boxes, selected),
                    tf.gather(box_indices, selected),
                    self.output_size,
                    self.sampling_ratio,
                )
            )
        merged = tf.dynamic_stitch(positions, pooled)
        channels = features[0].shape[-1]
        return tf.reshape(merged, [batch, rois, self.output_size, self.output_size, channels])

    def compute_output_shape(self, features_shape, boxes_shape):
        return (*boxes_shape[:2], self.output_size, self.output_size, features_shape[0][-1])

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "output_size": self.output_size,
            "sampling_ratio": self.sampling_ratio,
            "image_size": self.image_size,
            "min_level": self.min_level,
            "canonical_size": self.canonical_size,
            "canonical_level": self.canonical_level,
        }


def paste_masks(masks: tf.Tensor, boxes: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Paste `[N, m, m]` box-relative masks into `[N, H, W]` images at `[N, 4]` normalised boxes.

    Every image pixel samples the mask bilinearly at its centre; outside the
    mask (beyond half a mask cell from its border) the result is 0.
    """
    masks = tf.cast(masks, tf.float32)
    boxes = tf.cast(boxes, tf.float32)
    size = tf.cast(tf.shape(masks)[1], tf.float32)
    padded = tf.pad(masks[..., None], [[0, 0], [1, 1], [1, 1], [0, 0]])
    height, width = image_size

    def axis_coordinates(start, end, pixels):
        extent = tf.maximum(end - start, 1e-6)
        # Mask index of the first and last image pixel centre (+1 for the border).
        first = ((0.5 / pixels - start) / extent) * size - 0.5 + 1.0
        last = (((pixels - 0.5) / pixels - start) / extent) * size - 0.5 + 1.0
        return first / (size + 1.0), last / (size + 1.0)

    y1, y2 = axis_coordinates(boxes[:, 0], boxes[:, 2], float(height))
    x1, x2 = axis_coordinates(boxes[:, 1], boxes[:, 3], float(width))
    pasted = tf.image.crop_and_resize(
        padded,
        tf.stack([y1, x1, y2, x2], axis=-1),
        tf.range(tf.shape(masks)[0]),
        [height, width],
        method="bilinear",
        extrapolation_value=0.0,
    )
    return pasted[..., 0]

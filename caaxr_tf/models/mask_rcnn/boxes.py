"""Box arithmetic for Mask R-CNN.

Boxes are `(ymin, xmin, ymax, xmax)`, normalised to the image (0..1), in the
last axis of any tensor. Deltas follow Faster R-CNN: `(dy, dx, dh, dw)` with
`dy = (cy - cy_a) / h_a` and `dh = log(h / h_a)`, multiplied by `weights`
(10, 10, 5, 5 by default, the inverse of the usual 0.1/0.2 delta std).
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

DEFAULT_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# exp(dh) is clipped so a wild prediction cannot overflow (Detectron's bound).
MAX_LOG_SCALE = math.log(1000.0 / 16.0)
_EPS = 1e-8


def box_area(boxes: tf.Tensor) -> tf.Tensor:
    """Area of `[..., 4]` boxes (zero for inverted boxes)."""
    height = tf.nn.relu(boxes[..., 2] - boxes[..., 0])
    width = tf.nn.relu(boxes[..., 3] - boxes[..., 1])
    return height * width


def iou_matrix(boxes1: tf.Tensor, boxes2: tf.Tensor) -> tf.Tensor:
    """Pairwise IoU of `[..., N, 4]` and `[..., M, 4]` boxes -> `[..., N, M]`.

    Leading axes broadcast. A pair whose union is empty has IoU 0.
    """
    b1 = boxes1[..., :, None, :]
    b2 = boxes2[..., None, :, :]
    inter_h = tf.nn.relu(tf.minimum(b1[..., 2], b2[..., 2]) - tf.maximum(b1[..., 0], b2[..., 0]))
    inter_w = tf.nn.relu(tf.minimum(b1[..., 3], b2[..., 3]) - tf.maximum(b1[..., 1], b2[..., 1]))
    inter = inter_h * inter_w
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return tf.where(union > 0, inter / tf.maximum(union, _EPS), tf.zeros_like(inter))


def _centre_size(boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    height = boxes[..., 2] - boxes[..., 0]
    width = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * height, boxes[..., 1] + 0.5 * width, height, width


def encode_boxes(
    boxes: tf.Tensor, anchors: tf.Tensor, weights: Sequence[float] = DEFAULT_BOX_WEIGHTS
) -> tf.Tensor:
    """Deltas that turn `anchors` into `boxes` (both `[..., 4]`, broadcastable).

    Degenerate sizes are floored at a tiny epsilon so the result stays finite.
    """
    cy, cx, h, w = _centre_size(boxes)
    acy, acx, ah, aw = _centre_size(anchors)
    ah, aw = tf.maximum(ah, _EPS), tf.maximum(aw, _EPS)
    deltas = tf.stack(
        [
            (cy - acy) / ah,
            (cx - acx) / aw,
            tf.math.log(tf.maximum(h, _EPS) / ah),
            tf.math.log(tf.maximum(w, _EPS) / aw),
        ],
        axis=-1,
    )
    return deltas * tf.constant(weights, deltas.dtype)


def decode_boxes(
    deltas: tf.Tensor, anchors: tf.Tensor, weights: Sequence[float] = DEFAULT_BOX_WEIGHTS
) -> tf.Tensor:
    """Inverse of `encode_boxes`: apply `[..., 4]` deltas to `[..., 4]` anchors."""
    deltas = deltas / tf.constant(weights, deltas.dtype)
    acy, acx, ah, aw = _centre_size(anchors)
    cy = acy + deltas[..., 0] * ah
    cx = acx + deltas[..., 1] * aw
    h = ah * tf.exp(tf.minimum(deltas[..., 2], MAX_LOG_SCALE))
    w = aw * tf.exp(tf.minimum(deltas[..., 3], MAX_LOG_SCALE))
    return tf.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)


def clip_boxes(boxes: tf.Tensor) -> tf.Tensor:
    """Clip normalised boxes to the image."""
    return tf.clip_by_value(boxes, 0.0, 1.0)

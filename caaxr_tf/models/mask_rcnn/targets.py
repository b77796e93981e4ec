"""Training targets: IoU matching, random sampling with fixed-size outputs, mask targets.

Everything works on padded batches (`[B, G, 4]` ground-truth boxes with a
`[B, G]` validity mask) and returns tensors of static size, so the training
step traces once and runs inside `tf.distribute` replicas.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import tensorflow as tf

from caaxr_tf.models.mask_rcnn.boxes import DEFAULT_BOX_WEIGHTS, encode_boxes, iou_matrix


def random_subset(mask: tf.Tensor, count: tf.Tensor, max_count: int) -> tf.Tensor:
    """Uniformly pick `count[b]` (at most `max_count`) of the True entries in each row of `[B, N]` `mask`."""
    max_count = min(int(max_count), int(mask.shape[-1]))
    noise = tf.random.uniform(tf.shape(mask))
    score = tf.where(mask, noise, -1.0)
    top = tf.math.top_k(score, max_count, sorted=True).values  # [B, k]
    count = tf.minimum(tf.cast(count, tf.int32), max_count)
    kth = tf.gather(top, tf.maximum(count - 1, 0), axis=1, batch_dims=1)
    return mask & (score >= kth[:, None]) & (count > 0)[:, None]


def random_slots(mask: tf.Tensor, slots: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Indices `[B, slots]` of randomly chosen True entries of `[B, N]` `mask`, and whether each slot is filled.

    Filled slots come first; empty ones point at arbitrary entries.
    """
    noise = tf.random.uniform(tf.shape(mask))
    score = tf.where(mask, noise, -1.0)
    values, indices = tf.math.top_k(score, slots, sorted=True)
    return indices, values >= 0.0


def match_boxes(boxes: tf.Tensor, gt_boxes: tf.Tensor, gt_valid: tf.Tensor):
    """IoU of `[B or 1, N, 4]` boxes with `[B, G, 4]` ground truth; invalid ground truth scores -1.

    Returns `(iou [B, N, G], max_iou [B, N], matched [B, N] int32)`; with no
    valid ground truth `max_iou` is -1.
    """
    iou = iou_matrix(boxes, gt_boxes)
    iou = tf.where(gt_valid[:, None, :], iou, -1.0)
    # A zero-width G axis has no maximum; a -1 column keeps the reductions defined.
    iou_padded = tf.pad(iou, [[0, 0], [0, 0], [0, 1]], constant_values=-1.0)
    max_iou = tf.reduce_max(iou_padded, axis=-1)
    matched = tf.argmax(iou_padded, axis=-1, output_type=tf.int32)
    matched = tf.minimum(matched, tf.maximum(tf.shape(gt_boxes)[1] - 1, 0))
    return iou, max_iou, matched


class RPNTargets(NamedTuple):
    labels: tf.Tensor  # [B, A] 1 for positive anchors
    sampled: tf.Tensor  # [B, A] bool, anchors that enter the objectness loss
    positive: tf.Tensor  # [B, A] bool, sampled positives (enter the box loss)
    deltas: tf.Tensor  # [B, A, 4] encoded matched ground truth


def rpn_targets(
    anchors: tf.Tensor,
    gt_boxes: tf.Tensor,
    gt_valid: tf.Tensor,
    samples_per_image: int = 256,
    positive_fraction: float = 0.5,
    iou_thresholds: Sequence[float] = (0.3, 0.7),
    box_weights: Sequence[float] = DEFAULT_BOX_WEIGHTS,
) -> RPNTargets:
    """Label anchors (positive: IoU >= high, or the best anchor of a box; negative: IoU < low) and sample them."""
    low, high = iou_thresholds
    iou, max_iou, matched = match_boxes(anchors[None], gt_boxes, gt_valid)
    # Every box keeps its best anchors, even below the threshold.
    best_per_box = tf.reduce_max(iou, axis=1, keepdims=True)  # [B, 1, G]
    is_best = tf.equal(iou, best_per_box) & (iou > 0.0) & gt_valid[:, None, :]
    positive = (max_iou >= high) | tf.reduce_any(is_best, axis=-1)
    negative = (max_iou < low) & ~positive

    max_positive = int(samples_per_image * positive_fraction)
    num_positive = tf.minimum(tf.reduce_sum(tf.cast(positive, tf.int32), axis=1), max_positive)
    positive = random_subset(positive, num_positive, max_positive)
    negative = random_subset(negative, samples_per_image - num_positive, samples_per_image)

    matched_boxes = tf.gather(gt_boxes, matched, axis=1, batch_dims=1)
    deltas = encode_boxes(matched_boxes, anchors[None], box_weights)
    return RPNTargets(tf.cast(positive, tf.float32), positive | negative, positive, deltas)


class RoISamples(NamedTuple):
    rois: tf.Tensor  # [B, R, 4]; positives in the first `positive slots`, negatives after
    valid: tf.Tensor  # [B, R] bool, slot holds a sampled RoI
    positive: tf.Tensor  # [B, R] bool
    classes: tf.Tensor  # [B, R] int32, 0 = background
    deltas: tf.Tensor  # [B, R, 4] encoded matched ground truth
    gt_boxes: tf.Tensor  # [B, R, 4] matched ground-truth box of each RoI


def sample_rois(
    proposals: tf.Tensor,
    proposal_valid: tf.Tensor,
    gt_boxes: tf.Tensor,
    gt_classes: tf.Tensor,
    gt_valid: tf.Tensor,
    rois_per_image: int = 128,
    positive_fraction: float = 0.25,
    iou_threshold: float = 0.5,
    box_weights: Sequence[float] = DEFAULT_BOX_WEIGHTS,
) -> RoISamples:
    """Sample RoIs for the box and mask heads from the proposals plus the ground-truth boxes.

    RoIs with IoU >= `iou_threshold` are positives and take the class of their
    box; the rest are background. The first `rois_per_image * positive_fraction`
    slots are reserved for positives, the others for negatives; a slot with no
    candidate left is marked invalid.
    """
    candidates = tf.concat([proposals, gt_boxes], axis=1)
    valid = tf.concat([proposal_valid, gt_valid], axis=1)
    _, max_iou, matched = match_boxes(candidates, gt_boxes, gt_valid)
    positive = valid & (max_iou >= iou_threshold)
    negative = valid & ~positive

    positive_slots = int(rois_per_image * positive_fraction)
    pos_index, pos_filled = random_slots(positive, positive_slots)
    neg_index, neg_filled = random_slots(negative, rois_per_image - positive_slots)
    index = tf.concat([pos_index, neg_index], axis=1)
    filled = tf.concat([pos_filled, neg_filled], axis=1)
    is_positive = tf.concat([pos_filled, tf.zeros_like(neg_filled)], axis=1)

    rois = tf.gather(candidates, index, axis=1, batch_dims=1)
    roi_gt = tf.gather(matched, index, axis=1, batch_dims=1)
    matched_boxes = tf.gather(gt_boxes, roi_gt, axis=1, batch_dims=1)
    classes = tf.where(is_positive, tf.gather(tf.cast(gt_classes, tf.int32), roi_gt, axis=1, batch_dims=1), 0)
    deltas = encode_boxes(matched_boxes, rois, box_weights)
    return RoISamples(rois, filled, is_positive, classes, deltas, matched_boxes)


def box_mask_targets(rois: tf.Tensor, gt_boxes: tf.Tensor, size: int) -> tf.Tensor:
    """`[..., size, size]` mask of a filled ground-truth box, seen through its RoI.

    A mask cell is 1 when its centre lies in the box (top/left edges inclusive),
    the rule the pipeline uses to draw masks from boxes.
    """
    steps = (tf.range(size, dtype=tf.float32) + 0.5) / size

    def inside(start, end, gt_start, gt_end):
        points = start[..., None] + steps * (end - start)[..., None]
        return (points >= gt_start[..., None]) & (points < gt_end[..., None])

    rows = inside(rois[..., 0], rois[..., 2], gt_boxes[..., 0], gt_boxes[..., 2])
    cols = inside(rois[..., 1], rois[..., 3], gt_boxes[..., 1], gt_boxes[..., 3])
    return tf.cast(rows[..., :, None] & cols[..., None, :], tf.float32)

"""Segmentation metrics: per-image Dice and IoU (Keras metrics and exact numpy versions).

Conventions: ground truth is foreground where ``y_true > 0.5``; a prediction is foreground
where ``y_pred >= threshold`` (as in ``keras.metrics.BinaryIoU``). An image whose ground truth
and thresholded prediction are both empty scores ``empty_score`` (default 1.0: nothing to find,
nothing found); ``empty_score=None`` leaves such images out of the mean instead. The Keras
metrics hold sums in sync-on-read ``SUM`` variables, so under ``tf.distribute`` each replica
accumulates its own shard and reading the result adds the replicas up.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from caaxr_tf.metrics._common import _binary_masks, _per_example_weights

# --------------------------------------------------------------------------- #
# Segmentation: per-image Dice and IoU
# --------------------------------------------------------------------------- #


class _PerImageOverlap(keras.metrics.Metric):
    """Weighted mean over images of a per-image overlap score.

    State: ``total`` (sum of weight * score) and ``count`` (sum of weights).
    ``sample_weight`` is one weight per image (``[N]`` or ``[N, 1, ...]``);
    pixel-wise weights are rejected because they have no meaning for a
    per-image ratio.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        empty_score: float | None = 1.0,
        name: str | None = None,
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        self.threshold = float(threshold)
        self.empty_score = None if empty_score is None else float(empty_score)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    @staticmethod
    def _ratio(intersection, true_sum, pred_sum):
        raise NotImplementedError

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth, pred = _binary_masks(y_true, y_pred, self.threshold)
        axes = tuple(range(1, len(truth.shape)))
        intersection = ops.sum(truth * pred, axis=axes)
        true_sum = ops.sum(truth, axis=axes)
        pred_sum = ops.sum(pred, axis=axes)
        empty = ops.equal(true_sum + pred_sum, 0.0)
        scores = self._ratio(intersection, true_sum, pred_sum)
        weights = _per_example_weights(sample_weight, truth)
        if self.empty_score is None:
            weights = ops.where(empty, 0.0, weights)
            scores = ops.where(empty, 0.0, scores)
        else:
            scores = ops.where(empty, self.empty_score, scores)
        self.total.assign_add(ops.cast(ops.sum(weights * scores), self.total.dtype))
        self.count.assign_add(ops.cast(ops.sum(weights), self.count.dtype))

    def result(self):
        return ops.divide_no_nan(self.total, self.count)

    def get_config(self):
        return {
            **super().get_config(),
            "threshold": self.threshold,
            "empty_score": self.empty_score,
        }


@keras.saving.register_keras_serializable(package="caaxr_tf")
class Dice(_PerImageOverlap):
    """Mean over images of the Dice coefficient ``2|T∩P| / (|T| + |P|)``.

    Each image is scored on its own and the scores are averaged (not one Dice
    pooled over all pixels). ``T`` is ``y_true > 0.5``, ``P`` is
    ``y_pred >= threshold``; masks are ``[N, H, W, 1]`` or ``[N, H, W]``.

    Args:
        threshold: Probability at or above which a pixel is predicted foreground.
        empty_score: Score of an image with empty ``T`` and empty ``P``
            (default 1.0). ``None`` excludes such images from the mean.
        name: Metric name.
        dtype: Dtype of the state and result.

    ``sample_weight`` weights images (one value per image). With no scored
    image the result is 0.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        empty_score: float | None = 1.0,
        name: str = "dice",
        dtype=None,
    ):
        super().__init__(threshold=threshold, empty_score=empty_score, name=name, dtype=dtype)

    @staticmethod
    def _ratio(intersection, true_sum, pred_sum):
        return ops.divide_no_nan(2.0 * intersection, true_sum + pred_sum)


@keras.saving.register_keras_serializable(package="caaxr_tf")
class IoU(_PerImageOverlap):
    """Mean over images of the Jaccard index ``|T∩P| / |T∪P|``.

    Same conventions as `Dice` (per-image mean, ``y_pred >= threshold``,
    ``empty_score`` for empty-vs-empty images, one weight per image).
    """

    def __init__(
        self,
        threshold: float = 0.5,
        empty_score: float | None = 1.0,
        name: str = "iou",
        dtype=None,
    ):
        super().__init__(threshold=threshold, empty_score=empty_score, name=name, dtype=dtype)

    @staticmethod
    def _ratio(intersection, true_sum, pred_sum):
        return ops.divide_no_nan(intersection, true_sum + pred_sum - intersection)


def _overlap_counts(y_true: np.ndarray, y_pred: np.ndarray, threshold: float):
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.ndim == y_pred.ndim - 1:
        y_true = y_true[..., None]
    elif y_pred.ndim == y_true.ndim - 1:
        y_pred = y_pred[..., None]
    if y_true.shape != y_pred.shape:
        raise ValueError(f"mask shapes differ: {y_true.shape} vs {y_pred.shape}")
    n = y_true.shape[0]
    truth = y_true.reshape(n, -1) > 0.5
    pred = y_pred.reshape(n, -1) >= threshold
    intersection = np.logical_and(truth, pred).sum(axis=1).astype(np.float64)
    return intersection, truth.sum(axis=1).astype(np.float64), pred.sum(axis=1).astype(np.float64)


def _fill_empty(scores: np.ndarray, empty: np.ndarray, empty_score: float | None) -> np.ndarray:
    scores[empty] = np.nan if empty_score is None else float(empty_score)
    return scores


def dice_per_image(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    threshold: float = 0.5,
    empty_score: float | None = 1.0,
) -> np.ndarray:
    """Dice of each image in a batch ``[N, H, W(, 1)]``, as float64 ``[N]``.

    Same conventions as the `Dice` metric; with ``empty_score=None``
    empty-vs-empty images are NaN (use ``np.nanmean``).
    """
    intersection, true_sum, pred_sum = _overlap_counts(y_true, y_pred, threshold)
    denom = true_sum + pred_sum
    empty = denom == 0
    scores = 2.0 * intersection / np.where(empty, 1.0, denom)
    return _fill_empty(scores, empty, empty_score)


def iou_per_image(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    threshold: float = 0.5,
    empty_score: float | None = 1.0,
) -> np.ndarray:
    """IoU of each image in a batch ``[N, H, W(, 1)]``, as float64 ``[N]``.

    Same conventions as `dice_per_image`.
    """
    intersection, true_sum, pred_sum = _overlap_counts(y_true, y_pred, threshold)
    union = true_sum + pred_sum - intersection
    empty = union == 0
    scores = intersection / np.where(empty, 1.0, union)
    return _fill_empty(scores, empty, empty_score)

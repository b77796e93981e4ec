"""Benchmark metrics: per-image Dice / IoU, sensitivity at fixed specificity, class-wise ROC AUC.

Two flavours of each metric live here:

* Stateful Keras 3 metrics for ``model.compile(metrics=[...])``. Their state is
  only sums and counts held in ``Metric`` variables (sync-on-read, ``SUM``
  aggregation), so under ``tf.distribute`` each replica accumulates its own
  shard and Keras adds the replicas up when ``result()`` reads the state.
* Plain numpy functions for the offline evaluation code (arrays in, floats out).

Conventions shared by both flavours:

* Masks: ground truth is foreground where ``y_true > 0.5``; a prediction is
  foreground where ``y_pred >= threshold`` (as in ``keras.metrics.BinaryIoU``).
* Empty masks: an image whose ground truth and thresholded prediction are both
  empty scores ``empty_score`` (default 1.0: nothing to find, nothing found).
  ``empty_score=None`` leaves such images out of the mean instead.
* Scores: ``y_pred`` holds probabilities in ``[0, 1]`` (softmax or sigmoid);
  a case is called positive for a class when its score is ``>= t``.
* Labels for the classification metrics: one-hot (or multi-hot) ``[N, C]`` or
  integer ``[N]`` / ``[N, 1]``. With a single output column (``C == 1``) the
  labels are read as binary 0/1 whatever their shape.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from keras import ops

__all__ = [
    "Dice",
    "IoU",
    "SensitivityAtSpecificity",
    "ClasswiseAUC",
    "dice_per_image",
    "iou_per_image",
    "sensitivity_at_specificity",
    "auc_per_class",
]

DEFAULT_NUM_THRESHOLDS = 10001


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #


def _per_example_weights(sample_weight, n_like):
    """Weights of shape ``[N]`` (ones when ``sample_weight`` is None).

    ``n_like`` is any tensor with the batch as its first axis. Accepted weights
    are a scalar, ``[N]`` or ``[N, 1, ..., 1]``.
    """
    first = n_like[(slice(None),) + (0,) * (len(n_like.shape) - 1)]
    ones = ops.ones_like(ops.cast(first, "float32"))
    if sample_weight is None:
        return ones
    sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    if len(sample_weight.shape) > 1:
        trailing = sample_weight.shape[1:]
        if any(dim is not None and dim != 1 for dim in trailing):
            raise ValueError(
                "Only one weight per example is supported (shape [N] or [N, 1, ...]); "
                f"received sample_weight with shape {sample_weight.shape}."
            )
        sample_weight = ops.reshape(sample_weight, (-1,))
    return ones * sample_weight


def _binary_masks(y_true, y_pred, threshold: float):
    """Float 0/1 masks of equal rank; ``y_true`` may lack the trailing channel axis."""
    y_true = ops.convert_to_tensor(y_true)
    y_pred = ops.convert_to_tensor(y_pred)
    if len(y_true.shape) == len(y_pred.shape) - 1:
        y_true = ops.expand_dims(y_true, -1)
    elif len(y_pred.shape) == len(y_true.shape) - 1:
        y_pred = ops.expand_dims(y_pred, -1)
    truth = ops.cast(ops.cast(y_true, "float32") > 0.5, "float32")
    pred = ops.cast(ops.cast(y_pred, "float32") >= threshold, "float32")
    return truth, pred


def _one_vs_rest_labels(y_true, y_pred):
    """``(labels, scores)``: boolean ``[N, C]`` labels aligned with float ``[N, C]`` scores."""
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    if len(y_pred.shape) == 1:
        y_pred = ops.expand_dims(y_pred, -1)
    num_classes = y_pred.shape[-1]
    y_true = ops.convert_to_tensor(y_true)
    if num_classes == 1:
        labels = ops.reshape(ops.cast(y_true, "float32"), (-1, 1)) > 0.5
    elif len(y_true.shape) == 2 and y_true.shape[-1] != 1:
        labels = ops.cast(y_true, "float32") > 0.5
    else:
        ids = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        labels = ops.one_hot(ids, num_classes) > 0.5
    return labels, y_pred


def _numpy_one_vs_rest(y_true: np.ndarray, num_classes: int) -> np.ndarray:
    y_true = np.asarray(y_true)
    if num_classes == 1:
        return y_true.reshape(-1, 1) > 0.5
    if y_true.ndim == 2 and y_true.shape[1] != 1:
        return y_true > 0.5
    ids = y_true.reshape(-1).astype(np.int64)
    return ids[:, None] == np.arange(num_classes)[None, :]


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


# --------------------------------------------------------------------------- #
# Classification: score histograms
# --------------------------------------------------------------------------- #


class _ScoreHistogram(keras.metrics.Metric):
    """Per-class histograms of scores for positive and negative cases.

    Scores are rounded onto the grid ``k / (num_thresholds - 1)``,
    ``k = 0 .. num_thresholds - 1``, and the (weighted) number of positives and
    negatives per grid point is accumulated. Rounding is monotone, so any
    two scores keep their order unless they land on the same grid point, and
    identical scores always stay tied. Hence every curve point computed from
    the histogram is an exact point of the ROC curve of the raw scores, and the
    whole curve is exact whenever distinct scores differ by more than one grid
    step (for example scores quantised to 0.01 with the default grid).
    """

    def __init__(
        self,
        num_tracked: int,
        num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
        name: str | None = None,
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds}")
        self.num_thresholds = int(num_thresholds)
        self._num_tracked = int(num_tracked)
        shape = (self._num_tracked, self.num_thresholds)
        self.positives = self.add_variable(shape=shape, initializer="zeros", name="positives")
        self.negatives = self.add_variable(shape=shape, initializer="zeros", name="negatives")

    def _accumulate(self, labels, scores, sample_weight):
        """Add ``[N, K]`` boolean labels / float scores into the ``[K, B]`` histograms."""
        bins = self.num_thresholds
        tracked = self._num_tracked
        grid = ops.round(ops.clip(scores, 0.0, 1.0) * float(bins - 1))
        ids = ops.cast(grid, "int32") + ops.arange(tracked, dtype="int32")[None, :] * bins
        ids = ops.reshape(ids, (-1,))
        weights = ops.expand_dims(_per_example_weights(sample_weight, scores), -1)
        positive = ops.cast(labels, "float32")
        pos_w = ops.reshape(weights * positive, (-1,))
        neg_w = ops.reshape(weights * (1.0 - positive), (-1,))
        size = tracked * bins
        pos_hist = ops.reshape(ops.segment_sum(pos_w, ids, num_segments=size), (tracked, bins))
        neg_hist = ops.reshape(ops.segment_sum(neg_w, ids, num_segments=size), (tracked, bins))
        self.positives.assign_add(ops.cast(pos_hist, self.positives.dtype))
        self.negatives.assign_add(ops.cast(neg_hist, self.negatives.dtype))

    def get_config(self):
        return {**super().get_config(), "num_thresholds": self.num_thresholds}


@keras.saving.register_keras_serializable(package="caaxr_tf")
class SensitivityAtSpecificity(_ScoreHistogram):
    """Best sensitivity (TPR) of one class, one-vs-rest, at specificity >= a target.

    Equals the largest TPR over ROC operating points whose specificity
    ``TN / (TN + FP)`` is at least ``specificity`` (sklearn: max ``tpr`` over
    ``roc_curve(..., drop_intermediate=False)`` points with
    ``1 - fpr >= specificity``), the all-negative point (TPR 0) included.

    Why a histogram rather than an exact sort: an exact value needs every
    score, and a growing list cannot be held in fixed-size variables that
    ``tf.distribute`` adds across replicas. A fine score histogram can, at the
    cost of O(N) per batch and ``2 * num_thresholds`` floats of state. It is
    exact when distinct scores are more than ``1 / (num_thresholds - 1)``
    apart; otherwise it can only underestimate, by at most the share of
    positives whose scores fall on the grid point of the exact optimum's
    threshold. Use `sensitivity_at_specificity` (exact) for reported numbers.

    Args:
        specificity: Target specificity in ``[0, 1]``, e.g. 0.99 or 0.90.
        class_id: Column of ``y_pred`` scored one-vs-rest.
        num_thresholds: Grid size over ``[0, 1]`` (default 10001, step 1e-4).
        name: Metric name (default ``sens_at_spec_<specificity>``).
        dtype: Dtype of the state and result.

    ``y_pred`` is ``[N, C]`` probabilities; ``y_true`` one-hot ``[N, C]`` or
    integer labels. ``sample_weight`` weights cases (one value per case).
    Specificity is compared as ``TN / N >= specificity`` in float64, so an
    exactly met target (e.g. 9 of 10 negatives at 0.9) counts as met. With
    no negatives every threshold qualifies; with no positives the result is 0.
    """

    def __init__(
        self,
        specificity: float,
        class_id: int = 0,
        num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
        name: str | None = None,
        dtype=None,
    ):
        if not 0.0 <= specificity <= 1.0:
            raise ValueError(f"specificity must be in [0, 1], got {specificity}")
        if class_id < 0:
            raise ValueError(f"class_id must be >= 0, got {class_id}")
        super().__init__(
            num_tracked=1,
            num_thresholds=num_thresholds,
            name=name or f"sens_at_spec_{specificity:g}",
            dtype=dtype,
        )
        self.specificity = float(specificity)
        self.class_id = int(class_id)

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels, scores = _one_vs_rest_labels(y_true, y_pred)
        num_classes = scores.shape[-1]
        if num_classes is not None and self.class_id >= num_classes:
            raise ValueError(f"class_id {self.class_id} out of range for {num_classes} classes")
        column = slice(self.class_id, self.class_id + 1)
        self._accumulate(labels[:, column], scores[:, column], sample_weight)

    def result(self):
        pos = ops.cast(self.positives[0], "float64")
        neg = ops.cast(self.negatives[0], "float64")
        zero = ops.zeros((1,), "float64")
        # Operating point k calls "positive" every case on grid point >= k;
        # the extra last point (k = B) calls nothing positive.
        true_pos = ops.concatenate([ops.flip(ops.cumsum(ops.flip(pos, 0)), 0), zero])
        true_neg = ops.concatenate([zero, ops.cumsum(neg)])
        num_pos = ops.sum(pos)
        num_neg = ops.sum(neg)
        spec = ops.where(num_neg > 0, true_neg / ops.maximum(num_neg, 1e-300), 1.0)
        sens = ops.divide_no_nan(true_pos, num_pos)
        best = ops.max(ops.where(spec >= self.specificity, sens, 0.0))
        return ops.cast(best, self.dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "specificity": self.specificity,
            "class_id": self.class_id,
        }


@keras.saving.register_keras_serializable(package="caaxr_tf")
class ClasswiseAUC(_ScoreHistogram):
    """One-vs-rest ROC AUC of every class; ``result()`` is a ``[num_classes]`` vector.

    Computed from per-class score histograms (see `SensitivityAtSpecificity`
    for why) with the Mann-Whitney form ``P(s+ > s-) + 0.5 P(s+ = s-)``, the
    same tie handling as ``sklearn.metrics.roc_auc_score``. Exact when
    distinct scores are more than one grid step apart; otherwise only
    positive/negative pairs sharing a grid point with different scores are
    miscounted (as ties), so the error is at most half the share of such
    pairs: about ``0.5 / num_thresholds`` for spread-out scores, well under
    1e-3 with the default grid.

    Args:
        num_classes: Number of output columns.
        class_names: Optional names (for `per_class`); default ``"0", "1", ...``.
        num_thresholds: Grid size over ``[0, 1]`` (default 10001).
        name: Metric name.
        dtype: Dtype of the state and result.

    Classes with no positives or no negatives get 0 (the Keras convention of
    dividing by zero to 0); `auc_per_class` returns NaN instead.
    ``sample_weight`` weights cases (one value per case).
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
        name: str = "classwise_auc",
        dtype=None,
    ):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for {num_classes} classes")
        super().__init__(
            num_tracked=num_classes, num_thresholds=num_thresholds, name=name, dtype=dtype
        )
        self.num_classes = int(num_classes)
        self.class_names = None if class_names is None else [str(c) for c in class_names]

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels, scores = _one_vs_rest_labels(y_true, y_pred)
        if scores.shape[-1] is not None and scores.shape[-1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} score columns, got {scores.shape[-1]}")
        self._accumulate(labels, scores, sample_weight)

    def result(self):
        pos = ops.cast(self.positives, "float64")
        neg = ops.cast(self.negatives, "float64")
        neg_below = ops.cumsum(neg, axis=1) - neg
        wins = ops.sum(pos * (neg_below + 0.5 * neg), axis=1)
        pairs = ops.sum(pos, axis=1) * ops.sum(neg, axis=1)
        return ops.cast(ops.divide_no_nan(wins, pairs), self.dtype)

    def per_class(self) -> dict[str, float]:
        """The current result keyed by class name (eager use)."""
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        values = ops.convert_to_numpy(self.result())
        return {name: float(value) for name, value in zip(names, values)}

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
        }


# --------------------------------------------------------------------------- #
# Offline classification metrics (exact)
# --------------------------------------------------------------------------- #


def sensitivity_at_specificity(
    y_true_binary: np.ndarray,
    scores: np.ndarray,
    specificity: float,
    sample_weight: np.ndarray | None = None,
) -> float:
    """Exact best sensitivity over thresholds with ``TN / N >= specificity``.

    Every distinct score is a candidate threshold (case positive iff
    ``score >= t``), plus "nothing positive". Returns NaN without positives;
    with no negatives every threshold qualifies (result 1.0).
    """
    if not 0.0 <= specificity <= 1.0:
        raise ValueError(f"specificity must be in [0, 1], got {specificity}")
    labels = np.asarray(y_true_binary).reshape(-1) > 0.5
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    weights = (
        np.ones_like(scores)
        if sample_weight is None
        else np.broadcast_to(np.asarray(sample_weight, np.float64).reshape(-1), scores.shape)
    )
    order = np.argsort(-scores, kind="mergesort")
    scores, labels, weights = scores[order], labels[order], weights[order]
    last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    true_pos = np.r_[0.0, np.cumsum(weights * labels)[last_of_tie]] if scores.size else np.zeros(1)
    false_pos = np.r_[0.0, np.cumsum(weights * ~labels)[last_of_tie]] if scores.size else np.zeros(1)
    num_pos, num_neg = true_pos[-1], false_pos[-1]
    if num_pos <= 0:
        return float("nan")
    if num_neg > 0:
        feasible = (num_neg - false_pos) / num_neg >= specificity
    else:
        feasible = np.ones_like(true_pos, dtype=bool)
    return float(np.max(true_pos[feasible]) / num_pos)


def auc_per_class(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: Sequence[str] | None = None,
    sample_weight: np.ndarray | None = None,
) -> dict[str, float]:
    """One-vs-rest ROC AUC per class via ``sklearn.metrics.roc_auc_score``.

    ``y_true`` is one-hot ``[N, C]`` or integer ``[N]``; ``y_pred`` is
    ``[N, C]``. A class lacking positives or negatives gets NaN.
    """
    from sklearn.metrics import roc_auc_score

    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_pred.ndim == 1:
        y_pred = y_pred[:, None]
    num_classes = y_pred.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class_names for {num_classes} classes")
    labels = _numpy_one_vs_rest(y_true, num_classes)
    aucs = {}
    for index, name in enumerate(names):
        column = labels[:, index]
        if column.all() or not column.any():
            aucs[str(name)] = float("nan")
        else:
            aucs[str(name)] = float(
                roc_auc_score(column, y_pred[:, index], sample_weight=sample_weight)
            )
    return aucs

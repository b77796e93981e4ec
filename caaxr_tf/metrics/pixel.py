"""Pixel-level F1 over all test pixels, as Degerli et al. (2021) publish it.

True positives, false positives and false negatives are summed over every pixel of every
test image first; F1 is computed once from the sums::

    F1 = 2 TP / (2 TP + FP + FN)

This is not the mean of per-image Dice scores (``caaxr_tf.metrics.Dice``): large lesions weigh
more, and images without lesions add only their false positives.

Conventions (those of caaxr_tf/metrics.py): ground truth is foreground where ``y_true > 0.5``,
a prediction where ``y_pred >= threshold``; ``sample_weight`` is one weight per image. With no
foreground anywhere (``2 TP + FP + FN == 0``) the Keras metric gives 0 (Keras' divide-no-nan
convention) and the numpy functions NaN.

* `PixelF1`: stateful Keras metric; its state is three float64 sums (exact counts up to
  2**53 pixels) held in sync-on-read ``SUM`` variables, so under ``tf.distribute`` every replica
  counts its own shard and reading the result adds the replicas up.
* `pixel_counts` / `PixelCounts`: numpy, for offline evaluation batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from caaxr_tf.metrics._common import _binary_masks, _per_example_weights

PACKAGE = "caaxr_tf"


@keras.saving.register_keras_serializable(package=PACKAGE)
class PixelF1(keras.metrics.Metric):
    """F1 of the foreground pixels pooled over all images seen (see module doc).

    Args:
        threshold: probability at or above which a pixel is predicted foreground.
        name: metric name.
        dtype: dtype of the result (the counts are always float64).

    ``precision()`` and ``recall()`` give the pooled pixel precision and recall.
    """

    def __init__(self, threshold: float = 0.5, name: str = "pixel_f1", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.threshold = float(threshold)
        self.true_positives = self.add_variable(shape=(), initializer="zeros", dtype="float64", name="tp")
        self.false_positives = self.add_variable(shape=(), initializer="zeros", dtype="float64", name="fp")
        self.false_negatives = self.add_variable(shape=(), initializer="zeros", dtype="float64", name="fn")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth, pred = _binary_masks(y_true, y_pred, self.threshold)
        axes = tuple(range(1, len(truth.shape)))
        weights = ops.cast(_per_example_weights(sample_weight, truth), "float64")
        counts = (
            (self.true_positives, truth * pred),
            (self.false_positives, (1.0 - truth) * pred),
            (self.false_negatives, truth * (1.0 - pred)),
        )
        for variable, hits in counts:
            # int32 sums are exact for any image; float32 ones stop at 2**24 pixels
            per_image = ops.cast(ops.sum(ops.cast(hits, "int32"), axis=axes), "float64")
            variable.assign_add(ops.sum(weights * per_image))

    def precision(self):
        return ops.cast(ops.divide_no_nan(self.true_positives, self.true_positives + self.false_positives), self.dtype)

    def recall(self):
        return ops.cast(ops.divide_no_nan(self.true_positives, self.true_positives + self.false_negatives), self.dtype)

    def result(self):
        tp = self.true_positives
        return ops.cast(ops.divide_no_nan(2.0 * tp, 2.0 * tp + self.false_positives + self.false_negatives), self.dtype)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.threshold}


@dataclass
class PixelCounts:
    """Pooled pixel counts; add batches with ``+=`` (or `update`), read `f1`."""

    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0

    def __iadd__(self, other: "PixelCounts") -> "PixelCounts":
        self.true_positives += other.true_positives
        self.false_positives += other.false_positives
        self.false_negatives += other.false_negatives
        return self

    def update(self, y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5) -> None:
        self += pixel_counts(y_true, y_pred, threshold)

    @property
    def f1(self) -> float:
        denominator = 2 * self.true_positives + self.false_positives + self.false_negatives
        return float("nan") if denominator == 0 else 2 * self.true_positives / denominator

    @property
    def precision(self) -> float:
        predicted = self.true_positives + self.false_positives
        return float("nan") if predicted == 0 else self.true_positives / predicted

    @property
    def recall(self) -> float:
        actual = self.true_positives + self.false_negatives
        return float("nan") if actual == 0 else self.true_positives / actual

    def as_dict(self) -> dict[str, float]:
        return {
            "tp": self.true_positives,
            "fp": self.false_positives,
            "fn": self.false_negatives,
            "pixel_precision": self.precision,
            "pixel_recall": self.recall,
            "pixel_f1": self.f1,
        }


def pixel_counts(y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5) -> PixelCounts:
    """TP / FP / FN pixels of a batch of masks (any equal shapes; a missing channel axis is added)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.ndim == y_pred.ndim - 1:
        y_true = y_true[..., None]
    elif y_pred.ndim == y_true.ndim - 1:
        y_pred = y_pred[..., None]
    if y_true.shape != y_pred.shape:
        raise ValueError(f"mask shapes differ: {y_true.shape} vs {y_pred.shape}")
    truth = y_true > 0.5
    pred = y_pred >= threshold
    return PixelCounts(
        true_positives=int(np.count_nonzero(truth & pred)),
        false_positives=int(np.count_nonzero(~truth & pred)),
        false_negatives=int(np.count_nonzero(truth & ~pred)),
    )


def pixel_f1(y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5) -> float:
    """Pixel F1 of one array of masks pooled over all its pixels (NaN with no foreground)."""
    return pixel_counts(y_true, y_pred, threshold).f1

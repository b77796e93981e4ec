"""Classification metrics: sensitivity at a fixed specificity and class-wise ROC AUC (Keras
metrics over score histograms, exact numpy versions), and the evaluation's classification
report (``classification_metrics``).

Scores are probabilities in ``[0, 1]``; a case is positive for a class when its score is
``>= t``. Labels: one-hot (or multi-hot) ``[N, C]`` or integer ``[N]`` / ``[N, 1]``; with a
single output column (``C == 1``) the labels are read as binary 0/1 whatever their shape.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

from caaxr_tf.metrics._common import _per_example_weights

DEFAULT_NUM_THRESHOLDS = 10001
SPECIFICITIES = (0.99, 0.90)


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


# --------------------------------------------------------------------------- #
# The evaluation's classification report
# --------------------------------------------------------------------------- #


def covid_index(class_names: Sequence[str]) -> int:
    """Index of the class named "covid" (case-insensitive), else 0."""
    lowered = [str(name).strip().lower() for name in class_names]
    return lowered.index("covid") if "covid" in lowered else 0


def classification_metrics(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """AUC per class, COVID sensitivity at 99 % / 90 % specificity, accuracy, confusion matrix."""
    from sklearn.metrics import confusion_matrix

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    names = [str(c) for c in class_names]
    covid = covid_index(names)
    aucs = auc_per_class(labels, scores, names)
    finite = [v for v in aucs.values() if math.isfinite(v)]
    predicted = np.argmax(scores, axis=1)
    result: dict[str, Any] = {
        "class_names": names,
        "covid_class": names[covid],
        "auc_per_class": aucs,
        "auc_macro": float(np.mean(finite)) if finite else float("nan"),
    }
    for specificity in SPECIFICITIES:
        key = f"sensitivity_at_{round(specificity * 100)}_specificity"
        result[key] = sensitivity_at_specificity(labels == covid, scores[:, covid], specificity)
    result["accuracy"] = float(np.mean(predicted == labels)) if labels.size else float("nan")
    matrix = confusion_matrix(labels, predicted, labels=list(range(len(names))))
    result["confusion_matrix"] = {"classes": names, "matrix": matrix.astype(int).tolist()}
    result["class_counts"] = {name: int(np.sum(labels == i)) for i, name in enumerate(names)}
    return result


def headline_metrics(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """The evaluation's numbers (`classification_metrics`) without the confusion matrix and
    counts: what the bootstrap resamples."""
    # the same functions and steps as classification_metrics, without the confusion matrix (speed)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    names = [str(c) for c in class_names]
    covid = covid_index(names)
    aucs = auc_per_class(labels, scores, names)
    finite = [v for v in aucs.values() if math.isfinite(v)]
    result: dict[str, Any] = {"auc_per_class": aucs, "auc_macro": float(np.mean(finite)) if finite else float("nan")}
    for specificity in SPECIFICITIES:
        result[f"sensitivity_at_{round(specificity * 100)}_specificity"] = sensitivity_at_specificity(
            labels == covid, scores[:, covid], specificity)
    result["accuracy"] = float(np.mean(np.argmax(scores, axis=1) == labels)) if labels.size else float("nan")
    return result

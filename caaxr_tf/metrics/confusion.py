"""Per-class sensitivity (recall) and precision of arg-max predictions, from a confusion matrix.

The Keras metrics accumulate the ``[C, C]`` confusion matrix (rows true class, columns
predicted class) in a ``SUM`` variable, so under ``tf.distribute`` the replicas' counts add
up; ``confusion_rates`` is the exact numpy version used by the offline evaluation.
A class without true cases has sensitivity 0 in the Keras metric (Keras' divide-no-nan
convention) and ``None`` (undefined) in ``confusion_rates``; likewise precision for a class
never predicted.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

from caaxr_tf.metrics._common import _per_example_weights


class _ConfusionMatrix(keras.metrics.Metric):
    """Accumulates the confusion matrix of ``argmax(y_true)`` against ``argmax(y_pred)``."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, name: str | None = None,
                 dtype=None):
        super().__init__(name=name, dtype=dtype)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.matrix = self.add_variable(shape=(self.num_classes, self.num_classes), initializer="zeros",
                                        name="confusion_matrix", aggregation="sum")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
        if y_pred.shape[-1] is not None and y_pred.shape[-1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} score columns, got {y_pred.shape[-1]}")
        truth = ops.cast(ops.argmax(y_true, axis=-1), "int32")
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        weights = _per_example_weights(sample_weight, y_pred)
        cells = truth * self.num_classes + predicted
        counts = ops.segment_sum(weights, cells, num_segments=self.num_classes * self.num_classes)
        self.matrix.assign_add(ops.cast(ops.reshape(counts, (self.num_classes, self.num_classes)), self.matrix.dtype))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes, "class_names": self.class_names}


@keras.saving.register_keras_serializable(package="caaxr_tf")
class ClasswiseSensitivity(_ConfusionMatrix):
    """Per class: true cases predicted as that class / true cases of it (recall), ``[C]``."""

    def result(self):
        diagonal = ops.diagonal(self.matrix)
        return ops.divide_no_nan(diagonal, ops.sum(self.matrix, axis=1))


@keras.saving.register_keras_serializable(package="caaxr_tf")
class ClasswisePrecision(_ConfusionMatrix):
    """Per class: cases correctly predicted as that class / cases predicted as it, ``[C]``."""

    def result(self):
        diagonal = ops.diagonal(self.matrix)
        return ops.divide_no_nan(diagonal, ops.sum(self.matrix, axis=0))


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` int64 counts, rows true class, columns predicted class."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
    if labels.shape != predicted.shape:
        raise ValueError(f"{labels.size} labels for {predicted.size} predictions")
    for name, values in (("labels", labels), ("predictions", predicted)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}")
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def confusion_rates(labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """``accuracy``, ``sensitivity`` and ``precision`` per class (``None`` when undefined) and the
    ``confusion_matrix`` ``{"classes", "matrix"}`` of integer class indices."""
    names = [str(name) for name in class_names]
    matrix = confusion_matrix(labels, predicted, len(names))
    diagonal, true_counts, predicted_counts = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
    total = int(matrix.sum())

    def ratio(numerator: int, denominator: int) -> float | None:
        return float(numerator) / float(denominator) if denominator else None

    return {
        "accuracy": ratio(int(diagonal.sum()), total),
        "sensitivity": {name: ratio(int(diagonal[i]), int(true_counts[i])) for i, name in enumerate(names)},
        "precision": {name: ratio(int(diagonal[i]), int(predicted_counts[i])) for i, name in enumerate(names)},
        "confusion_matrix": {"classes": names, "matrix": matrix.tolist()},
    }

"""Regression metrics for multi-target scores (e.g. geographic extent and opacity).

Keras metrics for training and validation, per target:

* MAE, MSE and R² are Keras' own (``keras.metrics.MeanAbsoluteError``,
  ``MeanSquaredError``, ``R2Score``). Given ``[N, T]`` inputs the first two average over the
  targets as well and ``R2Score`` averages its per-target scores (``class_aggregation=
  "uniform_average"``), so `TargetColumn` applies any of them to one target column.
* `PearsonR` is missing from Keras and written here. Its state is six weighted sums per
  target (``n, Σx, Σy, Σx², Σy², Σxy``) in float64 with ``SUM`` aggregation, so the result is
  exact over any number of batches and under ``tf.distribute`` (replicas' sums are added).
* `regression_metrics(target_names)` builds the four metrics for every target, named
  ``<target>_mae``, ``<target>_mse``, ``<target>_r2``, ``<target>_pearson_r``.

Exact NumPy versions for offline evaluation: `regression_scores` (MAE, MSE, R², Pearson r of
one target) and `pearson_r`. An undefined score (R² with constant truth, r with a constant
input) is NaN there and 0 in the Keras metrics (Keras' divide-by-zero convention).
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

__all__ = [
    "METRIC_NAMES",
    "PearsonR",
    "TargetColumn",
    "pearson_r",
    "regression_metrics",
    "regression_scores",
]

METRIC_NAMES = ("mae", "mse", "r2", "pearson_r")


# --------------------------------------------------------------------------- #
# Keras metrics
# --------------------------------------------------------------------------- #


def _as_columns(tensor) -> Any:
    """``[N]`` -> ``[N, 1]``; ``[N, T]`` unchanged."""
    tensor = ops.convert_to_tensor(tensor)
    return ops.expand_dims(tensor, -1) if len(tensor.shape) == 1 else tensor


@keras.saving.register_keras_serializable(package="caaxr_tf")
class PearsonR(keras.metrics.Metric):
    """Pearson correlation between ``y_true`` and ``y_pred``, per output column.

    Exact over batches and replicas: the state is weighted sums, combined as
    ``r = (S Σwxy - Σwx Σwy) / sqrt((S Σwx² - (Σwx)²) (S Σwy² - (Σwy)²))`` with ``S = Σw``.
    Sums are float64 so the differences do not cancel away at float32 precision.

    Args:
        class_aggregation: ``"uniform_average"`` (mean of the per-column r, the default, as in
            ``keras.metrics.R2Score``) or ``None`` (a vector, one r per column).
        name: Metric name.
        dtype: Dtype of the result.

    Inputs are ``[N]`` or ``[N, T]``; ``sample_weight`` is one weight per example (``[N]`` or
    ``[N, 1]``). A column whose truth or prediction has zero variance gives 0.
    """

    def __init__(self, class_aggregation: str | None = "uniform_average", name: str = "pearson_r", dtype=None):
        super().__init__(name=name, dtype=dtype)
        if class_aggregation not in (None, "uniform_average"):
            raise ValueError(
                f"class_aggregation must be None or 'uniform_average', got {class_aggregation!r}"
            )
        self.class_aggregation = class_aggregation
        self._num_columns: int | None = None

    def _build(self, num_columns: int | None) -> None:
        if num_columns is None:
            raise ValueError("PearsonR needs a known number of columns (last axis of y_pred)")
        self._num_columns = int(num_columns)
        for name in ("weight", "sum_true", "sum_pred", "sum_true_sq", "sum_pred_sq", "sum_cross"):
            setattr(self, name, self.add_variable(shape=(num_columns,), initializer="zeros", dtype="float64", name=name))

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.cast(_as_columns(y_true), "float64")
        y_pred = ops.cast(_as_columns(y_pred), "float64")
        if self._num_columns is None:
            self._build(y_pred.shape[-1])
        elif y_pred.shape[-1] is not None and y_pred.shape[-1] != self._num_columns:
            raise ValueError(f"{self.name}: built for {self._num_columns} columns, got {y_pred.shape[-1]}")
        if sample_weight is None:
            weights = ops.ones_like(y_pred[:, :1])
        else:
            weights = ops.reshape(ops.cast(ops.convert_to_tensor(sample_weight), "float64"), (-1, 1))
        weights = ops.broadcast_to(weights, ops.shape(y_pred))
        y_true = ops.broadcast_to(y_true, ops.shape(y_pred))
        for variable, values in (
            (self.weight, weights),
            (self.sum_true, weights * y_true),
            (self.sum_pred, weights * y_pred),
            (self.sum_true_sq, weights * y_true * y_true),
            (self.sum_pred_sq, weights * y_pred * y_pred),
            (self.sum_cross, weights * y_true * y_pred),
        ):
            variable.assign_add(ops.sum(values, axis=0))

    def result(self):
        if self._num_columns is None:
            return ops.cast(0.0, self.dtype)
        total = self.weight
        covariance = total * self.sum_cross - self.sum_true * self.sum_pred
        var_true = total * self.sum_true_sq - self.sum_true * self.sum_true
        var_pred = total * self.sum_pred_sq - self.sum_pred * self.sum_pred
        denominator = ops.sqrt(ops.maximum(var_true, 0.0) * ops.maximum(var_pred, 0.0))
        r = ops.divide_no_nan(covariance, denominator)
        if self.class_aggregation == "uniform_average":
            r = ops.mean(r)
        return ops.cast(r, self.dtype)

    def reset_state(self):
        for variable in self.variables:
            variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "class_aggregation": self.class_aggregation}


@keras.saving.register_keras_serializable(package="caaxr_tf")
class TargetColumn(keras.metrics.Metric):
    """Apply ``metric`` to column ``index`` of ``[N, T]`` targets and predictions.

    ``TargetColumn(keras.metrics.MeanAbsoluteError(), 0, name="geographic_extent_mae")``
    is the MAE of the first target alone. The wrapped metric keeps the state; its result is
    this metric's result.
    """

    def __init__(self, metric: keras.metrics.Metric | dict, index: int, name: str | None = None, dtype=None):
        if isinstance(metric, dict):
            metric = keras.metrics.deserialize(metric)
        if not isinstance(metric, keras.metrics.Metric):
            raise TypeError(f"metric must be a keras.metrics.Metric, got {type(metric).__name__}")
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        super().__init__(name=name or f"{metric.name}_{index}", dtype=dtype or metric.dtype)
        self.metric = metric
        self.index = int(index)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true, y_pred = _as_columns(y_true), _as_columns(y_pred)
        columns = y_pred.shape[-1]
        if columns is not None and self.index >= columns:
            raise ValueError(f"{self.name}: column {self.index} of a {columns}-column prediction")
        column = slice(self.index, self.index + 1)
        self.metric.update_state(y_true[:, column], y_pred[:, column], sample_weight=sample_weight)

    def result(self):
        return self.metric.result()

    def reset_state(self):
        self.metric.reset_state()

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "metric": keras.metrics.serialize(self.metric), "index": self.index}


def regression_metrics(target_names: Sequence[str]) -> list[keras.metrics.Metric]:
    """MAE, MSE, R² and Pearson r of every target, as scalar metrics named ``<target>_<metric>``.

    ``target_names[i]`` names column ``i`` of ``y_true`` / ``y_pred``. Create them inside
    ``strategy.scope()`` when training under ``tf.distribute``.
    """
    metrics: list[keras.metrics.Metric] = []
    for index, target in enumerate(target_names):
        for suffix, metric in (
            ("mae", keras.metrics.MeanAbsoluteError()),
            ("mse", keras.metrics.MeanSquaredError()),
            ("r2", keras.metrics.R2Score()),
            ("pearson_r", PearsonR()),
        ):
            metrics.append(TargetColumn(metric, index, name=f"{target}_{suffix}"))
    return metrics


# --------------------------------------------------------------------------- #
# Exact NumPy versions
# --------------------------------------------------------------------------- #


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two vectors (float64); NaN when either is constant or shorter than 2."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    # An exactly constant input has zero deviations; rounding noise must not pass for signal.
    if denominator == 0.0 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(np.clip(np.sum(dx * dy) / denominator, -1.0, 1.0))


def regression_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """``{"mae", "mse", "r2", "pearson_r"}`` of one target (vectors of equal length).

    R² is ``1 - SS_res / SS_tot`` on ``y_true`` (as ``sklearn.metrics.r2_score``), NaN when
    ``y_true`` is constant; ``pearson_r`` is NaN when either vector is constant (a constant
    prediction, such as the intercept-only baseline, has no correlation).
    """
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shapes differ: {y_true.shape} vs {y_pred.shape}")
    if y_true.size == 0:
        raise ValueError("no values to score")
    residual = y_true - y_pred
    total = np.sum((y_true - y_true.mean()) ** 2)
    return {
        "mae": float(np.mean(np.abs(residual))),
        "mse": float(np.mean(residual**2)),
        "r2": float(1.0 - np.sum(residual**2) / total) if total > 0 else float("nan"),
        "pearson_r": pearson_r(y_true, y_pred),
    }

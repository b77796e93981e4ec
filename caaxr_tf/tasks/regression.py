"""Regression of float scores per image (the ``severity`` protocol: geographic extent and opacity,
Cohen et al. 2020): the record's ``targets``, a squared-error loss, per-target MAE, MSE, R² and
Pearson r. Training uses the raw outputs; evaluation and exported models clamp each target to
its range from the protocol (summary.json ``target_ranges``, carried in the run config), so an
evaluation scores what the served model returns."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from caaxr_tf.tasks.base import BootstrapInputs, EvalContext, EvalResult, Predict, Task, check_finite, format_value, register_task
from caaxr_tf.config import ConfigError
from caaxr_tf.data.pipeline import decode_common
from caaxr_tf.data.schema import GROUPED_HALVES, MANIFEST_FILE, read_summary
from caaxr_tf.io import json_safe
from caaxr_tf.metrics import regression_scores
from caaxr_tf.metrics.regression import regression_metrics
from caaxr_tf.models import build_model
from caaxr_tf.severity.scores import MeanStd

METRIC_NAMES = ("mae", "mse", "r2", "pearson_r")
METRIC_TITLES = {"mae": "MAE", "mse": "MSE", "r2": "R²", "pearson_r": "Pearson r"}


def manifest_targets(protocol_dir: Path, split: str, fold: int, target_names: Sequence[str]) -> np.ndarray:
    """``[N, T]`` targets of a split, from the protocol's manifest.csv (``target_<name>`` columns)."""
    with open(Path(protocol_dir) / MANIFEST_FILE, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r[f"split_fold{fold}"] == split]
    return np.array([[float(r[f"target_{name}"]) for name in target_names] for r in rows], np.float64).reshape(
        -1, len(target_names))


def check_target_ranges(ranges: Mapping[str, Sequence[float]], target_names: Sequence[str]
                        ) -> dict[str, tuple[float, float]]:
    """``{target: (low, high)}`` for targets among ``target_names`` (others: ValueError)."""
    checked = {}
    for name, bounds in ranges.items():
        if name not in target_names:
            raise ValueError(f"target_ranges names {name!r}, not one of the targets {list(target_names)}")
        low, high = (float(b) for b in bounds)
        if not low <= high:
            raise ValueError(f"target_ranges[{name!r}]: low {low} > high {high}")
        checked[str(name)] = (low, high)
    return checked


def flat_regression_scores(truth: np.ndarray, predicted: np.ndarray, target_names: Sequence[str]) -> dict[str, float]:
    """``<target>_<mae|mse|r2|pearson_r>`` as in metrics.json (`regression_scores` per column)."""
    return {f"{name}_{metric}": value
            for j, name in enumerate(target_names)
            for metric, value in regression_scores(truth[:, j], predicted[:, j]).items() if metric in METRIC_NAMES}


@register_task
class RegressionTask(Task):
    """Float targets named by the protocol's ``target_names``; ``output_bias`` starts the model at
    the training split's means (the intercept-only predictor)."""

    name = protocol_task = model_task = "regression"
    losses = ("mse", "mae", "huber")
    reported_outputs = ("scores",)

    def __init__(self, class_names: Sequence[str], *, loss: str | None = None,
                 loss_kwargs: Mapping[str, Any] | None = None, target_names: Sequence[str] = (),
                 training_means: Sequence[float] | None = None,
                 target_ranges: Mapping[str, Sequence[float]] | None = None):
        super().__init__(class_names, loss=loss, loss_kwargs=loss_kwargs, target_names=target_names)
        self.reported_outputs = ("scores", *self.target_names)
        self.training_means = None if training_means is None else [float(m) for m in training_means]
        self.target_ranges = check_target_ranges(target_ranges or {}, self.target_names)

    @classmethod
    def from_config(cls, config: Any, summary: Mapping[str, Any] | None = None) -> "RegressionTask":
        if not config.target_names:
            raise ConfigError(f"{config.tfrecords}: a regression protocol names its targets (summary.json target_names)")
        means = manifest_targets(Path(config.tfrecords), "train", config.fold, config.target_names).mean(axis=0)
        return cls(config.class_names, loss=config.loss, loss_kwargs=config.loss_kwargs,
                   target_names=config.target_names, training_means=means.tolist(),
                   target_ranges=config.target_ranges)

    # inputs -----------------------------------------------------------------------

    def decode(self, record: Mapping[str, tf.Tensor], image_size: int) -> dict[str, tf.Tensor]:
        decoded = decode_common(record, image_size)
        targets = tf.reshape(tf.cast(record["targets"], tf.float32), [len(self.target_names)])
        decoded["targets"] = targets
        return decoded

    def target(self, batch: Mapping[str, tf.Tensor]) -> tf.Tensor:
        return batch["targets"]

    # training ---------------------------------------------------------------------

    def build_model(self, config: Any):
        kwargs = dict(config.model_kwargs)
        if self.training_means is not None:
            kwargs.setdefault("output_bias", self.training_means)
        return build_model(config.model, num_classes=len(self.target_names), weights=config.weights,
                           input_shape=(config.image_size, config.image_size, 1), **kwargs)

    def per_example_loss(self, targets: Any, outputs: Any) -> tf.Tensor:
        import keras

        outputs = tf.cast(outputs, tf.float32)
        if self.loss == "mae":
            return keras.losses.mean_absolute_error(targets, outputs)
        if self.loss == "huber":
            return keras.losses.huber(targets, outputs, **self.loss_kwargs)
        return keras.losses.mean_squared_error(targets, outputs)

    def make_metrics(self) -> list:
        return regression_metrics(self.target_names)

    def metric_inputs(self, targets: Any, outputs: Any) -> tuple[Any, Any]:
        return targets, tf.cast(outputs, tf.float32)

    # evaluation -------------------------------------------------------------------

    def scores(self, truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
        """Per target: MAE, MSE, R², Pearson r (``caaxr_tf.metrics.regression_scores``)."""
        per_target = {name: regression_scores(truth[:, j], predicted[:, j]) for j, name in enumerate(self.target_names)}
        flat = {f"{name}_{metric}": values[metric] for name, values in per_target.items() for metric in METRIC_NAMES}
        return {"target_names": list(self.target_names), "per_target": per_target, **flat}

    def evaluate(self, predict: Predict, dataset: Any, context: EvalContext) -> EvalResult:
        ids, truth, predicted = [], [], []
        for images, targets, batch_ids in dataset:
            batch_ids = [i.decode("utf-8") for i in batch_ids.numpy()]
            outputs = np.asarray(predict(images), np.float64).reshape(len(batch_ids), -1)
            check_finite(outputs, batch_ids)
            predicted.append(self.clamp(outputs))
            truth.append(np.asarray(targets, np.float64))
            ids.extend(batch_ids)
        if not ids:
            raise ValueError("no images in this split")
        truth_np, predicted_np = np.concatenate(truth), np.concatenate(predicted)
        metrics = {"num_images": len(ids), **self.scores(truth_np, predicted_np)}
        if context.plots:
            from caaxr_tf.severity.plots import plot_predicted_vs_true

            plot_predicted_vs_true(truth_np, predicted_np, self.target_names, context.path("scatter", "png"),
                                   title=context.title)
        header = ["image_id", *(f"true_{n}" for n in self.target_names), *(f"predicted_{n}" for n in self.target_names)]
        rows = [[image_id, *(f"{v:.6f}" for v in t), *(f"{v:.6f}" for v in p)]
                for image_id, t, p in zip(ids, truth_np, predicted_np)]
        return EvalResult(metrics, header, rows)

    def bootstrap_inputs(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> BootstrapInputs | None:
        """True and predicted targets (``true_<t>``, ``predicted_<t>``): MAE, MSE, R², r per target."""
        header, names = list(header), list(self.target_names)
        if any(f"{kind}_{n}" not in header for n in names for kind in ("true", "predicted")):
            return None
        truth = np.array([[float(row[header.index(f"true_{n}")]) for n in names] for row in rows])
        predicted = np.array([[float(row[header.index(f"predicted_{n}")]) for n in names] for row in rows])
        return BootstrapInputs(flat_regression_scores, truth, predicted, {"target_names": names})

    def clamp(self, outputs: np.ndarray) -> np.ndarray:
        """``[N, T]`` outputs with each target clamped to its range (``target_ranges``), as the
        exported model serves them; targets without a range are left as they are."""
        if not self.target_ranges:
            return outputs
        lower = [self.target_ranges.get(name, (-np.inf, np.inf))[0] for name in self.target_names]
        upper = [self.target_ranges.get(name, (-np.inf, np.inf))[1] for name in self.target_names]
        return np.clip(outputs, np.asarray(lower, outputs.dtype), np.asarray(upper, outputs.dtype))

    def format_metrics(self, metrics: Mapping[str, Any]) -> list[str]:
        lines = ["  " + " " * 20 + "".join(f"{METRIC_TITLES[m]:>11}" for m in METRIC_NAMES)]
        for name in self.target_names:
            lines.append(f"  {name:<20}" + "".join(f"{format_value(metrics.get(f'{name}_{m}')):>11}" for m in METRIC_NAMES))
        return lines

    def baselines(self, protocol_dir: Path, split: str, fold: int, subsets: Sequence[str],
                  folds: Sequence[int] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """The intercept-only predictor: every image gets the training split's mean targets.

        On a ``grouped_halves`` protocol it is the published "no data" baseline: the test half
        gets the mean of the whole training half (train and val), as mean ± std over ``folds``
        (the CV run's) and over all the protocol's folds.
        """
        summary = read_summary(protocol_dir)
        if summary.get("split_scheme") == GROUPED_HALVES:
            every = list(range(1, int(summary["folds"]) + 1))
            rows = {}
            for chosen in dict.fromkeys([tuple(folds or [fold]), tuple(every)]):
                label = f"training-half mean (intercept only), {len(chosen)} split{'s' if len(chosen) > 1 else ''}"
                rows[label] = self.half_split_baseline(protocol_dir, chosen)
            return {"": rows}
        training = manifest_targets(protocol_dir, "train", fold, self.target_names)
        truth = manifest_targets(protocol_dir, split, fold, self.target_names)
        if not len(truth):
            raise ValueError(f"no images in the {split} split of {protocol_dir}")
        predicted = np.tile(training.mean(axis=0), (len(truth), 1))

        return {"": {"training mean (intercept only)": json_safe({"num_images": len(truth),
                                                                   **self.scores(truth, predicted)})}}

    def half_split_baseline(self, protocol_dir: Path, folds: Sequence[int]) -> dict[str, Any]:
        """Mean ± std (n - 1) over ``folds`` of the intercept-only scores: ``{column: "m ± s"}``
        for the table, with ``<column>_mean``/``<column>_std`` numbers beside them."""
        per_fold = []
        for fold in folds:
            training = np.concatenate([manifest_targets(protocol_dir, part, fold, self.target_names)
                                       for part in ("train", "val")])
            truth = manifest_targets(protocol_dir, "test", fold, self.target_names)
            per_fold.append(self.scores(truth, np.tile(training.mean(axis=0), (len(truth), 1))))
        result: dict[str, Any] = {"num_splits": len(per_fold), "folds": list(folds)}
        for column in self.metric_columns()[1:]:
            value = MeanStd.of([float(scores[column]) for scores in per_fold])
            result[column] = str(value)
            result[f"{column}_mean"], result[f"{column}_std"] = value.mean, value.std
        return json_safe(result)

    def metric_columns(self, subsets: Sequence[str] = ()) -> list[str]:
        return ["num_images", *(f"{name}_{m}" for name in self.target_names for m in METRIC_NAMES)]

    def paper_columns(self, subsets: Sequence[str] = ()) -> list[tuple[str, str]]:
        return [(f"{name}_{m}", f"{METRIC_TITLES[m]} {name}") for name in self.target_names for m in METRIC_NAMES]

    def row_from_metrics(self, metrics: Mapping[str, Any],
                         subset_metrics: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        return {column: metrics.get(column) for column in self.metric_columns()}

    def describe_metrics(self) -> str:
        return "mean absolute error, mean squared error, R² and Pearson r per target"

    # serving ----------------------------------------------------------------------

    def serving_outputs(self, outputs: Any) -> dict[str, tf.Tensor]:
        """``scores`` [N, T] and one output per target [N], each target clamped to its range
        (``target_ranges``; targets without one are left as they are)."""
        if isinstance(outputs, Mapping):
            return super().serving_outputs(outputs)
        scores = tf.cast(tf.convert_to_tensor(outputs), tf.float32)
        if self.target_ranges:
            infinite = float("inf")
            lower = [self.target_ranges.get(name, (-infinite, infinite))[0] for name in self.target_names]
            upper = [self.target_ranges.get(name, (-infinite, infinite))[1] for name in self.target_names]
            scores = tf.clip_by_value(scores, tf.constant(lower, tf.float32), tf.constant(upper, tf.float32))
        return {"scores": scores, **{name: scores[:, j] for j, name in enumerate(self.target_names)}}

    def prediction_record(self, outputs: Mapping[str, np.ndarray], index: int) -> dict[str, Any]:
        return {name: round(float(outputs[name][index]), 6) for name in self.target_names if name in outputs}

    def check_outputs(self, outputs: Mapping[str, Any]) -> None:
        if "scores" not in outputs:
            raise ValueError("a regression export must output `scores`")

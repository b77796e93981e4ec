"""Image classification (the CAAXR 2/3/4-class protocols): one-hot targets, cross-entropy,
class-wise AUC and COVID sensitivity at fixed specificity."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from caaxr_tf.io import json_safe
from caaxr_tf.metrics.classification import classification_metrics, covid_index
from caaxr_tf.models.outputs import class_scores  # noqa: F401  (moved to caaxr_tf.models.outputs; re-exported)
from caaxr_tf.tasks.base import BootstrapInputs, EvalContext, EvalResult, Predict, Task, check_finite, format_value, register_task
from caaxr_tf import metrics
from caaxr_tf.data.schema import MANIFEST_FILE, read_summary
from caaxr_tf.models import build_model


def balanced_class_weights(class_counts: Sequence[int]) -> list[float]:
    """Loss weight ``N / (C * n_c)`` per class (scikit-learn's "balanced"); 0 for an absent class.

    Every class then contributes the same total weight, and the weights average to 1 over the
    training images, so the loss keeps its scale."""
    present = [count for count in class_counts if count > 0]
    total = sum(present)
    return [total / (len(present) * count) if count > 0 else 0.0 for count in class_counts]


@register_task
class ClassificationTask(Task):
    """One label per image. ``class_weights`` (one per class) scale each image's loss."""

    name = protocol_task = model_task = "classification"
    losses = ("categorical_crossentropy",)
    reported_outputs = ("probabilities", "predicted_class", "class_names")
    supports_class_balance = True
    supports_cam = True
    supports_calibration = True  # caaxr calibrate: temperature and thresholds of the probabilities

    def __init__(self, class_names: Sequence[str], *, loss: str | None = None,
                 loss_kwargs: Mapping[str, Any] | None = None, target_names: Sequence[str] = (),
                 class_weights: Sequence[float] | None = None):
        super().__init__(class_names, loss=loss, loss_kwargs=loss_kwargs, target_names=target_names)
        if class_weights is not None and len(class_weights) != len(self.class_names):
            raise ValueError(f"{len(class_weights)} class weights for {len(self.class_names)} classes")
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]

    @classmethod
    def from_config(cls, config: Any, summary: Mapping[str, Any] | None = None) -> "ClassificationTask":
        weights = None
        if config.class_balance == "weights":
            weights = balanced_class_weights(config.training_class_counts())
        return cls(config.class_names, loss=config.loss, loss_kwargs=config.loss_kwargs, class_weights=weights)

    @property
    def covid_index(self) -> int:
        return covid_index(self.class_names)

    # inputs -----------------------------------------------------------------------

    def target(self, batch: Mapping[str, tf.Tensor]) -> tf.Tensor:
        return tf.one_hot(batch["label"], len(self.class_names), dtype=tf.float32)

    # training ---------------------------------------------------------------------

    def build_model(self, config: Any):
        return build_model(config.model, num_classes=len(self.class_names), weights=config.weights,
                           input_shape=(config.image_size, config.image_size, 1), **config.model_kwargs)

    def per_example_loss(self, targets: tf.Tensor, outputs: Any) -> tf.Tensor:
        import keras

        loss = keras.losses.categorical_crossentropy(targets, tf.cast(outputs, tf.float32))
        if self.class_weights is not None:
            weights = tf.constant(self.class_weights, tf.float32)
            loss *= tf.reduce_sum(tf.cast(targets, tf.float32) * weights, axis=-1)
        return loss

    def make_metrics(self) -> list:
        import keras

        names, covid = self.class_names, self.covid_index
        return [
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            metrics.ClasswiseAUC(len(names), class_names=names, name="auc"),
            metrics.SensitivityAtSpecificity(0.99, class_id=covid, name="sens_at_99_spec"),
            metrics.SensitivityAtSpecificity(0.90, class_id=covid, name="sens_at_90_spec"),
        ]

    def metric_inputs(self, targets: Any, outputs: Any) -> tuple[Any, Any]:
        return targets, tf.cast(outputs, tf.float32)

    # evaluation -------------------------------------------------------------------

    def evaluate(self, predict: Predict, dataset: Any, context: EvalContext) -> EvalResult:
        from caaxr_tf.plots import plot_confusion_matrix, plot_roc

        names = self.class_names
        ids, labels, scores = [], [], []
        for images, targets, batch_ids in dataset:
            batch_ids = [i.decode("utf-8") for i in batch_ids.numpy()]
            batch_scores = class_scores(predict(images), len(names))
            check_finite(batch_scores, batch_ids)
            scores.append(batch_scores)
            labels.append(np.argmax(targets.numpy(), axis=1))
            ids.extend(batch_ids)
        if not ids:
            raise ValueError("no images in this split")
        labels_np, scores_np = np.concatenate(labels), np.concatenate(scores)
        metrics = {"num_images": len(ids), **classification_metrics(labels_np, scores_np, names)}
        predicted = np.argmax(scores_np, axis=1)
        rows = [[image_id, names[t], names[p], *(f"{s:.6f}" for s in score)]
                for image_id, t, p, score in zip(ids, labels_np, predicted, scores_np)]
        if context.plots:
            plot_roc(labels_np, scores_np, names, context.path("roc", "png"), f"ROC, one-vs-rest: {context.title}")
            plot_confusion_matrix(np.array(metrics["confusion_matrix"]["matrix"]), names,
                                  context.path("confusion_matrix", "png"), f"confusion matrix: {context.title}")
            from caaxr_tf.metrics.calibration import calibration_report
            from caaxr_tf.plots import plot_reliability_per_class

            calibration = calibration_report(labels_np, np.clip(scores_np, 0.0, 1.0), names)
            plot_reliability_per_class(calibration["reliability_per_class"], calibration["ece_per_class"],
                                       context.path("reliability", "png"), f"reliability, one-vs-rest: {context.title}")
        return EvalResult(metrics, ["image_id", "label", "predicted", *(f"p_{c}" for c in names)], rows)

    def bootstrap_inputs(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> BootstrapInputs | None:
        """Labels and class scores (``label``, ``p_<class>`` columns) for `headline_metrics`."""
        from caaxr_tf.metrics.classification import headline_metrics

        header, names = list(header), list(self.class_names)
        if "label" not in header or any(f"p_{name}" not in header for name in names):
            return None
        columns = [header.index(f"p_{name}") for name in names]
        labels = np.array([names.index(str(row[header.index("label")])) for row in rows], dtype=np.int64)
        scores = np.array([[float(row[c]) for c in columns] for row in rows], dtype=np.float64)
        return BootstrapInputs(headline_metrics, labels, scores, {"class_names": names})

    def format_metrics(self, metrics: Mapping[str, Any]) -> list[str]:
        covid = metrics["covid_class"]
        pairs = [
            ("accuracy", metrics["accuracy"]),
            (f"sensitivity at 99% specificity ({covid})", metrics["sensitivity_at_99_specificity"]),
            (f"sensitivity at 90% specificity ({covid})", metrics["sensitivity_at_90_specificity"]),
            ("AUC, macro mean", metrics["auc_macro"]),
        ] + [(f"AUC {name}", value) for name, value in metrics["auc_per_class"].items()]
        width = max(len(k) for k, _ in pairs)
        lines = [f"  {k:<{width}}  {format_value(v)}" for k, v in pairs]
        names = metrics["confusion_matrix"]["classes"]
        cell = max(7, *(len(n) for n in names))
        lines.append("  confusion matrix (rows true, columns predicted):")
        lines.append("  " + " " * cell + "".join(f" {n:>{cell}}" for n in names))
        for name, row in zip(names, metrics["confusion_matrix"]["matrix"]):
            lines.append(f"  {name:>{cell}}" + "".join(f" {v:>{cell}}" for v in row))
        return lines

    def baselines(self, protocol_dir: Path, split: str, fold: int, subsets: Sequence[str]
                  ) -> dict[str, dict[str, dict[str, Any]]]:
        """Every image given probability 1 for the most frequent class of the fold's training
        split: AUCs 0.5, sensitivities at high specificity 0, accuracy the share of that class.
        Labels come from the protocol's manifest.csv (no image is read)."""
        protocol_dir = Path(protocol_dir)
        names = self.class_names
        training = read_summary(protocol_dir)["counts"][f"fold{fold}"]["train"]
        majority = max(names, key=lambda name: (training.get(name, 0), -names.index(name)))
        with open(protocol_dir / MANIFEST_FILE, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        labels = np.array([int(r["label_index"]) for r in rows if r[f"split_fold{fold}"] == split], dtype=np.int64)
        if not labels.size:
            raise ValueError(f"no images in the {split} split of {protocol_dir}")
        scores = np.zeros((labels.size, len(names)))
        scores[:, names.index(majority)] = 1.0
        metrics = {"num_images": int(labels.size), **classification_metrics(labels, scores, names)}
        return {"": {f"constant ({majority})": json_safe(metrics)}}

    def metric_columns(self, subsets: Sequence[str] = ()) -> list[str]:
        return (["num_images", "accuracy"] + [f"auc_{name}" for name in self.class_names]
                + ["auc_macro", "sensitivity_at_99_specificity", "sensitivity_at_90_specificity"])

    def paper_columns(self, subsets: Sequence[str] = ()) -> list[tuple[str, str]]:
        covid = self.class_names[self.covid_index] if self.class_names else "covid"
        return ([(f"auc_{name}", f"AUC {name}") for name in self.class_names]
                + [("sensitivity_at_99_specificity", f"Sens. @ 99% spec. ({covid})"),
                   ("sensitivity_at_90_specificity", f"Sens. @ 90% spec. ({covid})"),
                   ("accuracy", "Accuracy")])

    def row_from_metrics(self, metrics: Mapping[str, Any],
                         subset_metrics: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        row: dict[str, Any] = {"num_images": metrics.get("num_images"), "accuracy": metrics.get("accuracy")}
        for name, value in (metrics.get("auc_per_class") or {}).items():
            row[f"auc_{name}"] = value
        for key in ("auc_macro", "sensitivity_at_99_specificity", "sensitivity_at_90_specificity"):
            row[key] = metrics.get(key)
        return row

    def describe_metrics(self) -> str:
        covid = self.class_names[self.covid_index] if self.class_names else "covid"
        return (f"one-vs-rest ROC AUC per class, sensitivity of {covid} (one-vs-all) at 99 % and 90 % "
                "specificity, and accuracy")

    # serving ----------------------------------------------------------------------

    def serving_outputs(self, outputs: Any) -> dict[str, tf.Tensor]:
        """``probabilities`` [N, C], ``predicted_class`` [N] and ``class_names`` [N, C] (repeated
        per image: TF Serving's REST row format needs the batch first in every output)."""
        if isinstance(outputs, Mapping):
            return super().serving_outputs(outputs)
        probabilities = tf.cast(tf.convert_to_tensor(outputs), tf.float32)
        names = tf.constant(self.class_names, dtype=tf.string)
        return {
            "probabilities": probabilities,
            "predicted_class": tf.gather(names, tf.argmax(probabilities, axis=-1)),
            "class_names": tf.tile(names[None, :], [tf.shape(probabilities)[0], 1]),
        }

    def prediction_record(self, outputs: Mapping[str, np.ndarray], index: int) -> dict[str, Any]:
        names = [_text(name) for name in outputs["class_names"][index]]
        return {
            "predicted_class": _text(outputs["predicted_class"][index]),
            "probabilities": {name: round(float(p), 6) for name, p in zip(names, outputs["probabilities"][index])},
        }

    def check_model(self, model: Any, image_size: int) -> None:
        output = model(np.zeros((1, image_size, image_size, 1), np.float32), training=False)
        if not isinstance(output, Mapping) and int(output.shape[-1]) != len(self.class_names):
            raise ValueError(
                f"the model predicts {int(output.shape[-1])} classes but the run names "
                f"{len(self.class_names)}: {self.class_names}"
            )

    def check_outputs(self, outputs: Mapping[str, Any]) -> None:
        missing = {"probabilities", "predicted_class", "class_names"} - set(outputs)
        if missing:
            raise ValueError(f"a classifier export must output {', '.join(sorted(missing))}")


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

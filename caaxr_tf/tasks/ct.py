"""CT slice classification (COVID-CTset, Rahimzadeh et al. 2021): the ``ct`` task.

Per slice, a classifier on the raw 16-bit value (HU + 1024) as a float, with no scaling, at the
records' own 512x512 (``caaxr_tf.ct.inputs.fit_raw``: a run at another ``image_size`` resizes,
which only the cheap tests do). Training follows the published code: one-hot targets,
categorical cross-entropy, the published augmentation (``caaxr_tf.ct.augment``), metrics
accuracy and per-class sensitivity and precision (``caaxr_tf/configs/train.yaml``, section ``ct``).

Evaluation scores the split's labelled slices (accuracy, per-class sensitivity and precision,
plus the classifier's AUCs); with ``EvalContext.patients`` (``python -m caaxr_tf.evaluate --run
RUN --patients DATA_ROOT``) it also runs the published patient pipeline over every slice of
each test patient's series — select, classify the kept slices, decide with both thresholds —
(``caaxr_tf.ct.patients``) and writes ``patients<tag>.csv``.

Serving: ``serving_default`` takes 16-bit greyscale PNG slices (TensorFlow has no TIFF
decoder; ``caaxr_tf.predict`` converts TIFF and DICOM slices to such PNGs on the client) and
``predict_preprocessed`` raw float values 0..65535.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from caaxr_tf.tasks.base import EvalContext, EvalResult, Predict, format_value, register_task
from caaxr_tf.tasks.classification import ClassificationTask
from caaxr_tf.ct.augment import augment_ct_batch
from caaxr_tf.ct.inputs import decode_raw_png, fit_raw
from caaxr_tf.ct.patients import classify_patient, evaluate_patients, patient_rows, split_patients
from caaxr_tf.data.serving import (
    PNG_BIT_DEPTH_OFFSET,
    PNG_SIGNATURE,
    _starts_with,
    assert_image_shape,
    assert_rank_one,
    image_headers,
)
from caaxr_tf.io import write_text_atomic
from caaxr_tf.metrics.confusion import ClasswisePrecision, ClasswiseSensitivity, confusion_rates
from caaxr_tf.tables import csv_text

PATIENT_COLUMNS = ("patients", "correct_t1", "covid_to_normal_t1", "normal_to_covid_t1",
                   "correct_t2", "covid_to_normal_t2", "normal_to_covid_t2")


@dataclass(frozen=True)
class CtOptions:
    """The ct task's option: ``patients``, the COVID-CTset folder the records were built from
    (evaluate: the split's patients also go through selection, classification and the patient rule)."""

    patients: str | None = None


@register_task
class CTTask(ClassificationTask):
    """Per-slice COVID / normal classification of raw CT slices, and the patient rule."""

    name = protocol_task = "ct"
    model_task = "classification"
    supports_class_balance = False
    supports_calibration = False  # patients are decided by the arg-max of their slices

    # inputs -----------------------------------------------------------------------

    def decode(self, record: Mapping[str, tf.Tensor], image_size: int) -> dict[str, tf.Tensor]:
        """The slice as uint16 raw values ``[S, S, 1]`` (cached at 2 bytes per pixel)."""
        image = fit_raw(decode_raw_png(record["image/encoded"]), image_size)
        return {"image": image, "label": tf.cast(record["label"], tf.int32), "id": record["image/id"]}

    def augment(self, images: tf.Tensor, batch: Mapping[str, tf.Tensor], seed: tf.Tensor
                ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        return augment_ct_batch(images, seed), {}

    # training ---------------------------------------------------------------------

    def make_metrics(self) -> list:
        import keras

        names = self.class_names
        return [
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            ClasswiseSensitivity(len(names), class_names=names, name="sensitivity"),
            ClasswisePrecision(len(names), class_names=names, name="precision"),
        ]

    # evaluation -------------------------------------------------------------------

    def evaluate(self, predict: Predict, dataset: Any, context: EvalContext) -> EvalResult:
        result = super().evaluate(predict, dataset, context)
        names = self.class_names
        labels = [names.index(row[1]) for row in result.rows]
        predicted = [names.index(row[2]) for row in result.rows]
        rates = confusion_rates(np.array(labels), np.array(predicted), names)
        result.metrics.update(sensitivity=rates["sensitivity"], precision=rates["precision"])
        if context.options.get("patients") is not None:
            result.metrics["patients"] = self.evaluate_patients(predict, context)
        return result

    def evaluate_patients(self, predict: Predict, context: EvalContext) -> dict[str, Any]:
        """The patient pipeline over every slice of the split's patients; writes the per-patient CSV."""
        if context.protocol_dir is None or context.image_size is None:
            raise ValueError("patient evaluation needs the protocol folder and the run's image size")
        patients = split_patients(context.protocol_dir, context.split, context.fold)
        covid = self.covid_index

        def covid_flags(images: np.ndarray) -> np.ndarray:
            scores = np.asarray(predict(images))
            return np.argmax(scores, axis=1) == covid

        summary, results = evaluate_patients(Path(context.options["patients"]), patients, covid_flags, context.image_size,
                                             batch_size=context.batch_size)
        header, rows = patient_rows(results)
        write_text_atomic(context.path("patients", "csv"), csv_text(header, rows))
        return summary

    # options and prediction ----------------------------------------------------------

    options_type = CtOptions
    option_flags = {"patients": "--patients"}
    no_cam_overlays = "patient folders are classified through slice selection"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, command: str) -> None:
        if command == "evaluate":
            parser.add_argument("--patients", dest="patients", default=None, metavar="DATA_ROOT",
                                help="ct task: the COVID-CTset folder; also evaluate the split's patients "
                                     "(select, classify, patient rule)")

    def predict_inputs(self, model: Any, paths: Sequence[Any], predict_files: Callable[..., Any],
                       batch_size: int) -> Any:
        """Folders are patients (`predict_patients`), files are slices (TIFF, DICOM or 16-bit PNG)."""
        for path in paths:
            if Path(path).is_dir():
                yield from predict_patients(model, path, batch_size=batch_size)
            else:
                yield from predict_files([Path(path)], ct=True)

    def format_metrics(self, metrics: Mapping[str, Any]) -> list[str]:
        lines = super().format_metrics(metrics)
        names = self.class_names
        width = max(len(n) for n in names)
        lines.append("  per class:" + " " * (width - 8) + "  sensitivity  precision")
        for name in names:
            lines.append(f"  {name:<{width + 2}}    {format_value(metrics['sensitivity'].get(name)):>9}"
                         f"  {format_value(metrics['precision'].get(name)):>9}")
        patients = metrics.get("patients")
        if patients:
            lines.append(f"  patients: {patients['patients']} ({patients['covid_patients']} COVID), "
                         f"{patients['selected_slices']} of {patients['slices']} slices selected")
            lines.append("  threshold   correct  COVID->normal  normal->COVID")
            for key, label in (("threshold1", "1 (> 0)"), ("threshold2", "2 (>= 10%)")):
                row = patients[key]
                lines.append(f"  {label:<10}  {row['correct']:>7}  {row['covid_to_normal']:>13}  "
                             f"{row['normal_to_covid']:>13}")
        return lines

    def metric_columns(self, subsets: Sequence[str] = ()) -> list[str]:
        return (["num_images", "accuracy"] + [f"sensitivity_{name}" for name in self.class_names]
                + [f"precision_{name}" for name in self.class_names] + list(PATIENT_COLUMNS))

    def paper_columns(self, subsets: Sequence[str] = ()) -> list[tuple[str, str]]:
        return ([("accuracy", "Accuracy")]
                + [(f"sensitivity_{name}", f"Sens. {name}") for name in self.class_names]
                + [(f"precision_{name}", f"Prec. {name}") for name in self.class_names]
                + [("correct_t2", "Patients correct (t2)")])

    def row_from_metrics(self, metrics: Mapping[str, Any],
                         subset_metrics: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        row: dict[str, Any] = {"num_images": metrics.get("num_images"), "accuracy": metrics.get("accuracy")}
        for kind in ("sensitivity", "precision"):
            for name in self.class_names:
                row[f"{kind}_{name}"] = (metrics.get(kind) or {}).get(name)
        patients = metrics.get("patients") or {}
        row["patients"] = patients.get("patients")
        for threshold, suffix in (("threshold1", "t1"), ("threshold2", "t2")):
            counts = patients.get(threshold) or {}
            for key in ("correct", "covid_to_normal", "normal_to_covid"):
                row[f"{key}_{suffix}"] = counts.get(key)
        return row

    def describe_metrics(self) -> str:
        return ("per-slice accuracy and per-class sensitivity and precision (arg-max) on the labelled test "
                "slices; with --patients, patients correct and misclassified under threshold 1 (a COVID slice) "
                "and threshold 2 (>= 10 % of the selected slices)")

    # serving ----------------------------------------------------------------------

    def serving_inputs(self, images: tf.Tensor, invert: tf.Tensor, bit_depth: tf.Tensor,
                       image_size: int) -> tf.Tensor:
        """16-bit greyscale PNG slices → float32 raw values ``[N, S, S, 1]`` (``invert`` and
        ``bit_depth`` do not apply to CT and are ignored). Anything else fails with
        INVALID_ARGUMENT naming the index."""
        return decode_raw_slices(images, image_size)

    def check_preprocessed(self, images: tf.Tensor, image_size: int) -> tf.Tensor:
        """Shape ``[N, S, S, 1]``, a non-empty batch, finite raw values within 0..65535."""
        with tf.control_dependencies([assert_image_shape(images, image_size)]):
            images = tf.identity(images)
        checks = [
            tf.debugging.assert_greater(tf.shape(images)[0], 0,
                                        message="empty batch: `images` must hold at least one slice"),
            tf.debugging.Assert(
                tf.reduce_all((images >= 0.0) & (images <= 65535.0)),
                ["`images` must hold raw CT values (HU + 1024) in 0..65535, not scaled; min, max:",
                 tf.reduce_min(images), tf.reduce_max(images)]),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(images)


def decode_raw_slices(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """A batch of encoded 16-bit PNG slices → float32 ``[N, S, S, 1]`` raw values."""
    images = tf.convert_to_tensor(images, tf.string)
    with tf.control_dependencies([assert_rank_one(images, "images", "encoded 16-bit PNG slices")]):
        images = tf.identity(images)
    headers = image_headers(images)
    sixteen_bit = _starts_with(headers, PNG_SIGNATURE) & tf.equal(headers[:, PNG_BIT_DEPTH_OFFSET], 16)
    checks = [
        tf.debugging.assert_greater(tf.size(images), 0,
                                    message="empty batch: `images` must hold at least one 16-bit PNG slice"),
        tf.debugging.Assert(
            tf.reduce_all(sixteen_bit),
            ["`images` must be 16-bit greyscale PNG slices of raw values (HU + 1024); not one at index:",
             tf.where(~sixteen_bit)[:, 0]], summarize=16),
    ]
    with tf.control_dependencies(checks):
        images = tf.identity(images)
    pixels = tf.map_fn(lambda encoded: fit_raw(decode_raw_png(encoded), image_size), images,
                       fn_output_signature=tf.TensorSpec([image_size, image_size, 1], tf.uint16))
    return tf.cast(pixels, tf.float32)


def predict_patients(model: Any, folder: str | Path, *, batch_size: int = 16) -> list[dict[str, Any]]:
    """CT exports: one record per patient under ``folder`` (its series selected, the kept
    slices classified, both thresholds applied); a folder with no usable series gives an
    ``error`` record listing what was skipped. ``model``: a ``caaxr_tf.predict.ServedModel``
    (``classify_raw``, ``image_size``). Moved from ``caaxr_tf.predict`` (which re-exports it)."""
    from caaxr_tf.data.ct_series import find_ct_series  # here: it imports OpenCV and pydicom

    scan = find_ct_series(folder)
    by_patient: dict[str, list] = {}
    for series in scan.series:
        by_patient.setdefault(series.patient_id, []).append(series)
    if not by_patient:
        reasons = "; ".join(f"{s.path}: {s.field}: {s.reason}" for s in scan.skipped[:3])
        return [{"file": str(folder), "error": "no CT series of at least two 16-bit 512x512 slices found"
                 + (f" ({reasons})" if reasons else "")}]
    records = []
    for patient, series in by_patient.items():
        # a TIFF series folder's parent is the patient's folder (series id "<patient>/SR_<n>")
        roots = {str(Path(item.folder).parent if "/" in item.series_id else Path(item.folder)) for item in series}
        skipped = [s for s in scan.skipped if any(s.path.startswith(root + os.sep) for root in roots)]
        result = classify_patient(patient, series, model.classify_raw, model.image_size, batch_size=batch_size,
                                  skipped=skipped if len(by_patient) > 1 else scan.skipped)
        records.append({"file": str(folder), **result.as_record()})
    return records

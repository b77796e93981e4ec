"""Infection maps (Degerli et al., 2021): a segmentation of the COVID-19 infected regions whose
per-pixel probabilities localize the infection, detect COVID-19 and grade each lung.

`InfectionTask` (protocol task ``infection``, any registered segmentation model) trains on the
record's infection mask (``mask/encoded``, else the union of its boxes; controls: empty) with
focal + Dice by default, and evaluates one split as published:

* pixel-level F1 over all test pixels (TP/FP/FN pooled first) beside per-image DICE/IoU;
* COVID-19 detection from the map: COVID when at least ``min_pixels`` (A) pixels reach
  ``threshold`` (t), A = 1, t = 0.5 as published; sensitivity, specificity, and the ROC (AUC)
  of the infected-area score (pixels >= t);
* with a lung run (``evaluate --lung-run``): the map restricted to the lungs and per-lung
  infected fractions per image (severity grades), scored against the ground truth's fractions;
* plots: image | ground truth | jet overlay of the map, and the detection ROC.

Its serving outputs are the map, the detection (``infected_pixels``, ``covid``) and, for an
export with a lung run, ``lungs`` and the per-lung fractions.

`InfectionClassificationTask` runs a *classifier* on the same protocol (COVID vs control, the
image-level label): the classifier whose Grad-CAM maps ``caaxr_tf.infection.cam`` scores with
the same pixel F1.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from caaxr_tf.metrics.classification import covid_index
from caaxr_tf.tasks.base import BootstrapInputs, EvalContext, EvalResult, Predict, check_finite, format_value, register_task
from caaxr_tf.tasks.classification import ClassificationTask
from caaxr_tf.models.outputs import mask_output
from caaxr_tf.tasks.segmentation import EMPTY_SCORE, SegmentationTask, segmentation_metrics
from caaxr_tf import metrics
from caaxr_tf.data.pipeline import augment_batch, make_dataset
from caaxr_tf.metrics import dice_per_image, iou_per_image
from caaxr_tf.metrics.pixel import PixelCounts, PixelF1

DEFAULT_THRESHOLD = 0.5  # t: a pixel is infected where the map is >= t (published: 0.5)
DEFAULT_MIN_PIXELS = 1  # A: an image is COVID-19 when at least A pixels are infected (published: 1)
CONSTANT_MAPS = {"empty map": 0.0, "all-ones map": 1.0}
SEVERITY_COLUMNS = ("right_lung_infected_fraction", "left_lung_infected_fraction", "lungs_infected_fraction")


@dataclass(frozen=True)
class InfectionOptions:
    """The infection task's options: a lung run (evaluate, export), the detection rule (evaluate)."""

    lung_run: Any = None  # a lungs-protocol run folder (opened: a `caaxr_tf.infection.lungs.LungRun`)
    threshold: float | None = None  # t; the task's own otherwise
    min_pixels: int | None = None  # A; the task's own otherwise


def infection_headline(flags: np.ndarray, overlap: np.ndarray) -> dict[str, float]:
    """Mean Dice/IoU over all and over COVID-19 images, and the detection sensitivity and
    specificity, from ``flags`` [N, 2] (is COVID-19, detected) and ``overlap`` [N, 2] (Dice, IoU)."""
    is_covid, detected = flags[:, 0].astype(bool), flags[:, 1].astype(bool)
    dice, iou = overlap[:, 0], overlap[:, 1]
    result = {"dice": _mean(dice), "iou": _mean(iou), "dice_covid": _mean(dice[is_covid]),
              "iou_covid": _mean(iou[is_covid])}
    result["sensitivity"] = float(detected[is_covid].mean()) if is_covid.any() else float("nan")
    result["specificity"] = float((~detected[~is_covid]).mean()) if (~is_covid).any() else float("nan")
    return result


@register_task
class InfectionTask(SegmentationTask):
    """Infection map + image-level COVID/control label (see the module docstring).

    Options (`InfectionOptions`, ``EvalContext.options``): ``lung_run`` (a lung run folder),
    ``threshold`` (t) and ``min_pixels`` (A); the constructor's values otherwise.
    """

    options_type = InfectionOptions
    option_flags = {"lung_run": "--lung-run", "threshold": "--detection-threshold", "min_pixels": "--min-pixels"}

    name = protocol_task = "infection"
    model_task = "segmentation"
    losses = ("focal_dice", "bce_dice", "binary_crossentropy")
    reported_outputs = ("mask", "infected_pixels", "covid", "lungs", "lung_fractions", "lung_pixels")

    def __init__(self, class_names: Sequence[str], *, loss: str | None = None,
                 loss_kwargs: Mapping[str, Any] | None = None, target_names: Sequence[str] = (),
                 threshold: float = DEFAULT_THRESHOLD, min_pixels: int = DEFAULT_MIN_PIXELS):
        super().__init__(class_names, loss=loss, loss_kwargs=loss_kwargs, target_names=target_names)
        self.threshold, self.min_pixels = check_detection_rule(threshold, min_pixels)

    @classmethod
    def config_sections(cls) -> tuple[str, ...]:
        return ("segmentation", "infection")

    @property
    def covid_index(self) -> int:
        return covid_index(self.class_names)

    # inputs and training ------------------------------------------------------------

    def target(self, batch: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """``mask`` (float [B, S, S, 1]) and ``covid`` (float [B], 1 for the COVID-19 class)."""
        covid = tf.cast(tf.equal(batch["label"], self.covid_index), tf.float32)
        return {"mask": tf.cast(batch["mask"], tf.float32), "covid": covid}

    def augment_in_step(self, images: tf.Tensor, targets: Any, seed: tf.Tensor) -> tuple[tf.Tensor, Any]:
        images, masks = augment_batch(images, targets["mask"], seed)
        return images, {**targets, "mask": masks}

    def per_example_loss(self, targets: Any, outputs: Any) -> tf.Tensor:
        return super().per_example_loss(targets["mask"], outputs)

    def make_metrics(self) -> list:
        return [PixelF1(name="pixel_f1"), metrics.Dice(name="dice"), metrics.IoU(name="iou")]

    # evaluation ---------------------------------------------------------------------

    def evaluate(self, predict: Predict, dataset: Any, context: EvalContext) -> EvalResult:
        from caaxr_tf.infection.maps import detection_rates, infected_pixel_count, restrict_to_lungs

        options = dict(getattr(context, "options", None) or {})
        threshold, min_pixels = check_detection_rule(options.get("threshold", self.threshold),
                                                     options.get("min_pixels", self.min_pixels))
        lungs = _lung_run(options.get("lung_run"))
        counts = PixelCounts()
        ids: list[str] = []
        columns: dict[str, list[np.ndarray]] = {
            key: [] for key in ("covid", "dice", "iou", "true", "infected", "severity", "true_severity")}
        examples = _ExamplePicker(context.num_examples if context.plots else 0)
        for images, targets, batch_ids in dataset:
            batch_ids = [i.decode("utf-8") for i in batch_ids.numpy()]
            maps = np.asarray(mask_output(predict(images)), np.float32)
            check_finite(maps, batch_ids)
            truth = np.asarray(targets["mask"], np.float32)
            lung_maps = None
            if lungs is not None:
                lung_maps = lungs.predict(images)
                maps = restrict_to_lungs(maps, lung_maps)
                columns["severity"].append(_fractions(maps, lung_maps, threshold))
                columns["true_severity"].append(_fractions(truth, lung_maps, 0.5))
            counts.update(truth, maps, threshold)
            columns["covid"].append(np.asarray(targets["covid"]) > 0.5)
            columns["dice"].append(dice_per_image(truth, maps, threshold, EMPTY_SCORE))
            columns["iou"].append(iou_per_image(truth, maps, threshold, EMPTY_SCORE))
            columns["true"].append((truth > 0.5).reshape(len(truth), -1).sum(axis=1))
            columns["infected"].append(infected_pixel_count(maps, threshold))
            examples.offer(np.asarray(images), truth, maps, batch_ids, columns["covid"][-1])
            ids.extend(batch_ids)
        if not ids:
            raise ValueError("no images in this split")
        values = {key: np.concatenate(parts) if parts else None for key, parts in columns.items()}
        is_covid, infected = values["covid"], values["infected"]
        detected = infected >= min_pixels  # = maps.detect_covid(maps, threshold, min_pixels)
        rates = detection_rates(is_covid, detected)
        metrics: dict[str, Any] = {
            "num_images": len(ids),
            "num_covid": int(is_covid.sum()),
            "num_control": int((~is_covid).sum()),
            **{(f"pixel_{key}" if key in ("tp", "fp", "fn") else key): value
               for key, value in counts.as_dict().items()},
            **segmentation_metrics(values["dice"], values["iou"]),
            "dice_covid": _mean(values["dice"][is_covid]),
            "iou_covid": _mean(values["iou"][is_covid]),
            **rates.as_dict(),
            "detection_auc": _auc(is_covid, infected),
            "threshold": threshold,
            "min_pixels": min_pixels,
            "lung_run": None if lungs is None else str(lungs.run_dir),
        }
        header = ["image_id", "covid", "dice", "iou", "true_pixels", "infected_pixels", "covid_detected"]
        rows = [[image_id, int(c), f"{d:.6f}", f"{j:.6f}", int(t), int(p), int(x)] for image_id, c, d, j, t, p, x
                in zip(ids, is_covid, values["dice"], values["iou"], values["true"], infected, detected)]
        if lungs is not None:
            metrics["severity"] = _severity_summary(values["severity"], values["true_severity"], is_covid)
            header += [*SEVERITY_COLUMNS, *(f"true_{name}" for name in SEVERITY_COLUMNS)]
            for row, predicted, true in zip(rows, values["severity"], values["true_severity"]):
                row.extend(_cell(v) for v in (*predicted, *true))
        if context.plots:
            from caaxr_tf.infection.plots import plot_detection_roc, plot_infection_examples

            plot_detection_roc(is_covid, infected, context.path("roc", "png"),
                               f"{context.title}\nCOVID-19 detection over the infected area (t = {threshold})",
                               (1.0 - rates.specificity, rates.sensitivity))
            if examples.images:
                plot_infection_examples(np.stack(examples.images), np.stack(examples.truths), np.stack(examples.maps),
                                        examples.titles, context.path("examples", "png"),
                                        f"{context.title}\ninfection maps (jet: probability 0 blue → 1 red)")
        return EvalResult(metrics, header, rows)

    # options -----------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, command: str) -> None:
        group = parser.add_argument_group("infection maps")
        if command == "export":
            group.add_argument("--lung-run", dest="lung_run", default=None, metavar="RUN",
                               help="infection runs: a lungs-protocol run served in the same graph (map restricted "
                                    "to its lungs; outputs lungs, lung_fractions, lung_pixels)")
            return
        group.add_argument("--lung-run", dest="lung_run", default=None, metavar="RUN",
                           help="a lungs-protocol segmentation run: the infection map is restricted to its lungs "
                                "and per-lung infected fractions are reported (files tagged _lungs)")
        group.add_argument("--detection-threshold", dest="threshold", type=float, default=None, metavar="T",
                           help="a pixel is infected where the map is >= T (default 0.5, as published; files tagged "
                                "_t<T>)")
        group.add_argument("--min-pixels", dest="min_pixels", type=int, default=None, metavar="A",
                           help="an image is COVID-19 with at least A infected pixels (default 1, as published; "
                                "files tagged _a<A>)")

    def open_options(self, options: Mapping[str, Any], open_run: Callable[[Any], Any]) -> dict[str, Any]:
        """``lung_run`` given as a folder becomes its `LungRun` (opened as a Run)."""
        from caaxr_tf.infection.lungs import LungRun  # here: the infection package imports OpenCV

        options = dict(options)
        if options.get("lung_run") is not None and not hasattr(options["lung_run"], "predict"):
            options["lung_run"] = LungRun(open_run(options["lung_run"]))
        return options

    def options_tag(self, options: Mapping[str, Any]) -> str:
        """``_lungs`` (lung run), ``_t<T>``, ``_a<A>``."""
        return (("_lungs" if options.get("lung_run") else "")
                + (f"_t{float(options['threshold']):g}" if options.get("threshold") is not None else "")
                + (f"_a{int(options['min_pixels'])}" if options.get("min_pixels") is not None else ""))

    def serving_model(self, model: Any, image_size: int, options: Mapping[str, Any],
                      open_run: Callable[[Any], Any]) -> tuple[Any, dict[str, Any]]:
        """With a lung run: one model running both networks (`with_lung_model`), outputs
        ``{"mask", "lungs"}``; the metadata records the lung run's folder."""
        from caaxr_tf.infection.lungs import LungRun, with_lung_model  # here: the package imports OpenCV

        lung_run = options.get("lung_run")
        if lung_run is None:
            return model, {}
        lungs = lung_run if hasattr(lung_run, "predict") else LungRun(open_run(lung_run))
        return (with_lung_model(model, lungs.model, image_size, lungs.image_size),
                {"lung_run": str(Path(lungs.run_dir).resolve())})

    def bootstrap_inputs(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> BootstrapInputs | None:
        """Per image: is COVID-19, detected, Dice, IoU (`infection_headline`)."""
        header = list(header)
        needed = ("covid", "covid_detected", "dice", "iou")
        if any(name not in header for name in needed):
            return None
        flags = np.array([[int(row[header.index("covid")]), int(row[header.index("covid_detected")])] for row in rows])
        overlap = np.array([[float(row[header.index("dice")]), float(row[header.index("iou")])] for row in rows])
        return BootstrapInputs(infection_headline, flags, overlap, {})

    def format_metrics(self, metrics: Mapping[str, Any]) -> list[str]:
        lines = [
            f"  pixel F1     {format_value(metrics['pixel_f1'])}  (all {metrics.get('split') or 'test'} pixels; precision "
            f"{format_value(metrics['pixel_precision'])}, recall {format_value(metrics['pixel_recall'])})",
            f"  DICE         {format_value(metrics['dice'])}  (per image; COVID-19 images only "
            f"{format_value(metrics.get('dice_covid'))})",
            f"  IoU          {format_value(metrics['iou'])}",
            f"  detection    sensitivity {format_value(metrics['sensitivity'])}, specificity "
            f"{format_value(metrics['specificity'])} (>= {metrics['min_pixels']} pixel(s) >= {metrics['threshold']}); "
            f"AUC of the infected area {format_value(metrics.get('detection_auc'))}",
        ]
        severity = metrics.get("severity")
        if severity:
            lines.append(f"  severity     mean |error| of the lungs' infected fraction "
                         f"{format_value(severity.get('total_fraction_mae'))} (COVID-19 images)")
        return lines

    def baselines(self, protocol_dir: Path, split: str, fold: int, subsets: Sequence[str]
                  ) -> dict[str, dict[str, dict[str, Any]]]:
        """An empty and an all-ones map scored as a model is (pixel F1, DICE, detection)."""
        return {subset or "": self._constant_maps(protocol_dir, split, fold, subset or None)
                for subset in ["", *subsets]}

    def _constant_maps(self, protocol_dir: Path, split: str, fold: int, subset: str | None,
                       batch_size: int = 32) -> dict[str, dict[str, Any]]:
        from caaxr_tf.infection.maps import detection_rates

        dataset = make_dataset(protocol_dir, split, fold=fold, batch_size=batch_size, task=self, training=False,
                               augment=False, cache=False, subset=subset)
        scores = {name: (PixelCounts(), [], []) for name in CONSTANT_MAPS}
        for _, targets in dataset:
            truth = np.asarray(targets["mask"], np.float32)
            covid = np.asarray(targets["covid"]) > 0.5
            for name, value in CONSTANT_MAPS.items():
                constant = np.full(truth.shape, value, np.float32)
                counts, dice, labels = scores[name]
                counts.update(truth, constant, self.threshold)
                dice.append(dice_per_image(truth, constant, self.threshold, EMPTY_SCORE))
                labels.append(covid)
        result = {}
        for name, (counts, dice, labels) in scores.items():
            if not dice:
                raise ValueError(f"no images in the {split} split of {protocol_dir}")
            covid = np.concatenate(labels)
            detected = np.full(covid.shape, CONSTANT_MAPS[name] >= self.threshold)
            rates = detection_rates(covid, detected)
            result[name] = {"num_images": int(len(covid)), "pixel_f1": counts.f1,
                            "dice": float(np.concatenate(dice).mean()),
                            "sensitivity": rates.sensitivity, "specificity": rates.specificity}
        return result

    def metric_columns(self, subsets: Sequence[str] = ()) -> list[str]:
        columns = ["num_images", "pixel_f1", "dice", "iou", "sensitivity", "specificity", "detection_auc"]
        for subset in subsets:
            columns += [f"num_images_{subset}", f"pixel_f1_{subset}", f"dice_{subset}"]
        return columns

    def paper_columns(self, subsets: Sequence[str] = ()) -> list[tuple[str, str]]:
        return [("pixel_f1", "pixel F1"), ("dice", "DICE"), ("sensitivity", "sensitivity"),
                ("specificity", "specificity"), ("detection_auc", "detection AUC")] + [
                    (f"pixel_f1_{s}", f"pixel F1 ({s} subset)") for s in subsets]

    def row_from_metrics(self, metrics: Mapping[str, Any],
                         subset_metrics: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        row = {key: metrics.get(key) for key in self.metric_columns()}
        for subset, values in (subset_metrics or {}).items():
            for key in ("num_images", "pixel_f1", "dice"):
                row[f"{key}_{subset}"] = values.get(key)
        return row

    def describe_metrics(self) -> str:
        return (f"pixel F1 over all test pixels (threshold {self.threshold}), per-image DICE, COVID-19 detection "
                f"(>= {self.min_pixels} pixel(s) >= {self.threshold}) sensitivity/specificity and the AUC of the "
                "infected-area score")

    # serving ----------------------------------------------------------------------

    def serving_outputs(self, outputs: Any) -> dict[str, tf.Tensor]:
        """``mask`` (the infection map, 0 outside the lungs with a lung model), ``infected_pixels``
        and ``covid`` (float [N]); with a lung model also ``lungs``, ``lung_fractions`` [N, 3]
        (patient's right, left, both) and ``lung_pixels`` [N, 2]."""
        from caaxr_tf.infection.layers import InfectionDetection
        from caaxr_tf.infection.lungs import served_lung_fractions

        detection = InfectionDetection(self.threshold, self.min_pixels)
        maps = tf.cast(mask_output(outputs), tf.float32)
        lungs = outputs.get("lungs") if isinstance(outputs, Mapping) else None
        if lungs is None:
            maps, infected, covid = detection(maps)
            return {"mask": maps, "infected_pixels": infected, "covid": covid}
        lungs = tf.cast(lungs, tf.float32)
        maps, infected, covid = detection([maps, lungs])
        fractions, lung_pixels = served_lung_fractions(maps, lungs, self.threshold)
        return {"mask": maps, "infected_pixels": infected, "covid": covid, "lungs": lungs,
                "lung_fractions": fractions, "lung_pixels": lung_pixels}

    def prediction_record(self, outputs: Mapping[str, np.ndarray], index: int) -> dict[str, Any]:
        mask = outputs["mask"][index]
        record: dict[str, Any] = {
            "covid_detected": bool(outputs["covid"][index] > 0.5),
            "infected_pixels": int(round(float(outputs["infected_pixels"][index]))),
            "infected_area_fraction": round(float(np.mean(mask >= self.threshold)), 6),
            "threshold": self.threshold,
            "min_pixels": self.min_pixels,
        }
        if "lung_fractions" in outputs:
            pixels = list(outputs["lung_pixels"][index]) + [sum(outputs["lung_pixels"][index])]
            for name, fraction, count in zip(SEVERITY_COLUMNS, outputs["lung_fractions"][index], pixels):
                record[name] = round(float(fraction), 6) if count > 0 else None
        return record

    def overlay(self, pixels: np.ndarray, outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The infection map in jet colours over the model's input."""
        from caaxr_tf.infection.plots import jet_overlay

        return jet_overlay(pixels, outputs["mask"][..., 0])

    def check_outputs(self, outputs: Mapping[str, Any]) -> None:
        missing = {"mask", "infected_pixels", "covid"} - set(outputs)
        if missing:
            raise ValueError(f"an infection export must output {', '.join(sorted(missing))}")


@register_task
class InfectionClassificationTask(ClassificationTask):
    """A COVID-19 vs control classifier on an infection protocol (its image-level labels)."""

    name = "infection_classification"
    protocol_task = "infection"
    model_task = "classification"

    @classmethod
    def config_sections(cls) -> tuple[str, ...]:
        return ("classification",)


def check_detection_rule(threshold: Any, min_pixels: Any) -> tuple[float, int]:
    """``(t, A)`` checked: 0 < t <= 1 and A a positive integer."""
    threshold = float(threshold)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"detection threshold must be in (0, 1], got {threshold}")
    if isinstance(min_pixels, bool) or int(min_pixels) != float(min_pixels) or int(min_pixels) < 1:
        raise ValueError(f"min_pixels must be a positive integer, got {min_pixels!r}")
    return threshold, int(min_pixels)


def _lung_run(lung_run: Any):
    """A `LungRun` for a run folder; an object with ``predict(images)`` and ``run_dir`` as is."""
    if lung_run is None or hasattr(lung_run, "predict"):
        return lung_run
    from caaxr_tf.infection.lungs import LungRun

    return LungRun(lung_run)


def _fractions(maps: np.ndarray, lung_maps: np.ndarray, threshold: float) -> np.ndarray:
    from caaxr_tf.infection.lungs import lung_infection_features

    return lung_infection_features(maps, lung_maps, threshold=threshold)


def _severity_summary(predicted: np.ndarray, true: np.ndarray, is_covid: np.ndarray) -> dict[str, Any]:
    """Mean predicted and true infected fractions over COVID-19 images, and the mean absolute
    error of the predicted ones (per lung and both)."""
    summary: dict[str, Any] = {"num_images": int(is_covid.sum())}
    for column, name in enumerate(("right_fraction", "left_fraction", "total_fraction")):
        p, t = predicted[is_covid, column], true[is_covid, column]
        summary[f"{name}_mean"] = _mean(p)
        summary[f"true_{name}_mean"] = _mean(t)
        summary[f"{name}_mae"] = _mean(np.abs(p - t))
    return summary


def _mean(values: np.ndarray) -> float | None:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def _auc(is_covid: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if is_covid.all() or not is_covid.any():
        return None
    return float(roc_auc_score(is_covid, scores))


def _cell(value: float) -> str:
    return "" if not np.isfinite(value) else f"{value:.6f}"


class _ExamplePicker:
    """The first ``count - 1`` COVID-19 images and the first control of the split, kept for the
    example figure (a fixed, reproducible choice made in the one pass over the split)."""

    def __init__(self, count: int):
        self.covid_wanted, self.control_wanted = max(0, count - 1), 1 if count > 0 else 0
        self.images: list[np.ndarray] = []
        self.truths: list[np.ndarray] = []
        self.maps: list[np.ndarray] = []
        self.titles: list[str] = []

    def offer(self, images, truths, maps, ids, is_covid) -> None:
        for index, covid in enumerate(is_covid):
            if covid and self.covid_wanted > 0:
                self.covid_wanted -= 1
            elif not covid and self.control_wanted > 0:
                self.control_wanted -= 1
            else:
                continue
            self.images.append(images[index])
            self.truths.append(truths[index])
            self.maps.append(maps[index])
            self.titles.append(f"{ids[index]} ({'COVID-19' if covid else 'control'})")

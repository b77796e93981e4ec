"""Explainability evaluations of a trained classifier run (called by ``caaxr_tf.evaluate``
and ``caaxr_tf.cv``).

* `write_cam_grid`: a grid of images (a few per true class) with the Grad-CAM of every class.
* `evaluate_localization`: the COVID-class Grad-CAM of a classifier scored against the
  masks of a segmentation protocol's split (boxes drawn by the pipeline, or pixel masks):
  pointing game, energy inside, IoU of the thresholded map, beside the centre-Gaussian and
  uniform baselines (`caaxr_tf.explain.localization`).
* `evaluate_external`: the run's classes matched with another protocol's
  (`caaxr_tf.explain.cross_source`), scored on that protocol's images. `training_overlap`
  finds the external images the run trained or validated on (same image id or patient),
  which ``evaluate --tfrecords`` refuses unless ``--exclude-overlap`` leaves them out.

File names: ``localization_<source>_<protocol>`` and ``external_<source>_<protocol>``, where
``<source>`` is the other TFRecords folder's name (two parts of one collection, e.g. internal
and external shards of covid-chestxray, come from different folders) — see `data_tag`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from caaxr_tf.data.schema import MANIFEST_FILE, read_summary
from caaxr_tf.data.summary import locate_protocol
from caaxr_tf.explain.cross_source import external_metrics, match_classes, shortcut_gap
from caaxr_tf.explain.gradcam import GradCam
from caaxr_tf.explain.localization import DEFAULT_THRESHOLD, score_masks_with_baselines, table_from_scores
from caaxr_tf.metrics.classification import covid_index
from caaxr_tf.models.outputs import class_scores
from caaxr_tf.tasks import get_task
from caaxr_tf.tasks.base import check_finite
from caaxr_tf.tasks.datasets import make_dataset

ALL_SPLITS = "all"  # every image of the protocol: test + train + val of fold 1
CAM_GRID_PER_CLASS = 2
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def check_explainable(task: Any, what: str) -> None:
    """``what`` (e.g. ``--cam``) needs a classifier run (``Task.supports_cam``)."""
    if not getattr(task, "supports_cam", False):
        raise ValueError(f"{what} needs a classifier run; this run's task is {task.name!r}")


def resolve_protocol_dir(path: str | Path, default_protocol: str | None = None) -> Path:
    """``TFRECORDS/PROTOCOL`` as given, or ``TFRECORDS`` + ``default_protocol``; a clear
    ``FileNotFoundError`` when neither holds a summary.json."""
    return locate_protocol(path, default_protocol)


def data_tag(protocol_dir: Path) -> str:
    """``<tfrecords folder>_<protocol>`` as a file-name part, e.g. ``tfr_external_2class``."""
    protocol_dir = Path(protocol_dir)
    return _UNSAFE.sub("-", f"{protocol_dir.parent.name}_{protocol_dir.name}").strip("-")


def _split_datasets(protocol_dir: Path, split: str, fold: int, **kwargs: Any) -> list[tuple[str, Any]]:
    splits = ("test", "train", "val") if split == ALL_SPLITS else (split,)
    fold = 1 if split == ALL_SPLITS else fold
    return [(name, make_dataset(protocol_dir, name, fold=fold, training=False, augment=False, cache=False,
                                with_ids=True, **kwargs)) for name in splits]


def _ids(batch_ids) -> list[str]:
    return [i.decode("utf-8") for i in batch_ids.numpy()]


# --------------------------------------------------------------------------- CAM grid


def write_cam_grid(
    model: Any,
    batches: Iterable[tuple[Any, Any, Any]],
    class_names: Sequence[str],
    path: Path,
    title: str = "",
    per_class: int = CAM_GRID_PER_CLASS,
) -> Path:
    """The first ``per_class`` images of every true class from ``(images, one-hot labels,
    ids)`` batches, each with the Grad-CAM of every class of ``class_names`` (columns) and
    the predicted probabilities in the titles (`caaxr_tf.explain.plots.plot_cam_grid`)."""
    from caaxr_tf.explain.plots import plot_cam_grid

    picked: dict[int, list[tuple[np.ndarray, str]]] = {k: [] for k in range(len(class_names))}
    for images, labels, batch_ids in batches:
        for image, label, image_id in zip(images.numpy(), np.argmax(labels.numpy(), axis=1), _ids(batch_ids)):
            if int(label) in picked and len(picked[int(label)]) < per_class:
                picked[int(label)].append((image, f"{image_id} ({class_names[int(label)]})"))
        if all(len(v) == per_class for v in picked.values()):
            break
    chosen = [item for k in sorted(picked) for item in picked[k]]
    if not chosen:
        raise ValueError("no images to draw the CAM grid from")
    images = np.stack([image for image, _ in chosen])
    explainer = GradCam(model, run_eagerly=True)  # a handful of images: tracing would cost more
    results = [explainer(images, class_index=k) for k in range(len(class_names))]
    cams = np.stack([r.cam for r in results], axis=1)  # [N, K, H, W]
    return plot_cam_grid(images, cams, path, list(class_names), scores=results[0].predictions,
                         ids=[label for _, label in chosen], title=title)


# --------------------------------------------------------------------------- localization


@dataclass
class LocalizationResult:
    """Table (map -> hit_rate, energy, iou, num_images, ...), per-image rows and the context."""

    table: dict[str, dict[str, Any]]
    header: list[str]
    rows: list[list[Any]]
    class_name: str
    info: dict[str, Any] = field(default_factory=dict)


def evaluate_localization(
    model: Any,
    class_names: Sequence[str],
    protocol_dir: str | Path,
    *,
    split: str = "test",
    fold: int = 1,
    image_size: int = 224,
    batch_size: int = 16,
    class_name: str | None = None,
    threshold: float | None = None,
    layer: str | None = None,
) -> LocalizationResult:
    """Grad-CAM of ``class_name`` (default: the COVID class) on every image of a
    segmentation-type protocol's ``split``, scored against its masks, with the baselines.

    Images whose mask is empty (no boxes) are counted in ``num_without_boxes`` and left out.
    """
    import tensorflow as tf

    protocol_dir = Path(protocol_dir)
    summary = read_summary(protocol_dir)
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if class_name is None:
        index = covid_index(class_names)
    elif class_name in class_names:
        index = list(class_names).index(class_name)
    else:
        raise ValueError(f"class {class_name!r} is not one of the run's classes {list(class_names)}")
    explainer = GradCam(model, layer=layer)
    scores: dict[str, list] = {}
    ids: list[str] = []
    probabilities: list[float] = []
    for _, dataset in _split_datasets(protocol_dir, split, fold, batch_size=batch_size, image_size=image_size):
        for images, target, batch_ids in dataset:
            masks = target["mask"] if isinstance(target, Mapping) else target
            if not isinstance(masks, tf.Tensor) or masks.shape.rank != 4:
                raise ValueError(f"{protocol_dir} ({summary.get('task')}) gives no masks: --localization needs a "
                                 "segmentation protocol (boxes or pixel masks), e.g. TFRECORDS/seg")
            result = explainer(images.numpy(), class_index=index)
            for name, rows in score_masks_with_baselines(result.cam, masks.numpy(), threshold).items():
                scores.setdefault(name, []).extend(rows)
            ids.extend(_ids(batch_ids))
            probabilities.extend(result.predictions[:, index].tolist())
    if not ids:
        raise ValueError(f"no images in the {split} split of {protocol_dir}")
    table = table_from_scores(scores, threshold)
    names = list(scores)
    header = ["image_id", f"p_{class_names[index]}"] + [f"{n}_{s}" for n in names for s in ("pointing", "energy", "iou")]
    rows = []
    for i, image_id in enumerate(ids):
        row: list[Any] = [image_id, f"{probabilities[i]:.6f}"]
        for name in names:
            row += ["" if math.isnan(v) else f"{v:.6f}" for v in scores[name][i].as_dict().values()]
        rows.append(row)
    info = {"explained_class": class_names[index], "layer": explainer.layer_name, "threshold": threshold,
            "boxes_tfrecords": str(protocol_dir), "boxes_protocol": summary.get("protocol"),
            "boxes_source": summary.get("source"), "split": split, "num_images": len(ids)}
    return LocalizationResult(table, header, rows, class_names[index], info)


def plot_localization(table: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    """Grouped bars: hit rate, energy inside and IoU of each map (CAM and baselines)."""
    from caaxr_tf.plots import new_figure, save_figure

    measures = (("hit_rate", "pointing game"), ("energy", "energy inside"), ("iou", "IoU (thresholded)"))
    names = list(table)
    figure = new_figure(6.5, 3.6)
    axes = figure.subplots()
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        values = [float(table[name].get(key) or 0.0) for key, _ in measures]
        bars = axes.bar(np.arange(len(measures)) + (k - (len(names) - 1) / 2) * width, values, width, label=name)
        for bar, value in zip(bars, values):
            axes.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=7)
    axes.set_xticks(np.arange(len(measures)), [label for _, label in measures])
    axes.set_ylim(0, 1.08)
    axes.set_ylabel("mean over images")
    axes.legend(fontsize=8)
    axes.set_title(title, fontsize=9)
    save_figure(figure, path)


# --------------------------------------------------------------------------- cross-source


@dataclass
class ExternalResult:
    """Metrics on the other data (with the class match), per-image rows, and the data's ids."""

    metrics: dict[str, Any]
    header: list[str]
    rows: list[list[Any]]


def match_run_classes(run_classes: Sequence[str], protocol_dir: Path, class_map: str | Mapping[str, str] | None):
    """The `ClassMatch` of a run's classes with a protocol's (a classification protocol);
    raises ``ClassMatchError`` / ``ValueError`` before any image is read."""
    summary = read_summary(protocol_dir)
    if summary.get("task") != "classification":
        raise ValueError(f"{protocol_dir} is a {summary.get('task')!r} protocol: cross-source evaluation needs a "
                         "classification protocol")
    return match_classes(run_classes, [str(c) for c in summary["classes"]], class_map), summary


def evaluate_external(
    predict: Callable[[Any], Any],
    run_classes: Sequence[str],
    protocol_dir: str | Path,
    *,
    class_map: str | Mapping[str, str] | None = None,
    split: str = "test",
    image_size: int = 224,
    batch_size: int = 32,
    exclude_ids: Iterable[str] = (),
) -> ExternalResult:
    """Score ``predict`` (images -> the run's class probabilities) on another protocol's
    ``split`` (``all``: every image), its classes matched to the run's; images whose id is
    in ``exclude_ids`` (e.g. `training_overlap`'s) are left out."""
    protocol_dir = Path(protocol_dir)
    match, summary = match_run_classes(run_classes, protocol_dir, class_map)
    data_task = get_task("classification")(match.data_classes)
    excluded = set(exclude_ids)
    ids: list[str] = []
    splits: list[str] = []
    labels, scores = [], []
    for name, dataset in _split_datasets(protocol_dir, split, 1, batch_size=batch_size, image_size=image_size,
                                         task=data_task):
        for images, targets, batch_ids in dataset:
            batch_ids = _ids(batch_ids)
            keep = np.array([image_id not in excluded for image_id in batch_ids], dtype=bool)
            if not keep.any():
                continue
            batch_scores = class_scores(predict(images), len(run_classes))[keep]
            batch_ids = [image_id for image_id, kept in zip(batch_ids, keep) if kept]
            check_finite(batch_scores, batch_ids)
            scores.append(batch_scores)
            labels.append(np.argmax(targets.numpy(), axis=1)[keep])
            ids.extend(batch_ids)
            splits.extend([name] * len(batch_ids))
    if not ids:
        raise ValueError(f"no images in the {split} split of {protocol_dir}")
    labels_np, scores_np = np.concatenate(labels), np.concatenate(scores)
    metrics = {"num_images": len(ids), **external_metrics(labels_np, scores_np, match),
               "external_tfrecords": str(protocol_dir), "external_protocol": summary.get("protocol"),
               "external_source": summary.get("source"), "external_split": split}
    evaluated = match.map_scores(scores_np)
    eval_labels = match.map_labels(labels_np)
    predicted = np.argmax(evaluated, axis=1)
    names = match.class_names
    header = ["image_id", "split", "data_label", "label", "predicted", *(f"p_{c}" for c in names)]
    rows = [[i, s, match.data_classes[d], names[t], names[p], *(f"{v:.6f}" for v in row)]
            for i, s, d, t, p, row in zip(ids, splits, labels_np, eval_labels, predicted, evaluated)]
    return ExternalResult(metrics, header, rows)


class TrainingOverlapError(ValueError):
    """The external set holds images the run trained or validated on."""


@dataclass
class TrainingOverlap:
    """External images that are also in the run's training or validation data.

    An image overlaps when its ``image_id`` is one of the run's train/val images, or its
    patient (``source`` and ``patient_id``) is one of the run's train/val patients: the same
    collection built through another protocol (or another source's folder of it) shares both.
    """

    run_protocol_dir: str
    fold: int
    external_images: int
    image_ids: list[str]
    by_image_id: int
    by_patient: int

    def as_dict(self, excluded: bool) -> dict[str, Any]:
        return {"run_tfrecords": self.run_protocol_dir, "run_fold": self.fold,
                "external_images": self.external_images, "overlapping_images": len(self.image_ids),
                "by_image_id": self.by_image_id, "by_patient": self.by_patient,
                "excluded": len(self.image_ids) if excluded else 0, "examples": self.image_ids[:5]}

    def message(self, external_dir: Path) -> str:
        examples = ", ".join(self.image_ids[:5]) + (", ..." if len(self.image_ids) > 5 else "")
        return (f"{len(self.image_ids)} of the {self.external_images} images of the external set {external_dir} "
                f"are in the training/validation data of the run (fold {self.fold} of {self.run_protocol_dir}): "
                f"{self.by_image_id} by image id, {self.by_patient} by patient id (e.g. {examples}); evaluate on "
                "a disjoint set, or pass --exclude-overlap to leave them out")


def _manifest_rows(protocol_dir: Path, what: str) -> list[dict[str, str]]:
    import csv

    path = Path(protocol_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"cannot check the external set against the run's training data: {what} has no "
                                f"{MANIFEST_FILE} ({path})")
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def training_overlap(run_protocol_dir: str | Path, fold: int, external_dir: str | Path,
                     split: str = "test") -> TrainingOverlap:
    """The images of ``external_dir``'s ``split`` (``all``: every image; others: fold 1, as
    `evaluate_external` reads them) that are in fold ``fold``'s train or val split of the
    run's protocol, by image id or by patient (see `TrainingOverlap`); from the manifests."""
    run_rows = _manifest_rows(Path(run_protocol_dir), "the run's protocol")
    column = f"split_fold{int(fold)}"
    trained = [row for row in run_rows if row.get(column) in ("train", "val")]
    image_ids = {row["image_id"] for row in trained}
    patients = {(row.get("source", ""), row["patient_id"]) for row in trained if row.get("patient_id")}
    external = _manifest_rows(Path(external_dir), "the external set")
    if split != ALL_SPLITS:
        external = [row for row in external if row.get("split_fold1") == split]
    overlapping, by_id, by_patient = [], 0, 0
    for row in external:
        same_image = row["image_id"] in image_ids
        same_patient = bool(row.get("patient_id")) and (row.get("source", ""), row["patient_id"]) in patients
        by_id += same_image
        by_patient += same_patient
        if same_image or same_patient:
            overlapping.append(row["image_id"])
    return TrainingOverlap(str(run_protocol_dir), int(fold), len(external), sorted(overlapping), by_id, by_patient)


def shortcut_summary(internal: Mapping[str, Any] | None, external: Mapping[str, Any]) -> dict[str, Any]:
    """Internal and external COVID AUC of one run and their difference (the shortcut gap).

    ``internal`` is the run's own metrics.json (None: not evaluated yet, internal AUC NaN)."""
    covid = external.get("covid_class")
    external_auc = (external.get("auc_per_class") or {}).get(covid)
    internal_auc = None
    if internal is not None:
        internal_auc = (internal.get("auc_per_class") or {}).get(internal.get("covid_class"))
    result = shortcut_gap(math.nan if internal_auc is None else internal_auc,
                          math.nan if external_auc is None else external_auc)
    return {"covid_class": covid, **result}

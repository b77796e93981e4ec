"""``caaxr score`` beyond classification: regression targets and segmentation masks.

Regression protocols (``severity``): a CSV or JSON-lines file of ``image_id`` and one column per
target, named as the target (``geographic_extent``) or as caaxr-tf's evaluation writes it
(``predicted_geographic_extent``; its ``true_*`` columns are ignored). The truth is the
manifest's ``target_<name>``. Scores: MAE, MSE, R² and Pearson r per target (the names of the
evaluation's metrics.json), with patient-clustered bootstrap intervals.

Segmentation protocols (``seg``, ``lungs``): a folder of mask PNGs, one per test image, named by
the image id (``<image_id>.png``, or the id's stem + ``.png`` when the id has an extension),
8- or 16-bit, ``S x S`` at the protocol's model size (``--image-size``, default 224), values read
as probabilities (divided by 255 or 65535) and thresholded at 0.5, as the evaluation does. The
truth is the protocol's masks as the tf.data pipeline prepares them. Scores: mean Dice and IoU
(per image, empty truth and empty prediction score 1), with intervals.

Problems are reported by image id and field before anything is written (a mask of the wrong
size or an unreadable file, a target that is not a finite number, duplicated or extra ids), and
a file or folder missing more than ``--max-missing`` of the split's ids is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from caaxr_tf.metrics.uncertainty import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap, intervals_as_dict
from caaxr_tf.score_inputs import (
    DEFAULT_MAX_MISSING,
    PredictionsError,
    Protocol,
    _listed,
)

MASK_THRESHOLD = 0.5


@dataclass
class CheckedRows:
    """Scored ids (manifest order), their truth and predictions ``[N, ...]``, the ids missing."""

    ids: list[str]
    truth: np.ndarray
    predicted: np.ndarray
    missing: list[str]
    columns: dict[str, str]


def _refuse_missing(protocol: Protocol, present: set[str], max_missing: float, problems: list[str]) -> list[str]:
    missing = [i for i in protocol.ids if i not in present]
    share = len(missing) / len(protocol.ids)
    if share > max_missing:
        problems.append(f"{len(missing)} of {len(protocol.ids)} ids of the split missing ({share:.1%}, more than "
                        f"--max-missing {max_missing:.1%}): {_listed(missing)}")
    return missing


def target_names_of(protocol: Protocol) -> list[str]:
    summary = json.loads((protocol.path / "summary.json").read_text(encoding="utf-8"))
    names = [str(n) for n in summary.get("target_names") or []]
    if not names:
        raise ValueError(f"{protocol.path / 'summary.json'}: target_names: none (not a regression protocol)")
    return names


# --------------------------------------------------------------------------- regression


def check_regression(columns: Sequence[str], records: Sequence[dict[str, Any]], protocol: Protocol, *,
                     max_missing: float = DEFAULT_MAX_MISSING, source: str = "predictions") -> CheckedRows:
    """Predicted targets of the split's ids, or ``PredictionsError`` listing every problem."""
    names = target_names_of(protocol)
    if "image_id" not in columns:
        raise PredictionsError(f"{source}: wrong columns: no image_id column; the file has: {', '.join(columns) or 'none'}")
    mapping, absent = {}, []
    for name in names:
        found = next((c for c in (f"predicted_{name}", name) if c in columns), None)
        if found is None:
            absent.append(name)
        mapping[name] = found
    if absent:
        raise PredictionsError(f"{source}: wrong columns: no column for target(s) {', '.join(absent)} (expected "
                               f"<target> or predicted_<target>); the file has: {', '.join(columns)}")
    truth_of = {}
    for row in protocol.rows:
        try:
            truth_of[row["image_id"]] = [float(row[f"target_{n}"]) for n in names]
        except (KeyError, ValueError) as error:
            raise ValueError(f"{protocol.path / 'manifest.csv'}: image {row['image_id']}: target_*: {error}") from None
    problems: list[str] = []
    seen: dict[str, list[float]] = {}
    duplicates, extra = [], []
    for record in records:
        image_id = str(record.get("image_id") or "").strip()
        if not image_id:
            problems.append("a row without image_id")
            continue
        if image_id in seen:
            duplicates.append(image_id)
            continue
        if image_id not in truth_of:
            extra.append(image_id)
            continue
        values = []
        for name in names:
            raw = record.get(mapping[name])
            try:
                value = float(raw)
            except (TypeError, ValueError):
                problems.append(f"image {image_id}: {mapping[name]}: not a number ({raw!r})")
                value = math.nan
            else:
                if not math.isfinite(value):
                    problems.append(f"image {image_id}: {mapping[name]}: {value} (NaN or infinite)")
            values.append(value)
        seen[image_id] = values
    if duplicates:
        problems.append(f"duplicated image ids: {_listed(sorted(set(duplicates)))}")
    if extra:
        problems.append(f"{len(extra)} image ids not in the {protocol.split} split of fold {protocol.fold} "
                        f"of {protocol.path}: {_listed(extra)}")
    missing = _refuse_missing(protocol, set(seen), max_missing, problems)
    if problems:
        raise PredictionsError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    ids = [i for i in protocol.ids if i in seen]
    return CheckedRows(ids, np.array([truth_of[i] for i in ids], np.float64).reshape(len(ids), len(names)),
                       np.array([seen[i] for i in ids], np.float64).reshape(len(ids), len(names)), missing,
                       {n: str(c) for n, c in mapping.items()})


def score_regression(protocol: Protocol, checked: CheckedRows, *, n_resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """The evaluation's regression numbers (`RegressionTask.scores`) and their intervals."""
    from caaxr_tf.tasks.regression import RegressionTask, flat_regression_scores

    names = target_names_of(protocol)
    task = RegressionTask(protocol.class_names or ["scored"], target_names=names)
    result: dict[str, Any] = {"num_images": len(checked.ids), **task.scores(checked.truth, checked.predicted)}
    if n_resamples:
        by_id = {r["image_id"]: r for r in protocol.rows}
        patients = [by_id[i].get("patient_id") or i for i in checked.ids]
        intervals = bootstrap(flat_regression_scores, checked.truth, checked.predicted, groups=patients,
                              n_resamples=n_resamples, seed=seed, target_names=names)
        result["intervals"] = {"method": "patient-clustered bootstrap, percentile", "seed": seed,
                               "num_patients": len(set(patients)), **intervals_as_dict(intervals)}
    return result


# --------------------------------------------------------------------------- segmentation


def mask_file(folder: Path, image_id: str) -> Path | None:
    """``<image_id>.png`` or ``<stem of image_id>.png`` in ``folder`` (None: neither exists)."""
    for name in (f"{image_id}.png", f"{Path(image_id).stem}.png", image_id if image_id.endswith(".png") else None):
        if name and (folder / name).is_file():
            return folder / name
    return None


def read_mask(path: Path, image_size: int) -> np.ndarray:
    """A predicted mask PNG as probabilities ``[S, S]``; ValueError naming the problem."""
    import cv2

    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError("not a readable PNG")
    if pixels.ndim != 2:
        raise ValueError(f"{pixels.ndim}-D image with {pixels.shape[-1]} channels (expected one channel)")
    if pixels.shape != (image_size, image_size):
        raise ValueError(f"size {pixels.shape[1]}x{pixels.shape[0]}, expected {image_size}x{image_size} "
                         "(the protocol's model size, --image-size)")
    scale = 65535.0 if pixels.dtype == np.uint16 else 255.0
    return pixels.astype(np.float32) / scale


def score_masks(protocol: Protocol, folder: str | Path, *, image_size: int = 224, n_resamples: int = DEFAULT_RESAMPLES,
                seed: int = DEFAULT_SEED, max_missing: float = DEFAULT_MAX_MISSING) -> dict[str, Any]:
    """Dice and IoU of a folder of predicted masks against the protocol's masks of the split."""
    from caaxr_tf.metrics import dice_per_image, iou_per_image
    from caaxr_tf.tasks.datasets import make_dataset
    from caaxr_tf.tasks.segmentation import EMPTY_SCORE, SegmentationTask, mean_dice_iou, segmentation_metrics

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"mask folder {folder} not found")
    problems: list[str] = []
    found: dict[str, Path] = {}
    for image_id in protocol.ids:
        path = mask_file(folder, image_id)
        if path is not None:
            found[image_id] = path
    expected = {f"{i}.png" for i in protocol.ids} | {f"{Path(i).stem}.png" for i in protocol.ids} | set(protocol.ids)
    extra = sorted(p.name for p in folder.glob("*.png") if p.name not in expected)
    if extra:
        problems.append(f"{len(extra)} mask files not named by an id of the {protocol.split} split of fold "
                        f"{protocol.fold}: {_listed(extra)}")
    predicted: dict[str, np.ndarray] = {}
    for image_id, path in found.items():
        try:
            predicted[image_id] = read_mask(path, image_size)
        except ValueError as error:
            problems.append(f"image {image_id}: {path.name}: {error}")
    missing = _refuse_missing(protocol, set(found), max_missing, problems)
    if problems:
        raise PredictionsError(f"{folder}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    task = SegmentationTask(protocol.class_names)
    dataset = make_dataset(protocol.path, protocol.split, fold=protocol.fold, task=task, batch_size=16,
                           training=False, augment=False, cache=False, image_size=image_size, with_ids=True)
    ids, dice, iou = [], [], []
    for _, targets, batch_ids in dataset:
        truth = np.asarray(targets["mask"] if isinstance(targets, dict) else targets)
        for index, raw in enumerate(batch_ids.numpy()):
            image_id = raw.decode("utf-8")
            if image_id not in predicted:
                continue
            pred = predicted[image_id][None, :, :, None]
            dice.append(float(dice_per_image(truth[index:index + 1], pred, MASK_THRESHOLD, EMPTY_SCORE)[0]))
            iou.append(float(iou_per_image(truth[index:index + 1], pred, MASK_THRESHOLD, EMPTY_SCORE)[0]))
            ids.append(image_id)
    dice_np, iou_np = np.array(dice), np.array(iou)
    result: dict[str, Any] = {"num_images": len(ids), **segmentation_metrics(dice_np, iou_np), "missing": missing,
                              "per_image": {i: {"dice": d, "iou": j} for i, d, j in zip(ids, dice, iou)}}
    if n_resamples:
        by_id = {r["image_id"]: r for r in protocol.rows}
        patients = [by_id[i].get("patient_id") or i for i in ids]
        intervals = bootstrap(mean_dice_iou, dice_np, iou_np, groups=patients, n_resamples=n_resamples, seed=seed)
        result["intervals"] = {"method": "patient-clustered bootstrap, percentile", "seed": seed,
                               "num_patients": len(set(patients)), **intervals_as_dict(intervals)}
    return result

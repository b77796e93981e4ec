"""Evaluate a trained run on its protocol's test (or validation) split.

    python -m caaxr_tf.evaluate --run RUN_DIR [--split test|val] [--subset consolidation]
                                [--batch-size N] [--model best|final] [--no-plots]

The run folder (see docs/run_dir.md) gives the model, the protocol folder and the fold.
Results go to ``RUN_DIR/eval/`` and are written atomically (temporary name, then rename):

    metrics<tag>.json       the numbers below
    predictions<tag>.csv    one row per image (segmentation: Dice/IoU; classifiers: scores)
    roc<tag>.png            classifiers: one-vs-rest ROC curve per class, AUC in the legend
    confusion_matrix<tag>.png  classifiers: counts and row percentages
    examples<tag>.png       segmentation: image / ground truth / prediction overlays

``<tag>`` is empty for the default evaluation (test split, no subset, best model), so that is
``eval/metrics.json``; otherwise it is ``_<split>[_<subset>][_final]``, e.g.
``metrics_test_consolidation.json`` or ``metrics_val.json``.

metrics.json, common keys: ``run_dir``, ``model``, ``model_file``, ``protocol``, ``task``,
``fold``, ``split``, ``subset``, ``tfrecords``, ``num_images``, ``seconds``, ``files``.

* Segmentation: ``dice`` and ``iou`` are means over images of the per-image scores of
  ``caaxr_tf.metrics.dice_per_image`` / ``iou_per_image`` (prediction foreground where the
  probability is >= ``threshold`` 0.5; an image with empty ground truth and empty prediction
  scores ``empty_score`` 1.0), with ``dice_std`` / ``iou_std`` over images.
* Classification: ``class_names``; ``auc_per_class`` {class: one-vs-rest ROC AUC};
  ``auc_macro`` (their mean); ``covid_class`` and ``sensitivity_at_99_specificity`` /
  ``sensitivity_at_90_specificity``, COVID one-vs-all, exact
  (``caaxr_tf.metrics.sensitivity_at_specificity``): the COVID class is the one named
  ``covid`` (case-insensitive), else class 0; ``accuracy`` (arg-max prediction);
  ``confusion_matrix`` ``{"classes": [...], "matrix": [[...]]}`` with rows = true class and
  columns = predicted class, in ``classes`` order.

Values that are undefined (e.g. the AUC of a class absent from the split) are ``null``.
Models may output a tensor (U-Net, SegNet, classifiers) or a dict whose ``mask`` entry is
the mask probabilities (Mask R-CNN).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SPLITS = ("test", "val")
MODEL_FILES = ("best", "final")
THRESHOLD = 0.5
EMPTY_SCORE = 1.0
SPECIFICITIES = (0.99, 0.90)
NUM_EXAMPLES = 4


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #


def output_tag(split: str = "test", subset: str | None = None, which: str = "best") -> str:
    """File-name tag of one evaluation: "" for the default, else ``_<split>[_<subset>][_final]``."""
    if split == "test" and subset is None and which == "best":
        return ""
    return f"_{split}" + (f"_{subset}" if subset else "") + ("_final" if which == "final" else "")


def metrics_path(run_dir: str | Path, split: str = "test", subset: str | None = None, which: str = "best") -> Path:
    """Where `evaluate_run` writes the metrics of this evaluation."""
    from caaxr_tf.runs import EVAL_DIR

    return Path(run_dir) / EVAL_DIR / f"metrics{output_tag(split, subset, which)}.json"


def covid_index(class_names: Sequence[str]) -> int:
    """Index of the class named "covid" (case-insensitive), else 0."""
    lowered = [str(name).strip().lower() for name in class_names]
    return lowered.index("covid") if "covid" in lowered else 0


def _finite_or_none(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(_finite_or_none(data), indent=2, allow_nan=False) + "\n")


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _mask_output(outputs: Any) -> np.ndarray:
    """The mask probabilities of a model output: the tensor itself or its ``mask`` entry."""
    if isinstance(outputs, dict):
        if "mask" not in outputs:
            raise ValueError(f"the model returns a dict without a 'mask' entry (keys: {', '.join(outputs)})")
        outputs = outputs["mask"]
    return np.asarray(outputs, dtype=np.float32)


def _class_scores(outputs: Any, num_classes: int) -> np.ndarray:
    """``[N, C]`` class probabilities; a single sigmoid column of a 2-class model becomes two."""
    if isinstance(outputs, dict):
        for key in ("probabilities", "predictions", "scores"):
            if key in outputs:
                outputs = outputs[key]
                break
        else:
            raise ValueError(f"the classifier returns a dict without class scores (keys: {', '.join(outputs)})")
    scores = np.asarray(outputs, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.shape[1] == 1 and num_classes == 2:
        scores = np.concatenate([1.0 - scores, scores], axis=1)
    if scores.shape[1] != num_classes:
        raise ValueError(f"the model outputs {scores.shape[1]} scores per image for {num_classes} classes")
    return scores


# --------------------------------------------------------------------------- #
# Metrics from arrays (also used by the tests and the CV runner)
# --------------------------------------------------------------------------- #


def classification_metrics(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """AUC per class, COVID sensitivity at 99 % / 90 % specificity, accuracy, confusion matrix."""
    from sklearn.metrics import confusion_matrix

    from caaxr_tf.metrics import auc_per_class, sensitivity_at_specificity

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


def segmentation_metrics(dice: np.ndarray, iou: np.ndarray) -> dict[str, Any]:
    """Means and standard deviations over images of per-image Dice and IoU."""
    def stat(values: np.ndarray, fn) -> float:
        values = values[np.isfinite(values)]
        return float(fn(values)) if values.size else float("nan")

    return {
        "dice": stat(dice, np.mean),
        "iou": stat(iou, np.mean),
        "dice_std": stat(dice, np.std),
        "iou_std": stat(iou, np.std),
        "threshold": THRESHOLD,
        "empty_score": EMPTY_SCORE,
    }


# --------------------------------------------------------------------------- #
# Plots (matplotlib's object API with the Agg canvas: no global backend switch)
# --------------------------------------------------------------------------- #


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure, path: Path) -> None:
    _atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", bbox_inches="tight"))


def plot_roc(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> None:
    """One-vs-rest ROC curve of every class with its AUC in the legend; 99 %/90 % specificity marked."""
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = _new_figure(5.6, 5.0)
    axes = figure.add_subplot()
    for index, name in enumerate(class_names):
        positive = labels == index
        if positive.all() or not positive.any():
            axes.plot([], [], label=f"{name} (AUC n/a)")
            continue
        fpr, tpr, _ = roc_curve(positive, scores[:, index])
        auc = roc_auc_score(positive, scores[:, index])
        axes.plot(fpr, tpr, lw=2, label=f"{name} (AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    for specificity in SPECIFICITIES:
        axes.axvline(1.0 - specificity, color="black", ls=":", lw=0.8)
        axes.text(1.0 - specificity, 0.02, f" {specificity:.0%} spec.", fontsize=7, rotation=90, va="bottom")
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_xlabel("false positive rate (1 − specificity)")
    axes.set_ylabel("true positive rate (sensitivity)")
    axes.set_title(title, fontsize=10)
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(alpha=0.3)
    _save_figure(figure, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> None:
    """Counts with row percentages (share of each true class), rows = true, columns = predicted."""
    matrix = np.asarray(matrix)
    size = len(class_names)
    figure = _new_figure(1.6 + 1.3 * size, 1.3 + 1.1 * size)
    axes = figure.add_subplot()
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, np.maximum(totals, 1))
    axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for row in range(size):
        for col in range(size):
            colour = "white" if shares[row, col] > 0.6 else "black"
            axes.text(col, row, f"{matrix[row, col]}\n{shares[row, col]:.0%}", ha="center", va="center",
                      color=colour, fontsize=9)
    axes.set_xticks(range(size), labels=class_names, rotation=30, ha="right", fontsize=8)
    axes.set_yticks(range(size), labels=class_names, fontsize=8)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title, fontsize=10)
    _save_figure(figure, path)


def _short(text: str, width: int = 30) -> str:
    """``text`` cut in the middle to at most ``width`` characters."""
    if len(text) <= width:
        return text
    keep = (width - 1) // 2
    return text[:keep] + "…" + text[-(width - 1 - keep):]


def plot_segmentation_examples(
    images: np.ndarray, masks: np.ndarray, predictions: np.ndarray, ids: Sequence[str], dice: Sequence[float],
    path: Path, title: str,
) -> None:
    """Rows of image / ground truth overlay (green) / prediction overlay (red), as the paper's Fig. 4."""
    rows = len(images)
    figure = _new_figure(7.5, 2.7 * rows + 0.5)
    grid = figure.subplots(rows, 3, squeeze=False)
    for row in range(rows):
        image = images[row, ..., 0]
        truth = masks[row, ..., 0] > 0.5
        predicted = predictions[row, ..., 0] >= THRESHOLD
        panels = [
            (None, None, _short(ids[row])),
            (truth, (0.1, 0.9, 0.2), f"ground truth ({int(truth.sum())} px)"),
            (predicted, (1.0, 0.15, 0.1), f"prediction, Dice {dice[row]:.3f}"),
        ]
        for col, (overlay, colour, label) in enumerate(panels):
            axes = grid[row, col]
            axes.imshow(image, cmap="gray", vmin=0, vmax=255)
            if overlay is not None:
                rgba = np.zeros(overlay.shape + (4,), dtype=np.float32)
                rgba[overlay] = (*colour, 0.35)
                axes.imshow(rgba)
                if overlay.any() and not overlay.all():
                    axes.contour(overlay.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.0)
            axes.set_xticks([])
            axes.set_yticks([])
            axes.set_title(label, fontsize=8)
    figure.suptitle(title, fontsize=10)
    _save_figure(figure, path)


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #


def _check_inputs(run_dir: Path, split: str, subset: str | None, which: str) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """Config, protocol folder and summary of a run; one-line errors for what is missing."""
    from caaxr_tf.data.pipeline import read_summary, shard_files
    from caaxr_tf.runs import BEST_MODEL, FINAL_MODEL, load_run_config

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if which not in MODEL_FILES:
        raise ValueError(f"unknown model file {which!r}; expected one of {', '.join(MODEL_FILES)}")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    config = load_run_config(run_dir)
    if not isinstance(config, dict) or "tfrecords" not in config:
        raise ValueError(f"{run_dir / 'config.yaml'} has no 'tfrecords' entry: not a run folder written by caaxr_tf.train")
    model_file = run_dir / (BEST_MODEL if which == "best" else FINAL_MODEL)
    if not model_file.exists():
        raise FileNotFoundError(f"{model_file} not found: the run in {run_dir} has not saved a {which} model yet")
    tfrecords = Path(config["tfrecords"])
    summary = read_summary(tfrecords)
    fold = int(config.get("fold") or 1)
    shard_files(tfrecords, split, fold)  # raises for a split or fold that does not exist
    if subset is not None and subset not in summary.get("subsets", {}):
        known = ", ".join(summary.get("subsets", {})) or "none"
        raise ValueError(f"unknown subset {subset!r}; {tfrecords} has: {known}")
    return config, tfrecords, summary


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    subset: str | None = None,
    batch_size: int | None = None,
    which: str = "best",
    *,
    plots: bool = True,
    num_examples: int = NUM_EXAMPLES,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Evaluate the ``which`` model of a run on ``split`` (optionally one subset of it).

    Writes ``RUN_DIR/eval/metrics.json`` for the default (test split, no subset, best model)
    and ``RUN_DIR/eval/metrics_<split>[_<subset>][_final].json`` otherwise, plus the per-image
    CSV and the plots (see the module docstring), and returns the metrics dict. ``log``
    receives the printed summary table (None: silent).

    Raises ``ValueError`` when the model's outputs are not finite (nothing is written) and
    ``tf.errors.DataLossError`` naming the shard when a shard of the split is damaged.
    """
    from caaxr_tf.data.pipeline import shard_files
    from caaxr_tf.data.shards import naming_corrupt_shards

    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    config, tfrecords, _ = _check_inputs(Path(run_dir).resolve(), split, subset, which)
    with naming_corrupt_shards(shard_files(tfrecords, split, int(config.get("fold") or 1))):
        return _evaluate_run(run_dir, split, subset, batch_size, which, plots=plots, num_examples=num_examples, log=log)


def _check_finite(values: np.ndarray, ids: Sequence[str]) -> None:
    """A model with NaN weights scores DICE 0 or 1 and AUC 0.5 silently: refuse it instead."""
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        first = ", ".join(ids[i] for i in np.flatnonzero(bad)[:3])
        raise ValueError(
            f"the model's outputs are not finite (NaN or Inf) for {int(bad.sum())} image(s) of this batch "
            f"(e.g. {first}): the model is broken (trained with a non-finite loss?); nothing was written"
        )


def _evaluate_run(
    run_dir: str | Path,
    split: str,
    subset: str | None,
    batch_size: int | None,
    which: str,
    *,
    plots: bool,
    num_examples: int,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    from caaxr_tf.data.pipeline import make_dataset
    from caaxr_tf.runs import BEST_MODEL, EVAL_DIR, FINAL_MODEL, load_run_model

    started = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    config, tfrecords, summary = _check_inputs(run_dir, split, subset, which)
    task = summary["task"]
    class_names = [str(c) for c in (config.get("class_names") or summary["classes"])]
    fold = int(config.get("fold") or 1)
    batch_size = int(batch_size or config.get("batch_size") or 32)
    model = load_run_model(run_dir, which)
    predict = _predict_function(model)
    dataset = make_dataset(
        tfrecords, split, fold=fold, batch_size=batch_size, task=task, training=False, augment=False,
        cache=False, subset=subset, with_ids=True, image_size=int(config.get("image_size") or 224),
    )
    tag = output_tag(split, subset, which)
    eval_dir = run_dir / EVAL_DIR
    where = f"{split} split" + (f", {subset} subset" if subset else "")
    title = f"{config.get('model', '?')} — {config.get('protocol', '?')}, fold {fold}, {where}"

    metrics: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": config.get("model"),
        "model_file": BEST_MODEL if which == "best" else FINAL_MODEL,
        "protocol": config.get("protocol", summary.get("protocol")),
        "task": task,
        "fold": fold,
        "split": split,
        "subset": subset,
        "tfrecords": str(tfrecords),
    }
    files: dict[str, str] = {}
    if task == "classification":
        ids, labels, scores = [], [], []
        for images, targets, batch_ids in dataset:
            batch_scores = _class_scores(predict(images), len(class_names))
            _check_finite(batch_scores, [i.decode("utf-8") for i in batch_ids.numpy()])
            scores.append(batch_scores)
            labels.append(np.argmax(targets.numpy(), axis=1))
            ids.extend(i.decode("utf-8") for i in batch_ids.numpy())
        if not ids:
            raise ValueError(f"no images in the {where} of {tfrecords}")
        labels_np, scores_np = np.concatenate(labels), np.concatenate(scores)
        metrics["num_images"] = len(ids)
        metrics.update(classification_metrics(labels_np, scores_np, class_names))
        predicted = np.argmax(scores_np, axis=1)
        rows = [
            [image_id, class_names[t], class_names[p], *(f"{s:.6f}" for s in score)]
            for image_id, t, p, score in zip(ids, labels_np, predicted, scores_np)
        ]
        header = ["image_id", "label", "predicted", *(f"p_{c}" for c in class_names)]
        if plots:
            files["roc"] = f"roc{tag}.png"
            files["confusion_matrix"] = f"confusion_matrix{tag}.png"
            plot_roc(labels_np, scores_np, class_names, eval_dir / files["roc"], f"ROC, one-vs-rest: {title}")
            plot_confusion_matrix(
                np.array(metrics["confusion_matrix"]["matrix"]), class_names,
                eval_dir / files["confusion_matrix"], f"confusion matrix: {title}",
            )
    else:
        from caaxr_tf.metrics import dice_per_image, iou_per_image

        ids, dice, iou, true_px, pred_px = [], [], [], [], []
        for images, masks, batch_ids in dataset:
            probs = _mask_output(predict(images))
            _check_finite(probs, [i.decode("utf-8") for i in batch_ids.numpy()])
            truth = masks.numpy()
            dice.append(dice_per_image(truth, probs, THRESHOLD, EMPTY_SCORE))
            iou.append(iou_per_image(truth, probs, THRESHOLD, EMPTY_SCORE))
            true_px.append((truth > 0.5).reshape(len(truth), -1).sum(axis=1))
            pred_px.append((probs >= THRESHOLD).reshape(len(probs), -1).sum(axis=1))
            ids.extend(i.decode("utf-8") for i in batch_ids.numpy())
        if not ids:
            raise ValueError(f"no images in the {where} of {tfrecords}")
        dice_np, iou_np = np.concatenate(dice), np.concatenate(iou)
        metrics["num_images"] = len(ids)
        metrics.update(segmentation_metrics(dice_np, iou_np))
        rows = [
            [image_id, f"{d:.6f}", f"{j:.6f}", int(t), int(p)]
            for image_id, d, j, t, p in zip(ids, dice_np, iou_np, np.concatenate(true_px), np.concatenate(pred_px))
        ]
        header = ["image_id", "dice", "iou", "true_pixels", "predicted_pixels"]
        if plots and num_examples > 0:
            files["examples"] = f"examples{tag}.png"
            _plot_examples(predict, dataset, ids, dice_np, num_examples, eval_dir / files["examples"], title)

    files["predictions"] = f"predictions{tag}.csv"
    write_text_atomic(eval_dir / files["predictions"], _csv_text(header, rows))
    metrics["files"] = files
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics = _finite_or_none(metrics)
    write_json_atomic(eval_dir / f"metrics{tag}.json", metrics)
    if log is not None:
        log(format_metrics(metrics))
        log(f"wrote {eval_dir / f'metrics{tag}.json'}")
    return metrics


BASELINES = {"empty mask": 0.0, "all-ones mask": 1.0}


def segmentation_baselines(
    tfrecords: str | Path,
    split: str = "test",
    *,
    fold: int = 1,
    subset: str | None = None,
    image_size: int = 224,
    batch_size: int = 32,
) -> dict[str, dict[str, Any]]:
    """DICE and IoU of constant predictions on a split, scored exactly as `evaluate_run` scores
    a model: ``{"empty mask": {...}, "all-ones mask": {...}}``, each with ``num_images``,
    ``dice``, ``iou``. A segmentation model has learnt something only well above both."""
    from caaxr_tf.data.pipeline import make_dataset
    from caaxr_tf.metrics import dice_per_image, iou_per_image

    dataset = make_dataset(
        tfrecords, split, fold=fold, batch_size=batch_size, task="segmentation", training=False, augment=False,
        cache=False, subset=subset, image_size=image_size,
    )
    scores: dict[str, tuple[list, list]] = {name: ([], []) for name in BASELINES}
    for _, masks in dataset:
        truth = masks.numpy()
        for name, value in BASELINES.items():
            constant = np.full(truth.shape, value, np.float32)
            scores[name][0].append(dice_per_image(truth, constant, THRESHOLD, EMPTY_SCORE))
            scores[name][1].append(iou_per_image(truth, constant, THRESHOLD, EMPTY_SCORE))
    result = {}
    for name, (dice, iou) in scores.items():
        if not dice:
            raise ValueError(f"no images in the {split} split of {tfrecords}")
        dice_np, iou_np = np.concatenate(dice), np.concatenate(iou)
        result[name] = {"num_images": int(len(dice_np)), "dice": float(dice_np.mean()), "iou": float(iou_np.mean())}
    return result


def classification_baselines(tfrecords: str | Path, split: str = "test", *, fold: int = 1) -> dict[str, dict[str, Any]]:
    """The metrics of a constant prediction on a split, scored exactly as `evaluate_run` scores a
    model: every image gets probability 1 for the most frequent class of the fold's training
    split. Its AUCs are 0.5, its sensitivities at high specificity 0 and its accuracy the share
    of that class: a classifier has learnt something only well above them. Labels come from
    the protocol's manifest.csv (no image is read)."""
    from caaxr_tf.data.pipeline import read_summary

    tfrecords = Path(tfrecords)
    summary = read_summary(tfrecords)
    class_names = [str(c) for c in summary["classes"]]
    training = summary["counts"][f"fold{fold}"]["train"]
    majority = max(class_names, key=lambda name: (training.get(name, 0), -class_names.index(name)))
    with open(tfrecords / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([int(r["label_index"]) for r in rows if r[f"split_fold{fold}"] == split], dtype=np.int64)
    if not labels.size:
        raise ValueError(f"no images in the {split} split of {tfrecords}")
    scores = np.zeros((labels.size, len(class_names)))
    scores[:, class_names.index(majority)] = 1.0
    metrics = {"task": "classification", **classification_metrics(labels, scores, class_names)}
    metrics["num_images"] = int(labels.size)
    return {f"constant ({majority})": _finite_or_none(metrics)}


def _predict_function(model) -> Callable[[Any], Any]:
    """``images -> numpy outputs`` through one graph traced for any batch size."""
    import tensorflow as tf

    try:
        spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)
    except (AttributeError, TypeError, IndexError, ValueError):  # a subclassed model without known inputs
        spec = None
    if spec is None:
        step = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    else:
        step = tf.function(lambda images: model(images, training=False), input_signature=[spec])

    def predict(images) -> Any:
        outputs = step(tf.convert_to_tensor(images, tf.float32))
        if isinstance(outputs, dict):
            return {key: value.numpy() for key, value in outputs.items()}
        if isinstance(outputs, (list, tuple)):
            return outputs[0].numpy()  # a multi-output model's first output
        return outputs.numpy()

    return predict


def _plot_examples(predict, dataset, ids: list[str], dice: np.ndarray, count: int, path: Path, title: str) -> None:
    """Images at evenly spaced ranks of Dice (best → worst), read again and predicted again."""
    order = np.argsort(-np.nan_to_num(dice, nan=-1.0), kind="stable")
    picks = sorted({int(order[i]) for i in np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int)},
                   key=lambda position: -np.nan_to_num(dice[position], nan=-1.0))
    wanted = {position: rank for rank, position in enumerate(picks)}
    images: list[np.ndarray] = [None] * len(picks)  # type: ignore[list-item]
    masks: list[np.ndarray] = [None] * len(picks)  # type: ignore[list-item]
    position = 0
    for batch_images, batch_masks, _ in dataset:
        size = int(batch_images.shape[0])
        for offset in range(size):
            if position + offset in wanted:
                rank = wanted[position + offset]
                images[rank] = batch_images[offset].numpy()
                masks[rank] = batch_masks[offset].numpy()
        position += size
        if position > max(picks):
            break
    stacked = np.stack(images)
    predictions = _mask_output(predict(stacked))
    plot_segmentation_examples(
        stacked, np.stack(masks), predictions, [ids[p] for p in picks], [float(dice[p]) for p in picks], path,
        f"{title}\nbest to worst Dice; ground truth green, prediction red (p ≥ {THRESHOLD})",
    )


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A short plain-text table of one evaluation."""
    subset = f", subset {metrics['subset']}" if metrics.get("subset") else ""
    lines = [
        f"{metrics.get('model')} ({metrics.get('protocol')}, fold {metrics.get('fold')}, {metrics.get('model_file')}) "
        f"on the {metrics.get('split')} split{subset}: {metrics.get('num_images')} images"
    ]
    if metrics.get("task") == "classification":
        covid = metrics["covid_class"]
        pairs = [
            ("accuracy", metrics["accuracy"]),
            (f"sensitivity at 99% specificity ({covid})", metrics["sensitivity_at_99_specificity"]),
            (f"sensitivity at 90% specificity ({covid})", metrics["sensitivity_at_90_specificity"]),
            ("AUC, macro mean", metrics["auc_macro"]),
        ] + [(f"AUC {name}", value) for name, value in metrics["auc_per_class"].items()]
        width = max(len(k) for k, _ in pairs)
        lines += [f"  {k:<{width}}  {_fmt(v)}" for k, v in pairs]
        names = metrics["confusion_matrix"]["classes"]
        cell = max(7, *(len(n) for n in names))
        lines.append("  confusion matrix (rows true, columns predicted):")
        lines.append("  " + " " * cell + "".join(f" {n:>{cell}}" for n in names))
        for name, row in zip(names, metrics["confusion_matrix"]["matrix"]):
            lines.append(f"  {name:>{cell}}" + "".join(f" {v:>{cell}}" for v in row))
    else:
        lines += [
            f"  Dice  {_fmt(metrics['dice'])}  (std over images {_fmt(metrics['dice_std'])})",
            f"  IoU   {_fmt(metrics['iou'])}  (std over images {_fmt(metrics['iou_std'])})",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m caaxr_tf.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="run folder written by caaxr_tf.train")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--subset", default=None, help="a subset of the protocol, e.g. consolidation")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size")
    parser.add_argument("--model", default="best", choices=MODEL_FILES, help="best.keras or final.keras")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import tensorflow as tf

    try:
        evaluate_run(args.run, args.split, args.subset, args.batch_size, args.model, plots=not args.no_plots)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except tf.errors.DataLossError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

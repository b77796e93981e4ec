"""Evaluate a trained run on its protocol's test (or validation) split.

    python -m caaxr_tf.evaluate --run RUN_DIR [--split test|val] [--subset consolidation]
                                [--batch-size N] [--model best|final] [--no-plots] [--cam]
    python -m caaxr_tf.evaluate --run RUN_DIR --localization TFRECORDS[/seg]     (classifiers)
    python -m caaxr_tf.evaluate --run RUN_DIR --tfrecords OTHER_TFRECORDS[/PROTOCOL]
                                [--class-map old=new,...] [--split test|val|all] [--cam]

The run folder (see docs/run_dir.md) gives the model, the protocol folder and the fold.
Results go to ``RUN_DIR/eval/`` and are written atomically (temporary name, then rename):

    metrics<tag>.json       the numbers below
    predictions<tag>.csv    one row per image (segmentation: Dice/IoU; classifiers: scores)
    roc<tag>.png            classifiers: one-vs-rest ROC curve per class, AUC in the legend
    reliability<tag>.png    classifiers: one-vs-rest reliability diagram per class, ECE in the legend
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

Explainability (classifier runs; ``caaxr_tf.explain``, docs/explainability.md):

* ``--cam`` adds ``cam_grid<tag>.png``: two images of every true class, each with the
  Grad-CAM of every class (default target layer, logit scores) and its probabilities.
* ``--localization TFRECORDS[/PROTOCOL]`` (protocol default ``seg``) scores the Grad-CAM of
  the COVID class on that segmentation protocol's split against its boxes (or masks):
  pointing game, energy inside, IoU of ``cam >= 0.5 * max``, beside a centre-Gaussian and a
  uniform map. Writes ``localization_<folder>_<protocol><tag>.json`` (the table),
  ``.csv`` (per image) and ``.png`` (bars); the usual evaluation is not run.
* ``--tfrecords OTHER[/PROTOCOL]`` (protocol default: the run's) evaluates the run on another
  source's shards, classes matched by name (``--class-map old=new,...`` where they differ; a
  class that cannot be matched is an error naming it). ``--split all`` takes every image of
  that protocol. Writes ``external_<folder>_<protocol><tag>.json`` with the metrics, the class
  match and, when the run's own ``metrics.json`` exists, ``shortcut``: internal and external
  COVID AUC and their difference; ``.csv`` per image, ``_roc.png``. External images that are
  in the run's training/validation data (same image id, or same source and patient id: the
  same collection through another protocol) are an error naming how many; with
  ``--exclude-overlap`` they are left out and ``training_overlap`` in the JSON counts them.
Models may output a tensor (U-Net, SegNet, classifiers) or a dict whose ``mask`` entry is
the mask probabilities (Mask R-CNN).

What is computed, plotted and written per image belongs to the run's task
(``caaxr_tf.tasks``: ``Task.evaluate``); this module finds the run, its model and its split,
and writes the task's results.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from caaxr_tf.logs import quiet_tensorflow_logs

quiet_tensorflow_logs()

import numpy as np  # noqa: E402

from caaxr_tf.io import json_safe, write_json_atomic, write_text_atomic  # noqa: E402
from caaxr_tf.tasks.base import format_value  # noqa: E402
from caaxr_tf.metrics.classification import classification_metrics, covid_index  # noqa: E402,F401  (re-exported)
from caaxr_tf.models.outputs import predict_function  # noqa: E402,F401  (moved; re-exported)
from caaxr_tf.tables import csv_text  # noqa: E402,F401  (moved; re-exported)
from caaxr_tf.data.pipeline import make_dataset  # noqa: E402
from caaxr_tf.data.schema import read_summary, shard_files  # noqa: E402
from caaxr_tf.data.shards import naming_corrupt_shards  # noqa: E402
from caaxr_tf.explain.evaluation import (  # noqa: E402
    ALL_SPLITS,
    TrainingOverlapError,
    check_explainable,
    data_tag,
    evaluate_external,
    evaluate_localization,
    match_run_classes,
    plot_localization,
    resolve_protocol_dir,
    shortcut_summary,
    training_overlap,
    write_cam_grid,
)
from caaxr_tf.explain.localization import format_table  # noqa: E402
from caaxr_tf.runs import BEST_MODEL, EVAL_DIR, FINAL_MODEL, Run, open_run  # noqa: E402
from caaxr_tf.tasks import EvalContext, get_task  # noqa: E402
from caaxr_tf.tasks.options import add_task_arguments, task_options  # noqa: E402
from caaxr_tf.models.precision import add_precision_argument, check_precision, precision_tag, with_precision  # noqa: E402

SPLITS = ("test", "val")
MODEL_FILES = ("best", "final")
NUM_EXAMPLES = 4


def output_tag(split: str = "test", subset: str | None = None, which: str = "best") -> str:
    """File-name tag of one evaluation: "" for the default, else ``_<split>[_<subset>][_final]``."""
    if split == "test" and subset is None and which == "best":
        return ""
    return f"_{split}" + (f"_{subset}" if subset else "") + ("_final" if which == "final" else "")


def metrics_path(run_dir: str | Path, split: str = "test", subset: str | None = None, which: str = "best") -> Path:
    """Where `evaluate_run` writes the metrics of this evaluation."""
    return Path(run_dir) / EVAL_DIR / f"metrics{output_tag(split, subset, which)}.json"


def _check_inputs(run_dir: "str | Path | Run", split: str, subset: str | None, which: str) -> Run:
    """The Run, checked: one-line errors for what is missing, before anything is read."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if which not in MODEL_FILES:
        raise ValueError(f"unknown model file {which!r}; expected one of {', '.join(MODEL_FILES)}")
    run = open_run(run_dir)
    model_file = run.model_path(which)
    if not model_file.exists():
        raise FileNotFoundError(f"{model_file} not found: the run in {run.path} has not saved a {which} model yet")
    run.task()  # an unknown task is an error before anything is read
    shard_files(run.protocol_dir, split, run.settings.fold)  # raises for a split or fold that does not exist
    if subset is not None and subset not in run.protocol.subsets:
        known = ", ".join(run.protocol.subsets) or "none"
        raise ValueError(f"unknown subset {subset!r}; {run.protocol_dir} has: {known}")
    return run


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
    cam: bool = False,
    options: dict[str, Any] | None = None,
    patients: str | Path | None = None,
    bootstrap: int = 0,
    precision: str = "float32",
) -> dict[str, Any]:
    """Evaluate the ``which`` model of a run on ``split`` (optionally one subset of it).

    Writes ``RUN_DIR/eval/metrics.json`` for the default (test split, no subset, best model)
    and ``RUN_DIR/eval/metrics_<split>[_<subset>][_final].json`` otherwise, plus the per-image
    CSV and the task's plots (see the module docstring), and returns the metrics dict. ``log``
    receives the printed summary table (None: silent). ``cam`` also draws the Grad-CAM grid
    (classifiers only; ``ValueError`` otherwise, before anything is read).

    ``options`` are the run's task's own settings of this evaluation (its ``options_type``:
    e.g. the infection task's ``lung_run``, ``threshold``, ``min_pixels``; the ct task's
    ``patients``); an option of another task is a ValueError naming its flag. The files' tag
    then ends in the task's `Task.options_tag` (e.g. ``_lungs_a20``), so the default evaluation
    is never overwritten. ``patients`` is ``options["patients"]``.

    ``bootstrap`` (classifiers): that many patient-clustered bootstrap resamples give 95 %
    intervals of every metric (``metrics["intervals"]``, `caaxr_tf.scoring.intervals_from_rows`).

    ``precision`` (``caaxr_tf.models.precision``): the model computes in bfloat16/float16
    (float32 inputs and outputs); the files' tag then ends in ``_bfloat16``/``_float16`` and
    ``metrics["inference_precision"]`` says which. A precision the device lacks is a ``PrecisionError``.

    Raises ``ValueError`` when the model's outputs are not finite (nothing is written) or the
    run's task is unknown, and ``tf.errors.DataLossError`` naming the shard when a shard of the
    split is damaged.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    run = _check_inputs(run_dir, split, subset, which)
    check_precision(precision)
    if cam:
        check_explainable(run.task(), "--cam")
    with naming_corrupt_shards(shard_files(run.protocol_dir, split, run.settings.fold)):
        return _evaluate_run(run, split, subset, batch_size, which, plots=plots, num_examples=num_examples, log=log,
                             cam=cam, options=options, patients=patients, bootstrap=bootstrap, precision=precision)


def _evaluate_run(
    run: Run,
    split: str,
    subset: str | None,
    batch_size: int | None,
    which: str,
    *,
    plots: bool,
    num_examples: int,
    log: Callable[[str], None] | None,
    cam: bool = False,
    options: dict[str, Any] | None = None,
    patients: str | Path | None = None,
    bootstrap: int = 0,
    precision: str = "float32",
) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir, settings, tfrecords = run.path, run.settings, run.protocol_dir
    task = run.task()
    fold = settings.fold
    batch_size = int(batch_size or settings.batch_size)
    model = run.model(which)
    predict = run.predictor(model=with_precision(model, precision))
    dataset = run.dataset(split, task=task, batch_size=batch_size, subset=subset, with_ids=True)
    options = task.check_options({**(options or {}), **({"patients": str(patients)} if patients is not None else {})})
    tag = output_tag(split, subset, which) + task.options_tag(options) + precision_tag(precision)
    options = task.open_options(options, Run)
    eval_dir = run_dir / EVAL_DIR
    where = f"{split} split" + (f", {subset} subset" if subset else "")
    context = EvalContext(eval_dir, tag, f"{settings.model or '?'} — {settings.protocol or '?'}, fold {fold}, {where}",
                          plots=plots, num_examples=num_examples, options=options, protocol_dir=tfrecords,
                          split=split, fold=fold, image_size=settings.image_size, batch_size=batch_size)
    try:
        result = task.evaluate(predict, dataset, context)
    except ValueError as error:
        if str(error) == "no images in this split":
            raise ValueError(f"no images in the {where} of {tfrecords}") from None
        raise

    metrics: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": run.config.get("model"),
        "model_file": BEST_MODEL if which == "best" else FINAL_MODEL,
        "protocol": run.config.get("protocol", run.protocol.protocol),
        "task": task.name,
        "fold": fold,
        "split": split,
        "subset": subset,
        "tfrecords": str(tfrecords),
        "inference_precision": precision,
        **result.metrics,
    }
    if cam:
        write_cam_grid(model, dataset, task.class_names, context.path("cam_grid", "png"), f"Grad-CAM: {context.title}")
    if bootstrap:
        from caaxr_tf.scoring import intervals_from_rows

        intervals = intervals_from_rows(result.header, result.rows, tfrecords, task.class_names, split=split,
                                        fold=fold, n_resamples=int(bootstrap), reference=metrics, task=task)
        if intervals is not None:
            metrics["intervals"] = intervals
        elif log is not None:
            log(f"warning: --bootstrap: the {task.name} task has no bootstrap intervals; none computed")
    if getattr(task, "supports_calibration", False):
        from caaxr_tf.calibrate import CalibrationError

        try:
            scaling = _temperature_scaling(run, which, task, result.header, result.rows)
        except CalibrationError as error:  # not this checkpoint's: evaluated without it, and said
            scaling, metrics["temperature_scaling_left_out"] = None, str(error)
            if log is not None:
                log(f"warning: {error}")
        if scaling is not None:
            metrics["temperature_scaling"] = scaling
    files = dict(context.files)
    files["predictions"] = f"predictions{tag}.csv"
    write_text_atomic(eval_dir / files["predictions"], csv_text(result.header, result.rows))
    metrics["files"] = files
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics = json_safe(metrics)
    write_json_atomic(eval_dir / f"metrics{tag}.json", metrics)
    if log is not None:
        log(format_metrics(metrics, task))
        if metrics.get("temperature_scaling"):
            scaling = metrics["temperature_scaling"]
            log(f"  temperature {scaling['temperature']:.3f} ({scaling['fitted_on']}): "
                f"ECE {scaling['before']['ece']:.3f} -> {scaling['after']['ece']:.3f}, "
                f"NLL {scaling['before']['nll']:.3f} -> {scaling['after']['nll']:.3f}")
        if metrics.get("intervals"):
            from caaxr_tf.scoring import format_intervals

            log("\n".join(format_intervals(metrics["intervals"])))
        log(f"wrote {eval_dir / f'metrics{tag}.json'}")
    return metrics


def _temperature_scaling(run: Run, which: str, task, header: Sequence[str], rows: Sequence[Sequence[Any]]
                         ) -> dict[str, Any] | None:
    """ECE/NLL of the evaluated split before and after the run's calibration.json (None without
    one), from the predictions as written to predictions.csv, so ``caaxr score`` of that file
    with the same temperature gives the same figures."""
    from caaxr_tf.calibrate import read_calibration, split_calibration
    from caaxr_tf.run_files import CALIBRATION_FILE

    calibration = read_calibration(run, which)
    if calibration is None:
        return None
    names = list(task.class_names)
    columns = [header.index(f"p_{name}") for name in names]
    labels = np.array([names.index(row[header.index("label")]) for row in rows])
    probabilities = np.array([[float(row[c]) for c in columns] for row in rows])
    return split_calibration(labels, probabilities, names, calibration, str(run.path / CALIBRATION_FILE))


def _explain_inputs(run_dir: str | Path, which: str, what: str):
    """The Run, its config and Task of a classifier run, checked (``what`` names the option in errors)."""
    run = _check_inputs(run_dir, "test", None, which)
    task = run.task()
    check_explainable(task, what)
    return run, run.config, task


def evaluate_localization_run(
    run_dir: str | Path,
    protocol: str | Path,
    *,
    split: str = "test",
    which: str = "best",
    batch_size: int | None = None,
    plots: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Score a classifier run's COVID-class Grad-CAM against the boxes (masks) of a
    segmentation protocol (``protocol``: ``TFRECORDS/PROTOCOL`` or ``TFRECORDS``, then ``seg``).

    Writes ``RUN_DIR/eval/localization_<folder>_<protocol><tag>.json`` (the table of the CAM
    and the baselines), ``.csv`` (per image) and ``.png``; returns the JSON dict.
    """
    started = time.perf_counter()
    run, config, task = _explain_inputs(run_dir, which, "--localization")
    run_dir = run.path
    protocol_dir = resolve_protocol_dir(protocol, "seg")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    model = run.model(which)
    result = evaluate_localization(
        model, task.class_names, protocol_dir, split=split, image_size=run.settings.image_size,
        batch_size=int(batch_size or config.get("batch_size") or 16),
    )
    name = f"localization_{data_tag(protocol_dir)}{output_tag(split, None, which)}"
    eval_dir = run_dir / EVAL_DIR
    files = {"scores": f"{name}.csv"}
    write_text_atomic(eval_dir / files["scores"], csv_text(result.header, result.rows))
    title = f"{config.get('model')} ({config.get('protocol')}) {result.class_name} CAM vs {protocol_dir.name} boxes"
    if plots:
        files["plot"] = f"{name}.png"
        plot_localization(result.table, eval_dir / files["plot"], title)
    output = json_safe({"run_dir": str(run_dir), "model": config.get("model"), "protocol": config.get("protocol"),
                        "fold": int(config.get("fold") or 1), "model_file": which, **result.info,
                        "table": result.table, "files": files, "seconds": round(time.perf_counter() - started, 2)})
    write_json_atomic(eval_dir / f"{name}.json", output)
    if log is not None:
        log(f"{title}, {split} split:")
        log(format_table(result.table))
        log(f"wrote {eval_dir / f'{name}.json'}")
    return output


def evaluate_external_run(
    run_dir: str | Path,
    tfrecords: str | Path,
    *,
    class_map: str | None = None,
    split: str = "test",
    which: str = "best",
    batch_size: int | None = None,
    plots: bool = True,
    cam: bool = False,
    exclude_overlap: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Evaluate a classifier run on another source's shards (``TFRECORDS/PROTOCOL``, or
    ``TFRECORDS`` and the run's protocol), classes matched by name and ``class_map``.

    Writes ``RUN_DIR/eval/external_<folder>_<protocol><tag>.json`` (metrics, class match,
    shortcut gap when the run's own metrics.json exists), ``.csv`` and plots; returns the dict.
    Raises ``ClassMatchError`` naming the unmatched classes before any image is read, and
    ``TrainingOverlapError`` when external images are in the run's training/validation data
    (same image id or patient, `training_overlap`) unless ``exclude_overlap`` leaves them out;
    the JSON's ``training_overlap`` says how many overlapped and were excluded.
    """
    started = time.perf_counter()
    run, config, task = _explain_inputs(run_dir, which, "--tfrecords")
    run_dir = run.path
    if split not in (*SPLITS, ALL_SPLITS):
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join((*SPLITS, ALL_SPLITS))}")
    protocol_dir = resolve_protocol_dir(tfrecords, str(config.get("protocol") or ""))
    match, _ = match_run_classes(task.class_names, protocol_dir, class_map)  # errors before the model loads
    overlap = training_overlap(run.protocol_dir, run.settings.fold, protocol_dir, split)
    if overlap.image_ids and not exclude_overlap:
        raise TrainingOverlapError(overlap.message(protocol_dir))
    if overlap.image_ids and log is not None:
        log(f"--exclude-overlap: {len(overlap.image_ids)} of {overlap.external_images} external images left out "
            f"(in the run's training/validation data: {overlap.by_image_id} by image id, {overlap.by_patient} by patient)")
    model = run.model(which)
    image_size = run.settings.image_size
    result = evaluate_external(run.predictor(model=model), task.class_names, protocol_dir, class_map=class_map,
                               split=split, image_size=image_size,
                               batch_size=int(batch_size or run.settings.batch_size),
                               exclude_ids=overlap.image_ids)
    name = f"external_{data_tag(protocol_dir)}{output_tag(split, None, which) if split != ALL_SPLITS else '_all'}"
    eval_dir = run_dir / EVAL_DIR
    files = {"predictions": f"{name}.csv"}
    write_text_atomic(eval_dir / files["predictions"], csv_text(result.header, result.rows))
    title = f"{config.get('model')} ({config.get('protocol')}) on {protocol_dir.parent.name}/{protocol_dir.name}, {split}"
    if plots:
        from caaxr_tf.plots import plot_roc

        labels = np.array([match.class_names.index(row[3]) for row in result.rows])
        scores = np.array([[float(v) for v in row[5:]] for row in result.rows])
        files["roc"] = f"{name}_roc.png"
        plot_roc(labels, scores, match.class_names, eval_dir / files["roc"], f"ROC: {title}")
    if cam:
        files["cam_grid"] = f"{name}_cam_grid.png"
        grid_split = "test" if split == ALL_SPLITS else split
        dataset = make_dataset(protocol_dir, grid_split, fold=1, batch_size=16, image_size=image_size, training=False,
                               augment=False, cache=False, with_ids=True,
                               task=get_task("classification")(match.data_classes))
        write_cam_grid(model, dataset, match.data_classes, eval_dir / files["cam_grid"], f"Grad-CAM: {title}")
    internal_path = metrics_path(run_dir, which=which)
    internal = json.loads(internal_path.read_text(encoding="utf-8")) if internal_path.exists() else None
    output = json_safe({"run_dir": str(run_dir), "model": config.get("model"), "protocol": config.get("protocol"),
                        "fold": int(config.get("fold") or 1), "model_file": which, **result.metrics,
                        "training_overlap": overlap.as_dict(excluded=exclude_overlap),
                        "shortcut": shortcut_summary(internal, result.metrics), "files": files,
                        "seconds": round(time.perf_counter() - started, 2)})
    write_json_atomic(eval_dir / f"{name}.json", output)
    if log is not None:
        log(f"{title}: {output['num_images']} images")
        log("\n".join(task.format_metrics(output)[:4 + len(match.class_names)]))
        gap = output["shortcut"]
        log(f"  COVID AUC internal {format_value(gap['internal_auc'])}, external {format_value(gap['external_auc'])}, "
            f"gap {format_value(gap['gap'])}")
        log(f"wrote {eval_dir / f'{name}.json'}")
    return output


def format_metrics(metrics: dict[str, Any], task=None) -> str:
    """A short plain-text table of one evaluation."""
    subset = f", subset {metrics['subset']}" if metrics.get("subset") else ""
    lines = [
        f"{metrics.get('model')} ({metrics.get('protocol')}, fold {metrics.get('fold')}, {metrics.get('model_file')}) "
        f"on the {metrics.get('split')} split{subset}: {metrics.get('num_images')} images"
    ]
    task = task or get_task(metrics["task"])(metrics.get("class_names") or [])
    return "\n".join(lines + task.format_metrics(metrics))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m caaxr_tf.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="run folder written by caaxr_tf.train")
    parser.add_argument("--split", default="test", choices=(*SPLITS, "all"),
                        help="all: every image of the --tfrecords protocol (only with --tfrecords)")
    parser.add_argument("--subset", default=None, help="a subset of the protocol, e.g. consolidation")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size")
    parser.add_argument("--model", default="best", choices=MODEL_FILES, help="best.keras or final.keras")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--cam", action="store_true", help="classifiers: a grid of images with their Grad-CAMs")
    parser.add_argument("--localization", default=None, metavar="TFRECORDS[/PROTOCOL]",
                        help="classifiers: score the COVID Grad-CAM against a segmentation protocol's boxes "
                             "(default protocol seg)")
    parser.add_argument("--tfrecords", default=None, metavar="OTHER[/PROTOCOL]",
                        help="classifiers: evaluate on another source's shards (default protocol: the run's)")
    parser.add_argument("--class-map", default=None, metavar="OLD=NEW,...",
                        help="with --tfrecords: rename classes of the run or the data so that they match")
    parser.add_argument("--exclude-overlap", action="store_true",
                        help="with --tfrecords: leave out external images that are in the run's training/validation "
                             "data (same image id or patient) instead of refusing; the JSON says how many")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="classifiers: 95%% intervals of every metric from N patient-clustered bootstrap "
                             "resamples (metrics.json 'intervals'; caaxr score for more)")
    add_task_arguments(parser, "evaluate")
    add_precision_argument(parser)
    args = parser.parse_args(argv)
    if args.split == "all" and args.tfrecords is None:
        parser.error("--split all needs --tfrecords")
    if args.class_map is not None and args.tfrecords is None:
        parser.error("--class-map needs --tfrecords")
    if args.exclude_overlap and args.tfrecords is None:
        parser.error("--exclude-overlap needs --tfrecords")
    return args





def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import tensorflow as tf

    try:
        if args.localization is None and args.tfrecords is None:
            evaluate_run(args.run, args.split, args.subset, args.batch_size, args.model, plots=not args.no_plots,
                         cam=args.cam, options=task_options(args), bootstrap=args.bootstrap,
                         precision=args.precision)
        if args.localization is not None:
            evaluate_localization_run(args.run, args.localization, split="test" if args.split == "all" else args.split,
                                      which=args.model, batch_size=args.batch_size, plots=not args.no_plots)
        if args.tfrecords is not None:
            evaluate_external_run(args.run, args.tfrecords, class_map=args.class_map, split=args.split,
                                  which=args.model, batch_size=args.batch_size, plots=not args.no_plots, cam=args.cam,
                                  exclude_overlap=args.exclude_overlap)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except tf.errors.DataLossError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

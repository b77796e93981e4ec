"""Cross-validation: train and evaluate every model on every fold of one protocol.

    python -m caaxr_tf.cv --protocol 3class --models mobilenetv2,resnet18 \
        --tfrecords TFRECORDS --out cv/3class [--folds 1,2] [--force] [--eval-only] \
        [--epochs N] [--steps-per-epoch N] [--validation-steps N] [--batch-size N] [--lr X] \
        [--weights none|imagenet|PATH] [--strategy auto|one|mirrored|multiworker] \
        [--mixed-precision] [--jit] [--seed N] [--class-balance none|weights|sampling] [--config FILE] [--set key=value ...] \
        [--eval-batch-size N] [--no-plots] [--quiet] \
        [--external OTHER_TFRECORDS[/PROTOCOL] [--class-map old=new,...]] [--localization TFRECORDS[/seg]]

Classifiers only: ``--external`` also evaluates every run on another source's shards (all
their images; ``caaxr_tf.evaluate --tfrecords ... --split all``) and adds the columns
``internal_auc`` (the COVID AUC on the run's own test split), ``external_auc`` and
``shortcut_gap`` (their difference); ``--localization`` scores every run's COVID Grad-CAM
against a segmentation protocol's test boxes (``caaxr_tf.evaluate --localization``) and adds
``cam_hit_rate``, ``cam_energy``, ``cam_iou``.

``--tfrecords`` is the folder holding the protocol folders (``TFRECORDS/<protocol>/summary.json``).
Each (model, fold) gets the run folder ``OUT/<model>/fold<k>``: its configuration is resolved
from the training flags above exactly as ``caaxr_tf.train`` resolves them (all of them before
anything runs, so a bad flag stops the CV at once), ``caaxr_tf.train.run_training`` trains it
and ``caaxr_tf.evaluate.evaluate_run`` scores it on the test split, and on every subset of the
protocol as well (``seg``: consolidation / ground-glass opacity). The columns, the paper's
table and the constant-prediction baselines come from the protocol's task (``caaxr_tf.tasks``).

Resuming: a (model, fold) whose ``eval/metrics.json`` (and subset metrics) exist is skipped,
so a killed CV started again with the same arguments picks up where it stopped (training
itself resumes from the run's ``backup/`` checkpoints). ``--force`` calls the trainer and the
evaluation again for every run (the trainer does nothing for a completed run, so this
re-evaluates; delete a run folder to train it from scratch). ``--eval-only`` never trains.

Outputs, rewritten after every run, cover the models and folds of this invocation:

``OUT/results.csv``
    Columns ``model, fold, status, <metrics>, run_dir``. Per model: one row per fold
    (``status`` ``ok`` or ``failed: <reason>``), then a row with ``fold`` = ``mean`` and a row
    with ``fold`` = ``std`` (sample standard deviation over the successful folds, n − 1 in the
    denominator; empty with a single fold), whose ``status`` says how many folds they cover.
    Metrics — segmentation: ``num_images, dice, iou`` and per subset ``num_images_<subset>,
    dice_<subset>, iou_<subset>``; classification: ``num_images, accuracy, auc_<class>...,
    auc_macro, sensitivity_at_99_specificity, sensitivity_at_90_specificity`` (COVID
    one-vs-all; see ``caaxr_tf.evaluate``).
``OUT/results.md``
    One row per model, mean ± std over folds, with the paper's columns: DICE, IoU and DICE on
    the consolidation subset; or AUC per class, COVID sensitivity at 99 % and 90 %
    specificity and accuracy. Failed runs are listed under the table. A second table gives the
    same scores for constant predictions on the same test images — an empty and an all-ones
    mask for segmentation, the training split's most frequent class for classifiers: the floor
    a model has to rise above.
``OUT/intervals.json`` (``--bootstrap N``, default 2000; 0 = off)
    Per model: the 95 % patient-clustered bootstrap interval of the **mean over folds** of each
    metric the task resamples (`caaxr_tf.metrics.uncertainty.fold_mean_bootstrap`: one draw of
    patients shared by the folds, each fold scored on its images of the drawn patients), from
    the runs' eval/predictions.csv; results.md gains a table per model. The std row says how
    much the folds disagree; the interval says how much the test sample leaves open.
``OUT/baselines.json``
    Those constant-prediction scores: ``{"" or subset: {prediction: metrics}}`` (segmentation:
    ``num_images, dice, iou``; classification: the keys of ``metrics.json``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from caaxr_tf.logs import quiet_tensorflow_logs

quiet_tensorflow_logs()

from caaxr_tf.evaluate import metrics_path  # noqa: E402
from caaxr_tf.io import json_safe, write_text_atomic  # noqa: E402
from caaxr_tf.tables import (  # noqa: E402,F401  (moved to caaxr_tf.tables; re-exported)
    AGGREGATES,
    _number,
    format_mean_std,
    format_results_table,
    render_table,
    summarize,
)
from caaxr_tf.data.summary import ProtocolSummary  # noqa: E402
from caaxr_tf.evaluate import evaluate_external_run, evaluate_localization_run, evaluate_run  # noqa: E402
from caaxr_tf.explain.evaluation import (  # noqa: E402
    ALL_SPLITS,
    TrainingOverlapError,
    check_explainable,
    data_tag,
    match_run_classes,
    resolve_protocol_dir,
    training_overlap,
)
from caaxr_tf.runs import EVAL_DIR, Run  # noqa: E402
from caaxr_tf.tasks import get_task  # noqa: E402
from caaxr_tf.train import add_training_arguments, protocol_names, run_training, training_flags  # noqa: E402
from caaxr_tf.training.config import resolve_run_config  # noqa: E402

Trainer = Callable[..., Any]  # (RunConfig, run_dir) -> anything; raises when training fails
Evaluator = Callable[..., dict]

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
BASELINES_JSON = "baselines.json"
INTERVALS_JSON = "intervals.json"


@dataclass
class TrainingOptions:
    """The training settings of every run of a CV, as ``caaxr_tf.train`` takes them: a
    ``--config`` file, flags (RunConfig keys; ``learning_rate`` for ``--lr``) and ``--set``
    overrides."""

    config_file: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    verbose: bool = False


# --------------------------------------------------------------------------- #
# Columns, rows and tables
# --------------------------------------------------------------------------- #


def protocol_task(task: str, class_names: Sequence[str] = (), target_names: Sequence[str] = ()):
    """The Task object whose tables a protocol's CV writes."""
    return get_task(task)(list(class_names), target_names=list(target_names))


def metric_columns(task: str, class_names: Sequence[str] = (), subsets: Sequence[str] = ()) -> list[str]:
    """The metric columns of results.csv for a protocol."""
    return protocol_task(task, class_names).metric_columns(list(subsets))


def paper_columns(task: str, class_names: Sequence[str] = (), subsets: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(results.csv column, header) pairs of the paper's table for a protocol."""
    return protocol_task(task, class_names).paper_columns(list(subsets))


def row_from_metrics(
    model: str,
    fold: int,
    run_dir: str | Path,
    metrics: Mapping[str, Any],
    subset_metrics: Mapping[str, Mapping[str, Any]] | None = None,
    task=None,
) -> dict[str, Any]:
    """One results row from a run's metrics.json (and its subset metrics files)."""
    task = task or protocol_task(metrics["task"], metrics.get("class_names") or [])
    return {"model": model, "fold": fold, "status": "ok", "run_dir": str(run_dir),
            **task.row_from_metrics(metrics, subset_metrics)}


def with_aggregates(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """The fold rows grouped by model (in first-seen order), each group followed by mean and std rows."""
    summary = summarize(rows, columns)
    out: list[dict[str, Any]] = []
    for model, entry in summary.items():
        fold_rows = [dict(r) for r in rows if str(r["model"]) == model and str(r.get("fold")) not in AGGREGATES]
        out += sorted(fold_rows, key=lambda r: int(r["fold"]))
        covered = f"{entry['n']} of {entry['folds']} folds"
        for which, index in (("mean", 0), ("std", 1)):
            out.append({"model": model, "fold": which, "status": covered,
                        **{c: entry[c][index] for c in columns}, "run_dir": ""})
    return out


def _cell(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "" if value is None else str(value)
    return f"{number:.10g}"


def results_csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """results.csv: fold rows and per-model mean/std rows (see the module docstring)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["model", "fold", "status", *columns, "run_dir"]
    writer.writerow(header)
    for row in with_aggregates(rows, columns):
        writer.writerow([_cell(row.get(key)) for key in header])
    return buffer.getvalue()


def results_markdown(
    rows: Sequence[Mapping[str, Any]],
    protocol: str,
    task: Any,
    class_names: Sequence[str],
    subsets: Sequence[str],
    folds: Sequence[int],
    tfrecords: str | Path,
    baselines: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    extra_columns: Sequence[tuple[str, str]] = (),
) -> str:
    """results.md: a title, what the numbers are, the table, the constant-prediction
    baselines and the failed runs. ``task``: the protocol's Task object or task name;
    ``extra_columns``: (column, header) pairs after the task's (e.g. the shortcut gap)."""
    task_object = protocol_task(task, class_names) if isinstance(task, str) else task
    columns = task_object.paper_columns(list(subsets)) + list(extra_columns)
    sizes = sorted({int(n) for n in (_number(r.get("num_images")) for r in rows if r.get("status") == "ok") if n})
    images = f" ({' / '.join(map(str, sizes))} images)" if sizes else ""
    lines = [
        f"# Cross-validation results: {protocol}",
        "",
        f"Test split of `{tfrecords}`{images}; fold{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))}. "
        f"Each cell is the mean ± sample standard deviation (n − 1) over the folds of {task_object.describe_metrics()}.",
        "",
        format_results_table(rows, columns),
        "",
    ]
    if baselines:
        lines += [
            "Constant predictions on the same test images, scored the same way (a model that learnt "
            "nothing scores about this):",
            "",
            format_baselines_table(baselines, columns[: len(columns) - len(extra_columns)], task_object),
            "",
        ]
    failed = [r for r in rows if str(r.get("fold")) not in AGGREGATES and r.get("status") != "ok"]
    if failed:
        lines += ["Runs left out:", ""]
        lines += [f"* {r['model']} fold {r['fold']}: {r['status']}" for r in failed]
        lines.append("")
    lines.append(f"Per-fold values: `{RESULTS_CSV}`. Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.")
    return "\n".join(lines) + "\n"


def fold_mean_intervals(rows: Sequence[Mapping[str, Any]], task: Any, protocol_dir: Path, n_resamples: int,
                        seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per model: the 95 % patient-clustered bootstrap interval of the mean over its folds of
    each metric the task resamples (`caaxr_tf.metrics.uncertainty.fold_mean_bootstrap`), from
    the folds' eval/predictions.csv and the protocol manifest's patients. A model whose runs lack
    the per-image rows gets ``{"left_out": reason}``."""
    from caaxr_tf.metrics.uncertainty import fold_mean_bootstrap, intervals_as_dict
    from caaxr_tf.scoring import load_protocol

    result: dict[str, dict[str, Any]] = {}
    ok = [r for r in rows if r.get("status") == "ok" and str(r.get("fold")) not in AGGREGATES]
    for model in dict.fromkeys(r["model"] for r in ok):
        folds, used, metric, kwargs, reason = [], [], None, {}, None
        for row in (r for r in ok if r["model"] == model):
            path = Path(row["run_dir"]) / EVAL_DIR / "predictions.csv"
            if not path.exists():
                reason = f"{path} not found"
                break
            with open(path, newline="", encoding="utf-8") as handle:
                table = list(csv.reader(handle))
            inputs = task.bootstrap_inputs(table[0], table[1:])
            if inputs is None:
                reason = f"the {task.name} task has no bootstrap intervals"
                break
            patient_of = {r["image_id"]: r.get("patient_id") or r["image_id"]
                          for r in load_protocol(protocol_dir, "test", int(row["fold"])).rows}
            folds.append((inputs.y_true, inputs.y_score, [patient_of.get(r[0], r[0]) for r in table[1:]]))
            used.append(int(row["fold"]))
            metric, kwargs = inputs.metric, inputs.kwargs
        if reason is not None or metric is None:
            result[model] = {"left_out": reason or "no evaluated fold"}
            continue
        intervals = fold_mean_bootstrap(metric, folds, n_resamples=n_resamples, seed=seed, **kwargs)
        patients = set().union(*(set(map(str, groups)) for _, _, groups in folds))
        result[model] = {"folds": used, "num_patients": len(patients), "n_resamples": n_resamples, "seed": seed,
                         "method": "patient-clustered bootstrap of the mean over folds, percentile",
                         "intervals": intervals_as_dict(intervals)}
    return result


def format_fold_mean_intervals(intervals: Mapping[str, Mapping[str, Any]], markdown: bool = True) -> list[str]:
    """One table per model: metric, mean over folds, 95 % interval."""
    from caaxr_tf.metrics.uncertainty import format_interval

    lines: list[str] = []
    for model, entry in intervals.items():
        if "left_out" in entry:
            lines += [f"{model}: no interval ({entry['left_out']})", ""]
            continue
        head = (f"{model}, mean over folds {', '.join(map(str, entry['folds']))} with its 95 % interval "
                f"({entry['method']}, {entry['num_patients']} patients, {entry['n_resamples']} resamples):")
        cells = [(k, format_interval(v["estimate"], v["low"], v["high"])) for k, v in entry["intervals"].items()]
        if markdown:
            lines += [head, "", "| metric | mean [95 % interval] |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in cells] + [""]
        else:
            width = max(len(k) for k, _ in cells) if cells else 0
            lines += [head] + [f"  {k:<{width}}  {v}" for k, v in cells]
    return lines


def format_baselines_table(
    baselines: Mapping[str, Mapping[str, Mapping[str, Any]]],
    columns: Sequence[tuple[str, str]],
    task=None,
    markdown: bool = True,
) -> str:
    """``baselines[""|subset][name]`` = the metrics of one constant prediction, as one row per
    prediction under the paper's ``columns`` (e.g. ``paper_columns(...)``); ``task`` turns
    metrics into row cells (default: the row is the metrics themselves)."""
    subset_metrics = {subset: values for subset, values in baselines.items() if subset}
    body = []
    for name, metrics in baselines[""].items():
        subsets = {s: v[name] for s, v in subset_metrics.items() if name in v}
        row = task.row_from_metrics(metrics, subsets) if task is not None else dict(metrics)
        body.append([name, *(_baseline_cell(row.get(key)) for key, _ in columns)])
    return render_table(["prediction", *(title for _, title in columns)], body, markdown=markdown)


def _baseline_cell(value: Any) -> str:
    if isinstance(value, str):  # already formatted (e.g. "2.10 ± 0.15" over half splits)
        return value
    number = _number(value)
    return "–" if number is None else f"{number:.3f}"


# --------------------------------------------------------------------------- #
# Running
# --------------------------------------------------------------------------- #


def _default_trainer(config, run_dir: Path, verbose: bool = False) -> Any:
    return run_training(config, run_dir, verbose=verbose)


def _reset_keras() -> None:
    """Free the previous run's graphs and undo a mixed-precision policy before the next run."""
    import gc

    import keras

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    gc.collect()


def _is_done(run_dir: Path, subsets: Sequence[str]) -> bool:
    return metrics_path(run_dir).exists() and all(metrics_path(run_dir, subset=s).exists() for s in subsets)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


SHORTCUT_COLUMNS = (("internal_auc", "COVID AUC internal"), ("external_auc", "COVID AUC external"),
                    ("shortcut_gap", "Shortcut gap"))
LOCALIZATION_COLUMNS = (("cam_hit_rate", "CAM pointing game"), ("cam_energy", "CAM energy inside"),
                        ("cam_iou", "CAM IoU"))


@dataclass(frozen=True)
class ExplainOptions:
    """Extra evaluations of every classifier run (see the module docstring)."""

    external: str | None = None  # OTHER_TFRECORDS[/PROTOCOL]
    class_map: str | None = None
    localization: str | None = None  # TFRECORDS[/PROTOCOL]
    exclude_overlap: bool = False  # leave out external images in a run's train/val data (else an error)

    def columns(self) -> list[tuple[str, str]]:
        return ([*SHORTCUT_COLUMNS] if self.external else []) + ([*LOCALIZATION_COLUMNS] if self.localization else [])


def explain_columns(run_dir: Path, options: ExplainOptions, batch_size: int | None, plots: bool, force: bool,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """The explain columns of one run, evaluating what is missing (or everything with ``force``)."""
    row: dict[str, Any] = {}
    if options.external:
        protocol = Run(run_dir).settings.protocol
        path = run_dir / EVAL_DIR / f"external_{data_tag(resolve_protocol_dir(options.external, protocol))}_{ALL_SPLITS}.json"
        result = _read_json(path) if path.exists() and not force else evaluate_external_run(
            run_dir, options.external, class_map=options.class_map, split=ALL_SPLITS, batch_size=batch_size,
            plots=plots, exclude_overlap=options.exclude_overlap, log=log)
        gap = result["shortcut"]
        row.update(internal_auc=gap["internal_auc"], external_auc=gap["external_auc"], shortcut_gap=gap["gap"])
    if options.localization:
        path = run_dir / EVAL_DIR / f"localization_{data_tag(resolve_protocol_dir(options.localization, 'seg'))}.json"
        result = _read_json(path) if path.exists() and not force else evaluate_localization_run(
            run_dir, options.localization, batch_size=batch_size, plots=plots, log=log)
        cam = result["table"]["cam"]
        row.update(cam_hit_rate=cam["hit_rate"], cam_energy=cam["energy"], cam_iou=cam["iou"])
    return row


def run_cv(
    protocol: str,
    models: Sequence[str],
    tfrecords: str | Path,
    out: str | Path,
    *,
    folds: Sequence[int] | None = None,
    training: TrainingOptions | None = None,
    force: bool = False,
    eval_only: bool = False,
    eval_batch_size: int | None = None,
    plots: bool = True,
    trainer: Trainer | None = None,
    evaluator: Evaluator | None = None,
    log: Callable[[str], None] = print,
    explain: ExplainOptions | None = None,
    bootstrap: int = 0,
) -> list[dict[str, Any]]:
    """Train and evaluate ``models`` × ``folds``; write OUT/results.csv and OUT/results.md.

    ``trainer(config, run_dir)`` defaults to ``caaxr_tf.train.run_training`` and ``evaluator``
    to ``caaxr_tf.evaluate.evaluate_run`` (both injectable for tests). ``explain`` adds the
    cross-source and localization columns (classifiers). ``bootstrap`` (> 0): that many
    patient-clustered resamples give each model's interval of the mean over folds
    (OUT/intervals.json, and a section of results.md). Returns the fold rows.
    Raises ValueError / FileNotFoundError (ConfigError for training settings) for bad
    arguments before anything runs.
    """
    training = training or TrainingOptions()
    evaluator = evaluator or evaluate_run
    trainer = trainer or (lambda config, run_dir: _default_trainer(config, run_dir, training.verbose))
    tfrecords, out = Path(tfrecords).resolve(), Path(out).resolve()
    protocol_dir = tfrecords / protocol
    if not (protocol_dir / "summary.json").exists():
        raise FileNotFoundError(f"{protocol_dir / 'summary.json'} not found: --tfrecords must hold the {protocol}/ protocol folder")
    summary = ProtocolSummary.read(protocol_dir)
    class_names = list(summary.classes)
    task = protocol_task(summary.task, class_names, summary.target_names)
    subsets = sorted(summary.subsets)
    available = summary.folds
    folds = list(folds) if folds else list(range(1, available + 1))
    # "--models unet,unet --folds 1,1" means each once (a second run would repeat the first's row)
    if len(set(models)) < len(models) or len(set(folds)) < len(folds):
        log(f"note: repeated models or folds are run once ({', '.join(dict.fromkeys(models))}; "
            f"folds {', '.join(map(str, dict.fromkeys(folds)))})")
    models, folds = list(dict.fromkeys(models)), list(dict.fromkeys(folds))
    bad_folds = [k for k in folds if not 1 <= k <= available]
    if bad_folds:
        raise ValueError(f"fold {bad_folds[0]} does not exist in {protocol_dir}: it has folds 1..{available}")
    if not models:
        raise ValueError("no models given")
    if bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {bootstrap}")
    if eval_batch_size is not None and eval_batch_size < 1:
        raise ValueError(f"--eval-batch-size must be at least 1, got {eval_batch_size}")
    configs = {(model, fold): resolve_run_config(tfrecords, protocol, model, fold, config_file=training.config_file,
                                                 flags=training.flags, overrides=training.overrides)
               for model in models for fold in folds}

    explain = explain or ExplainOptions()
    if explain.columns():
        check_explainable(task, "--external/--localization")
        if explain.external:  # unmatched classes or training images in the external set stop the CV first

            external_dir = resolve_protocol_dir(explain.external, protocol)
            match_run_classes(class_names, external_dir, explain.class_map)
            if not explain.exclude_overlap:
                for fold in folds:
                    overlap = training_overlap(protocol_dir, fold, external_dir, ALL_SPLITS)
                    if overlap.image_ids:
                        raise TrainingOverlapError(overlap.message(external_dir))
        if explain.localization:
            resolve_protocol_dir(explain.localization, "seg")
    columns = task.metric_columns(subsets) + [key for key, _ in explain.columns()]
    rows: list[dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)
    # half-split protocols score the baseline over the run's folds (one test half per fold)
    over_folds = {"folds": folds} if summary.split_scheme == "grouped_halves" else {}
    baselines = task.baselines(protocol_dir, "test", folds[0], subsets, **over_folds)
    write_text_atomic(out / BASELINES_JSON, json.dumps(baselines, indent=2) + "\n")

    def write_results(intervals: Mapping[str, Any] | None = None) -> None:
        write_text_atomic(out / RESULTS_CSV, results_csv_text(rows, columns))
        text = results_markdown(rows, protocol, task, class_names, subsets, folds, protocol_dir, baselines,
                                extra_columns=explain.columns())
        if intervals:
            text += "\n" + "\n".join(format_fold_mean_intervals(intervals)) + "\n"
        write_text_atomic(out / RESULTS_MD, text)

    total = len(models) * len(folds)
    for number, (model, fold) in enumerate(((m, k) for m in models for k in folds), start=1):
        run_dir = out / model / f"fold{fold}"
        prefix = f"[{number}/{total}] {model} fold {fold}"
        started = time.perf_counter()
        failure: str | None = None
        if _is_done(run_dir, subsets) and not force:
            log(f"{prefix}: already evaluated, skipped ({metrics_path(run_dir)})")
        else:
            if eval_only:
                if not (run_dir / "best.keras").exists():
                    failure = "not trained (--eval-only)"
            else:
                log(f"{prefix}: training in {run_dir}")
                try:
                    trainer(configs[(model, fold)], run_dir)
                except Exception as error:  # noqa: BLE001 — one failed run must not stop the others
                    traceback.print_exc()
                    failure = f"training raised {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if failure is None:
                log(f"{prefix}: evaluating")
                try:
                    for subset in [None, *subsets]:
                        evaluator(run_dir, split="test", subset=subset, batch_size=eval_batch_size, which="best",
                                  plots=plots, log=log)
                except Exception as error:  # noqa: BLE001 — record it and go on with the next run
                    traceback.print_exc()
                    failure = f"evaluation raised {type(error).__name__}: {error}"
        extra: dict[str, Any] = {}
        if failure is None and explain.columns():
            try:
                extra = explain_columns(run_dir, explain, eval_batch_size, plots, force, log)
            except Exception as error:  # noqa: BLE001 — record it and go on with the next run
                traceback.print_exc()
                failure = f"explain evaluation raised {type(error).__name__}: {error}"
        _reset_keras()
        if failure is None:
            subset_metrics = {s: _read_json(metrics_path(run_dir, subset=s)) for s in subsets}
            rows.append({**row_from_metrics(model, fold, run_dir, _read_json(metrics_path(run_dir)), subset_metrics, task),
                         **extra})
            log(f"{prefix}: ok ({time.perf_counter() - started:.0f} s)")
        else:
            rows.append({"model": model, "fold": fold, "status": f"failed: {failure}", "run_dir": str(run_dir)})
            log(f"{prefix}: FAILED: {failure}")
        write_results()

    paper = task.paper_columns(subsets) + explain.columns()
    log("")
    log(f"{protocol}: mean ± std over fold{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))}")
    log(format_results_table(rows, paper, markdown=False))
    if baselines:
        log("constant predictions on the same test images:")
        log(format_baselines_table(baselines, task.paper_columns(subsets), task, markdown=False))
    if bootstrap:
        intervals = fold_mean_intervals(rows, task, protocol_dir, bootstrap)
        write_text_atomic(out / INTERVALS_JSON, json.dumps(json_safe(intervals), indent=2) + "\n")
        write_results(intervals)
        log("\n".join(format_fold_mean_intervals(intervals, markdown=False)))
    log(f"wrote {out / RESULTS_CSV} and {out / RESULTS_MD}")
    return rows


def read_results_csv(path: str | Path) -> list[dict[str, str]]:
    """The fold rows of a results.csv (mean/std rows left out), as strings."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row["fold"] not in AGGREGATES]


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m caaxr_tf.cv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--protocol", required=True, choices=protocol_names())
    parser.add_argument("--models", required=True, help="comma-separated registry names")
    parser.add_argument("--tfrecords", required=True, help="folder holding the protocol folders")
    parser.add_argument("--out", required=True, help="CV folder: OUT/<model>/fold<k>, results.csv, results.md")
    parser.add_argument("--folds", type=_int_list, default=None, help="e.g. 1,2 (default: every fold)")
    parser.add_argument("--force", action="store_true", help="train (resume) and evaluate again even if evaluated")
    parser.add_argument("--eval-only", action="store_true", help="evaluate existing runs, never train")
    parser.add_argument("--eval-batch-size", type=int, default=None)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--external", default=None, metavar="OTHER_TFRECORDS[/PROTOCOL]",
                        help="classifiers: also evaluate on another source (columns internal_auc, external_auc, "
                             "shortcut_gap)")
    parser.add_argument("--class-map", default=None, metavar="OLD=NEW,...", help="with --external: class renames")
    parser.add_argument("--exclude-overlap", action="store_true",
                        help="with --external: leave out external images in a run's training/validation data "
                             "(same image id or patient) instead of refusing")
    parser.add_argument("--localization", default=None, metavar="TFRECORDS[/PROTOCOL]",
                        help="classifiers: score the COVID Grad-CAM against a segmentation protocol's boxes "
                             "(columns cam_hit_rate, cam_energy, cam_iou)")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                        help="patient-clustered resamples of each model's interval of the mean over folds "
                             "(intervals.json, results.md; 0 = off; default 2000)")
    add_training_arguments(parser)
    return parser.parse_args(argv)


def training_options(args: argparse.Namespace) -> TrainingOptions:
    """The training settings of ``caaxr_tf.cv``'s command line."""
    return TrainingOptions(config_file=args.config, flags=training_flags(args), overrides=list(args.overrides),
                           verbose=not args.quiet)


def main(argv: list[str] | None = None, trainer: Trainer | None = None) -> int:
    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        rows = run_cv(
            args.protocol, models, args.tfrecords, args.out, folds=args.folds, training=training_options(args),
            force=args.force, eval_only=args.eval_only, eval_batch_size=args.eval_batch_size,
            plots=not args.no_plots, trainer=trainer,
            explain=ExplainOptions(args.external, args.class_map, args.localization, args.exclude_overlap),
            bootstrap=args.bootstrap,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

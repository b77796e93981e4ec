"""``caaxr score``: score a predictions file against a protocol's labels, with intervals.

    caaxr score --protocol TFRECORDS/PROTOCOL --predictions FILE [--split test|val|train] [--fold 1]
                [--bootstrap 2000] [--seed 0] [--slice-by source,view,sex,age] [--metadata CSV]
                [--min-slice 20] [--max-missing 0.05] [--tolerance 1e-3] [--out DIR] [--no-plots]

Regression protocols and segmentation mask folders: `caaxr_tf.scoring_tasks`.

Predictions (classification protocols, CT slices): a CSV, or JSON lines (``.jsonl``), with ``image_id``
and one probability column per class, named by the class (``covid``) or as caaxr-tf's
evaluation writes them (``p_covid``); other columns (``label``, ``predicted``) are ignored.
So ``RUN/eval/predictions.csv`` scores as it is.

The file is checked against the protocol's ``manifest.csv`` (the ids of the split and fold)
before anything is computed; each problem is reported by image id and field:

* a duplicated image id; an image id not in the split (extra); a probability column missing
  for a class (wrong columns);
* a probability that is not a number, NaN/inf, or outside [0, 1]; rows whose probabilities
  do not sum to 1 within ``--tolerance`` (default 1e-3; the evaluation writes 6 decimals);
* missing ids: listed; the file is refused when more than ``--max-missing`` (default 0.05)
  of the split's ids are missing, else the present ones are scored and ``missing`` says which.

Results go to ``--out`` (default: ``<predictions stem>_score/`` beside the file):

    metrics.json  point estimates, the same numbers and names as the evaluation's metrics.json
                  (`caaxr_tf.metrics.classification_metrics`), plus ``intervals`` (patient-
                  clustered bootstrap percentile intervals of each metric), ``auc_delong``
                  (DeLong interval of each AUC), ``calibration`` (`caaxr_tf.metrics.calibration`)
                  and ``slices`` (`caaxr_tf.metrics.slices`), ``validation`` and ``missing``
    metrics.txt   the table: metric, estimate [95 % interval]
    roc.png, reliability.png, slices.png (forest plot; with --slice-by)

Patients come from the manifest's ``patient_id``; slices from manifest columns (``source``,
``label``, ...) or from ``--metadata CSV`` (matched on its ``image_id`` column, else
``filename``, as covid-chestxray's own ``metadata.csv``: ``--metadata .../metadata.csv
--slice-by sex,view,age``); ``age`` is sliced into bands (<40, 40-59, 60-79, >=80).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from caaxr_tf.metrics.calibration import calibration_report
from caaxr_tf.metrics.delong import delong_interval
from caaxr_tf.metrics.slices import DEFAULT_MIN_N, age_bands, slice_metrics
from caaxr_tf.metrics.uncertainty import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap, format_interval, intervals_as_dict

from caaxr_tf.score_inputs import (  # noqa: E402,F401  (the protocol and file readers; re-exported)
    DEFAULT_MAX_MISSING,
    DEFAULT_TOLERANCE,
    MANIFEST_FILE,
    MAX_LISTED,
    SUMMARY_FILE,
    PredictionsError,
    Protocol,
    _listed,
    load_protocol,
    read_predictions,
)


def probability_columns(columns: Sequence[str], class_names: Sequence[str]) -> dict[str, str]:
    """``{class: column}``: the column named as the class, else ``p_<class>`` (case-insensitive
    when there is no exact match). Raises ``PredictionsError`` naming the classes without one."""
    lowered = {c.lower(): c for c in columns}
    found, missing = {}, []
    for name in class_names:
        for candidate in (name, f"p_{name}"):
            if candidate in columns:
                found[name] = candidate
                break
            if candidate.lower() in lowered:
                found[name] = lowered[candidate.lower()]
                break
        else:
            missing.append(name)
    if missing:
        raise PredictionsError(
            f"wrong columns: no probability column for class(es) {', '.join(missing)} (expected a column named as "
            f"the class or p_<class>); the file has: {', '.join(columns) or 'none'}")
    return found


@dataclass
class CheckedPredictions:
    ids: list[str]  # the scored ids, in manifest order
    scores: np.ndarray  # [N, C]
    missing: list[str]
    problems: list[str] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)


def check_classification(columns: Sequence[str], records: Sequence[dict[str, Any]], protocol: Protocol, *,
                         tolerance: float = DEFAULT_TOLERANCE, max_missing: float = DEFAULT_MAX_MISSING,
                         source: str = "predictions") -> CheckedPredictions:
    """Probabilities of the split's ids from a predictions file, or ``PredictionsError`` listing
    every problem (by image id and field). See the module docstring for the rules."""
    if "image_id" not in columns:
        raise PredictionsError(f"{source}: wrong columns: no image_id column; the file has: {', '.join(columns) or 'none'}")
    names = protocol.class_names
    mapping = probability_columns(columns, names)
    expected = set(protocol.ids)
    problems: list[str] = []
    seen: dict[str, np.ndarray] = {}
    duplicates, extra = [], []
    for record in records:
        image_id = str(record.get("image_id") or "").strip()
        if not image_id:
            problems.append("a row without image_id")
            continue
        if image_id in seen or image_id in duplicates:
            duplicates.append(image_id)
            continue
        if image_id not in expected:
            extra.append(image_id)
            continue
        values, bad = np.empty(len(names)), False
        for index, name in enumerate(names):
            raw = record.get(mapping[name])
            try:
                value = float(raw)
            except (TypeError, ValueError):
                problems.append(f"image {image_id}: {mapping[name]}: not a number ({raw!r})")
                bad = True
                continue
            if not math.isfinite(value):
                problems.append(f"image {image_id}: {mapping[name]}: {value} (NaN or infinite)")
                bad = True
            elif not 0.0 <= value <= 1.0:
                problems.append(f"image {image_id}: {mapping[name]}: {value:g} outside [0, 1]")
                bad = True
            values[index] = value
        if not bad and abs(values.sum() - 1.0) > tolerance:
            problems.append(f"image {image_id}: probabilities sum to {values.sum():.6g}, not 1 (tolerance {tolerance:g})")
        seen[image_id] = values
    if duplicates:
        problems.append(f"duplicated image ids: {_listed(sorted(set(duplicates)))}")
    if extra:
        problems.append(f"{len(extra)} image ids not in the {protocol.split} split of fold {protocol.fold} "
                        f"of {protocol.path}: {_listed(extra)}")
    missing = [i for i in protocol.ids if i not in seen]
    share = len(missing) / len(protocol.ids)
    if share > max_missing:
        problems.append(f"{len(missing)} of {len(protocol.ids)} ids of the split missing ({share:.1%}, more than "
                        f"--max-missing {max_missing:.1%}): {_listed(missing)}")
    if problems:
        raise PredictionsError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    ids = [i for i in protocol.ids if i in seen]
    return CheckedPredictions(ids, np.array([seen[i] for i in ids]).reshape(len(ids), len(names)), missing,
                              columns=mapping)


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #

SCALAR_KEYS = ("auc_macro", "sensitivity_at_99_specificity", "sensitivity_at_90_specificity", "accuracy")
from caaxr_tf.metrics.classification import headline_metrics  # noqa: E402,F401  (moved; re-exported)




def score_classification(protocol: Protocol, checked: CheckedPredictions, *, n_resamples: int = DEFAULT_RESAMPLES,
                         seed: int = DEFAULT_SEED, slice_by: Sequence[str] = (),
                         metadata: dict[str, list[Any]] | None = None, min_slice: int = DEFAULT_MIN_N
                         ) -> dict[str, Any]:
    from caaxr_tf.metrics.classification import classification_metrics

    names = protocol.class_names
    by_id = {r["image_id"]: r for r in protocol.rows}
    rows = [by_id[i] for i in checked.ids]
    labels = np.array([int(r["label_index"]) for r in rows], dtype=np.int64)
    patients = [r.get("patient_id") or r["image_id"] for r in rows]
    scores = checked.scores
    result: dict[str, Any] = {"num_images": len(rows), **classification_metrics(labels, scores, names)}
    result["num_patients"] = len(set(patients))
    if n_resamples > 0:
        intervals = bootstrap(headline_metrics, labels, scores, groups=patients, n_resamples=n_resamples, seed=seed,
                              class_names=names)
        result["intervals"] = {"method": "patient-clustered bootstrap, percentile", "seed": seed,
                               **intervals_as_dict(intervals)}
    delong = {}
    for index, name in enumerate(names):
        positive = labels == index
        delong[name] = delong_interval(positive, scores[:, index]) if 0 < positive.sum() < len(labels) else None
    result["auc_delong"] = delong
    result["calibration"] = calibration_report(labels, scores, names)
    if slice_by:
        table = slice_table(rows, checked.ids, metadata or {}, slice_by)
        result["slices"] = {"min_n": min_slice, "rows": slice_metrics(
            headline_metrics, labels, scores, table, list(slice_by), groups=patients, min_n=min_slice,
            n_resamples=n_resamples, seed=seed, class_names=names)}
    return result


def temperature_scaling(protocol: Protocol, checked: CheckedPredictions, validation: str | Path, *, fold: int = 1,
                        tolerance: float = DEFAULT_TOLERANCE, max_missing: float = DEFAULT_MAX_MISSING
                        ) -> dict[str, Any]:
    """Fit a temperature on the validation predictions (log-probabilities as logits) and report
    the validation NLL and the scored split's calibration before and after."""
    from caaxr_tf.metrics.calibration import (apply_temperature, fit_temperature, logits_from_probabilities,
                                              negative_log_likelihood)

    val_protocol = load_protocol(protocol.path, "val", fold)
    columns, records = read_predictions(validation)
    val = check_classification(columns, records, val_protocol, tolerance=tolerance, max_missing=max_missing,
                               source=str(validation))
    val_by_id = {r["image_id"]: int(r["label_index"]) for r in val_protocol.rows}
    val_labels = np.array([val_by_id[i] for i in val.ids])
    val_logits = logits_from_probabilities(val.scores)
    temperature = fit_temperature(val_logits, val_labels)
    by_id = {r["image_id"]: int(r["label_index"]) for r in protocol.rows}
    labels = np.array([by_id[i] for i in checked.ids])
    scaled = apply_temperature(logits_from_probabilities(checked.scores), temperature)
    before = calibration_report(labels, checked.scores, protocol.class_names)
    after = calibration_report(labels, scaled, protocol.class_names)
    keep = ("ece", "ece_equal_mass", "brier", "nll")
    return {"temperature": temperature, "fitted_on": str(validation), "num_validation_images": len(val.ids),
            "validation_nll_before": negative_log_likelihood(val_logits, val_labels),
            "validation_nll_after": negative_log_likelihood(val_logits, val_labels, temperature),
            "before": {k: before[k] for k in keep}, "after": {k: after[k] for k in keep},
            "argmax_unchanged": bool(np.array_equal(np.argmax(scaled, 1), np.argmax(checked.scores, 1)))}


def read_metadata(path: str | Path) -> dict[str, dict[str, str]]:
    """``{image_id: row}`` of a metadata CSV keyed by ``image_id``, else ``filename``."""
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.DictReader(handle)
        key = "image_id" if "image_id" in (reader.fieldnames or []) else "filename"
        if key not in (reader.fieldnames or []):
            raise ValueError(f"{path}: needs an image_id or filename column")
        table: dict[str, dict[str, str]] = {}
        for row in reader:
            table.setdefault(str(row[key]).strip(), row)
    return table


def slice_table(rows: Sequence[dict[str, str]], ids: Sequence[str], metadata: dict[str, dict[str, str]],
                slice_by: Sequence[str]) -> dict[str, list[Any]]:
    """Column values per scored image: the manifest's column, else the metadata file's
    (``age`` in bands); an unknown column is an error naming the known ones."""
    table: dict[str, list[Any]] = {}
    meta_columns = set(next(iter(metadata.values()), {}).keys())
    for column in slice_by:
        if rows and column in rows[0]:
            values = [r[column] for r in rows]
        elif column in meta_columns:
            values = [metadata.get(i, {}).get(column, "") for i in ids]
        else:
            known = sorted(set(rows[0]) if rows else set()) + sorted(meta_columns)
            raise ValueError(f"--slice-by {column}: not a manifest or --metadata column; known: {', '.join(known)}")
        table[column] = age_bands(values) if column.lower() == "age" else values
    return table


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #


def _interval_text(metrics: dict[str, Any], key: str, value: Any) -> str:
    cell = metrics.get("intervals", {}).get(key)
    if cell:
        return format_interval(value, cell["low"], cell["high"])
    return format_interval(value, None, None).split(" [")[0]


def format_table(metrics: dict[str, Any]) -> str:
    """Plain-text table: metric, estimate [95 % interval] (and the DeLong interval of AUCs)."""
    lines = [f"{metrics.get('num_images')} images, {metrics.get('num_patients')} patients"
             + (f", {len(metrics.get('missing') or [])} missing" if metrics.get("missing") else "")]
    covid = metrics.get("covid_class")
    pairs = [("accuracy", "accuracy"), (f"sensitivity at 99% specificity ({covid})", "sensitivity_at_99_specificity"),
             (f"sensitivity at 90% specificity ({covid})", "sensitivity_at_90_specificity"),
             ("AUC, macro mean", "auc_macro")]
    pairs += [(f"AUC {name}", f"auc_per_class/{name}") for name in metrics.get("auc_per_class", {})]
    width = max(len(label) for label, _ in pairs)
    for label, key in pairs:
        value = metrics["auc_per_class"][key.split("/", 1)[1]] if key.startswith("auc_per_class/") else metrics[key]
        line = f"  {label:<{width}}  {_interval_text(metrics, key, value)}"
        if key.startswith("auc_per_class/") and metrics.get("auc_delong", {}).get(key.split("/", 1)[1]):
            d = metrics["auc_delong"][key.split("/", 1)[1]]
            line += f"   DeLong [{d['low']:.3f}, {d['high']:.3f}]"
        lines.append(line)
    calibration = metrics.get("calibration")
    if calibration:
        lines.append(f"  {'ECE (top-label, 10 equal-width bins)':<{width}}  {calibration['ece']:.3f}")
        lines.append(f"  {'Brier (multi-class)':<{width}}  {calibration['brier']:.3f}")
    scaling = metrics.get("temperature_scaling")
    if scaling:
        lines.append(f"  temperature {scaling['temperature']:.3f} (fitted on {scaling['num_validation_images']} val images): "
                     f"ECE {scaling['before']['ece']:.3f} -> {scaling['after']['ece']:.3f}, "
                     f"NLL {scaling['before']['nll']:.3f} -> {scaling['after']['nll']:.3f}")
    if "intervals" in metrics:
        some = next((v for k, v in metrics["intervals"].items() if isinstance(v, dict)), None)
        if some:
            lines.append(f"  intervals: {some['confidence']:.0%} patient-clustered bootstrap, {some['n_resamples']} "
                         f"resamples, seed {metrics['intervals']['seed']}")
    for row in (metrics.get("slices") or {}).get("rows", []):
        head = f"  slice {row['column']}={row['value']} (n={row['n']}, {row['n_patients']} patients)"
        if not row["scored"]:
            lines.append(f"{head}: not scored, {row['reason']}")
        else:
            cell = row["metrics"].get("auc_macro") or {}
            acc = row["metrics"].get("accuracy") or {}
            lines.append(f"{head}: AUC macro {format_interval(cell.get('estimate'), cell.get('low'), cell.get('high'))}, "
                         f"accuracy {format_interval(acc.get('estimate'), acc.get('low'), acc.get('high'))}")
    return "\n".join(lines)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from caaxr_tf.io import json_safe, write_json_atomic

    write_json_atomic(path, json_safe(data))


def score_file(protocol_dir: str | Path, predictions: str | Path, *, split: str = "test", fold: int = 1,
               n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, slice_by: Sequence[str] = (),
               metadata: str | Path | None = None, min_slice: int = DEFAULT_MIN_N,
               max_missing: float = DEFAULT_MAX_MISSING, tolerance: float = DEFAULT_TOLERANCE,
               out: str | Path | None = None, plots: bool = True, log=print,
               calibrate_on: str | Path | None = None, image_size: int = 224) -> dict[str, Any]:
    """Check and score one predictions file; writes metrics.json, metrics.txt and plots to ``out``.
    Regression and segmentation protocols: `caaxr_tf.scoring_tasks` (a mask folder for
    segmentation, ``image_size`` its side).

    ``calibrate_on``: the same model's predictions on the validation split of the fold; a
    temperature is fitted there (`temperature_scaling`) and the calibration of the scored
    split after scaling is reported beside it (the other metrics stay those of the file)."""
    from caaxr_tf.io import write_text_atomic

    protocol = load_protocol(protocol_dir, split, fold)
    if protocol.task in OTHER_TASKS:
        return _score_other(protocol, predictions, n_resamples=n_resamples, seed=seed, max_missing=max_missing,
                            out=out, log=log, image_size=image_size)
    if protocol.task not in ("classification", "ct"):
        raise ValueError(f"{protocol.path}: scoring supports classification (and CT slice), regression and "
                         f"segmentation protocols; this one is {protocol.task}")
    columns, records = read_predictions(predictions)
    checked = check_classification(columns, records, protocol, tolerance=tolerance, max_missing=max_missing,
                                   source=str(predictions))
    meta = read_metadata(metadata) if metadata else {}
    metrics = score_classification(protocol, checked, n_resamples=n_resamples, seed=seed, slice_by=slice_by,
                                   metadata=meta, min_slice=min_slice)
    if calibrate_on:
        metrics["temperature_scaling"] = temperature_scaling(protocol, checked, calibrate_on, fold=fold,
                                                             tolerance=tolerance, max_missing=max_missing)
    metrics = {"predictions": str(Path(predictions).resolve()), "protocol": str(protocol.path.resolve()),
               "task": protocol.task, "split": split, "fold": fold, "missing": checked.missing,
               "validation": {"tolerance": tolerance, "max_missing": max_missing,
                              "probability_columns": checked.columns}, **metrics}
    out = Path(out) if out else Path(predictions).with_name(Path(predictions).stem + "_score")
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": "metrics.json", "table": "metrics.txt"}
    if plots:
        from caaxr_tf import scoring_plots

        by_id = {r["image_id"]: r for r in protocol.rows}
        labels = np.array([int(by_id[i]["label_index"]) for i in checked.ids])
        patients = [by_id[i].get("patient_id") or i for i in checked.ids]
        files["roc"] = "roc.png"
        scoring_plots.plot_roc_band(labels, checked.scores, protocol.class_names, out / "roc.png", groups=patients,
                                    n_resamples=min(n_resamples, 500) if n_resamples else 0, seed=seed,
                                    title=f"ROC with 95% band: {Path(predictions).name}")
        files["reliability"] = "reliability.png"
        scoring_plots.plot_reliability(metrics["calibration"], out / "reliability.png",
                                       title=f"reliability (top-label): {Path(predictions).name}")
        if metrics.get("slices"):
            files["slices"] = "slices.png"
            scoring_plots.plot_forest(metrics["slices"]["rows"], out / "slices.png", metric="auc_macro",
                                      overall=metrics.get("auc_macro"), title="AUC (macro) per slice")
    metrics["files"] = files
    table = format_table(metrics)
    write_text_atomic(out / "metrics.txt", table + "\n")
    _write_json(out / "metrics.json", metrics)
    if log is not None:
        log(table)
        log(f"wrote {out / 'metrics.json'}")
    return metrics


OTHER_TASKS = ("regression", "segmentation")


def _score_other(protocol: Protocol, predictions: str | Path, *, n_resamples: int, seed: int, max_missing: float,
                 out: str | Path | None, log, image_size: int) -> dict[str, Any]:
    """Regression targets or segmentation masks (`caaxr_tf.scoring_tasks`): metrics.json, metrics.txt."""
    from caaxr_tf import scoring_tasks
    from caaxr_tf.io import write_text_atomic

    predictions = Path(predictions)
    if protocol.task == "regression":
        columns, records = read_predictions(predictions)
        checked = scoring_tasks.check_regression(columns, records, protocol, max_missing=max_missing,
                                                 source=str(predictions))
        scored = {**scoring_tasks.score_regression(protocol, checked, n_resamples=n_resamples, seed=seed),
                  "missing": checked.missing, "validation": {"max_missing": max_missing, "columns": checked.columns}}
        headline = [k for k in scored if any(k.endswith(f"_{m}") for m in ("mae", "mse", "r2", "pearson_r"))]
    else:
        if not predictions.is_dir():
            raise PredictionsError(f"{predictions}: a segmentation protocol is scored from a folder of mask PNGs "
                                   "named by image id, not a file")
        scored = scoring_tasks.score_masks(protocol, predictions, image_size=image_size, n_resamples=n_resamples,
                                           seed=seed, max_missing=max_missing)
        headline = ["dice", "iou"]
    metrics = {"predictions": str(predictions.resolve()), "protocol": str(protocol.path.resolve()),
               "task": protocol.task, "split": protocol.split, "fold": protocol.fold, **scored}
    out = Path(out) if out else predictions.with_name(predictions.stem + "_score")
    out.mkdir(parents=True, exist_ok=True)
    metrics["files"] = {"metrics": "metrics.json", "table": "metrics.txt"}
    width = max(len(k) for k in headline)
    lines = [f"{predictions.name} on {protocol.path.name} ({protocol.split}, fold {protocol.fold}): "
             f"{metrics['num_images']} images"]
    for key in headline:
        lines.append(f"  {key:<{width}}  {_interval_text(metrics, key, metrics[key])}")
    if metrics.get("missing"):
        lines.append(f"  missing ids (not scored): {_listed(metrics['missing'])}")
    table = "\n".join(lines)
    write_text_atomic(out / "metrics.txt", table + "\n")
    _write_json(out / "metrics.json", metrics)
    if log is not None:
        log(table)
        log(f"wrote {out / 'metrics.json'}")
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="caaxr score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", required=True, metavar="TFRECORDS/PROTOCOL", help="protocol folder (labels)")
    parser.add_argument("--predictions", required=True,
                        help="CSV or JSONL: image_id + one probability per class (classification, CT slices) or "
                             "one value per target (regression); a folder of mask PNGs (segmentation)")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"))
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="N",
                        help=f"bootstrap resamples (patients), default {DEFAULT_RESAMPLES}; 0: no intervals")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--slice-by", default="", metavar="COL,COL", help="metadata columns to slice by")
    parser.add_argument("--metadata", default=None, help="CSV with image_id (or filename) and more columns")
    parser.add_argument("--min-slice", type=int, default=DEFAULT_MIN_N, help="slices with fewer images are not scored")
    parser.add_argument("--max-missing", type=float, default=DEFAULT_MAX_MISSING,
                        help="refuse a file missing more than this share of the split's ids (default 0.05)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="allowed |sum of probabilities - 1| per row (default 1e-3)")
    parser.add_argument("--out", default=None, help="output folder (default <predictions stem>_score/)")
    parser.add_argument("--calibrate-on", default=None, metavar="VAL_PREDICTIONS",
                        help="the model's predictions on the fold's val split: fit a temperature there and "
                             "report calibration after scaling")
    parser.add_argument("--image-size", type=int, default=224,
                        help="segmentation protocols: the side of the mask PNGs (the model size, default 224)")
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    slice_by = [c.strip() for c in args.slice_by.split(",") if c.strip()]
    try:
        score_file(args.protocol, args.predictions, split=args.split, fold=args.fold, n_resamples=args.bootstrap,
                   seed=args.seed, slice_by=slice_by, metadata=args.metadata, min_slice=args.min_slice,
                   max_missing=args.max_missing, tolerance=args.tolerance, out=args.out, plots=not args.no_plots,
                   calibrate_on=args.calibrate_on, image_size=args.image_size)
    except (PredictionsError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1 if isinstance(error, (PredictionsError, FileNotFoundError)) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


def intervals_from_rows(header: Sequence[str], rows: Sequence[Sequence[Any]], protocol_dir: str | Path,
                        class_names: Sequence[str], *, split: str = "test", fold: int = 1,
                        n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                        reference: dict[str, Any] | None = None, task: Any = None) -> dict[str, Any] | None:
    """Bootstrap intervals of an evaluation's metrics from its per-image rows (as written to
    predictions.csv; the task's `Task.bootstrap_inputs` reads them: classification by default),
    patients from the protocol's manifest (images not in the manifest count as their own
    patient). For ``caaxr evaluate --bootstrap N``: the ``intervals`` entry of metrics.json;
    None when the task has no intervals.

    The rows hold the values as written (6 decimals); where that rounding ties scores that
    differed (a model whose outputs barely vary), estimates on the rows differ from the
    evaluation's. With ``reference`` (the evaluation's metrics) such metrics are listed under
    ``rounding_mismatch`` {name: [evaluation, from rows]}."""
    if task is None:
        from caaxr_tf.tasks.classification import ClassificationTask

        task = ClassificationTask([str(c) for c in class_names])
    inputs = task.bootstrap_inputs(header, rows)
    if inputs is None:
        return None
    try:
        patients_of = {r["image_id"]: r.get("patient_id") or r["image_id"]
                       for r in load_protocol(protocol_dir, split, fold).rows}
    except (FileNotFoundError, ValueError):
        patients_of = {}
    patients = [patients_of.get(str(r[0]), str(r[0])) for r in rows]
    intervals = bootstrap(inputs.metric, inputs.y_true, inputs.y_score, groups=patients, n_resamples=n_resamples,
                          seed=seed, **inputs.kwargs)
    result: dict[str, Any] = {"method": "patient-clustered bootstrap, percentile", "seed": seed,
                              "num_patients": len(set(patients)), **intervals_as_dict(intervals)}
    if reference is not None:
        from caaxr_tf.metrics.uncertainty import flatten

        tops = {key.split("/", 1)[0] for key in intervals}
        flat = flatten({k: reference[k] for k in tops if k in reference})
        mismatch = {k: [flat[k], v.estimate] for k, v in intervals.items()
                    # 1e-6: a mean of values written with 6 decimals moves by <= 5e-7; ties change more
                    if k in flat and math.isfinite(flat[k]) and abs(flat[k] - v.estimate) > 1e-6}
        if mismatch:
            result["rounding_mismatch"] = mismatch
    return result


def format_intervals(intervals: dict[str, Any]) -> list[str]:
    """Lines ``  name  estimate [low, high]`` of an ``intervals`` entry."""
    cells = {k: v for k, v in intervals.items() if isinstance(v, dict)}
    if not cells:
        return []
    some = next(iter(cells.values()))
    lines = [f"  {some['confidence']:.0%} intervals ({intervals.get('method')}, {some['n_resamples']} resamples):"]
    width = max(len(k) for k in cells)
    lines += [f"    {k:<{width}}  {format_interval(v['estimate'], v['low'], v['high'])}" for k, v in cells.items()
              if "estimate" in v]
    if intervals.get("rounding_mismatch"):
        lines.append("    warning: the per-image scores as written (6 decimals) give other values for "
                     + ", ".join(intervals["rounding_mismatch"]) + "; these intervals are of the rounded scores")
    return lines

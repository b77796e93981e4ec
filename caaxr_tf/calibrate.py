"""Temperature scaling and operating thresholds of a classifier run, fitted on its validation split.

    caaxr calibrate --run RUN_DIR [--which best|final] [--batch-size N] [--bins 10]

Runs the model on the fold's **validation** split (never the test split), fits the temperature
``T`` minimising the validation NLL of ``softmax(log(p) / T)``
(`caaxr_tf.metrics.calibration.fit_temperature`) and, on the calibrated probabilities, the
operating thresholds of the COVID class at 90 % and 99 % specificity (`operating_threshold`).
Writes ``RUN_DIR/calibration.json`` atomically:

    temperature, checkpoint ("best"/"final") and its sha256, fitted_on {split, fold, num_images},
    validation {nll, ece, ece_equal_mass, brier} before and after,
    thresholds {class, rule, specificity_90 / specificity_99: {threshold, sensitivity, specificity}}

Then ``caaxr export`` serves the calibrated probabilities (a `TemperatureScaling` layer after
the model, checked against the calibrated Keras model) and stores the thresholds in the
export's metadata, ``caaxr predict`` prints a decision at each operating point, and
``caaxr evaluate`` reports the test split's ECE before and after (``calibration`` in
metrics.json). A calibration fitted on another checkpoint than the one exported or evaluated
(another file, e.g. after resuming the training) is refused: run calibrate again.

Classifiers only (the ``classification`` task; CT runs decide per patient by arg-max).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from caaxr_tf.logs import quiet_tensorflow_logs

quiet_tensorflow_logs()

import numpy as np  # noqa: E402

from caaxr_tf.io import write_json_atomic  # noqa: E402
from caaxr_tf.metrics.calibration import (  # noqa: E402
    apply_temperature,
    calibration_report,
    fit_temperature,
    logits_from_probabilities,
    negative_log_likelihood,
)
from caaxr_tf.metrics.classification import sensitivity_at_specificity  # noqa: E402
from caaxr_tf.models.outputs import class_scores  # noqa: E402
from caaxr_tf.run_files import CALIBRATION_FILE  # noqa: E402
from caaxr_tf.runs import Run, open_run  # noqa: E402

CALIBRATION_FORMAT = 1
SPECIFICITIES = {"specificity_90": 0.90, "specificity_99": 0.99}
DECISION_RULE = "positive when the calibrated probability of the class >= threshold"


class CalibrationError(ValueError):
    """A calibration.json that cannot be used (malformed, or fitted on another checkpoint)."""


# --------------------------------------------------------------------------- thresholds


def operating_threshold(positive: Any, scores: Any, specificity: float) -> dict[str, float | None]:
    """The lowest observed score ``t`` such that "positive iff score >= t" keeps the
    specificity (negatives below ``t`` / negatives) at least ``specificity``; with it the
    sensitivity reached (= `sensitivity_at_specificity` of the same data). When no score
    qualifies (all positives would be missed) the threshold is just above the largest score.
    Returns ``{"threshold", "sensitivity", "specificity"}`` (sensitivity None without positives).
    """
    positive = np.asarray(positive).reshape(-1) > 0.5
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not 0.0 <= specificity <= 1.0:
        raise ValueError(f"specificity must be in [0, 1], got {specificity}")
    negatives = np.sort(scores[~positive])
    if negatives.size == 0:
        raise ValueError("no negative case: a threshold at a specificity needs negatives")
    # negatives that must fall below t; the tolerance keeps 0.56 * 25 (14.000000000000002) at 14
    needed = min(negatives.size, math.ceil(specificity * negatives.size - 1e-9))
    if needed == 0:
        threshold = float(scores.min())
    else:
        above = scores[scores > negatives[needed - 1]]
        threshold = float(above.min()) if above.size else float(np.nextafter(scores.max(), np.inf))
    flagged = scores >= threshold
    return {
        "threshold": threshold,
        "sensitivity": float(flagged[positive].mean()) if positive.any() else None,
        "specificity": float((~flagged[~positive]).mean()),
    }


# --------------------------------------------------------------------------- the file


def checkpoint_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_calibration(run: "str | Path | Run", which: str = "best") -> dict[str, Any] | None:
    """The run's calibration.json checked against the ``which`` checkpoint; None when absent.

    A malformed file or one fitted on another checkpoint is a `CalibrationError` naming it.
    """
    run = open_run(run)
    path = run.path / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        temperature = float(data["temperature"])
        recorded_which, recorded_digest = data["checkpoint"], data["checkpoint_sha256"]
        thresholds = data["thresholds"]
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise CalibrationError(f"{path}: not a calibration written by caaxr calibrate ({error})") from None
    if not (math.isfinite(temperature) and temperature > 0):
        raise CalibrationError(f"{path}: temperature: must be a finite number > 0, got {data['temperature']!r}")
    if not isinstance(thresholds, Mapping):
        raise CalibrationError(f"{path}: thresholds: expected a mapping")
    if recorded_which != which:
        raise CalibrationError(f"{path}: fitted on the {recorded_which} checkpoint, not on {which}; run "
                               f"caaxr calibrate --run {run.path} --which {which}, or leave the calibration out")
    if checkpoint_digest(run.model_path(which)) != recorded_digest:
        raise CalibrationError(f"{path}: fitted on another {run.model_path(which).name} (sha256 differs: the run "
                               f"was trained further since); run caaxr calibrate --run {run.path} again")
    return data


def calibrated_model(model: Any, temperature: float):
    """``model`` (probabilities [N, C]) followed by `TemperatureScaling` as one Keras model."""
    import keras

    from caaxr_tf.models.layers import TemperatureScaling

    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # the model's own structure
    outputs = TemperatureScaling(temperature, name="temperature_scaling")(model.outputs[0])
    return keras.Model(inputs, outputs, name=f"{model.name}_calibrated")


def check_calibratable(task: Any, run: Run) -> None:
    if not getattr(task, "supports_calibration", False):
        raise ValueError(f"{run.path}: calibration is for classifier runs; this run's task is {task.name!r}")


# --------------------------------------------------------------------------- fitting


def predict_split(run: Run, split: str, which: str, batch_size: int | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(ids, labels, probabilities)`` of the run's model on its fold's ``split``."""
    task = run.task()
    predict = run.predictor(which)
    ids, labels, scores = [], [], []
    for images, targets, batch_ids in run.dataset(split, task=task, batch_size=batch_size, with_ids=True):
        scores.append(class_scores(predict(images), len(task.class_names)))
        labels.append(np.argmax(targets.numpy(), axis=1))
        ids.extend(i.decode("utf-8") for i in batch_ids.numpy())
    if not ids:
        raise ValueError(f"no images in the {split} split of {run.protocol_dir} (fold {run.settings.fold})")
    return ids, np.concatenate(labels), np.concatenate(scores)


def fit_calibration(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
                    covid: int, n_bins: int = 10) -> dict[str, Any]:
    """Temperature, validation figures before/after and thresholds from validation predictions."""
    if not np.all(np.isfinite(probabilities)):
        raise ValueError("the model gives non-finite probabilities on the validation split")
    logits = logits_from_probabilities(probabilities)
    temperature = fit_temperature(logits, labels)
    scaled = apply_temperature(logits, temperature)
    before = calibration_report(labels, probabilities, class_names, n_bins)
    after = calibration_report(labels, scaled, class_names, n_bins)
    summary = ("ece", "ece_equal_mass", "brier")
    positive = labels == covid
    return {
        "temperature": temperature,
        "validation": {
            "before": {"nll": negative_log_likelihood(logits, labels), **{k: before[k] for k in summary}},
            "after": {"nll": negative_log_likelihood(logits, labels, temperature), **{k: after[k] for k in summary}},
        },
        "thresholds": {"class": class_names[covid], "rule": DECISION_RULE,
                       **{key: operating_threshold(positive, scaled[:, covid], value)
                          for key, value in SPECIFICITIES.items()}},
    }


def calibrate_run(run_dir: "str | Path | Run", *, which: str = "best", batch_size: int | None = None,
                  n_bins: int = 10, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Fit the run's calibration on its validation split and write ``RUN_DIR/calibration.json``."""
    run = open_run(run_dir)
    task = run.task()
    check_calibratable(task, run)
    model_path = run.model_path(which)
    if not model_path.exists():
        raise FileNotFoundError(f"{model_path} not found: the run has not saved a {which} model yet")
    digest = checkpoint_digest(model_path)
    ids, labels, probabilities = predict_split(run, "val", which, batch_size)
    if len(np.unique(labels)) < 2:
        raise ValueError(f"the validation split of {run.protocol_dir} (fold {run.settings.fold}) has one class "
                         "only: a temperature and thresholds cannot be fitted")
    fitted = fit_calibration(labels, probabilities, task.class_names, task.covid_index, n_bins)
    data = {"format": CALIBRATION_FORMAT, "method": "temperature scaling (softmax(log p / T))",
            "temperature": fitted["temperature"], "checkpoint": which, "checkpoint_sha256": digest,
            "fitted_on": {"split": "val", "fold": run.settings.fold, "num_images": len(ids),
                          "tfrecords": str(run.protocol_dir)},
            "validation": fitted["validation"], "thresholds": fitted["thresholds"]}
    write_json_atomic(run.path / CALIBRATION_FILE, data)
    if log is not None:
        log("\n".join(format_calibration(data)))
        log(f"wrote {run.path / CALIBRATION_FILE}")
    return data


def format_calibration(data: Mapping[str, Any]) -> list[str]:
    before, after = data["validation"]["before"], data["validation"]["after"]
    fitted = data["fitted_on"]
    lines = [f"temperature {data['temperature']:.4f} (fitted on {fitted['num_images']} {fitted['split']} images, "
             f"fold {fitted['fold']}, {data['checkpoint']} checkpoint)",
             f"  {'':<22}{'before':>9}{'after':>9}"]
    for key, label in (("nll", "NLL"), ("ece", "ECE (10 equal-width)"), ("ece_equal_mass", "ECE (10 equal-mass)"),
                       ("brier", "Brier")):
        lines.append(f"  {label:<22}{before[key]:>9.4f}{after[key]:>9.4f}")
    thresholds = data["thresholds"]
    for key in SPECIFICITIES:
        point = thresholds[key]
        sens = "n/a" if point["sensitivity"] is None else f"{point['sensitivity']:.3f}"
        lines.append(f"  {thresholds['class']} at {key.split('_')[1]}% specificity: p >= {point['threshold']:.6g} "
                     f"(validation sensitivity {sens}, specificity {point['specificity']:.3f})")
    return lines


def split_calibration(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
                      calibration: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The scored split's ECE/Brier/NLL before and after the run's temperature, in the shape of
    ``caaxr score --calibrate-on`` (``temperature_scaling`` in metrics.json)."""
    temperature = float(calibration["temperature"])
    scaled = apply_temperature(logits_from_probabilities(probabilities), temperature)
    before = calibration_report(labels, probabilities, class_names)
    after = calibration_report(labels, scaled, class_names)
    keys = ("ece", "ece_equal_mass", "brier", "nll")
    validation = calibration["validation"]
    return {"temperature": temperature, "fitted_on": source,
            "num_validation_images": int(calibration["fitted_on"]["num_images"]),
            "validation_nll_before": validation["before"]["nll"], "validation_nll_after": validation["after"]["nll"],
            "before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys},
            "argmax_unchanged": bool(np.array_equal(np.argmax(scaled, 1), np.argmax(probabilities, 1))),
            "thresholds": calibration["thresholds"]}


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="caaxr calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="classifier run folder written by caaxr train")
    parser.add_argument("--which", choices=("best", "final"), default="best", help="checkpoint to calibrate")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    parser.add_argument("--bins", type=int, default=10, help="reliability bins of the ECE (default 10)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        calibrate_run(args.run, which=args.which, batch_size=args.batch_size, n_bins=args.bins)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Approach (a) of Cohen et al. 2020 on this project's own runs: features of the scored images
from trained runs, least squares per half split of the protocol folder, the intercept-only
baseline beside them.

    python -m caaxr_tf.severity.run_features --tfrecords TFRECORDS/severity \
        --run RUN_DIR[:KIND] [--run ...] [--imported WEIGHTS[:OUTPUT] ...] [--lung-run LUNG_RUN] [--combined] [--splits N] [--which best|final] \
        [--markdown] [--json OUT.json] [--plots DIR]

``TFRECORDS/severity`` is a ``grouped_halves`` protocol folder (``caaxr-make-tfrecords --source
covid-chestxray --protocol severity``): its records are the scored images, its summary.json
lists each fold's halves (fold k = the split with seed k - 1; the training half is the fold's
train and val). Every run gives one feature matrix of a registered feature kind
(`FEATURE_KINDS`; by default the one for the run's task: ``penultimate`` for classifier runs,
``mask_fractions`` for segmentation runs; also ``outputs``: a classifier's probabilities,
``masked_intensity``: image brightness inside and outside a segmentation run's predicted mask;
``lung_infection``: an infection-map run's infected fraction of the right lung, the left lung and
both, inside the lungs of a ``--lung-run``); ``--combined`` also scores all of them side by side.
``--imported WEIGHTS[:features|logits|probabilities]`` takes a network imported by ``caaxr
import-weights`` as it is (the published approach (a): torchxrayvision's DenseNet-121 features
or its 18 calibrated outputs; `imported_features`).
A run trained on the scored images' scores (a fold of this protocol) is refused
(`check_not_trained_on_scores`): its training half is in the test halves of other splits.

Adding a feature kind: a function ``(model, images [N, S, S, 1] float32 0..255) -> (features
[N, F], column names)`` registered with ``@register_feature_kind(name, tasks=(...))``; with
``needs_lung_run=True`` it also receives ``lung_run`` (a `caaxr_tf.infection.lungs.LungRun`).
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from caaxr_tf.severity.protocol import (
    ProtocolResult,
    evaluate_least_squares,
    format_protocol_table,
    intercept_only_baseline,
)
from caaxr_tf.severity.splits import HalfSplit, ordered_groups
from caaxr_tf.data.pipeline import decode_common, parse_record
from caaxr_tf.data.schema import ALL_SHARDS, GROUPED_HALVES, MANIFEST_FILE, read_summary, split_members
from caaxr_tf.data.shards import naming_corrupt_shards
from caaxr_tf.io import write_json_atomic
from caaxr_tf.models.outputs import mask_output
from caaxr_tf.runs import Run
from caaxr_tf.severity.features import SEGMENTATION_FEATURE_NAMES, classifier_features, segmentation_features
from caaxr_tf.severity.protocol import output_file_problem, output_folder_problem

FeatureFunction = Callable[[Any, np.ndarray], tuple[np.ndarray, list[str]]]


@dataclass(frozen=True)
class FeatureKind:
    """A way to turn a trained model into per-image features; ``tasks``: the run tasks it suits
    (the first kind registered for a task is that task's default)."""

    name: str
    tasks: tuple[str, ...]
    function: FeatureFunction
    needs_lung_run: bool = False


FEATURE_KINDS: dict[str, FeatureKind] = {}


def register_feature_kind(name: str, *, tasks: Sequence[str],
                          needs_lung_run: bool = False) -> Callable[[FeatureFunction], FeatureFunction]:
    """Register ``function(model, images) -> (features [N, F], names)`` as feature kind ``name``
    (``function(model, images, lung_run=LungRun)`` when ``needs_lung_run``)."""

    def register(function: FeatureFunction) -> FeatureFunction:
        if name in FEATURE_KINDS:
            raise ValueError(f"feature kind {name!r} is already registered")
        FEATURE_KINDS[name] = FeatureKind(name, tuple(tasks), function, needs_lung_run)
        return function

    return register


def default_feature_kind(task: str) -> str:
    """The first registered feature kind for runs of ``task``."""
    for kind in FEATURE_KINDS.values():
        if task in kind.tasks:
            return kind.name
    raise ValueError(f"no feature kind for runs of the {task!r} task; known kinds: "
                     + ", ".join(f"{k.name} ({'/'.join(k.tasks)})" for k in FEATURE_KINDS.values()))


@register_feature_kind("penultimate", tasks=("classification", "regression"))
def penultimate_features(model: Any, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The layer feeding the output layer (a classifier's or regressor's Dense 512)."""
    features = classifier_features(model, images)
    return features, [f"penultimate_{i}" for i in range(features.shape[1])]


@register_feature_kind("outputs", tasks=("classification",))
def output_features(model: Any, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The model's own outputs (a classifier's class probabilities)."""
    rows = [np.asarray(model.predict_on_batch(images[i : i + 32]), np.float64) for i in range(0, len(images), 32)]
    features = np.concatenate(rows).reshape(len(images), -1)
    return features, [f"output_{i}" for i in range(features.shape[1])]


@register_feature_kind("mask_fractions", tasks=("segmentation", "infection"))
def mask_fraction_features(model: Any, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Predicted foreground fraction (probability >= 0.5) and mean probability per image."""
    return segmentation_features(model, images), list(SEGMENTATION_FEATURE_NAMES)


MASKED_INTENSITY_NAMES = ("area_fraction", "mean_inside", "std_inside", "mean_outside")


@register_feature_kind("masked_intensity", tasks=("segmentation", "infection"))
def masked_intensity_features(model: Any, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per image: the predicted foreground fraction (probability >= 0.5) and the image's mean and
    std inside the predicted mask and its mean outside, in 0..1 (opacities brighten the lungs;
    an empty mask gives 0 inside)."""
    rows = []
    for start in range(0, len(images), 8):
        batch = images[start : start + 8]
        masks = np.asarray(model.predict_on_batch(batch), np.float64).reshape(batch.shape[:3]) >= 0.5
        pixels = np.asarray(batch, np.float64)[..., 0] / 255.0
        for mask, image in zip(masks, pixels):
            inside, outside = image[mask], image[~mask]
            rows.append([mask.mean(), inside.mean() if inside.size else 0.0, inside.std() if inside.size else 0.0,
                         outside.mean() if outside.size else 0.0])
    return np.array(rows, np.float64).reshape(len(images), len(MASKED_INTENSITY_NAMES)), list(MASKED_INTENSITY_NAMES)


LUNG_INFECTION_NAMES = ("right_lung_infected_fraction", "left_lung_infected_fraction", "lungs_infected_fraction")


@register_feature_kind("lung_infection", tasks=("infection",), needs_lung_run=True)
def lung_infection_features(model: Any, images: np.ndarray, *, lung_run: Any) -> tuple[np.ndarray, list[str]]:
    """Issue 13's severity grade as features: the infected fraction (map >= 0.5) of the right
    lung, the left lung and both, inside the lung run's lungs (`caaxr_tf.infection.lungs`). A lung
    the lung model does not find counts as 0 infected (least squares needs finite features)."""
    from caaxr_tf.infection.lungs import lung_infection_features as fractions

    rows = []
    for start in range(0, len(images), 8):
        batch = np.asarray(images[start : start + 8], np.float32)
        maps = np.asarray(mask_output(model.predict_on_batch(batch)), np.float32)
        rows.append(fractions(maps, lung_run.predict(batch)))
    features = np.concatenate(rows) if rows else np.zeros((0, 3))
    return np.nan_to_num(features, nan=0.0), list(LUNG_INFECTION_NAMES)


# --------------------------------------------------------------------------- #
# The protocol folder
# --------------------------------------------------------------------------- #


@dataclass
class ScoredImages:
    """A half-split protocol folder's records in manifest order: ids, patients, targets, splits."""

    image_ids: list[str]
    patient_ids: list[str]
    targets: np.ndarray
    target_names: list[str]
    splits: list[HalfSplit]


def read_protocol(protocol_dir: str | Path, num_splits: int | None = None) -> ScoredImages:
    """Ids, patients and targets from manifest.csv; the first ``num_splits`` folds' halves from
    summary.json (``split_members``; the training half is a fold's train and val)."""
    protocol_dir = Path(protocol_dir)
    summary = read_summary(protocol_dir)
    if summary.get("split_scheme") != GROUPED_HALVES or not summary.get("target_names"):
        raise ValueError(f"{protocol_dir} is not a regression protocol with grouped half splits "
                         "(summary.json split_scheme grouped_halves, target_names)")
    names = [str(n) for n in summary["target_names"]]
    with open(protocol_dir / MANIFEST_FILE, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    ids = [r["image_id"] for r in rows]
    index = {image_id: i for i, image_id in enumerate(ids)}
    folds = int(summary["folds"]) if num_splits is None else num_splits
    if not 1 <= folds <= int(summary["folds"]):
        raise ValueError(f"{protocol_dir} has {summary['folds']} splits; asked for {folds}")
    splits = []
    for fold in range(1, folds + 1):
        train = [index[i] for part in ("train", "val") for i in split_members(summary, part, fold)]
        test = [index[i] for i in split_members(summary, "test", fold)]
        splits.append(HalfSplit(seed=fold - 1, train=np.sort(np.array(train, np.int64)), test=np.sort(np.array(test, np.int64))))
    targets = np.array([[float(r[f"target_{n}"]) for n in names] for r in rows], np.float64).reshape(len(rows), len(names))
    return ScoredImages(ids, [r["patient_id"] for r in rows], targets, names, splits)


def protocol_images(protocol_dir: str | Path, image_ids: Sequence[str], image_size: int) -> np.ndarray:
    """float32 ``[N, S, S, 1]`` images in 0..255 of ``image_ids`` (in that order), decoded and
    resized by the tf.data pipeline's own functions (as training and evaluation see them).

    Raises ``tf.errors.DataLossError`` naming the shard when a shard is damaged."""
    import tensorflow as tf

    protocol_dir = Path(protocol_dir)
    files = [str(protocol_dir / name) for name in read_summary(protocol_dir)["shards"][ALL_SHARDS]]
    dataset = tf.data.TFRecordDataset(files).map(parse_record).map(lambda r: decode_common(r, image_size)).batch(64)
    by_id: dict[str, np.ndarray] = {}
    with naming_corrupt_shards(files):
        for batch in dataset:
            for image_id, image in zip(batch["id"].numpy(), batch["image"].numpy()):
                by_id[image_id.decode("utf-8")] = image
    missing = [i for i in image_ids if i not in by_id]
    if missing:
        raise ValueError(f"{protocol_dir}: no record for image(s) {missing[:5]} of manifest.csv")
    return np.stack([by_id[i] for i in image_ids]).astype(np.float32)


# --------------------------------------------------------------------------- #
# Runs -> features -> least squares
# --------------------------------------------------------------------------- #


@dataclass
class RunFeatures:
    """One run's feature matrix ``[N, F]`` (rows in the protocol's manifest order); ``label``
    names the run by its folder (``<folder name>: <model> (<protocol> fold <k>) <kind>``), so
    two runs are two rows of a table even when model, protocol and fold agree."""

    label: str
    kind: str
    features: np.ndarray
    names: list[str]


def run_features(run_dir: str | Path, protocol_dir: str | Path, image_ids: Sequence[str], *,
                 kind: str | None = None, which: str = "best",
                 image_cache: dict[int, np.ndarray] | None = None,
                 lung_run: str | Path | None = None) -> RunFeatures:
    """Features of the scored images from a trained run's model (``which``: best or final);
    ``lung_run``: the lungs-protocol run that kinds with ``needs_lung_run`` use."""
    run = Run(run_dir)
    config = run.config
    task = run.settings.task
    kind = kind or default_feature_kind(task)
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; known: {', '.join(FEATURE_KINDS)}")
    feature_kind = FEATURE_KINDS[kind]
    context: dict[str, Any] = {}
    if feature_kind.needs_lung_run:
        if lung_run is None:
            raise ValueError(f"feature kind {kind!r} of {run_dir} needs a lung run (--lung-run)")
        from caaxr_tf.infection.lungs import LungRun

        context["lung_run"] = LungRun(Run(lung_run), which)
    size = run.settings.image_size
    cache = image_cache if image_cache is not None else {}
    if size not in cache:
        cache[size] = protocol_images(protocol_dir, image_ids, size)
    model = run.model(which)
    features, names = feature_kind.function(model, cache[size], **context)
    return RunFeatures(run_label(run_dir, config, kind), kind, np.asarray(features, np.float64), names)


IMPORTED_OUTPUTS = ("features", "logits", "probabilities")


def parse_imported(text: str) -> tuple[str, str]:
    """``WEIGHTS`` or ``WEIGHTS:OUTPUT`` (an output of the imported network; default ``features``)."""
    weights, separator, output = text.rpartition(":")
    return (weights, output) if separator and output in IMPORTED_OUTPUTS else (text, "features")


def imported_features(weights: str | Path, protocol_dir: str | Path, image_ids: Sequence[str], *,
                      output: str = "features", image_cache: dict[int, np.ndarray] | None = None) -> RunFeatures:
    """Approach (a) as published: an output of an imported pretrained network itself (``caaxr
    import-weights``; `caaxr_tf.weights.ImportedWeights.build_source_model`), no training here:
    ``features`` (the pooled backbone activations, e.g. DenseNet-121's 1024), ``logits`` or
    ``probabilities`` (the source's head: torchxrayvision's 18 pathologies, calibrated), at the
    network's own input size and preprocessing."""
    from caaxr_tf.weights import load_imported

    if output not in IMPORTED_OUTPUTS:
        raise ValueError(f"unknown output {output!r} of an imported network; known: {', '.join(IMPORTED_OUTPUTS)}")
    imported = load_imported(weights)
    model = imported.build_source_model()
    if output not in model.output:
        raise ValueError(f"{weights}: the imported network has no {output!r} output (no head was imported); "
                         f"it has {', '.join(model.output)}")
    size = int(imported.metadata.get("input_size", 224))
    cache = image_cache if image_cache is not None else {}
    if size not in cache:
        cache[size] = protocol_images(protocol_dir, image_ids, size)
    values = np.asarray(model.predict(cache[size], batch_size=16, verbose=0)[output], np.float64)
    classes = (imported.metadata.get("head") or {}).get("class_names") or []
    names = ([f"{output}_{c}" for c in classes] if output != "features" and len(classes) == values.shape[1]
             else [f"{output}_{i}" for i in range(values.shape[1])])
    label = (f"{Path(weights).name}: imported {imported.metadata.get('source', '?')} "
             f"{imported.metadata.get('model', '?')} {output}")
    return RunFeatures(label, output, values, names)


def run_label(run_dir: str | Path, config: dict[str, Any], kind: str, *, full_path: bool = False) -> str:
    """``<run folder name>: <model> (<protocol> fold <k>) <kind>``; the resolved folder path
    instead of its name with ``full_path`` (two runs in folders of the same name)."""
    where = str(Path(run_dir).resolve()) if full_path else Path(run_dir).resolve().name
    return f"{where}: {config.get('model', '?')} ({config.get('protocol', '?')} fold {config.get('fold', '?')}) {kind}"


def unique_labels(runs: Sequence[tuple[str | Path, str | None]], sets: Sequence[RunFeatures]) -> None:
    """Name runs whose labels collide (folders of the same name) by their full path; the same
    run with the same feature kind twice is an error (its rows would merge in a table)."""
    labels = [item.label for item in sets]
    for (run, _), item in zip(runs, sets):
        if labels.count(item.label) > 1:
            item.label = run_label(run, Run(run).config, item.kind, full_path=True)
    seen: set[str] = set()
    for (run, _), item in zip(runs, sets):
        if item.label in seen:
            raise ValueError(f"--run {run} is given twice with feature kind {item.kind}")
        seen.add(item.label)


def check_not_trained_on_scores(run_dir: str | Path, protocol_dir: str | Path, image_ids: Sequence[str]) -> None:
    """Refuse a run that was trained on the scores of the scored images (e.g. on a fold of this
    severity protocol): its training half holds images that other splits test on, so least
    squares on its features would be scored on images whose scores the network has seen.

    The run's training images are its fold's train and val rows of its protocol folder's
    manifest.csv, when that protocol has regression targets; when its folder is gone, a
    regression run of the same protocol name is refused. Raises ``ValueError``.
    """
    run = Run(run_dir)
    config = run.config
    fold = run.settings.fold
    trained_on = Path(run.settings.tfrecords)
    advice = ("its features would have seen the test halves of other splits; use a run trained on another "
              "protocol (e.g. a classifier or a lungs segmentation run)")
    try:
        summary = read_summary(trained_on)
    except (OSError, ValueError):
        summary = None
    if summary is None:
        scored_protocol = read_summary(protocol_dir).get("protocol")
        if config.get("task") == "regression" and config.get("protocol") == scored_protocol:
            raise ValueError(f"{run_dir} was trained on fold {fold} of {trained_on} (a {scored_protocol} regression "
                             f"run; that folder is not readable, so judged by its protocol name): {advice}")
        return
    if not summary.get("target_names") or not (trained_on / MANIFEST_FILE).is_file():
        return  # no scores to learn from
    with open(trained_on / MANIFEST_FILE, newline="", encoding="utf-8") as handle:
        training = {row["image_id"] for row in csv.DictReader(handle)
                    if row.get(f"split_fold{fold}") in ("train", "val")}
    seen = training & set(image_ids)
    if seen:
        raise ValueError(f"{run_dir} was trained on fold {fold} of {trained_on}: {len(seen)} of the {len(image_ids)} "
                         f"scored images of {protocol_dir} were in its training half, with their scores; {advice}")


def evaluate_run_features(protocol_dir: str | Path, runs: Sequence[tuple[str | Path, str | None]], *,
                          num_splits: int | None = None, which: str = "best", combined: bool = False,
                          lung_run: str | Path | None = None, imported: Sequence[tuple[str | Path, str]] = ()
                          ) -> tuple[ScoredImages, list[ProtocolResult]]:
    """The intercept-only baseline, then least squares on each run's features and each
    ``imported`` network's output (`imported_features`; and, with ``combined``, on all of them
    side by side), on the protocol folder's splits."""
    scored = read_protocol(protocol_dir, num_splits)
    common = dict(target_names=scored.target_names, splits=scored.splits)
    results = [intercept_only_baseline(scored.targets, scored.patient_ids, **common)]
    for run, _ in runs:  # before any model is loaded
        check_not_trained_on_scores(run, protocol_dir, scored.image_ids)
    cache: dict[int, np.ndarray] = {}
    sets = [run_features(run, protocol_dir, scored.image_ids, kind=kind, which=which, image_cache=cache,
                         lung_run=lung_run) for run, kind in runs]
    unique_labels(runs, sets)
    for weights, output in imported:
        item = imported_features(weights, protocol_dir, scored.image_ids, output=output, image_cache=cache)
        if any(other.label == item.label for other in sets):
            raise ValueError(f"--imported {weights}:{output} is given twice")
        sets.append(item)
    for item in sets:
        results.append(evaluate_least_squares(item.features, scored.targets, scored.patient_ids,
                                              name=f"{item.label} [{item.features.shape[1]}]", **common))
    if combined and len(sets) > 1:
        stacked = np.concatenate([item.features for item in sets], axis=1)
        results.append(evaluate_least_squares(stacked, scored.targets, scored.patient_ids,
                                              name=f"all of the above [{stacked.shape[1]}]", **common))
    return scored, results


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def parse_run(text: str) -> tuple[str, str | None]:
    """``RUN_DIR`` or ``RUN_DIR:KIND``."""
    run, separator, kind = text.rpartition(":")
    return (run, kind) if separator and kind in FEATURE_KINDS else (text, None)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m caaxr_tf.severity.run_features",
                                     description="Least squares on features of trained runs, per half split "
                                                 "of a severity protocol folder, beside the intercept-only baseline.")
    parser.add_argument("--tfrecords", required=True, help="the protocol folder (TFRECORDS/severity)")
    parser.add_argument("--run", action="append", default=[], type=parse_run,
                        help=f"a run folder, optionally :KIND ({', '.join(FEATURE_KINDS)}); repeatable")
    parser.add_argument("--imported", action="append", default=[], type=parse_imported, metavar="WEIGHTS[:OUTPUT]",
                        help="a network imported by caaxr import-weights (its .weights.h5), used as it is: OUTPUT "
                             f"one of {', '.join(IMPORTED_OUTPUTS)} (default features); repeatable")
    parser.add_argument("--lung-run", default=None,
                        help="a lungs-protocol segmentation run, for the lung_infection features of infection runs")
    parser.add_argument("--combined", action="store_true", help="also fit all runs' features together")
    parser.add_argument("--splits", type=int, default=None, help="use the first N splits (default: all)")
    parser.add_argument("--which", choices=("best", "final"), default="best")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", help="write every result (summary and per-split scores) here")
    parser.add_argument("--plots", help="write a predicted-vs-true scatter plot per result into this folder")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for option, path, check in (("--json", args.json, output_file_problem), ("--plots", args.plots, output_folder_problem)):
        problem = None if path is None else check(path)
        if problem:  # refused before the features are computed, not after the table is printed
            print(f"error: {option} {path} {problem}", file=sys.stderr)
            return 2
    import tensorflow as tf

    try:
        if not args.run and not args.imported:
            raise ValueError("give at least one --run or --imported")
        scored, results = evaluate_run_features(args.tfrecords, args.run, num_splits=args.splits,
                                                which=args.which, combined=args.combined, lung_run=args.lung_run,
                                                imported=args.imported)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except tf.errors.DataLossError as error:  # a damaged shard, named (as in caaxr_tf.evaluate)
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    print(f"{len(scored.image_ids)} scored images of {len(ordered_groups(scored.patient_ids))} patients; "
          f"{len(scored.splits)} grouped half splits of {args.tfrecords}; mean ± std (n − 1) over the splits")
    print(format_protocol_table(results, markdown=args.markdown))
    if args.json:
        write_json_atomic(args.json, {"results": [result.as_dict() for result in results]})
    if args.plots:
        from caaxr_tf.severity.plots import plot_predicted_vs_true

        folder = Path(args.plots)
        folder.mkdir(parents=True, exist_ok=True)
        for number, result in enumerate(results):
            plot_predicted_vs_true(result.targets, result.held_out_predictions(), result.target_names,
                                   folder / f"scatter_{number}.png", title=result.name, summary=result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

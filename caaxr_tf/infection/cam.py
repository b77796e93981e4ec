"""Infection maps against a classifier's activation maps, scored alike (Degerli et al. 2021, §5).

For every image of a split of an infection protocol, a *map* in 0..1 is thresholded and scored
against the record's infection mask with the same pooled pixel F1 as the infection task:

* an infection run's map (its segmentation probabilities);
* a COVID-19 classifier's Grad-CAM of the COVID-19 class (`caaxr_tf.explain.GradCam`: ReLU of
  the weighted feature map, resized to the input, divided by its maximum), i.e. the map a
  classifier offers to localize what it detects.

Both are scored over all images of the split (controls add their false positives: a Grad-CAM
map has a maximum of 1 on every image, so it marks pixels on controls too) and over the
COVID-19 images only (localization alone), with per-image DICE on the COVID-19 images.

    python -m caaxr_tf.infection.cam --infection-run RUN [RUN ...] --classifier-run RUN [RUN ...] \
        [--split test] [--cam-threshold 0.5] [--out table.md]

A classifier run on an infection protocol is trained with the ``infection_classification``
task (``caaxr_tf.train --protocol infection --model mobilenetv2``); any classifier run whose
classes include ``covid`` may be given with ``--tfrecords`` naming the infection protocol.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from caaxr_tf.data.summary import ProtocolSummary
from caaxr_tf.explain.gradcam import make_cam_function
from caaxr_tf.io import json_safe, write_json_atomic, write_text_atomic
from caaxr_tf.metrics import dice_per_image
from caaxr_tf.metrics.classification import covid_index
from caaxr_tf.metrics.pixel import PixelCounts
from caaxr_tf.models.outputs import mask_output
from caaxr_tf.runs import Run
from caaxr_tf.tasks.infection import InfectionTask

DEFAULT_CAM_THRESHOLD = 0.5


@dataclass
class MapScores:
    """Pooled pixel counts over all images and over COVID-19 images, and per-image DICE of the
    COVID-19 images."""

    method: str
    run_dir: str
    num_images: int
    pixel_f1: float
    pixel_f1_covid: float
    dice_covid: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def score_maps(map_function: Callable[[np.ndarray], np.ndarray], dataset: Iterable, threshold: float,
               method: str = "", run_dir: str = "") -> MapScores:
    """Score ``map_function(images) -> maps [N, S, S(, 1)]`` on ``dataset`` batches
    ``(images, {"mask", "covid"})``: pixel F1 (pooled, threshold ``threshold``) over all images
    and over the COVID-19 images, mean DICE of the COVID-19 images."""
    every, covid_only, dice, count = PixelCounts(), PixelCounts(), [], 0
    for batch in dataset:
        images, targets = batch[0], batch[1]
        truth = np.asarray(targets["mask"], np.float32)
        maps = np.asarray(map_function(np.asarray(images, np.float32)), np.float32).reshape(truth.shape)
        covid = np.asarray(targets["covid"]) > 0.5
        every.update(truth, maps, threshold)
        if covid.any():
            covid_only.update(truth[covid], maps[covid], threshold)
            dice.append(dice_per_image(truth[covid], maps[covid], threshold, 1.0))
        count += len(truth)
    if count == 0:
        raise ValueError("no images in this split")
    dice_values = np.concatenate(dice) if dice else np.array([np.nan])
    return MapScores(method, run_dir, count, every.f1, covid_only.f1, float(np.nanmean(dice_values)))


def _dataset(run: Run, tfrecords: str | Path | None, split: str, batch_size: int):
    protocol_dir = Path(tfrecords) if tfrecords else run.protocol_dir
    summary = ProtocolSummary.read(protocol_dir)
    if summary.task != "infection":
        raise ValueError(f"{protocol_dir} is a {summary.raw.get('task')} protocol; the comparison needs an infection one")
    return run.dataset(split, task=InfectionTask(summary.classes), protocol_dir=protocol_dir, batch_size=batch_size)


def score_infection_run(run_dir: str | Path, split: str = "test", threshold: float = 0.5,
                        tfrecords: str | Path | None = None, batch_size: int = 16) -> MapScores:
    """The infection map of a run's best model, scored by `score_maps`."""
    run = Run(run_dir)
    config, predict = run.config, run.predictor()
    return score_maps(lambda images: mask_output(predict(images)), _dataset(run, tfrecords, split, batch_size),
                      threshold, f"infection map ({config.get('model')})", str(run_dir))


def score_classifier_cams(run_dir: str | Path, split: str = "test", cam_threshold: float = DEFAULT_CAM_THRESHOLD,
                          tfrecords: str | Path | None = None, layer: str | None = None,
                          batch_size: int = 16) -> MapScores:
    """The Grad-CAM of the COVID-19 class of a classifier run's best model, scored by `score_maps`."""
    import tensorflow as tf

    run = Run(run_dir)
    config, model = run.config, run.model()
    names = list(run.settings.class_names)
    if "covid" not in [name.lower() for name in names]:
        raise ValueError(f"classifier run {run_dir} has no covid class (classes: {', '.join(names)})")
    covid = covid_index(names)
    cam_function = make_cam_function(model, layer=layer)

    def cams(images: np.ndarray) -> np.ndarray:
        index = tf.fill([len(images)], tf.constant(covid, tf.int32))
        return cam_function(tf.constant(images), index)["cam"].numpy()

    return score_maps(cams, _dataset(run, tfrecords, split, batch_size), cam_threshold,
                      f"Grad-CAM ({config.get('model')})", str(run_dir))


def comparison_table(scores: Sequence[MapScores]) -> str:
    """Markdown: one row per method, mean ± std over its runs (folds)."""
    lines = ["| method | runs | images | pixel F1 (all images) | pixel F1 (COVID-19 images) | DICE (COVID-19 images) |",
             "|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(score.method for score in scores))
    for method in methods:
        rows = [score for score in scores if score.method == method]

        def cell(values: list[float]) -> str:
            values = np.asarray(values, np.float64)
            return f"{values.mean():.4f}" + (f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else "")

        lines.append(f"| {method} | {len(rows)} | {rows[0].num_images} | {cell([r.pixel_f1 for r in rows])} | "
                     f"{cell([r.pixel_f1_covid for r in rows])} | {cell([r.dice_covid for r in rows])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m caaxr_tf.infection.cam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infection-run", nargs="*", default=[], help="infection runs (e.g. one per fold)")
    parser.add_argument("--classifier-run", nargs="*", default=[], help="COVID-19 classifier runs")
    parser.add_argument("--tfrecords", default=None, help="the infection protocol folder (default: each run's)")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--threshold", type=float, default=0.5, help="infection maps: pixel threshold")
    parser.add_argument("--cam-threshold", type=float, default=DEFAULT_CAM_THRESHOLD,
                        help="Grad-CAM maps (0..1, max-normalised): pixel threshold")
    parser.add_argument("--layer", default=None, help="Grad-CAM target layer (default: the backbone's output)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None, help="write the Markdown table and a JSON beside it")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.infection_run and not args.classifier_run:
        print("error: give --infection-run and/or --classifier-run", file=sys.stderr)
        return 2
    try:
        scores = [score_infection_run(run, args.split, args.threshold, args.tfrecords, args.batch_size)
                  for run in args.infection_run]
        scores += [score_classifier_cams(run, args.split, args.cam_threshold, args.tfrecords, args.layer,
                                         args.batch_size) for run in args.classifier_run]
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = comparison_table(scores)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        write_text_atomic(out, table)
        write_json_atomic(out.with_suffix(".json"), json_safe({"split": args.split, "threshold": args.threshold,
                                                               "cam_threshold": args.cam_threshold,
                                                               "scores": [s.as_dict() for s in scores]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

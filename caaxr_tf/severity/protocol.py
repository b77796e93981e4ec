"""The published severity evaluation: least squares per grouped half split.

For each of ``num_splits`` splits (seeds ``0 .. num_splits - 1``, `grouped_half_splits`) an
ordinary least squares model with an intercept is fitted on the training half of a feature
matrix and scored on the test half, per target: MAE, MSE, R², Pearson r. Scores are reported as
mean ± std over the splits, the std with ``n - 1`` in the denominator (the sample standard
deviation, as pandas' ``std`` in the authors' notebook and as the CV tables of this project).

The intercept-only baseline ("no data") is the same protocol without features: every test
image gets the training half's mean. It depends only on the scores and the splits; on the
authors' 94 images it gives geographic extent MAE 2.07 ± 0.17, MSE 5.97 ± 0.90,
R² -0.09 ± 0.09, as published.

    python -m caaxr_tf.severity.protocol --data ../shared/data/covid-chestxray [--splits 50]
        [--first-seed 0] [--markdown] [--json OUT.json] [--plot OUT.png]

prints the baseline table on the collection's scored images (and writes it as JSON and a
scatter plot of the held-out predictions when asked).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from caaxr_tf.metrics.regression import METRIC_NAMES, regression_scores
from caaxr_tf.severity.scores import METRIC_TITLES, MeanStd  # noqa: F401  (moved to severity.scores; re-exported)
from caaxr_tf.severity.splits import DEFAULT_NUM_SPLITS, HalfSplit, grouped_half_splits, ordered_groups
from caaxr_tf.data.records import InputError
from caaxr_tf.io import write_json_atomic
from caaxr_tf.tables import format_results_table

BASELINE_NAME = "intercept only (no data)"


# --------------------------------------------------------------------------- #
# Least squares
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class LeastSquaresFit:
    """``prediction = features @ coef + intercept``; ``coef`` is ``[F, T]``, ``intercept`` ``[T]``."""

    coef: np.ndarray
    intercept: np.ndarray

    def predict(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.coef.shape[0]:
            raise ValueError(f"expected features [M, {self.coef.shape[0]}], got {features.shape}")
        return features @ self.coef + self.intercept


def fit_least_squares(features: np.ndarray, targets: np.ndarray) -> LeastSquaresFit:
    """Ordinary least squares with an intercept, all targets at once.

    Features and targets are centred and the minimum-norm solution of the centred problem is
    taken, so with more features than images (e.g. 512 penultimate activations on ~46
    images) the fit equals ``sklearn.linear_model.LinearRegression``'s as well. With no
    feature columns the prediction is the targets' mean.
    """
    features = np.asarray(features, dtype=np.float64)
    targets = _as_matrix(np.asarray(targets, dtype=np.float64))
    if features.ndim != 2 or features.shape[0] != targets.shape[0]:
        raise ValueError(f"features {features.shape} do not match targets {targets.shape}")
    if features.shape[0] == 0:
        raise ValueError("no images to fit")
    feature_mean, target_mean = features.mean(axis=0), targets.mean(axis=0)
    if features.shape[1] == 0:
        coef = np.zeros((0, targets.shape[1]))
    else:
        coef = np.linalg.lstsq(features - feature_mean, targets - target_mean, rcond=None)[0]
    return LeastSquaresFit(coef=coef, intercept=target_mean - feature_mean @ coef)


def _as_matrix(values: np.ndarray) -> np.ndarray:
    return values.reshape(-1, 1) if values.ndim == 1 else values


# --------------------------------------------------------------------------- #
# Results
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class SplitScore:
    """Scores of one target on the test half of one split."""

    seed: int
    target: str
    num_train: int
    num_test: int
    mae: float
    mse: float
    r2: float
    pearson_r: float


@dataclass
class ProtocolResult:
    """Everything one protocol run produced.

    ``test_predictions[s, i, t]`` is the prediction for image ``i``, target ``t`` in split
    ``s`` when the image is in that split's test half, NaN otherwise.
    """

    name: str
    target_names: tuple[str, ...]
    num_features: int
    targets: np.ndarray
    splits: list[HalfSplit]
    scores: list[SplitScore]
    test_predictions: np.ndarray
    fits: list[LeastSquaresFit] = field(repr=False, default_factory=list)

    def summary(self) -> dict[str, dict[str, MeanStd]]:
        """``{target: {metric: MeanStd}}`` over the splits."""
        return {
            target: {
                metric: MeanStd.of([getattr(s, metric) for s in self.scores if s.target == target])
                for metric in METRIC_NAMES
            }
            for target in self.target_names
        }

    def rows(self) -> list[dict[str, Any]]:
        """One row per split in the CV results format: ``model, fold (= seed), status,
        num_train, num_test, <target>_<metric>...`` (see `protocol_columns`)."""
        rows = []
        for split in self.splits:
            row: dict[str, Any] = {
                "model": self.name,
                "fold": split.seed,
                "status": "ok",
                "num_train": len(split.train),
                "num_test": len(split.test),
            }
            for score in (s for s in self.scores if s.seed == split.seed):
                for metric in METRIC_NAMES:
                    row[f"{score.target}_{metric}"] = getattr(score, metric)
            rows.append(row)
        return rows

    def held_out_predictions(self) -> np.ndarray:
        """``[N, T]``: each image's mean prediction over the splits that held it out (NaN if none)."""
        held_out = ~np.isnan(self.test_predictions)
        count = held_out.sum(axis=0)
        total = np.where(held_out, self.test_predictions, 0.0).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary (NaN as None) and the per-split rows."""

        def number(value: float) -> float | None:
            return float(value) if math.isfinite(value) else None

        return {
            "name": self.name,
            "num_images": int(self.targets.shape[0]),
            "num_features": self.num_features,
            "num_splits": len(self.splits),
            "seeds": [split.seed for split in self.splits],
            "std": "sample standard deviation over splits (n - 1)",
            "summary": {
                target: {
                    metric: {"mean": number(v.mean), "std": number(v.std), "count": v.count}
                    for metric, v in metrics.items()
                }
                for target, metrics in self.summary().items()
            },
            "splits": [{k: (number(v) if isinstance(v, float) else v) for k, v in row.items()} for row in self.rows()],
        }


# --------------------------------------------------------------------------- #
# The protocol
# --------------------------------------------------------------------------- #


def evaluate_least_squares(
    features: np.ndarray,
    targets: np.ndarray,
    groups: Sequence[str | int],
    *,
    target_names: Sequence[str],
    num_splits: int = DEFAULT_NUM_SPLITS,
    first_seed: int = 0,
    name: str = "least squares",
    splits: Sequence[HalfSplit] | None = None,
) -> ProtocolResult:
    """Fit least squares on each split's training half, score it on the test half.

    Args:
        features: ``[N, F]`` feature matrix (``F`` may be 0: the intercept-only baseline).
        targets: ``[N, T]`` scores (``[N]`` for one target).
        groups: the patient id of every image; no patient is in both halves.
        target_names: names of the ``T`` target columns.
        num_splits: number of splits (seeds ``first_seed ..``).
        name: the row label in tables.
        splits: the splits to use (e.g. a protocol folder's, `caaxr_tf.severity.run_features.
            protocol_splits`); by default ``grouped_half_splits(groups, num_splits, first_seed)``.
    """
    features = np.asarray(features, dtype=np.float64)
    targets = _as_matrix(np.asarray(targets, dtype=np.float64))
    target_names = tuple(target_names)
    if features.ndim != 2 or features.shape[0] != targets.shape[0] or len(groups) != targets.shape[0]:
        raise ValueError(
            f"features {features.shape}, targets {targets.shape} and {len(groups)} groups disagree on N"
        )
    if len(target_names) != targets.shape[1]:
        raise ValueError(f"{len(target_names)} target names for {targets.shape[1]} target columns")
    bad = np.flatnonzero(~np.isfinite(features).all(axis=0))
    if bad.size:
        raise ValueError(f"feature column(s) {bad[:10].tolist()} hold NaN or infinite values")
    if not np.isfinite(targets).all():
        raise ValueError("targets hold NaN or infinite values")

    splits = list(splits) if splits is not None else grouped_half_splits(groups, num_splits, first_seed)
    predictions = np.full((len(splits),) + targets.shape, np.nan)
    scores: list[SplitScore] = []
    fits: list[LeastSquaresFit] = []
    for index, split in enumerate(splits):
        fit = fit_least_squares(features[split.train], targets[split.train])
        predicted = fit.predict(features[split.test])
        predictions[index, split.test] = predicted
        fits.append(fit)
        for column, target in enumerate(target_names):
            values = regression_scores(targets[split.test, column], predicted[:, column])
            scores.append(SplitScore(split.seed, target, len(split.train), len(split.test), **values))
    return ProtocolResult(
        name=name,
        target_names=target_names,
        num_features=features.shape[1],
        targets=targets,
        splits=splits,
        scores=scores,
        test_predictions=predictions,
        fits=fits,
    )


def intercept_only_baseline(
    targets: np.ndarray,
    groups: Sequence[str | int],
    *,
    target_names: Sequence[str],
    num_splits: int = DEFAULT_NUM_SPLITS,
    first_seed: int = 0,
    splits: Sequence[HalfSplit] | None = None,
) -> ProtocolResult:
    """The "no data" baseline: each test half is predicted by its training half's mean."""
    targets = _as_matrix(np.asarray(targets, dtype=np.float64))
    return evaluate_least_squares(
        np.zeros((targets.shape[0], 0)),
        targets,
        groups,
        target_names=target_names,
        num_splits=num_splits,
        first_seed=first_seed,
        name=BASELINE_NAME,
        splits=splits,
    )


# --------------------------------------------------------------------------- #
# Tables
# --------------------------------------------------------------------------- #


def protocol_columns(target_names: Sequence[str]) -> list[tuple[str, str]]:
    """``(row key, header)`` of every score column, for `caaxr_tf.cv.format_results_table`."""
    return [
        (f"{target}_{metric}", f"{target} {METRIC_TITLES[metric]}")
        for target in target_names
        for metric in METRIC_NAMES
    ]


def format_protocol_table(
    results: Sequence[ProtocolResult], *, markdown: bool = True, digits: int = 2
) -> str:
    """One line per result (put the baseline beside the models), mean ± std over its splits.

    The ``folds`` column counts splits. A metric undefined in some splits (r of a constant
    prediction) is averaged over the others; undefined everywhere, it shows ``–``.
    """
    if not results:
        raise ValueError("no results to tabulate")
    names = results[0].target_names
    if any(result.target_names != names for result in results):
        raise ValueError("results have different targets")
    rows = [row for result in results for row in result.rows()]
    return format_results_table(rows, protocol_columns(names), markdown=markdown, digits=digits)


# --------------------------------------------------------------------------- #
# Command line: the baseline on the collection
# --------------------------------------------------------------------------- #


MAX_SEED = 2**32 - 1  # numpy.random.RandomState seeds are 0 .. 2**32 - 1


def output_file_problem(path: str | Path) -> str | None:
    """Why a file cannot be written at ``path`` (None when it can, as far as can be told before
    the work): it is a folder, or something on its way is a file."""
    path = Path(path)
    if path.is_dir():
        return "is a folder; expected a file name"
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else f"cannot be created: {parent} is not a folder"
    return None


def output_folder_problem(path: str | Path) -> str | None:
    """Why a folder cannot be used or created at ``path`` (None when it can)."""
    path = Path(path)
    if path.exists():
        return None if path.is_dir() else "is not a folder"
    return output_file_problem(path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from caaxr_tf.data.tfrecords import _int_at_least

    parser = argparse.ArgumentParser(
        prog="python -m caaxr_tf.severity.protocol",
        description="Intercept-only baseline of the published severity protocol on covid-chestxray.",
    )
    parser.add_argument("--data", required=True, help="the covid-chestxray folder")
    parser.add_argument("--splits", type=_int_at_least(1), default=DEFAULT_NUM_SPLITS,
                        help="number of splits (default 50)")
    parser.add_argument("--first-seed", type=_int_at_least(0), default=0)
    parser.add_argument("--markdown", action="store_true", help="a Markdown table instead of aligned text")
    parser.add_argument("--json", help="write the result (summary and per-split scores) here")
    parser.add_argument("--plot", help="write a scatter plot of the held-out predictions here (PNG)")
    args = parser.parse_args(argv)
    if args.first_seed + args.splits - 1 > MAX_SEED:
        parser.error(f"--first-seed {args.first_seed} with --splits {args.splits} needs seeds up to "
                     f"{args.first_seed + args.splits - 1}; seeds go up to {MAX_SEED}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from caaxr_tf.data.sources.covid_chestxray_severity import TARGET_NAMES, patient_groups, read_severity_scores, severity_targets

    args = parse_args(argv)
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        problem = None if path is None else output_file_problem(path)
        if problem:  # refused before the work, not after the table is printed
            print(f"error: {option} {path} {problem}", file=sys.stderr)
            return 2
    try:
        read = read_severity_scores(args.data)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for skipped in read.skipped:
        print(f"skipped: {skipped}", file=sys.stderr)
    if len(read.samples) < 2:
        print(f"error: {len(read.samples)} usable scored image(s); the protocol needs at least 2", file=sys.stderr)
        return 2
    groups = patient_groups(read.samples)
    num_patients = len(ordered_groups(groups))  # "2" and "02" are one patient
    if num_patients < 2:
        print(f"error: {len(read.samples)} usable scored image(s) of {num_patients} patient(s); "
              "the grouped half splits need at least 2 patients", file=sys.stderr)
        return 2
    baseline = intercept_only_baseline(
        severity_targets(read.samples), groups,
        target_names=TARGET_NAMES, num_splits=args.splits, first_seed=args.first_seed,
    )
    print(
        f"{len(read.samples)} scored images of {num_patients} patients, {len(read.skipped)} skipped; "
        f"{args.splits} grouped half splits (seeds {args.first_seed}..{args.first_seed + args.splits - 1}), "
        "mean ± std (n − 1) over the splits"
    )
    print(format_protocol_table([baseline], markdown=args.markdown))
    if args.json:
        write_json_atomic(args.json, baseline.as_dict())
    if args.plot:
        from caaxr_tf.severity.plots import plot_predicted_vs_true

        plot_predicted_vs_true(
            baseline.targets, baseline.held_out_predictions(), TARGET_NAMES, Path(args.plot),
            title=f"{BASELINE_NAME}: mean held-out prediction over {args.splits} splits",
            summary=baseline.summary(),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Predicted vs true scatter plots, one panel per target (matplotlib's object API, no pyplot)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from caaxr_tf.data.sources.covid_chestxray_severity import TARGET_RANGES
from caaxr_tf.plots import new_figure, save_figure
from caaxr_tf.metrics.regression import METRIC_NAMES, regression_scores
from caaxr_tf.severity.scores import METRIC_TITLES, MeanStd


def _metric_line(scores: Mapping[str, float | MeanStd]) -> str:
    parts = []
    for metric in METRIC_NAMES:
        value = scores[metric]
        if isinstance(value, (int, float)):
            text = f"{value:.2f}" if np.isfinite(value) else "–"
        else:  # a MeanStd (checked by type, not class: the protocol may run as __main__)
            text = str(value)
        parts.append(f"{METRIC_TITLES[metric]} {text}")
    return " · ".join(parts)


def plot_predicted_vs_true(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    target_names: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    ranges: Mapping[str, tuple[float, float]] | None = None,
    summary: Mapping[str, Mapping[str, MeanStd]] | None = None,
) -> None:
    """Write a PNG with one scatter panel per target: prediction against truth, identity line.

    Args:
        y_true, y_pred: ``[N, T]`` (``[N]`` for one target); pairs with a NaN are left out
            (e.g. images no split held out).
        target_names: the ``T`` column names (panel titles).
        path: the PNG to write (atomically).
        title: the figure title.
        ranges: axis range per target; default ``TARGET_RANGES`` for the severity targets,
            else the data's range.
        summary: ``{target: {metric: MeanStd}}`` to print in the panel titles (e.g.
            ``ProtocolResult.summary()``); by default the scores of the plotted points.
    """
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    if y_true.shape != y_pred.shape or y_true.shape[1] != len(target_names):
        raise ValueError(f"y_true {y_true.shape}, y_pred {y_pred.shape} and {len(target_names)} targets disagree")
    ranges = dict(TARGET_RANGES if ranges is None else ranges)

    figure = new_figure(4.6 * len(target_names), 4.9)
    for column, target in enumerate(target_names):
        axes = figure.add_subplot(1, len(target_names), column + 1)
        keep = np.isfinite(y_true[:, column]) & np.isfinite(y_pred[:, column])
        truth, predicted = y_true[keep, column], y_pred[keep, column]
        if target in ranges:
            low, high = ranges[target]
        else:
            values = np.concatenate([truth, predicted]) if keep.any() else np.zeros(1)
            low, high = float(values.min()), float(values.max())
        margin = 0.04 * max(high - low, 1e-6)
        axes.plot([low, high], [low, high], ls="--", color="grey", lw=1, label="identity")
        axes.scatter(truth, predicted, s=14, alpha=0.75, edgecolors="none")
        axes.set_xlim(low - margin, high + margin)
        axes.set_ylim(low - margin, high + margin)
        axes.set_aspect("equal")
        axes.set_xlabel(f"true {target}")
        axes.set_ylabel(f"predicted {target}")
        if summary is not None:
            scores = summary[target]
        elif keep.sum() >= 1:
            scores = regression_scores(truth, predicted)
        else:
            scores = {metric: float("nan") for metric in METRIC_NAMES}
        axes.set_title(f"{target} (n={int(keep.sum())})\n{_metric_line(scores)}", fontsize=8)
        axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=10)
    save_figure(figure, Path(path))

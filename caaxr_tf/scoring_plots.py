"""Plots of ``caaxr score`` / ``caaxr compare``: ROC with a bootstrap band, reliability diagram,
forest plot across slices (matplotlib object API, Agg canvas; `caaxr_tf.plots` helpers)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from caaxr_tf.metrics.uncertainty import resample_indices
from caaxr_tf.plots import new_figure, save_figure

FPR_GRID = np.linspace(0.0, 1.0, 101)


def _tpr_on_grid(positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(positive, score)
    return np.interp(FPR_GRID, fpr, tpr)


def plot_roc_band(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str], path: Path, *,
                  groups: Sequence[Any] | None = None, n_resamples: int = 500, seed: int = 0, title: str = "ROC",
                  confidence: float = 0.95, other: np.ndarray | None = None, other_label: str = "B") -> None:
    """One-vs-rest ROC of each class with a pointwise percentile band of the TPR at each FPR over
    patient-clustered resamples (``n_resamples`` 0: no band). ``other``: a second model's scores,
    drawn dashed."""
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = new_figure(5.6, 5.0)
    axes = figure.add_subplot()
    colours = [f"C{i}" for i in range(len(class_names))]
    alpha = 100 * (1 - confidence) / 2
    for index, name in enumerate(class_names):
        positive = labels == index
        if positive.all() or not positive.any():
            axes.plot([], [], label=f"{name} (AUC n/a)")
            continue
        fpr, tpr, _ = roc_curve(positive, scores[:, index])
        auc = roc_auc_score(positive, scores[:, index])
        axes.plot(fpr, tpr, lw=2, color=colours[index], label=f"{name} (AUC {auc:.3f})")
        if n_resamples:
            curves = [_tpr_on_grid(positive[i], scores[i, index])
                      for i in resample_indices(groups, len(labels), n_resamples, seed)
                      if 0 < positive[i].sum() < len(i)]
            if curves:
                low, high = np.percentile(np.array(curves), [alpha, 100 - alpha], axis=0)
                axes.fill_between(FPR_GRID, low, high, color=colours[index], alpha=0.2, lw=0)
        if other is not None:
            fpr_b, tpr_b, _ = roc_curve(positive, other[:, index])
            axes.plot(fpr_b, tpr_b, lw=1.5, ls="--", color=colours[index],
                      label=f"{name}, {other_label} (AUC {roc_auc_score(positive, other[:, index]):.3f})")
    axes.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_xlabel("false positive rate (1 − specificity)")
    axes.set_ylabel("true positive rate (sensitivity)")
    axes.set_title(title + (f" ({confidence:.0%} band, {n_resamples} patient resamples)" if n_resamples else ""),
                   fontsize=9)
    axes.legend(loc="lower right", fontsize=7)
    axes.grid(alpha=0.3)
    save_figure(figure, path)


def plot_reliability(calibration: dict[str, Any], path: Path, title: str = "reliability") -> None:
    """Top-label reliability diagram (accuracy against mean confidence per bin, bin counts below)."""
    bins = calibration["reliability"]
    count = np.asarray(bins["count"], dtype=float)
    keep = count > 0
    mean_predicted = np.asarray(bins["mean_predicted"], dtype=float)[keep]
    fraction = np.asarray(bins["fraction_positive"], dtype=float)[keep]
    figure = new_figure(5.0, 5.6)
    axes, below = figure.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    axes.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    axes.plot(mean_predicted, fraction, marker="o", lw=2, label=f"model (ECE {calibration['ece']:.3f})")
    axes.set_ylabel("accuracy of the top class")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_title(title, fontsize=9)
    axes.legend(loc="upper left", fontsize=8)
    axes.grid(alpha=0.3)
    edges = np.asarray(bins["edges"])
    below.bar(edges[:-1], count, width=np.diff(edges), align="edge", color="C0", alpha=0.6)
    below.set_xlabel("confidence (top-class probability)")
    below.set_ylabel("images")
    save_figure(figure, path)


def plot_forest(rows: Sequence[dict[str, Any]], path: Path, *, metric: str = "auc_macro",
                overall: float | None = None, title: str = "per slice") -> None:
    """Forest plot: one line per slice, estimate and interval of ``metric``; unscored slices listed."""
    labels, estimates, lows, highs = [], [], [], []
    for row in rows:
        name = f"{row['column']}={row['value']} (n={row['n']})"
        cell = row.get("metrics", {}).get(metric) if row.get("scored") else None
        if cell is None or not math.isfinite(cell["estimate"]):
            labels.append(name + " — not scored")
            estimates.append(np.nan), lows.append(np.nan), highs.append(np.nan)
            continue
        labels.append(name)
        estimates.append(cell["estimate"]), lows.append(cell["low"]), highs.append(cell["high"])
    figure = new_figure(6.4, 1.2 + 0.35 * max(1, len(labels)))
    axes = figure.add_subplot()
    y = np.arange(len(labels))[::-1]
    est, low, high = np.array(estimates), np.array(lows), np.array(highs)
    ok = np.isfinite(est)
    axes.errorbar(est[ok], y[ok], xerr=[np.nan_to_num(est[ok] - low[ok]), np.nan_to_num(high[ok] - est[ok])],
                  fmt="s", color="C0", capsize=3)
    if overall is not None and math.isfinite(overall):
        axes.axvline(overall, color="grey", ls="--", lw=1, label=f"all images {overall:.3f}")
        axes.legend(fontsize=7, loc="lower left")
    axes.set_yticks(y, labels, fontsize=7)
    axes.set_xlabel(metric)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    save_figure(figure, path)

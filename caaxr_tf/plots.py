"""Plots shared by the tasks' evaluations (matplotlib's object API with the Agg canvas: no
global backend switch), written atomically.

* ``plot_roc``, ``plot_confusion_matrix`` and ``plot_reliability_per_class``: classifiers;
* ``plot_segmentation_examples``: image / ground truth / prediction rows, as the paper's Fig. 4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from caaxr_tf.io import atomic_path

SPECIFICITIES = (0.99, 0.90)  # marked on the ROC curves


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", bbox_inches="tight")


def plot_roc(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> None:
    """One-vs-rest ROC curve of every class with its AUC in the legend; 99 %/90 % specificity marked."""
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = new_figure(5.6, 5.0)
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
    save_figure(figure, path)


def plot_reliability_per_class(bins: dict, ece: dict, path: Path, title: str) -> None:
    """One-vs-rest reliability diagram of every class: the fraction of images of the class
    against the mean predicted probability per bin (``bins[name]``: the dict of
    ``caaxr_tf.metrics.calibration.reliability_bins``), ECE in the legend."""
    figure = new_figure(5.6, 5.0)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for name, cells in bins.items():
        count = np.asarray(cells["count"], dtype=float)
        keep = count > 0
        value = ece.get(name)
        label = f"{name} (ECE {value:.3f})" if value is not None and np.isfinite(value) else f"{name} (ECE n/a)"
        axes.plot(np.asarray(cells["mean_predicted"], float)[keep], np.asarray(cells["fraction_positive"], float)[keep],
                  marker="o", lw=2, label=label)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("mean predicted probability of the class (bin)")
    axes.set_ylabel("fraction of images of the class")
    axes.set_title(title, fontsize=10)
    axes.legend(loc="upper left", fontsize=8)
    axes.grid(alpha=0.3)
    save_figure(figure, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> None:
    """Counts with row percentages (share of each true class), rows = true, columns = predicted."""
    matrix = np.asarray(matrix)
    size = len(class_names)
    figure = new_figure(1.6 + 1.3 * size, 1.3 + 1.1 * size)
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
    save_figure(figure, path)


def short_label(text: str, width: int = 30) -> str:
    """``text`` cut in the middle to at most ``width`` characters."""
    if len(text) <= width:
        return text
    keep = (width - 1) // 2
    return text[:keep] + "…" + text[-(width - 1 - keep):]


def plot_segmentation_examples(
    images: np.ndarray, masks: np.ndarray, predictions: np.ndarray, ids: Sequence[str], dice: Sequence[float],
    path: Path, title: str, threshold: float = 0.5,
) -> None:
    """Rows of image / ground truth overlay (green) / prediction overlay (red), as the paper's Fig. 4."""
    rows = len(images)
    figure = new_figure(7.5, 2.7 * rows + 0.5)
    grid = figure.subplots(rows, 3, squeeze=False)
    for row in range(rows):
        image = images[row, ..., 0]
        truth = masks[row, ..., 0] > 0.5
        predicted = predictions[row, ..., 0] >= threshold
        panels = [
            (None, None, short_label(ids[row])),
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
    save_figure(figure, path)




def mask_outline(inside: np.ndarray) -> np.ndarray:
    """Pixels of ``inside`` with a 4-neighbour outside it (the mask's one-pixel outline)."""
    padded = np.pad(inside, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside & ~interior


def mask_overlay(pixels: np.ndarray, mask: np.ndarray, threshold: float = 0.5, alpha: float = 0.4) -> np.ndarray:
    """The grey image (uint8 [H, W]) as RGB uint8 with the thresholded mask tinted red and outlined."""
    inside = np.asarray(mask).reshape(pixels.shape) >= threshold
    base = np.repeat(pixels[:, :, None].astype(np.float32), 3, axis=2)
    red = np.array([255.0, 0.0, 0.0], np.float32)
    base[inside] = (1.0 - alpha) * base[inside] + alpha * red
    overlay = np.clip(np.rint(base), 0, 255).astype(np.uint8)
    overlay[mask_outline(inside)] = (255, 0, 0)
    return overlay

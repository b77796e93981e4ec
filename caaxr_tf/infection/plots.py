"""Pictures of infection maps: the jet overlay (predict --overlay), the evaluation's examples
(image | ground truth | infection map) and the ROC of the infected-area score. No OpenCV (the
overlay is drawn on the serving side)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from caaxr_tf.explain.overlay import jet_rgb  # numpy only: the one jet colour map of the package

OVERLAY_ALPHA = 0.45


def jet_overlay(pixels: np.ndarray, infection_map: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The grey image (uint8 ``[H, W]``) as RGB uint8 blended with the jet colours of its
    infection map (probabilities ``[H, W]`` or ``[H, W, 1]``)."""
    pixels = np.asarray(pixels)
    probabilities = np.asarray(infection_map, np.float32).reshape(pixels.shape)
    grey = np.repeat(pixels[:, :, None].astype(np.float32), 3, axis=2)
    blended = (1.0 - alpha) * grey + alpha * 255.0 * jet_rgb(probabilities)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def plot_infection_examples(images: np.ndarray, truths: np.ndarray, maps: np.ndarray, titles: Sequence[str],
                            path: Path, title: str) -> None:
    """One row per image: the image, its ground-truth mask (green outline over the image) and
    the infection map as a jet overlay."""
    from caaxr_tf.plots import mask_overlay, new_figure, save_figure

    rows = len(images)
    figure = new_figure(7.5, 2.6 * rows + 0.4)
    for row in range(rows):
        pixels = np.clip(np.asarray(images[row])[..., 0], 0, 255).astype(np.uint8)
        truth = mask_overlay(pixels, np.asarray(truths[row])[..., 0], 0.5)[..., [1, 0, 2]]  # red tint -> green
        panels = (pixels, truth, jet_overlay(pixels, np.asarray(maps[row])[..., 0]))
        for column, (panel, label) in enumerate(zip(panels, ("image", "ground truth", "infection map"))):
            axes = figure.add_subplot(rows, 3, 3 * row + column + 1)
            axes.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=255)
            axes.set_xticks([])
            axes.set_yticks([])
            axes.set_title(f"{label}\n{titles[row]}" if column == 0 else label, fontsize=7)
    figure.suptitle(title, fontsize=9)
    save_figure(figure, path)


def plot_detection_roc(is_covid: np.ndarray, scores: np.ndarray, path: Path, title: str,
                       operating_point: tuple[float, float] | None = None) -> None:
    """ROC of COVID-19 detection over the infected-area score, with the rule's operating point
    ``(1 - specificity, sensitivity)``."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from caaxr_tf.plots import new_figure, save_figure

    figure = new_figure(5.0, 4.6)
    axes = figure.add_subplot()
    truth = np.asarray(is_covid, bool)
    if truth.any() and not truth.all():
        fpr, tpr, _ = roc_curve(truth, scores)
        axes.plot(fpr, tpr, lw=2, label=f"infected-area score (AUC {roc_auc_score(truth, scores):.3f})")
    else:
        axes.plot([], [], label="AUC n/a (one class only)")
    if operating_point is not None:
        axes.plot(*operating_point, "o", color="black", label="detection rule")
    axes.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_xlabel("1 − specificity (controls detected)")
    axes.set_ylabel("sensitivity (COVID-19 images detected)")
    axes.set_title(title, fontsize=9)
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(alpha=0.3)
    save_figure(figure, path)

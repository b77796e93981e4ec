"""Does a saliency map point at the annotated region? Scores of one map against boxes (numpy).

Boxes are normalised ``(xmin, ymin, xmax, ymax)`` in 0..1, as in the TFRecords; a pixel
``(row i, column j)`` of an ``H x W`` map is inside a box when its centre
``((j + 0.5) / W, (i + 0.5) / H)`` is (left/top edges inclusive, right/bottom exclusive), the
rule of ``caaxr_tf.data.pipeline.boxes_to_mask``. The box mask of an image is the union of its
boxes.

Scores of one map (non-negative, any scale):

* ``pointing``: 1 when the map's maximum lies inside the box mask, else 0. When several
  pixels share the maximum exactly (ties), the score is the fraction of them inside the mask:
  the expected hit of a maximum picked at random among them.
* ``energy``: the fraction of the map's total value inside the mask.
* ``iou``: IoU of the thresholded map ``map >= threshold * max(map)`` (default threshold 0.5)
  with the box mask.

A constant map has every pixel tied for the maximum and above any relative threshold, so it
scores the box-area fraction on all three (for IoU: mask area / image area). A map with no
positive value (e.g. a Grad-CAM that ReLU cleared) is scored as that constant map: it says
nothing about location. These are the scores of the ``uniform`` baseline, whose pointing game
is thus the expected hit rate of a random point, not a hit at the centre pixel.

Baselines: ``uniform`` (a constant map) and ``center_gaussian``, a Gaussian centred on the
image with a standard deviation of ``CENTER_SIGMA`` (0.25) of the width and of the height.

An image without boxes has undefined scores (NaN); `aggregate` leaves those out and counts
them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

DEFAULT_THRESHOLD = 0.5
CENTER_SIGMA = 0.25
SCORE_NAMES = ("pointing", "energy", "iou")


@dataclass(frozen=True)
class LocalizationScores:
    """Scores of one map against the boxes of its image (NaN when the image has no boxes)."""

    pointing: float
    energy: float
    iou: float

    def as_dict(self) -> dict[str, float]:
        return {"pointing": self.pointing, "energy": self.energy, "iou": self.iou}


def _check_boxes(boxes) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [K, 4] (xmin, ymin, xmax, ymax), got shape {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"boxes must be finite, got {boxes.tolist()}")
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        raise ValueError(f"boxes need xmin <= xmax and ymin <= ymax, got {boxes.tolist()}")
    return boxes


def boxes_to_mask(boxes, height: int, width: int | None = None) -> np.ndarray:
    """Normalised [K, 4] boxes -> bool [H, W] union mask; numpy twin of the pipeline's rule.

    Computed in float32 like ``caaxr_tf.data.pipeline.boxes_to_mask``, so both give the same
    mask for a square image.
    """
    width = height if width is None else width
    boxes = _check_boxes(boxes)
    centres_x = (np.arange(width, dtype=np.float32) + np.float32(0.5)) / np.float32(width)
    centres_y = (np.arange(height, dtype=np.float32) + np.float32(0.5)) / np.float32(height)
    inside_x = (centres_x[None, :] >= boxes[:, 0:1]) & (centres_x[None, :] < boxes[:, 2:3])
    inside_y = (centres_y[None, :] >= boxes[:, 1:2]) & (centres_y[None, :] < boxes[:, 3:4])
    return np.any(inside_y[:, :, None] & inside_x[:, None, :], axis=0)


def _check_map(saliency) -> np.ndarray:
    saliency = np.asarray(saliency, dtype=np.float64)
    if saliency.ndim != 2 or saliency.size == 0:
        raise ValueError(f"a map must be [H, W], got shape {saliency.shape}")
    if not np.all(np.isfinite(saliency)):
        raise ValueError("the map has NaN or infinite values")
    if np.any(saliency < 0):
        raise ValueError(f"the map must be non-negative, its minimum is {saliency.min():g}")
    if saliency.max() == 0:
        return np.ones_like(saliency)  # no location information: scored as a constant map
    return saliency


def pointing_game(saliency, mask: np.ndarray) -> float:
    """Fraction of the pixels holding the map's maximum that are inside ``mask`` (ties: see doc)."""
    saliency = _check_map(saliency)
    peaks = saliency == saliency.max()
    return float(np.count_nonzero(peaks & mask) / np.count_nonzero(peaks))


def energy_inside(saliency, mask: np.ndarray) -> float:
    """Share of the map's total value inside ``mask``."""
    saliency = _check_map(saliency)
    return float(saliency[mask].sum() / saliency.sum())


def thresholded_iou(saliency, mask: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> float:
    """IoU of the region ``saliency >= threshold * max(saliency)`` with ``mask``.

    The region always holds the maximum, so the union is never empty.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a fraction of the maximum in 0..1, got {threshold}")
    saliency = _check_map(saliency)
    region = saliency >= threshold * saliency.max()
    union = np.count_nonzero(region | mask)
    return float(np.count_nonzero(region & mask) / union)


def localization_scores(
    saliency, boxes, threshold: float = DEFAULT_THRESHOLD
) -> LocalizationScores:
    """Pointing game, energy inside and thresholded IoU of one [H, W] map against its boxes."""
    saliency = np.asarray(saliency)
    if saliency.ndim != 2:
        raise ValueError(f"a map must be [H, W], got shape {saliency.shape}")
    return mask_scores(saliency, boxes_to_mask(boxes, *saliency.shape), threshold)


def mask_scores(saliency, mask, threshold: float = DEFAULT_THRESHOLD) -> LocalizationScores:
    """`localization_scores` against a pixel mask [H, W] (nonzero = inside) instead of boxes,
    e.g. the boxes drawn by the tf.data pipeline or a lung mask; NaN for an empty mask."""
    saliency = np.asarray(saliency)
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if saliency.ndim != 2 or mask.shape != saliency.shape:
        raise ValueError(f"map {saliency.shape} and mask {mask.shape} must be the same [H, W]")
    mask = mask > 0
    if not mask.any():
        _check_map(saliency)
        return LocalizationScores(math.nan, math.nan, math.nan)
    return LocalizationScores(
        pointing=pointing_game(saliency, mask),
        energy=energy_inside(saliency, mask),
        iou=thresholded_iou(saliency, mask, threshold),
    )


# --------------------------------------------------------------------------- baselines


def uniform_map(height: int, width: int) -> np.ndarray:
    """A constant map: every pixel 1."""
    return np.ones((height, width), dtype=np.float32)


def center_gaussian_map(height: int, width: int, sigma: float = CENTER_SIGMA) -> np.ndarray:
    """A Gaussian centred on the image, peak 1, standard deviation ``sigma`` x width / height.

    Pixel centres are at ``(j + 0.5, i + 0.5)``, the centre at ``(W / 2, H / 2)``; for an
    even size the four middle pixels tie for the maximum.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    x = (np.arange(width) + 0.5 - width / 2) / (sigma * width)
    y = (np.arange(height) + 0.5 - height / 2) / (sigma * height)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)


BASELINES: dict[str, Callable[[int, int], np.ndarray]] = {
    "center_gaussian": center_gaussian_map,
    "uniform": uniform_map,
}


# --------------------------------------------------------------------------- many images


def score_maps(
    maps, boxes_per_image: Sequence[Any], threshold: float = DEFAULT_THRESHOLD
) -> list[LocalizationScores]:
    """Scores of maps [N, H, W] against ``boxes_per_image`` (N arrays [K_i, 4], K_i may be 0)."""
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got shape {maps.shape}")
    if len(boxes_per_image) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but boxes for {len(boxes_per_image)} images")
    return [localization_scores(m, b, threshold) for m, b in zip(maps, boxes_per_image)]


def aggregate(scores: Iterable[LocalizationScores]) -> dict[str, Any]:
    """Means over the images that have boxes: ``hit_rate`` (mean pointing score),
    ``energy``, ``iou``; ``num_images`` scored and ``num_without_boxes`` left out."""
    scores = list(scores)
    defined = [s for s in scores if not math.isnan(s.pointing)]
    result: dict[str, Any] = {
        "num_images": len(defined),
        "num_without_boxes": len(scores) - len(defined),
    }
    for name, key in (("hit_rate", "pointing"), ("energy", "energy"), ("iou", "iou")):
        values = [getattr(s, key) for s in defined]
        result[name] = float(np.mean(values)) if values else math.nan
    return result


def score_with_baselines(
    maps,
    boxes_per_image: Sequence[Any],
    threshold: float = DEFAULT_THRESHOLD,
    baselines: Mapping[str, Callable[[int, int], np.ndarray]] | None = None,
    name: str = "cam",
) -> dict[str, list[LocalizationScores]]:
    """Per-image scores of maps [N, H, W] and of each baseline on the same images and boxes:
    ``{name: [...], "center_gaussian": [...], "uniform": [...]}``."""
    maps = np.asarray(maps)
    scores = {name: score_maps(maps, boxes_per_image, threshold)}
    height, width = maps.shape[1:3]
    for baseline, make in (BASELINES if baselines is None else baselines).items():
        template = make(height, width)
        scores[baseline] = [localization_scores(template, boxes, threshold) for boxes in boxes_per_image]
    return scores


def score_masks_with_baselines(
    maps,
    masks,
    threshold: float = DEFAULT_THRESHOLD,
    baselines: Mapping[str, Callable[[int, int], np.ndarray]] | None = None,
    name: str = "cam",
) -> dict[str, list[LocalizationScores]]:
    """`score_with_baselines` against pixel masks [N, H, W] (or [N, H, W, 1]) instead of boxes."""
    maps, masks = np.asarray(maps), np.asarray(masks)
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be [N, H, W]")
    scores = {name: [mask_scores(m, k, threshold) for m, k in zip(maps, masks)]}
    height, width = maps.shape[1:3]
    for baseline, make in (BASELINES if baselines is None else baselines).items():
        template = make(height, width)
        scores[baseline] = [mask_scores(template, k, threshold) for k in masks]
    return scores


def table_from_scores(
    scores: Mapping[str, Sequence[LocalizationScores]], threshold: float = DEFAULT_THRESHOLD
) -> dict[str, dict[str, Any]]:
    """`aggregate` of every map's per-image scores, with the threshold used."""
    return {name: {**aggregate(rows), "threshold": threshold} for name, rows in scores.items()}


def localization_table(
    maps,
    boxes_per_image: Sequence[Any],
    threshold: float = DEFAULT_THRESHOLD,
    baselines: Mapping[str, Callable[[int, int], np.ndarray]] | None = None,
    name: str = "cam",
) -> dict[str, dict[str, Any]]:
    """``{name: aggregate, "center_gaussian": ..., "uniform": ...}`` for maps [N, H, W]."""
    return table_from_scores(score_with_baselines(maps, boxes_per_image, threshold, baselines, name), threshold)


def score_explanations(
    explain: Callable[[np.ndarray, Any], Any],
    batches: Iterable[tuple[Any, Sequence[Any]]],
    class_index: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    baselines: Mapping[str, Callable[[int, int], np.ndarray]] | None = None,
) -> dict[str, list[LocalizationScores]]:
    """Stream ``(images [B, H, W, C], boxes per image)`` batches through an explainer.

    ``explain(images, class_index)`` returns an object with ``cam`` [B, H, W] (e.g. a
    `caaxr_tf.explain.gradcam.GradCam`); ``class_index`` picks the explained class (the
    COVID class for the localization table; ``None``: the predicted one). Only the scores
    are kept, not the maps. Returns per-image scores as `score_with_baselines`; pass them to
    `table_from_scores`.
    """
    scores: dict[str, list[LocalizationScores]] = {}
    for images, boxes in batches:
        cams = np.asarray(explain(np.asarray(images), class_index).cam)
        for name, rows in score_with_baselines(cams, list(boxes), threshold, baselines).items():
            scores.setdefault(name, []).extend(rows)
    return scores


def format_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """The table of `localization_table` as aligned text (one line per map)."""
    lines = [f"{'map':<16} {'images':>6} {'hit rate':>9} {'energy':>7} {'IoU':>6}"]
    for name, row in rows.items():
        lines.append(
            f"{name:<16} {row['num_images']:>6d} {row['hit_rate']:>9.3f} "
            f"{row['energy']:>7.3f} {row['iou']:>6.3f}"
        )
    return "\n".join(lines)

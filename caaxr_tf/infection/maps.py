"""Infection maps: lung restriction, COVID-19 detection and per-lung severity (numpy).

The infection map is the segmentation model's per-pixel probability of infection. Following
Degerli et al. (2021):

* **Lung restriction** (`restrict_to_lungs`): probabilities outside the lungs are set to 0,
  given a binary lung mask or a lung model's probability map (lung where ``>= lung_threshold``).
* **Detection** (`detect_covid`): an image is COVID-19 when at least ``min_pixels`` (A) of its
  pixels reach ``threshold`` (t). The published rule is A = 1, t = 0.5 (any infected pixel).
* **Infected-area score** (`infected_pixel_count`): the number of pixels ``>= t``. It is the
  statistic the detection rule thresholds at A, so a ROC over this score traces the rule for
  every A at a fixed t (controls without any infected pixel tie at 0).
* **Image-level rates** (`detection_rates`): sensitivity ``TP / (TP + FN)`` over COVID-19
  images and specificity ``TN / (TN + FP)`` over control images.
* **Per-lung severity** (`lung_infection_fractions`): the lung mask is split into the two lungs
  (`split_lungs`) and each lung's infected fraction is ``|map >= t  and  lung| / |lung|``.

Radiological convention: a frontal chest X-ray is displayed as if facing the patient, so the
patient's **right** lung is on the **left** of the image (smaller column index). Every result
here is named from the patient's side (``right`` / ``left``).

Shapes: batch functions take ``[N, H, W]`` or ``[N, H, W, 1]`` and return ``[N]``; single-image
functions take ``[H, W]`` or ``[H, W, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_THRESHOLD = 0.5
DEFAULT_MIN_PIXELS = 1
# A second connected component is a lung only if it holds at least this share of the lung area.
MIN_LUNG_SHARE = 0.1


def _batch(maps: np.ndarray, what: str = "maps") -> np.ndarray:
    maps = np.asarray(maps)
    if maps.ndim == 4 and maps.shape[-1] == 1:
        maps = maps[..., 0]
    if maps.ndim != 3:
        raise ValueError(f"{what} must be [N, H, W] or [N, H, W, 1], got shape {maps.shape}")
    return maps


def _single(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"{what} must be [H, W] or [H, W, 1], got shape {image.shape}")
    return image


def _binary(mask: np.ndarray, threshold: float) -> np.ndarray:
    return mask if mask.dtype == bool else mask >= threshold


def restrict_to_lungs(infection_map: np.ndarray, lungs: np.ndarray, lung_threshold: float = 0.5) -> np.ndarray:
    """The infection map with every pixel outside the lungs set to 0 (same shape and dtype).

    ``lungs`` is a boolean mask or lung probabilities (lung where ``>= lung_threshold``) of the
    map's shape; a missing trailing channel axis on either side is broadcast.
    """
    infection_map = np.asarray(infection_map)
    lungs = _binary(np.asarray(lungs), lung_threshold)
    if lungs.ndim == infection_map.ndim - 1:
        lungs = lungs[..., None]
    elif infection_map.ndim == lungs.ndim - 1 and lungs.shape[-1] == 1:
        lungs = lungs[..., 0]
    if lungs.shape != infection_map.shape:
        raise ValueError(f"lung mask shape {lungs.shape} does not match infection map {infection_map.shape}")
    return np.where(lungs, infection_map, np.zeros((), infection_map.dtype))


def infected_pixel_count(maps: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Number of pixels ``>= threshold`` in each map: int64 ``[N]`` (the infected-area score)."""
    maps = _batch(maps)
    return np.count_nonzero(maps >= threshold, axis=(1, 2)).astype(np.int64)


def detect_covid(
    maps: np.ndarray, threshold: float = DEFAULT_THRESHOLD, min_pixels: int = DEFAULT_MIN_PIXELS
) -> np.ndarray:
    """COVID-19 detected per image: at least ``min_pixels`` pixels ``>= threshold``; bool ``[N]``."""
    if min_pixels < 1:
        raise ValueError(f"min_pixels must be at least 1, got {min_pixels}")
    return infected_pixel_count(maps, threshold) >= min_pixels


@dataclass(frozen=True)
class DetectionRates:
    """Image-level confusion counts of the detection rule."""

    true_positives: int
    false_negatives: int
    true_negatives: int
    false_positives: int

    @property
    def sensitivity(self) -> float:
        """Detected COVID-19 images / COVID-19 images (NaN without COVID-19 images)."""
        covid = self.true_positives + self.false_negatives
        return float("nan") if covid == 0 else self.true_positives / covid

    @property
    def specificity(self) -> float:
        """Controls not detected / controls (NaN without controls)."""
        controls = self.true_negatives + self.false_positives
        return float("nan") if controls == 0 else self.true_negatives / controls

    def as_dict(self) -> dict[str, float]:
        return {
            "tp": self.true_positives,
            "fn": self.false_negatives,
            "tn": self.true_negatives,
            "fp": self.false_positives,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
        }


def detection_rates(is_covid: np.ndarray, detected: np.ndarray) -> DetectionRates:
    """Confusion counts of ``detected`` against the image labels ``is_covid`` (both ``[N]``)."""
    truth = np.asarray(is_covid).reshape(-1).astype(bool)
    detected = np.asarray(detected).reshape(-1).astype(bool)
    if truth.shape != detected.shape:
        raise ValueError(f"{truth.size} labels but {detected.size} detections")
    return DetectionRates(
        true_positives=int(np.count_nonzero(truth & detected)),
        false_negatives=int(np.count_nonzero(truth & ~detected)),
        true_negatives=int(np.count_nonzero(~truth & ~detected)),
        false_positives=int(np.count_nonzero(~truth & detected)),
    )


@dataclass(frozen=True)
class LungSplit:
    """A lung mask split into the patient's right and left lung (boolean ``[H, W]`` each).

    ``method`` is ``"components"`` (two connected components), ``"midline"`` (the fallback
    split at the image's vertical midline) or ``"empty"`` (no lung pixel).
    """

    right: np.ndarray
    left: np.ndarray
    method: str


def split_lungs(
    lung_mask: np.ndarray,
    lung_threshold: float = 0.5,
    min_lung_share: float = MIN_LUNG_SHARE,
    patient_right_on_image_left: bool = True,
) -> LungSplit:
    """Split a two-lung mask into the patient's right and left lung.

    1. Connected components (8-connectivity) of the lung mask. When the two largest each hold
       at least ``min_lung_share`` of the lung area and their centroids lie on opposite sides
       of the image's vertical midline, they are the two lungs; every smaller component joins
       the lung whose centroid is nearer in x (``method="components"``).
    2. Otherwise (the lungs touch and form one component, one lung is missing or tiny, or the
       two large parts lie on one side), the mask is cut at the midline: columns
       ``x < W // 2`` go to the image-left lung, the rest to the image-right lung
       (``method="midline"``). A missing lung then comes out (nearly) empty rather than
       borrowing half of the other one.

    The image-left lung is the patient's right (``patient_right_on_image_left=True``, the
    radiological display of frontal films); pass False for mirrored images.
    """
    lungs = _binary(_single(lung_mask, "lung_mask"), lung_threshold)
    height, width = lungs.shape
    empty = np.zeros_like(lungs, dtype=bool)
    total = int(np.count_nonzero(lungs))
    if total == 0:
        return LungSplit(empty, empty.copy(), "empty")

    count, labels, stats, centroids = cv2.connectedComponentsWithStats(lungs.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas, kind="stable") + 1  # component ids, largest first
    middle = width / 2.0
    image_left = image_right = None
    if count >= 3:
        first, second = order[0], order[1]
        large = stats[second, cv2.CC_STAT_AREA] >= min_lung_share * total
        # centroids are in pixel-index coordinates; pixel x covers [x, x + 1)
        x_first, x_second = centroids[first, 0] + 0.5, centroids[second, 0] + 0.5
        if large and (x_first - middle) * (x_second - middle) < 0:
            left_id, right_id = (first, second) if x_first < x_second else (second, first)
            left_x, right_x = centroids[left_id, 0], centroids[right_id, 0]
            component_x = centroids[:, 0]
            joins_left = np.abs(component_x - left_x) <= np.abs(component_x - right_x)
            joins_left[0] = False  # background
            image_left = joins_left[labels] & lungs
            image_right = lungs & ~image_left
            method = "components"
    if image_left is None:
        columns = np.arange(width)[None, :] < width // 2
        image_left = lungs & columns
        image_right = lungs & ~columns
        method = "midline"
    if patient_right_on_image_left:
        return LungSplit(right=image_left, left=image_right, method=method)
    return LungSplit(right=image_right, left=image_left, method=method)


@dataclass(frozen=True)
class LungSeverity:
    """Infected fraction of each lung of one image (NaN for a lung with no pixel)."""

    right_fraction: float
    left_fraction: float
    total_fraction: float
    right_lung_pixels: int
    left_lung_pixels: int
    split_method: str

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "right_lung_infected_fraction": self.right_fraction,
            "left_lung_infected_fraction": self.left_fraction,
            "lungs_infected_fraction": self.total_fraction,
            "right_lung_pixels": self.right_lung_pixels,
            "left_lung_pixels": self.left_lung_pixels,
            "lung_split": self.split_method,
        }


def lung_infection_fractions(
    infection_map: np.ndarray,
    lung_mask: np.ndarray | LungSplit,
    threshold: float = DEFAULT_THRESHOLD,
    lung_threshold: float = 0.5,
    patient_right_on_image_left: bool = True,
) -> LungSeverity:
    """Per-lung infected fraction ``|map >= threshold and lung| / |lung|`` of one image.

    ``lung_mask`` is the image's lung mask or probabilities (split with `split_lungs`) or an
    already computed `LungSplit`.
    """
    infected = _single(infection_map, "infection_map") >= threshold
    split = (
        lung_mask
        if isinstance(lung_mask, LungSplit)
        else split_lungs(lung_mask, lung_threshold, patient_right_on_image_left=patient_right_on_image_left)
    )
    if split.right.shape != infected.shape:
        raise ValueError(f"lung mask shape {split.right.shape} does not match infection map {infected.shape}")

    def fraction(lung: np.ndarray) -> tuple[float, int]:
        pixels = int(np.count_nonzero(lung))
        return (float("nan") if pixels == 0 else np.count_nonzero(infected & lung) / pixels), pixels

    right, right_pixels = fraction(split.right)
    left, left_pixels = fraction(split.left)
    both, _ = fraction(split.right | split.left)
    return LungSeverity(right, left, both, right_pixels, left_pixels, split.method)

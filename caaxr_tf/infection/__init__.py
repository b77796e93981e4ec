"""Infection maps (Degerli et al., 2021): the segmentation of COVID-19 infected regions as a map
that localizes the infection, detects COVID-19 and grades each lung's severity.

* `losses`: focal + Dice loss, per image (`per_image_focal_dice_loss`) and as `FocalDiceLoss`;
* `metrics`: pixel-level F1 over all test pixels (`PixelF1`, `pixel_counts`, `PixelCounts`);
* `maps`: lung restriction, the detection rule, image-level rates and per-lung severity (numpy);
* `layers`: the detection rule as a Keras layer (`InfectionDetection`) for exported models.
"""

from caaxr_tf.infection.layers import InfectionDetection
from caaxr_tf.losses import FocalDiceLoss, per_image_focal_dice_loss
from caaxr_tf.infection.maps import (
    DetectionRates,
    LungSeverity,
    LungSplit,
    detect_covid,
    detection_rates,
    infected_pixel_count,
    lung_infection_fractions,
    restrict_to_lungs,
    split_lungs,
)
from caaxr_tf.metrics.pixel import PixelCounts, PixelF1, pixel_counts, pixel_f1

__all__ = [
    "DetectionRates",
    "FocalDiceLoss",
    "InfectionDetection",
    "LungSeverity",
    "LungSplit",
    "PixelCounts",
    "PixelF1",
    "detect_covid",
    "detection_rates",
    "infected_pixel_count",
    "lung_infection_fractions",
    "per_image_focal_dice_loss",
    "pixel_counts",
    "pixel_f1",
    "restrict_to_lungs",
    "split_lungs",
]

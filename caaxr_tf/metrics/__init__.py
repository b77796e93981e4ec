"""Metrics, one module per kind of prediction.

Each kind has stateful Keras 3 metrics, whose state is sums and counts in sync-on-read ``SUM``
variables (under ``tf.distribute`` every replica accumulates its shard and reading the result
adds the replicas up), and exact numpy versions for the offline evaluation:

* `segmentation`: per-image Dice and IoU;
* `pixel`: pixel-level F1 pooled over all images (infection maps, Degerli et al.);
* `classification`: sensitivity at a fixed specificity, class-wise ROC AUC, the evaluation's
  classification report;
* `regression`: per-target MAE, MSE, R² (Keras' own) and Pearson r.
"""

from caaxr_tf.metrics.classification import (
    ClasswiseAUC,
    SensitivityAtSpecificity,
    auc_per_class,
    classification_metrics,
    covid_index,
    sensitivity_at_specificity,
)
from caaxr_tf.metrics.pixel import PixelCounts, PixelF1, pixel_counts, pixel_f1
from caaxr_tf.metrics.regression import PearsonR, TargetColumn, pearson_r, regression_metrics, regression_scores
from caaxr_tf.metrics.segmentation import Dice, IoU, dice_per_image, iou_per_image

__all__ = [
    "ClasswiseAUC",
    "Dice",
    "IoU",
    "PearsonR",
    "PixelCounts",
    "PixelF1",
    "SensitivityAtSpecificity",
    "TargetColumn",
    "auc_per_class",
    "classification_metrics",
    "covid_index",
    "dice_per_image",
    "iou_per_image",
    "pearson_r",
    "pixel_counts",
    "pixel_f1",
    "regression_metrics",
    "regression_scores",
    "sensitivity_at_specificity",
]

"""Explainability and the shortcut measure.

* `gradcam`: Grad-CAM for the classifiers (nested backbones included) and any functional
  model; `make_cam_function` for SavedModel signatures.
* `localization`: pointing game, energy inside and thresholded IoU of a map against boxes,
  with centre-Gaussian and uniform baselines (numpy).
* `plots`: CAM overlays (one PNG per image, a grid of images x classes) and the peak location.
* `cross_source`: match a run's classes with another source's, ``--class-map`` parsing, the
  shortcut gap (internal minus external AUC).

Only `localization` and `cross_source` are imported eagerly; `gradcam` needs TensorFlow.
"""

from caaxr_tf.explain.cross_source import (
    ClassMatch,
    ClassMatchError,
    match_classes,
    parse_class_map,
    shortcut_gap,
    summarize_shortcut_gaps,
)
from caaxr_tf.explain.localization import (
    LocalizationScores,
    localization_scores,
    localization_table,
    score_explanations,
    table_from_scores,
)

__all__ = [
    "ClassMatch",
    "ClassMatchError",
    "LocalizationScores",
    "localization_scores",
    "localization_table",
    "match_classes",
    "parse_class_map",
    "score_explanations",
    "shortcut_gap",
    "summarize_shortcut_gaps",
    "table_from_scores",
]

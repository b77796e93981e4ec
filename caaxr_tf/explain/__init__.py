"""Explainability and the shortcut measure: Grad-CAM, localization scores, plots,
cross-source class matching."""

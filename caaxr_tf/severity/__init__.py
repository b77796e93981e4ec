"""Severity-score regression (Cohen et al. 2020, "Predicting COVID-19 Pneumonia Severity on
Chest X-ray with Deep Learning"): the published evaluation protocol and its pieces.

* `caaxr_tf.severity.splits`: grouped random half splits (NumPy only).
* `caaxr_tf.severity.protocol`: least squares per split, scores as mean ± std, the
  intercept-only baseline, tables; ``python -m caaxr_tf.severity.protocol`` prints the baseline.
* `caaxr_tf.severity.features`: feature matrices from trained classifiers and segmentation
  models (approach (a) of the paper).
* `caaxr_tf.severity.plots`: predicted vs true scatter plots.

The scores reader is `caaxr_tf.data.sources.covid_chestxray_severity`, the Keras metrics `caaxr_tf.metrics.regression`,
the regression models `caaxr_tf.models.regressor`. Submodules are imported explicitly, so the
split code stays free of TensorFlow.
"""

"""Calibration of predicted probabilities: reliability bins, ECE, Brier score, temperature scaling.

numpy/scipy only. Definitions:

* `reliability_bins(y_true, prob, n_bins, strategy)`: binary. ``strategy="uniform"``: equal-width
  bins on [0, 1]; ``"quantile"``: equal-mass bins (edges at the quantiles of ``prob``). A case
  goes to bin ``searchsorted(edges[1:-1], p)`` (left side), exactly as
  ``sklearn.calibration.calibration_curve``, whose ``(prob_true, prob_pred)`` are the
  ``fraction_positive`` / ``mean_predicted`` of the non-empty bins here.
* `expected_calibration_error`: ``sum_b n_b / N * |fraction_positive_b - mean_predicted_b|``
  over those bins.
* Multi-class (`calibration_report`): **top-label** calibration (confidence = the largest
  probability, outcome = the arg-max class is right) is the headline ``ece``; **one-vs-rest**
  per class (probability of the class against "is that class") is ``ece_per_class``.
* `brier_score`: multi-class Brier (1950): mean over cases of ``sum_c (p_c - y_c)^2`` (0..2);
  ``brier_per_class`` is the one-vs-rest ``mean (p_c - y_c)^2`` (= sklearn
  ``brier_score_loss`` of that class). For two columns the multi-class score is twice the
  binary one.
* `fit_temperature(logits, labels)`: ``T`` minimising the validation NLL of
  ``softmax(logits / T)``, searched on ``log T`` in ``[log 0.05, log 20]`` with scipy's bounded
  scalar minimiser. With probabilities only, pass ``log(p)`` (`logits_from_probabilities`):
  softmax of log-probabilities gives the probabilities back, so ``T = 1`` is the model as is.
  Dividing logits by ``T > 0`` keeps their order, so the arg-max class never changes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

STRATEGIES = ("uniform", "quantile")
DEFAULT_BINS = 10
TEMPERATURE_BOUNDS = (0.05, 20.0)
EPSILON = 1e-12


def _bin_ids(prob: np.ndarray, n_bins: int, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        edges = np.percentile(prob, np.linspace(0.0, 100.0, n_bins + 1))
    else:
        raise ValueError(f"unknown binning strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return np.searchsorted(edges[1:-1], prob), edges


def reliability_bins(y_true: Any, prob: Any, n_bins: int = DEFAULT_BINS, strategy: str = "uniform") -> dict[str, Any]:
    """Reliability-diagram bins of binary outcomes ``y_true`` (0/1) and probabilities ``prob``.

    Returns ``edges`` (n_bins + 1) and, per bin (empty ones included), ``count``,
    ``mean_predicted`` and ``fraction_positive`` (NaN for an empty bin).
    """
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    prob = np.asarray(prob, dtype=np.float64).reshape(-1)
    if y_true.shape != prob.shape:
        raise ValueError(f"{y_true.size} outcomes for {prob.size} probabilities")
    if prob.size and (prob.min() < 0 or prob.max() > 1):
        raise ValueError("probabilities must lie in [0, 1]")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    ids, edges = _bin_ids(prob, n_bins, strategy)
    count = np.bincount(ids, minlength=n_bins)
    sums = np.bincount(ids, weights=prob, minlength=n_bins)
    positives = np.bincount(ids, weights=y_true, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.where(count > 0, sums / np.maximum(count, 1), np.nan)
        fraction_positive = np.where(count > 0, positives / np.maximum(count, 1), np.nan)
    return {"strategy": strategy, "edges": edges.tolist(), "count": count.astype(int).tolist(),
            "mean_predicted": mean_predicted.tolist(), "fraction_positive": fraction_positive.tolist()}


def expected_calibration_error(y_true: Any, prob: Any, n_bins: int = DEFAULT_BINS, strategy: str = "uniform") -> float:
    """ECE of binary outcomes: bin-size-weighted mean ``|fraction positive - mean predicted|``."""
    bins = reliability_bins(y_true, prob, n_bins, strategy)
    count = np.asarray(bins["count"], dtype=np.float64)
    if count.sum() == 0:
        return float("nan")
    gap = np.abs(np.asarray(bins["fraction_positive"]) - np.asarray(bins["mean_predicted"]))
    keep = count > 0
    return float(np.sum(count[keep] * gap[keep]) / count.sum())


def _one_hot(labels: Any, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    return (labels[:, None] == np.arange(num_classes)[None, :]).astype(np.float64)


def top_label(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(correct, confidence)``: whether the arg-max class is right, and its probability."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    predicted = np.argmax(probs, axis=1)
    return (predicted == labels).astype(np.float64), probs[np.arange(len(probs)), predicted]


def brier_score(labels: Any, probs: Any) -> float:
    """Multi-class Brier score: mean over cases of ``sum_c (p_c - y_c)^2``."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[0] == 0:
        return float("nan")
    return float(np.mean(np.sum((probs - _one_hot(labels, probs.shape[1])) ** 2, axis=1)))


def brier_per_class(labels: Any, probs: Any, class_names: Sequence[str]) -> dict[str, float]:
    """One-vs-rest Brier score of each class (sklearn ``brier_score_loss`` of the column)."""
    probs = np.asarray(probs, dtype=np.float64)
    truth = _one_hot(labels, probs.shape[1])
    return {str(name): float(np.mean((probs[:, i] - truth[:, i]) ** 2)) for i, name in enumerate(class_names)}


def calibration_report(labels: Any, probs: Any, class_names: Sequence[str], n_bins: int = DEFAULT_BINS
                       ) -> dict[str, Any]:
    """Calibration of a classifier's probabilities ``[N, C]`` against integer labels.

    ``ece`` / ``ece_equal_mass``: top-label ECE with equal-width / equal-mass bins;
    ``ece_per_class``: one-vs-rest ECE of each class (equal-width); ``brier`` (multi-class) and
    ``brier_per_class``; ``nll`` (mean negative log-likelihood of the true class, probabilities
    clipped at 1e-12); ``reliability``: top-label equal-width bins (for the diagram) and
    ``reliability_per_class``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    correct, confidence = top_label(labels, probs)
    truth = _one_hot(labels, probs.shape[1])
    return {
        "multiclass": "top-label (headline ece) and one-vs-rest per class (ece_per_class)",
        "n_bins": n_bins,
        "ece": expected_calibration_error(correct, confidence, n_bins, "uniform"),
        "ece_equal_mass": expected_calibration_error(correct, confidence, n_bins, "quantile"),
        "ece_per_class": {str(name): expected_calibration_error(truth[:, i], np.clip(probs[:, i], 0, 1), n_bins)
                          for i, name in enumerate(class_names)},
        "brier": brier_score(labels, probs),
        "brier_per_class": brier_per_class(labels, probs, class_names),
        "nll": negative_log_likelihood(np.log(np.clip(probs, EPSILON, 1.0)), labels),
        "reliability": reliability_bins(correct, np.clip(confidence, 0, 1), n_bins, "uniform"),
        "reliability_per_class": {str(name): reliability_bins(truth[:, i], np.clip(probs[:, i], 0, 1), n_bins)
                                  for i, name in enumerate(class_names)},
    }


# --------------------------------------------------------------------------- #
# Temperature scaling
# --------------------------------------------------------------------------- #


def logits_from_probabilities(probs: Any) -> np.ndarray:
    """``log(p)`` (clipped at 1e-12): logits whose softmax is ``p`` again (rows summing to 1)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), EPSILON, 1.0))


def negative_log_likelihood(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean NLL of the true class under ``softmax(logits / temperature)``."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    log_p = log_softmax(logits / temperature, axis=1)
    return float(-np.mean(log_p[np.arange(len(labels)), labels]))


def fit_temperature(logits: Any, labels: Any, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` on (validation) data.

    Searched on ``log T`` within ``bounds`` (scipy ``minimize_scalar``, method ``bounded``,
    ``xatol`` 1e-6). ``T > 1`` softens overconfident probabilities, ``T < 1`` sharpens them.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if logits.ndim != 2 or logits.shape[0] != labels.size or labels.size == 0:
        raise ValueError(f"logits {logits.shape} do not match {labels.size} labels")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits must be finite")
    low, high = math.log(bounds[0]), math.log(bounds[1])
    found = minimize_scalar(lambda log_t: negative_log_likelihood(logits, labels, math.exp(log_t)),
                            bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(found.x))


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Probabilities ``softmax(logits / temperature)``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)

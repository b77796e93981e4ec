"""DeLong's test for correlated ROC AUCs (DeLong, DeLong & Clarke-Pearson 1988), computed with
the fast midrank algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21:1389).

numpy/scipy only. For ``k`` score vectors on the same ``m`` positive and ``n`` negative cases
the AUCs and their ``k x k`` covariance take O(k (m + n) log(m + n)) instead of the O(k m n)
of the structural-components construction. Ties count one half (as ``roc_auc_score``).

* `delong_covariance(y_true, scores)` -> ``(aucs [k], covariance [k, k])``
* `delong_test(y_true, score_a, score_b)`: both AUCs, their difference, its standard error,
  the (normal) confidence interval of the difference and the two-sided p-value of
  ``H0: AUC_a == AUC_b``.
* `delong_per_class(labels, scores_a, scores_b, class_names)`: the test per class, one-vs-rest.
* `delong_interval(y_true, score)`: DeLong confidence interval of one AUC (clipped to [0, 1]).

Cases are images: DeLong assumes independent cases, so for data with several images per
patient the patient-clustered `caaxr_tf.metrics.uncertainty.paired_bootstrap` is the check.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy.stats import norm, rankdata


def _binary(y_true: Any) -> np.ndarray:
    labels = np.asarray(y_true).reshape(-1)
    if labels.dtype == bool:
        return labels
    return labels.astype(np.float64) > 0.5


def delong_covariance(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of the rows of ``scores`` (``[k, N]`` or ``[N]``) and their DeLong covariance.

    Raises ``ValueError`` when the cases lack positives or negatives.
    """
    positive = _binary(y_true)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if scores.shape[1] != positive.size:
        raise ValueError(f"{scores.shape[1]} scores for {positive.size} labels")
    m, n = int(positive.sum()), int((~positive).sum())
    if m == 0 or n == 0:
        raise ValueError(f"DeLong needs positives and negatives; got {m} positive, {n} negative")
    pos, neg = scores[:, positive], scores[:, ~positive]
    tx = rankdata(pos, axis=1)  # midranks among the positives
    ty = rankdata(neg, axis=1)  # among the negatives
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # among all cases
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: share of negatives scored below (ties 1/2)
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives scored above
    k = scores.shape[0]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((k, k))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((k, k))
    return aucs, s10 / m + s01 / n


def delong_test(y_true: Any, score_a: Any, score_b: Any, confidence: float = 0.95) -> dict[str, Any]:
    """DeLong's test of two correlated AUCs on the same cases (two-sided).

    Returns ``auc_a``, ``auc_b``, ``difference`` (a - b), ``se``, ``low``/``high`` (normal
    interval of the difference), ``z``, ``p_value``, ``n_positive``, ``n_negative``. Two
    identical score vectors give difference 0, se 0 and p-value 1.
    """
    aucs, cov = delong_covariance(y_true, np.vstack([np.asarray(score_a, np.float64).reshape(-1),
                                                     np.asarray(score_b, np.float64).reshape(-1)]))
    difference = float(aucs[0] - aucs[1])
    variance = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = math.sqrt(max(variance, 0.0))
    quantile = float(norm.ppf(0.5 + confidence / 2.0))
    if se > 0:
        z = difference / se
        p_value = float(2.0 * norm.sf(abs(z)))
    else:
        z, p_value = (0.0, 1.0) if difference == 0 else (math.copysign(math.inf, difference), 0.0)
    positive = _binary(y_true)
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": difference, "se": se,
            "low": difference - quantile * se, "high": difference + quantile * se, "z": float(z),
            "p_value": p_value, "confidence": confidence,
            "n_positive": int(positive.sum()), "n_negative": int((~positive).sum())}


def delong_interval(y_true: Any, score: Any, confidence: float = 0.95) -> dict[str, float]:
    """One AUC with its DeLong standard error and normal interval (clipped to [0, 1])."""
    aucs, cov = delong_covariance(y_true, np.asarray(score, np.float64).reshape(1, -1))
    se = math.sqrt(max(float(cov[0, 0]), 0.0))
    quantile = float(norm.ppf(0.5 + confidence / 2.0))
    auc = float(aucs[0])
    return {"auc": auc, "se": se, "low": max(0.0, auc - quantile * se), "high": min(1.0, auc + quantile * se)}


def delong_per_class(labels: Any, scores_a: Any, scores_b: Any, class_names: Sequence[str],
                     confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """`delong_test` of every class, one-vs-rest (``labels``: integer class per case).

    A class without positives or negatives gets ``{"error": ...}`` instead of numbers.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    result: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(class_names):
        try:
            result[str(name)] = delong_test(labels == index, scores_a[:, index], scores_b[:, index], confidence)
        except ValueError as error:
            result[str(name)] = {"error": str(error)}
    return result

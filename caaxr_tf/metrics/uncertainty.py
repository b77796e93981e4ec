"""Uncertainty of evaluation metrics: patient-clustered bootstrap and paired comparisons.

numpy only (no TensorFlow). Every interval is a percentile interval of a nonparametric
bootstrap in which the *patient* is the resampled unit: a resample draws as many patients as
the data has, with replacement, and every image of a drawn patient comes along (as many times
as the patient is drawn). Images of one patient are correlated, so resampling images would
understate the spread; with one image per patient the two schemes are the same.

* `bootstrap(metric, y_true, y_score, groups=...)`: intervals of any metric
  ``metric(y_true, y_score, **kwargs) -> float | dict`` (nested dicts are flattened with
  ``/``, e.g. ``auc_per_class/covid``). A resample where a value is undefined (NaN, inf, None
  or the metric raises ``ValueError``, e.g. only one class drawn) is skipped *for that value*;
  ``n_used`` says how many resamples gave it.
* `paired_bootstrap(metric, y_true, score_a, score_b, groups=...)`: the same resamples for two
  models scored on the same images; intervals of ``metric(a) - metric(b)`` and a two-sided
  bootstrap p-value.
* `format_interval(0.912, 0.871, 0.948)` -> ``"0.912 [0.871, 0.948]"``.

Resamples come from ``numpy.random.default_rng(seed)``: the same seed, data and metric give
the same intervals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0

Metric = Callable[..., Any]


@dataclass(frozen=True)
class Interval:
    """A point estimate (on the full data) and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    n_used: int  # resamples in which the value was defined
    n_resamples: int
    confidence: float = DEFAULT_CONFIDENCE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return format_interval(self.estimate, self.low, self.high)


def format_interval(estimate: float | None, low: float | None, high: float | None, digits: int = 3) -> str:
    """``"0.912 [0.871, 0.948]"``; undefined numbers print as ``n/a``."""

    def text(value: float | None) -> str:
        if value is None or not math.isfinite(float(value)):
            return "n/a"
        return f"{float(value):.{digits}f}"

    return f"{text(estimate)} [{text(low)}, {text(high)}]"


def flatten(value: Any, prefix: str = "") -> dict[str, float]:
    """A metric's result as ``{name: float}``; nested dicts joined with ``/``, a bare number is
    ``{"": value}``; non-numeric entries (lists, strings) are left out."""
    if isinstance(value, Mapping):
        flat: dict[str, float] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}/{key}" if prefix else str(key)))
        return flat
    if value is None:
        return {prefix: float("nan")}
    if isinstance(value, (bool, np.bool_)):
        return {}
    if isinstance(value, (int, float, np.integer, np.floating)) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return {prefix: float(value)}
    return {}


def _evaluate(metric: Metric, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, float]:
    try:
        return flatten(metric(*args, **kwargs))
    except ValueError:  # undefined on this resample (e.g. one class only)
        return {}


def _group_index(groups: Sequence[Any] | None, n: int) -> list[np.ndarray]:
    """Image indices of each patient (each image its own patient when ``groups`` is None)."""
    if groups is None:
        return [np.array([i]) for i in range(n)]
    groups = np.asarray(groups)
    if groups.shape[0] != n:
        raise ValueError(f"{groups.shape[0]} group ids for {n} images")
    _, first, inverse = np.unique(groups.astype(str), return_index=True, return_inverse=True)
    # patients numbered in order of first appearance: with one image each, patient k is image k
    inverse = np.argsort(np.argsort(first, kind="stable"), kind="stable")[inverse.reshape(-1)]
    order = np.argsort(inverse, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(inverse))]
    return [order[bounds[k]:bounds[k + 1]] for k in range(len(bounds) - 1)]


def resample_indices(groups: Sequence[Any] | None, n: int, n_resamples: int, seed: int | np.random.Generator = DEFAULT_SEED
                     ) -> Iterator[np.ndarray]:
    """Image indices of each patient-clustered resample (``groups``: the patient id of each image)."""
    members = _group_index(groups, n)
    sizes = np.array([len(m) for m in members])
    flat = np.concatenate(members) if members else np.zeros(0, dtype=np.int64)
    starts = np.r_[0, np.cumsum(sizes)[:-1]] if members else np.zeros(0, dtype=np.int64)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    for _ in range(n_resamples):
        drawn = rng.integers(0, len(members), size=len(members))
        counts = sizes[drawn]
        # the images of each drawn patient: start + 0 .. size-1
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        yield flat[np.repeat(starts[drawn], counts) + offsets]


def _take(array: Any, index: np.ndarray) -> Any:
    return None if array is None else np.asarray(array)[index]


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    alpha = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [alpha, 100.0 - alpha])
    return float(low), float(high)


def _collect(samples: list[dict[str, float]], keys: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    for key in keys:
        values = np.array([s.get(key, np.nan) for s in samples], dtype=np.float64)
        out[key] = values[np.isfinite(values)]
    return out


def bootstrap(
    metric: Metric,
    y_true: Any,
    y_score: Any,
    *,
    groups: Sequence[Any] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int | np.random.Generator = DEFAULT_SEED,
    **kwargs: Any,
) -> dict[str, Interval]:
    """Patient-clustered bootstrap intervals of ``metric(y_true, y_score, **kwargs)``.

    ``groups`` is the patient id of each image (None: every image its own patient). Returns
    ``{name: Interval}`` for each value of the metric (a bare number is named ``""``); values
    undefined on the full data get ``estimate`` NaN but still an interval when resamples define
    them. ``n_used`` below ``n_resamples`` means some resamples left the value undefined.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    n = y_true.shape[0]
    if y_score.shape[0] != n:
        raise ValueError(f"{n} labels but {y_score.shape[0]} scores")
    point = _evaluate(metric, (y_true, y_score), kwargs)
    samples = [_evaluate(metric, (y_true[i], y_score[i]), kwargs)
               for i in resample_indices(groups, n, n_resamples, seed)]
    keys = list(point) + sorted({k for s in samples for k in s} - set(point))
    values = _collect(samples, keys)
    result = {}
    for key in keys:
        low, high = _percentiles(values[key], confidence)
        result[key] = Interval(point.get(key, float("nan")), low, high, int(values[key].size), n_resamples, confidence)
    return result


def fold_mean_bootstrap(
    metric: Metric,
    folds: Sequence[tuple[Any, Any, Sequence[Any]]],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int | np.random.Generator = DEFAULT_SEED,
    **kwargs: Any,
) -> dict[str, Interval]:
    """Interval of the **mean over folds** of ``metric`` (the CV table's mean row).

    ``folds``: ``(y_true, y_score, groups)`` of each fold's test images. One resample draws
    patients from all the folds' test patients together (numbered by first appearance, fold by
    fold) and each fold is scored on the images of the drawn patients it tests; the resample's
    value is the mean over folds. The folds of a protocol with a fixed test split test the same
    patients, so the draw is shared and the interval covers the test sampling of the mean.
    With one fold this is `bootstrap` exactly (same draws). A value undefined in any fold of a
    resample is skipped for that resample.
    """
    if not folds:
        raise ValueError("no folds")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    numbers: dict[str, int] = {}
    for _, _, groups in folds:
        for patient in np.asarray(groups).astype(str):
            numbers.setdefault(str(patient), len(numbers))
    members = []
    for y_true, _, groups in folds:
        ids = np.array([numbers[str(p)] for p in np.asarray(groups).astype(str)], dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        bounds = np.searchsorted(ids[order], np.arange(len(numbers) + 1))
        members.append([order[bounds[k]:bounds[k + 1]] for k in range(len(numbers))])

    def mean_over_folds(indices: Sequence[np.ndarray | None]) -> dict[str, float]:
        values = [_evaluate(metric, (np.asarray(t) if i is None else np.asarray(t)[i],
                                     np.asarray(s) if i is None else np.asarray(s)[i]), kwargs)
                  for (t, s, _), i in zip(folds, indices)]
        keys = set(values[0]).intersection(*values[1:])
        return {k: float(np.mean([v[k] for v in values])) for k in values[0] if k in keys
                and all(math.isfinite(v[k]) for v in values)}

    point = mean_over_folds([None] * len(folds))
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    samples = []
    for _ in range(n_resamples):
        drawn = rng.integers(0, len(numbers), size=len(numbers))
        samples.append(mean_over_folds([np.concatenate([fold[k] for k in drawn]) for fold in members]))
    keys = list(point) + sorted({k for s in samples for k in s} - set(point))
    values = _collect(samples, keys)
    return {key: Interval(point.get(key, float("nan")), *_percentiles(values[key], confidence), int(values[key].size),
                          n_resamples, confidence) for key in keys}


def paired_bootstrap(
    metric: Metric,
    y_true: Any,
    score_a: Any,
    score_b: Any,
    *,
    groups: Sequence[Any] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int | np.random.Generator = DEFAULT_SEED,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Difference ``metric(a) - metric(b)`` of two models on the same images, patient-clustered.

    Both models are scored on the *same* resample each time. Returns per value name:
    ``a``, ``b``, ``difference`` (full data), ``low``/``high`` (percentile interval of the
    difference), ``p_value`` (two-sided: ``min(1, 2 * min(P*(d <= 0), P*(d >= 0)))`` over the
    resamples, at least ``1 / n_used``), ``n_used`` and ``n_resamples``.
    """
    y_true, score_a, score_b = np.asarray(y_true), np.asarray(score_a), np.asarray(score_b)
    n = y_true.shape[0]
    if score_a.shape != score_b.shape or score_a.shape[0] != n:
        raise ValueError(f"score shapes {score_a.shape} and {score_b.shape} for {n} labels")
    point_a = _evaluate(metric, (y_true, score_a), kwargs)
    point_b = _evaluate(metric, (y_true, score_b), kwargs)
    diffs: dict[str, list[float]] = {key: [] for key in point_a}
    for index in resample_indices(groups, n, n_resamples, seed):
        a = _evaluate(metric, (y_true[index], score_a[index]), kwargs)
        b = _evaluate(metric, (y_true[index], score_b[index]), kwargs)
        for key in diffs:
            d = a.get(key, np.nan) - b.get(key, np.nan)
            if math.isfinite(d):
                diffs[key].append(d)
    result = {}
    for key, values in diffs.items():
        values_np = np.asarray(values)
        low, high = _percentiles(values_np, confidence)
        if values_np.size:
            tail = min(np.mean(values_np <= 0), np.mean(values_np >= 0))
            p_value = float(min(1.0, max(2.0 * tail, 1.0 / values_np.size)))
        else:
            p_value = float("nan")
        a, b = point_a.get(key, float("nan")), point_b.get(key, float("nan"))
        result[key] = {"a": a, "b": b, "difference": a - b, "low": low, "high": high, "p_value": p_value,
                       "n_used": int(values_np.size), "n_resamples": n_resamples, "confidence": confidence}
    return result


def intervals_as_dict(intervals: Mapping[str, Interval]) -> dict[str, dict[str, Any]]:
    """JSON-ready ``{name: {estimate, low, high, n_used, n_resamples, confidence}}``."""
    return {key: value.as_dict() for key, value in intervals.items()}

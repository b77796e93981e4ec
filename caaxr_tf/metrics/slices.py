"""Metrics per subgroup ("slice") of the test images: source, view, sex, age band, ...

numpy only. `slice_metrics(metric, y_true, y_score, metadata, by=[...])` scores ``metric`` on
the images of each value of each metadata column, with the number of images and patients and
a patient-clustered bootstrap interval (`caaxr_tf.metrics.uncertainty.bootstrap`). A slice
with fewer than ``min_n`` images is listed (``scored: false`` and why) but not scored; so is a
slice where the metric is undefined (e.g. one class only). Missing metadata (empty string,
None, NaN) is its own slice, ``"(missing)"``. `age_bands` turns ages into bands
(``"<40"``, ``"40-59"``, ``"60-79"``, ``">=80"`` by default).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from caaxr_tf.metrics.uncertainty import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap, flatten

MISSING = "(missing)"
DEFAULT_MIN_N = 20
AGE_EDGES = (40, 60, 80)


def _text(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float) and math.isnan(value):
        return MISSING
    text = str(value).strip()
    return text if text and text.lower() not in ("nan", "none") else MISSING


def age_bands(ages: Sequence[Any], edges: Sequence[float] = AGE_EDGES) -> list[str]:
    """Age bands of each age (``"<40"``, ``"40-59"``, ..., ``">=80"``); unreadable ages are missing."""
    edges = list(edges)
    names = [f"<{edges[0]:g}"] + [f"{a:g}-{b - 1:g}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]:g}"]
    out = []
    for age in ages:
        try:
            value = float(age)
        except (TypeError, ValueError):
            out.append(MISSING)
            continue
        out.append(MISSING if not math.isfinite(value) else names[int(np.searchsorted(edges, value, side="right"))])
    return out


def slice_metrics(
    metric: Callable[..., Any],
    y_true: Any,
    y_score: Any,
    metadata: Mapping[str, Sequence[Any]],
    by: Sequence[str],
    *,
    groups: Sequence[Any] | None = None,
    min_n: int = DEFAULT_MIN_N,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """One row per (column, value): ``column``, ``value``, ``n``, ``n_patients``, ``scored`` and,
    when scored, ``metrics`` ``{name: {estimate, low, high, n_used, n_resamples, confidence}}``;
    otherwise ``reason``. ``n_resamples=0`` gives point estimates only (low/high NaN).
    Rows are ordered by column (as in ``by``) then value.
    """
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    n = y_true.shape[0]
    patient = None if groups is None else np.asarray(groups).astype(str)
    rows = []
    for column in by:
        if column not in metadata:
            raise KeyError(f"no metadata column {column!r}; known: {', '.join(sorted(metadata)) or 'none'}")
        values = np.array([_text(v) for v in metadata[column]], dtype=object)
        if values.size != n:
            raise ValueError(f"metadata column {column!r} has {values.size} values for {n} images")
        for value in sorted(set(values.tolist())):
            index = np.flatnonzero(values == value)
            row: dict[str, Any] = {"column": column, "value": value, "n": int(index.size),
                                   "n_patients": int(index.size if patient is None else len(set(patient[index])))}
            if index.size < min_n:
                row.update(scored=False, reason=f"fewer than {min_n} images")
                rows.append(row)
                continue
            sub_groups = None if patient is None else patient[index]
            if n_resamples > 0:
                intervals = bootstrap(metric, y_true[index], y_score[index], groups=sub_groups, n_resamples=n_resamples,
                                      confidence=confidence, seed=seed, **kwargs)
                scored = {k: v.as_dict() for k, v in intervals.items()}
            else:
                try:
                    point = flatten(metric(y_true[index], y_score[index], **kwargs))
                except ValueError:
                    point = {}
                scored = {k: {"estimate": v, "low": float("nan"), "high": float("nan"), "n_used": 0,
                              "n_resamples": 0, "confidence": confidence} for k, v in point.items()}
            if not any(math.isfinite(v["estimate"]) for v in scored.values()):
                row.update(scored=False, reason="metric undefined on this slice (e.g. one class only)")
            else:
                row.update(scored=True, metrics=scored)
            rows.append(row)
    return rows

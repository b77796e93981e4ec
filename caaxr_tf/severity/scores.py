"""Scores of the severity protocol shared by its runner and its plots: the metric titles and
the mean ± std of a score over splits (moved from ``caaxr_tf.severity.protocol``, which
re-exports them, so that ``severity.plots`` no longer imports the protocol runner)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


METRIC_TITLES = {"mae": "MAE", "mse": "MSE", "r2": "R²", "pearson_r": "r"}


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample std (n - 1) of the defined values; ``count`` of them (NaN left out)."""

    mean: float
    std: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "MeanStd":
        finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
        mean = float(finite.mean()) if finite.size else float("nan")
        std = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
        return cls(mean, std, int(finite.size))

    def __str__(self) -> str:
        if not self.count:
            return "–"
        return f"{self.mean:.2f}" if self.count == 1 else f"{self.mean:.2f} ± {self.std:.2f}"

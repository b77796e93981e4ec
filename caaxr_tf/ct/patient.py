"""The patient rule of Rahimzadeh et al. (2021): from per-slice decisions to one verdict.

Every selected slice of a patient is classified; the patient is COVID-19

* threshold 1: when at least one selected slice is COVID (count > 0);
* threshold 2: when at least a tenth of the selected slices are COVID (count >= 0.1 x selected).

The share is compared in exact integer arithmetic (``10 * covid >= selected``), which gives
the published ``covid >= 0.1 * selected`` for every count. A patient with no selected slice
has no evidence and is normal under both thresholds (the published ``0 >= 0.1 * 0`` would
call it COVID).

A slice probability counts as COVID when it is >= 0.5: with two softmax outputs this is the
published ``argmax`` with the COVID class at index 0 (``argmax`` takes the first of a tie).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np

COVID_SHARE = Fraction(1, 10)
PROBABILITY_THRESHOLD = 0.5


@dataclass(frozen=True)
class PatientDecision:
    """Both verdicts for one patient and what they were computed from.

    Attributes:
        selected: number of slices classified (the slices kept by selection).
        covid_slices: how many of them were classified COVID.
        covid_indices: positions (within the classified slices) of the COVID slices.
        covid_threshold1: ``covid_slices > 0``.
        covid_threshold2: ``covid_slices >= 0.1 * selected`` (and ``selected > 0``).
    """

    selected: int
    covid_slices: int
    covid_indices: tuple[int, ...]
    covid_threshold1: bool
    covid_threshold2: bool

    @property
    def covid_share(self) -> float:
        return self.covid_slices / self.selected if self.selected else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "selected": self.selected,
            "covid_slices": self.covid_slices,
            "covid_indices": list(self.covid_indices),
            "covid_threshold1": self.covid_threshold1,
            "covid_threshold2": self.covid_threshold2,
        }


def slice_is_covid(
    values: Sequence[bool] | Sequence[float] | np.ndarray,
    probability_threshold: float = PROBABILITY_THRESHOLD,
) -> np.ndarray:
    """Per-slice COVID flags from booleans, or from COVID probabilities (>= threshold)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"expected one value per slice (a 1-D sequence), got shape {array.shape}")
    if array.dtype == bool:
        return array
    if array.size and not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"expected booleans or probabilities, got dtype {array.dtype}")
    probabilities = array.astype(np.float64)
    if np.any(~np.isfinite(probabilities)) or np.any((probabilities < 0) | (probabilities > 1)):
        raise ValueError("COVID probabilities must be finite and within 0..1")
    return probabilities >= probability_threshold


def decide_patient(
    covid: Sequence[bool] | Sequence[float] | np.ndarray,
    *,
    probability_threshold: float = PROBABILITY_THRESHOLD,
    share: Fraction | float = COVID_SHARE,
) -> PatientDecision:
    """Apply both patient thresholds to the decisions on a patient's selected slices.

    Args:
        covid: one entry per selected slice: booleans (slice classified COVID), or the
            COVID probability of each slice.
        probability_threshold: a probability at or above it is a COVID slice.
        share: the fraction of COVID slices threshold 2 asks for (1/10 in the paper);
            a float is read as the decimal it is written as (0.1 -> 1/10).
    """
    flags = slice_is_covid(covid, probability_threshold)
    fraction = Fraction(str(share)) if isinstance(share, float) else Fraction(share)
    if not 0 <= fraction <= 1:
        raise ValueError(f"share must lie in 0..1, got {share}")
    selected = int(flags.size)
    count = int(np.count_nonzero(flags))
    return PatientDecision(
        selected=selected,
        covid_slices=count,
        covid_indices=tuple(int(i) for i in np.flatnonzero(flags)),
        covid_threshold1=count > 0,
        covid_threshold2=selected > 0 and count * fraction.denominator >= fraction.numerator * selected,
    )

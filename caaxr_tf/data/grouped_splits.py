"""Random half splits grouped by patient, as in Cohen et al. 2020.

The published evaluation draws split ``s`` (``s = 0 .. 49``) with scikit-learn's
``GroupShuffleSplit(train_size=0.5, test_size=0.5, random_state=s)`` over the integer
``patientid`` column (torchxrayvision, ``scripts/covid-severity/xray_covid_eval.ipynb``).
That is: sort the distinct patient ids, permute them with ``numpy.random.RandomState(s)``,
put the first ``ceil(G / 2)`` patients in the test half and the next ``floor(G / 2)`` in the
training half. `grouped_half_splits` does exactly this without scikit-learn, so the splits
do not depend on its version (NumPy guarantees the ``RandomState`` stream).

Patient ids are ordered as numbers when every id is a decimal integer (the authors' ids were
read as integers, and ``"12" < "2"`` as text would give other splits), otherwise as text.
An integer id names its patient by its value, as when read as an integer: ``"2"``, ``"02"``
and ``"+2"`` are one patient (`patient_key`), so the order never depends on ties (nor on the
process's hash seed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_NUM_SPLITS = 50
_INTEGER = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class HalfSplit:
    """One split: sample indices (ascending) of the training and test halves."""

    seed: int
    train: np.ndarray
    test: np.ndarray


def patient_key(group: str | int) -> str:
    """The patient a group id names: a decimal integer id as its value in plain decimal
    (``"02"``, ``"+2"``, ``" 2"`` -> ``"2"``), any other id stripped of surrounding spaces."""
    text = str(group).strip()
    return str(int(text)) if _is_integer(text) else text


def ordered_groups(groups: Sequence[str | int]) -> list[str]:
    """The distinct patients (`patient_key`), in numeric order when all are integers, else
    text order; distinct keys never tie, so the order is the same in every process."""
    distinct = {patient_key(group) for group in groups}
    if all(_is_integer(group) for group in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _is_integer(text: str) -> bool:
    return _INTEGER.fullmatch(text) is not None


def grouped_half_split(groups: Sequence[str | int], seed: int) -> HalfSplit:
    """Split sample indices into two halves of patients; no patient is in both.

    The test half holds ``ceil(G / 2)`` of the ``G`` patients, the training half the rest.
    """
    labels = [patient_key(group) for group in groups]
    order = ordered_groups(labels)
    if len(order) < 2:
        raise ValueError(f"a half split needs at least 2 groups, got {len(order)}")
    index_of = {group: i for i, group in enumerate(order)}
    group_index = np.array([index_of[label] for label in labels], dtype=np.int64)
    num_test = -(-len(order) // 2)
    permutation = np.random.RandomState(seed).permutation(len(order))
    test_groups, train_groups = permutation[:num_test], permutation[num_test:]
    return HalfSplit(
        seed=int(seed),
        train=np.flatnonzero(np.isin(group_index, train_groups)),
        test=np.flatnonzero(np.isin(group_index, test_groups)),
    )


def grouped_half_splits(
    groups: Sequence[str | int], num_splits: int = DEFAULT_NUM_SPLITS, first_seed: int = 0
) -> list[HalfSplit]:
    """``num_splits`` splits with seeds ``first_seed .. first_seed + num_splits - 1``."""
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return [grouped_half_split(groups, seed) for seed in range(first_seed, first_seed + num_splits)]

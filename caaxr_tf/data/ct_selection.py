"""CT slice selection (Rahimzadeh et al. 2021): keep the slices of a sequence whose lung is open.

In every slice of one sequence (one series of one patient) the *dark* pixels, raw value
``< 300``, are counted inside a fixed region: rows 240..339 and columns 120..369 of a 512x512
slice (25,000 pixels, the middle of the lungs). Over the sequence

    threshold = (max count - min count) / 1.5

and a slice is kept when its count is strictly greater than the threshold. Raw values are the
scanner's stored values, HU + 1024 for COVID-CTset (RescaleIntercept -1024); DICOM series are
brought to the same scale by ``caaxr_tf.data.ct_series``.

The comparison is done in integers (``3 * count > 2 * (max - min)``), which is what the
published float code computes too: ``(max - min) / 1.5`` is exact whenever it is a whole
number, so ties at the threshold are decided the same way (not kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

SLICE_SHAPE = (512, 512)
REGION_ROWS = (240, 340)  # end-exclusive
REGION_COLS = (120, 370)  # end-exclusive
REGION_PIXELS = (REGION_ROWS[1] - REGION_ROWS[0]) * (REGION_COLS[1] - REGION_COLS[0])
DARK_BELOW = 300
THRESHOLD_DIVISOR = 1.5
MIN_SLICES = 2


@dataclass(frozen=True)
class SliceSelection:
    """The outcome of selection over one sequence.

    Attributes:
        counts: dark pixels in the region, one per slice, in sequence order (int64).
        threshold: ``(max - min) / 1.5`` over ``counts``.
        kept: ``counts > threshold``, one flag per slice.
    """

    counts: np.ndarray
    threshold: float
    kept: np.ndarray

    @property
    def total(self) -> int:
        return int(self.counts.size)

    @property
    def num_kept(self) -> int:
        return int(np.count_nonzero(self.kept))

    @property
    def kept_indices(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.kept)]


def _check_slice(pixels: np.ndarray, index: int | None = None) -> None:
    where = "" if index is None else f"slice {index}: "
    if pixels.ndim != 2 or tuple(pixels.shape) != SLICE_SHAPE:
        raise ValueError(f"{where}expected a {SLICE_SHAPE[0]}x{SLICE_SHAPE[1]} slice, got shape {pixels.shape}")


def dark_pixel_counts(slices: np.ndarray) -> np.ndarray:
    """Dark-pixel counts (raw value < 300 inside the selection region) of ``[n, 512, 512]``
    slices, int64 ``[n]``. The one counting rule: every path (arrays, one slice at a time, the
    patient pipeline of ``caaxr_tf.ct.patients``) counts through it."""
    slices = np.asarray(slices)
    if slices.ndim != 3 or tuple(slices.shape[1:]) != SLICE_SHAPE:
        raise ValueError(f"expected [S, {SLICE_SHAPE[0]}, {SLICE_SHAPE[1]}] slices, got shape {slices.shape}")
    region = slices[:, REGION_ROWS[0]:REGION_ROWS[1], REGION_COLS[0]:REGION_COLS[1]]
    return np.count_nonzero(region < DARK_BELOW, axis=(1, 2)).astype(np.int64)


def count_dark_pixels(pixels: np.ndarray) -> int:
    """Pixels with raw value < 300 inside the selection region of one 512x512 slice."""
    pixels = np.asarray(pixels)
    _check_slice(pixels)
    return int(dark_pixel_counts(pixels[None])[0])


def select_from_counts(counts: Iterable[int]) -> SliceSelection:
    """Threshold and kept flags from the dark-pixel counts of one sequence.

    Raises:
        ValueError: fewer than two slices (the threshold compares the slices of a sequence;
            one slice alone always gets threshold 0) or a count outside 0..25,000.
    """
    values = np.asarray(list(counts), dtype=np.int64).reshape(-1)
    if values.size < MIN_SLICES:
        raise ValueError(
            f"a sequence needs at least {MIN_SLICES} slices for selection, got {values.size}"
        )
    if values.min() < 0 or values.max() > REGION_PIXELS:
        raise ValueError(f"dark-pixel counts must lie in 0..{REGION_PIXELS}")
    spread = int(values.max() - values.min())
    kept = 3 * values > 2 * spread  # count > spread / 1.5, in integers
    return SliceSelection(counts=values, threshold=spread / THRESHOLD_DIVISOR, kept=kept)


def select_slices(slices: np.ndarray | Iterable[np.ndarray]) -> SliceSelection:
    """Select the open-lung slices of one sequence.

    Args:
        slices: a ``[S, 512, 512]`` array of raw values (any integer or float type) or an
            iterable of ``[512, 512]`` arrays in sequence order. An iterable is consumed one
            slice at a time and only the counts are kept, so a generator that reads files
            needs memory for one slice, not the sequence.

    Raises:
        ValueError: a slice that is not 512x512, or fewer than two slices.
    """
    if isinstance(slices, np.ndarray):
        return select_from_counts(dark_pixel_counts(slices))
    counts = []
    for index, pixels in enumerate(slices):
        pixels = np.asarray(pixels)
        _check_slice(pixels, index)
        counts.append(count_dark_pixels(pixels))
    return select_from_counts(counts)

"""Anchor boxes over the feature pyramid.

Level `k` has stride `image / feature size` and one anchor size; every cell
gets one anchor per aspect ratio (`ratio = height / width`, area kept), centred
on the cell centre. The order, row by row, then column, then ratio, is the
order in which the RPN head's outputs are flattened.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def level_anchors(
    feature_size: tuple[int, int],
    image_size: tuple[int, int],
    size: float,
    ratios: Sequence[float],
) -> np.ndarray:
    """Anchors of one level, `[h * w * len(ratios), 4]` normalised (ymin, xmin, ymax, xmax)."""
    feat_h, feat_w = feature_size
    image_h, image_w = image_size
    stride_y, stride_x = image_h / feat_h, image_w / feat_w
    ratios = np.asarray(ratios, np.float64)
    half_h = 0.5 * size * np.sqrt(ratios)  # [R]
    half_w = 0.5 * size / np.sqrt(ratios)
    cy = (np.arange(feat_h) + 0.5) * stride_y
    cx = (np.arange(feat_w) + 0.5) * stride_x
    cy, cx = np.meshgrid(cy, cx, indexing="ij")  # [h, w]
    cy, cx = cy[..., None], cx[..., None]  # [h, w, 1]
    anchors = np.stack([cy - half_h, cx - half_w, cy + half_h, cx + half_w], axis=-1)  # [h, w, R, 4]
    anchors /= np.array([image_h, image_w, image_h, image_w], np.float64)
    return anchors.reshape(-1, 4).astype(np.float32)


def pyramid_anchors(
    feature_sizes: Sequence[tuple[int, int]],
    image_size: tuple[int, int],
    sizes: Sequence[float],
    ratios: Sequence[float],
) -> np.ndarray:
    """Anchors of every level, concatenated from the finest level up: `[A, 4]`."""
    if len(feature_sizes) != len(sizes):
        raise ValueError(f"{len(feature_sizes)} pyramid levels but {len(sizes)} anchor sizes")
    return np.concatenate(
        [level_anchors(fs, image_size, size, ratios) for fs, size in zip(feature_sizes, sizes)], axis=0
    )

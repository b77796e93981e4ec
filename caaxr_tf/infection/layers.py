"""The detection rule of caaxr_tf/infection/maps.py as a Keras layer, for exported models.

``InfectionDetection`` takes the infection map ``[N, H, W, 1]`` (and optionally a lung mask or
lung probability map of the same shape) and returns, in this order:

* ``infection_map``: the map, set to 0 outside the lungs when lungs are given;
* ``infected_pixels``: float32 ``[N]``, pixels of the (restricted) map ``>= threshold``;
* ``covid``: float32 ``[N]``, 1.0 when ``infected_pixels >= min_pixels``.

The values equal `restrict_to_lungs`, `infected_pixel_count` and `detect_covid` (tested), so a
served model and the offline evaluation agree.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from caaxr_tf.infection.maps import DEFAULT_MIN_PIXELS, DEFAULT_THRESHOLD

PACKAGE = "caaxr_tf"


@keras.saving.register_keras_serializable(package=PACKAGE)
class InfectionDetection(keras.layers.Layer):
    """``maps`` or ``[maps, lungs]`` -> ``(infection_map, infected_pixels, covid)`` (see module doc)."""

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        lung_threshold: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if min_pixels < 1:
            raise ValueError(f"min_pixels must be at least 1, got {min_pixels}")
        self.threshold = float(threshold)
        self.min_pixels = int(min_pixels)
        self.lung_threshold = float(lung_threshold)

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            maps, lungs = inputs
            maps = ops.cast(maps, "float32")
            maps = ops.where(ops.cast(lungs, "float32") >= self.lung_threshold, maps, 0.0)
        else:
            maps = ops.cast(inputs, "float32")
        infected = ops.sum(ops.cast(maps >= self.threshold, "float32"), axis=(1, 2, 3))
        covid = ops.cast(infected >= float(self.min_pixels), "float32")
        return maps, infected, covid

    def compute_output_shape(self, input_shape):
        nested = bool(input_shape) and isinstance(input_shape[0], (list, tuple))
        map_shape = tuple(input_shape[0] if nested else input_shape)
        if len(map_shape) != 4:
            raise ValueError(f"InfectionDetection expects maps [N, H, W, C], got shape {map_shape}")
        return map_shape, (map_shape[0],), (map_shape[0],)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "threshold": self.threshold,
            "min_pixels": self.min_pixels,
            "lung_threshold": self.lung_threshold,
        }

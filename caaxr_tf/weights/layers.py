"""Layers that carry an imported network's input and output contract into the Keras model.

* `PixelNormalization`: ``(x - mean) / std`` per channel, in the units of the raw 0..255
  pixels the CAAXR models take. ImageNet ``torch`` preprocessing is mean ``255 * (0.485, ...)``,
  std ``255 * (0.229, ...)``; torchxrayvision's ``normalize(img, 255)`` (0..255 to
  [-1024, 1024]) is mean 127.5, std 127.5 / 1024.
* `OperatingPointCalibration`: torchxrayvision's ``op_norm``: sigmoid probabilities mapped so
  that each class's operating point (``op_threshs``) lands on 0.5; classes whose threshold is
  NaN output 0.5.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

PACKAGE = "caaxr_weights"


@keras.saving.register_keras_serializable(package=PACKAGE)
class PixelNormalization(keras.layers.Layer):
    def __init__(self, mean: Sequence[float], std: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean {self.mean} and std {self.std} must have the same, non-zero length")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        mean = ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
        std = ops.convert_to_tensor(self.std, dtype=self.compute_dtype)
        return (x - mean) / std

    def compute_output_shape(self, input_shape):
        if input_shape[-1] not in (None, len(self.mean)) and len(self.mean) != 1:
            raise ValueError(f"PixelNormalization has {len(self.mean)} channels, input shape {input_shape}")
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mean": self.mean, "std": self.std}


@keras.saving.register_keras_serializable(package=PACKAGE)
class OperatingPointCalibration(keras.layers.Layer):
    """torchxrayvision ``op_norm`` on probabilities ``[N, C]`` (``thresholds`` of length C)."""

    def __init__(self, thresholds: Sequence[float | None], **kwargs):
        super().__init__(**kwargs)
        self.thresholds = [None if t is None or not np.isfinite(t) else float(t) for t in thresholds]
        for t in self.thresholds:
            if t is not None and not 0.0 < t < 1.0:
                raise ValueError(f"operating points must lie in (0, 1), got {t}")

    def call(self, probabilities):
        p = ops.cast(probabilities, "float32")
        known = np.array([t is not None for t in self.thresholds])
        t = ops.convert_to_tensor(np.array([0.5 if v is None else v for v in self.thresholds], "float32"))
        below = p / (t * 2.0)
        above = 1.0 - (1.0 - p) / ((1.0 - t) * 2.0)
        out = ops.where(p < t, below, above)
        return ops.where(ops.convert_to_tensor(known), out, ops.full_like(out, 0.5))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "thresholds": self.thresholds}


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocessing_layer(preprocessing: dict, name: str = "preprocess") -> PixelNormalization:
    """The `PixelNormalization` of an import's ``preprocessing`` record (see `convert`)."""
    return PixelNormalization(preprocessing["mean"], preprocessing["std"], name=name)

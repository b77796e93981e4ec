"""Feature matrices for the least-squares protocol (approach (a) of Cohen et al. 2020).

* `classifier_features`: the penultimate layer of a trained classifier (``head_dense2``,
  the Dense 512 before the softmax), one row per image.
* `segmentation_features`: per image, the fraction of pixels predicted foreground
  (probability >= threshold) and the mean foreground probability, e.g. predicted lung or
  lesion area fractions.
* `load_images`: the scored images as the models see them (the TFRecord pipeline's
  decoding and resizing), for running the two above outside tf.data.

Images are ``[N, H, W, 1]`` in 0..255 (an array) or a ``tf.data.Dataset`` of such batches
(or of tuples whose first item is the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import keras
import numpy as np

from caaxr_tf.data.records import InputError, Sample, Skipped

SEGMENTATION_FEATURE_NAMES = ("area_fraction", "mean_probability")


def penultimate_model(model: keras.Model, layer_name: str | None = None) -> keras.Model:
    """A model from ``model``'s input to the output of ``layer_name``; by default the layer
    feeding the output layer (a classifier's Dense 512, ``head_dense2``)."""
    if layer_name is None:
        inbound = model.layers[-1].input
        if isinstance(inbound, (list, tuple, dict)):
            raise ValueError(f"{model.name}: the output layer has several inputs; pass layer_name")
        output = inbound
    else:
        output = model.get_layer(layer_name).output
    return keras.Model(model.inputs, output, name=f"{model.name}_features")


def _batches(images: Any, batch_size: int) -> Iterator[Any]:
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"expected images [N, H, W, C], got shape {images.shape}")
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]
        return
    for batch in images:  # a tf.data.Dataset (or any iterable) of batches
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def classifier_features(
    model: keras.Model, images: Any, *, layer_name: str | None = None, batch_size: int = 32
) -> np.ndarray:
    """float64 ``[N, F]`` activations of the penultimate layer (see `penultimate_model`)."""
    extractor = penultimate_model(model, layer_name)
    rows = [np.asarray(extractor.predict_on_batch(batch), dtype=np.float64) for batch in _batches(images, batch_size)]
    if not rows:
        return np.zeros((0, extractor.outputs[0].shape[-1] or 0))
    features = np.concatenate(rows)
    return features.reshape(len(features), -1)


def segmentation_features(
    model: keras.Model, images: Any, *, threshold: float = 0.5, batch_size: int = 8
) -> np.ndarray:
    """float64 ``[N, 2]``: per image the foreground fraction (probability >= ``threshold``)
    and the mean probability (``SEGMENTATION_FEATURE_NAMES``).

    ``model`` outputs one probability map per image, ``[N, H, W, 1]`` or ``[N, H, W]``.
    """
    rows = []
    for batch in _batches(images, batch_size):
        probabilities = model.predict_on_batch(batch)
        if isinstance(probabilities, dict):
            raise ValueError(f"{model.name} returns {sorted(probabilities)}; expected one probability map")
        probabilities = np.asarray(probabilities, dtype=np.float64)
        flat = probabilities.reshape(len(probabilities), -1)
        rows.append(np.stack([(flat >= threshold).mean(axis=1), flat.mean(axis=1)], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, len(SEGMENTATION_FEATURE_NAMES)))


@dataclass
class LoadedImages:
    """Images ``[N, S, S, 1]`` uint8, the samples they belong to, and the files left out."""

    pixels: np.ndarray
    samples: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)


def load_images(samples: Sequence[Sample], image_size: int = 224) -> LoadedImages:
    """Decode and resize every sample's image as the TFRecord pipeline does.

    The file is decoded to grey (`caaxr_tf.data.images.load_image`), re-encoded as PNG
    unless its own bytes are plain grey PNG/JPEG, and passed through
    `caaxr_tf.data.pipeline.preprocess_image` (bicubic resize, inversion, 8-bit scaling).
    Unreadable files are reported in ``skipped`` and left out.
    """
    import tensorflow as tf

    from caaxr_tf.data.images import encode_png, load_image
    from caaxr_tf.data.pipeline import preprocess_image

    pixels, kept, skipped = [], [], []
    for sample in samples:
        try:
            loaded = load_image(sample.path)
        except InputError as error:
            skipped.append(error.as_skipped())
            continue
        encoded = loaded.encoded if loaded.encoded is not None else encode_png(loaded.pixels)
        bit_depth = sample.bit_depth or loaded.bit_depth
        image = preprocess_image(tf.constant(encoded), tf.constant(bit_depth), tf.constant(sample.invert), image_size)
        pixels.append(image.numpy())
        kept.append(sample)
    array = np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 1), np.uint8)
    return LoadedImages(array, kept, skipped)

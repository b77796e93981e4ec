"""U-Net decoder on a keras.applications encoder (ResNet50 or DenseNet121).

    image [N, H, W, 1] in 0..255
      -> GrayscaleToRGB -> ImageNetPreprocessing(mode of the backbone)
      -> encoder (include_top=False), tapped at five named layers:
             stride 2, 4, 8, 16 (skips) and 32 (bottleneck)
      -> 5 decoder stages: 2x up-sampling, concatenation with the skip of that stride
         (none at the last stage), two 3x3 conv -> BatchNorm -> ReLU
      -> 1x1 conv, sigmoid: mask [N, H, W, 1]

Encoder layers tapped (stride 2, 4, 8, 16 | 32):

* ``resnet50`` ("caffe" preprocessing): ``conv1_relu``, ``conv2_block3_out``,
  ``conv3_block4_out``, ``conv4_block6_out`` | ``conv5_block3_out``
  (64, 256, 512, 1024 | 2048 channels);
* ``densenet121`` ("torch" preprocessing): ``conv1_relu``, ``pool2_relu``, ``pool3_relu``,
  ``pool4_relu`` | ``relu`` (64, 256, 512, 1024 | 1024 channels): each dense block's output
  before its transition layer compresses and pools it.

H and W must be multiples of 32. ``weights`` follows the classifiers (models/classifier.py):
``"none"`` (random initialisation, encoder trainable, BatchNorm momentum 0.9),
``"imagenet"`` (keras.applications weights; offline and not cached: `WeightsUnavailableError`)
or a path to weights of the *encoder alone*. With pretrained weights the encoder is frozen
unless ``freeze_encoder=False``; to restore a whole trained model, build it with
``weights="none"`` and call ``model.load_weights(path)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import keras
from keras import layers

from caaxr_tf.models.classifier import BackboneSpec, _application, _build_backbone, _speed_up_batch_norm
from caaxr_tf.models.layers import GrayscaleToRGB, ImageNetPreprocessing
from caaxr_tf.models.registry import register_model
from caaxr_tf.models.weights import NONE, normalize_weights

logger = logging.getLogger(__name__)

DECODER_FILTERS = (256, 128, 64, 32, 16)
ENCODER_STRIDE = 32


@dataclass(frozen=True)
class EncoderSpec:
    """A keras.applications backbone and the layers the decoder taps."""

    backbone: BackboneSpec
    skip_layers: tuple[str, ...]  # strides 2, 4, 8, 16
    bottleneck_layer: str  # stride 32


ENCODERS: dict[str, EncoderSpec] = {
    "resnet50": EncoderSpec(
        BackboneSpec(_application(keras.applications.ResNet50), "caffe"),
        ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out"),
        "conv5_block3_out",
    ),
    "densenet121": EncoderSpec(
        BackboneSpec(_application(keras.applications.DenseNet121), "torch"),
        ("conv1_relu", "pool2_relu", "pool3_relu", "pool4_relu"),
        "relu",
    ),
}


def _decoder_block(x, skip, filters: int, name: str, momentum: float):
    x = layers.UpSampling2D(2, interpolation="nearest", name=f"{name}_upsample")(x)
    if skip is not None:
        x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(momentum=momentum, name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def build_unet_encoder(
    encoder: str,
    input_shape: tuple[int, int, int] = (224, 224, 1),
    weights: str = NONE,
    decoder_filters: Sequence[int] = DECODER_FILTERS,
    freeze_encoder: bool | None = None,
    batch_norm_momentum: float = 0.9,
    name: str | None = None,
) -> keras.Model:
    """U-Net with a pretrained-capable encoder (see module doc).

    Args:
        encoder: one of `ENCODERS` (``"resnet50"``, ``"densenet121"``).
        input_shape: ``(H, W, C)`` of the raw 0..255 input; C is 1 (replicated to RGB
            inside) or 3; H and W multiples of 32.
        weights: ``"none"``, ``"imagenet"`` or a path to weights of the encoder alone.
        decoder_filters: filters of the five decoder stages, stride 16 first.
        freeze_encoder: ``None`` freezes the encoder exactly when it has pretrained weights
            (the classifiers' rule); ``True``/``False`` forces it.
        batch_norm_momentum: of the decoder's BatchNorm layers.
        name: model name, ``"unet_<encoder>"`` by default.
    """
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; known: {', '.join(sorted(ENCODERS))}")
    spec = ENCODERS[encoder]
    decoder_filters = tuple(int(f) for f in decoder_filters)
    if len(decoder_filters) != len(spec.skip_layers) + 1:
        raise ValueError(f"decoder_filters needs {len(spec.skip_layers) + 1} values, got {decoder_filters}")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] not in (1, 3):
        raise ValueError(f"input_shape must be (H, W, 1) or (H, W, 3), got {input_shape}")
    for size in input_shape[:2]:
        if size is not None and size % ENCODER_STRIDE:
            raise ValueError(f"unet_{encoder} needs H and W divisible by {ENCODER_STRIDE}, got {input_shape}")
    weights = normalize_weights(weights)

    backbone = _build_backbone(encoder, spec.backbone, input_shape[:2] + (3,), weights, {})
    taps = [backbone.get_layer(layer).output for layer in (*spec.skip_layers, spec.bottleneck_layer)]
    features = keras.Model(backbone.inputs, taps, name=f"{encoder}_encoder")
    frozen = weights != NONE if freeze_encoder is None else bool(freeze_encoder)
    features.trainable = not frozen
    if weights == NONE:
        _speed_up_batch_norm(features)
    logger.info("unet_%s: encoder weights %s, encoder %s", encoder, weights, "frozen" if frozen else "trainable")

    inputs = keras.Input(shape=input_shape, name="image")
    x = GrayscaleToRGB(name="to_rgb")(inputs) if input_shape[-1] == 1 else inputs
    x = ImageNetPreprocessing(spec.backbone.preprocessing, name="preprocess")(x)
    *skips, x = features(x)
    for stage, filters in enumerate(decoder_filters):
        skip = skips[-1 - stage] if stage < len(skips) else None
        x = _decoder_block(x, skip, filters, f"decoder{stage + 1}", batch_norm_momentum)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="mask")(x)
    return keras.Model(inputs, outputs, name=name or f"unet_{encoder}")


def _register(encoder: str) -> None:
    model_name = f"unet_{encoder}"

    def builder(
        *,
        num_classes: int | None = None,
        input_shape: tuple[int, int, int] = (224, 224, 1),
        weights: str = NONE,
        **kwargs: Any,
    ) -> keras.Model:
        if num_classes not in (None, 1):
            raise ValueError(
                f"{model_name} predicts one binary mask; num_classes must be None or 1, got {num_classes}"
            )
        return build_unet_encoder(encoder, input_shape=input_shape, weights=weights, **kwargs)

    builder.__name__ = model_name
    builder.__doc__ = f"Registry builder for the U-Net on a {encoder} encoder (see `build_unet_encoder`)."
    register_model(model_name, task="segmentation")(builder)


for _encoder in ENCODERS:
    _register(_encoder)

"""The trainable parts of Mask R-CNN as functional Keras models.

* `build_backbone`: keras.applications ResNet50 / MobileNetV2 cut at the
  outputs of strides 4, 8, 16 and 32 (C2..C5). Its layers and names are those
  of the application, so a weights file of the application loads into it.
* `build_feature_network`: raw image -> RGB -> ImageNet preprocessing ->
  backbone -> FPN (P2..P5, P6 by max pooling) -> RPN head shared across levels.
* `build_box_head`: 2 fully connected layers -> class logits and class-specific deltas.
* `build_mask_head`: 4 convolutions, 2x transposed convolution -> per-class mask logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras
from keras import layers

from caaxr_tf.models.layers import GrayscaleToRGB, ImageNetPreprocessing


@dataclass(frozen=True)
class BackboneSpec:
    constructor: Callable[..., keras.Model]
    preprocessing: str  # ImageNetPreprocessing mode
    feature_layers: tuple[str, str, str, str]  # C2..C5


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(
        keras.applications.ResNet50,
        "caffe",
        ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
    ),
    "mobilenetv2": BackboneSpec(
        keras.applications.MobileNetV2,
        "tf",
        ("block_2_add", "block_5_add", "block_12_add", "out_relu"),
    ),
}

MIN_LEVEL = 2  # P2, stride 4
RPN_LEVELS = 5  # P2..P6
ROI_LEVELS = 4  # P2..P5


def application_kwargs(backbone: str, alpha: float) -> dict:
    return {"alpha": alpha} if backbone == "mobilenetv2" else {}


def build_backbone(backbone: str, rgb_shape: tuple[int, int, int], alpha: float = 1.0) -> keras.Model:
    """Randomly initialised backbone returning `[C2, C3, C4, C5]`."""
    spec = BACKBONES[backbone]
    application = spec.constructor(
        include_top=False, weights=None, input_shape=rgb_shape, **application_kwargs(backbone, alpha)
    )
    outputs = [application.get_layer(name).output for name in spec.feature_layers]
    return keras.Model(application.inputs, outputs, name="backbone")


def _small_normal(stddev: float) -> keras.initializers.Initializer:
    return keras.initializers.RandomNormal(stddev=stddev)


def build_feature_network(
    backbone_model: keras.Model,
    preprocessing: str,
    image_shape: tuple[int, int, int],
    fpn_filters: int,
    anchors_per_location: int,
) -> keras.Model:
    """Image -> `[rpn_logits [B, A], rpn_deltas [B, A, 4], P2, P3, P4, P5]`."""
    inputs = keras.Input(shape=image_shape, name="image")
    x = GrayscaleToRGB(name="to_rgb")(inputs) if image_shape[-1] == 1 else inputs
    x = ImageNetPreprocessing(preprocessing, name="preprocess")(x)
    c_features = backbone_model(x)

    laterals = [
        layers.Conv2D(fpn_filters, 1, name=f"fpn_lateral{level}")(c)
        for level, c in zip(range(MIN_LEVEL, MIN_LEVEL + 4), c_features)
    ]
    merged = [laterals[-1]]
    for level in range(MIN_LEVEL + 2, MIN_LEVEL - 1, -1):
        upsampled = layers.UpSampling2D(2, interpolation="nearest", name=f"fpn_upsample{level + 1}")(merged[0])
        merged.insert(0, layers.Add(name=f"fpn_merge{level}")([laterals[level - MIN_LEVEL], upsampled]))
    pyramid = [
        layers.Conv2D(fpn_filters, 3, padding="same", name=f"fpn_output{level}")(m)
        for level, m in zip(range(MIN_LEVEL, MIN_LEVEL + 4), merged)
    ]
    p6 = layers.MaxPooling2D(1, strides=2, name="fpn_p6")(pyramid[-1])

    rpn_conv = layers.Conv2D(
        fpn_filters, 3, padding="same", activation="relu", kernel_initializer=_small_normal(0.01), name="rpn_conv"
    )
    rpn_logits = layers.Conv2D(
        anchors_per_location, 1, kernel_initializer=_small_normal(0.01), name="rpn_objectness"
    )
    rpn_deltas = layers.Conv2D(
        4 * anchors_per_location, 1, kernel_initializer=_small_normal(0.001), name="rpn_deltas"
    )
    all_logits, all_deltas = [], []
    for level, feature in zip(range(MIN_LEVEL, MIN_LEVEL + RPN_LEVELS), pyramid + [p6]):
        hidden = rpn_conv(feature)
        all_logits.append(layers.Reshape((-1,), name=f"rpn_logits_p{level}")(rpn_logits(hidden)))
        all_deltas.append(layers.Reshape((-1, 4), name=f"rpn_deltas_p{level}")(rpn_deltas(hidden)))
    logits = layers.Concatenate(axis=1, dtype="float32", name="rpn_logits")(all_logits)
    deltas = layers.Concatenate(axis=1, dtype="float32", name="rpn_box_deltas")(all_deltas)
    return keras.Model(inputs, [logits, deltas, *pyramid], name="feature_network")


def build_box_head(pool_size: int, channels: int, units: int, num_classes: int) -> keras.Model:
    """`[R, pool, pool, C]` RoI features -> `(logits [R, K+1], deltas [R, K+1, 4])` (K foreground classes)."""
    inputs = keras.Input(shape=(pool_size, pool_size, channels), name="roi_features")
    x = layers.Flatten(name="flatten")(inputs)
    x = layers.Dense(units, activation="relu", name="fc1")(x)
    x = layers.Dense(units, activation="relu", name="fc2")(x)
    logits = layers.Dense(
        num_classes + 1, kernel_initializer=_small_normal(0.01), dtype="float32", name="class_logits"
    )(x)
    deltas = layers.Dense(4 * (num_classes + 1), kernel_initializer=_small_normal(0.001), name="box_deltas")(x)
    deltas = layers.Reshape((num_classes + 1, 4), dtype="float32", name="box_deltas_per_class")(deltas)
    return keras.Model(inputs, [logits, deltas], name="box_head")


def build_mask_head(pool_size: int, channels: int, filters: int, convs: int, num_classes: int) -> keras.Model:
    """`[R, pool, pool, C]` RoI features -> `[R, 2 pool, 2 pool, K]` mask logits."""
    inputs = keras.Input(shape=(pool_size, pool_size, channels), name="roi_features")
    x = inputs
    for i in range(1, convs + 1):
        x = layers.Conv2D(
            filters, 3, padding="same", activation="relu", kernel_initializer="he_normal", name=f"mask_conv{i}"
        )(x)
    x = layers.Conv2DTranspose(
        filters, 2, strides=2, activation="relu", kernel_initializer="he_normal", name="mask_upsample"
    )(x)
    logits = layers.Conv2D(num_classes, 1, dtype="float32", name="mask_logits")(x)
    return keras.Model(inputs, logits, name="mask_head")

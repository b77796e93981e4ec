"""CT slice classifiers of Rahimzadeh et al. (2021): ResNet50V2 with a feature pyramid, and the
plain ResNet50V2 and Xception they compare against.

All three take one raw CT slice, ``[N, 512, 512, 1]`` float32 on the COVID-CTset scale
(HU + 1024, values up to about 5,000), with no resizing and no scaling inside the model, and
end in a softmax over ``num_classes`` (2: the published code's classes in alphabetical order,
``covid`` = 0, ``normal`` = 1).

``fpn_resnet50v2`` (the published code, COVID_Train&Validation.ipynb; 256 filters throughout)::

    C3 = conv4_block1_preact_relu   [32x32x512]     C4 = conv5_block1_preact_relu [16x16x1024]
    C5 = post_relu                  [16x16x2048]    (sizes for a 512x512 input)
    P5 = Conv1x1(C5) "C5_reduced";  P5_up = UpsampleLike(P5, C4);  P5 = Conv3x3 same "P5"
    P4 = Concat[P5_up, Conv1x1(C4) "C4_reduced"];  P4_up = UpsampleLike(P4, C3);  P4 = Conv3x3 valid "P4"
    P3 = Concat[P4_up, Conv1x1(C3) "C3_reduced"];  P3 = Conv3x3 valid "P3"
    P6 = Conv3x3 stride 2 same on C5 "P6";  P7 = Conv3x3 stride 2 same on ReLU(P6) "P7"
    each of P3..P7: Flatten -> Dropout(0.5) -> Dense(num_classes, ReLU, N(0, 0.001) kernel)
    Concat of the five -> Dense(num_classes, softmax, N(0, 0.001) kernel)

``UpsampleLike`` is keras-retinanet's layer that the published code imports: a nearest-neighbour
resize to the target's spatial size (``tf.compat.v1.image.resize_images``, no half-pixel
centres). With 512x512 inputs C4 and C5 are both 16x16, so ``P5_up`` equals ``P5``.

``resnet50v2`` / ``xception``: the backbone (``include_top=False``) -> Flatten -> Dropout(0.5)
-> Dense(num_classes, softmax, N(0, 0.001) kernel). The CT repository publishes only the FPN
code; this head is the one the same authors' published Xception/ResNet50V2 code uses
(github.com/mr7495/covid19: Flatten, Dropout 0.5, softmax Dense with a N(0, 0.001) kernel) and
the one of each FPN branch.

``weights``:
  * ``"none"``: random initialisation; BatchNorm momentum lowered to 0.9 as for the other
    classifiers trained from scratch (``caaxr_tf.models.classifier``).
  * ``"imagenet"``: keras.applications' ImageNet weights of the 3-channel backbone copied by
    layer name wherever the shapes match, as the published ``load_weights(by_name=True,
    skip_mismatch=True)``; the one-channel first convolution kernel stays random. Offline
    without the Keras cache this raises ``WeightsUnavailableError``.
  * a path: weights of the 3-channel keras.applications backbone (e.g. the ``*_notop.h5``
    file keras.applications downloads, or ``.weights.h5`` saved from it), copied the same
    way. To restore a whole trained model, build with ``"none"`` and ``model.load_weights``.
The whole model is trainable in every case, as in the published code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import keras
from keras import layers, ops

from caaxr_tf.models.classifier import _speed_up_batch_norm
from caaxr_tf.models.layers import PACKAGE
from caaxr_tf.models.registry import register_model
from caaxr_tf.models.weights import IMAGENET, NONE, call_with_imagenet_weights, load_weights_file, normalize_weights

logger = logging.getLogger(__name__)

CT_INPUT_SHAPE = (512, 512, 1)
FEATURE_SIZE = 256
DROPOUT = 0.5
HEAD_STDDEV = 0.001
PYRAMID_LAYERS = ("conv4_block1_preact_relu", "conv5_block1_preact_relu", "post_relu")  # C3, C4, C5
PYRAMID_LEVELS = ("P3", "P4", "P5", "P6", "P7")
# The smallest input for which the two "valid" 3x3 convolutions still see a 3x3 map
# (C4 = 3x3 at 96x96); Xception itself needs at least 71x71.
MIN_FPN_SIDE = 96
MIN_PLAIN_SIDE = 71

BACKBONES: dict[str, Callable[..., keras.Model]] = {
    "resnet50v2": keras.applications.ResNet50V2,
    "xception": keras.applications.Xception,
}


@keras.saving.register_keras_serializable(package=PACKAGE)
class UpsampleLike(keras.layers.Layer):
    """Resize ``source`` to the height and width of ``target`` by nearest neighbour.

    Output row ``i`` takes source row ``floor(i * in_height / out_height)`` (likewise for
    columns): ``tf.compat.v1.image.resize_images(..., NEAREST_NEIGHBOR, align_corners=False)``
    as keras-retinanet's ``UpsampleLike`` computes it, here in exact integer arithmetic.
    """

    def call(self, inputs):
        source, target = inputs
        in_height, in_width = ops.shape(source)[1], ops.shape(source)[2]
        out_height, out_width = ops.shape(target)[1], ops.shape(target)[2]
        rows = ops.floor_divide(ops.arange(out_height) * in_height, out_height)
        columns = ops.floor_divide(ops.arange(out_width) * in_width, out_width)
        return ops.take(ops.take(source, rows, axis=1), columns, axis=2)

    def compute_output_shape(self, input_shape):
        source, target = input_shape
        return (source[0], target[1], target[2], source[3])


@dataclass(frozen=True)
class WeightTransfer:
    """What ``transfer_matching_weights`` did: variables copied and those left as they were."""

    copied: int
    mismatched: tuple[str, ...]


def transfer_matching_weights(source: keras.Model, target: keras.Model) -> WeightTransfer:
    """Copy each variable of ``source`` into ``target``'s same-named layer where shapes match.

    Variables are paired by layer name and position within the layer, as Keras 2's
    ``load_weights(by_name=True, skip_mismatch=True)`` did; a variable whose shape differs
    (the first convolution kernel of a one-channel model) keeps its value.
    """
    copied, mismatched = 0, []
    for layer in source.layers:
        if not layer.weights:
            continue
        try:
            other = target.get_layer(layer.name)
        except ValueError:
            continue
        for variable, destination in zip(layer.weights, other.weights):
            if tuple(variable.shape) == tuple(destination.shape):
                destination.assign(variable)
                copied += 1
            else:
                mismatched.append(f"{layer.name}/{variable.name}")
    return WeightTransfer(copied=copied, mismatched=tuple(mismatched))


def _pretrained_backbone(backbone: str, weights: str, input_shape) -> keras.Model | None:
    """The 3-channel keras.applications backbone holding the requested weights (None for "none").

    Built before the CT model, so that an unavailable download or a wrong file fails fast.
    """
    if weights == NONE:
        return None
    constructor = BACKBONES[backbone]
    rgb_shape = tuple(input_shape[:2]) + (3,)
    if weights == IMAGENET:
        return call_with_imagenet_weights(
            backbone, lambda: constructor(include_top=False, weights=IMAGENET, input_shape=rgb_shape))
    rgb = constructor(include_top=False, weights=None, input_shape=rgb_shape)
    load_weights_file(rgb, weights, what=f"{backbone} backbone")
    return rgb


def _check_args(name: str, num_classes: int | None, input_shape, min_side: int) -> tuple[int, tuple[int, int, int]]:
    num_classes = 2 if num_classes is None else num_classes
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{name}: num_classes must be an integer >= 2, got {num_classes!r}")
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 1:
        raise ValueError(f"{name} takes one-channel raw CT slices: input_shape must be (H, W, 1), got {input_shape}")
    if min(input_shape[:2]) < min_side:
        raise ValueError(f"{name} needs inputs of at least {min_side}x{min_side}, got {input_shape[:2]}")
    return num_classes, input_shape


def _head_dense(units: int, activation: str, name: str, dtype: str | None = None) -> layers.Dense:
    initializer = keras.initializers.RandomNormal(mean=0.0, stddev=HEAD_STDDEV)
    return layers.Dense(units, activation=activation, kernel_initializer=initializer, name=name, dtype=dtype)


def _finish(model: keras.Model, pretrained: keras.Model | None, weights: str) -> keras.Model:
    if pretrained is None:
        _speed_up_batch_norm(model)
        return model
    transfer = transfer_matching_weights(pretrained, model)
    logger.info("%s: %d variables from %s; left as initialised: %s", model.name, transfer.copied,
                weights, ", ".join(transfer.mismatched) or "none")
    return model


def build_fpn_resnet50v2(
    num_classes: int | None = 2,
    input_shape: tuple[int, int, int] = CT_INPUT_SHAPE,
    weights: str = NONE,
    feature_size: int = FEATURE_SIZE,
    dropout: float = DROPOUT,
    name: str = "fpn_resnet50v2",
) -> keras.Model:
    """ResNet50V2 with the published feature pyramid classifier (see the module docstring)."""
    num_classes, input_shape = _check_args(name, num_classes, input_shape, MIN_FPN_SIDE)
    weights = normalize_weights(weights)
    pretrained = _pretrained_backbone("resnet50v2", weights, input_shape)
    inputs = keras.Input(shape=input_shape, name="image")
    base = keras.applications.ResNet50V2(include_top=False, weights=None, input_tensor=inputs)
    c3, c4, c5 = (base.get_layer(layer_name).output for layer_name in PYRAMID_LAYERS)

    def conv(size: int, layer_name: str, strides: int = 1, padding: str = "same") -> layers.Conv2D:
        return layers.Conv2D(feature_size, size, strides=strides, padding=padding, name=layer_name)

    p5 = conv(1, "C5_reduced")(c5)
    p5_upsampled = UpsampleLike(name="P5_upsampled")([p5, c4])
    p5 = conv(3, "P5")(p5)
    p4 = layers.Concatenate(axis=3, name="P4_merged")([p5_upsampled, conv(1, "C4_reduced")(c4)])
    p4_upsampled = UpsampleLike(name="P4_upsampled")([p4, c3])
    p4 = conv(3, "P4", padding="valid")(p4)
    p3 = layers.Concatenate(axis=3, name="P3_merged")([p4_upsampled, conv(1, "C3_reduced")(c3)])
    p3 = conv(3, "P3", padding="valid")(p3)
    p6 = conv(3, "P6", strides=2)(c5)
    p7 = conv(3, "P7", strides=2)(layers.Activation("relu", name="C6_relu")(p6))

    branches = []
    for level, feature in zip(PYRAMID_LEVELS, (p3, p4, p5, p6, p7)):
        x = layers.Flatten(name=f"{level}_flatten")(feature)
        x = layers.Dropout(dropout, name=f"{level}_dropout")(x)
        branches.append(_head_dense(num_classes, "relu", f"{level}_predictions")(x))
    merged = layers.Concatenate(axis=1, name="pyramid_predictions")(branches)
    outputs = _head_dense(num_classes, "softmax", "predictions", dtype="float32")(merged)
    return _finish(keras.Model(inputs, outputs, name=name), pretrained, weights)


def build_ct_classifier(
    backbone: str,
    num_classes: int | None = 2,
    input_shape: tuple[int, int, int] = CT_INPUT_SHAPE,
    weights: str = NONE,
    dropout: float = DROPOUT,
    name: str | None = None,
) -> keras.Model:
    """Plain ``resnet50v2`` or ``xception`` on raw slices: backbone -> Flatten -> Dropout -> softmax."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown CT backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}")
    name = name or backbone
    num_classes, input_shape = _check_args(name, num_classes, input_shape, MIN_PLAIN_SIDE)
    weights = normalize_weights(weights)
    pretrained = _pretrained_backbone(backbone, weights, input_shape)
    inputs = keras.Input(shape=input_shape, name="image")
    base = BACKBONES[backbone](include_top=False, weights=None, input_tensor=inputs)
    x = layers.Flatten(name="flatten")(base.output)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = _head_dense(num_classes, "softmax", "predictions", dtype="float32")(x)
    return _finish(keras.Model(inputs, outputs, name=name), pretrained, weights)


@register_model("fpn_resnet50v2", task="classification")
def fpn_resnet50v2(*, num_classes: int | None = None, input_shape=CT_INPUT_SHAPE, weights: str = NONE,
                   **kwargs: Any) -> keras.Model:
    """Registry builder: ``build_fpn_resnet50v2`` (raw one-channel CT slices, 512x512)."""
    return build_fpn_resnet50v2(num_classes, input_shape=input_shape, weights=weights, **kwargs)


def _register_plain(backbone: str) -> None:
    def builder(*, num_classes: int | None = None, input_shape=CT_INPUT_SHAPE, weights: str = NONE,
                **kwargs: Any) -> keras.Model:
        return build_ct_classifier(backbone, num_classes, input_shape=input_shape, weights=weights, **kwargs)

    builder.__name__ = backbone
    builder.__doc__ = f"Registry builder: ``build_ct_classifier({backbone!r})`` (raw one-channel CT slices)."
    register_model(backbone, task="classification")(builder)


for _backbone in BACKBONES:
    _register_plain(_backbone)

# The registered models that take raw one-channel CT slices (the ct task's models).
CT_MODELS = ("fpn_resnet50v2", *BACKBONES)

"""SegNet (Badrinarayanan et al., 2017) for binary lung segmentation.

A VGG16-style encoder (five stages of 2, 2, 3, 3, 3 conv-BN-ReLU blocks, each
followed by 2x2 max pooling that records its argmax) and a mirrored decoder
that up-samples with `MaxUnpooling2D` at the recorded positions, then
densifies the sparse maps with conv-BN-ReLU blocks. Input: raw 0..255 pixels
(rescaled inside); output: a sigmoid mask `[N, H, W, 1]`.

The pooling layers run outside XLA (see `caaxr_tf.models.layers`).
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers

from caaxr_tf.models.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D
from caaxr_tf.models.registry import register_model
from caaxr_tf.models.weights import NONE, check_segmentation_args, load_weights_file

VGG16_CONVS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (1, 2, 4, 8, 8)


def _conv_bn_relu(x, filters: int, name: str, momentum: float):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=momentum, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def build_segnet(
    input_shape: tuple[int, int, int] = (224, 224, 1),
    base_filters: int = 64,
    convs_per_stage: Sequence[int] = VGG16_CONVS,
    width_multipliers: Sequence[int] = VGG16_WIDTHS,
    batch_norm_momentum: float = 0.9,
    name: str = "segnet",
) -> keras.Model:
    """Functional SegNet.

    Args:
        input_shape: `(H, W, C)`; any size works (unpooling restores the
            pre-pooling size), multiples of `2**stages` avoid padding.
        base_filters: filters of the first stage (64 in the paper).
        convs_per_stage: conv blocks per encoder stage (VGG16: 2, 2, 3, 3, 3).
        width_multipliers: filters of each stage as multiples of `base_filters`.
        batch_norm_momentum: 0.9 (PyTorch's 0.1) so the moving statistics keep up with
            small batches in short runs.
    """
    if len(convs_per_stage) != len(width_multipliers):
        raise ValueError("convs_per_stage and width_multipliers must have the same length")
    filters = [base_filters * m for m in width_multipliers]
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)

    pooled_from, argmaxes = [], []
    for stage, (n_convs, width) in enumerate(zip(convs_per_stage, filters), start=1):
        for i in range(1, n_convs + 1):
            x = _conv_bn_relu(x, width, f"enc{stage}_{i}", batch_norm_momentum)
        pooled_from.append(x)
        x, argmax = MaxPoolingWithArgmax2D(2, name=f"enc{stage}_pool")(x)
        argmaxes.append(argmax)

    for stage in reversed(range(1, len(filters) + 1)):
        n_convs = convs_per_stage[stage - 1]
        x = MaxUnpooling2D(2, name=f"dec{stage}_unpool")(
            [x, argmaxes[stage - 1], pooled_from[stage - 1]]
        )
        last_width = filters[stage - 2] if stage > 1 else filters[0]
        for i in range(1, n_convs + 1):
            is_last = i == n_convs
            if is_last and stage == 1:
                break  # the output conv replaces the last block of the first stage
            width = last_width if is_last else filters[stage - 1]
            x = _conv_bn_relu(x, width, f"dec{stage}_{i}", batch_norm_momentum)
    outputs = layers.Conv2D(1, 3, padding="same", activation="sigmoid", dtype="float32", name="mask")(x)
    return keras.Model(inputs, outputs, name=name)


@register_model("segnet", task="segmentation")
def segnet(
    *,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] = (224, 224, 1),
    weights: str = NONE,
    **kwargs,
) -> keras.Model:
    """Registry builder; `weights` may be a path to weights of the whole SegNet."""
    weights = check_segmentation_args("segnet", num_classes, weights)
    model = build_segnet(input_shape=input_shape, **kwargs)
    if weights != NONE:
        load_weights_file(model, weights, what="segnet")
    return model

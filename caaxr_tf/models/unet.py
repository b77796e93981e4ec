"""U-Net (Ronneberger et al., 2015) for binary lung segmentation.

Four down-sampling and four up-sampling levels; every level is two
3x3 conv -> BatchNorm -> ReLU blocks ("same" padding, so the mask has the
input's size). Skip connections concatenate encoder features to the
up-sampled decoder features. Input: raw 0..255 pixels (rescaled inside);
output: a sigmoid mask `[N, H, W, 1]`.
"""

from __future__ import annotations

import keras
from keras import layers

from caaxr_tf.models.registry import register_model
from caaxr_tf.models.weights import NONE, check_segmentation_args, load_weights_file

UPSAMPLING_MODES = ("transpose", "bilinear")


def _conv_block(x, filters: int, name: str, momentum: float):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(momentum=momentum, name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def build_unet(
    input_shape: tuple[int, int, int] = (224, 224, 1),
    base_filters: int = 64,
    depth: int = 4,
    upsampling: str = "transpose",
    dropout: float = 0.0,
    batch_norm_momentum: float = 0.9,
    name: str = "unet",
) -> keras.Model:
    """Functional U-Net.

    Args:
        input_shape: `(H, W, C)`; H and W must be divisible by `2**depth`.
        base_filters: filters of the first level, doubled at every level down.
        depth: number of down/up-sampling levels (4 in the paper).
        upsampling: `"transpose"` (2x2 stride-2 transposed conv) or
            `"bilinear"` (bilinear up-sampling followed by a 1x1 conv).
        dropout: dropout rate applied at the bottleneck (0 disables it).
        batch_norm_momentum: 0.9 (PyTorch's 0.1) rather than Keras' 0.99, so the moving
            statistics keep up with the small segmentation batches (4) of short runs.
    """
    if upsampling not in UPSAMPLING_MODES:
        raise ValueError(f"upsampling must be one of {UPSAMPLING_MODES}, got {upsampling!r}")
    height, width = input_shape[:2]
    factor = 2**depth
    for size in (height, width):
        if size is not None and size % factor:
            raise ValueError(f"U-Net with depth {depth} needs H and W divisible by {factor}, got {input_shape}")

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2**level, f"down{level + 1}", batch_norm_momentum)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"down{level + 1}_pool")(x)
    x = _conv_block(x, base_filters * 2**depth, "bottleneck", batch_norm_momentum)
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        prefix = f"up{level + 1}"
        if upsampling == "transpose":
            x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"{prefix}_upconv")(x)
        else:
            x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{prefix}_upsample")(x)
            x = layers.Conv2D(filters, 1, name=f"{prefix}_upconv")(x)
        x = layers.Concatenate(name=f"{prefix}_concat")([skips[level], x])
        x = _conv_block(x, filters, prefix, batch_norm_momentum)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="mask")(x)
    return keras.Model(inputs, outputs, name=name)


@register_model("unet", task="segmentation")
def unet(
    *,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] = (224, 224, 1),
    weights: str = NONE,
    **kwargs,
) -> keras.Model:
    """Registry builder; `weights` may be a path to weights of the whole U-Net."""
    weights = check_segmentation_args("unet", num_classes, weights)
    model = build_unet(input_shape=input_shape, **kwargs)
    if weights != NONE:
        load_weights_file(model, weights, what="unet")
    return model

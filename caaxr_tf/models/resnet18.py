"""ResNet-18 (He et al., 2016) as a functional Keras model.

keras.applications has no ResNet-18, so it is written here, laid out like
torchvision's `resnet18` so converted weights map one to one: a 7x7/2 conv
(no bias) + BN + ReLU, a 3x3/2 max pool, then four stages of two basic blocks
with 64, 128, 256 and 512 filters. The first block of stages 2-4 halves the
resolution and uses a 1x1/2 conv + BN projection shortcut. Padding is
explicit and symmetric (as in PyTorch), BN epsilon is 1e-5.

Like keras.applications models, it expects already-preprocessed RGB input
(`ImageNetPreprocessing("torch")` in the CAAXR classifier).
With `include_top=True, classes=1000` it has 11,689,512 trainable parameters,
the count of torchvision's ResNet-18 (11,176,512 without the top).
"""

from __future__ import annotations

import keras
from keras import layers

STAGE_FILTERS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2
BN_EPSILON = 1e-5


def _conv_bn(x, filters: int, kernel_size: int, strides: int, name: str, relu: bool):
    pad = kernel_size // 2
    if pad:
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    x = layers.Conv2D(filters, kernel_size, strides=strides, use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    if relu:
        x = layers.ReLU(name=f"{name}_relu")(x)
    return x


def basic_block(x, filters: int, strides: int, name: str):
    """Two 3x3 conv-BN layers plus an identity or 1x1 projection shortcut, then ReLU."""
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, strides, name=f"{name}_proj", relu=False)
    else:
        shortcut = x
    y = _conv_bn(x, filters, 3, strides, name=f"{name}_1", relu=True)
    y = _conv_bn(y, filters, 3, 1, name=f"{name}_2", relu=False)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


def ResNet18(
    include_top: bool = False,
    input_shape: tuple[int | None, int | None, int] = (224, 224, 3),
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    name: str = "resnet18",
) -> keras.Model:
    """ResNet-18 with the keras.applications calling convention.

    Args:
        include_top: add global average pooling and a `classes`-way Dense layer.
        input_shape: `(H, W, C)` of the preprocessed input.
        pooling: without the top, `None` (4D feature map), `"avg"` or `"max"`.
        classes: outputs of the top layer.
        classifier_activation: activation of the top layer.
    """
    inputs = keras.Input(shape=input_shape, name="input")
    x = _conv_bn(inputs, 64, 7, 2, name="stem", relu=True)
    x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
    for stage, filters in enumerate(STAGE_FILTERS, start=1):
        for block in range(1, BLOCKS_PER_STAGE + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = basic_block(x, filters, strides, name=f"stage{stage}_block{block}")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    elif pooling is not None:
        raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
    return keras.Model(inputs, x, name=name)

"""UNet++ (Zhou et al., 2018): a U-Net whose skip connections are nested, dense convolution paths.

Node ``X(i, j)`` sits at down-sampling level ``i`` (``0`` = full resolution) and skip-path
position ``j``:

* ``X(i, 0)`` is the encoder: two 3x3 conv -> BatchNorm -> ReLU blocks, max pooling between
  levels (as in models/unet.py);
* ``X(i, j)``, ``j >= 1``, is a conv block on the concatenation of every earlier node of its
  level, ``X(i, 0) .. X(i, j-1)``, and the up-sampled ``X(i+1, j-1)``.

Level ``i`` has ``base_filters * 2**i`` filters. The output is a 1x1 sigmoid conv on
``X(0, depth)``. With ``deep_supervision=True`` every top node ``X(0, 1) .. X(0, depth)`` gets
its own 1x1 sigmoid head and the output is their mean (the paper's "accurate mode"), so each
nested decoder receives a direct gradient and the model still returns one mask.

Input: raw 0..255 pixels ``[N, H, W, C]`` (rescaled inside); output: a sigmoid mask
``[N, H, W, 1]``. Layer names: ``x{i}_{j}_conv{1,2}`` / ``_bn`` / ``_relu``, ``x{i}_{j}_up``
(the up-sampling that feeds ``X(i, j)``), ``x{i}_{j}_concat``, heads ``mask_{j}``, output ``mask``.
"""

from __future__ import annotations

import keras
from keras import layers

from caaxr_tf.models.registry import register_model
from caaxr_tf.models.unet import UPSAMPLING_MODES, _conv_block
from caaxr_tf.models.weights import NONE, check_segmentation_args, load_weights_file


def build_unetpp(
    input_shape: tuple[int, int, int] = (224, 224, 1),
    base_filters: int = 32,
    depth: int = 4,
    deep_supervision: bool = False,
    upsampling: str = "transpose",
    batch_norm_momentum: float = 0.9,
    name: str = "unetpp",
) -> keras.Model:
    """Functional UNet++.

    Args:
        input_shape: ``(H, W, C)``; H and W must be divisible by ``2**depth``.
        base_filters: filters of level 0, doubled at every level down (the paper uses 32).
        depth: number of down-sampling levels (4 in the paper: nodes ``X(0..4, *)``).
        deep_supervision: average the sigmoid heads of ``X(0, 1..depth)`` (see module doc).
        upsampling: ``"transpose"`` (2x2 stride-2 transposed conv) or ``"bilinear"``
            (bilinear up-sampling followed by a 1x1 conv).
        batch_norm_momentum: 0.9 as in models/unet.py (moving statistics that keep up with
            small segmentation batches).
    """
    if upsampling not in UPSAMPLING_MODES:
        raise ValueError(f"upsampling must be one of {UPSAMPLING_MODES}, got {upsampling!r}")
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    factor = 2**depth
    for size in input_shape[:2]:
        if size is not None and size % factor:
            raise ValueError(f"UNet++ with depth {depth} needs H and W divisible by {factor}, got {input_shape}")

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    nodes: dict[tuple[int, int], keras.KerasTensor] = {}
    for level in range(depth + 1):
        if level:
            x = layers.MaxPooling2D(2, name=f"x{level - 1}_0_pool")(nodes[(level - 1, 0)])
        nodes[(level, 0)] = _conv_block(x, base_filters * 2**level, f"x{level}_0", batch_norm_momentum)

    # Column by column: X(i, j) needs X(i+1, j-1), computed in the previous column.
    for column in range(1, depth + 1):
        for level in range(depth + 1 - column):
            filters = base_filters * 2**level
            prefix = f"x{level}_{column}"
            below = nodes[(level + 1, column - 1)]
            if upsampling == "transpose":
                up = layers.Conv2DTranspose(filters, 2, strides=2, name=f"{prefix}_up")(below)
            else:
                up = layers.UpSampling2D(2, interpolation="bilinear", name=f"{prefix}_upsample")(below)
                up = layers.Conv2D(filters, 1, name=f"{prefix}_up")(up)
            same_level = [nodes[(level, k)] for k in range(column)]
            merged = layers.Concatenate(name=f"{prefix}_concat")(same_level + [up])
            nodes[(level, column)] = _conv_block(merged, filters, prefix, batch_norm_momentum)

    if not deep_supervision or depth == 1:  # one top node: one head either way
        outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="mask")(nodes[(0, depth)])
    else:
        heads = [
            layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name=f"mask_{column}")(nodes[(0, column)])
            for column in range(1, depth + 1)
        ]
        outputs = layers.Average(dtype="float32", name="mask")(heads)
    return keras.Model(inputs, outputs, name=name)


@register_model("unetpp", task="segmentation")
def unetpp(
    *,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] = (224, 224, 1),
    weights: str = NONE,
    **kwargs,
) -> keras.Model:
    """Registry builder; ``weights`` may be a path to weights of the whole UNet++."""
    weights = check_segmentation_args("unetpp", num_classes, weights)
    model = build_unetpp(input_shape=input_shape, **kwargs)
    if weights != NONE:
        load_weights_file(model, weights, what="unetpp")
    return model

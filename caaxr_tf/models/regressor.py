"""Score regressors: a classifier backbone with a linear multi-output head.

    image [N, H, W, 1] in 0..255
      -> the classifiers' trunk (`build_pooled_backbone`: to RGB, ImageNet preprocessing,
         backbone, global pooling)
      -> Dense 1024 ReLU -> Dense 512 ReLU -> Dense num_outputs, linear   ("scores")

The head mirrors the classifiers' (same layer names ``head_dense1``/``head_dense2``), so a
regressor's penultimate layer is comparable with a classifier's and a classifier's trunk and
head weights can be reused. The outputs are raw scores, unbounded while training (clamping
would zero the gradient of every prediction beyond a bound); `serving_regressor` clamps them
to their ranges and names them for export.

Registered as ``<backbone>_regressor`` (``densenet121_regressor``, ``mobilenetv2_regressor``,
``resnet18_regressor``, ``vgg19_regressor``) for the task ``"regression"``; ``num_classes`` is
the number of outputs there (default 2: geographic extent, opacity).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import keras
from keras import layers, ops

from caaxr_tf.models.classifier import BACKBONES, HEAD_UNITS, build_pooled_backbone
from caaxr_tf.models.registry import register_model
from caaxr_tf.models.weights import NONE

DEFAULT_NUM_OUTPUTS = 2
OUTPUT_LAYER = "scores"


def regressor_name(backbone: str) -> str:
    """Registry name of the regressor on ``backbone``: ``"<backbone>_regressor"``."""
    return f"{backbone}_regressor"


def build_regressor(
    backbone: str,
    num_outputs: int = DEFAULT_NUM_OUTPUTS,
    weights: str = NONE,
    input_shape: tuple[int, int, int] = (224, 224, 1),
    pooling: str = "avg",
    output_bias: Sequence[float] | None = None,
    name: str | None = None,
    **backbone_kwargs: Any,
) -> keras.Model:
    """Backbone + global pooling + Dense(1024) + Dense(512) + Dense(num_outputs) linear.

    Args:
        backbone: one of `BACKBONES`.
        num_outputs: number of regression targets (columns of the ``[N, num_outputs]`` output).
        weights: ``"none"``, ``"imagenet"`` or a backbone weights file, as for classifiers
            (pretrained backbones are frozen).
        input_shape: ``(H, W, C)`` of the raw 0..255 input, C = 1 or 3.
        pooling: ``"avg"`` or ``"max"`` global pooling.
        output_bias: initial output bias, e.g. the training targets' means, so training
            starts from the mean predictor instead of 0; zeros by default.
        name: model name, ``"<backbone>_regressor"`` by default.
        **backbone_kwargs: passed to the backbone constructor (e.g. ``alpha``).
    """
    if not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"{backbone}: num_outputs must be an integer >= 1, got {num_outputs!r}")
    if output_bias is not None and len(output_bias) != num_outputs:
        raise ValueError(f"output_bias has {len(output_bias)} values for {num_outputs} outputs")
    inputs, x = build_pooled_backbone(backbone, weights, input_shape, pooling, **backbone_kwargs)
    for i, units in enumerate(HEAD_UNITS, start=1):
        x = layers.Dense(units, activation="relu", name=f"head_dense{i}")(x)
    bias = "zeros" if output_bias is None else keras.initializers.Constant([float(b) for b in output_bias])
    outputs = layers.Dense(num_outputs, bias_initializer=bias, dtype="float32", name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name=name or regressor_name(backbone))


@keras.saving.register_keras_serializable(package="caaxr_tf")
class ClampOutputs(keras.layers.Layer):
    """Clip column ``j`` of a ``[N, T]`` input to ``[lower[j], upper[j]]``."""

    def __init__(self, lower: Sequence[float], upper: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.lower = [float(v) for v in lower]
        self.upper = [float(v) for v in upper]
        if len(self.lower) != len(self.upper):
            raise ValueError(f"{len(self.lower)} lower bounds for {len(self.upper)} upper bounds")
        if any(low > high for low, high in zip(self.lower, self.upper)):
            raise ValueError(f"every lower bound must be <= its upper bound: {self.lower} vs {self.upper}")

    def call(self, inputs):
        lower = ops.convert_to_tensor(self.lower, dtype=inputs.dtype)
        upper = ops.convert_to_tensor(self.upper, dtype=inputs.dtype)
        return ops.minimum(ops.maximum(inputs, lower), upper)

    def compute_output_shape(self, input_shape):
        if input_shape[-1] is not None and input_shape[-1] != len(self.lower):
            raise ValueError(f"ClampOutputs has {len(self.lower)} bounds for input shape {input_shape}")
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "lower": self.lower, "upper": self.upper}


def serving_regressor(model: keras.Model, ranges: Mapping[str, tuple[float, float]]) -> keras.Model:
    """``model`` with its ``[N, T]`` output clamped to ``ranges`` and split by name.

    ``ranges`` maps each output name to ``(low, high)`` in column order, e.g.
    ``caaxr_tf.data.sources.covid_chestxray_severity.TARGET_RANGES`` = ``{"geographic_extent": (0, 8), "opacity":
    (0, 6)}``. The returned model outputs ``{name: [N]}`` (float32), which the export code
    turns into one signature output per name. Apply it at export only: training and
    validation use the raw outputs.
    """
    names = list(ranges)
    width = model.outputs[0].shape[-1] if len(model.outputs) == 1 else None
    if width != len(names):
        raise ValueError(f"{model.name} has output shape {[o.shape for o in model.outputs]}; expected [N, {len(names)}]")
    inputs = keras.Input(shape=model.inputs[0].shape[1:], name=model.inputs[0].name)
    clamped = ClampOutputs(
        [ranges[n][0] for n in names], [ranges[n][1] for n in names], dtype="float32", name="clamp"
    )(model(inputs))
    return keras.Model(inputs, {n: clamped[:, i] for i, n in enumerate(names)}, name=f"{model.name}_serving")


def _register(backbone: str) -> None:
    def builder(
        *,
        num_classes: int | None = None,
        input_shape: tuple[int, int, int] = (224, 224, 1),
        weights: str = NONE,
        **kwargs: Any,
    ) -> keras.Model:
        num_outputs = DEFAULT_NUM_OUTPUTS if num_classes is None else num_classes
        return build_regressor(backbone, num_outputs, weights=weights, input_shape=input_shape, **kwargs)

    name = regressor_name(backbone)
    builder.__name__ = name
    builder.__doc__ = f"Registry builder for the {backbone} regressor (see `build_regressor`); num_classes = outputs."
    register_model(name, task="regression")(builder)


for _backbone in BACKBONES:
    _register(_backbone)

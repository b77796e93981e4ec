"""CAAXR classifiers: a convolutional backbone and the paper's dense head.

    image [N, H, W, 1] in 0..255
      -> GrayscaleToRGB                (the backbones expect 3 channels)
      -> ImageNetPreprocessing(mode)   (the backbone's own preprocess_input)
      -> backbone (conv layers only, include_top=False)
      -> global average pooling        (collapses the final feature map to one
                                        vector per image; "max" is available)
      -> Dense 1024 ReLU -> Dense 512 ReLU -> Dense num_classes softmax

Preprocessing lives inside the model, so a saved model takes raw pixels.

`weights`:
  * `"none"`: random initialisation, the whole model is trainable.
  * `"imagenet"`: keras.applications ImageNet weights (downloaded or read from
    the Keras cache); the backbone is frozen and only the head trains, as in the
    paper. Offline without a cached file this raises `WeightsUnavailableError`
    (a `RuntimeError`). ResNet-18 has no Keras ImageNet weights: `ValueError`.
  * a path (`.weights.h5`, `.keras` or legacy `.h5`): weights of the *backbone
    alone* (e.g. `backbone.save_weights(...)` or the notop `.h5` file that
    keras.applications downloads) are loaded into the backbone, which is then
    frozen. A file of another architecture raises a one-line `ValueError`.
    To restore a whole trained classifier, build it with `weights="none"` and
    call `model.load_weights(path)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import keras
from keras import layers

from caaxr_tf.models.layers import GrayscaleToRGB, ImageNetPreprocessing, batch_norm_layers
from caaxr_tf.models.registry import register_model
from caaxr_tf.models.resnet18 import ResNet18
from caaxr_tf.models.weights import (
    IMAGENET,
    NONE,
    call_with_imagenet_weights,
    load_weights_file,
    normalize_weights,
)

logger = logging.getLogger(__name__)

HEAD_UNITS = (1024, 512)
POOLING = ("avg", "max")


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone: `factory(input_shape=, weights=, **kwargs)` -> conv model."""

    factory: Callable[..., keras.Model]
    preprocessing: str  # mode of ImageNetPreprocessing
    has_imagenet_weights: bool = True


def _application(constructor: Callable[..., keras.Model]) -> Callable[..., keras.Model]:
    def factory(*, input_shape, weights, **kwargs) -> keras.Model:
        return constructor(include_top=False, weights=weights, input_shape=input_shape, **kwargs)

    return factory


def _resnet18(*, input_shape, weights, **kwargs) -> keras.Model:
    if weights is not None:
        raise ValueError("ResNet18 is built without weights here; load files with load_weights_file")
    return ResNet18(include_top=False, input_shape=input_shape, **kwargs)


BACKBONES: dict[str, BackboneSpec] = {
    "densenet121": BackboneSpec(_application(keras.applications.DenseNet121), "torch"),
    "mobilenetv2": BackboneSpec(_application(keras.applications.MobileNetV2), "tf"),
    "vgg19": BackboneSpec(_application(keras.applications.VGG19), "caffe"),
    "resnet18": BackboneSpec(_resnet18, "torch", has_imagenet_weights=False),
}


def _build_backbone(backbone: str, spec: BackboneSpec, rgb_shape, weights: str, kwargs) -> keras.Model:
    if weights == IMAGENET:
        if not spec.has_imagenet_weights:
            raise ValueError(
                f"no Keras ImageNet weights exist for {backbone}; "
                "use --weights PATH (a weights file of the backbone) or --weights none"
            )
        return call_with_imagenet_weights(
            backbone, lambda: spec.factory(input_shape=rgb_shape, weights=IMAGENET, **kwargs)
        )
    model = spec.factory(input_shape=rgb_shape, weights=None, **kwargs)
    if weights != NONE:
        load_weights_file(model, weights, what=f"{backbone} backbone")
    return model


# Batch-norm momentum for backbones trained from scratch. keras.applications use 0.99-0.999,
# with which the moving statistics of a short run stay near their initial values and
# inference-mode outputs collapse to a constant; 0.9 is PyTorch's default (0.1).
FROM_SCRATCH_BN_MOMENTUM = 0.9


def _speed_up_batch_norm(model: keras.Model) -> None:
    for layer in batch_norm_layers(model):
        layer.momentum = min(layer.momentum, FROM_SCRATCH_BN_MOMENTUM)


def _imported_contract(backbone: str, weights: str) -> dict | None:
    """The ``.import.json`` beside a weights file written by ``caaxr import-weights`` (None if
    there is none): its preprocessing replaces the backbone's ImageNet preprocessing."""
    if weights in (NONE, IMAGENET):
        return None
    from caaxr_tf.weights.convert import read_sidecar, sidecar_path

    contract = read_sidecar(weights)
    if contract is not None and contract.get("backbone") != backbone:
        raise ValueError(
            f"{weights} was imported for {contract.get('backbone') or contract.get('model')} "
            f"({sidecar_path(weights)}), not {backbone}"
        )
    if contract is not None:
        logger.info("%s: imported %s weights, preprocessing %s", backbone, contract.get("source"),
                    contract["preprocessing"]["name"])
    return contract


def build_pooled_backbone(
    backbone: str,
    weights: str = NONE,
    input_shape: tuple[int, int, int] = (224, 224, 1),
    pooling: str = "avg",
    **backbone_kwargs: Any,
) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """The shared trunk of classifiers and regressors: ``(inputs, pooled features)``.

    raw grey (or RGB) input -> `GrayscaleToRGB` -> `ImageNetPreprocessing` -> backbone ->
    global pooling. ``weights`` as in `build_classifier`: with pretrained weights the
    backbone is frozen, from scratch it trains with faster batch-norm statistics.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}")
    if pooling not in POOLING:
        raise ValueError(f"pooling must be one of {POOLING}, got {pooling!r}")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] not in (1, 3):
        raise ValueError(f"input_shape must be (H, W, 1) or (H, W, 3), got {input_shape}")
    weights = normalize_weights(weights)
    spec = BACKBONES[backbone]
    rgb_shape = input_shape[:2] + (3,)
    imported = _imported_contract(backbone, weights)

    features = _build_backbone(backbone, spec, rgb_shape, weights, backbone_kwargs)
    if imported is not None:
        from caaxr_tf.weights.convert import set_torch_bn_epsilon

        set_torch_bn_epsilon(features)
    features.trainable = weights == NONE
    if weights == NONE:
        logger.info("%s: random initialisation, backbone trainable", backbone)
        _speed_up_batch_norm(features)
    else:
        logger.info("%s: weights from %s, backbone frozen (only the head trains)", backbone, weights)

    inputs = keras.Input(shape=input_shape, name="image")
    x = GrayscaleToRGB(name="to_rgb")(inputs) if input_shape[-1] == 1 else inputs
    if imported is not None:  # the imported network's own input contract (e.g. torchxrayvision)
        from caaxr_tf.weights.layers import preprocessing_layer

        x = preprocessing_layer(imported["preprocessing"], name="preprocess")(x)
    else:
        x = ImageNetPreprocessing(spec.preprocessing, name="preprocess")(x)
    x = features(x)
    if pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    else:
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    return inputs, x


def build_classifier(
    backbone: str,
    num_classes: int,
    weights: str = NONE,
    input_shape: tuple[int, int, int] = (224, 224, 1),
    pooling: str = "avg",
    name: str | None = None,
    **backbone_kwargs: Any,
) -> keras.Model:
    """Backbone + global pooling + Dense(1024) + Dense(512) + softmax.

    Args:
        backbone: one of `BACKBONES` ("densenet121", "mobilenetv2", "vgg19", "resnet18").
        num_classes: number of softmax outputs (at least 2).
        weights: `"none"`, `"imagenet"` or a path to backbone weights (see module doc).
        input_shape: `(H, W, C)` of the raw 0..255 input; C is 1 (replicated
            to RGB inside the model) or 3.
        pooling: `"avg"` (global average pooling, the paper's head) or `"max"`.
        name: model name, `"<backbone>_classifier"` by default.
        **backbone_kwargs: passed to the backbone constructor (e.g. `alpha` for
            MobileNetV2).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{backbone}: num_classes must be an integer >= 2, got {num_classes!r}")
    inputs, x = build_pooled_backbone(backbone, weights, input_shape, pooling, **backbone_kwargs)
    for i, units in enumerate(HEAD_UNITS, start=1):
        x = layers.Dense(units, activation="relu", name=f"head_dense{i}")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name or f"{backbone}_classifier")


def _register(backbone: str) -> None:
    def builder(
        *,
        num_classes: int | None = None,
        input_shape: tuple[int, int, int] = (224, 224, 1),
        weights: str = NONE,
        **kwargs: Any,
    ) -> keras.Model:
        if num_classes is None:
            raise ValueError(f"{backbone} is a classifier: pass num_classes")
        return build_classifier(backbone, num_classes, weights=weights, input_shape=input_shape, **kwargs)

    builder.__name__ = backbone
    builder.__doc__ = f"Registry builder for the {backbone} classifier (see `build_classifier`)."
    register_model(backbone, task="classification")(builder)


for _name in BACKBONES:
    _register(_name)

"""Name -> model builder registry.

Builders are registered with `@register_model(name, task=...)` and called as
`builder(num_classes=..., input_shape=..., weights=..., **kwargs)`.
`build_model` is the single entry point used by the training and evaluation code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import keras

from caaxr_tf.registry import Registry

Builder = Callable[..., keras.Model]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str
    builder: Builder


# Every module of the caaxr_tf.models package is imported on the first lookup (each registers
# its builders); see caaxr_tf/registry.py.
MODELS: Registry[ModelSpec] = Registry("model", package="caaxr_tf.models",
                                       origin=lambda spec: repr(spec.builder))


# The kinds of output a model can have; a task names one as its ``model_task``. Kept here, not read
# from the task registry: models sit below tasks and never import them (tests/test_import_layers.py).
MODEL_KINDS = ("classification", "detection", "regression", "segmentation")


def model_kinds() -> tuple[str, ...]:
    """The kinds a model can be (each task's ``model_task`` is one of them)."""
    return MODEL_KINDS


def _check_kind(task: str) -> None:
    kinds = model_kinds()
    if task not in kinds:
        raise ValueError(f"task must be one of {kinds}, got {task!r}")


def register_model(name: str, *, task: str = "classification") -> Callable[[Builder], Builder]:
    """Decorator registering `builder` under `name` for `task` (a task's ``model_task``, checked
    when the model is looked up)."""

    def decorator(builder: Builder) -> Builder:
        MODELS.register(name, ModelSpec(name=name, task=task, builder=builder))
        return builder

    return decorator


def _spec(name: str) -> ModelSpec:
    spec = MODELS.get(name)
    _check_kind(spec.task)
    return spec


def available_models(task: str | None = None) -> list[str]:
    """Sorted registered model names, optionally only those for `task`."""
    if task is not None:
        _check_kind(task)
        return [name for name, spec in MODELS.items() if spec.task == task]
    return MODELS.names()


def model_task(name: str) -> str:
    """`"segmentation"`, `"classification"` or `"regression"` for a registered model."""
    return _spec(name).task


def build_model(
    name: str,
    *,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] = (224, 224, 1),
    weights: str = "none",
    **kwargs: Any,
) -> keras.Model:
    """Build the registered model `name`.

    Args:
        name: one of `available_models()`.
        num_classes: classes of a classifier (required there); segmentation
            models produce one sigmoid mask channel and accept `None` or `1`;
            for regressors the number of outputs (default 2).
        input_shape: `(height, width, channels)` of the raw 0..255 input.
        weights: `"none"`, `"imagenet"` (classifiers only) or a weights file
            path; see `caaxr_tf.models.classifier.build_classifier`.
        **kwargs: model-specific options (e.g. `base_filters` for UNet/SegNet,
            `alpha` for MobileNetV2, `pooling` for classifiers).
    """
    spec = _spec(name)
    return spec.builder(
        num_classes=num_classes, input_shape=tuple(input_shape), weights=weights, **kwargs
    )

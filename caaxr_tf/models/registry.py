"""Name -> model builder registry.

Builders are registered with `@register_model(name, task=...)` and called as
`builder(num_classes=..., input_shape=..., weights=..., **kwargs)`.
`build_model` is the single entry point used by the training and evaluation code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import keras

TASKS = ("segmentation", "detection", "classification", "regression")

Builder = Callable[..., keras.Model]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str
    builder: Builder


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, task: str = "classification") -> Callable[[Builder], Builder]:
    """Decorator registering `builder` under `name` for `task`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def decorator(builder: Builder) -> Builder:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.builder is not builder:
            raise ValueError(f"model name {name!r} is already registered by {existing.builder!r}")
        _REGISTRY[name] = ModelSpec(name=name, task=task, builder=builder)
        return builder

    return decorator


def _ensure_builtin_models() -> None:
    # Importing the package imports every model module, which registers them.
    importlib.import_module("caaxr_tf.models")


def _spec(name: str) -> ModelSpec:
    _ensure_builtin_models()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(available_models())}"
        ) from None


def available_models(task: str | None = None) -> list[str]:
    """Sorted registered model names, optionally only those for `task`."""
    _ensure_builtin_models()
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return sorted(n for n, s in _REGISTRY.items() if task is None or s.task == task)


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

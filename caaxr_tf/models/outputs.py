"""Model outputs: a traced predict function and the class scores / mask of a model's output.

Shared by evaluation, serving, the tasks and the domain modules (moved from
``caaxr_tf.evaluate``, ``caaxr_tf.tasks.segmentation`` and ``caaxr_tf.tasks.classification``,
which re-export them)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import tensorflow as tf


def predict_function(model) -> Callable[[Any], Any]:
    """``images -> numpy outputs`` through one graph traced for any batch size."""


    try:
        spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)
    except (AttributeError, TypeError, IndexError, ValueError):  # a subclassed model without known inputs
        spec = None
    if spec is None:
        step = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    else:
        step = tf.function(lambda images: model(images, training=False), input_signature=[spec])

    def predict(images) -> Any:
        outputs = step(tf.convert_to_tensor(images, tf.float32))
        if isinstance(outputs, dict):
            return {key: value.numpy() for key, value in outputs.items()}
        if isinstance(outputs, (list, tuple)):
            return outputs[0].numpy()  # a multi-output model's first output
        return outputs.numpy()

    return predict


def mask_output(outputs: Any) -> Any:
    """The mask probabilities of a model output: the tensor itself or its ``mask`` entry."""
    if isinstance(outputs, Mapping):
        if "mask" not in outputs:
            raise ValueError(f"the model returns a dict without a 'mask' entry (keys: {', '.join(outputs)})")
        return outputs["mask"]
    if isinstance(outputs, (list, tuple)):
        return outputs[0]
    return outputs


def class_scores(outputs: Any, num_classes: int) -> np.ndarray:
    """``[N, C]`` class probabilities; a single sigmoid column of a 2-class model becomes two."""
    if isinstance(outputs, dict):
        for key in ("probabilities", "predictions", "scores"):
            if key in outputs:
                outputs = outputs[key]
                break
        else:
            raise ValueError(f"the classifier returns a dict without class scores (keys: {', '.join(outputs)})")
    scores = np.asarray(outputs, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.shape[1] == 1 and num_classes == 2:
        scores = np.concatenate([1.0 - scores, scores], axis=1)
    if scores.shape[1] != num_classes:
        raise ValueError(f"the model outputs {scores.shape[1]} scores per image for {num_classes} classes")
    return scores

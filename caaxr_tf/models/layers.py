"""Small serialisable layers shared by the CAAXR models.

* `GrayscaleToRGB` repeats a single-channel image into three channels.
* `ImageNetPreprocessing` reproduces `keras.applications.*.preprocess_input`
  ("caffe", "tf" and "torch" modes) as a layer, so a saved model takes raw
  0..255 pixels.
* `MaxPoolingWithArgmax2D` / `MaxUnpooling2D` are the SegNet pooling pair: the
  encoder remembers where each maximum came from and the decoder puts it back
  there. Both are TensorFlow-only (they wrap `tf.nn.max_pool_with_argmax` and
  `tf.scatter_nd`, which have registered gradients and trace cleanly under
  `tf.function`, so models containing them export as SavedModels).
  `tf.nn.max_pool_with_argmax` has no XLA kernel, so the pooling layer sets
  `supports_jit = False`; `Model.compile(jit_compile="auto")` then stays off XLA.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import tensorflow as tf
from keras import ops

PACKAGE = "caaxr"

# Per-channel constants used by keras.applications.imagenet_utils.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
_TORCH_STD_RGB = (0.229, 0.224, 0.225)
PREPROCESSING_MODES = ("caffe", "tf", "torch")


def batch_norm_layers(model: keras.layers.Layer, trainable_only: bool = False) -> list:
    """Every BatchNormalization layer inside ``model``, nested models (functional sub-models
    and sub-models held as attributes of a subclassed model) included, each once."""
    found, stack, seen = [], [model], set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, keras.layers.BatchNormalization):
            if layer.trainable or not trainable_only:
                found.append(layer)
            continue
        stack.extend(getattr(layer, "layers", []) or [])
        stack.extend(v for v in vars(layer).values() if isinstance(v, keras.Model))
    return found


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value}")
    return value


@keras.saving.register_keras_serializable(package=PACKAGE)
class GrayscaleToRGB(keras.layers.Layer):
    """Repeat a `[..., 1]` image into `[..., 3]` (channels-last)."""

    def call(self, inputs):
        return ops.repeat(inputs, 3, axis=-1)

    def compute_output_shape(self, input_shape):
        if input_shape[-1] not in (1, None):
            raise ValueError(f"GrayscaleToRGB expects one channel, got input shape {input_shape}")
        return tuple(input_shape[:-1]) + (3,)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ImageNetPreprocessing(keras.layers.Layer):
    """`preprocess_input` of keras.applications as a layer (channels-last RGB in 0..255).

    Args:
        mode: `"caffe"` (RGB->BGR, subtract the ImageNet BGR mean; VGG),
            `"tf"` (scale to [-1, 1]; MobileNetV2) or
            `"torch"` (scale to [0, 1], subtract the ImageNet mean and divide
            by the std per channel; DenseNet, ResNet-18).
    """

    def __init__(self, mode: str = "torch", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"mode must be one of {PREPROCESSING_MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN_RGB, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_TORCH_STD_RGB, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        mean = ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        return ops.flip(x, axis=-1) - mean

    def compute_output_shape(self, input_shape):
        if input_shape[-1] != 3:
            raise ValueError(f"ImageNetPreprocessing expects RGB input, got shape {input_shape}")
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaxPoolingWithArgmax2D(keras.layers.Layer):
    """Max pooling that also returns the flat position of every maximum.

    Returns `(pooled, argmax)`; `argmax` is int64 and indexes the flattened
    input *including the batch axis*:
    `((b * height + y) * width + x) * channels + c`.
    """

    def __init__(
        self,
        pool_size: int | Sequence[int] = 2,
        strides: int | Sequence[int] | None = None,
        padding: str = "same",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.pool_size = _pair(pool_size, "pool_size")
        self.strides = _pair(strides if strides is not None else self.pool_size, "strides")
        if padding.lower() not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        self.padding = padding.lower()
        self.supports_jit = False  # MaxPoolWithArgmax has no XLA kernel.

    def call(self, inputs):
        pooled, argmax = tf.nn.max_pool_with_argmax(
            inputs,
            ksize=self.pool_size,
            strides=self.strides,
            padding=self.padding.upper(),
            output_dtype=tf.int64,
            include_batch_in_index=True,
        )
        return pooled, argmax

    def _pooled_shape(self, input_shape):
        batch, height, width, channels = input_shape
        out = []
        for size, pool, stride in zip((height, width), self.pool_size, self.strides):
            if size is None:
                out.append(None)
            elif self.padding == "same":
                out.append(-(-size // stride))
            else:
                out.append((size - pool) // stride + 1)
        return (batch, out[0], out[1], channels)

    def compute_output_spec(self, inputs):
        shape = self._pooled_shape(inputs.shape)
        return (
            keras.KerasTensor(shape, dtype=inputs.dtype),
            keras.KerasTensor(shape, dtype="int64"),
        )

    def compute_output_shape(self, input_shape):
        shape = self._pooled_shape(input_shape)
        return shape, shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "pool_size": self.pool_size,
            "strides": self.strides,
            "padding": self.padding,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaxUnpooling2D(keras.layers.Layer):
    """Scatter pooled values back to the positions recorded by `MaxPoolingWithArgmax2D`.

    Call on `[values, argmax]` or `[values, argmax, reference]`. The output has
    the spatial size of `reference` when given (use the tensor that was pooled,
    which handles odd sizes), else `size * pool_size`. Every other position is
    zero. The gradient with respect to `values` is the gather at `argmax`.
    """

    def __init__(self, pool_size: int | Sequence[int] = 2, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = _pair(pool_size, "pool_size")

    def call(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) not in (2, 3):
            raise ValueError("MaxUnpooling2D expects [values, argmax] or [values, argmax, reference]")
        values, argmax = inputs[0], inputs[1]
        values_shape = tf.shape(values, out_type=tf.int64)
        if len(inputs) == 3:
            reference_shape = tf.shape(inputs[2], out_type=tf.int64)
            height, width = reference_shape[1], reference_shape[2]
        else:
            height = values_shape[1] * self.pool_size[0]
            width = values_shape[2] * self.pool_size[1]
        output_shape = tf.stack([values_shape[0], height, width, values_shape[3]])
        flat = tf.scatter_nd(
            tf.reshape(tf.cast(argmax, tf.int64), [-1, 1]),
            tf.reshape(values, [-1]),
            tf.reshape(tf.reduce_prod(output_shape), [1]),
        )
        outputs = tf.reshape(flat, output_shape)
        return tf.ensure_shape(outputs, self._unpooled_shape([t.shape for t in inputs]))

    def _unpooled_shape(self, input_shapes):
        values_shape = tuple(input_shapes[0])
        if len(input_shapes) == 3:
            height, width = tuple(input_shapes[2])[1:3]
        else:
            height, width = (
                None if size is None else size * pool
                for size, pool in zip(values_shape[1:3], self.pool_size)
            )
        return (values_shape[0], height, width, values_shape[3])

    def compute_output_shape(self, input_shapes):
        return self._unpooled_shape(input_shapes)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pool_size": self.pool_size}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TemperatureScaling(keras.layers.Layer):
    """Probabilities ``p`` [N, C] (rows summing to 1) → ``softmax(log(p) / temperature)``.

    The log of a softmax is the logits minus a per-row constant, so this equals
    ``softmax(logits / temperature)`` of the model's logits: temperature scaling (Guo et al.,
    2017) applied after a model that outputs probabilities. ``p`` is clipped at 1e-12 as
    ``caaxr_tf.metrics.calibration.logits_from_probabilities`` does, so the layer and the NumPy
    fit agree. Dividing by ``temperature > 0`` keeps the order of the classes.
    """

    def __init__(self, temperature: float, **kwargs: Any):
        super().__init__(**kwargs)
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def call(self, probabilities):
        logits = ops.log(ops.clip(ops.cast(probabilities, "float32"), 1e-12, 1.0))
        return ops.softmax(logits / self.temperature, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "temperature": self.temperature}

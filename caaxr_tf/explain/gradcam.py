"""Grad-CAM (Selvaraju et al., 2017) for the project's classifiers and any functional model.

    from caaxr_tf.explain import GradCam
    explainer = GradCam(model)                 # default layer, scores = logits
    result = explainer(images)                 # images [N, H, W, 1] in 0..255
    result.cam                                 # [N, H, W] float32 in 0..1
    result.class_index, result.predictions     # the explained class, the model's output

For the class ``c`` of an image, with ``A`` the target layer's feature map [h, w, K] and
``y_c`` the class score (the pre-softmax logit by default):

    alpha_k  = mean over (i, j) of d y_c / d A[i, j, k]       (channel weights)
    cam_low  = ReLU(sum_k alpha_k A[:, :, k])                  [h, w], ``cam_low_res``
    cam      = bilinear resize of cam_low to the input size    (tf.image.resize, half-pixel
               centres), divided by its maximum                [H, W] in 0..1; an all-zero
                                                               map stays zero

**Default target layer.** The last layer, in the model's topological order, whose output is
a single 4-D feature map ``[N, h, w, K]`` with ``(h, w) != (1, 1)``; a nested model (the
backbone of ``build_classifier``) met on the way back from the output is searched inside. For the
classifiers this is the backbone's output: DenseNet121 ``relu``, MobileNetV2 ``out_relu``,
VGG19 ``block5_pool`` (pass ``layer="vgg19/block5_conv4"`` for the 2x finer map before the
pool), ResNet18 ``stage4_block2_out``. Layer names may be given as a path
(``"densenet121/relu"``) or as a bare name found anywhere in the model if it is unique.

**Nested models.** Keras 3 cannot build a model whose output is a layer inside a nested
sub-model (that tensor belongs to the sub-model's own graph). The graph is therefore rebuilt
from a fresh input with `keras.models.clone_model` sharing every layer (no weights are copied):
where the nested model holding the target is called, a model returning ``[target output,
nested output]`` is called instead, recursively for deeper nesting. The rebuilt model returns
the feature map, the class scores and the predictions from one forward pass.

**Scores.** ``score="logit"`` (default, as in the paper) differentiates the pre-activation of
the output layer: a ``Dense`` layer with softmax/sigmoid activation (its kernel and bias, shared)
or the input of a final softmax/sigmoid ``Activation`` layer; a linear output is its own logit.
``score="probability"`` differentiates the model's output. A model with a single sigmoid
output is read as two classes: ``[-z, z]`` (logit) or ``[1 - p, p]`` (probability).

**Serving.** `make_cam_function` returns a ``tf.function`` whose graph contains the gradient
computation, so it can be called from a SavedModel signature (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

SCORES = ("logit", "probability")
PATH_SEPARATOR = "/"
_SQUASHING = ("softmax", "sigmoid")


@dataclass(frozen=True)
class GradCamResult:
    """Grad-CAM of a batch, as numpy arrays.

    Attributes:
        cam: [N, H, W] float32 in 0..1 at the output size (the input size by default).
        cam_low_res: [N, h, w] float32, ``ReLU(sum_k alpha_k A_k)`` at the feature-map size,
            not normalised.
        class_index: [N] int32, the class each map explains.
        predictions: [N, C] float32, the model's output (two columns for a single sigmoid).
    """

    cam: np.ndarray
    cam_low_res: np.ndarray
    class_index: np.ndarray
    predictions: np.ndarray


# --------------------------------------------------------------------------- layer lookup


def _is_nested_model(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.Model)


def _is_spatial_feature_map(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, keras.layers.InputLayer):
        return False
    try:
        output = layer.output
    except (AttributeError, ValueError):  # a layer that was never called
        return False
    if isinstance(output, (list, tuple, dict)):
        return False
    shape = tuple(output.shape)
    return len(shape) == 4 and shape[1:3] != (1, 1)


def _layers_of(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _default_path(model: keras.Model) -> tuple[str, ...] | None:
    for layer in reversed(_layers_of(model)):
        if _is_nested_model(layer):
            inner = _default_path(layer)
            if inner is not None:
                return (layer.name,) + inner
        elif _is_spatial_feature_map(layer):
            return (layer.name,)
    return None


def default_target_layer(model: keras.Model) -> str:
    """Path of the default Grad-CAM layer: the last 4-D spatial feature map (see module doc)."""
    path = _default_path(model)
    if path is None:
        raise ValueError(f"{model.name}: no layer with a 4-D spatial output [N, h, w, K]; pass layer=NAME")
    return PATH_SEPARATOR.join(path)


def _find_paths(model: keras.Model, name: str, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for layer in _layers_of(model):
        if layer.name == name:
            found.append(prefix + (layer.name,))
        if _is_nested_model(layer):
            found.extend(_find_paths(layer, name, prefix + (layer.name,)))
    return found


def resolve_layer_path(model: keras.Model, layer: str | None = None) -> tuple[str, ...]:
    """``layer`` (``None``, a path ``"outer/inner"`` or a unique bare name) -> its path."""
    if layer is None:
        return tuple(default_target_layer(model).split(PATH_SEPARATOR))
    if PATH_SEPARATOR in layer:
        path = tuple(part for part in layer.split(PATH_SEPARATOR))
        current: keras.layers.Layer = model
        for depth, part in enumerate(path):
            if not _is_nested_model(current):
                inside = PATH_SEPARATOR.join(path[:depth])
                raise ValueError(f"layer path {layer!r}: {inside!r} is not a model with layers")
            names = [sub.name for sub in _layers_of(current)]
            if part not in names:
                raise ValueError(
                    f"layer path {layer!r}: no layer {part!r} in {current.name!r}; "
                    f"it has {', '.join(names)}"
                )
            current = current.get_layer(part)
        return path
    paths = _find_paths(model, layer)
    if not paths:
        raise ValueError(
            f"no layer named {layer!r} in {model.name!r} or its nested models; "
            f"the default would be {default_target_layer(model)!r}"
        )
    if len(paths) > 1:
        listed = ", ".join(PATH_SEPARATOR.join(p) for p in paths)
        raise ValueError(f"layer name {layer!r} is ambiguous ({listed}); pass the full path")
    return paths[0]


# --------------------------------------------------------------------------- graph rebuild


class _DenseLogits(keras.layers.Layer):
    """The pre-activation of a ``Dense`` layer, reading its kernel and bias (shared, not copied).

    Used only inside the Grad-CAM graph, never saved as a Keras layer.
    """

    def __init__(self, dense: keras.layers.Dense, **kwargs: Any):
        super().__init__(name=f"{dense.name}_logits", dtype=dense.dtype_policy, **kwargs)
        self.dense = dense

    def call(self, inputs):
        logits = keras.ops.matmul(inputs, self.dense.kernel)
        if self.dense.bias is not None:
            logits = logits + self.dense.bias
        return logits

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.dense.units,)


def _activation_name(layer: keras.layers.Layer) -> str | None:
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None) if activation is not None else None


def _identity(layer: keras.layers.Layer) -> keras.layers.Layer:
    return layer


def _model_input(model: keras.Model) -> keras.KerasTensor:
    """The single symbolic input of ``model`` (``model.input`` fails on an uncalled Sequential)."""
    inputs = model.inputs
    if len(inputs) != 1:
        raise ValueError(f"Grad-CAM needs a model with one image input; {model.name!r} has {len(inputs)}")
    return inputs[0]


def _rebuild(
    model: keras.Model, call_layer: Callable[..., Any]
) -> tuple[keras.KerasTensor, Any]:
    """Run ``model``'s graph on a fresh input, each layer called through ``call_layer``.

    Returns (input, outputs). Functional models use ``clone_model(call_function=...)`` with
    the layers themselves as their clones (shared weights); Sequential models are a chain.
    """
    if isinstance(model, keras.Sequential):
        original = _model_input(model)
        inputs = keras.Input(batch_shape=original.shape, dtype=original.dtype)
        outputs = inputs
        for layer in model.layers:
            outputs = call_layer(layer, outputs)
        return inputs, outputs
    if not hasattr(model, "_nodes_by_depth"):
        raise TypeError(
            f"Grad-CAM needs a functional or Sequential Keras model; {model.name!r} is a "
            f"subclassed {type(model).__name__}"
        )
    clone = keras.models.clone_model(model, clone_function=_identity, call_function=call_layer)
    return clone.input, clone.output


def _capturing_call(
    target: keras.layers.Layer, inner: keras.Model | None, where: str
) -> tuple[Callable[..., Any], list[Any]]:
    """A ``call_layer`` for `_rebuild` that records the feature map of ``target``.

    ``inner`` (for a target inside the nested model ``target``) returns ``[features, output]``
    and is called in its place. Returns (call_layer, the list the feature map is put in).
    """
    captured: list[Any] = []

    def call_layer(layer, *args, **kwargs):
        if layer is not target:
            return layer(*args, **kwargs)
        if captured:
            raise ValueError(f"layer {where!r} is called more than once; pick a layer used once")
        if inner is None:
            outputs = features = layer(*args, **kwargs)
        else:
            features, outputs = inner(*args, **kwargs)
        if isinstance(features, (list, tuple, dict)):
            raise ValueError(f"layer {where!r} has several outputs; pick another")
        captured.append(features)
        return outputs

    return call_layer, captured


def _captured_features(captured: list[Any], where: str) -> Any:
    if not captured:
        raise ValueError(f"layer {where!r} is not on the path from the input to the output")
    return captured[0]


def _split_model(model: keras.Model, path: tuple[str, ...]) -> keras.Model:
    """A model from ``model``'s input to ``[output of the layer at path, model output]``."""
    target = model.get_layer(path[0])
    inner = _split_model(target, path[1:]) if len(path) > 1 else None
    where = PATH_SEPARATOR.join((model.name,) + path)
    call_layer, captured = _capturing_call(target, inner, where)
    inputs, outputs = _rebuild(model, call_layer)
    return keras.Model(inputs, [_captured_features(captured, where), outputs], name=f"{model.name}_split")


def _logits_or_none(layer: keras.layers.Layer, args: tuple, kwargs: dict) -> Any:
    """The pre-activation of a softmax/sigmoid ``Dense`` or ``Activation`` call, else None."""
    if _activation_name(layer) not in _SQUASHING:
        return None
    if isinstance(layer, keras.layers.Dense):
        return _DenseLogits(layer)(*args, **kwargs)
    if isinstance(layer, keras.layers.Activation):
        return args[0]
    return None


def build_cam_model(model: keras.Model, layer: str | None = None, score: str = "logit") -> keras.Model:
    """The model ``images -> {"features", "scores", "predictions"}`` behind `GradCam`.

    ``features``: the target layer's map [N, h, w, K]; ``scores``: the class scores that
    are differentiated (logits or the output, see module doc); ``predictions``: the model's
    output. Every layer is shared with ``model``.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    path = resolve_layer_path(model, layer)
    where = PATH_SEPARATOR.join(path)
    first = model.get_layer(path[0])
    inner = _split_model(first, path[1:]) if len(path) > 1 else None
    capture, captured = _capturing_call(first, inner, where)
    logits_of: dict[int, Any] = {}  # id(output tensor) -> its pre-activation

    def call_layer(layer_, *args, **kwargs):
        outputs = capture(layer_, *args, **kwargs)
        if score == "logit" and layer_ is not first:
            logits = _logits_or_none(layer_, args, kwargs)
            if logits is not None:
                logits_of[id(outputs)] = logits
        return outputs

    inputs, predictions = _rebuild(model, call_layer)
    features = _captured_features(captured, where)
    if isinstance(predictions, (list, tuple, dict)) or len(predictions.shape) != 2:
        raise ValueError(f"{model.name!r} must have one output of class scores [N, C]")
    if score == "probability":
        scores = predictions
    elif id(predictions) in logits_of:
        scores = logits_of[id(predictions)]
    else:
        producer = predictions._keras_history[0]
        activation = _activation_name(producer)
        if isinstance(producer, keras.Model) or activation not in (None, "linear"):
            raise ValueError(
                f"cannot recover the logits of {model.name!r} from its output layer "
                f"{producer.name!r}; use score='probability'"
            )
        scores = predictions  # a linear output is its own logit
    outputs = {"features": features, "scores": scores, "predictions": predictions}
    return keras.Model(inputs, outputs, name=f"{model.name}_gradcam")


# --------------------------------------------------------------------------- Grad-CAM


def _two_columns(values: tf.Tensor, kind: str) -> tf.Tensor:
    """A single sigmoid column -> two classes: ``[-z, z]`` for logits, ``[1 - p, p]``."""
    if values.shape[-1] != 1:
        return values
    if kind == "logit":
        return tf.concat([-values, values], axis=-1)
    return tf.concat([1.0 - values, values], axis=-1)


def _spatial_size(model: keras.Model) -> tuple[int | None, int | None]:
    shape = tuple(_model_input(model).shape)
    return shape[1], shape[2]


class GradCam:
    """Grad-CAM for one model and target layer; the rebuilt graph is made once.

    Args:
        model: a functional or Sequential Keras model mapping images [N, H, W, C] to class
            scores [N, C] (the project's classifiers, or any model with a 4-D feature map).
        layer: the target layer (path or unique name); ``None``: the default (module doc).
        score: ``"logit"`` (default) or ``"probability"``.
        output_size: ``(H, W)`` of ``cam``; ``None``: the model's input size (or the images'
            size when the model accepts any size).
        run_eagerly: ``__call__`` runs `compute` eagerly instead of in a ``tf.function``.
            Tracing costs seconds to tens of seconds once (DenseNet121) and then runs about
            ten times faster on CPU: keep the default for more than a handful of batches.
    """

    def __init__(
        self,
        model: keras.Model,
        layer: str | None = None,
        score: str = "logit",
        output_size: tuple[int, int] | None = None,
        run_eagerly: bool = False,
    ):
        self.model = model
        self.run_eagerly = run_eagerly
        self.score = score
        self.layer_path = resolve_layer_path(model, layer)
        self.cam_model = build_cam_model(model, PATH_SEPARATOR.join(self.layer_path), score)
        if output_size is not None:
            output_size = tuple(int(v) for v in output_size)
            if len(output_size) != 2 or min(output_size) < 1:
                raise ValueError(f"output_size must be (height, width) > 0, got {output_size}")
        self.output_size = output_size
        self.input_dtype = _model_input(model).dtype
        # Traced (once each) on the first __call__ that needs them.
        image_spec = tf.TensorSpec((None,) + tuple(_model_input(model).shape[1:]), self.input_dtype)
        self._for_predicted_class = tf.function(
            self._compute_predicted, input_signature=[image_spec], autograph=False
        )
        self._for_given_class = tf.function(
            self.compute, input_signature=[image_spec, tf.TensorSpec([None], tf.int32)], autograph=False
        )

    @property
    def layer_name(self) -> str:
        return PATH_SEPARATOR.join(self.layer_path)

    @property
    def num_classes(self) -> int:
        return max(2, int(self.cam_model.output["predictions"].shape[-1]))

    def _output_size(self, images: tf.Tensor):
        if self.output_size is not None:
            return self.output_size
        height, width = _spatial_size(self.model)
        if height is None or width is None:
            return tf.shape(images)[1:3]
        return (height, width)

    def _class_index(self, class_index, predictions: tf.Tensor) -> tf.Tensor:
        count = tf.shape(predictions)[0]
        if class_index is None:
            return tf.argmax(predictions, axis=-1, output_type=tf.int32)
        index = tf.cast(tf.convert_to_tensor(class_index), tf.int32)
        index = tf.broadcast_to(tf.reshape(index, [-1]), [count]) if index.shape.rank == 0 else index
        with tf.control_dependencies(
            [
                tf.debugging.assert_equal(tf.size(index), count, message="one class index per image"),
                tf.debugging.assert_non_negative(index, message="class index < 0"),
                tf.debugging.assert_less(index, self.num_classes, message="class index >= classes"),
            ]
        ):
            return tf.identity(tf.reshape(index, [count]))

    def compute(self, images, class_index=None) -> dict[str, tf.Tensor]:
        """Grad-CAM as tensors (eager or inside a ``tf.function``).

        Args:
            images: [N, H, W, C] in the model's input range (0..255 for the classifiers).
            class_index: ``None`` (each image's predicted class), an int for every image, or
                [N] ints.

        Returns:
            ``{"cam": [N, H, W] in 0..1, "cam_low_res": [N, h, w], "class_index": [N] int32,
            "predictions": [N, C]}`` (float32).
        """
        images = tf.cast(tf.convert_to_tensor(images), self.input_dtype)
        with tf.GradientTape() as tape:
            # Watching the input records every op, also those of a frozen backbone, so the
            # gradient reaches the feature map whatever is trainable.
            tape.watch(images)
            outputs = self.cam_model(images, training=False)
            features = outputs["features"]
            scores = _two_columns(tf.cast(outputs["scores"], tf.float32), self.score)
            predictions = _two_columns(tf.cast(outputs["predictions"], tf.float32), "probability")
            index = self._class_index(class_index, predictions)
            # Each image's score depends only on its own features (inference mode), so one
            # gradient of the sum gives every image its own gradient.
            selected = tf.reduce_sum(tf.gather(scores, index, axis=1, batch_dims=1))
        gradients = tape.gradient(selected, features)
        if gradients is None:
            raise ValueError(f"the class scores do not depend on layer {self.layer_name!r}")
        features = tf.cast(features, tf.float32)
        weights = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=[1, 2])  # [N, K]
        cam_low_res = tf.nn.relu(tf.einsum("nhwk,nk->nhw", features, weights))
        cam = tf.image.resize(cam_low_res[..., None], self._output_size(images), method="bilinear")
        cam = cam[..., 0]
        peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)
        return {
            "cam": cam,
            "cam_low_res": cam_low_res,
            "class_index": index,
            "predictions": predictions,
        }

    def _compute_predicted(self, images) -> dict[str, tf.Tensor]:
        return self.compute(images)

    def __call__(self, images, class_index=None, batch_size: int | None = None) -> GradCamResult:
        """Grad-CAM as numpy arrays, in batches of ``batch_size`` (all at once if None).

        Runs `compute` in a ``tf.function`` traced once for the predicted class and once for
        given classes (or eagerly with ``run_eagerly``); ``class_index`` is as in `compute`.
        """
        images = np.asarray(images, dtype=self.input_dtype)
        if images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
        count = images.shape[0]
        if class_index is not None:
            class_index = np.broadcast_to(np.asarray(class_index, dtype=np.int32), (count,))
            if np.any(class_index < 0) or np.any(class_index >= self.num_classes):
                raise ValueError(
                    f"class_index must be in 0..{self.num_classes - 1}, got {class_index.tolist()}"
                )
        step = batch_size or max(count, 1)
        parts = []
        for start in range(0, count, step):
            batch = images[start : start + step]
            if self.run_eagerly:
                chosen = None if class_index is None else class_index[start : start + step]
                outputs = self.compute(batch, chosen)
            elif class_index is None:
                outputs = self._for_predicted_class(batch)
            else:
                outputs = self._for_given_class(batch, class_index[start : start + step])
            parts.append({key: value.numpy() for key, value in outputs.items()})
        if not parts:
            raise ValueError("no images")
        merged = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        return GradCamResult(
            cam=merged["cam"].astype(np.float32),
            cam_low_res=merged["cam_low_res"].astype(np.float32),
            class_index=merged["class_index"].astype(np.int32),
            predictions=merged["predictions"].astype(np.float32),
        )


def grad_cam(
    model: keras.Model,
    images,
    class_index=None,
    layer: str | None = None,
    score: str = "logit",
    output_size: tuple[int, int] | None = None,
) -> GradCamResult:
    """One-call Grad-CAM: ``GradCam(model, layer, score, output_size)(images, class_index)``."""
    return GradCam(model, layer=layer, score=score, output_size=output_size)(images, class_index)


def make_cam_function(
    model: keras.Model,
    layer: str | None = None,
    score: str = "logit",
    output_size: tuple[int, int] | None = None,
) -> tf.types.experimental.PolymorphicFunction:
    """A ``tf.function(images, class_index=None) -> dict`` of `GradCam.compute`.

    The gradients are part of the traced graph, so the function can back a SavedModel
    signature. The variables it reads belong to ``model``: keep ``model`` tracked by the saved
    object (``module.model = model`` on a ``tf.Module``; a ``keras.export.ExportArchive``
    tracks captured variables itself)::

        cam_fn = make_cam_function(model, output_size=(224, 224))
        module = tf.Module(); module.model = model
        module.serve = tf.function(
            lambda images: cam_fn(images),
            input_signature=[tf.TensorSpec([None, 224, 224, 1], tf.float32, name="images")])
        tf.saved_model.save(module, path, signatures={"serving_default": module.serve})

    ``class_index`` (``None``: the predicted class, or an int32 tensor [N] / scalar) picks the
    explained class, e.g. ``tf.fill([n], covid_index)`` for the COVID-class map.
    """
    explainer = GradCam(model, layer=layer, score=score, output_size=output_size)

    @tf.function
    def cam_function(images, class_index=None):
        return explainer.compute(images, class_index)

    cam_function.explainer = explainer  # keeps the rebuilt graph alive and inspectable
    return cam_function


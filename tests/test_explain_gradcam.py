"""Grad-CAM against references computed step by step, on tiny models and the real classifiers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tolerances import KERNEL_ATOL, KERNEL_RTOL
import tensorflow as tf

from caaxr_tf.explain.gradcam import (
    GradCam,
    build_cam_model,
    default_target_layer,
    grad_cam,
    make_cam_function,
    resolve_layer_path,
)
from caaxr_tf.models import build_classifier

pytestmark = [
    pytest.mark.numerics,  # numerics: rerun with oneDNN off by `make test` (tolerances.py)
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


# --------------------------------------------------------------------------- references


def bilinear_resize(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """[N, h, w] -> [N, height, width], half-pixel centres, edges clamped (TF's bilinear)."""

    def weights(size_in: int, size_out: int) -> np.ndarray:
        matrix = np.zeros((size_out, size_in))
        for out in range(size_out):
            source = (out + 0.5) * size_in / size_out - 0.5
            low = int(np.floor(source))
            frac = source - low
            for index, weight in ((low, 1.0 - frac), (low + 1, frac)):
                matrix[out, min(max(index, 0), size_in - 1)] += weight
        return matrix

    rows = weights(maps.shape[1], height)
    cols = weights(maps.shape[2], width)
    return np.einsum("yh,nhw,xw->nyx", rows, maps, cols)


def normalise(maps: np.ndarray) -> np.ndarray:
    peak = maps.max(axis=(1, 2), keepdims=True)
    return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def cam_from(features: np.ndarray, gradients: np.ndarray, size: tuple[int, int]):
    """The Grad-CAM steps: channel weights, weighted sum, ReLU, upsampling, normalisation."""
    alpha = gradients.mean(axis=(1, 2))  # [N, K]
    low = np.maximum(np.einsum("nhwk,nk->nhw", features, alpha), 0.0)
    return normalise(bilinear_resize(low, *size)), low


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def tiny_flat_model(seed: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 1))
    x = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(5, 3, strides=2, padding="same", activation="relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs)


def tiny_nested_model(seed: int = 5, size: int = 16) -> keras.Model:
    """A backbone sub-model (with its own input) nested in a model with a two-layer head."""
    keras.utils.set_random_seed(seed)
    inner_in = keras.Input((size, size, 3))
    y = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inner_in)
    y = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="c2")(y)
    y = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="c3")(y)
    y = keras.layers.Activation("relu", name="last")(y)
    backbone = keras.Model(inner_in, y, name="backbone")
    inputs = keras.Input((size, size, 1), name="image")
    x = keras.layers.Concatenate(name="rgb")([inputs, inputs, inputs])
    x = keras.layers.Rescaling(1 / 255.0, name="scale")(x)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(7, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="nested")


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 1)).astype(np.float32)


# --------------------------------------------------------------------------- tiny model


@pytest.mark.parametrize("score", ["logit", "probability"])
def test_grad_cam_matches_the_analytic_reference_on_a_tiny_model(score):
    model = tiny_flat_model()
    x = images(3, 12)
    features = keras.Model(model.input, model.get_layer("features").output)(x).numpy()  # [3, 6, 6, 5]
    kernel, bias = (w.numpy() for w in model.get_layer("predictions").weights)
    logits = features.mean(axis=(1, 2)) @ kernel + bias
    probabilities = softmax(logits)
    predicted = probabilities.argmax(axis=1)
    area = features.shape[1] * features.shape[2]
    # d z_c / d A[i, j, k] = W[k, c] / (h w) for global average pooling + Dense.
    if score == "logit":
        grad_per_channel = kernel[:, predicted].T / area  # [N, K]
    else:  # d p_c / d z_j = p_c (delta_cj - p_j)
        n = np.arange(len(x))
        jacobian = -probabilities[n, predicted][:, None] * probabilities
        jacobian[n, predicted] += probabilities[n, predicted]
        grad_per_channel = jacobian @ kernel.T / area
    gradients = np.broadcast_to(grad_per_channel[:, None, None, :], features.shape)
    expected_cam, expected_low = cam_from(features, gradients, (12, 12))

    result = grad_cam(model, x, score=score, layer="features")

    assert result.cam.shape == (3, 12, 12) and result.cam.dtype == np.float32
    assert result.cam_low_res.shape == (3, 6, 6)
    np.testing.assert_array_equal(result.class_index, predicted)
    np.testing.assert_allclose(result.predictions, probabilities, rtol=KERNEL_RTOL, atol=1e-6)  # traced vs eager
    np.testing.assert_allclose(result.cam_low_res, expected_low, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.cam, expected_cam, atol=1e-5)
    # Not a vacuous comparison: every map has its maximum 1 and some spatial structure.
    np.testing.assert_allclose(result.cam.max(axis=(1, 2)), 1.0, rtol=1e-6)
    assert all(len(np.unique(cam)) > 10 or 0.05 < np.mean(cam > 0) < 1 for cam in result.cam)
    assert (result.cam >= 0).all() and (result.cam <= 1).all()


def test_default_layer_of_a_flat_model_and_given_class_indices():
    model = tiny_flat_model()
    x = images(2, 12, seed=1)
    assert default_target_layer(model) == "features"
    by_default = GradCam(model)
    for index in range(4):
        one = by_default(x, class_index=index)
        np.testing.assert_array_equal(one.class_index, [index, index])
        per_image = by_default(x, class_index=[index, (index + 1) % 4])
        np.testing.assert_allclose(per_image.cam[0], one.cam[0], atol=KERNEL_ATOL)  # other batches, other kernels
    # A map for another class differs (the test would not notice a class mix-up otherwise).
    assert not np.allclose(by_default(x, 0).cam_low_res, by_default(x, 1).cam_low_res)
    with pytest.raises(ValueError, match="class_index must be in 0..3"):
        by_default(x, class_index=4)
    batched = by_default(np.concatenate([x, x]), batch_size=3)
    np.testing.assert_allclose(batched.cam[:2], batched.cam[2:], atol=KERNEL_ATOL)  # batches of 3 and 1


# --------------------------------------------------------------------------- nested models


def nested_reference(model, backbone, pre_layers, head_layers, output_layer, x, class_index):
    """Step by step: preprocessing, the backbone's map A, the head on A, the class logit."""
    pre = tf.constant(x)
    for layer in pre_layers:
        pre = layer(pre)
    with tf.GradientTape() as tape:
        features = backbone(pre, training=False)
        tape.watch(features)
        hidden = features
        for layer in head_layers:
            hidden = layer(hidden)
        kernel, bias = output_layer.weights
        logits = tf.matmul(hidden, kernel) + bias
        selected = tf.reduce_sum(tf.gather(logits, class_index, axis=1, batch_dims=1))
    gradients = tape.gradient(selected, features)
    return features.numpy(), gradients.numpy(), softmax(logits.numpy())


def test_nested_tiny_model_matches_the_step_by_step_reference():
    model = tiny_nested_model()
    x = images(2, 16, seed=2)
    assert default_target_layer(model) == "backbone/last"
    explainer = GradCam(model)
    layers = {name: model.get_layer(name) for name in ("rgb", "scale", "pool", "hidden", "predictions")}
    nonzero = 0
    for c in range(3):
        index = np.array([c, c], np.int32)
        features, gradients, probabilities = nested_reference(
            model, model.get_layer("backbone"), [lambda t: layers["rgb"]([t, t, t]), layers["scale"]],
            [layers["pool"], layers["hidden"]], layers["predictions"], x, index,
        )
        expected_cam, expected_low = cam_from(features, gradients, (16, 16))
        result = explainer(x, class_index=c)
        np.testing.assert_allclose(result.cam_low_res, expected_low, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.cam, expected_cam, atol=1e-5)
        np.testing.assert_allclose(result.predictions, probabilities, rtol=KERNEL_RTOL, atol=1e-6)  # traced vs eager
        nonzero += int((result.cam.max(axis=(1, 2)) > 0).sum())
        eager = GradCam(model, run_eagerly=True)(x, class_index=c)  # and traced == eager
        np.testing.assert_allclose(eager.cam, result.cam, atol=KERNEL_ATOL)  # eager vs traced
    assert nonzero >= 3


@pytest.mark.parametrize(
    "backbone, layer",
    [
        ("resnet18", "resnet18/stage4_block2_out"),
        ("mobilenetv2", "mobilenetv2_1.00_64/out_relu"),
        ("vgg19", "vgg19/block5_pool"),
        ("densenet121", "densenet121/relu"),
    ],
)
def test_real_classifiers_match_the_step_by_step_reference(backbone, layer):
    model = build_classifier(backbone, 3, weights="none", input_shape=(64, 64, 1))
    # Two images, each explained for all three classes in one batch.
    x = np.repeat(images(2, 64, seed=4), 3, axis=0)
    index = np.tile(np.arange(3, dtype=np.int32), 2)
    assert default_target_layer(model) == layer
    inner = model.get_layer(layer.split("/")[0])
    pre = [model.get_layer("to_rgb"), model.get_layer("preprocess")]
    head = [model.get_layer(n) for n in ("avg_pool", "head_dense1", "head_dense2")]
    features, gradients, probabilities = nested_reference(
        model, inner, pre, head, model.get_layer("predictions"), x, index
    )
    expected_cam, expected_low = cam_from(features, gradients, (64, 64))

    result = GradCam(model, run_eagerly=True)(x, class_index=index)  # no tracing: one call

    assert result.cam.shape == (6, 64, 64) and result.cam_low_res.shape == (6, 2, 2)
    scale = max(float(np.abs(expected_low).max()), 1e-12)
    np.testing.assert_allclose(result.cam_low_res, expected_low, atol=1e-4 * scale)
    np.testing.assert_allclose(result.cam, expected_cam, atol=1e-4)
    np.testing.assert_allclose(result.predictions, probabilities, rtol=1e-4, atol=1e-6)
    assert (result.cam.max(axis=(1, 2)) > 0).sum() >= 2  # some maps are not cleared by the ReLU


def test_a_layer_inside_the_backbone_by_name_and_by_path():
    model = build_classifier("resnet18", 2, weights="none", input_shape=(64, 64, 1))
    assert resolve_layer_path(model, "stage3_block2_out") == ("resnet18", "stage3_block2_out")
    x = images(2, 64, seed=6)
    backbone = model.get_layer("resnet18")
    split = keras.Model(backbone.input, [backbone.get_layer("stage3_block2_out").output, backbone.output])
    pre = model.get_layer("preprocess")(model.get_layer("to_rgb")(tf.constant(x)))
    predicted = GradCam(model, run_eagerly=True)(x).class_index
    with tf.GradientTape() as tape:
        inner_map, final_map = split(pre, training=False)
        hidden = final_map
        for name in ("avg_pool", "head_dense1", "head_dense2"):
            hidden = model.get_layer(name)(hidden)
        kernel, bias = model.get_layer("predictions").weights
        logits = tf.matmul(hidden, kernel) + bias
        selected = tf.reduce_sum(tf.gather(logits, predicted, axis=1, batch_dims=1))
    gradients = tape.gradient(selected, inner_map).numpy()
    expected_cam, expected_low = cam_from(inner_map.numpy(), gradients, (64, 64))

    by_name = GradCam(model, layer="stage3_block2_out", run_eagerly=True)(x)
    by_path = GradCam(model, layer="resnet18/stage3_block2_out", run_eagerly=True)(x)
    assert by_name.cam_low_res.shape == (2, 4, 4)
    np.testing.assert_allclose(by_name.cam, by_path.cam, atol=0)
    np.testing.assert_allclose(by_name.cam, expected_cam, atol=1e-4)
    np.testing.assert_allclose(by_name.cam_low_res, expected_low, atol=1e-4 * max(expected_low.max(), 1e-12))


def test_frozen_backbone_gives_the_same_maps():
    model = tiny_nested_model()
    x = images(2, 16, seed=7)
    trainable = GradCam(model)(x, class_index=1)
    model.get_layer("backbone").trainable = False
    frozen = GradCam(model)(x, class_index=1)
    np.testing.assert_allclose(frozen.cam, trainable.cam, atol=KERNEL_ATOL)  # two traced graphs
    assert trainable.cam.max() == pytest.approx(1.0)


def test_single_sigmoid_output_is_two_classes():
    keras.utils.set_random_seed(8)
    inputs = keras.Input((10, 10, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="features")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs)
    x = images(3, 10, seed=9)
    features = keras.Model(model.input, model.get_layer("features").output)(x).numpy()
    kernel = model.layers[-1].weights[0].numpy()[:, 0]
    weighted = np.einsum("nhwk,k->nhw", features, kernel / (features.shape[1] * features.shape[2]))
    explainer = GradCam(model)
    positive, negative = explainer(x, 1), explainer(x, 0)
    np.testing.assert_allclose(positive.cam_low_res, np.maximum(weighted, 0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(negative.cam_low_res, np.maximum(-weighted, 0), rtol=1e-4, atol=1e-7)
    p = model(x).numpy()[:, 0]
    np.testing.assert_allclose(positive.predictions, np.stack([1 - p, p], axis=1), rtol=KERNEL_RTOL)  # traced vs eager
    np.testing.assert_array_equal(explainer(x).class_index, (p >= 0.5).astype(int))


def test_logits_behind_an_activation_layer_and_unrecoverable_logits():
    keras.utils.set_random_seed(12)
    inputs = keras.Input((10, 10, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="features")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(3, name="logits")(x)
    with_softmax = keras.Model(inputs, keras.layers.Activation("softmax")(logits))
    linear = keras.Model(inputs, logits)
    x = images(2, 10, seed=13)
    for c in range(3):
        np.testing.assert_allclose(
            GradCam(with_softmax, run_eagerly=True)(x, c).cam_low_res,
            GradCam(linear, run_eagerly=True)(x, c).cam_low_res,
            rtol=KERNEL_RTOL,  # two models' gradients: other kernels
            atol=1e-7,
        )
    # The output of a nested model: its logits are out of reach, its probabilities are not.
    wrapped_in = keras.Input((12, 12, 1))
    wrapped = keras.Model(wrapped_in, tiny_flat_model()(wrapped_in))
    assert default_target_layer(wrapped).endswith("/features")
    with pytest.raises(ValueError, match="cannot recover the logits.*score='probability'"):
        GradCam(wrapped)
    assert GradCam(wrapped, score="probability")(images(1, 12)).cam.shape == (1, 12, 12)


def test_sequential_models_and_clear_errors():
    keras.utils.set_random_seed(10)
    sequential = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    x = images(2, 8)
    result = grad_cam(sequential, x)
    features = keras.Model(sequential.inputs[0], sequential.get_layer("conv").output)(x).numpy()
    kernel = sequential.layers[-1].weights[0].numpy()
    grads = np.broadcast_to(kernel[:, result.class_index].T[:, None, None, :] / 64, features.shape)
    np.testing.assert_allclose(result.cam, cam_from(features, grads, (8, 8))[0], atol=1e-5)

    model = tiny_nested_model()
    with pytest.raises(ValueError, match="no layer named 'nope'.*default would be 'backbone/last'"):
        GradCam(model, layer="nope")
    with pytest.raises(ValueError, match="no layer 'c9' in 'backbone'; it has c1, c2, c3, last"):
        GradCam(model, layer="backbone/c9")
    with pytest.raises(ValueError, match="score must be one of"):
        build_cam_model(model, score="softmax")

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(2, 3, name="conv")
            self.pool = keras.layers.GlobalAveragePooling2D()

        def call(self, inputs):
            return self.pool(self.conv(inputs))

    subclassed = Subclassed()
    subclassed(x)
    with pytest.raises(TypeError, match="needs a functional or Sequential Keras model"):
        GradCam(subclassed, layer="conv")


# --------------------------------------------------------------------------- serving graph


RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    saved, archive, inputs, out = sys.argv[1:5]
    data = np.load(inputs)
    loaded = tf.saved_model.load(saved)
    default = loaded.signatures["serving_default"](images=tf.constant(data["images"]))
    chosen = loaded.signatures["cam_for_class"](
        images=tf.constant(data["images"]), class_index=tf.constant(data["class_index"]))
    exported_archive = tf.saved_model.load(archive)  # keep a reference: it owns the variables
    exported = exported_archive.cam(tf.constant(data["images"]))
    np.savez(out, cam=default["cam"].numpy(), class_index=default["class_index"].numpy(),
             probabilities=default["probabilities"].numpy(), chosen=chosen["cam"].numpy(),
             archive_cam=exported["cam"].numpy())
    print(json.dumps(sorted(loaded.signatures)))
    """
)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cam_function_in_a_saved_model_reloaded_in_a_fresh_process(tmp_path):
    model = tiny_nested_model(seed=11)
    x = images(3, 16, seed=12)
    cam_fn = make_cam_function(model, output_size=(24, 24))
    spec = tf.TensorSpec([None, 16, 16, 1], tf.float32, name="images")

    module = tf.Module()
    module.model = model  # tracks the variables the function reads

    @tf.function(input_signature=[spec])
    def serve(images_):
        out = cam_fn(images_)
        return {"cam": out["cam"], "class_index": out["class_index"], "probabilities": out["predictions"]}

    @tf.function(input_signature=[spec, tf.TensorSpec([None], tf.int32, name="class_index")])
    def cam_for_class(images_, class_index):
        return {"cam": cam_fn(images_, class_index)["cam"]}

    module.serve, module.cam_for_class = serve, cam_for_class
    saved = tmp_path / "saved"
    tf.saved_model.save(module, str(saved), signatures={"serving_default": serve, "cam_for_class": cam_for_class})

    # The same function behind a keras.export.ExportArchive endpoint, as caaxr_tf.export uses.
    archive = keras.export.ExportArchive()
    archive.add_endpoint("cam", lambda images_: {"cam": cam_fn(images_)["cam"]}, input_signature=[spec])
    archive.write_out(str(tmp_path / "archive"), verbose=False)

    chosen_class = np.array([2, 0, 1], np.int32)
    np.savez(tmp_path / "inputs.npz", images=x, class_index=chosen_class)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no caaxr_tf in the fresh process
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    completed = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(saved), str(tmp_path / "archive"),
         str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")],
        capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == ["cam_for_class", "serving_default"]
    reloaded = np.load(tmp_path / "outputs.npz")

    eager = GradCam(model, output_size=(24, 24))
    expected = eager(x)
    assert reloaded["cam"].shape == (3, 24, 24)
    np.testing.assert_allclose(reloaded["cam"], expected.cam, atol=1e-5)
    np.testing.assert_allclose(reloaded["archive_cam"], expected.cam, atol=1e-5)
    np.testing.assert_array_equal(reloaded["class_index"], expected.class_index)
    np.testing.assert_allclose(reloaded["probabilities"], expected.predictions, rtol=KERNEL_RTOL)  # another process's graph
    np.testing.assert_allclose(reloaded["chosen"], eager(x, chosen_class).cam, atol=1e-5)
    assert (expected.cam.max(axis=(1, 2)) == 1.0).sum() >= 2

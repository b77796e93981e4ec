"""CT classifiers: the FPN-ResNet50V2 architecture (names, shapes, parameter count), the plain
ResNet50V2/Xception heads, weight transfer, offline ImageNet, forward pass, saving.

No training step: tracing the gradient of a 34M-parameter model costs over a minute on two
CPU cores; the one new layer's gradient is checked on its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras
from caaxr_tf.models import build_model, model_task
from caaxr_tf.models.ct_models import PYRAMID_LAYERS, PYRAMID_LEVELS, UpsampleLike
from caaxr_tf.models.weights import WeightsUnavailableError

pytestmark = pytest.mark.numerics  # numerics: rerun with oneDNN off by `make test` (tolerances.py)

SMALL = (96, 96, 1)  # the smallest input the pyramid's two "valid" convolutions allow


@pytest.fixture(scope="module")
def fpn512() -> keras.Model:
    return build_model("fpn_resnet50v2", num_classes=2, input_shape=(512, 512, 1))


@pytest.fixture(scope="module")
def fpn_small() -> keras.Model:
    return build_model("fpn_resnet50v2", num_classes=2, input_shape=SMALL)


@pytest.fixture(scope="module")
def backbone_params() -> dict[str, int]:
    """Independent construction: the keras.applications backbones alone (size-independent counts)."""
    return {
        "resnet50v2": keras.applications.ResNet50V2(include_top=False, weights=None, input_shape=SMALL).count_params(),
        "xception": keras.applications.Xception(include_top=False, weights=None, input_shape=SMALL).count_params(),
    }


def conv_params(size: int, channels_in: int, filters: int = 256) -> int:
    return size * size * channels_in * filters + filters


def fpn_params(backbone: int, side: int, classes: int = 2) -> int:
    """The published FPN written out: C3 = side/16 (512 ch), C4 = C5 = side/32 (1024/2048 ch)."""
    c3, c4 = side // 16, side // 32
    p6 = (c4 + 1) // 2
    sizes = {"P3": c3 - 2, "P4": c4 - 2, "P5": c4, "P6": p6, "P7": (p6 + 1) // 2}
    convs = (conv_params(1, 2048) + conv_params(3, 256) + conv_params(1, 1024) + conv_params(3, 512)
             + conv_params(1, 512) + conv_params(3, 768) + conv_params(3, 2048) + conv_params(3, 256))
    dense = sum((n * n * 256) * classes + classes for n in sizes.values())
    return backbone + convs + dense + 5 * classes * classes + classes


def test_registered_as_classifiers():
    assert {model_task(name) for name in ("fpn_resnet50v2", "resnet50v2", "xception")} == {"classification"}


def test_pyramid_layers_and_shapes_at_512(fpn512):
    assert PYRAMID_LAYERS == ("conv4_block1_preact_relu", "conv5_block1_preact_relu", "post_relu")
    shapes = {name: tuple(fpn512.get_layer(name).output.shape[1:]) for name in PYRAMID_LAYERS}
    assert shapes == {"conv4_block1_preact_relu": (32, 32, 512), "conv5_block1_preact_relu": (16, 16, 1024),
                      "post_relu": (16, 16, 2048)}
    levels = {name: tuple(fpn512.get_layer(name).output.shape[1:]) for name in PYRAMID_LEVELS}
    assert levels == {"P3": (30, 30, 256), "P4": (14, 14, 256), "P5": (16, 16, 256),
                      "P6": (8, 8, 256), "P7": (4, 4, 256)}
    assert tuple(fpn512.get_layer("P4_upsampled").output.shape[1:]) == (32, 32, 512)
    assert tuple(fpn512.input.shape) == (None, 512, 512, 1)
    assert tuple(fpn512.get_layer("conv1_conv").kernel.shape) == (7, 7, 1, 64)
    for level in PYRAMID_LEVELS:
        dense = fpn512.get_layer(f"{level}_predictions")
        assert dense.units == 2 and dense.activation.__name__ == "relu"
        assert fpn512.get_layer(f"{level}_dropout").rate == 0.5
    assert fpn512.get_layer("predictions").activation.__name__ == "softmax"
    assert tuple(fpn512.output.shape) == (None, 2)


def test_parameter_count_at_512(fpn512, backbone_params):
    assert fpn512.count_params() == fpn_params(backbone_params["resnet50v2"], 512) == 34_058_656


def test_small_fpn_params_forward_pass_and_keras_file(fpn_small, backbone_params, tmp_path):
    assert fpn_small.count_params() == fpn_params(backbone_params["resnet50v2"], 96)
    images = np.random.default_rng(0).uniform(0, 3000, size=(2, 96, 96, 1)).astype("float32")
    probabilities = fpn_small(images, training=False).numpy()
    assert probabilities.shape == (2, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)

    path = tmp_path / "fpn.keras"
    fpn_small.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.get_layer("P5_upsampled"), UpsampleLike)
    # both eager, same kernels: equal bits expected, the bound is only a margin
    np.testing.assert_allclose(restored(images, training=False).numpy(), probabilities, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone, side", [("resnet50v2", 96), ("xception", 96)])
def test_plain_classifiers(backbone, side, backbone_params):
    model = build_model(backbone, num_classes=2, input_shape=(side, side, 1))
    features = model.get_layer("flatten").input.shape
    assert tuple(features[1:]) == (3, 3, 2048)
    flat = 3 * 3 * 2048
    assert model.count_params() == backbone_params[backbone] + flat * 2 + 2
    assert model.get_layer("dropout").rate == 0.5
    out = model(np.full((1, side, side, 1), 1024.0, "float32"), training=False)
    assert out.shape == (1, 2)


def test_upsample_like_is_tf1_nearest_neighbour():
    source = tf.reshape(tf.range(2 * 5 * 7 * 3, dtype=tf.float32), (2, 5, 7, 3))
    for height, width in ((13, 11), (10, 14), (5, 7), (3, 4)):
        target = tf.zeros((2, height, width, 1))
        expected = tf.compat.v1.image.resize_nearest_neighbor(source, (height, width), align_corners=False,
                                                              half_pixel_centers=False)
        np.testing.assert_array_equal(UpsampleLike()([source, target]).numpy(), expected.numpy())


def test_upsample_like_gradient_counts_the_copies():
    source = tf.Variable(tf.zeros((1, 3, 2, 1)))
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(UpsampleLike()([source, tf.zeros((1, 7, 4, 1))]))
    # Rows 0, 1, 2 are used floor(i * 3 / 7) -> 3, 2, 2 times; columns twice each.
    np.testing.assert_array_equal(tape.gradient(total, source).numpy()[0, :, :, 0], [[6, 6], [4, 4], [4, 4]])


def test_backbone_weights_file_is_copied_where_shapes_match(tmp_path):
    rgb = keras.applications.ResNet50V2(include_top=False, weights=None, input_shape=(96, 96, 3))
    rng = np.random.default_rng(1)
    for layer_name in ("conv1_conv", "conv2_block1_1_conv", "post_bn"):
        for variable in rgb.get_layer(layer_name).weights:
            variable.assign(rng.normal(size=variable.shape).astype("float32"))
    path = tmp_path / "resnet50v2_rgb.weights.h5"
    rgb.save_weights(path)
    model = build_model("fpn_resnet50v2", num_classes=2, input_shape=SMALL, weights=str(path))
    for layer_name in ("conv2_block1_1_conv", "post_bn"):
        for source, target in zip(rgb.get_layer(layer_name).weights, model.get_layer(layer_name).weights):
            np.testing.assert_array_equal(source.numpy(), target.numpy())
    kernel, bias = model.get_layer("conv1_conv").weights
    assert tuple(kernel.shape) == (7, 7, 1, 64)  # one channel: stays random
    np.testing.assert_array_equal(bias.numpy(), rgb.get_layer("conv1_conv").bias.numpy())
    assert all(layer.trainable for layer in model.layers)


def test_imagenet_offline_fails_clearly(offline_keras_cache):
    with pytest.raises(WeightsUnavailableError, match="--weights none"):
        build_model("fpn_resnet50v2", num_classes=2, input_shape=SMALL, weights="imagenet")


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\(H, W, 1\)"):
        build_model("fpn_resnet50v2", num_classes=2, input_shape=(512, 512, 3))
    with pytest.raises(ValueError, match="at least 96x96"):
        build_model("fpn_resnet50v2", num_classes=2, input_shape=(64, 64, 1))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("xception", num_classes=1, input_shape=SMALL)
    with pytest.raises(FileNotFoundError):
        build_model("resnet50v2", num_classes=2, input_shape=SMALL, weights="/no/such/file.weights.h5")

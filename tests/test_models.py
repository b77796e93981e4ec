"""Tests for caaxr_tf.models: registry, layers, UNet, SegNet, ResNet-18 and the classifiers."""

from __future__ import annotations

import logging

import h5py
import keras
import numpy as np
import pytest

from tolerances import KERNEL_ATOL
import tensorflow as tf

from caaxr_tf.models import (
    GrayscaleToRGB,
    ImageNetPreprocessing,
    MaxPoolingWithArgmax2D,
    MaxUnpooling2D,
    ResNet18,
    WeightsUnavailableError,
    available_models,
    build_classifier,
    build_model,
    load_weights_file,
    model_task,
    register_model,
)

# Keras 3.15 warns about its internal `_operations_by_depth` cache when loading
# any functional model that has been called; the round-trip tests check the weights.
# Keras' own weight saving also trips a NumPy 2 `__array__(copy=...)` deprecation.
pytestmark = [
    pytest.mark.numerics,  # numerics: rerun with oneDNN off by `make test` (tolerances.py)
    pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

REGRESSORS = ["densenet121_regressor", "mobilenetv2_regressor", "resnet18_regressor", "vgg19_regressor"]
ALL_MODELS = sorted(["densenet121", "fpn_resnet50v2", "maskrcnn", "mobilenetv2", "resnet18", "resnet50v2", "segnet",
                     "unet", "unet_densenet121", "unet_resnet50", "unetpp", "vgg19", "xception", *REGRESSORS])
TINY = (64, 64, 1)


def _images(n: int, shape=TINY, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, *shape)).astype("float32")


def _backbone(model: keras.Model) -> keras.Model:
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert len(nested) == 1
    return nested[0]


@pytest.fixture(scope="module")
def tiny_unet() -> keras.Model:
    return build_model("unet", input_shape=TINY, base_filters=8)


@pytest.fixture(scope="module")
def tiny_segnet() -> keras.Model:
    return build_model("segnet", input_shape=TINY, base_filters=8)


@pytest.fixture(scope="module")
def small_resnet18() -> keras.Model:
    return build_model("resnet18", num_classes=3, input_shape=TINY)


# --------------------------------------------------------------------------- registry


def test_registry_lists_models_and_tasks():
    assert available_models() == ALL_MODELS
    assert available_models("detection") == ["maskrcnn"]
    assert available_models("segmentation") == [
        "segnet", "unet", "unet_densenet121", "unet_resnet50", "unetpp"
    ]
    assert available_models("classification") == [
        "densenet121", "fpn_resnet50v2", "mobilenetv2", "resnet18", "resnet50v2", "vgg19", "xception"]
    assert model_task("unet") == model_task("segnet") == "segmentation"
    assert model_task("vgg19") == "classification"
    assert available_models("regression") == REGRESSORS
    assert model_task("resnet18_regressor") == "regression"


def test_registry_rejects_unknown_names_and_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'.*densenet121.*vgg19"):
        build_model("resnet50", num_classes=3)
    with pytest.raises(ValueError, match="unknown model"):
        model_task("nope")
    with pytest.raises(ValueError, match="pass num_classes"):
        build_model("resnet18")
    with pytest.raises(ValueError, match="num_classes must be None or 1"):
        build_model("unet", num_classes=3, input_shape=TINY)
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model("segnet", weights="imagenet", input_shape=TINY)
    with pytest.raises(ValueError, match="already registered"):
        register_model("unet", task="segmentation")(lambda **kwargs: None)


# --------------------------------------------------------------------------- layers


def _numpy_unpool_of_pool(x: np.ndarray) -> np.ndarray:
    """Keep each 2x2 window's maximum in place, zero the rest ('same' padding)."""
    n, h, w, c = x.shape
    out = np.zeros_like(x)
    for b in range(n):
        for i in range(0, h, 2):
            for j in range(0, w, 2):
                for k in range(c):
                    window = x[b, i : i + 2, j : j + 2, k]
                    di, dj = np.unravel_index(np.argmax(window), window.shape)
                    out[b, i + di, j + dj, k] = window[di, dj]
    return out


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (2, 5, 7, 2)])
def test_unpooling_restores_maxima_at_argmax(shape):
    x = np.random.default_rng(1).normal(size=shape).astype("float32")
    pool, unpool = MaxPoolingWithArgmax2D(2), MaxUnpooling2D(2)

    @tf.function(input_signature=[tf.TensorSpec([None, *shape[1:]], tf.float32)])
    def round_trip(t):
        pooled, argmax = pool(t)
        return pooled, argmax, unpool([pooled, argmax, t])

    pooled, argmax, restored = (v.numpy() for v in round_trip(tf.constant(x)))
    assert pooled.shape == (shape[0], -(-shape[1] // 2), -(-shape[2] // 2), shape[3])
    assert argmax.dtype == np.int64
    np.testing.assert_array_equal(x.reshape(-1)[argmax.reshape(-1)], pooled.reshape(-1))
    assert restored.shape == shape
    np.testing.assert_array_equal(restored, _numpy_unpool_of_pool(x))


def test_unpooling_without_reference_doubles_size_and_passes_gradients():
    x = tf.constant(np.random.default_rng(2).normal(size=(2, 4, 6, 3)).astype("float32"))
    weights = tf.constant(np.random.default_rng(3).normal(size=(2, 4, 6, 3)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        pooled, argmax = MaxPoolingWithArgmax2D(2)(x)
        restored = MaxUnpooling2D(2)([pooled, argmax])
        loss = tf.reduce_sum(restored * weights)
    grad = tape.gradient(loss, x).numpy()
    assert restored.shape == (2, 4, 6, 3)
    # d loss / d x is the weight at every window maximum and zero elsewhere.
    is_max = _numpy_unpool_of_pool(x.numpy()) != 0
    np.testing.assert_allclose(grad, np.where(is_max, weights.numpy(), 0.0), rtol=1e-6)  # a scatter: no arithmetic
    assert is_max.sum() == 2 * 2 * 3 * 3


def test_layer_configs_round_trip():
    for layer in (
        MaxPoolingWithArgmax2D(pool_size=(2, 3), padding="valid", name="p"),
        MaxUnpooling2D(pool_size=(2, 3), name="u"),
        ImageNetPreprocessing("caffe", name="pre"),
        GrayscaleToRGB(name="rgb"),
    ):
        clone = layer.__class__.from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
    assert MaxPoolingWithArgmax2D().supports_jit is False
    with pytest.raises(ValueError, match="mode"):
        ImageNetPreprocessing("bgr")


@pytest.mark.parametrize(
    "mode, module",
    [
        ("torch", keras.applications.densenet),
        ("tf", keras.applications.mobilenet_v2),
        ("caffe", keras.applications.vgg19),
    ],
)
def test_preprocessing_matches_keras_applications(mode, module):
    rgb = np.random.default_rng(4).uniform(0, 255, (2, 5, 5, 3)).astype("float32")
    expected = module.preprocess_input(rgb.copy())
    # elementwise float32 against NumPy's float32/float64 order of operations: ulps of values up to ~150
    np.testing.assert_allclose(ImageNetPreprocessing(mode)(rgb).numpy(), expected, rtol=1e-5, atol=1e-4)


def test_grayscale_to_rgb_repeats_channel():
    gray = _images(2, (3, 4, 1))
    rgb = GrayscaleToRGB()(gray).numpy()
    assert rgb.shape == (2, 3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray[..., 0])


# --------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize("fixture", ["tiny_unet", "tiny_segnet"])
def test_segmentation_output_is_a_probability_mask(fixture, request):
    model = request.getfixturevalue(fixture)
    out = model(_images(2), training=False).numpy()
    assert out.shape == (2, 64, 64, 1)
    assert out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1))


def test_unet_structure_and_options():
    model = build_model("unet", input_shape=(32, 32, 1), base_filters=4, upsampling="bilinear")
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    # 2 convs at each of 4 + 1 + 4 levels, 4 1x1 up-convs, 1 output conv.
    assert len(convs) == 18 + 4 + 1
    assert model.get_layer("bottleneck_conv1").filters == 4 * 16
    assert model(_images(1, (32, 32, 1))).shape == (1, 32, 32, 1)
    with pytest.raises(ValueError, match="divisible by 16"):
        build_model("unet", input_shape=(40, 40, 1), base_filters=4)


def test_segnet_unpools_to_odd_sizes_and_stays_off_xla():
    model = build_model("segnet", input_shape=(36, 44, 1), base_filters=4)
    assert model(_images(1, (36, 44, 1))).shape == (1, 36, 44, 1)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    assert model.jit_compile is False
    unpools = [layer for layer in model.layers if isinstance(layer, MaxUnpooling2D)]
    assert len(unpools) == 5


def _train_steps(model: keras.Model, steps: int = 8) -> tuple[float, float, list]:
    x = _images(4)
    y = (x > 127.5).astype("float32")  # learnable: the mask is a threshold of the input
    optimizer = keras.optimizers.Adam(1e-2)
    loss_fn = keras.losses.BinaryCrossentropy()
    losses = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        losses.append(float(loss))
    return losses[0], losses[-1], grads


@pytest.mark.parametrize("name", ["unet", "segnet"])
def test_training_steps_reduce_loss(name):
    keras.utils.set_random_seed(0)
    model = build_model(name, input_shape=TINY, base_filters=4)
    first, last, grads = _train_steps(model)
    assert last < 0.9 * first
    # The first encoder conv only receives gradient through every decoder stage
    # (SegNet has no skip connections: all of it flows through the unpooling).
    first_conv = model.get_layer("enc1_1_conv" if name == "segnet" else "down1_conv1").kernel
    grad = dict((id(v), g) for v, g in zip(model.trainable_variables, grads))[id(first_conv)]
    assert float(tf.reduce_max(tf.abs(grad))) > 0


@pytest.mark.parametrize("fixture", ["tiny_unet", "tiny_segnet", "small_resnet18"])
def test_keras_save_load_round_trip(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    x = _images(2)
    path = tmp_path / f"{model.name}.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    # both eager, same layers and kernels: the same bits are expected, 1e-6 is only a margin
    np.testing.assert_allclose(restored(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)


def test_segnet_exports_as_saved_model(tiny_segnet, tmp_path):
    x = _images(3)
    tiny_segnet.export(str(tmp_path / "segnet"), format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "segnet"))
    # the SavedModel's graph (fused by Grappler) against eager Keras
    np.testing.assert_allclose(reloaded.serve(tf.constant(x)).numpy(), tiny_segnet(x).numpy(), atol=KERNEL_ATOL)


def test_segmentation_weights_path(tiny_unet, tmp_path):
    path = tmp_path / "unet.weights.h5"
    tiny_unet.save_weights(path)
    loaded = build_model("unet", input_shape=TINY, base_filters=8, weights=str(path))
    x = _images(1)
    np.testing.assert_allclose(loaded(x).numpy(), tiny_unet(x).numpy(), atol=1e-6)  # both eager: same kernels
    with pytest.raises(ValueError, match="does not match the segnet architecture"):
        build_model("segnet", input_shape=TINY, base_filters=8, weights=str(path))


# --------------------------------------------------------------------------- classifiers


def test_resnet18_matches_torchvision_parameter_counts():
    with_top = ResNet18(include_top=True, classes=1000)
    trainable = sum(int(np.prod(v.shape)) for v in with_top.trainable_weights)
    assert trainable == 11_689_512  # torchvision resnet18 (BN running stats are buffers there)
    convs = [layer for layer in with_top.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + 4 * 2 * 2 + 3  # stem + basic-block convs + 3 projections
    assert with_top.get_layer("predictions").kernel.shape == (512, 1000)
    features = ResNet18(input_shape=(224, 224, 3))
    assert features.output.shape == (None, 7, 7, 512)
    assert sum(int(np.prod(v.shape)) for v in features.trainable_weights) == 11_176_512


def _check_classifier(model: keras.Model, x: np.ndarray, num_classes: int) -> np.ndarray:
    probs = model(x, training=False).numpy()
    assert probs.shape == (len(x), num_classes)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)  # a float32 softmax sums to 1 within ulps
    head = [model.get_layer(n).units for n in ("head_dense1", "head_dense2", "predictions")]
    assert head == [1024, 512, num_classes]
    assert isinstance(model.get_layer("avg_pool"), keras.layers.GlobalAveragePooling2D)
    return probs


def test_mobilenetv2_classifier_at_224_is_trainable_with_no_weights(caplog):
    with caplog.at_level(logging.INFO, logger="caaxr_tf.models.classifier"):
        model = build_model("mobilenetv2", num_classes=3, alpha=0.35)
    assert model.input.shape == (None, 224, 224, 1)
    _check_classifier(model, _images(2, (224, 224, 1)), 3)
    assert model.get_layer("preprocess").mode == "tf"
    assert _backbone(model).trainable
    assert all(layer.trainable for layer in _backbone(model).layers)
    assert "backbone trainable" in caplog.text


def test_resnet18_classifier(small_resnet18):
    _check_classifier(small_resnet18, _images(2), 3)
    assert small_resnet18.get_layer("preprocess").mode == "torch"
    assert _backbone(small_resnet18).name == "resnet18"


def _mobilenet_backbone(alpha: float = 0.35) -> keras.Model:
    return keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3), alpha=alpha
    )


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_weights_path_loads_and_freezes_backbone(suffix, tmp_path, caplog):
    source = _mobilenet_backbone()
    path = tmp_path / f"backbone{suffix}"
    source.save_weights(path) if suffix == ".weights.h5" else source.save(path)
    with caplog.at_level(logging.INFO, logger="caaxr_tf.models.classifier"):
        model = build_model(
            "mobilenetv2", num_classes=2, input_shape=(32, 32, 1), alpha=0.35, weights=str(path)
        )
    assert "backbone frozen" in caplog.text
    backbone = _backbone(model)
    assert not backbone.trainable and backbone.trainable_weights == []
    for a, b in zip(backbone.weights, source.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert {v.path.split("/")[0] for v in model.trainable_weights} == {
        "head_dense1", "head_dense2", "predictions",
    }
    # A training step moves the head only; frozen BN statistics stay put too.
    before = [v.numpy().copy() for v in backbone.weights]
    # (random backbone features are tiny, so check the bias, whose gradient is not)
    head_before = model.get_layer("predictions").bias.numpy().copy()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.train_on_batch(_images(4, (32, 32, 1)), np.zeros(4, dtype="int32"))
    for a, b in zip(backbone.weights, before):
        np.testing.assert_array_equal(a.numpy(), b)
    assert not np.array_equal(model.get_layer("predictions").bias.numpy(), head_before)


def test_wrong_architecture_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "mobilenet_050.weights.h5"
    _mobilenet_backbone(alpha=0.5).save_weights(path)
    with pytest.raises(ValueError, match="does not match the mobilenetv2 backbone architecture") as info:
        build_model("mobilenetv2", num_classes=3, input_shape=(32, 32, 1), alpha=0.35, weights=str(path))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="does not match the resnet18 backbone architecture"):
        build_model("resnet18", num_classes=3, input_shape=(32, 32, 1), weights=str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        build_model("resnet18", num_classes=3, weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(ValueError, match="'none', 'imagenet' or a"):
        build_model("resnet18", num_classes=3, weights="resnet.pt")


def test_weights_file_with_extra_variables_is_rejected(tmp_path):
    def dense_stack(n: int) -> keras.Model:
        inputs = keras.Input((4,))
        x = inputs
        for _ in range(n):
            x = keras.layers.Dense(4)(x)
        return keras.Model(inputs, x)

    path = tmp_path / "three.weights.h5"
    dense_stack(3).save_weights(path)
    load_weights_file(dense_stack(3), path, what="stack")
    # Keras itself loads the first two layers of a three-layer file silently.
    with pytest.raises(ValueError, match="holds 6 variables, the model has 4"):
        load_weights_file(dense_stack(2), path, what="stack")


def test_imagenet_offline_is_a_clear_one_line_error(offline_keras_cache):
    with pytest.raises(RuntimeError) as info:
        build_model("mobilenetv2", num_classes=3, input_shape=(96, 96, 1), alpha=0.35, weights="imagenet")
    assert isinstance(info.value, WeightsUnavailableError)
    message = str(info.value)
    assert "\n" not in message
    assert "ImageNet weights for mobilenetv2 are unavailable" in message
    assert "--weights PATH" in message and "--weights none" in message
    assert str(offline_keras_cache) in message
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_imagenet_weights_from_the_keras_cache_freeze_the_backbone(offline_keras_cache):
    from keras.src.legacy.saving import legacy_h5_format

    # Put a file where keras.applications looks for the notop weights (legacy .h5 format).
    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(96, 96, 3), alpha=0.35)
    offline_keras_cache.mkdir(parents=True)
    cached = offline_keras_cache / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"
    with h5py.File(cached, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)
    model = build_model("mobilenetv2", num_classes=3, input_shape=(96, 96, 1), alpha=0.35, weights="imagenet")
    backbone = _backbone(model)
    assert not backbone.trainable
    for a, b in zip(backbone.weights, source.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_resnet18_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="no Keras ImageNet weights exist for resnet18.*--weights PATH"):
        build_model("resnet18", num_classes=3, weights="imagenet")


def test_classifier_argument_checks():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        build_classifier("resnet18", 1)
    with pytest.raises(ValueError, match="pooling"):
        build_classifier("resnet18", 3, pooling="sum")
    with pytest.raises(ValueError, match="input_shape"):
        build_classifier("resnet18", 3, input_shape=(64, 64, 2))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_classifier("resnet50", 3)


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", [("densenet121", "torch"), ("vgg19", "caffe")])
def test_large_backbones(name, mode):
    # Built once each, at 64x64 to keep the forward pass cheap.
    model = build_model(name, num_classes=3, input_shape=TINY)
    _check_classifier(model, _images(2), 3)
    assert model.get_layer("preprocess").mode == mode
    assert _backbone(model).trainable

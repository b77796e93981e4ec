"""UNet++ and the U-Nets on keras.applications encoders (ResNet50, DenseNet121)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tolerances import KERNEL_ATOL
import tensorflow as tf

from caaxr_tf.models import (
    ENCODERS,
    GrayscaleToRGB,
    ImageNetPreprocessing,
    WeightsUnavailableError,
    build_model,
    model_task,
)

pytestmark = [
    pytest.mark.numerics,  # numerics: rerun with oneDNN off by `make test` (tolerances.py)
    pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 1)).astype("float32")


def _conv_block_params(c_in: int, filters: int) -> int:
    # two 3x3 convs without bias, each followed by BatchNorm (gamma, beta, mean, variance)
    return 9 * c_in * filters + 4 * filters + 9 * filters * filters + 4 * filters


def _unetpp_params(base: int, depth: int, deep_supervision: bool, upsampling: str = "transpose") -> int:
    """UNet++ parameter count from the paper's node definition, independently of the model code."""
    filters = [base * 2**level for level in range(depth + 1)]
    total = sum(
        _conv_block_params(1 if level == 0 else filters[level - 1], filters[level]) for level in range(depth + 1)
    )
    for column in range(1, depth + 1):
        for level in range(depth + 1 - column):
            f, below = filters[level], filters[level + 1]
            kernel = 4 if upsampling == "transpose" else 1
            total += kernel * below * f + f  # up-sampling conv of X(level+1, column-1)
            total += _conv_block_params((column + 1) * f, f)  # column earlier nodes + the up-sampled one
    heads = depth if deep_supervision and depth > 1 else 1
    return total + heads * (filters[0] + 1)


def _unet_decoder_params(skip_channels: list[int], bottleneck: int, decoder=(256, 128, 64, 32, 16)) -> int:
    total, channels = 0, bottleneck
    for stage, filters in enumerate(decoder):
        skip = skip_channels[-1 - stage] if stage < len(skip_channels) else 0
        total += _conv_block_params(channels + skip, filters)
        channels = filters
    return total + channels + 1


def _producer(tensor) -> str:
    return tensor._keras_history.operation.name


# --------------------------------------------------------------------------- UNet++


@pytest.mark.parametrize(
    "base, depth, deep, upsampling",
    [(4, 3, False, "transpose"), (4, 4, True, "transpose"), (8, 2, False, "bilinear"), (32, 4, False, "transpose")],
)
def test_unetpp_parameter_count_matches_the_node_definition(base, depth, deep, upsampling):
    model = build_model(
        "unetpp", input_shape=(32, 32, 1), base_filters=base, depth=depth, deep_supervision=deep, upsampling=upsampling
    )
    assert model.count_params() == _unetpp_params(base, depth, deep, upsampling)
    if base == 32:
        assert model.count_params() == 9_052_545  # the paper's UNet++ (L4, 32 filters): 9.04 M
    blocks = {layer.name.rsplit("_conv", 1)[0] for layer in model.layers if layer.name.endswith("_conv1")}
    assert len(blocks) == (depth + 1) * (depth + 2) // 2  # every node X(i, j), i + j <= depth


def test_unetpp_nodes_are_densely_connected():
    model = build_model("unetpp", input_shape=(32, 32, 1), base_filters=4, depth=3)
    # X(0, 3) sees X(0, 0), X(0, 1), X(0, 2) and the up-sampled X(1, 2)
    inputs = [_producer(t) for t in model.get_layer("x0_3_concat").input]
    assert inputs == ["x0_0_relu2", "x0_1_relu2", "x0_2_relu2", "x0_3_up"]
    assert _producer(model.get_layer("x0_3_up").input) == "x1_2_relu2"
    assert [_producer(t) for t in model.get_layer("x1_1_concat").input] == ["x1_0_relu2", "x1_1_up"]
    assert model.get_layer("x2_0_conv1").filters == 16 and model.get_layer("x2_1_conv2").filters == 16


@pytest.mark.parametrize("size", [224, 96])
def test_unetpp_output_is_one_probability_mask(size):
    for deep in (False, True):
        model = build_model("unetpp", input_shape=(size, size, 1), base_filters=4, deep_supervision=deep)
        out = model(_images(2, size), training=False).numpy()
        assert out.shape == (2, size, size, 1) and out.dtype == np.float32
        assert np.all((out >= 0) & (out <= 1))
        assert model.output.shape == (None, size, size, 1)
    heads = [layer for layer in model.layers if layer.name.startswith("mask_")]
    assert len(heads) == 4
    # the output is the mean of the four heads
    probe = keras.Model(model.input, [h.output for h in heads] + [model.output])
    *head_maps, mean = probe(_images(1, size))
    # the same graph's float32 mean of four maps against NumPy's: ulps
    np.testing.assert_allclose(np.mean([h.numpy() for h in head_maps], axis=0), mean.numpy(), atol=1e-6)


def test_unetpp_argument_checks():
    assert model_task("unetpp") == "segmentation"
    with pytest.raises(ValueError, match="divisible by 16"):
        build_model("unetpp", input_shape=(40, 40, 1), base_filters=4)
    with pytest.raises(ValueError, match="num_classes must be None or 1"):
        build_model("unetpp", num_classes=3)
    with pytest.raises(ValueError, match="unetpp has no ImageNet weights"):
        build_model("unetpp", weights="imagenet")


def _train_steps(model: keras.Model, size: int, steps: int, learning_rate: float) -> tuple[float, float]:
    x = _images(4, size, seed=1)
    y = (x > 127.5).astype("float32")  # learnable: the mask is a threshold of the input
    optimizer = keras.optimizers.Adam(learning_rate)
    loss_fn = keras.losses.BinaryCrossentropy()
    losses = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        assert all(g is not None for g in grads)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        losses.append(float(loss))
    return losses[0], losses[-1]


@pytest.mark.parametrize(
    "name, steps, lr, kwargs",
    [
        ("unetpp", 8, 1e-2, dict(base_filters=4, depth=3, deep_supervision=True)),
        pytest.param("unet_resnet50", 5, 1e-3, dict(decoder_filters=(16, 16, 8, 8, 8)), marks=pytest.mark.slow),
    ],
)
def test_training_steps_reduce_the_loss(name, steps, lr, kwargs):
    keras.utils.set_random_seed(0)
    model = build_model(name, input_shape=(32, 32, 1), **kwargs)
    first, last = _train_steps(model, 32, steps, lr)
    assert last < 0.9 * first


def test_unetpp_save_load_round_trip(tmp_path):
    model = build_model("unetpp", input_shape=(32, 32, 1), base_filters=4, depth=3, deep_supervision=True)
    x = _images(2, 32)
    model.save(tmp_path / "unetpp.keras")
    restored = keras.models.load_model(tmp_path / "unetpp.keras")
    np.testing.assert_allclose(restored(x).numpy(), model(x).numpy(), atol=1e-6)  # both eager: same kernels
    model.save_weights(tmp_path / "unetpp.weights.h5")
    loaded = build_model(
        "unetpp", input_shape=(32, 32, 1), base_filters=4, depth=3, deep_supervision=True,
        weights=str(tmp_path / "unetpp.weights.h5"),
    )
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="does not match the unetpp architecture"):
        build_model(
            "unetpp", input_shape=(32, 32, 1), base_filters=4, depth=2, weights=str(tmp_path / "unetpp.weights.h5")
        )


# --------------------------------------------------------------------------- encoder U-Nets

TAPS = {
    "resnet50": [(112, 64), (56, 256), (28, 512), (14, 1024), (7, 2048)],
    "densenet121": [(112, 64), (56, 256), (28, 512), (14, 1024), (7, 1024)],
}


@pytest.fixture(scope="module")
def encoder_unets() -> dict[str, keras.Model]:
    return {name: build_model(f"unet_{name}", input_shape=(224, 224, 1)) for name in ENCODERS}


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_encoder_unet_at_224(encoder, encoder_unets):
    model = encoder_unets[encoder]
    assert model_task(f"unet_{encoder}") == "segmentation"
    out = model(_images(1, 224), training=False).numpy()
    assert out.shape == (1, 224, 224, 1) and np.all((out >= 0) & (out <= 1))
    # the tapped layers exist, in stride order, with the documented shapes
    features = model.get_layer(f"{encoder}_encoder")
    spec = ENCODERS[encoder]
    names = [_producer(t) for t in features.outputs]
    assert names == [*spec.skip_layers, spec.bottleneck_layer]
    assert [(t.shape[1], t.shape[3]) for t in features.outputs] == TAPS[encoder]
    # grey -> RGB and the backbone's own ImageNet preprocessing inside the model
    assert isinstance(model.get_layer("to_rgb"), GrayscaleToRGB)
    assert model.get_layer("preprocess").mode == {"resnet50": "caffe", "densenet121": "torch"}[encoder]
    assert isinstance(model.get_layer("preprocess"), ImageNetPreprocessing)
    # each decoder stage concatenates the skip of its stride
    for stage, skip in enumerate(reversed(spec.skip_layers), start=1):
        concat_inputs = model.get_layer(f"decoder{stage}_concat").input
        assert concat_inputs[1].shape[1] == 224 // 2 ** (5 - stage)
    assert features.trainable  # weights="none": the whole model trains
    # parameters: the keras.applications backbone plus the decoder's conv blocks
    backbone = {"resnet50": keras.applications.ResNet50, "densenet121": keras.applications.DenseNet121}[encoder]
    backbone_params = backbone(include_top=False, weights=None, input_shape=(64, 64, 3)).count_params()
    skips = [c for _, c in TAPS[encoder][:-1]]
    assert model.count_params() == backbone_params + _unet_decoder_params(skips, TAPS[encoder][-1][1])


def test_encoder_unet_other_size_and_checks():
    model = build_model("unet_resnet50", input_shape=(96, 160, 1), decoder_filters=(32, 16, 16, 8, 8))
    assert model(np.zeros((1, 96, 160, 1), "float32")).shape == (1, 96, 160, 1)
    with pytest.raises(ValueError, match="divisible by 32"):
        build_model("unet_resnet50", input_shape=(100, 100, 1))
    with pytest.raises(ValueError, match="num_classes must be None or 1"):
        build_model("unet_densenet121", num_classes=2)
    with pytest.raises(ValueError, match="decoder_filters needs 5 values"):
        build_model("unet_densenet121", input_shape=(64, 64, 1), decoder_filters=(8, 8))


def test_encoder_unet_save_load_round_trip(encoder_unets, tmp_path):
    model = encoder_unets["densenet121"]
    x = _images(1, 224, seed=3)
    model.save(tmp_path / "unet_densenet121.keras")
    restored = keras.models.load_model(tmp_path / "unet_densenet121.keras")
    np.testing.assert_allclose(restored(x).numpy(), model(x).numpy(), atol=KERNEL_ATOL)  # a DenseNet's depth of float32 sums


@pytest.mark.slow
def test_encoder_weights_file_loads_and_freezes_the_encoder(tmp_path):
    source = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(32, 32, 3))
    source.set_weights([np.random.default_rng(i).normal(size=w.shape).astype("float32") * 0.01
                        for i, w in enumerate(source.get_weights())])
    path = tmp_path / "densenet121_notop.weights.h5"
    source.save_weights(path)
    model = build_model("unet_densenet121", input_shape=(32, 32, 1), weights=str(path))
    encoder = model.get_layer("densenet121_encoder")
    assert not encoder.trainable
    for mine, theirs in zip(encoder.weights, source.weights):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    assert all(not v.path.startswith("densenet121_encoder") for v in model.trainable_variables)
    unfrozen = build_model("unet_densenet121", input_shape=(32, 32, 1), weights=str(path), freeze_encoder=False)
    assert unfrozen.get_layer("densenet121_encoder").trainable


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_imagenet_offline_is_a_clear_error(encoder, offline_keras_cache):
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(f"unet_{encoder}", input_shape=(64, 64, 1), weights="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert f"ImageNet weights for {encoder} are unavailable" in message
    assert "--weights PATH" in message and "--weights none" in message
    assert str(offline_keras_cache) in message

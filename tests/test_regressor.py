"""Regressors, serving-time clamping and the feature extractors of the severity protocol."""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest

from tolerances import KERNEL_RTOL
import tensorflow as tf

from caaxr_tf.data.records import Sample
from caaxr_tf.data.sources.covid_chestxray_severity import TARGET_RANGES
from caaxr_tf.models import ClampOutputs, build_model, build_regressor, model_task, serving_regressor
from caaxr_tf.severity.features import (
    classifier_features,
    load_images,
    penultimate_model,
    segmentation_features,
)

pytestmark = pytest.mark.numerics  # numerics: rerun with oneDNN off by `make test` (tolerances.py)

TINY = (32, 32, 1)


@pytest.fixture(scope="module")
def regressor() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_model("resnet18_regressor", input_shape=TINY)


def random_images(seed: int, n: int = 5, shape=TINY) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape)).astype("float32")


def test_regressor_shapes_names_and_head(regressor):
    assert model_task("resnet18_regressor") == "regression"
    assert regressor.name == "resnet18_regressor"
    assert regressor.output.shape == (None, 2)
    assert [layer.name for layer in regressor.layers[-3:]] == ["head_dense1", "head_dense2", "scores"]
    assert regressor.get_layer("head_dense2").units == 512
    scores = regressor.get_layer("scores")
    assert scores.activation is keras.activations.linear and scores.dtype_policy.compute_dtype == "float32"
    assert regressor.predict_on_batch(random_images(0)).shape == (5, 2)

    three = build_model("resnet18_regressor", num_classes=3, input_shape=TINY)
    assert three.output.shape == (None, 3)
    biased = build_regressor("resnet18", input_shape=TINY, output_bias=(3.3, 2.5), name="r")
    np.testing.assert_allclose(biased.get_layer("scores").bias.numpy(), [3.3, 2.5], rtol=1e-6)
    with pytest.raises(ValueError, match="output_bias has 1 values for 2 outputs"):
        build_regressor("resnet18", input_shape=TINY, output_bias=(1.0,))
    with pytest.raises(ValueError, match="num_outputs"):
        build_regressor("resnet18", num_outputs=0, input_shape=TINY)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_regressor("resnet50", input_shape=TINY)


def test_clamp_outputs_clips_each_column_to_its_range():
    values = np.array([[-1.0, -0.5], [0.0, 0.0], [3.2, 6.4], [8.5, 5.9], [np.float32(9e9), -9e9]], "float32")
    layer = ClampOutputs([0.0, 0.0], [8.0, 6.0])
    expected = np.stack([np.clip(values[:, 0], 0, 8), np.clip(values[:, 1], 0, 6)], axis=1)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(values)), expected)
    restored = ClampOutputs.from_config(layer.get_config())
    assert (restored.lower, restored.upper) == ([0.0, 0.0], [8.0, 6.0])
    with pytest.raises(ValueError, match="lower bound"):
        ClampOutputs([1.0], [0.0])


def test_serving_regressor_clamps_and_names_outputs(regressor, tmp_path):
    scores = regressor.get_layer("scores")
    kernel, bias = scores.get_weights()
    images = random_images(1)
    try:
        # a head bias far outside the ranges makes the raw outputs cross both bounds
        scores.set_weights([kernel, np.array([-50.0, 50.0], "float32")])
        raw = regressor.predict_on_batch(images)
        served = serving_regressor(regressor, TARGET_RANGES)
        outputs = served.predict_on_batch(images)
        assert sorted(outputs) == ["geographic_extent", "opacity"]
        assert outputs["geographic_extent"].shape == (5,)
        assert (raw[:, 0] < 0).all() and (raw[:, 1] > 6).all()
        np.testing.assert_array_equal(outputs["geographic_extent"], np.clip(raw[:, 0], 0, 8))
        np.testing.assert_array_equal(outputs["opacity"], np.clip(raw[:, 1], 0, 6))

        scores.set_weights([kernel, np.array([4.0, 3.0], "float32")])  # inside: unchanged
        inside = served.predict_on_batch(images)
        raw_inside = regressor.predict_on_batch(images)
        np.testing.assert_array_equal(inside["geographic_extent"], np.clip(raw_inside[:, 0], 0, 8))
        np.testing.assert_array_equal(inside["opacity"], np.clip(raw_inside[:, 1], 0, 6))

        path = tmp_path / "served.keras"
        served.save(path)
        again = keras.models.load_model(path).predict_on_batch(images)
        np.testing.assert_allclose(again["opacity"], inside["opacity"], rtol=KERNEL_RTOL)  # two traced predict graphs
    finally:
        scores.set_weights([kernel, bias])
    with pytest.raises(ValueError, match="expected \\[N, 3\\]"):
        serving_regressor(regressor, {"a": (0, 1), "b": (0, 1), "c": (0, 1)})


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def test_classifier_features_are_the_dense_512_activations():
    keras.utils.set_random_seed(1)
    classifier = build_model("resnet18", num_classes=3, input_shape=TINY)
    images = random_images(2, n=8)
    features = classifier_features(classifier, images, batch_size=4)
    assert features.shape == (8, 512) and features.dtype == np.float64

    pooled = keras.Model(classifier.inputs, classifier.get_layer("avg_pool").output).predict_on_batch(images)
    w1, b1 = classifier.get_layer("head_dense1").get_weights()
    w2, b2 = classifier.get_layer("head_dense2").get_weights()
    manual = _relu(_relu(pooled @ w1 + b1) @ w2 + b2)
    np.testing.assert_allclose(features, manual, rtol=KERNEL_RTOL, atol=1e-4)  # traced Dense layers vs NumPy matmul
    # the softmax layer applied to them gives the classifier's output
    w3, b3 = classifier.get_layer("predictions").get_weights()
    logits = features @ w3 + b3
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(axis=1, keepdims=True), classifier.predict_on_batch(images), atol=1e-5)

    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(8))).batch(4)
    # the same model on batches from tf.data and from an array: other traced calls
    np.testing.assert_allclose(classifier_features(classifier, dataset), features, rtol=KERNEL_RTOL, atol=1e-5)
    assert penultimate_model(classifier, "head_dense1").output.shape == (None, 1024)


def test_segmentation_features_are_area_fraction_and_mean_probability():
    inputs = keras.Input(TINY)
    probability_model = keras.Model(inputs, keras.layers.Rescaling(1.0 / 255.0)(inputs))  # p = pixel / 255
    images = random_images(3, n=6)
    images[0] = 0.0  # empty
    images[1] = 255.0  # all foreground
    images[2, :, :16] = 127.0  # half at p < 0.5, half at p >= 0.5
    images[2, :, 16:] = 128.0
    features = segmentation_features(probability_model, images, batch_size=4)
    probabilities = images.reshape(6, -1) / 255.0
    expected = np.stack([(probabilities >= 0.5).mean(axis=1), probabilities.mean(axis=1)], axis=1)
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-7)
    assert features[0].tolist() == [0.0, 0.0] and features[1, 0] == 1.0 and features[2, 0] == 0.5
    strict = segmentation_features(probability_model, images, threshold=0.9)
    np.testing.assert_allclose(strict[:, 0], (probabilities >= 0.9).mean(axis=1), atol=1e-7)


def test_load_images_resizes_like_the_pipeline_and_reports_bad_files(tmp_path):
    grey = np.full((40, 60), 100, np.uint8)
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    colour = np.zeros((50, 30, 3), np.uint8)
    colour[..., 1] = 200  # pure green
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    samples = [
        Sample(image_id=name, patient_id="1", source="covid-chestxray", path=str(tmp_path / name))
        for name in ("grey.png", "broken.png", "colour.png")
    ]
    loaded = load_images(samples, image_size=16)
    assert loaded.pixels.shape == (2, 16, 16, 1) and loaded.pixels.dtype == np.uint8
    assert [s.image_id for s in loaded.samples] == ["grey.png", "colour.png"]
    assert len(loaded.skipped) == 1 and loaded.skipped[0].path.endswith("broken.png")
    assert (loaded.pixels[0] == 100).all()
    expected_grey = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)[0, 0]  # OpenCV's grey of the file
    assert np.abs(loaded.pixels[1].astype(int) - int(expected_grey)).max() <= 1

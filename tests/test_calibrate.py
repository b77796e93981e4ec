"""caaxr calibrate (issue 23, item 3): temperature scaling fitted on the validation split, stored
in the run, applied in the exported graph, thresholds turned into decisions by predict, ECE
before/after in evaluate; a calibration of another checkpoint refused."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from caaxr_tf import cli
from caaxr_tf.calibrate import (
    CalibrationError,
    calibrate_run,
    fit_calibration,
    operating_threshold,
    read_calibration,
)
from caaxr_tf.data.pipeline import read_summary
from caaxr_tf.evaluate import evaluate_run
from caaxr_tf.export import METADATA_PATH, PREPROCESSED_SIGNATURE, export_run
from caaxr_tf.metrics.calibration import (
    apply_temperature,
    calibration_report,
    fit_temperature,
    logits_from_probabilities,
    negative_log_likelihood,
)
from caaxr_tf.metrics.classification import sensitivity_at_specificity
from caaxr_tf.models.layers import TemperatureScaling
from caaxr_tf.run_files import load_run_model
from caaxr_tf.tasks.datasets import make_dataset
from tolerances import KERNEL_RTOL

pytestmark = pytest.mark.numerics

# --------------------------------------------------------------------------- thresholds


def test_threshold_reaches_the_exact_sensitivity_at_specificity():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(5, 80))
        positive = rng.random(n) < 0.4
        positive[:2] = [True, False]
        scores = np.round(rng.random(n) + positive * rng.random(), 2)  # rounded: ties happen
        for specificity in (0.0, 0.5, 0.9, 0.99, 1.0):
            point = operating_threshold(positive, scores, specificity)
            flagged = scores >= point["threshold"]
            assert (~flagged[~positive]).mean() >= specificity - 1e-12
            assert point["sensitivity"] == pytest.approx(sensitivity_at_specificity(positive, scores, specificity),
                                                         abs=1e-12), (trial, specificity)
            assert point["sensitivity"] == flagged[positive].mean()


def test_threshold_boundaries():
    negatives = np.arange(1, 11) / 10.0  # 0.1 ... 1.0
    scores = np.r_[negatives, 0.95, 0.5]
    positive = np.r_[np.zeros(10, bool), True, True]
    point = operating_threshold(positive, scores, 0.9)
    assert point == {"threshold": 0.95, "sensitivity": 0.5, "specificity": 0.9}
    # 0.56 * 25 is 14.000000000000002 in floating point: still 14 negatives below, not 15
    point = operating_threshold(np.r_[np.zeros(25, bool), True, True], np.r_[np.arange(1, 26) / 25, 0.57, 0.1], 0.56)
    assert point == {"threshold": 0.57, "sensitivity": 0.5, "specificity": 0.56}
    # a case exactly at the threshold is positive (>=): the negative at 0.9 is flagged at 80 %
    point = operating_threshold(positive, scores, 0.8)
    assert point == {"threshold": 0.9, "sensitivity": 0.5, "specificity": 0.8}
    assert operating_threshold(positive, scores, 0.0)["threshold"] == 0.1
    # nothing above the largest negative: no case flagged, the threshold just above all scores
    point = operating_threshold(np.r_[positive[:10], True], np.r_[negatives, 0.2], 1.0)
    assert point["threshold"] > 1.0 and point["sensitivity"] == 0.0 and point["specificity"] == 1.0
    with pytest.raises(ValueError, match="no negative"):
        operating_threshold([1, 1], [0.2, 0.3], 0.9)


def test_temperature_fit_on_an_overconfident_model():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 400)
    features = rng.normal(size=(400, 3)) + 1.5 * np.eye(3)[labels]
    # p(y | x) = softmax(1.5 x) exactly (Gaussian classes, unit variance, means 1.5 e_y); the
    # model says softmax(4 x): overconfident by T = 4 / 1.5. 400 cases: within 15 %.
    probabilities = apply_temperature(features * 4.0, 1.0)
    fitted = fit_calibration(labels, probabilities, ["covid", "normal", "pneumonia"], covid=0)
    assert fitted["temperature"] == pytest.approx(4.0 / 1.5, rel=0.15)
    before, after = fitted["validation"]["before"], fitted["validation"]["after"]
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
    scaled = apply_temperature(logits_from_probabilities(probabilities), fitted["temperature"])
    assert np.array_equal(np.argmax(scaled, 1), np.argmax(probabilities, 1))


def test_temperature_layer_equals_the_numpy_scaling():
    probabilities = np.random.default_rng(2).dirichlet([0.3, 0.3, 0.3], 64).astype(np.float32)
    probabilities[0] = [1.0, 0.0, 0.0]  # a zero probability: clipped at 1e-12 on both sides
    layer = TemperatureScaling(2.5)
    got = np.asarray(layer(probabilities))
    # float32 log/softmax against float64: a few ulps of values <= 1
    np.testing.assert_allclose(got, apply_temperature(logits_from_probabilities(probabilities), 2.5), atol=1e-6)
    assert TemperatureScaling.from_config(layer.get_config()).temperature == 2.5
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TemperatureScaling(0.0)


# --------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def tfrecords(tiny_data_root, tmp_path_factory) -> Path:
    from caaxr_tf.data.tfrecords import build_tfrecords

    out = tmp_path_factory.mktemp("calibrate_tfrecords")
    build_tfrecords(tiny_data_root, out, protocols=["2class"], workers=1, progress=False, log=lambda _: None)
    return out


def overconfident_classifier(seed: int) -> keras.Model:
    from caaxr_tf.models import GrayscaleToRGB, ImageNetPreprocessing

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((224, 224, 1), name="image")
    x = ImageNetPreprocessing("torch")(GrayscaleToRGB()(inputs))
    x = layers.AveragePooling2D(8)(x)
    x = layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(2, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(stddev=3.0))(x)
    return keras.Model(inputs, outputs)


def write_run(run_dir: Path, tfrecords: Path, seed: int = 7) -> Path:
    summary = read_summary(tfrecords / "2class")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"protocol": "2class", "task": summary["task"], "model": "mobilenetv2", "model_kwargs": {}, "fold": 1,
              "tfrecords": str(tfrecords / "2class"), "class_names": summary["classes"], "image_size": 224,
              "batch_size": 8, "epochs": 1, "weights": "none", "seed": 0}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    overconfident_classifier(seed).save(run_dir / "best.keras")
    return run_dir


def split_predictions(run_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Independent of caaxr calibrate: model.predict over the split at another batch size."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = load_run_model(run_dir)
    labels, probabilities = [], []
    for images, targets in make_dataset(config["tfrecords"], split, fold=1, batch_size=3, cache=False):
        probabilities.append(model.predict(images, verbose=0))
        labels.append(np.argmax(targets.numpy(), axis=1))
    return np.concatenate(labels), np.concatenate(probabilities).astype(np.float64)


@pytest.fixture(scope="module")
def calibrated(tfrecords, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = write_run(tmp_path_factory.mktemp("calibrated_run"), tfrecords)
    lines: list[str] = []
    return run_dir, calibrate_run(run_dir, log=lines.append) | {"_log": lines}


def test_calibration_is_fitted_on_the_validation_split(calibrated):
    run_dir, data = calibrated
    stored = json.loads((run_dir / "calibration.json").read_text())
    assert stored["temperature"] == data["temperature"] and stored["checkpoint"] == "best"
    labels, probabilities = split_predictions(run_dir, "val")
    assert stored["fitted_on"] == {"split": "val", "fold": 1, "num_images": len(labels),
                                   "tfrecords": str(Path(stored["fitted_on"]["tfrecords"]))}
    # the NLL is flat near its minimum: inputs that differ by float32 kernel noise move the
    # optimum by far less than 1 %, and the optimiser stops at 1e-6 in log T
    reference = fit_temperature(logits_from_probabilities(probabilities), labels)
    assert stored["temperature"] == pytest.approx(reference, rel=1e-2)
    assert stored["temperature"] > 1.0, "a model with weights 3 sd wide is overconfident"
    before, after = stored["validation"]["before"], stored["validation"]["after"]
    assert before["nll"] == pytest.approx(negative_log_likelihood(logits_from_probabilities(probabilities), labels),
                                          rel=KERNEL_RTOL * 10)
    assert after["nll"] < before["nll"]
    covid = stored["thresholds"]["class"]
    scaled = apply_temperature(logits_from_probabilities(probabilities), stored["temperature"])
    column = read_summary(Path(stored["fitted_on"]["tfrecords"]))["classes"].index(covid)
    for key, specificity in (("specificity_90", 0.9), ("specificity_99", 0.99)):
        assert stored["thresholds"][key]["sensitivity"] == pytest.approx(
            sensitivity_at_specificity(labels == column, scaled[:, column], specificity), abs=1e-9)
    text = "\n".join(data["_log"])
    assert "temperature" in text and "at 90% specificity" in text and "wrote" in text


def test_the_export_serves_the_calibrated_probabilities(calibrated, tmp_path):
    run_dir, data = calibrated
    target = export_run(run_dir, tmp_path / "saved_models" / "cal")
    raw_target = export_run(run_dir, tmp_path / "saved_models" / "raw", calibration=False)
    metadata = json.loads((target / METADATA_PATH).read_text())
    assert metadata["calibration"]["temperature"] == data["temperature"]
    assert metadata["calibration"]["thresholds"] == data["thresholds"]
    assert "calibration" not in json.loads((raw_target / METADATA_PATH).read_text())
    card = json.loads((target / "assets.extra" / "package" / "model_card.json").read_text())
    assert card["thresholds"]["values"]["specificity_90"] == data["thresholds"]["specificity_90"]

    images = np.random.default_rng(1).uniform(0, 255, (4, 224, 224, 1)).astype(np.float32)
    keras_probabilities = np.asarray(load_run_model(run_dir)(images, training=False), np.float64)
    served = tf.saved_model.load(str(target)).signatures[PREPROCESSED_SIGNATURE](images=tf.constant(images))
    raw = tf.saved_model.load(str(raw_target)).signatures[PREPROCESSED_SIGNATURE](images=tf.constant(images))
    expected = apply_temperature(logits_from_probabilities(keras_probabilities), data["temperature"])
    # SavedModel graph vs eager Keras, then float32 log/softmax: kernel noise on values <= 1
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(raw["probabilities"].numpy(), keras_probabilities, atol=1e-4)
    assert not np.allclose(served["probabilities"].numpy(), raw["probabilities"].numpy(), atol=1e-3)
    assert np.array_equal(served["predicted_class"].numpy(), raw["predicted_class"].numpy())


def test_predict_turns_the_thresholds_into_decisions(calibrated, tmp_path, tiny_data_root):
    from caaxr_tf.predict import ServedModel, iter_predictions

    run_dir, data = calibrated
    target = export_run(run_dir, tmp_path / "saved_models" / "cal")
    files = sorted((tiny_data_root).rglob("*.png"))[:6]
    model = ServedModel(target)
    records = [r for r in iter_predictions(target, files, batch_size=4, model=model) if "error" not in r]
    assert records
    covid = data["thresholds"]["class"]
    for record in records:
        decisions = record["decisions"]
        assert set(decisions) == {f"{covid} at 90% specificity", f"{covid} at 99% specificity"}
        p = record["probabilities"][covid]  # rounded to 6 digits: away from the threshold it decides alike
        for key, name in (("specificity_90", "90"), ("specificity_99", "99")):
            threshold = data["thresholds"][key]["threshold"]
            if abs(p - threshold) > 1e-6:
                assert decisions[f"{covid} at {name}% specificity"] == (p >= threshold)


def test_evaluate_reports_ece_before_and_after(calibrated):
    run_dir, data = calibrated
    lines: list[str] = []
    metrics = evaluate_run(run_dir, plots=False, log=lines.append)
    scaling = metrics["temperature_scaling"]
    assert scaling["temperature"] == data["temperature"] and scaling["argmax_unchanged"]
    labels, probabilities = split_predictions(run_dir, "test")
    after = calibration_report(labels, apply_temperature(logits_from_probabilities(probabilities),
                                                         data["temperature"]), metrics["class_names"])
    # evaluate scores predictions.csv (6 decimals) and another graph: ECE moves by ~1e-6
    assert scaling["after"]["ece"] == pytest.approx(after["ece"], abs=1e-4)
    assert scaling["before"]["ece"] != pytest.approx(scaling["after"]["ece"], abs=1e-4)
    assert any("temperature" in line and "ECE" in line for line in lines)


def test_a_calibration_of_another_checkpoint_is_refused(tfrecords, tmp_path):
    run_dir = write_run(tmp_path / "run", tfrecords, seed=8)
    calibrate_run(run_dir, log=None)
    assert read_calibration(run_dir)["checkpoint"] == "best"
    with pytest.raises(CalibrationError, match="fitted on the best checkpoint, not on final"):
        read_calibration(run_dir, "final")
    overconfident_classifier(9).save(run_dir / "best.keras")  # trained further since
    out = tmp_path / "saved_models" / "m"
    with pytest.raises(CalibrationError, match=r"calibration.json: fitted on another best.keras"):
        export_run(run_dir, out)
    assert not list(out.glob("[0-9]*")), "nothing is exported"
    lines: list[str] = []
    metrics = evaluate_run(run_dir, plots=False, log=lines.append)  # evaluated without it, and said
    assert "temperature_scaling" not in metrics and "sha256 differs" in metrics["temperature_scaling_left_out"]
    assert any(line.startswith("warning:") for line in lines)
    assert export_run(run_dir, out, calibration=False).name == "1"


@pytest.mark.parametrize("content, field", [
    ("{not json", "not a calibration written by caaxr calibrate"),
    ('{"checkpoint": "best", "checkpoint_sha256": "x", "thresholds": {}}', "'temperature'"),
    ('{"temperature": -1, "checkpoint": "best", "checkpoint_sha256": "x", "thresholds": {}}', "temperature: must be"),
    ('{"temperature": 2, "checkpoint": "best", "checkpoint_sha256": "x", "thresholds": []}', "thresholds: expected"),
])
def test_a_malformed_calibration_names_the_file_and_field(tfrecords, tmp_path, content, field):
    run_dir = write_run(tmp_path / "run", tfrecords)
    (run_dir / "calibration.json").write_text(content)
    with pytest.raises(CalibrationError, match="calibration.json") as caught:
        read_calibration(run_dir)
    assert field in str(caught.value)


def test_cli_refuses_a_run_that_is_not_a_classifier(tmp_path, capsys):
    run_dir = tmp_path / "seg"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"task": "segmentation", "model": "unet", "class_names": [],
                                                         "tfrecords": str(tmp_path / "none")}))
    assert cli.main(["calibrate", "--run", str(run_dir)]) == 2
    assert "calibration is for classifier runs; this run's task is 'segmentation'" in capsys.readouterr().err
    assert not (run_dir / "calibration.json").exists()

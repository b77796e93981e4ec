"""The infection task: evaluation against numpy/scikit-learn references, lung restriction and
per-lung severity, serving outputs, jet overlays, and an export with a lung model in the same
graph, round-tripped through caaxr_tf.predict."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import f1_score, roc_auc_score

from caaxr_tf.infection.lungs import (
    LungRun,
    lung_infection_features,
    served_lung_fractions,
    with_lung_model,
)
from caaxr_tf.infection.maps import LungSplit, lung_infection_fractions, restrict_to_lungs
from caaxr_tf.explain.overlay import jet_rgb
from caaxr_tf.infection.plots import jet_overlay
from caaxr_tf.metrics import dice_per_image
from caaxr_tf.tasks import EvalContext, get_task, task_for
from caaxr_tf.tasks.infection import InfectionClassificationTask, InfectionTask, check_detection_rule

pytestmark = pytest.mark.numerics  # numerics: rerun with oneDNN off by `make test` (tolerances.py)

SIZE = 16
CLASSES = ["covid", "control"]


def blob_masks(rng: np.random.Generator, count: int, covid: np.ndarray) -> np.ndarray:
    """Rectangles of random size and place for COVID images, empty masks for controls."""
    masks = np.zeros((count, SIZE, SIZE, 1), np.float32)
    for index in np.flatnonzero(covid):
        y, x = rng.integers(0, SIZE - 4, 2)
        h, w = rng.integers(2, 6, 2)
        masks[index, y:y + h, x:x + w] = 1.0
    return masks


@pytest.fixture
def split():
    """Three batches (3, 3, 2 images): masks, labels and noisy predicted maps; images carry
    their index in pixel (0, 0) so the fake model can look its map up."""
    rng = np.random.default_rng(7)
    count = 8
    covid = np.array([1, 1, 0, 1, 0, 0, 1, 0], bool)
    truth = blob_masks(rng, count, covid)
    maps = np.clip(0.7 * truth + rng.uniform(0.0, 0.45, truth.shape), 0, 1).astype(np.float32)
    maps[2] = 0.1  # a control with no pixel above any threshold used below
    images = rng.uniform(0, 255, (count, SIZE, SIZE, 1)).astype(np.float32)
    images[:, 0, 0, 0] = np.arange(count)
    batches = [
        (images[a:b], {"mask": truth[a:b], "covid": covid[a:b].astype(np.float32)},
         tf.constant([f"img{i}" for i in range(a, b)]))
        for a, b in ((0, 3), (3, 6), (6, 8))
    ]

    def predict(batch):
        return maps[np.asarray(batch)[:, 0, 0, 0].astype(int)]

    return dict(images=images, truth=truth, maps=maps, covid=covid, batches=batches, predict=predict)


def reference(truth, maps, covid, threshold, min_pixels):
    infected = (maps >= threshold).reshape(len(maps), -1).sum(axis=1)
    detected = infected >= min_pixels
    return dict(
        pixel_f1=f1_score(truth.ravel() > 0.5, maps.ravel() >= threshold),
        sensitivity=np.mean(detected[covid]),
        specificity=np.mean(~detected[~covid]),
        auc=roc_auc_score(covid, infected),
        dice=np.mean(dice_per_image(truth, maps, threshold, 1.0)),
        infected=infected,
        detected=detected,
    )


@pytest.mark.parametrize("options", [{}, {"threshold": 0.3, "min_pixels": 40}])
def test_evaluation_matches_numpy_and_sklearn(split, options, tmp_path):
    task = InfectionTask(CLASSES)
    context = EvalContext(tmp_path, "", "test", plots=True, num_examples=3, options=dict(options))
    result = task.evaluate(split["predict"], split["batches"], context)
    threshold, min_pixels = options.get("threshold", 0.5), options.get("min_pixels", 1)
    expected = reference(split["truth"], split["maps"], split["covid"], threshold, min_pixels)
    metrics = result.metrics
    assert metrics["num_images"] == 8 and metrics["num_covid"] == 4 and metrics["num_control"] == 4
    assert metrics["pixel_f1"] == pytest.approx(expected["pixel_f1"], abs=1e-12)
    truth, predicted = split["truth"].ravel() > 0.5, split["maps"].ravel() >= threshold
    assert metrics["pixel_tp"] == np.sum(truth & predicted) and metrics["pixel_fp"] == np.sum(~truth & predicted)
    assert metrics["tp"] + metrics["fn"] == 4 and metrics["tn"] + metrics["fp"] == 4
    assert metrics["sensitivity"] == pytest.approx(expected["sensitivity"])
    assert metrics["specificity"] == pytest.approx(expected["specificity"])
    assert metrics["detection_auc"] == pytest.approx(expected["auc"])
    assert metrics["dice"] == pytest.approx(expected["dice"], abs=1e-6)
    assert (metrics["threshold"], metrics["min_pixels"]) == (threshold, min_pixels)
    assert [row[0] for row in result.rows] == [f"img{i}" for i in range(8)]
    assert [row[5] for row in result.rows] == expected["infected"].tolist()
    assert [row[6] for row in result.rows] == expected["detected"].astype(int).tolist()
    assert sorted(context.files) == ["examples", "roc"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in context.files.values())


def test_the_two_options_give_different_operating_points(split, tmp_path):
    published = reference(split["truth"], split["maps"], split["covid"], 0.5, 1)
    strict = reference(split["truth"], split["maps"], split["covid"], 0.3, 40)
    # the fixture is only useful if the rule's options change the outcome
    assert not np.array_equal(published["detected"], strict["detected"])


class FakeLungs:
    """A lung run stand-in: a fixed lung mask (two lungs, one per image half) for every image."""

    run_dir = Path("fake-lung-run")

    def __init__(self):
        self.lungs = np.zeros((SIZE, SIZE, 1), np.float32)
        self.lungs[2:14, 1:7] = 0.9
        self.lungs[3:13, 9:15] = 0.8

    def predict(self, images):
        return np.repeat(self.lungs[None], len(images), axis=0)


def test_lung_restriction_and_severity_grades(split, tmp_path):
    lungs = FakeLungs()
    context = EvalContext(tmp_path, "", "t", plots=False, options={"lung_run": lungs})
    result = InfectionTask(CLASSES).evaluate(split["predict"], split["batches"], context)
    restricted = restrict_to_lungs(split["maps"], lungs.predict(split["maps"]))
    assert np.any(restricted != split["maps"])
    expected = reference(split["truth"], restricted, split["covid"], 0.5, 1)
    assert result.metrics["pixel_f1"] == pytest.approx(expected["pixel_f1"], abs=1e-12)
    assert result.metrics["lung_run"] == "fake-lung-run"
    # per-lung fractions by hand: the patient's right lung is the image-left one
    header = result.header
    right, left = header.index("right_lung_infected_fraction"), header.index("left_lung_infected_fraction")
    for index, row in enumerate(result.rows):
        infected = split["maps"][index, ..., 0] >= 0.5
        right_lung, left_lung = lungs.lungs[..., 0] > 0.5, lungs.lungs[..., 0] > 0.5
        right_lung[:, SIZE // 2:] = False
        left_lung[:, :SIZE // 2] = False
        assert float(row[right]) == pytest.approx((infected & right_lung).sum() / right_lung.sum(), abs=1e-6)
        assert float(row[left]) == pytest.approx((infected & left_lung).sum() / left_lung.sum(), abs=1e-6)
    severity = result.metrics["severity"]
    true_total = [float(row[header.index("true_lungs_infected_fraction")]) for row in result.rows]
    predicted_total = [float(row[header.index("lungs_infected_fraction")]) for row in result.rows]
    covid = split["covid"]
    assert severity["total_fraction_mae"] == pytest.approx(
        np.mean(np.abs(np.array(predicted_total) - np.array(true_total))[covid]), abs=1e-6)


def test_lung_infection_features_on_hand_made_masks():
    lungs = np.zeros((2, 10, 12), bool)
    lungs[:, 1:9, 1:5] = True  # image-left: patient's right, 32 pixels
    lungs[:, 2:8, 7:11] = True  # image-right: patient's left, 24 pixels
    maps = np.zeros((2, 10, 12), np.float32)
    maps[0, 1:3, 1:5] = 0.9  # 8 of the right lung
    maps[0, 2:8, 7:8] = 0.6  # 6 of the left lung
    maps[0, 0, :] = 1.0  # outside the lungs: ignored
    lungs[1, :, 7:11] = False  # second image: no left lung
    features = lung_infection_features(maps, lungs)
    np.testing.assert_allclose(features[0], [8 / 32, 6 / 24, 14 / 56])
    assert features[1, 0] == 0.0 and np.isnan(features[1, 1]) and features[1, 2] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        lung_infection_features(maps, lungs[:, :, :10])


def test_serving_outputs_match_the_numpy_rule():
    rng = np.random.default_rng(3)
    maps = rng.uniform(0, 1, (3, SIZE, SIZE, 1)).astype(np.float32) ** 4
    maps[1] = 0.2
    lungs = FakeLungs().predict(maps)
    lungs[2, :, : SIZE // 2] = 0.0  # no right lung in the third image
    task = InfectionTask(CLASSES, threshold=0.5, min_pixels=3)
    plain = {k: np.asarray(v) for k, v in task.serving_outputs(tf.constant(maps)).items()}
    assert sorted(plain) == ["covid", "infected_pixels", "mask"]
    counts = (maps >= 0.5).reshape(3, -1).sum(axis=1)
    np.testing.assert_array_equal(plain["infected_pixels"], counts)
    np.testing.assert_array_equal(plain["covid"], (counts >= 3).astype(np.float32))

    served = {k: np.asarray(v) for k, v in task.serving_outputs({"mask": maps, "lungs": lungs}).items()}
    restricted = restrict_to_lungs(maps, lungs)
    np.testing.assert_array_equal(served["mask"], restricted)
    np.testing.assert_array_equal(served["infected_pixels"], (restricted >= 0.5).reshape(3, -1).sum(axis=1))
    for index in range(3):
        binary = lungs[index, ..., 0] >= 0.5
        midline = np.arange(SIZE)[None, :] < SIZE // 2
        split = LungSplit(right=binary & midline, left=binary & ~midline, method="midline")
        expected = lung_infection_fractions(restricted[index], split)
        values = [expected.right_fraction, expected.left_fraction, expected.total_fraction]
        np.testing.assert_allclose(served["lung_fractions"][index], np.nan_to_num(values), atol=1e-6)
        assert served["lung_pixels"][index].tolist() == [expected.right_lung_pixels, expected.left_lung_pixels]
    record = task.prediction_record(served, 2)
    assert record["right_lung_infected_fraction"] is None and record["left_lung_infected_fraction"] is not None
    assert record["infected_pixels"] == int(served["infected_pixels"][2])
    assert record["covid_detected"] == bool(served["covid"][2])


def test_jet_colours_and_overlay():
    # matplotlib's jet segments: red rises from 0.35 to 0.66, blue falls from 0.34 to 0.65
    np.testing.assert_allclose(jet_rgb(np.array([0.0, 0.5, 1.0])),
                               [[0, 0, 0.5], [0.15 / 0.31, 1, 0.15 / 0.31], [0.5, 0, 0]], rtol=1e-6)
    pixels = np.full((4, 4), 100, np.uint8)
    infection_map = np.zeros((4, 4, 1), np.float32)
    infection_map[0, 0] = 1.0
    overlay = jet_overlay(pixels, infection_map, alpha=0.5)
    assert overlay.shape == (4, 4, 3) and overlay.dtype == np.uint8
    assert overlay[0, 0].tolist() == [114, 50, 50] and overlay[1, 1].tolist() == [50, 50, 114]
    task = InfectionTask(CLASSES)
    np.testing.assert_array_equal(task.overlay(pixels, {"mask": infection_map}), jet_overlay(pixels, infection_map))


def test_registry_config_and_rule_checks():
    assert task_for("infection", "segmentation") is InfectionTask
    assert task_for("infection", "classification") is InfectionClassificationTask
    assert get_task("infection") is InfectionTask
    assert InfectionTask.config_sections() == ("segmentation", "infection")
    assert InfectionTask(CLASSES).loss == "focal_dice"
    assert InfectionTask(["control", "covid"]).covid_index == 1
    for threshold, min_pixels in ((0.0, 1), (1.5, 1), (0.5, 0), (0.5, 1.5), (0.5, True)):
        with pytest.raises(ValueError):
            check_detection_rule(threshold, min_pixels)
    with pytest.raises(ValueError, match="infection export must output"):
        InfectionTask(CLASSES).check_outputs({"mask"})


def threshold_model(size: int, weight: float, bias: float, name: str) -> keras.Model:
    """``sigmoid(weight * pixel + bias)`` per pixel: a tiny serializable 'segmentation model'."""
    images = keras.Input((size, size, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer=keras.initializers.Constant(weight),
                                  bias_initializer=keras.initializers.Constant(bias))(images)
    return keras.Model(images, outputs, name=name)


def fake_run(folder: Path, model: keras.Model, size: int, task: str = "segmentation") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(json.dumps({"task": task, "protocol": "lungs", "image_size": size}))
    model.save(folder / "best.keras")
    return folder


def test_export_with_a_lung_model_round_trips_through_predict(tmp_path):
    import cv2

    from caaxr_tf.export import export_model, with_lung_run
    from caaxr_tf.predict import ServedModel, predict_files, prepare_image

    size = 32
    # infected where the pixel is bright (> 200), lung where it is not black (> 50)
    infection = threshold_model(size, 0.5, -100.0, "infection")
    lung_dir = fake_run(tmp_path / "lungs", threshold_model(size, 0.5, -25.0, "lungs"), size)
    task = InfectionTask(CLASSES)
    with pytest.raises(ValueError, match="task is segmentation"):
        with_lung_run(infection, get_task("segmentation")(["lesion"]), lung_dir, size)
    with pytest.raises(ValueError, match="a lung run is a segmentation run"):
        LungRun(fake_run(tmp_path / "not-lungs", infection, size, task="classification"))
    combined = with_lung_run(infection, task, lung_dir, size)

    image = np.zeros((size, size), np.uint8)
    image[4:28, 2:14] = 120  # right lung (image left)
    image[4:28, 18:30] = 120  # left lung
    image[6:10, 4:8] = 255  # 16 infected pixels in the right lung
    image[0:2, 0:3] = 255  # 6 bright pixels on black: infected, and lung by the lung model's rule
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), image)
    export = export_model(combined, tmp_path / "export", task=task, class_names=CLASSES, image_size=size)
    served = ServedModel(export)
    assert served.task.name == "infection"
    (record,) = predict_files(export, [path], model=served, overlay_dir=tmp_path / "overlays")
    assert "error" not in record, record
    assert record["infected_pixels"] == 22 and record["covid_detected"] is True
    right_lung = 24 * 12 + 6  # the bright corner is lung by the lung model's rule and on the image's left
    assert record["right_lung_infected_fraction"] == pytest.approx(22 / right_lung, abs=1e-6)
    assert record["left_lung_infected_fraction"] == 0.0
    assert Path(record["overlay"]).exists()
    outputs = served([prepare_image(path)])
    keras_outputs = task.serving_outputs(combined(image[None, :, :, None].astype(np.float32)))
    for name, value in keras_outputs.items():
        np.testing.assert_allclose(outputs[name], np.asarray(value), atol=1e-5, err_msg=name)


def test_lung_model_of_another_input_size():
    infection = threshold_model(32, 0.5, -100.0, "unet")
    combined = with_lung_model(infection, threshold_model(16, 0.5, -25.0, "unet"), 32, 16)  # same names
    images = np.full((2, 32, 32, 1), 120.0, np.float32)
    outputs = combined(images)
    assert outputs["mask"].shape == (2, 32, 32, 1) and outputs["lungs"].shape == (2, 32, 32, 1)
    np.testing.assert_allclose(np.asarray(outputs["lungs"]), 1 / (1 + np.exp(-(0.5 * 120 - 25))), rtol=1e-5)
    fractions, pixels = served_lung_fractions(outputs["mask"], outputs["lungs"], 0.5)
    assert np.asarray(pixels).tolist() == [[512, 512], [512, 512]] and np.all(np.asarray(fractions) == 0)


BELOW_T = np.nextafter(np.float32(0.5), np.float32(0.0))  # the largest float32 below t = 0.5


@pytest.mark.parametrize("min_pixels", [1, 4])
def test_exactly_a_pixels_at_exactly_t_is_covid_in_evaluate(min_pixels, tmp_path):
    """Image 0: exactly A pixels equal to t = 0.5, all others just below t: COVID. Image 1: A - 1
    pixels at t: not COVID. Image 2: no pixel at t, everything just below: not COVID."""
    maps = np.full((3, SIZE, SIZE, 1), BELOW_T, np.float32)
    maps[0, 3, :min_pixels] = 0.5
    maps[1, 3, :min_pixels - 1] = 0.5
    truth = np.zeros_like(maps)
    truth[0, 3, :min_pixels] = 1.0
    images = np.zeros((3, SIZE, SIZE, 1), np.float32)
    images[:, 0, 0, 0] = np.arange(3)
    batch = (images, {"mask": truth, "covid": np.array([1, 0, 0], np.float32)}, tf.constant(["a", "b", "c"]))
    context = EvalContext(tmp_path, "", "test", plots=False, options={"threshold": 0.5, "min_pixels": min_pixels})
    result = InfectionTask(CLASSES).evaluate(lambda x: maps[np.asarray(x)[:, 0, 0, 0].astype(int)], [batch], context)
    assert [row[5] for row in result.rows] == [min_pixels, min_pixels - 1, 0]  # infected_pixels
    assert [row[6] for row in result.rows] == [1, 0, 0]  # covid_detected
    assert result.metrics["sensitivity"] == 1.0 and result.metrics["specificity"] == 1.0


@pytest.mark.parametrize("min_pixels", [1, 4])
def test_exactly_a_pixels_at_exactly_t_is_covid_in_the_served_graph(min_pixels, tmp_path):
    """The exported serving graph: a linear 1x1 'model' with weight 2**-8 maps pixel 128 to
    exactly 0.5 (and 127 to 0.496): A pixels of 128 give infected_pixels == A and COVID; A - 1 do not."""
    import cv2

    from caaxr_tf.export import export_model
    from caaxr_tf.predict import ServedModel, prepare_image

    size = 16
    inputs = keras.Input((size, size, 1))
    outputs = keras.layers.Conv2D(1, 1, kernel_initializer=keras.initializers.Constant(2.0 ** -8),
                                  bias_initializer="zeros")(inputs)
    model = keras.Model(inputs, outputs, name="unet")
    paths = []
    for index, at_t in enumerate((min_pixels, min_pixels - 1)):
        image = np.full((size, size), 127, np.uint8)  # 127 / 256 = 0.496: below t
        image[5, :at_t] = 128  # 128 / 256 = 0.5: exactly t
        paths.append(tmp_path / f"image{index}.png")
        cv2.imwrite(str(paths[-1]), image)
    task = InfectionTask(CLASSES, threshold=0.5, min_pixels=min_pixels)
    export = export_model(model, tmp_path / "export", task=task, class_names=CLASSES, image_size=size)
    served = ServedModel(export)([prepare_image(path) for path in paths])
    assert served["mask"][0, 5, 0, 0] == 0.5 and served["mask"][0, 6, 0, 0] == np.float32(127 / 256)
    assert served["infected_pixels"].tolist() == [min_pixels, min_pixels - 1]
    assert served["covid"].tolist() == [1.0, 0.0]

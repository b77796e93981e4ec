"""Infection maps vs Grad-CAM on a tiny QaTa protocol: the shared pixel-F1 scoring against an
independent reference, and ``evaluate --lung-run`` through the run-folder path."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from sklearn.metrics import f1_score

from caaxr_tf.infection.cam import (
    MapScores,
    comparison_table,
    score_classifier_cams,
    score_infection_run,
    score_maps,
)

pytestmark = pytest.mark.numerics  # numerics: rerun with oneDNN off by `make test` (tolerances.py)

SIZE = 32
CLASSES = ["covid", "control"]


@pytest.fixture(scope="module")
def qata_protocol(tiny_qata_root, tmp_path_factory) -> Path:
    from caaxr_tf.data.tfrecords import build_tfrecords

    out = tmp_path_factory.mktemp("qata_infection")
    build_tfrecords(tiny_qata_root, out, source="qata", protocols=["infection"], workers=1, progress=False,
                    log=lambda line: None)
    return out / "infection"


def save_run(folder: Path, model: keras.Model, protocol_dir: Path, task: str, **extra) -> Path:
    folder.mkdir(parents=True)
    config = {"task": task, "model": model.name, "tfrecords": str(protocol_dir), "fold": 1, "image_size": SIZE,
              "class_names": CLASSES, "protocol": "infection", "batch_size": 4, **extra}
    (folder / "config.yaml").write_text(json.dumps(config))
    model.save(folder / "best.keras")
    return folder


def bright_pixels(name: str, bias: float) -> keras.Model:
    images = keras.Input((SIZE, SIZE, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer=keras.initializers.Constant(0.1),
                                  bias_initializer=keras.initializers.Constant(bias))(images)
    return keras.Model(images, outputs, name=name)


def tiny_classifier() -> keras.Model:
    keras.utils.set_random_seed(0)
    images = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Rescaling(1 / 255.0)(images)
    x = keras.layers.Conv2D(4, 3, strides=4, activation="relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    return keras.Model(images, outputs, name="tinycls")


def split_arrays(protocol_dir: Path):
    from caaxr_tf.tasks.datasets import make_dataset
    from caaxr_tf.tasks.infection import InfectionTask

    dataset = make_dataset(protocol_dir, "test", fold=1, batch_size=4, task=InfectionTask(CLASSES), training=False,
                           augment=False, cache=False, image_size=SIZE)
    parts = list(dataset)
    return (np.concatenate([np.asarray(images) for images, _ in parts]),
            np.concatenate([np.asarray(t["mask"]) for _, t in parts]),
            np.concatenate([np.asarray(t["covid"]) for _, t in parts]) > 0.5)


def test_score_maps_matches_sklearn():
    rng = np.random.default_rng(0)
    truth = (rng.uniform(size=(6, 8, 8, 1)) > 0.7).astype(np.float32)
    truth[4:] = 0
    covid = np.array([1, 1, 1, 1, 0, 0], np.float32)
    maps = rng.uniform(size=truth.shape).astype(np.float32)
    batches = [(maps[:4], {"mask": truth[:4], "covid": covid[:4]}), (maps[4:], {"mask": truth[4:], "covid": covid[4:]})]
    scores = score_maps(lambda images: images, batches, 0.6, "identity")
    assert scores.num_images == 6
    assert scores.pixel_f1 == pytest.approx(f1_score(truth.ravel() > 0.5, maps.ravel() >= 0.6))
    assert scores.pixel_f1_covid == pytest.approx(f1_score(truth[:4].ravel() > 0.5, maps[:4].ravel() >= 0.6))
    assert scores.pixel_f1_covid > scores.pixel_f1  # the controls only add false positives
    table = comparison_table([scores, MapScores("identity", "", 6, 0.5, 0.7, 0.2)])
    assert "| identity | 2 | 6 |" in table and f"{np.mean([scores.pixel_f1, 0.5]):.4f} ± " in table


def test_gradcam_and_infection_map_scores_on_a_tiny_protocol(qata_protocol, tmp_path):
    from caaxr_tf.explain.gradcam import GradCam

    images, truth, covid = split_arrays(qata_protocol)
    assert covid.any() and (~covid).any()
    classifier = tiny_classifier()
    run = save_run(tmp_path / "cls", classifier, qata_protocol, "infection_classification")
    scores = score_classifier_cams(run, cam_threshold=0.4, batch_size=4)
    cams = GradCam(classifier)(images, np.zeros(len(images), np.int32)).cam
    assert scores.num_images == len(images)
    assert scores.pixel_f1 == pytest.approx(f1_score(truth.ravel() > 0.5, cams.ravel() >= 0.4), abs=1e-9)

    infection = bright_pixels("bright", -15.0)
    scores = score_infection_run(save_run(tmp_path / "inf", infection, qata_protocol, "infection"), batch_size=4)
    maps = np.asarray(infection(images))
    assert scores.pixel_f1 == pytest.approx(f1_score(truth.ravel() > 0.5, maps.ravel() >= 0.5), abs=1e-9)


def test_evaluate_with_a_lung_run(qata_protocol, tmp_path):
    from caaxr_tf.evaluate import evaluate_run

    infection = save_run(tmp_path / "inf", bright_pixels("bright", -15.0), qata_protocol, "infection")
    lungs = save_run(tmp_path / "lungs", bright_pixels("lungs", -5.0), qata_protocol, "segmentation")
    plain = evaluate_run(infection, plots=False, log=None)
    restricted = evaluate_run(infection, plots=False, log=None, options={"lung_run": str(lungs), "min_pixels": 5})
    assert (infection / "eval" / "metrics.json").exists() and (infection / "eval" / "metrics_lungs_a5.json").exists()
    assert restricted["lung_run"] == str(lungs) and restricted["min_pixels"] == 5 and plain["lung_run"] is None
    assert restricted["pixel_fp"] <= plain["pixel_fp"] and restricted["pixel_tp"] <= plain["pixel_tp"]
    assert restricted["severity"]["num_images"] == restricted["num_covid"]
    header = (infection / "eval" / "predictions_lungs_a5.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["true_right_lung_infected_fraction", "true_left_lung_infected_fraction",
                           "true_lungs_infected_fraction"]


def test_image_infection_features_through_both_runs(tmp_path):
    from caaxr_tf.infection.lungs import image_infection_features, lung_infection_features

    infection_model, lung_model = bright_pixels("bright", -15.0), bright_pixels("lungs", -5.0)
    infection = save_run(tmp_path / "inf", infection_model, tmp_path, "infection")
    lungs = save_run(tmp_path / "lungs", lung_model, tmp_path, "segmentation")
    images = np.random.default_rng(1).uniform(0, 255, (5, SIZE, SIZE, 1)).astype(np.float32)
    features = image_infection_features(images, infection, lungs, batch_size=2)
    expected = lung_infection_features(np.asarray(infection_model(images)), np.asarray(lung_model(images)))
    assert features.shape == (5, 3) and np.all(np.isfinite(features)) and np.any(features > 0)
    np.testing.assert_allclose(features, expected, atol=1e-6)


def test_baselines_of_constant_maps(qata_protocol):
    from caaxr_tf.tasks.datasets import make_dataset
    from caaxr_tf.tasks.infection import InfectionTask

    _, _, covid = split_arrays(qata_protocol)
    full = InfectionTask(CLASSES).baselines(qata_protocol, "test", 1, [])[""]
    # the masks at the pipeline's default image size, where the baselines are scored
    dataset = make_dataset(qata_protocol, "test", fold=1, batch_size=8, task=InfectionTask(CLASSES), training=False,
                           augment=False, cache=False)
    masks = np.concatenate([np.asarray(t["mask"]) for _, t in dataset]) > 0.5
    positives, pixels = masks.sum(), masks.size
    assert full["empty map"] == {"num_images": len(covid), "pixel_f1": 0.0, "dice": pytest.approx(np.mean(~covid)),
                                 "sensitivity": 0.0, "specificity": 1.0}
    ones = full["all-ones map"]
    assert ones["pixel_f1"] == pytest.approx(2 * positives / (positives + pixels))
    assert (ones["sensitivity"], ones["specificity"]) == (1.0, 0.0)

"""Every registered model through the one shared path: resolve → Trainer (one short epoch) →
save/load → evaluate → export → predict, on a tiny protocol of its task.

The models come from the registry and their tasks from the task registry, so a new model or
task is checked without editing this file; a model kind that no protocol below can train fails
here, naming what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from caaxr_tf import runs
from caaxr_tf.config import ConfigError
from caaxr_tf.models import available_models, model_task
from caaxr_tf.models.ct_models import CT_MODELS
from caaxr_tf.tasks import UnknownTaskError, available_tasks, get_task, task_for

# Tiny protocols to train on, by the task named in their summary.json: (source set, protocol, data fixture).
PROTOCOLS = {
    "classification": ("caaxr", "2class", "tiny_data_root"),
    "segmentation": ("caaxr", "seg", "tiny_data_root"),
    "regression": ("covid-chestxray", "severity", "covid_chestxray_root"),
    "infection": ("qata", "infection", "tiny_qata_root"),
    "ct": ("covid-ctset", "ct", "tiny_ct_root"),
}
# The smallest input each model builds with is used. Not 32: DenseNet121 builds at 32 px but its
# feature maps end at 1x1 and its outputs on random images are NaN after a step.
IMAGE_SIZES = (64, 96, 128)
# Smaller builds of the model that trains an otherwise unreached protocol task (its architecture
# is already checked at full width by the per-model test).
NARROW = {"unet": ["model_kwargs.base_filters=8"]}
# Models that take raw CT slices train through the ct task; the others on the first protocol of their kind.
MODEL_PROTOCOLS = {name: "ct" for name in CT_MODELS}


def protocol_for(kind: str) -> str:
    """The protocol task (a key of PROTOCOLS) whose protocols a ``kind`` model runs on."""
    for protocol_task in PROTOCOLS:
        try:
            task_for(protocol_task, kind)
            return protocol_task
        except UnknownTaskError:
            continue
    pytest.fail(f"no tiny protocol in PROTOCOLS trains a {kind} model: add one for its task")


@pytest.fixture(scope="module")
def tfrecords(request, tmp_path_factory):
    """Builds each tiny protocol once, on first use: protocol task -> protocol folder."""
    from caaxr_tf.data.tfrecords import build_tfrecords

    built: dict[str, Path] = {}

    def get(protocol_task: str) -> Path:
        if protocol_task not in built:
            source, protocol, data_fixture = PROTOCOLS[protocol_task]
            data_root = request.getfixturevalue(data_fixture)
            out = tmp_path_factory.mktemp(f"every_model_{protocol}")
            build_tfrecords(data_root, out, source=source, protocols=[protocol], workers=1, progress=False,
                            log=lambda line: None)
            built[protocol_task] = out / protocol
        return built[protocol_task]

    return get


def test_every_task_is_trained_by_some_registered_model():
    kinds = {model_task(name) for name in available_models()}
    for name in available_tasks():
        task = get_task(name)
        assert task.model_task in kinds, f"task {name}: no registered {task.model_task} model"


def train_tiny(model: str, protocol_dir: Path, run_dir: Path, overrides: tuple[str, ...] = ()):
    """One epoch of one step at the smallest input size the model builds with."""
    from caaxr_tf.train import run_training
    from caaxr_tf.training import resolve_run_config

    flags = {"epochs": 1, "steps_per_epoch": 1, "validation_steps": 1, "batch_size": 2, "strategy": "one",
             "weights": "none"}
    for size in IMAGE_SIZES:
        config = resolve_run_config(protocol_dir, protocol_dir.name, model, 1, flags=flags,
                                    overrides=[f"image_size={size}", "bn_recompute_images=0", *overrides])
        try:
            run_training(config, run_dir / f"{size}px", verbose=False)
            return config, run_dir / f"{size}px"
        except ConfigError as error:  # the model needs a larger input
            last = error
    pytest.fail(f"{model} did not build at {IMAGE_SIZES}: {last}")


def one_test_image(protocol_dir: Path, folder: Path) -> Path:
    """The encoded bytes of the first test record, as a file predict can read."""
    import tensorflow as tf

    from caaxr_tf.data.pipeline import parse_record, shard_files

    record = next(iter(tf.data.TFRecordDataset(shard_files(protocol_dir, "test")).map(parse_record)))
    suffix = ".jpg" if record["image/format"].numpy() == b"jpeg" else ".png"
    path = folder / f"image{suffix}"
    path.write_bytes(record["image/encoded"].numpy())
    return path


def protocol_tasks_no_model_reaches() -> list[tuple[str, str]]:
    """``(protocol task, model)`` for each protocol task of PROTOCOLS that the per-model test
    never trains on (its models' kind trains on an earlier protocol task, e.g. segmentation
    models on ``segmentation`` rather than ``infection``): the first registered model that can."""
    from caaxr_tf.tasks.base import TASKS

    models = sorted(available_models(), key=lambda name: (name != "unet", name))
    reached = {MODEL_PROTOCOLS.get(name) or protocol_for(model_task(name)) for name in models}
    pairs = []
    for protocol_task in PROTOCOLS:
        kinds = {cls.model_task for cls in TASKS.values() if cls.protocol_task == protocol_task}
        candidates = [name for name in models if model_task(name) in kinds]
        if protocol_task not in reached and candidates:
            pairs.append((protocol_task, candidates[0]))
    return pairs


@pytest.mark.parametrize("model", available_models())
def test_model_trains_saves_evaluates_exports_and_predicts(model, tfrecords, tmp_path, request):
    check_shared_path(model, MODEL_PROTOCOLS.get(model) or protocol_for(model_task(model)), tfrecords, tmp_path,
                      request=request)


@pytest.mark.parametrize("protocol_task, model", protocol_tasks_no_model_reaches())
def test_every_protocol_task_runs_the_shared_path(protocol_task, model, tfrecords, tmp_path, request):
    check_shared_path(model, protocol_task, tfrecords, tmp_path, tuple(NARROW.get(model, ())), request=request)


def check_shared_path(model: str, protocol_task: str, tfrecords, tmp_path: Path,
                      overrides: tuple[str, ...] = (), *, request) -> None:
    import tensorflow as tf

    from caaxr_tf.evaluate import evaluate_run
    from caaxr_tf.export import export_run
    from caaxr_tf.predict import ServedModel, predict_files, prepare_image

    protocol_dir = tfrecords(protocol_task)
    config, run_dir = train_tiny(model, protocol_dir, tmp_path / "run", overrides)
    task = get_task(config.task)
    assert task.protocol_task == json.loads((protocol_dir / "summary.json").read_text())["task"]
    history = (run_dir / runs.HISTORY_FILE).read_text().splitlines()
    assert len(history) == 2 and np.isfinite(float(history[1].split(",")[1]))  # header + epoch 1; loss

    assert (run_dir / runs.BEST_MODEL).exists() and (run_dir / runs.FINAL_MODEL).exists()

    metrics = evaluate_run(run_dir, batch_size=4, plots=False, log=None)
    summary = json.loads((protocol_dir / "summary.json").read_text())
    assert metrics["task"] == config.task and metrics["num_images"] == sum(summary["counts"]["test"].values())
    assert (run_dir / "eval" / "metrics.json").exists() and (run_dir / "eval" / "predictions.csv").exists()
    if config.task == "ct":  # and the patient pipeline over the test patients' whole series
        check_ct_patients(run_dir, protocol_dir, config, request.getfixturevalue(PROTOCOLS["ct"][2]))

    # exported without the built-in check, which would load the SavedModel a second time: the
    # served outputs are compared with the Keras model's below, on a real test image
    export = export_run(run_dir, tmp_path / "saved_models" / "model", verify=False)
    image = one_test_image(protocol_dir, tmp_path)
    served = ServedModel(export)
    assert served.task.name == config.task
    (record,) = predict_files(export, [image], model=served)
    assert "error" not in record, record
    outputs = served([prepare_image(image)])
    expected = served.task.prediction_record(outputs, 0)
    assert expected and {key: record[key] for key in expected} == expected
    keras_model = runs.load_run_model(run_dir, "best")
    prepared = prepare_image(image)
    pixels = served.task.serving_inputs(tf.constant([prepared.encoded]), tf.constant([prepared.invert]),
                                        tf.constant([prepared.bit_depth]), served.image_size).numpy()
    reference = served.task.serving_outputs(keras_model(pixels, training=False))
    for name, value in reference.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            np.testing.assert_allclose(outputs[name], value, atol=1e-4, err_msg=name)


def check_ct_patients(run_dir: Path, protocol_dir: Path, config, data_root: Path) -> None:
    """The patient pipeline of a CT run: what ``evaluate --patients`` reports equals the patient
    rule applied, by hand, to the slice probabilities the pipeline computed, on the slices an
    independent selection keeps; inputs and probabilities have the right shapes and ranges."""
    import csv
    from fractions import Fraction

    from caaxr_tf.ct.patients import evaluate_patients, patient_series, split_patients
    from caaxr_tf.data.records import InputError
    from caaxr_tf.evaluate import evaluate_run, predict_function

    summary = evaluate_run(run_dir, batch_size=8, plots=False, log=None, patients=data_root)["patients"]
    with open(run_dir / "eval" / "patients.csv", newline="", encoding="utf-8") as handle:
        csv_rows = {row["patient_id"]: row for row in csv.DictReader(handle)}

    # The same pipeline again with the run's best model, recording what it classifies.
    task = get_task(config.task)(config.class_names)
    covid = task.covid_index
    predict = predict_function(runs.load_run_model(run_dir, "best"))
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def classify(images: np.ndarray) -> np.ndarray:
        probabilities = np.asarray(predict(images))
        calls.append((np.asarray(images), probabilities))
        return np.argmax(probabilities, axis=1) == covid

    patients = split_patients(protocol_dir, "test", 1)
    again, results = evaluate_patients(data_root, patients, classify, config.image_size, batch_size=8)
    assert again == summary  # evaluate_run reported this pipeline's outcome
    assert [r.patient_id for r in results] == patients and len(patients) == 2 == len(csv_rows)
    size = config.image_size
    for images, probabilities in calls:
        assert images.dtype == np.float32 and images.shape[1:] == (size, size, 1) and 1 <= len(images) <= 8
        assert images.min() >= 0 and images.max() <= 65535 and images.max() > 255  # raw values, not scaled
        assert probabilities.shape == (len(images), len(config.class_names))
        assert np.all((probabilities >= 0) & (probabilities <= 1))
        # float32 softmax: the row sums are 1 to float32 rounding (a few ulps of 1)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # a COVID slice: the COVID probability is the largest (a tie goes to the first index, as argmax)
    others = [np.delete(p, covid, axis=1).max(axis=1) for _, p in calls]
    flags = np.concatenate([p[:, covid] >= other if covid == 0 else p[:, covid] > other
                            for (_, p), other in zip(calls, others)])

    # Independent selection over each patient's series: decodable slices, their counts, kept slices.
    found, _ = patient_series(data_root, patients)
    start = 0
    counts = {"threshold1": [0, 0, 0], "threshold2": [0, 0, 0]}  # correct, covid_to_normal, normal_to_covid
    for result in results:
        truth, series = found[result.patient_id]
        decodable = kept = 0
        for item in series:
            dark = []
            for _, pixels in item.iter_slices():
                if isinstance(pixels, InputError):
                    continue
                region = pixels[240:340, 120:370].astype(np.int64)
                dark.append(int((region < 300).sum()))
            decodable += len(dark)
            if len(dark) >= 2:
                dark = np.array(dark)
                kept += int(np.sum(dark > (dark.max() - dark.min()) / 1.5))
        patient_flags = flags[start:start + kept]
        start += kept
        covid_slices = int(patient_flags.sum())
        verdict1 = covid_slices > 0
        verdict2 = kept > 0 and Fraction(covid_slices, kept) >= Fraction(1, 10)  # a tenth of the selected slices
        decision = result.decision
        assert (decision.selected, decision.covid_slices) == (kept, covid_slices), result.patient_id
        assert (decision.covid_threshold1, decision.covid_threshold2) == (verdict1, verdict2), result.patient_id
        assert result.num_slices == decodable and 0 < kept < decodable
        row = csv_rows[result.patient_id]
        assert row["truth"] == ("covid" if truth >= 0.5 else "normal")
        assert (int(row["slices"]), int(row["selected"]), int(row["covid_slices"])) == (decodable, kept, covid_slices)
        assert (row["verdict_threshold1"], row["verdict_threshold2"]) == (
            "covid" if verdict1 else "normal", "covid" if verdict2 else "normal")
        for key, verdict in (("threshold1", verdict1), ("threshold2", verdict2)):
            outcome = 0 if verdict == (truth >= 0.5) else 1 if truth >= 0.5 else 2
            counts[key][outcome] += 1
    assert start == len(flags)  # every classified slice belongs to a kept slice of a patient
    assert summary["patients"] == 2 and summary["covid_patients"] == 1
    assert summary["selected_slices"] == len(flags) and summary["slices"] == sum(r.num_slices for r in results)
    for key, (correct, covid_to_normal, normal_to_covid) in counts.items():
        assert (summary[key]["correct"], summary[key]["covid_to_normal"], summary[key]["normal_to_covid"]) == (
            correct, covid_to_normal, normal_to_covid), key
        assert summary[key]["accuracy"] == correct / 2

"""The severity protocol's split scheme (grouped random half splits, records written once), its
target ranges (clamped in exports) and approach (a) on a protocol folder, on a hand-made
collection of 14 small images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import GroupShuffleSplit

from caaxr_tf.config import ConfigError
from caaxr_tf.data import protocols as protocols_lib

# (file name, patient id, geographic extent, opacity): 14 images of 9 patients
SCORED = [
    ("a1.png", 1, 6.0, 4.0), ("a2.png", 1, 5.0, 3.5), ("b.png", 2, 1.0, 1.0), ("c.png", 3, 0.0, 0.5),
    ("d1.png", 4, 8.0, 6.0), ("d2.png", 4, 7.3, 5.0), ("d3.png", 4, 7.7, 5.7), ("e.png", 5, 2.0, 1.7),
    ("f.png", 6, 3.3, 2.0), ("g.png", 7, 4.0, 3.0), ("h1.png", 8, 0.3, 0.3), ("h2.png", 8, 1.7, 1.3),
    ("i.png", 10, 5.7, 4.3), ("j.png", 12, 2.7, 2.3),
]
FOLDS = 4


def write_scored_collection(root):
    import cv2

    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for name, patient, _, _ in SCORED:
        cv2.imwrite(str(root / "images" / name), rng.integers(0, 256, (40, 36), dtype=np.uint8))
        rows.append([patient, 0, "Pneumonia/Viral/COVID-19", "PA", "X-ray", "images", name])
    # bad inputs, reported and left out: a corrupt image, a score out of range, a non-numeric one,
    # a file with no metadata row
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for name in ("corrupt.png", "high.png", "text.png"):
        rows.append([20, 0, "COVID-19", "PA", "X-ray", "images", name])
        if name != "corrupt.png":
            cv2.imwrite(str(root / "images" / name), np.zeros((8, 8), np.uint8))
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientid", "offset", "finding", "view", "modality", "folder", "filename"])
        writer.writerows(rows)
    lines = ["## scores,,", "filename,geographic_mean,opacity_mean"]
    lines += [f"{name},{geographic},{opacity}" for name, _, geographic, opacity in SCORED]
    lines += ["corrupt.png,1,1", "high.png,1,6.5", "text.png,one,1", "nowhere.png,1,1"]
    (root / "annotations" / "covid-severity-scores.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def protocol_dir(tmp_path_factory):
    from caaxr_tf.data.tfrecords import build_tfrecords

    root = write_scored_collection(tmp_path_factory.mktemp("scored"))
    out = tmp_path_factory.mktemp("tfrecords")
    build_tfrecords(root, out, source="covid-chestxray", protocols=["severity"], folds=FOLDS, workers=1,
                    records_per_shard=5, progress=False, log=lambda line: None)
    return out / "severity"


def sklearn_test_half(patients, seed):
    """The published split: GroupShuffleSplit halves over the integer patient ids."""
    splitter = GroupShuffleSplit(n_splits=1, train_size=0.5, test_size=0.5, random_state=seed)
    _, test = next(splitter.split(np.zeros(len(patients)), groups=np.array(patients)))
    return set(test.tolist())


# --------------------------------------------------------------------------- #
# protocols.yaml
# --------------------------------------------------------------------------- #


def test_severity_protocol_has_half_splits_and_target_ranges():
    spec = protocols_lib.load_protocols("covid-chestxray")["severity"]
    assert spec.split_scheme == protocols_lib.GROUPED_HALVES and spec.folds == 50
    assert spec.val_fraction == 0.2
    assert dict(spec.target_ranges) == {"geographic_extent": (0.0, 8.0), "opacity": (0.0, 6.0)}
    # other protocols keep the parts scheme, and their fingerprint payload is unchanged
    other = protocols_lib.load_protocols("covid-chestxray")["2class"]
    assert other.split_scheme == protocols_lib.PARTS
    assert "split_scheme" not in other.payload() and "target_ranges" not in other.payload()


@pytest.mark.parametrize("change, message", [
    ({"target_ranges": {"other": [0, 8]}}, "target_ranges.other: not one of the protocol's targets"),
    ({"target_ranges": {"extent": [8, 0]}}, "expected finite low < high"),
    ({"target_ranges": {"extent": [0]}}, "expected [low, high]"),
    ({"splits": {"scheme": "halves"}}, "scheme"),
    ({"splits": {"scheme": "grouped_halves", "val_fraction": 1.0}}, "strictly between 0 and 1"),
])
def test_bad_ranges_and_schemes_are_config_errors(change, message):
    body = {"task": "regression", "classes": {"scored": {"source": "covid-chestxray-severity", "rule": "any"}},
            "targets": ["extent"], **change}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        protocols_lib.load_protocol_sets({"covid-chestxray": {"severity": body}})


def test_assign_half_splits_matches_group_shuffle_split_and_keeps_patients_whole():
    patients = [str(p) for _, p, _, _ in SCORED]
    items = [(name, str(p), "scored") for name, p, _, _ in SCORED]
    splits = protocols_lib.assign_half_splits(items, 6, 0.25, 0, "covid-chestxray", "severity")
    assert splits == protocols_lib.assign_half_splits(items, 6, 0.25, 0, "covid-chestxray", "severity")
    for fold in range(1, 7):
        of_fold = [splits[name][fold - 1] for name, _, _, _ in SCORED]
        test = {i for i, split in enumerate(of_fold) if split == "test"}
        assert test == sklearn_test_half([int(p) for p in patients], fold - 1)
        by_patient: dict[str, set[str]] = {}
        for patient, split in zip(patients, of_fold):
            by_patient.setdefault(patient, set()).add(split)
        assert all(len(s) == 1 for s in by_patient.values())  # no patient in two splits
        val_patients = {p for p, s in by_patient.items() if s == {"val"}}
        train_half = {p for p, s in by_patient.items() if s != {"test"}}
        assert len(val_patients) == max(1, round(0.25 * len(train_half)))
    # another build seed draws other validation patients, never other test halves
    other = protocols_lib.assign_half_splits(items, 6, 0.25, 1, "covid-chestxray", "severity")
    assert all([s == "test" for s in other[n]] == [s == "test" for s in splits[n]] for n in splits)
    assert other != splits


# --------------------------------------------------------------------------- #
# the written protocol folder and the pipeline
# --------------------------------------------------------------------------- #


def test_records_are_written_once_and_folds_are_selected_by_id(protocol_dir):
    import tensorflow as tf

    from caaxr_tf.data.pipeline import parse_record
    from caaxr_tf.tasks.datasets import make_dataset
    from caaxr_tf.data.schema import shard_files

    summary = json.loads((protocol_dir / "summary.json").read_text())
    assert summary["split_scheme"] == "grouped_halves" and summary["folds"] == FOLDS
    skipped = {(Path(s["path"]).name, s["field"]): s["reason"] for s in summary["skipped"]}
    assert skipped[("covid-severity-scores.csv", "row 18: opacity_mean")] == "6.5 is outside 0..6"
    assert skipped[("covid-severity-scores.csv", "row 19: geographic_mean")] == "not a number: 'one'"
    assert skipped[("covid-severity-scores.csv", "row 20: filename")] == "'nowhere.png' has no row in metadata.csv"
    assert [key for key in skipped if key[0] == "corrupt.png"], skipped  # the image that does not decode
    assert len(skipped) == 4
    assert summary["target_ranges"] == {"geographic_extent": [0.0, 8.0], "opacity": [0.0, 6.0]}
    assert list(summary["shards"]) == ["all"] and len(summary["shards"]["all"]) == 3  # 14 records, 5 a shard
    records = list(tf.data.TFRecordDataset(shard_files(protocol_dir, "test", 2)).map(parse_record))
    ids = sorted(r["image/id"].numpy().decode() for r in records)
    assert len(ids) == len(SCORED) == len(set(ids))

    truth = {name: (g, o) for name, _, g, o in SCORED}  # image ids are the file names
    patients = [p for _, p, _, _ in SCORED]
    names = [name for name, _, _, _ in SCORED]
    for fold in range(1, FOLDS + 1):
        expected_test = {names[i] for i in sklearn_test_half(patients, fold - 1)}
        assert set(summary["split_members"][f"fold{fold}/test"]) == expected_test
        if fold not in (1, FOLDS):
            continue  # the pipeline is read for two folds (seconds each)
        seen = {}
        for split in ("train", "val", "test"):
            got = []
            for images, targets, batch_ids in make_dataset(protocol_dir, split, fold=fold, batch_size=4,
                                                           image_size=32, with_ids=True, cache=False):
                assert images.shape[1:] == (32, 32, 1)
                for image_id, target in zip(batch_ids.numpy(), targets.numpy()):
                    got.append(image_id.decode())
                    np.testing.assert_allclose(target, truth[got[-1]], rtol=1e-6)
            assert sorted(got) == sorted(summary["split_members"][f"fold{fold}/{split}"])
            assert sum(summary["counts"][f"fold{fold}"][split].values()) == len(got)
            seen[split] = set(got)
        assert not (seen["train"] & seen["val"]) and not (seen["train"] | seen["val"]) & seen["test"]
        assert len(seen["train"] | seen["val"] | seen["test"]) == len(SCORED)
        assert seen["test"] == expected_test
    with pytest.raises(ValueError, match=f"folds 1..{FOLDS}"):
        shard_files(protocol_dir, "test", FOLDS + 1)


def test_run_config_carries_the_target_ranges_and_cv_baseline_is_over_the_folds(protocol_dir):
    from caaxr_tf.severity.protocol import intercept_only_baseline
    from caaxr_tf.tasks.regression import RegressionTask
    from caaxr_tf.training import resolve_run_config

    config = resolve_run_config(protocol_dir, "severity", "mobilenetv2_regressor", 2)
    assert config.target_ranges == {"geographic_extent": [0.0, 8.0], "opacity": [0.0, 6.0]}
    task = RegressionTask.from_config(config)
    assert task.target_ranges == {"geographic_extent": (0.0, 8.0), "opacity": (0.0, 6.0)}

    baselines = task.baselines(protocol_dir, "test", 1, [], folds=[1, 2, 3])[""]
    assert list(baselines) == ["training-half mean (intercept only), 3 splits",
                               "training-half mean (intercept only), 4 splits"]
    targets = np.array([[g, o] for _, _, g, o in SCORED])
    reference = intercept_only_baseline(targets, [p for _, p, _, _ in SCORED],
                                        target_names=["geographic_extent", "opacity"], num_splits=3).summary()
    row = baselines["training-half mean (intercept only), 3 splits"]
    for target in ("geographic_extent", "opacity"):
        for metric in ("mae", "mse", "r2"):
            assert row[f"{target}_{metric}_mean"] == pytest.approx(reference[target][metric].mean, rel=1e-9)
            assert row[f"{target}_{metric}_std"] == pytest.approx(reference[target][metric].std, rel=1e-9)
            assert row[f"{target}_{metric}"] == str(reference[target][metric])


# --------------------------------------------------------------------------- #
# clamping in exported models
# --------------------------------------------------------------------------- #


def test_exported_regressor_clamps_each_target_to_its_range(protocol_dir, tmp_path, capsys):
    """A run whose model predicts far outside the ranges: raw outputs stay raw in Keras, the
    export and `caaxr_tf.predict` give the clamped values."""
    import keras
    import yaml

    from caaxr_tf import runs
    from caaxr_tf.export import export_run
    from caaxr_tf.predict import ServedModel, predict_files
    from caaxr_tf.training import resolve_run_config

    config = resolve_run_config(protocol_dir, "severity", "mobilenetv2_regressor", 1,
                                overrides=["image_size=32"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runs.CONFIG_FILE).write_text(yaml.safe_dump(config.to_mapping()))
    # the mean brightness b (0..1) gives extent 20 b - 5 and opacity 4 - 12 b: both ranges overshot
    inputs = keras.Input((32, 32, 1), name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(2, name="scores", kernel_initializer=keras.initializers.Constant([[20.0, -12.0]]),
                                 bias_initializer=keras.initializers.Constant([-5.0, 4.0]))(pooled)
    model = keras.Model(inputs, outputs)
    model.save(run_dir / runs.BEST_MODEL)

    import cv2

    files = []
    for value in (0, 128, 255):  # dark: extent -5 -> 0, opacity 4; bright: extent 15 -> 8, opacity -8 -> 0
        path = tmp_path / f"grey{value}.png"
        cv2.imwrite(str(path), np.full((32, 32), value, np.uint8))
        files.append(path)
    export = export_run(run_dir, tmp_path / "served" / "severity", verify=False)  # checked below
    metadata = json.loads((export / "assets.extra" / "caaxr_export.json").read_text())
    assert metadata["target_ranges"] == {"geographic_extent": [0.0, 8.0], "opacity": [0.0, 6.0]}
    served = ServedModel(export)
    records = predict_files(export, files, model=served)
    raw = model.predict(np.stack([np.full((32, 32, 1), v, np.float32) for v in (0, 128, 255)]), verbose=0)
    expected = np.clip(raw, [0.0, 0.0], [8.0, 6.0])
    assert raw[0, 0] < 0 and raw[2, 0] > 8 and raw[2, 1] < 0  # the raw model leaves its ranges
    for record, row in zip(records, expected):
        assert record["geographic_extent"] == pytest.approx(row[0], abs=1e-4)
        assert record["opacity"] == pytest.approx(row[1], abs=1e-4)
    assert records[0]["geographic_extent"] == 0.0 and records[2]["geographic_extent"] == 8.0
    assert records[2]["opacity"] == 0.0

    # the predict command prints the clamped values
    from caaxr_tf.predict import main as predict_main

    capsys.readouterr()
    assert predict_main(["--model", str(export), str(files[2])]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["geographic_extent"] == 8.0 and record["opacity"] == 0.0


def test_evaluation_scores_the_clamped_outputs_the_served_model_returns(protocol_dir, tmp_path):
    """Evaluation builds the run's task as the export does (`caaxr_tf.runs.Run.task`: target
    ranges included), so its predictions are the served model's clamped ones, not the raw outputs."""
    import keras
    import tensorflow as tf
    import yaml

    from caaxr_tf import runs
    from caaxr_tf.evaluate import evaluate_run
    from caaxr_tf.export import export_run
    from caaxr_tf.training import resolve_run_config

    config = resolve_run_config(protocol_dir, "severity", "mobilenetv2_regressor", 1, overrides=["image_size=32"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runs.CONFIG_FILE).write_text(yaml.safe_dump(config.to_mapping()))
    inputs = keras.Input((32, 32, 1), name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(2, name="scores", kernel_initializer=keras.initializers.Constant([[20.0, -12.0]]),
                                 bias_initializer=keras.initializers.Constant([-5.0, 4.0]))(pooled)
    keras.Model(inputs, outputs).save(run_dir / runs.BEST_MODEL)

    run = runs.Run(run_dir)
    assert run.task().target_ranges == {"geographic_extent": (0.0, 8.0), "opacity": (0.0, 6.0)}
    metrics = evaluate_run(run_dir, plots=False, log=None)
    rows = list(csv.DictReader((run_dir / "eval" / metrics["files"]["predictions"]).open()))
    evaluated = {row["image_id"]: [float(row["predicted_geographic_extent"]), float(row["predicted_opacity"])]
                 for row in rows}

    export = export_run(run_dir, tmp_path / "served" / "severity", verify=False)
    signature = tf.saved_model.load(str(export)).signatures["predict_preprocessed"]
    served, raw = {}, {}
    model = run.model()
    for images, _, ids in run.dataset("test", with_ids=True):
        out = signature(images=tf.cast(images, tf.float32))
        for image_id, scores, direct in zip(ids.numpy(), out["scores"].numpy(), model(images).numpy()):
            served[image_id.decode()], raw[image_id.decode()] = scores, direct
    assert set(evaluated) == set(served) and evaluated
    for image_id, scores in served.items():
        assert evaluated[image_id] == pytest.approx(scores.tolist(), abs=1e-5)
    assert any(not np.allclose(raw[i], served[i]) for i in served)  # the raw outputs leave the ranges


# --------------------------------------------------------------------------- #
# approach (a): features of a run + least squares on the protocol folder's splits
# --------------------------------------------------------------------------- #


def write_feature_run(run_dir, protocol_dir):
    """A hand-made classification run: 32 px images -> Dense(3, relu) 'head_dense2' -> softmax,
    of a 2class protocol (a run trained on the severity scores themselves is refused)."""
    import keras
    import yaml

    from caaxr_tf import runs

    run_dir.mkdir()
    config = {"task": "classification", "model": "tiny", "protocol": "2class", "fold": 1, "image_size": 32,
              "tfrecords": str(protocol_dir.parent / "2class"), "class_names": ["a", "b"]}
    (run_dir / runs.CONFIG_FILE).write_text(yaml.safe_dump(config))
    inputs = keras.Input((32, 32, 1), name="image")
    x = keras.layers.AveragePooling2D(8, name="pool")(keras.layers.Rescaling(1 / 255, name="scale")(inputs))
    x = keras.layers.Flatten(name="flat")(x)
    hidden = keras.layers.Dense(3, activation="relu", name="head_dense2",
                                kernel_initializer=keras.initializers.RandomNormal(seed=1),
                                bias_initializer=keras.initializers.Constant(0.5))(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(hidden)
    model = keras.Model(inputs, outputs)
    model.save(run_dir / runs.BEST_MODEL)
    return model


def test_run_features_and_least_squares_on_the_protocol_splits(protocol_dir, tmp_path, capsys):
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import mean_absolute_error

    from caaxr_tf.tasks.datasets import make_dataset
    from caaxr_tf.severity import run_features as rf

    model = write_feature_run(tmp_path / "run", protocol_dir)
    scored, results = rf.evaluate_run_features(protocol_dir, [(tmp_path / "run", None)], num_splits=3)
    assert [r.name for r in results] == ["intercept only (no data)", "run: tiny (2class fold 1) penultimate [3]"]
    assert sorted(scored.image_ids) == sorted(name for name, _, _, _ in SCORED)

    # the images are the pipeline's; the features the Dense(3) activations computed by hand
    images = rf.protocol_images(protocol_dir, scored.image_ids, 32)
    pipeline = {i.decode(): im for batch_images, _, ids in make_dataset(
        protocol_dir, "test", fold=1, batch_size=16, image_size=32, with_ids=True, cache=False)
        for i, im in zip(ids.numpy(), batch_images.numpy())}
    for image_id, image in pipeline.items():
        np.testing.assert_array_equal(images[scored.image_ids.index(image_id)], image)
    pooled = images[..., 0].reshape(len(images), 4, 8, 4, 8).mean(axis=(2, 4)).reshape(len(images), 16) / 255.0
    kernel, bias = model.get_layer("head_dense2").get_weights()
    features = np.maximum(pooled @ kernel + bias, 0.0)

    # least squares per split, on the splits GroupShuffleSplit draws, scored against scikit-learn
    patients = [int(p) for p in scored.patient_ids]
    for split, seed in zip(results[1].splits, range(3)):
        test = sorted(sklearn_test_half(patients, seed))
        train = sorted(set(range(len(patients))) - set(test))
        assert split.test.tolist() == test and split.train.tolist() == train
        fit = LinearRegression().fit(features[train], scored.targets[train])
        predicted = fit.predict(features[test])
        for column, target in enumerate(scored.target_names):
            (score,) = [s for s in results[1].scores if s.seed == seed and s.target == target]
            assert score.mae == pytest.approx(mean_absolute_error(scored.targets[test, column], predicted[:, column]),
                                              rel=1e-4)
            (base,) = [s for s in results[0].scores if s.seed == seed and s.target == target]
            mean = scored.targets[train, column].mean()
            assert base.mae == pytest.approx(np.abs(scored.targets[test, column] - mean).mean(), rel=1e-12)

    # the command prints both rows; an unknown feature kind is named
    run = str(tmp_path / "run")
    assert rf.main(["--tfrecords", str(protocol_dir), "--run", run, "--run", f"{run}:outputs", "--combined",
                    "--splits", "2", "--json", str(tmp_path / "a.json")]) == 0
    printed = capsys.readouterr().out
    for name in ("intercept only (no data)", "run: tiny (2class fold 1) penultimate [3]",
                 "run: tiny (2class fold 1) outputs [2]", "all of the above [5]"):
        assert name in printed
    written = json.loads((tmp_path / "a.json").read_text())["results"]
    assert [r["num_splits"] for r in written] == [2, 2, 2, 2] and written[3]["num_features"] == 5
    first = written[1]["summary"]["geographic_extent"]["mae"]["mean"]
    assert first == pytest.approx(np.mean([s.mae for s in results[1].scores[:4] if s.target == "geographic_extent"]))
    assert rf.parse_run("/runs/x:nope") == ("/runs/x:nope", None)
    with pytest.raises(ValueError, match="no feature kind for runs of the 'detection' task"):
        rf.default_feature_kind("detection")


def test_masked_intensity_features_by_hand():
    from caaxr_tf.severity.run_features import masked_intensity_features

    class Threshold:  # a "segmentation model": probability 1 where the pixel is above 100
        def predict_on_batch(self, batch):
            return (np.asarray(batch) > 100).astype(np.float32)

    images = np.zeros((3, 4, 4, 1), np.float32)
    images[0, :2] = 200.0  # half the image at 200, half at 0
    images[1, 0, 0] = 255.0
    images[1, 1:, :] = 51.0  # one pixel inside; the rest dark
    features, names = masked_intensity_features(Threshold(), images)  # image 2: nothing inside
    assert names == ["area_fraction", "mean_inside", "std_inside", "mean_outside"]
    outside_1 = np.r_[np.zeros(3), np.full(12, 0.2)]
    np.testing.assert_allclose(features, [[0.5, 200 / 255, 0.0, 0.0], [1 / 16, 1.0, 0.0, outside_1.mean()],
                                          [0.0, 0.0, 0.0, 0.0]], atol=1e-12)


def write_pixel_run(run_dir, protocol_dir, task: str, bias: float):
    """A hand-made run whose map is sigmoid(0.1 * pixel + bias) at 32 px."""
    import keras
    import yaml

    from caaxr_tf import runs

    run_dir.mkdir()
    protocol = "lungs" if task == "segmentation" else task
    config = {"task": task, "model": f"{task}_pixels", "protocol": protocol, "fold": 1, "image_size": 32,
              "tfrecords": str(protocol_dir.parent / protocol), "class_names": ["covid", "control"]}
    (run_dir / runs.CONFIG_FILE).write_text(yaml.safe_dump(config))
    inputs = keras.Input((32, 32, 1), name="image")
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer=keras.initializers.Constant(0.1),
                                  bias_initializer=keras.initializers.Constant(bias))(inputs)
    keras.Model(inputs, outputs).save(run_dir / runs.BEST_MODEL)


def test_lung_infection_features_of_an_infection_run_with_a_lung_run(protocol_dir, tmp_path):
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import mean_absolute_error

    from caaxr_tf.severity import run_features as rf

    # infected where pixel >= 150; the lung model finds one region covering the image, which is
    # cut at the midline: image-left half = the patient's right lung
    write_pixel_run(tmp_path / "infection", protocol_dir, "infection", bias=-15.0)
    write_pixel_run(tmp_path / "lungs", protocol_dir, "segmentation", bias=20.0)
    with pytest.raises(ValueError, match="feature kind 'lung_infection' of .* needs a lung run"):
        rf.run_features(tmp_path / "infection", protocol_dir, ["x"], kind="lung_infection")

    scored, results = rf.evaluate_run_features(protocol_dir, [(tmp_path / "infection", "lung_infection")],
                                               num_splits=2, lung_run=tmp_path / "lungs")
    assert results[1].name == "infection: infection_pixels (infection fold 1) lung_infection [3]"
    infected = rf.protocol_images(protocol_dir, scored.image_ids, 32)[..., 0] >= 150.0
    expected = np.stack([infected[:, :, :16].mean(axis=(1, 2)), infected[:, :, 16:].mean(axis=(1, 2)),
                         infected.mean(axis=(1, 2))], axis=1)
    features = rf.run_features(tmp_path / "infection", protocol_dir, scored.image_ids, kind="lung_infection",
                               lung_run=tmp_path / "lungs").features
    np.testing.assert_allclose(features, expected, atol=1e-12)
    assert expected.std(axis=0).min() > 0  # the features vary between images

    split = results[1].splits[0]
    fit = LinearRegression().fit(expected[split.train], scored.targets[split.train])
    predicted = fit.predict(expected[split.test])
    (score,) = [s for s in results[1].scores if s.seed == 0 and s.target == scored.target_names[0]]
    assert score.mae == pytest.approx(mean_absolute_error(scored.targets[split.test, 0], predicted[:, 0]), rel=1e-4)


def test_imported_network_features_as_published_approach_a(protocol_dir, tmp_path):
    """--imported: the imported torchxrayvision network's own outputs (no training) as the
    features of least squares; checked against the Keras source model run by hand."""
    from pathlib import Path

    from caaxr_tf.severity import run_features as rf
    from caaxr_tf.weights import import_weights, load_imported

    data = Path(__file__).parent / "data" / "weights"
    weights = import_weights("torchxrayvision", data / "xrv_densenet_small.safetensors", "densenet",
                             input_size=64).save(tmp_path / "xrv.weights.h5")
    scored, results = rf.evaluate_run_features(protocol_dir, [], num_splits=3,
                                               imported=[(weights, "features"), (weights, "probabilities")])
    source = load_imported(weights).build_source_model()
    images = rf.protocol_images(protocol_dir, scored.image_ids, 64)
    expected = np.asarray(source(images)["probabilities"], np.float64)
    item = rf.imported_features(weights, protocol_dir, scored.image_ids, output="probabilities")
    # model.predict in batches of 16 vs one eager call: float32 kernel noise on values <= 1
    np.testing.assert_allclose(item.features, expected, atol=1e-5)
    assert item.names[0].startswith("probabilities_") and item.features.shape == expected.shape
    assert [r.name for r in results][1:] == [
        f"xrv.weights.h5: imported torchxrayvision densenet features [{item_features_width(weights)}]",
        f"xrv.weights.h5: imported torchxrayvision densenet probabilities [{expected.shape[1]}]"]
    assert rf.parse_imported("a/b.weights.h5:logits") == ("a/b.weights.h5", "logits")
    assert rf.parse_imported("c:/x.weights.h5") == ("c:/x.weights.h5", "features")
    with pytest.raises(ValueError, match="unknown output 'pooled'"):
        rf.imported_features(weights, protocol_dir, scored.image_ids, output="pooled")


def item_features_width(weights) -> int:
    from caaxr_tf.weights import load_imported

    return int(load_imported(weights).build_source_model().output["features"].shape[-1])

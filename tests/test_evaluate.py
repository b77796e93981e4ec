"""caaxr_tf.evaluate on hand-made run folders, against numpy / scikit-learn references."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from caaxr_tf import evaluate
from caaxr_tf.data.pipeline import read_summary
from caaxr_tf.tasks.datasets import make_dataset
from caaxr_tf.evaluate import classification_metrics, covid_index, evaluate_run, output_tag
from caaxr_tf.tasks.classification import class_scores
from caaxr_tf.models import build_model
from caaxr_tf.runs import load_run_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tfrecords(tiny_data_root, tmp_path_factory) -> Path:
    from caaxr_tf.data.tfrecords import build_tfrecords

    out = tmp_path_factory.mktemp("eval_tfrecords")
    build_tfrecords(tiny_data_root, out, protocols=["seg", "3class"], workers=1, progress=False, log=lambda _: None)
    return out


def write_run(run_dir: Path, model: keras.Model, *, protocol: str, model_name: str, tfrecords: Path,
              fold: int = 1, model_kwargs: dict | None = None, batch_size: int = 8) -> Path:
    """A run folder as caaxr_tf.train writes it: config.yaml (documented keys) and best.keras."""
    summary = read_summary(tfrecords / protocol)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "protocol": protocol, "task": summary["task"], "model": model_name, "model_kwargs": model_kwargs or {},
        "fold": fold, "tfrecords": str(tfrecords / protocol), "class_names": summary["classes"],
        "image_size": 224, "batch_size": batch_size, "epochs": 1, "steps_per_epoch": None,
        "validation_steps": None, "optimizer": {"name": "adam", "learning_rate": 1e-3},
        "loss": "binary_crossentropy" if summary["task"] == "segmentation" else "categorical_crossentropy",
        "weights": "none", "monitor": "val_loss", "monitor_mode": "min", "strategy": "one",
        "mixed_precision": False, "jit": False, "seed": 0,
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    model.save(run_dir / "best.keras")
    return run_dir


@pytest.fixture(scope="module")
def seg_run(tfrecords, tmp_path_factory) -> Path:
    keras.utils.set_random_seed(3)
    model = build_model("unet", base_filters=8)
    # Fixed output weights: the untrained net's mask is all or nothing; centring the logits on
    # their median over some training images makes it cover part of each image instead.
    head = model.get_layer("mask")
    features = keras.Model(model.inputs, head.input)
    images, _ = next(iter(make_dataset(tfrecords / "seg", "train", batch_size=4, training=False, cache=False)))
    kernel, _ = head.get_weights()
    kernel = kernel * 50.0
    logits = np.asarray(features.predict(images, verbose=0)) @ kernel[0, 0]
    head.set_weights([kernel, -np.median(logits, axis=(0, 1, 2))])
    return write_run(tmp_path_factory.mktemp("seg_run"), model, protocol="seg", model_name="unet",
                     tfrecords=tfrecords, model_kwargs={"base_filters": 8})


def tiny_classifier(num_classes: int, seed: int) -> keras.Model:
    """The project's input layers and the paper's head on a two-layer conv backbone.

    Stands in for ResNet-18 / MobileNetV2, which are slow on two shared CPU cores and, untrained,
    give (almost) the same scores for every image (MobileNetV2's features vanish).
    """
    from caaxr_tf.models import GrayscaleToRGB, ImageNetPreprocessing

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((224, 224, 1), name="image")
    x = ImageNetPreprocessing("torch")(GrayscaleToRGB()(inputs))
    x = layers.AveragePooling2D(4)(x)
    x = layers.Conv2D(8, 5, strides=2, activation="relu")(x)
    x = layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(32, activation="relu")(x)
    outputs = layers.Dense(num_classes, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(stddev=2.0))(x)
    return keras.Model(inputs, outputs, name="tiny_classifier")


@pytest.fixture(scope="module")
def cls_run(tfrecords, tmp_path_factory) -> Path:
    model = tiny_classifier(3, seed=5)
    return write_run(tmp_path_factory.mktemp("cls_run"), model, protocol="3class", model_name="mobilenetv2",
                     tfrecords=tfrecords, batch_size=16)


def predict_split(run_dir: Path, split: str = "test", subset: str | None = None, key: str | None = None):
    """Reference predictions: model.predict over the same split, batch size unlike evaluate's."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = load_run_model(run_dir)
    dataset = make_dataset(config["tfrecords"], split, fold=config["fold"], batch_size=5, subset=subset,
                           cache=False, with_ids=True)
    targets, outputs, ids = [], [], []
    for images, target, batch_ids in dataset:
        out = model.predict(images, verbose=0)
        outputs.append(out[key] if key else out)
        targets.append(target.numpy())
        ids += [i.decode() for i in batch_ids.numpy()]
    return np.concatenate(targets), np.concatenate(outputs), ids


@pytest.fixture(scope="module")
def seg_reference(seg_run) -> tuple:
    """Reference (truth, probabilities, ids) of the seg run on the whole test split."""
    return predict_split(seg_run)


def ref_dice_iou(truth: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = truth.reshape(len(truth), -1) > 0.5
    p = probs.reshape(len(probs), -1) >= 0.5
    inter, t_sum, p_sum = (t & p).sum(1), t.sum(1), p.sum(1)
    dice = np.where(t_sum + p_sum == 0, 1.0, 2 * inter / np.maximum(t_sum + p_sum, 1))
    union = t_sum + p_sum - inter
    return dice, np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 0.01  # not a blank canvas


def test_segmentation_cli_matches_numpy_reference(seg_run, seg_reference, tfrecords, capsys):
    assert evaluate.main(["--run", str(seg_run)]) == 0
    printed = capsys.readouterr().out
    assert "Dice" in printed and "IoU" in printed
    metrics = json.loads((seg_run / "eval" / "metrics.json").read_text())

    truth, probs, ids = seg_reference
    dice, iou = ref_dice_iou(truth, probs)
    assert 0.05 < probs.__ge__(0.5).mean() < 0.95, "the fixture model should predict partial masks"
    assert metrics["num_images"] == len(ids) == sum(read_summary(tfrecords / "seg")["counts"]["test"].values())
    assert metrics["dice"] == pytest.approx(dice.mean(), abs=1e-9)
    assert metrics["iou"] == pytest.approx(iou.mean(), abs=1e-9)
    assert metrics["dice_std"] == pytest.approx(dice.std(), abs=1e-9)
    assert (metrics["task"], metrics["split"], metrics["subset"], metrics["model_file"]) == (
        "segmentation", "test", None, "best.keras")

    per_image = read_csv(seg_run / "eval" / "predictions.csv")
    assert [r["image_id"] for r in per_image] == ids
    np.testing.assert_allclose([float(r["dice"]) for r in per_image], dice, atol=1e-6)
    assert [int(r["true_pixels"]) for r in per_image] == list((truth > 0.5).reshape(len(ids), -1).sum(1))
    assert metrics["files"]["examples"] == "examples.png"
    assert_png(seg_run / "eval" / "examples.png")


def test_subset_evaluation_counts_and_values(seg_run, seg_reference, tfrecords):
    metrics = evaluate_run(seg_run, subset="consolidation", plots=False, log=None)
    path = seg_run / "eval" / "metrics_test_consolidation.json"
    assert json.loads(path.read_text()) == metrics
    expected = read_summary(tfrecords / "seg")["counts"]["subset_consolidation"]["test"]
    assert metrics["num_images"] == expected and 0 < expected < 15

    # The subset is the test images flagged in the manifest; its scores are theirs in the full run.
    manifest = read_csv(tfrecords / "seg" / "manifest.csv")
    flagged = {r["image_id"] for r in manifest if r["split_fold1"] == "test" and r["subset_consolidation"] == "1"}
    per_image = read_csv(seg_run / "eval" / "predictions_test_consolidation.csv")
    assert {r["image_id"] for r in per_image} == flagged
    truth, probs, ids = seg_reference
    dice, iou = ref_dice_iou(truth, probs)
    keep = np.array([i in flagged for i in ids])
    assert metrics["dice"] == pytest.approx(dice[keep].mean(), abs=1e-9)
    assert metrics["iou"] == pytest.approx(iou[keep].mean(), abs=1e-9)
    assert "examples" not in metrics["files"]


def test_dict_output_model_reads_the_mask_entry(seg_run, seg_reference, tfrecords, tmp_path):
    unet = load_run_model(seg_run)
    inputs = keras.Input((224, 224, 1))
    mask = unet(inputs)
    wrapped = keras.Model(inputs, {"mask": mask, "scores": keras.layers.GlobalMaxPooling2D()(mask)})
    run = write_run(tmp_path / "dict_run", wrapped, protocol="seg", model_name="maskrcnn", tfrecords=tfrecords)
    metrics = evaluate_run(run, batch_size=4, plots=True, num_examples=2, log=None)

    truth, probs, _ = seg_reference
    dice, iou = ref_dice_iou(truth, probs)
    assert metrics["dice"] == pytest.approx(dice.mean(), abs=1e-9)
    assert metrics["iou"] == pytest.approx(iou.mean(), abs=1e-9)
    assert_png(run / "eval" / "examples.png")


def test_val_split_and_final_model_file_names(seg_run, tfrecords, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(seg_run, run, ignore=shutil.ignore_patterns("eval"))
    (run / "best.keras").rename(run / "final.keras")
    metrics = evaluate_run(run, split="val", which="final", plots=False, log=None)
    assert (run / "eval" / "metrics_val_final.json").exists()
    assert not (run / "eval" / "metrics.json").exists()
    assert metrics["model_file"] == "final.keras"
    assert metrics["num_images"] == sum(read_summary(tfrecords / "seg")["counts"]["fold1"]["val"].values())
    assert [output_tag(), output_tag("val"), output_tag("test", "consolidation"), output_tag("test", None, "final")] == [
        "", "_val", "_test_consolidation", "_test_final"]


def test_classifier_metrics_match_sklearn(cls_run, tfrecords):
    metrics = evaluate_run(cls_run, log=None)
    onehot, scores, ids = predict_split(cls_run)
    labels = onehot.argmax(1)
    names = read_summary(tfrecords / "3class")["classes"]
    assert names[0] == "covid" and metrics["covid_class"] == "covid"
    assert np.ptp(scores[:, 0]) > 0, "the fixture model should give varied scores"

    assert metrics["num_images"] == len(ids) == 45
    assert metrics["class_counts"] == {n: int((labels == i).sum()) for i, n in enumerate(names)}
    for i, name in enumerate(names):
        assert metrics["auc_per_class"][name] == pytest.approx(roc_auc_score(labels == i, scores[:, i]), abs=1e-9)
    assert metrics["auc_macro"] == pytest.approx(np.mean(list(metrics["auc_per_class"].values())), abs=1e-12)
    fpr, tpr, _ = roc_curve(labels == 0, scores[:, 0], drop_intermediate=False)
    for spec in (99, 90):
        expected = tpr[1.0 - fpr >= spec / 100 - 1e-12].max()
        assert metrics[f"sensitivity_at_{spec}_specificity"] == pytest.approx(expected, abs=1e-9)
    assert metrics["accuracy"] == pytest.approx(np.mean(scores.argmax(1) == labels), abs=1e-12)
    assert metrics["confusion_matrix"]["classes"] == names
    assert metrics["confusion_matrix"]["matrix"] == confusion_matrix(labels, scores.argmax(1), labels=[0, 1, 2]).tolist()

    per_image = read_csv(cls_run / "eval" / "predictions.csv")
    assert [r["image_id"] for r in per_image] == ids
    np.testing.assert_allclose([float(r["p_covid"]) for r in per_image], scores[:, 0], atol=1e-6)
    for name in ("roc.png", "confusion_matrix.png", "reliability.png"):
        assert_png(cls_run / "eval" / name)


def test_covid_class_choice_and_single_column_scores():
    assert covid_index(["non_covid", "COVID"]) == 1
    assert covid_index(["pneumonia", "healthy"]) == 0
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    two = np.stack([1 - scores, scores], axis=1)
    result = classification_metrics(labels, two, ["non_covid", "covid"])
    fpr, tpr, _ = roc_curve(labels == 1, scores, drop_intermediate=False)
    assert result["covid_class"] == "covid"
    assert result["sensitivity_at_90_specificity"] == pytest.approx(tpr[1 - fpr >= 0.9 - 1e-12].max())
    assert class_scores(scores[:, None], 2) == pytest.approx(two)
    matrix = np.array(result["confusion_matrix"]["matrix"])
    assert matrix.sum() == 200 and matrix[1].sum() == labels.sum()


def _one_line_error(capsys, argv: list[str]) -> str:
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_errors_are_one_line(seg_run, tfrecords, tmp_path, capsys):
    assert "does not exist" in _one_line_error(capsys, ["--run", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "not a run folder" in _one_line_error(capsys, ["--run", str(tmp_path / "empty")])

    no_model = tmp_path / "no_model"
    no_model.mkdir()
    shutil.copy(seg_run / "config.yaml", no_model / "config.yaml")
    assert "has not saved a best model" in _one_line_error(capsys, ["--run", str(no_model)])
    assert "final model" in _one_line_error(capsys, ["--run", str(seg_run), "--model", "final"])

    bad_fold = tmp_path / "bad_fold"
    shutil.copytree(seg_run, bad_fold, ignore=shutil.ignore_patterns("eval"))
    config = yaml.safe_load((bad_fold / "config.yaml").read_text())
    (bad_fold / "config.yaml").write_text(yaml.safe_dump({**config, "fold": 3}))
    assert "fold 3 does not exist" in _one_line_error(capsys, ["--run", str(bad_fold), "--split", "val"])
    assert "unknown subset" in _one_line_error(capsys, ["--run", str(seg_run), "--subset", "nodules"])


def test_segmentation_bootstrap_intervals_are_patient_clustered(seg_run):
    """evaluate --bootstrap on a segmentation run (issue 23: intervals for every task): the
    interval of the mean Dice equals an independent NumPy resampling of the patients."""
    from caaxr_tf.metrics.uncertainty import resample_indices

    metrics = evaluate_run(seg_run, plots=False, log=None, bootstrap=60)
    intervals = metrics["intervals"]
    with open(seg_run / "eval" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(Path(metrics["tfrecords"]) / "manifest.csv", newline="") as handle:
        patient_of = {r["image_id"]: r["patient_id"] for r in csv.DictReader(handle)}
    patients = [patient_of[r["image_id"]] for r in rows]
    dice = np.array([float(r["dice"]) for r in rows])
    assert intervals["num_patients"] == len(set(patients)) < len(rows), "the tiny set has patients with 2+ images"
    # values written with 6 decimals: their mean is within 5e-7 of the evaluation's
    assert intervals["dice"]["estimate"] == pytest.approx(metrics["dice"], abs=1e-6)
    assert intervals["iou"]["estimate"] == pytest.approx(metrics["iou"], abs=1e-6)
    means = np.array([dice[index].mean() for index in resample_indices(patients, len(rows), 60, 0)])
    assert [intervals["dice"]["low"], intervals["dice"]["high"]] == pytest.approx(
        list(np.percentile(means, [2.5, 97.5])), abs=1e-12)
    assert intervals["dice"]["n_resamples"] == 60 and "rounding_mismatch" not in intervals

"""Issue 15 integration: ``evaluate --cam/--localization/--tfrecords``, ``export --cam`` (the
``cam`` serving output, reloaded in a fresh process) and ``predict --cam``, on one tiny
classifier run (ResNet18, 64 px, one training step); plus the numpy overlay and mask scores.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caaxr_tf.explain.localization import boxes_to_mask, center_gaussian_map, localization_scores, mask_scores
from caaxr_tf.explain.overlay import cam_overlay_rgb, jet_rgb, peak_location

IMAGE_SIZE = 64


# --------------------------------------------------------------------------- numpy parts (fast)


def test_jet_matches_matplotlib():
    from matplotlib import colormaps

    values = np.linspace(0.0, 1.0, 1001)
    reference = colormaps["jet"](values)[:, :3]
    # matplotlib samples the segments into a 256-entry table: up to ~4/256 apart on steep parts
    np.testing.assert_allclose(jet_rgb(values), reference, atol=0.02)
    np.testing.assert_allclose(jet_rgb([0.0, 1.0]), [[0.0, 0.0, 0.5], [0.5, 0.0, 0.0]], atol=1e-6)


def test_cam_overlay_blends_and_marks_the_peak():
    pixels = np.full((16, 16), 100, np.uint8)
    cam = np.zeros((16, 16), np.float32)
    cam[5, 9] = 1.0
    overlay = cam_overlay_rgb(pixels, cam, alpha=0.4)
    assert overlay.shape == (16, 16, 3) and overlay.dtype == np.uint8
    # far from the peak: 0.6 * grey + 0.4 * 255 * jet(0) = (60, 60, 60 + 51)
    np.testing.assert_array_equal(overlay[15, 0], [60, 60, 111])
    assert peak_location(cam) == {"x": 9, "y": 5, "x_norm": 0.59375, "y_norm": 0.34375, "value": 1.0}
    cross = np.all(overlay == 255, axis=-1)
    assert cross[5, 5:14].all() and cross[1:10, 9].all() and cross.sum() == 9 + 9 - 1
    with pytest.raises(ValueError, match="image's size"):
        cam_overlay_rgb(pixels, np.zeros((8, 8)))


def test_mask_scores_equal_box_scores():
    rng = np.random.default_rng(3)
    boxes = np.array([[0.1, 0.2, 0.45, 0.7], [0.6, 0.15, 0.9, 0.5]])
    mask = boxes_to_mask(boxes, 24)
    for saliency in (rng.random((24, 24)), center_gaussian_map(24, 24), np.zeros((24, 24))):
        assert mask_scores(saliency, mask[..., None]) == localization_scores(saliency, boxes)
    assert np.isnan(mask_scores(rng.random((24, 24)), np.zeros((24, 24))).pointing)


def test_cli_refuses_options_without_tfrecords():
    from caaxr_tf.evaluate import parse_args

    for argv in (["--run", "r", "--split", "all"], ["--run", "r", "--class-map", "a=b"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2


def test_cam_export_needs_a_classifier():
    from caaxr_tf.export import check_cam_export
    from caaxr_tf.tasks import get_task

    check_cam_export(get_task("classification")(["covid", "non_covid"]))
    with pytest.raises(ValueError, match="needs a classifier.*segmentation"):
        check_cam_export(get_task("segmentation")(["lesion"]))


def test_export_model_verifies_the_cam_output(tmp_path):
    """The export check compares the served ``cam`` with ``GradCam(model)`` (a tiny conv net)."""
    import keras

    from caaxr_tf.export import PREPROCESSED_SIGNATURE, export_model

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1))
    features = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="features")(inputs / 255.0)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(features))
    model = keras.Model(inputs, outputs)
    export = export_model(model, tmp_path / "1", task="classification", class_names=["covid", "non_covid"],
                          image_size=16, cam=True)  # verify=True: raises if the cam differs
    metadata = json.loads((export / "assets.extra" / "caaxr_export.json").read_text())
    assert metadata["cam"] == {"output": "cam", "class": "predicted", "score": "logit", "layer": "features",
                               "size": [16, 16]}
    import tensorflow as tf

    signature = tf.saved_model.load(str(export)).signatures[PREPROCESSED_SIGNATURE]
    assert signature.structured_outputs["cam"].shape.as_list() == [None, 16, 16]


# --------------------------------------------------------------------------- one tiny run


@pytest.fixture(scope="module")
def classifier_run(tiny_data_root, tmp_path_factory) -> tuple[Path, Path]:
    """TFRecords (2class, seg) of the tiny set and a ResNet18 2class run trained one step."""
    from caaxr_tf.data.tfrecords import build_tfrecords
    from caaxr_tf.train import run_training
    from caaxr_tf.training import resolve_run_config

    tfrecords = tmp_path_factory.mktemp("explain_tfrecords")
    build_tfrecords(tiny_data_root, tfrecords, source="caaxr", protocols=["2class", "seg"], workers=1,
                    progress=False, log=lambda line: None)
    flags = {"epochs": 1, "steps_per_epoch": 1, "validation_steps": 1, "batch_size": 2, "strategy": "one",
             "weights": "none"}
    config = resolve_run_config(tfrecords / "2class", "2class", "resnet18", 1, flags=flags,
                                overrides=[f"image_size={IMAGE_SIZE}", "bn_recompute_images=0"])
    run_dir = tmp_path_factory.mktemp("explain_run") / "run"
    run_training(config, run_dir, verbose=False)
    return tfrecords, run_dir


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _test_records(protocol_dir: Path) -> list[dict]:
    import tensorflow as tf

    from caaxr_tf.data.pipeline import parse_record, shard_files

    return [{k: v.numpy() for k, v in r.items()}
            for r in tf.data.TFRecordDataset(shard_files(protocol_dir, "test")).map(parse_record)]


@pytest.mark.slow
def test_evaluate_cam_grid_and_localization(classifier_run):
    import tensorflow as tf

    from caaxr_tf.tasks.datasets import make_dataset
    from caaxr_tf.evaluate import evaluate_localization_run, evaluate_run
    from caaxr_tf.explain.gradcam import GradCam
    from caaxr_tf.runs import load_run_model

    tfrecords, run_dir = classifier_run
    metrics = evaluate_run(run_dir, batch_size=16, plots=False, cam=True, log=None)
    grid = tf.io.decode_png((run_dir / "eval" / metrics["files"]["cam_grid"]).read_bytes())
    assert metrics["files"]["cam_grid"] == "cam_grid.png" and grid.shape[0] > 100 and grid.shape[1] > 100

    result = evaluate_localization_run(run_dir, tfrecords, batch_size=16, plots=True, log=None)
    assert result["explained_class"] == "covid" and (result["protocol"], result["boxes_protocol"]) == ("2class", "seg")
    assert (run_dir / "eval" / "localization_explain_tfrecords0_seg.png").exists()

    # Reference: boxes read from the raw records, masks by the numpy rule, scores written out here.
    records = _test_records(tfrecords / "seg")
    ids = [r["image/id"].decode() for r in records]
    boxes = {r["image/id"].decode(): r["boxes"] for r in records}
    images, dataset_ids = [], []
    for batch, _, batch_ids in make_dataset(tfrecords / "seg", "test", batch_size=16, image_size=IMAGE_SIZE,
                                            training=False, cache=False, with_ids=True):
        images.append(batch.numpy())
        dataset_ids += [i.decode() for i in batch_ids.numpy()]
    assert sorted(dataset_ids) == sorted(ids)
    cams = GradCam(load_run_model(run_dir), run_eagerly=True)(np.concatenate(images), class_index=0).cam

    def reference(saliency, mask):
        saliency = saliency.astype(np.float64)
        if saliency.max() == 0:
            saliency = np.ones_like(saliency)
        peaks = saliency == saliency.max()
        region = saliency >= 0.5 * saliency.max()
        return ((peaks & mask).sum() / peaks.sum(), saliency[mask].sum() / saliency.sum(),
                (region & mask).sum() / (region | mask).sum())

    expected = {"cam": [], "uniform": []}
    for cam, image_id in zip(cams, dataset_ids):
        mask = boxes_to_mask(boxes[image_id], IMAGE_SIZE)
        if mask.any():
            expected["cam"].append(reference(cam, mask))
            expected["uniform"].append(reference(np.ones_like(cam), mask))
    for name, rows in expected.items():
        row = result["table"][name]
        assert row["num_images"] == len(rows) > 0
        assert row["num_without_boxes"] == len(ids) - len(rows)
        np.testing.assert_allclose([row["hit_rate"], row["energy"], row["iou"]], np.mean(rows, axis=0), atol=1e-6)
    assert len(_read_csv(run_dir / "eval" / result["files"]["scores"])) == len(ids)


@pytest.mark.slow
def test_cross_source_matched_mapped_and_unmatched(classifier_run, tmp_path):
    from sklearn.metrics import roc_auc_score

    from caaxr_tf.evaluate import evaluate_external_run, evaluate_run, metrics_path
    from caaxr_tf.explain.cross_source import ClassMatchError

    tfrecords, run_dir = classifier_run
    if not metrics_path(run_dir).exists():
        evaluate_run(run_dir, batch_size=16, plots=False, log=None)
    internal = json.loads(metrics_path(run_dir).read_text())

    # Matched by name: the run's own test split scores exactly as its internal evaluation.
    same = evaluate_external_run(run_dir, tfrecords, batch_size=16, plots=False, log=None)
    assert same["auc_per_class"] == internal["auc_per_class"] and same["shortcut"]["gap"] == 0.0
    assert (run_dir / "eval" / "external_explain_tfrecords0_2class.json").exists()

    # Another "source" naming its classes differently: the same shards, classes renamed.
    other = tmp_path / "other_source" / "2class"
    shutil.copytree(tfrecords / "2class", other)
    summary = json.loads((other / "summary.json").read_text())
    summary["classes"] = ["COVID", "healthy"]
    (other / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ClassMatchError, match=r"\['healthy'\].*--class-map healthy="):
        evaluate_external_run(run_dir, other, batch_size=16, plots=False, log=None)
    assert not list((run_dir / "eval").glob("external_other_source*"))

    # every image ("all"): the copy holds the run's training/validation images, refused unless left out
    with pytest.raises(ValueError, match="training/validation data of the run"):
        evaluate_external_run(run_dir, other, class_map="healthy=non_covid", split="all", batch_size=16,
                              plots=False, log=None)
    mapped = evaluate_external_run(run_dir, other, class_map="healthy=non_covid", split="all", batch_size=16,
                                   plots=False, exclude_overlap=True, log=None)
    manifest = {row["image_id"]: row for row in _read_csv(other / "manifest.csv")}
    rows = _read_csv(run_dir / "eval" / "external_other_source_2class_all.csv")
    trained = sum(row["split_fold1"] in ("train", "val") for row in manifest.values())
    assert mapped["training_overlap"]["excluded"] == trained > 0
    assert mapped["num_images"] == len(rows) == len(manifest) - trained
    assert mapped["class_match"]["data_classes"] == {"COVID": "covid", "healthy": "non_covid"}
    for row in rows:
        assert row["label"] == ("covid" if manifest[row["image_id"]]["label_index"] == "0" else "non_covid")
    positive = [row["label"] == "covid" for row in rows]
    auc = roc_auc_score(positive, [float(row["p_covid"]) for row in rows])
    # the CSV's 6 decimals tie a few of the untrained model's nearly equal probabilities
    assert mapped["auc_per_class"]["covid"] == pytest.approx(auc, abs=2e-3)
    assert mapped["shortcut"]["external_auc"] == mapped["auc_per_class"]["covid"]
    assert mapped["shortcut"]["gap"] == pytest.approx(internal["auc_per_class"]["covid"] - auc, abs=2e-3)
    # the test images keep the probabilities of the internal evaluation
    internal_rows = {row["image_id"]: row for row in _read_csv(run_dir / "eval" / "predictions.csv")}
    for row in rows:
        if row["split"] == "test":
            assert float(row["p_covid"]) == pytest.approx(float(internal_rows[row["image_id"]]["p_covid"]), abs=1e-5)


FRESH_PROCESS = """
import json, sys
import numpy as np, tensorflow as tf
from caaxr_tf import predict
export, work, image = sys.argv[1:4]
served = predict.ServedModel(export)  # the one SavedModel load of this test
out = served.loaded.signatures["predict_preprocessed"](images=tf.constant(np.load(work + "/images.npy")))
np.save(work + "/cam.npy", out["cam"].numpy())
prepared = predict.prepare_image(image)
np.save(work + "/served_cam.npy", served([prepared])["cam"])
np.save(work + "/pixels.npy", served.preprocess(prepared))
records = predict.predict_files(export, [image], model=served, cam_dir=work + "/cams")
served.has_cam = False  # as an export without the output
try:
    predict.predict_files(export, [image], model=served, cam_dir=work + "/none")
    refused = ""
except ValueError as error:
    refused = str(error)
# the reading side draws with numpy: not with the OpenCV modules of the package (Keras itself imports cv2)
drawing = sorted(m for m in ("caaxr_tf.explain.plots", "caaxr_tf.data.images", "caaxr_tf.plots") if m in sys.modules)
print(json.dumps({"outputs": sorted(out), "records": records, "refused": refused, "drawing": drawing}))
"""


@pytest.mark.slow
def test_cam_serving_output_round_trip_and_predict_cam(classifier_run, tmp_path):
    import tensorflow as tf

    from caaxr_tf.explain.gradcam import GradCam
    from caaxr_tf.export import export_run
    from caaxr_tf.runs import load_run_model

    tfrecords, run_dir = classifier_run
    # verify=False: the fresh process below is the check (one SavedModel load fewer)
    export = export_run(run_dir, tmp_path / "saved" / "m", cam=True, verify=False)
    metadata = json.loads((export / "assets.extra" / "caaxr_export.json").read_text())
    assert metadata["cam"]["layer"] == "resnet18/stage4_block2_out" and metadata["cam"]["size"] == [64, 64]

    record = _test_records(tfrecords / "2class")[0]
    image_path = tmp_path / "image.png"
    image_path.write_bytes(record["image/encoded"])
    images = np.random.default_rng(1).uniform(0, 255, (3, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(export), str(tmp_path), str(image_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert "cam" in info["outputs"] and "probabilities" in info["outputs"] and info["drawing"] == []
    model = load_run_model(run_dir)
    expected = GradCam(model, output_size=(IMAGE_SIZE, IMAGE_SIZE), run_eagerly=True)(images).cam
    np.testing.assert_allclose(np.load(tmp_path / "cam.npy"), expected, atol=1e-4)

    # predict --cam: the peak in the JSON, one overlay PNG drawn from the served map
    (result,) = info["records"]
    served_cam = np.load(tmp_path / "served_cam.npy")
    assert served_cam.shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert "cam" not in result and result["cam_peak"] == peak_location(served_cam[0])
    assert result["cam_overlay"] == str(tmp_path / "cams" / "image_cam.png")
    pixels = np.load(tmp_path / "pixels.npy")
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE)
    written = tf.io.decode_png(Path(result["cam_overlay"]).read_bytes()).numpy()
    np.testing.assert_array_equal(written, cam_overlay_rgb(pixels, served_cam[0]))
    # an export without the output: a clear error, nothing written
    assert "export --cam" in info["refused"] and not (tmp_path / "none").exists()


@pytest.mark.slow
def test_cv_adds_shortcut_and_localization_columns(classifier_run, tmp_path):
    """``cv --external/--localization`` columns, from the runs' explain files (evaluated ones
    are read back, as a resumed CV does); an unmatched class stops the CV before any run."""
    from caaxr_tf.cv import ExplainOptions, run_cv
    from caaxr_tf.explain.cross_source import ClassMatchError
    from caaxr_tf.explain.evaluation import data_tag

    tfrecords, run_dir = classifier_run
    fold_dir = tmp_path / "cv" / "resnet18" / "fold1"
    (fold_dir / "eval").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", fold_dir / "config.yaml")
    (fold_dir / "best.keras").write_bytes(b"")  # never loaded: everything below is already evaluated
    metrics = {"task": "classification", "class_names": ["covid", "non_covid"], "num_images": 48, "accuracy": 0.5,
               "auc_per_class": {"covid": 0.9, "non_covid": 0.9}, "auc_macro": 0.9, "covid_class": "covid",
               "sensitivity_at_99_specificity": 0.1, "sensitivity_at_90_specificity": 0.4}
    (fold_dir / "eval" / "metrics.json").write_text(json.dumps(metrics))
    external = tfrecords / "2class"
    (fold_dir / "eval" / f"external_{data_tag(external)}_all.json").write_text(
        json.dumps({"shortcut": {"internal_auc": 0.9, "external_auc": 0.65, "gap": 0.25}}))
    (fold_dir / "eval" / f"localization_{data_tag(tfrecords / 'seg')}.json").write_text(
        json.dumps({"table": {"cam": {"hit_rate": 0.125, "energy": 0.25, "iou": 0.0625}}}))

    rows = run_cv("2class", ["resnet18"], tfrecords, tmp_path / "cv", folds=[1], eval_only=True, plots=False,
                  log=lambda line: None, explain=ExplainOptions(external=str(external), localization=str(tfrecords),
                                                                exclude_overlap=True))
    assert rows[0]["status"] == "ok"
    assert {k: rows[0][k] for k in ("internal_auc", "external_auc", "shortcut_gap", "cam_hit_rate", "cam_energy",
                                    "cam_iou")} == {"internal_auc": 0.9, "external_auc": 0.65, "shortcut_gap": 0.25,
                                                    "cam_hit_rate": 0.125, "cam_energy": 0.25, "cam_iou": 0.0625}
    (mean,) = [r for r in _read_csv(tmp_path / "cv" / "results.csv") if r["fold"] == "mean"]
    assert float(mean["shortcut_gap"]) == 0.25 and float(mean["cam_iou"]) == 0.0625
    markdown = (tmp_path / "cv" / "results.md").read_text()
    assert "Shortcut gap" in markdown and "CAM pointing game" in markdown

    other = tmp_path / "renamed" / "2class"
    shutil.copytree(tfrecords / "2class", other)
    summary = json.loads((other / "summary.json").read_text())
    summary["classes"] = ["covid", "healthy"]
    (other / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ClassMatchError, match="healthy"):
        run_cv("2class", ["resnet18"], tfrecords, tmp_path / "cv2", folds=[1], eval_only=True, log=lambda line: None,
               explain=ExplainOptions(external=str(other)))
    assert not (tmp_path / "cv2").exists()
    # the run's own protocol as the external set: its training images stop the CV before any run
    with pytest.raises(ValueError, match="training/validation data of the run"):
        run_cv("2class", ["resnet18"], tfrecords, tmp_path / "cv3", folds=[1], eval_only=True, log=lambda line: None,
               explain=ExplainOptions(external=str(external)))
    assert not (tmp_path / "cv3").exists()

"""A real (tiny) training run, not a hand-written run folder, through caaxr_tf.cv (which trains
with caaxr_tf.train and evaluates with caaxr_tf.evaluate) and caaxr_tf.export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tolerances import FLOAT32_ATOL, KERNEL_ATOL, threshold_bounds

from caaxr_tf import cv, runs
from caaxr_tf.data.pipeline import parse_record, shard_files
from caaxr_tf.tasks.datasets import make_dataset
from caaxr_tf.export import PREPROCESSED_SIGNATURE, SERVING_SIGNATURE, export_run

pytestmark = [
    pytest.mark.numerics,  # numerics: rerun with oneDNN off by `make test` (tolerances.py)
    pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning"),
]
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def trained(tiny_data_root, tmp_path_factory) -> tuple[Path, Path]:
    from caaxr_tf.data.tfrecords import build_tfrecords

    root = tmp_path_factory.mktemp("trained_run")
    build_tfrecords(tiny_data_root, root / "tfrecords", protocols="seg", workers=1, progress=False, log=lambda _: None)
    code = cv.main(["--protocol", "seg", "--models", "unet", "--tfrecords", str(root / "tfrecords"),
                    "--out", str(root / "cv"), "--folds", "1", "--epochs", "2", "--steps-per-epoch", "15",
                    "--lr", "3e-3", "--set", f"image_size={IMAGE_SIZE}", "--set", "model_kwargs.base_filters=4",
                    "--set", "loss=bce_dice", "--quiet", "--no-plots"])
    assert code == 0
    return root / "tfrecords" / "seg", root / "cv"


def reference_dice_iou(truth: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = truth.reshape(len(truth), -1) > 0.5
    p = probabilities.reshape(len(probabilities), -1) >= 0.5
    inter, t_sum, p_sum = (t & p).sum(1), t.sum(1), p.sum(1)
    dice = np.where(t_sum + p_sum == 0, 1.0, 2 * inter / np.maximum(t_sum + p_sum, 1))
    union = t_sum + p_sum - inter
    return dice, np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def test_cv_trains_and_evaluates_a_real_run(trained):
    protocol_dir, out = trained
    run_dir = out / "unet" / "fold1"
    config = runs.load_run_config(run_dir)
    assert (config["image_size"], config["epochs"], config["model_kwargs"]) == (IMAGE_SIZE, 2, {"base_filters": 4})
    with open(run_dir / runs.HISTORY_FILE, newline="") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]

    # evaluate's numbers against numpy on the best model's own predictions
    model = runs.load_run_model(run_dir, "best")
    truth, probabilities, ids = [], [], []
    for images, masks, batch_ids in make_dataset(protocol_dir, "test", batch_size=5, image_size=IMAGE_SIZE,
                                                 with_ids=True):
        truth.append(masks.numpy())
        probabilities.append(model(images, training=False).numpy())
        ids += [i.decode() for i in batch_ids.numpy()]
    truth, probabilities = np.concatenate(truth), np.concatenate(probabilities)
    assert truth.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 1)
    # evaluate ran the model through its own graph and batches: a pixel within kernel noise of the
    # threshold may fall either side there, every other pixel must match (exactly when none is that close)
    fewest, most = threshold_bounds(probabilities)
    fewest_pixels, most_pixels = (m.reshape(len(ids), -1).sum(axis=1) for m in (fewest, most))
    assert 0 < fewest_pixels.sum() and most_pixels.sum() < most_pixels.size * IMAGE_SIZE**2  # neither empty nor full
    bounds = [reference_dice_iou(truth, m.astype(np.float32)) for m in (fewest, most)]
    metrics = json.loads((run_dir / runs.EVAL_DIR / "metrics.json").read_text())
    assert metrics["num_images"] == len(ids)
    for index, name in enumerate(("dice", "iou")):
        low, high = sorted(bound[index].mean() for bound in bounds)
        assert low - FLOAT32_ATOL <= metrics[name] <= high + FLOAT32_ATOL, (name, metrics[name], low, high)
    with open(run_dir / runs.EVAL_DIR / metrics["files"]["predictions"], newline="") as handle:
        per_image = {row["image_id"]: row for row in csv.DictReader(handle)}
    assert sorted(per_image) == sorted(ids)
    for image_id, mask, low, high in zip(ids, truth, fewest_pixels, most_pixels):
        assert low <= int(per_image[image_id]["predicted_pixels"]) <= high, image_id
        assert int(per_image[image_id]["true_pixels"]) == int((mask > 0.5).sum()) > 0, image_id
    (row,) = cv.read_results_csv(out / cv.RESULTS_CSV)
    assert (row["model"], row["fold"], row["status"]) == ("unet", "1", "ok")
    assert float(row["dice"]) == pytest.approx(metrics["dice"], abs=1e-6)  # the same number, printed and read


def test_export_of_a_real_run_serves_what_training_saw(trained, tmp_path):
    protocol_dir, out = trained
    run_dir = out / "unet" / "fold1"
    version = export_run(run_dir, tmp_path / "saved_models" / "unet")  # verified against Keras on export
    loaded = tf.saved_model.load(str(version))
    signature = loaded.signatures[PREPROCESSED_SIGNATURE].structured_input_signature[1]["images"]
    assert tuple(signature.shape) == (None, IMAGE_SIZE, IMAGE_SIZE, 1)

    records = [parse_record(s) for s in tf.data.TFRecordDataset(shard_files(protocol_dir, "test")).take(6)]
    served = loaded.signatures[SERVING_SIGNATURE](
        images=tf.stack([r["image/encoded"] for r in records]),
        invert=tf.cast(tf.stack([r["image/invert"] for r in records]), tf.bool),
        bit_depth=tf.cast(tf.stack([r["image/bit_depth"] for r in records]), tf.int32),
    )["mask"].numpy()
    pipeline = make_dataset(protocol_dir, "test", batch_size=64, image_size=IMAGE_SIZE, with_ids=True)
    images, _, ids = next(iter(pipeline))
    by_id = dict(zip((i.decode() for i in ids.numpy()), images.numpy()))
    batch = np.stack([by_id[r["image/id"].numpy().decode()] for r in records])
    expected = runs.load_run_model(run_dir, "best")(batch, training=False).numpy()
    assert served.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 1)
    assert np.abs(served - expected).max() <= KERNEL_ATOL and expected.std() > 1e-3  # served graph vs eager

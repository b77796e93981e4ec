"""Training: the custom loop under every strategy, resumption, and errors before training."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caaxr_tf import runs
from caaxr_tf import train as train_lib
from caaxr_tf.data import tfrecords as tfr

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--set", "image_size=64", "--quiet"]


@pytest.fixture(scope="module")
def tfrecords_root(tiny_data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_tfrecords")
    tfr.build_tfrecords(tiny_data_root, out, protocols=["seg", "2class"], workers=1, progress=False, log=lambda line: None)
    return out


def run_in_process(argv: list[str], strategy=None, on_epoch_end=None) -> dict:
    args = train_lib.parse_args(argv)
    config = train_lib.resolve_config(args)
    strategy = strategy or train_lib.make_strategy("one")
    train_lib.prepare_run_dir(Path(args.out), config, True)
    return train_lib.train(config, Path(args.out), strategy, verbose=False, on_epoch_end=on_epoch_end)


def history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / runs.HISTORY_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_folder_contents(tfrecords_root, tmp_path):
    run_dir = tmp_path / "run"
    result = run_in_process(
        ["--protocol", "2class", "--model", "resnet18", "--tfrecords", str(tfrecords_root), "--out", str(run_dir),
         "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "4", *SMALL]
    )
    for name in (runs.CONFIG_FILE, runs.BEST_MODEL, runs.FINAL_MODEL, runs.HISTORY_FILE):
        assert (run_dir / name).exists(), name
    assert not (run_dir / runs.BACKUP_DIR).exists()
    assert list((run_dir / runs.LOG_DIR / "train").glob("events.out.tfevents.*"))
    config = runs.load_run_config(run_dir)
    assert config["class_names"] == ["covid", "non_covid"] and config["batch_size"] == 4
    assert config["optimizer"] == {"name": "sgd", "learning_rate": 1e-3, "momentum": 0.9}  # the paper's
    rows = history(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss", "val_loss", "val_auc_covid", "val_sens_at_99_spec", "val_sens_at_90_spec"} <= set(rows[0])
    model = runs.load_run_model(run_dir, "final")
    assert model.output_shape == (None, 2)
    assert np.isfinite(result["checksum"])


def test_killed_run_resumes_at_the_next_epoch(tfrecords_root, tmp_path):
    run_dir = tmp_path / "resume"
    argv = ["--protocol", "seg", "--model", "unet", "--tfrecords", str(tfrecords_root), "--out", str(run_dir),
            "--epochs", "2", "--steps-per-epoch", "2", "--set", "model_kwargs.base_filters=4", *SMALL]

    def kill_after_first(epoch, logs):
        if epoch == 1:
            raise KeyboardInterrupt("killed after epoch 1")

    with pytest.raises(KeyboardInterrupt):
        run_in_process(argv, on_epoch_end=kill_after_first)
    assert (run_dir / runs.BACKUP_DIR).exists() and not (run_dir / runs.FINAL_MODEL).exists()
    assert [r["epoch"] for r in history(run_dir)] == ["1"]

    seen = []
    run_in_process(argv, on_epoch_end=lambda epoch, logs: seen.append(epoch))
    assert seen == [2]  # epoch 1 was not repeated
    assert [r["epoch"] for r in history(run_dir)] == ["1", "2"]
    # and a third start finds the run complete
    assert train_lib.main(argv) == 0


def test_mirrored_strategy_on_two_logical_cpus(tfrecords_root, tmp_path):
    import tensorflow as tf

    strategy = train_lib.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    result = run_in_process(
        ["--protocol", "seg", "--model", "unet", "--tfrecords", str(tfrecords_root), "--out", str(tmp_path / "m"),
         "--epochs", "1", "--steps-per-epoch", "2", "--set", "model_kwargs.base_filters=4", *SMALL],
        strategy=strategy,
    )
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    row = result["history"][0]
    assert np.isfinite(row["loss"]) and 0.0 <= row["val_dice"] <= 1.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "nonsense"], "unknown model 'nonsense'"),
        (["--model", "unet", "--protocol", "2class"], "is a segmentation model but protocol '2class' is classification"),
        (["--model", "resnet18", "--fold", "3"], "fold 3 does not exist"),
        (["--model", "resnet18", "--weights", "/no/such/file.weights.h5"], "weights file not found"),
    ],
)
def test_bad_arguments_fail_before_training(tfrecords_root, tmp_path, extra, message):
    argv = ["--protocol", "2class", "--tfrecords", str(tfrecords_root), "--out", str(tmp_path / "bad"), *SMALL]
    if "--protocol" in extra:
        argv = argv[2:]
    args = train_lib.parse_args(argv + extra)
    with pytest.raises(train_lib.ConfigError, match=message):
        train_lib.resolve_config(args)
    assert not (tmp_path / "bad").exists()


def test_config_file_with_layered_sections(tfrecords_root, tmp_path):
    """One --config file for several models: defaults < task < models.<name> < flat keys < flags,
    the file winning over train.yaml within each level."""
    config_file = tmp_path / "cv.yaml"
    config_file.write_text(
        "defaults: {epochs: 7, seed: 3}\n"
        "segmentation: {batch_size: 6, epochs: 5, loss: bce_dice}\n"
        "models:\n"
        "  maskrcnn: {batch_size: 2, model_kwargs: {fpn_filters: 64}}\n"
        "  unet: {model_kwargs: {base_filters: 8}}\n"
        "shuffle_buffer: 99\n"
    )
    common = ["--protocol", "seg", "--tfrecords", str(tfrecords_root), "--out", str(tmp_path / "r"),
              "--config", str(config_file)]
    unet = train_lib.resolve_config(train_lib.parse_args(common + ["--model", "unet"]))
    assert (unet["epochs"], unet["batch_size"], unet["seed"], unet["shuffle_buffer"]) == (5, 6, 3, 99)
    assert unet["model_kwargs"] == {"base_filters": 8}
    assert unet["optimizer"]["name"] == "adam"  # train.yaml's segmentation section is kept
    maskrcnn = train_lib.resolve_config(train_lib.parse_args(common + ["--model", "maskrcnn", "--epochs", "1"]))
    assert (maskrcnn["epochs"], maskrcnn["batch_size"]) == (1, 2)
    # train.yaml's models.maskrcnn (loss: model) is more specific than the file's segmentation section
    assert maskrcnn["model_kwargs"] == {"fpn_filters": 64} and maskrcnn["loss"] == "model"
    assert unet["loss"] == "bce_dice"
    resnet = train_lib.resolve_config(train_lib.parse_args(
        ["--protocol", "2class", "--tfrecords", str(tfrecords_root), "--out", str(tmp_path / "c"),
         "--config", str(config_file), "--model", "resnet18"]))
    # the file's defaults (epochs 7) sit below train.yaml's classification section (epochs 30)
    assert (resnet["epochs"], resnet["seed"], resnet["batch_size"], resnet["model_kwargs"]) == (30, 3, 10, {})


def test_shipped_short_cpu_schedule_resolves_per_model(tfrecords_root, tmp_path):
    common = ["--protocol", "seg", "--tfrecords", str(tfrecords_root), "--out", str(tmp_path / "r"),
              "--config", str(REPO / "configs" / "seg_cpu_short.yaml")]
    unet = train_lib.resolve_config(train_lib.parse_args(common + ["--model", "unet"]))
    maskrcnn = train_lib.resolve_config(train_lib.parse_args(common + ["--model", "maskrcnn"]))
    assert (unet["loss"], unet["model_kwargs"], unet["batch_size"]) == ("bce_dice", {"base_filters": 16}, 4)
    assert (maskrcnn["loss"], maskrcnn["batch_size"], maskrcnn["augment"]) == ("model", 8, False)
    assert maskrcnn["optimizer"] == {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9, "clipnorm": 5.0}


def test_batch_norm_statistics_recomputed_from_the_first_training_images(tfrecords_root, tmp_path):
    import keras

    from caaxr_tf.data.pipeline import make_dataset
    from caaxr_tf.models import build_model
    from caaxr_tf.models.layers import batch_norm_layers

    args = train_lib.parse_args(["--protocol", "seg", "--model", "unet", "--tfrecords", str(tfrecords_root),
                                 "--out", str(tmp_path / "r"), "--set", "image_size=32", "--set", "bn_recompute_images=6",
                                 "--set", "model_kwargs.base_filters=4", "--set", "model_kwargs.depth=2"])
    config = train_lib.resolve_config(args)
    strategy = train_lib.make_strategy("one")
    with strategy.scope():
        model = build_model("unet", input_shape=(32, 32, 1), **config["model_kwargs"])
    layers = batch_norm_layers(model, trainable_only=True)
    assert len(layers) == sum(isinstance(l, keras.layers.BatchNormalization) for l in model.layers) > 0
    first = min(layers, key=lambda l: model.layers.index(l))
    assert np.allclose(first.moving_mean.numpy(), 0.0)
    recompute = train_lib.make_bn_recompute(config, strategy, model)
    recompute()
    recompute()  # the second call reuses the traced forward pass and gives the same statistics
    images, _ = next(iter(make_dataset(config["tfrecords"], "train", fold=1, batch_size=6, image_size=32,
                                       training=False, augment=False, cache=False)))
    assert images.shape[0] == 6
    inputs = keras.Model(model.inputs, first.input)(images, training=True).numpy()
    np.testing.assert_allclose(first.moving_mean.numpy(), inputs.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(first.moving_variance.numpy(), inputs.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-4)
    assert all(layer.momentum == 0.9 for layer in layers)  # restored
    config["bn_recompute_images"] = 0
    assert train_lib.make_bn_recompute(config, strategy, model) is None


def test_tfrecords_of_another_protocol_and_empty_shards(tfrecords_root, tmp_path):
    with pytest.raises(train_lib.ConfigError, match="holds the TFRecords of protocol 'seg'"):
        train_lib.locate_protocol_dir(tfrecords_root / "seg", "2class")
    empty = tmp_path / "empty" / "2class"
    empty.mkdir(parents=True)
    summary = json.loads((tfrecords_root / "2class" / "summary.json").read_text())
    (empty / "summary.json").write_text(json.dumps(summary))
    code = subprocess.run(
        [sys.executable, "-m", "caaxr_tf.train", "--protocol", "2class", "--model", "resnet18",
         "--tfrecords", str(empty.parent), "--out", str(tmp_path / "r"), *SMALL],
        capture_output=True, text=True, cwd=REPO,
    )
    assert code.returncode == 2
    error_lines = [line for line in code.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "missing shard" in error_lines[0]


def test_weights_file_of_another_architecture(tfrecords_root, tmp_path):
    from caaxr_tf.models import build_model

    wrong = tmp_path / "unet.weights.h5"
    build_model("unet", input_shape=(64, 64, 1), base_filters=4).save_weights(wrong)
    code = subprocess.run(
        [sys.executable, "-m", "caaxr_tf.train", "--protocol", "2class", "--model", "resnet18",
         "--tfrecords", str(tfrecords_root), "--out", str(tmp_path / "r"), "--weights", str(wrong), *SMALL],
        capture_output=True, text=True, cwd=REPO,
    )
    assert code.returncode == 2, code.stderr[-2000:]
    error_lines = [line for line in code.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "does not match" in error_lines[0]
    assert not (tmp_path / "r" / runs.HISTORY_FILE).exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_multiworker_training_with_two_local_workers(tfrecords_root, tmp_path):
    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    run_dir = tmp_path / "mw"
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                   CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "caaxr_tf.train", "--protocol", "2class", "--model", "resnet18",
             "--tfrecords", str(tfrecords_root), "--out", str(run_dir), "--epochs", "2", "--steps-per-epoch", "2",
             "--batch-size", "4", "--strategy", "auto", *SMALL],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        ))
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=420)[0])
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail("multi-worker training did not finish in time")
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
        assert "MultiWorkerMirroredStrategy" in output and "2 replica(s)" in output
    checksums = [[line for line in out.splitlines() if line.startswith("weights checksum")] for out in outputs]
    assert checksums[0] and checksums[0] == checksums[1]  # both workers end with the same weights
    assert (run_dir / runs.FINAL_MODEL).exists() and (run_dir / runs.BEST_MODEL).exists()
    assert [r["epoch"] for r in history(run_dir)] == ["1", "2"]
    assert not list(run_dir.glob(".worker-backup-*")) and not (run_dir / runs.BACKUP_DIR).exists()


def predict_split(run_dir: Path, split: str, image_size: int):
    from caaxr_tf.data.pipeline import make_dataset

    model = runs.load_run_model(run_dir, "best")
    config = runs.load_run_config(run_dir)
    dataset = make_dataset(config["tfrecords"], split, batch_size=8, image_size=image_size, training=False, augment=False)
    truth, predictions = [], []
    for images, targets in dataset:
        truth.append(targets.numpy())
        predictions.append(model(images, training=False).numpy())
    return np.concatenate(truth), np.concatenate(predictions)


@pytest.mark.slow
def test_unet_learns_the_synthetic_lesions(tfrecords_root, tmp_path):
    from caaxr_tf.metrics import dice_per_image

    run_dir = tmp_path / "unet"
    run_in_process(
        ["--protocol", "seg", "--model", "unet", "--tfrecords", str(tfrecords_root), "--out", str(run_dir),
         "--epochs", "4", "--steps-per-epoch", "25", "--lr", "1e-3", "--set", "model_kwargs.base_filters=8",
         "--set", "loss=bce_dice", "--set", "image_size=128", "--quiet"]
    )
    masks, predicted = predict_split(run_dir, "test", 128)
    dice = dice_per_image(masks, predicted).mean()
    assert dice > 0.5, f"test DICE {dice:.3f} after 100 steps"
    assert dice_per_image(masks, np.zeros_like(predicted)).mean() == 0.0  # lesions exist in every image


@pytest.mark.slow
def test_classifier_learns_covid_vs_non_covid(tfrecords_root, tmp_path):
    from sklearn.metrics import roc_auc_score

    run_dir = tmp_path / "resnet18"
    run_in_process(
        ["--protocol", "2class", "--model", "resnet18", "--tfrecords", str(tfrecords_root), "--out", str(run_dir),
         "--epochs", "3", "--steps-per-epoch", "10", "--lr", "1e-2", "--set", "image_size=96", "--quiet"]
    )
    labels, probabilities = predict_split(run_dir, "test", 96)
    auc = roc_auc_score(labels[:, 0], probabilities[:, 0])
    assert auc > 0.9, f"COVID test AUC {auc:.3f} after 30 steps"


def test_xla_and_mixed_precision_steps_run(tfrecords_root, tmp_path):
    # a subprocess: the mixed-precision policy is process-global
    code = subprocess.run(
        [sys.executable, "-m", "caaxr_tf.train", "--protocol", "2class", "--model", "resnet18",
         "--tfrecords", str(tfrecords_root), "--out", str(tmp_path / "xla"), "--epochs", "1", "--steps-per-epoch", "2",
         "--batch-size", "4", "--jit", "--mixed-precision", *SMALL],
        capture_output=True, text=True, cwd=REPO,
    )
    assert code.returncode == 0, code.stderr[-3000:]
    config = runs.load_run_config(tmp_path / "xla")
    assert config["jit"] is True and config["mixed_precision"] is True
    rows = history(tmp_path / "xla")
    assert len(rows) == 1 and np.isfinite(float(rows[0]["loss"]))

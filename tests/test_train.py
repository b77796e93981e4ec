"""Training: the custom loop under every strategy, resumption, and errors before training."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

from tolerances import KERNEL_RTOL

from caaxr_tf import runs
from caaxr_tf import train as train_lib
from caaxr_tf.training import trainer as trainer_lib
from caaxr_tf.training.callbacks import BatchNormRecompute, default_callbacks
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


def keep_checkpoints(run_dir: Path, into: Path) -> Callable[[int, dict], None]:
    """An ``on_epoch_end`` that copies each epoch's checkpoint (the run keeps only the last)."""

    def keep(epoch: int, logs: dict) -> None:
        target = into / f"epoch{epoch}"
        target.mkdir(parents=True)
        for file in (run_dir / runs.BACKUP_DIR).glob(f"ckpt-{epoch}.*"):
            shutil.copy(file, target / file.name)

    return keep


def restored_weights(checkpoint_dir: Path, epoch: int, config: dict) -> list[np.ndarray]:
    """The model weights in one epoch's checkpoint, restored into a freshly built model."""
    import tensorflow as tf

    from caaxr_tf.models import build_model

    model = build_model(config["model"], num_classes=len(config["class_names"]), weights="none",
                        input_shape=(config["image_size"], config["image_size"], 1), **config["model_kwargs"])
    fresh = [w.copy() for w in model.get_weights()]
    tf.train.Checkpoint(model=model).read(str(checkpoint_dir / f"epoch{epoch}" / f"ckpt-{epoch}")) \
        .assert_existing_objects_matched()
    restored = model.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(fresh, restored))
    return restored


def same_weights(first: list[np.ndarray], second: list[np.ndarray]) -> bool:
    return len(first) == len(second) and all(np.array_equal(a, b) for a, b in zip(first, second))


def test_run_folder_contents_and_best_model_of_the_best_epoch(tfrecords_root, tmp_path):
    """Three epochs; best.keras must hold the weights of the epoch that history.csv names best.
    The monitor is the epoch's duration, mode max: the first epoch traces the steps and is by
    far the longest, so the best epoch is known (1) and is not the last."""
    run_dir = tmp_path / "run"
    result = run_in_process(
        ["--protocol", "2class", "--model", "resnet18", "--tfrecords", str(tfrecords_root), "--out", str(run_dir),
         "--epochs", "3", "--steps-per-epoch", "2", "--batch-size", "4", "--set", "monitor=seconds",
         "--set", "monitor_mode=max", *SMALL],
        on_epoch_end=keep_checkpoints(run_dir, tmp_path / "kept"),
    )
    for name in (runs.CONFIG_FILE, runs.BEST_MODEL, runs.FINAL_MODEL, runs.HISTORY_FILE):
        assert (run_dir / name).exists(), name
    assert not (run_dir / runs.BACKUP_DIR).exists()
    assert list((run_dir / runs.LOG_DIR / "train").glob("events.out.tfevents.*"))
    config = runs.load_run_config(run_dir)
    assert config["class_names"] == ["covid", "non_covid"] and config["batch_size"] == 4
    assert config["optimizer"] == {"name": "sgd", "learning_rate": 1e-3, "momentum": 0.9}  # the paper's
    rows = history(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert {"loss", "val_loss", "val_auc_covid", "val_sens_at_99_spec", "val_sens_at_90_spec"} <= set(rows[0])
    model = runs.load_run_model(run_dir, "final")
    assert model.output_shape == (None, 2)
    assert np.isfinite(result.checksum)

    best_epoch = int(max(rows, key=lambda r: float(r["seconds"]))["epoch"])
    assert best_epoch == 1 and result.best == pytest.approx(float(rows[0]["seconds"]))
    per_epoch = {epoch: restored_weights(tmp_path / "kept", epoch, config) for epoch in (1, 2, 3)}
    best = runs.load_run_model(run_dir, "best").get_weights()
    assert same_weights(best, per_epoch[best_epoch])
    assert not same_weights(best, per_epoch[3]) and not same_weights(best, per_epoch[2])
    assert same_weights(model.get_weights(), per_epoch[3])


def test_killed_run_resumes_at_the_next_epoch_from_the_saved_state(tfrecords_root, tmp_path, monkeypatch):
    """The weights and optimizer state a resumed run starts from are those of the killed run
    after epoch 1 (a restore that silently matched nothing would start from fresh weights)."""
    run_dir = tmp_path / "resume"
    argv = ["--protocol", "seg", "--model", "unet", "--tfrecords", str(tfrecords_root), "--out", str(run_dir),
            "--epochs", "2", "--steps-per-epoch", "2", "--set", "model_kwargs.base_filters=4", *SMALL]
    # The training step is built right after the restore: a spy on its factory sees the model
    # and optimizer the loop starts from.
    built: list[tuple] = []
    real_factory = trainer_lib.make_train_step

    def spy(task, strategy, model, optimizer, *args, **kwargs):
        built.append((model, optimizer, [w.copy() for w in model.get_weights()],
                      [v.numpy().copy() for v in optimizer.variables]))
        return real_factory(task, strategy, model, optimizer, *args, **kwargs)

    monkeypatch.setattr(trainer_lib, "make_train_step", spy)
    saved: dict[str, list[np.ndarray]] = {}

    def kill_after_first(epoch, logs):
        model, optimizer = built[0][:2]
        saved["weights"] = [w.copy() for w in model.get_weights()]
        saved["optimizer"] = [v.numpy().copy() for v in optimizer.variables]
        saved["iterations"] = int(optimizer.iterations.numpy())
        raise KeyboardInterrupt("killed after epoch 1")

    with pytest.raises(KeyboardInterrupt):
        run_in_process(argv, on_epoch_end=kill_after_first)
    assert (run_dir / runs.BACKUP_DIR).exists() and not (run_dir / runs.FINAL_MODEL).exists()
    assert [r["epoch"] for r in history(run_dir)] == ["1"]
    assert saved["iterations"] == 2
    fresh_weights = built[0][2]
    assert not same_weights(saved["weights"], fresh_weights)  # epoch 1 changed them

    seen = []
    run_in_process(argv, on_epoch_end=lambda epoch, logs: seen.append(epoch))
    assert seen == [2]  # epoch 1 was not repeated
    _, optimizer, start_weights, start_optimizer = built[1]
    assert same_weights(start_weights, saved["weights"])  # trainable and BatchNorm statistics
    assert same_weights(start_optimizer, saved["optimizer"])  # iterations, Adam moments
    assert int(optimizer.iterations.numpy()) == 4
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
    row = result.history[0]
    assert np.isfinite(row["loss"]) and 0.0 <= row["val_dice"] <= 1.0


# One training step of a small BatchNorm-free model with an L2 penalty, on a fixed global batch
# of four images: the same updated weights under every strategy, or the loss is scaled per
# replica instead of per global batch. Shared by the in-process and the multi-worker test.
STEP_BATCH = 4
STEP_LEARNING_RATE = 0.5


def step_model():
    import keras

    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", kernel_regularizer=keras.regularizers.L2(0.01))(x)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


def step_batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    images = rng.uniform(0, 255, (4, 32, 32, 1)).astype(np.float32)
    return images, (images > 150).astype(np.float32)


def one_step(strategy, initial: list[np.ndarray], dataset_fn) -> tuple[list[np.ndarray], float]:
    """Weights and reported loss after one step of the trainer's make_train_step from ``initial``."""
    import keras

    with strategy.scope():
        model = step_model()
        model.set_weights(initial)
        optimizer = keras.optimizers.SGD(learning_rate=STEP_LEARNING_RATE)
        optimizer.build(model.trainable_variables)
        loss_tracker = keras.metrics.Mean(name="loss")
    from caaxr_tf.tasks.segmentation import SegmentationTask

    task = SegmentationTask(["lesion"], loss="binary_crossentropy")
    step = trainer_lib.make_train_step(task, strategy, model, optimizer, loss_tracker, global_batch=STEP_BATCH)
    step(iter(strategy.distribute_datasets_from_function(dataset_fn)))
    return model.get_weights(), float(loss_tracker.result())


def sharded_batches(context):
    """Worker/replica ``k`` of ``n`` takes images k, k + n, ...: together, the global batch."""
    import tensorflow as tf

    images, masks = step_batch()
    dataset = tf.data.Dataset.from_tensor_slices((images, masks))
    dataset = dataset.shard(context.num_input_pipelines, context.input_pipeline_id)
    return dataset.batch(context.get_per_replica_batch_size(STEP_BATCH)).repeat()


def reference_step(initial: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    """The step on one device, with the gradient written out here (no distribution at all)."""
    import keras
    import tensorflow as tf

    model = step_model()
    model.set_weights(initial)
    images, masks = step_batch()
    with tf.GradientTape() as tape:
        predictions = model(images, training=True)
        loss = tf.reduce_mean(keras.losses.binary_crossentropy(masks, predictions)) + tf.add_n(model.losses)
    gradients = tape.gradient(loss, model.trainable_variables)
    for variable, gradient in zip(model.trainable_variables, gradients):
        variable.assign_sub(STEP_LEARNING_RATE * gradient)
    return model.get_weights(), float(loss)


def assert_same_update(got: list[np.ndarray], expected: list[np.ndarray], initial: list[np.ndarray]) -> None:
    change = max(np.abs(e - i).max() for e, i in zip(expected, initial))
    assert change > 1e-3  # the step moves the weights: a doubled or halved update would show
    for g, e in zip(got, expected):
        # traced strategy step against eager kernels: KERNEL_RTOL, and relative to the step's size near 0
        np.testing.assert_allclose(g, e, rtol=KERNEL_RTOL, atol=KERNEL_RTOL * change)


@pytest.mark.numerics
def test_one_step_is_the_same_on_one_device_and_mirrored_on_two():
    import keras

    keras.utils.set_random_seed(0)
    initial = step_model().get_weights()
    expected, expected_loss = reference_step(initial)
    one = train_lib.make_strategy("one")
    mirrored = train_lib.make_strategy("mirrored")
    assert mirrored.num_replicas_in_sync == 2
    for strategy in (one, mirrored):
        weights, loss = one_step(strategy, initial, sharded_batches)
        assert_same_update(weights, expected, initial)
        # the global batch's loss, penalty included; a strategy's traced step against eager kernels
        assert loss == pytest.approx(expected_loss, rel=KERNEL_RTOL)


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
    assert (unet.epochs, unet.batch_size, unet.seed, unet.shuffle_buffer) == (5, 6, 3, 99)
    assert unet.model_kwargs == {"base_filters": 8}
    assert unet.optimizer.name == "adam"  # train.yaml's segmentation section is kept
    maskrcnn = train_lib.resolve_config(train_lib.parse_args(common + ["--model", "maskrcnn", "--epochs", "1"]))
    assert (maskrcnn.epochs, maskrcnn.batch_size) == (1, 2)
    # train.yaml's models.maskrcnn (loss: model) is more specific than the file's segmentation section
    assert maskrcnn.model_kwargs == {"fpn_filters": 64} and maskrcnn.loss == "model"
    assert unet.loss == "bce_dice"
    resnet = train_lib.resolve_config(train_lib.parse_args(
        ["--protocol", "2class", "--tfrecords", str(tfrecords_root), "--out", str(tmp_path / "c"),
         "--config", str(config_file), "--model", "resnet18"]))
    # the file's defaults (epochs 7) sit below train.yaml's classification section (epochs 30)
    assert (resnet.epochs, resnet.seed, resnet.batch_size, resnet.model_kwargs) == (30, 3, 10, {})


def test_shipped_short_cpu_schedule_resolves_per_model(tfrecords_root, tmp_path):
    common = ["--protocol", "seg", "--tfrecords", str(tfrecords_root), "--out", str(tmp_path / "r"),
              "--config", str(REPO / "caaxr_tf" / "configs" / "seg_cpu_short.yaml")]
    unet = train_lib.resolve_config(train_lib.parse_args(common + ["--model", "unet"]))
    maskrcnn = train_lib.resolve_config(train_lib.parse_args(common + ["--model", "maskrcnn"]))
    assert (unet.loss, unet.model_kwargs, unet.batch_size) == ("bce_dice", {"base_filters": 16}, 4)
    assert (maskrcnn.loss, maskrcnn.batch_size, maskrcnn.augment) == ("model", 8, False)
    assert maskrcnn.optimizer.to_mapping() == {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9, "clipnorm": 5.0}


def test_batch_norm_statistics_recomputed_from_the_first_training_images(tfrecords_root, tmp_path):
    import keras

    from caaxr_tf.tasks.datasets import make_dataset
    from caaxr_tf.models import build_model
    from caaxr_tf.models.layers import batch_norm_layers

    args = train_lib.parse_args(["--protocol", "seg", "--model", "unet", "--tfrecords", str(tfrecords_root),
                                 "--out", str(tmp_path / "r"), "--set", "image_size=32", "--set", "bn_recompute_images=6",
                                 "--set", "model_kwargs.base_filters=4", "--set", "model_kwargs.depth=2"])
    config = train_lib.resolve_config(args)
    strategy = train_lib.make_strategy("one")
    with strategy.scope():
        model = build_model("unet", input_shape=(32, 32, 1), **config.model_kwargs)
    layers = batch_norm_layers(model, trainable_only=True)
    assert len(layers) == sum(isinstance(l, keras.layers.BatchNormalization) for l in model.layers) > 0
    first = min(layers, key=lambda l: model.layers.index(l))
    assert np.allclose(first.moving_mean.numpy(), 0.0)
    from caaxr_tf.tasks.segmentation import SegmentationTask

    trainer = SimpleNamespace(model=model, config=config, strategy=strategy, task=SegmentationTask(["lesion"]))
    recompute = BatchNormRecompute(config.bn_recompute_images)
    recompute.on_build(trainer)
    recompute.on_train_steps_end(trainer, 1)
    recompute.on_train_steps_end(trainer, 2)  # reuses the traced forward pass and gives the same statistics
    images, _ = next(iter(make_dataset(config.tfrecords, "train", fold=1, batch_size=6, image_size=32,
                                       training=False, augment=False, cache=False)))
    assert images.shape[0] == 6
    inputs = keras.Model(model.inputs, first.input)(images, training=True).numpy()
    np.testing.assert_allclose(first.moving_mean.numpy(), inputs.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(first.moving_variance.numpy(), inputs.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-4)
    assert all(layer.momentum == 0.9 for layer in layers)  # restored
    trainer.config = config.replace(bn_recompute_images=0)
    assert not any(isinstance(c, BatchNormRecompute) for c in default_callbacks(trainer))


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


# One training step on one of two local workers (TF_CONFIG) of a MultiWorkerMirroredStrategy.
WORKER_STEP = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_train
from caaxr_tf import train as train_lib

strategy = train_lib.make_strategy("multiworker")
assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
with np.load(sys.argv[2]) as saved:
    initial = [saved[f"w{i}"] for i in range(len(saved.files))]
weights, loss = test_train.one_step(strategy, initial, test_train.sharded_batches)
np.savez(sys.argv[3], loss=loss, **{f"w{i}": w for i, w in enumerate(weights)})
"""


@pytest.mark.slow
@pytest.mark.numerics
def test_one_step_is_the_same_on_one_device_and_on_two_workers(tmp_path):
    """Each worker reads half of the global batch; their step must equal the one-device step."""
    import keras

    keras.utils.set_random_seed(0)
    initial = step_model().get_weights()
    expected, expected_loss = reference_step(initial)
    np.savez(tmp_path / "initial.npz", **{f"w{i}": w for i, w in enumerate(initial)})
    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                   CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
        processes.append(subprocess.Popen(
            [sys.executable, "-c", WORKER_STEP, str(REPO / "tests"), str(tmp_path / "initial.npz"),
             str(tmp_path / f"worker{index}.npz")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        ))
    for process in processes:
        try:
            output = process.communicate(timeout=300)[0]
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail("the two workers did not finish in time")
        assert process.returncode == 0, output[-3000:]
    for index in range(2):
        with np.load(tmp_path / f"worker{index}.npz") as result:
            assert_same_update([result[f"w{i}"] for i in range(len(initial))], expected, initial)
            assert float(result["loss"]) == pytest.approx(expected_loss, rel=KERNEL_RTOL)  # traced vs eager


def predict_split(run_dir: Path, split: str, image_size: int):
    from caaxr_tf.tasks.datasets import make_dataset

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


def layer_dtype_policies(keras_file: Path) -> dict[str, str]:
    """Every layer's dtype policy in a saved .keras file (nested models walked), by name."""
    import zipfile

    def walk(entry: dict, found: dict[str, str]) -> dict[str, str]:
        config = entry.get("config", {})
        if "layers" in config:
            for layer in config["layers"]:
                walk(layer, found)
        else:
            dtype = config.get("dtype")
            found[config["name"]] = dtype["config"]["name"] if isinstance(dtype, dict) else str(dtype)
        return found

    with zipfile.ZipFile(keras_file) as archive:
        return walk(json.loads(archive.read("config.json")), {})


def test_xla_and_mixed_precision_steps_run(tfrecords_root, tmp_path):
    # a subprocess: the mixed-precision policy is process-global. TensorFlow's INFO log says
    # when it compiled a cluster with XLA (nothing on CPU is auto-clustered without --jit).
    code = subprocess.run(
        [sys.executable, "-m", "caaxr_tf.train", "--protocol", "2class", "--model", "resnet18",
         "--tfrecords", str(tfrecords_root), "--out", str(tmp_path / "xla"), "--epochs", "1", "--steps-per-epoch", "2",
         "--batch-size", "4", "--jit", "--mixed-precision", *SMALL],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0"),
    )
    assert code.returncode == 0, code.stderr[-3000:]
    assert "Compiled cluster using XLA" in code.stderr
    config = runs.load_run_config(tmp_path / "xla")
    assert config["jit"] is True and config["mixed_precision"] is True
    rows = history(tmp_path / "xla")
    assert len(rows) == 1 and np.isfinite(float(rows[0]["loss"]))
    # every layer computes in float16 with float32 variables, but the softmax head and the inputs
    policies = layer_dtype_policies(tmp_path / "xla" / runs.FINAL_MODEL)
    assert {name for name, policy in policies.items() if policy != "mixed_float16"} == {"image", "input", "predictions"}
    assert policies["predictions"] == "float32" and len(policies) > 50


def test_paper_defaults_resolve_per_task_and_model(tfrecords_root, tmp_path):
    import keras

    def resolved(protocol: str, model: str):
        return train_lib.resolve_config(train_lib.parse_args(
            ["--protocol", protocol, "--model", model, "--tfrecords", str(tfrecords_root), "--out", str(tmp_path / "r")]))

    for model in ("unet", "segnet"):
        config = resolved("seg", model)
        assert (config.batch_size, config.epochs, config.loss, config.monitor) == (
            4, 25, "binary_crossentropy", "val_dice")
        assert config.optimizer.to_mapping() == {"name": "adam", "learning_rate": 1e-4}
        optimizer = config.optimizer.build()
        assert isinstance(optimizer, keras.optimizers.Adam) and float(optimizer.learning_rate) == pytest.approx(1e-4)
    maskrcnn = resolved("seg", "maskrcnn")
    assert (maskrcnn.batch_size, maskrcnn.loss) == (16, "model")
    assert {k: maskrcnn.optimizer.to_mapping()[k] for k in ("name", "learning_rate", "momentum")} == {
        "name": "sgd", "learning_rate": 1e-3, "momentum": 0.9}
    for model in ("resnet18", "mobilenetv2", "densenet121", "vgg19"):
        config = resolved("2class", model)
        assert (config.batch_size, config.epochs, config.loss, config.monitor) == (
            10, 30, "categorical_crossentropy", "val_auc_mean")
        optimizer = config.optimizer.build()
        assert isinstance(optimizer, keras.optimizers.SGD)
        assert (float(optimizer.learning_rate), float(optimizer.momentum)) == pytest.approx((1e-3, 0.9))

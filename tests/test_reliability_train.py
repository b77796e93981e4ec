"""Issue 17 on the training side: a non-finite loss stops training before anything is saved as
best (case 6), every numeric flag is checked (case 10), one-line errors instead of tracebacks
(case 11), a damaged shard is named while training and evaluating (case 7), evaluation
refuses a NaN model, and caaxr_tf.cv runs repeated models or folds once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from caaxr_tf import runs
from caaxr_tf import train as train_lib
from caaxr_tf.cv import run_cv
from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.evaluate import evaluate_run, metrics_path
from caaxr_tf.evaluate import main as evaluate_main

SMALL = ["--set", "image_size=32", "--set", "model_kwargs.base_filters=2", "--quiet"]


@pytest.fixture(scope="module")
def seg_records(tiny_data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reliability_train")
    tfr.build_tfrecords(tiny_data_root, out, protocols="seg", storage_size=64, records_per_shard=4, workers=1,
                        progress=False, log=lambda line: None)
    return out


def seg_argv(records: Path, out: Path, *extra: str) -> list[str]:
    return ["--protocol", "seg", "--model", "unet", "--tfrecords", str(records), "--out", str(out),
            "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "2", *SMALL, *extra]


def copy_records(seg_records: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "records"
    shutil.copytree(seg_records, copy)
    for summary_path in copy.rglob("summary.json"):  # nothing in a summary names its folder
        assert str(seg_records) not in summary_path.read_text()
    return copy


def flip_a_byte(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))


# --------------------------------------------------------------------------- case 6


def test_a_diverging_loss_stops_training_before_saving(seg_records, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_lib.main(seg_argv(seg_records, run_dir, "--lr", "1e30")) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "loss is nan at epoch 1" in errors[0] or "loss is inf at epoch 1" in errors[0], errors
    assert "no best.keras was saved" in errors[0] and "learning rate (now 1e+30)" in errors[0]
    assert not (run_dir / runs.BEST_MODEL).exists() and not (run_dir / runs.FINAL_MODEL).exists()
    assert not (run_dir / runs.HISTORY_FILE).exists()  # no epoch with a NaN loss was recorded



def test_evaluation_refuses_a_model_with_nan_outputs(seg_records, tmp_path):
    inputs = keras.Input((224, 224, 1))
    network = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs))
    network.set_weights([np.full(w.shape, np.nan, w.dtype) for w in network.get_weights()])
    run_dir = tmp_path / "nan_run"
    run_dir.mkdir()
    network.save(run_dir / runs.BEST_MODEL)
    config = {"task": "segmentation", "model": "unet", "protocol": "seg", "fold": 1, "image_size": 224,
              "batch_size": 4, "class_names": ["lesion"], "tfrecords": str(seg_records / "seg")}
    (run_dir / runs.CONFIG_FILE).write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"outputs are not finite \(NaN or Inf\) for \d+ image"):
        evaluate_run(run_dir, plots=False, log=None)
    assert not metrics_path(run_dir).exists()


# --------------------------------------------------------------------------- case 10 and 11


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps-per-epoch", "-3"], "steps_per_epoch must be an integer >= 1, got -3"),
        (["--steps-per-epoch", "0"], "steps_per_epoch must be an integer >= 1, got 0"),
        (["--validation-steps", "0"], "validation_steps must be an integer >= 1, got 0"),
        (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
        (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
        (["--lr", "nan"], "learning rate must be a finite number > 0, got nan"),
        (["--lr", "inf"], "learning rate must be a finite number > 0, got inf"),
        (["--lr", "-0.1"], "learning rate must be a finite number > 0, got -0.1"),
        (["--set", "optimizer.learning_rate=1e-3"], "got '1e-3' (YAML reads 1e-3 as text: write 1.0e-3)"),
        (["--set", "epochs=abc"], "epochs must be an integer >= 1, got 'abc'"),
        (["--set", "optimizer=5"], "'optimizer' is a section"),
        (["--set", "seed=!!python/object/apply:os.getcwd []"], "invalid value"),
        (["--set", "bn_recompute_images=-1"], "bn_recompute_images must be an integer >= 0"),
        (["--config", "/no/such/config.yaml"], "--config: config file not found: /no/such/config.yaml"),
    ],
)
def test_bad_numbers_and_settings_are_one_line_errors_before_training(seg_records, tmp_path, capsys, extra, message):
    run_dir = tmp_path / "run"
    assert train_lib.main(seg_argv(seg_records, run_dir, *extra)) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err, err
    assert not run_dir.exists()


def test_out_file_bad_config_yaml_and_corrupt_summary_are_named(seg_records, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert train_lib.main(seg_argv(seg_records, a_file)) == 2
    assert f"error: --out {a_file} exists and is not a folder" in capsys.readouterr().err

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: [1, 2\n")
    assert train_lib.main(seg_argv(seg_records, tmp_path / "r1", "--config", str(bad_yaml))) == 2
    assert f"error: --config: {bad_yaml}: invalid YAML" in capsys.readouterr().err

    records = copy_records(seg_records, tmp_path)
    summary = records / "seg" / "summary.json"
    summary.write_text('{"protocol": "seg", ')
    assert train_lib.main(seg_argv(records, tmp_path / "r2")) == 2
    err = capsys.readouterr().err
    assert f"error: {summary}: cannot be read as JSON" in err and "Traceback" not in err, err
    assert evaluate_main(["--run", str(tmp_path / "missing_run")]) == 2  # unchanged: still one line

    # A run folder whose config.yaml is damaged, and an --out under a file: one line each, no traceback.
    damaged = tmp_path / "damaged_run"
    damaged.mkdir()
    (damaged / runs.CONFIG_FILE).write_text("epochs: [1, 2\n")
    assert train_lib.main(seg_argv(seg_records, damaged)) == 2
    err = capsys.readouterr().err
    assert f"error: {damaged / runs.CONFIG_FILE}: cannot be read as the run's configuration" in err, err
    assert "Traceback" not in err
    assert train_lib.main(seg_argv(seg_records, a_file / "run")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(a_file) in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- case 7


def test_a_damaged_shard_is_named_by_training_and_evaluation(seg_records, tmp_path, capsys):
    records = copy_records(seg_records, tmp_path)
    summary = json.loads((records / "seg" / "summary.json").read_text())
    train_shard = records / "seg" / summary["shards"]["fold1/train"][1]
    flip_a_byte(train_shard)
    run_dir = tmp_path / "run"
    assert train_lib.main(seg_argv(records, run_dir)) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"corrupt TFRecord shard: {train_shard}: corrupt TFRecord data" in errors[0]
    assert "tools/make_tfrecords.py --verify" in errors[0]
    assert not (run_dir / runs.BEST_MODEL).exists()

    inputs = keras.Input((224, 224, 1))
    network = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(keras.layers.Rescaling(1 / 255)(inputs)))
    eval_run = tmp_path / "eval_run"
    eval_run.mkdir()
    network.save(eval_run / runs.BEST_MODEL)
    config = {"task": "segmentation", "model": "unet", "protocol": "seg", "fold": 1, "image_size": 224,
              "batch_size": 4, "class_names": ["lesion"], "tfrecords": str(records / "seg")}
    (eval_run / runs.CONFIG_FILE).write_text(yaml.safe_dump(config))
    test_shard = records / "seg" / summary["shards"]["test"][2]
    test_shard.write_bytes(test_shard.read_bytes()[:-7])  # truncated inside its last record
    assert evaluate_main(["--run", str(eval_run), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"error: corrupt TFRecord shard: {test_shard}: corrupt TFRecord data" in err, err
    assert not metrics_path(eval_run).exists()


# --------------------------------------------------------------------------- cv


def test_cv_runs_repeated_models_and_folds_once(seg_records, tmp_path):
    trained: list[tuple] = []

    def trainer(config, run_dir) -> None:
        trained.append((config.model, config.fold, run_dir))

    def evaluator(run_dir, split, subset, batch_size, which, plots, log):
        metrics = {"task": "segmentation", "dice": 0.5, "iou": 0.25, "num_images": 15}
        path = metrics_path(run_dir, split, subset)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics))
        return metrics

    log: list[str] = []
    rows = run_cv("seg", ["unet", "unet"], seg_records, tmp_path / "cv", folds=[1, 1], trainer=trainer,
                  evaluator=evaluator, plots=False, log=log.append)
    assert [(r["model"], r["fold"]) for r in rows] == [("unet", 1)]
    assert len(trained) == 1
    assert any("repeated models or folds are run once" in line for line in log)
    with open(tmp_path / "cv" / "results.csv") as handle:
        assert [line.split(",")[:2] for line in handle.read().splitlines()[1:]] == [
            ["unet", "1"], ["unet", "mean"], ["unet", "std"]]


# --------------------------------------------------------------------------- NonFiniteLossGuard


class _Recorder:
    """Records which hooks ran (after the guard, which is first in the default callbacks)."""

    def __init__(self, poison_at_step: int | None = None):
        self.poison_at_step = poison_at_step
        self.events: list[tuple] = []

    def on_build(self, trainer): ...
    def on_train_begin(self, trainer): ...
    def on_train_steps_end(self, trainer, epoch): self.events.append(("steps_end", epoch))
    def on_epoch_begin(self, trainer, epoch): self.events.append(("epoch_begin", epoch))
    def on_train_end(self, trainer): self.events.append(("train_end",))
    def on_epoch_end(self, trainer, epoch, logs): self.events.append(("epoch_end", epoch))

    def on_step_end(self, trainer, epoch, step, loss):
        self.events.append(("step", epoch, step))
        if step == self.poison_at_step:  # every weight NaN: the next step's loss is NaN
            for variable in trainer.model.trainable_variables:
                variable.assign(np.full(tuple(variable.shape), np.nan, np.float32))


def guarded_trainer(seg_records: Path, run_dir: Path, recorder: _Recorder):
    import tensorflow as tf

    from caaxr_tf.training.trainer import Trainer

    config = train_lib.resolve_config(train_lib.parse_args(
        seg_argv(seg_records, run_dir, "--steps-per-epoch", "5", "--lr", "1e-3")))
    train_lib.prepare_run_dir(run_dir, config, True)
    trainer = Trainer(config, run_dir, tf.distribute.get_strategy(), verbose=False).build()
    trainer.callbacks.append(recorder)
    return trainer


def test_a_nan_training_loss_is_reported_at_its_step(seg_records, tmp_path):
    """The weights turn NaN after step 2: the guard stops training at step 3 of epoch 1, not at
    the end of the epoch, and no later step runs."""
    from caaxr_tf.training.callbacks import NonFiniteLossError

    run_dir = tmp_path / "run"
    recorder = _Recorder(poison_at_step=2)
    trainer = guarded_trainer(seg_records, run_dir, recorder)
    with pytest.raises(NonFiniteLossError, match=r"^training loss is nan at epoch 1, step 3: "):
        trainer.fit()
    assert recorder.events == [("epoch_begin", 1), ("step", 1, 1), ("step", 1, 2)]
    assert not (run_dir / runs.BEST_MODEL).exists() and not (run_dir / runs.HISTORY_FILE).exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_validation_loss_stops_training(seg_records, tmp_path, bad):
    """Training losses stay finite; the validation loss of epoch 1 is NaN (or +Inf): training stops
    at epoch 1's end, before its best model, history row or epoch 2."""
    from caaxr_tf.training.callbacks import NonFiniteLossError

    run_dir = tmp_path / "run"
    recorder = _Recorder()
    trainer = guarded_trainer(seg_records, run_dir, recorder)
    real_val_step = trainer.val_step

    def val_step(batch):  # the real validation step, then one non-finite batch loss
        real_val_step(batch)
        trainer.val_loss_tracker.update_state(bad)

    trainer.val_step = val_step
    with pytest.raises(NonFiniteLossError, match=rf"^validation loss is {bad} at epoch 1: "):
        trainer.fit()
    assert recorder.events == [("epoch_begin", 1), *[("step", 1, s) for s in range(1, 6)], ("steps_end", 1)]
    assert trainer.validation_batches > 0
    assert not (run_dir / runs.BEST_MODEL).exists() and not (run_dir / runs.HISTORY_FILE).exists()
    assert not (run_dir / runs.FINAL_MODEL).exists()

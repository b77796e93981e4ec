"""What the trainer does around its steps, one duty per callback.

The trainer calls, in list order: ``on_build`` (after the model, optimizer and metrics exist,
before any step: restoring a backup happens here), ``on_train_begin``, per epoch
``on_epoch_begin``, ``on_step_end`` after each training step, ``on_train_steps_end`` after the
epoch's training steps and before validation, ``on_epoch_end`` with the epoch's logs, and
``on_train_end``. `default_callbacks` gives the standard list in the order that keeps the run
folder consistent: a diverged epoch is refused before anything of it is saved, and the backup
of an epoch is written after its best model and history row.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from caaxr_tf import runs
from caaxr_tf.io import atomic_path, write_text_atomic
from caaxr_tf.data.pipeline import make_dataset
from caaxr_tf.models.layers import batch_norm_layers

if TYPE_CHECKING:
    from caaxr_tf.training.trainer import Trainer


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops before the epoch is saved."""


class TrainingCallback:
    """Base class: every hook does nothing."""

    def on_build(self, trainer: "Trainer") -> None: ...
    def on_train_begin(self, trainer: "Trainer") -> None: ...
    def on_epoch_begin(self, trainer: "Trainer", epoch: int) -> None: ...
    def on_step_end(self, trainer: "Trainer", epoch: int, step: int, loss: float) -> None: ...
    def on_train_steps_end(self, trainer: "Trainer", epoch: int) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", epoch: int, logs: dict[str, float]) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...


class History:
    """history.csv: one row per finished epoch, rewritten whole so it is never half a row."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as handle:
                self.rows = [{k: float(v) if k != "epoch" else int(v) for k, v in row.items()}
                             for row in csv.DictReader(handle)]

    def keep_until(self, epoch: int) -> None:
        self.rows = [row for row in self.rows if row["epoch"] <= epoch]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        with atomic_path(self.path) as temporary:
            with open(temporary, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
                writer.writeheader()
                writer.writerows(self.rows)

    def best(self, monitor: str, mode: str) -> float | None:
        values = [row[monitor] for row in self.rows if monitor in row and not math.isnan(row[monitor])]
        if not values:
            return None
        return max(values) if mode == "max" else min(values)


def save_model_atomic(model, path: Path) -> None:
    with atomic_path(path) as temporary:  # keeps the .keras suffix that model.save requires
        model.save(temporary)


class NonFiniteLossGuard(TrainingCallback):
    """Stops training when the training loss (checked after every step) or the validation loss
    stops being finite, before anything of that epoch is saved."""

    def on_step_end(self, trainer, epoch, step, loss):
        if not math.isfinite(loss):
            raise NonFiniteLossError(self.message(trainer, "training loss", loss, epoch, step))

    def on_epoch_end(self, trainer, epoch, logs):
        value = logs.get("val_loss")
        if trainer.validation_batches and value is not None and not math.isfinite(value):
            raise NonFiniteLossError(self.message(trainer, "validation loss", value, epoch, None))

    @staticmethod
    def message(trainer, what: str, value: float, epoch: int, step: int | None) -> str:
        where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
        best = trainer.run_dir / runs.BEST_MODEL
        kept = f"{best} keeps an earlier epoch" if best.exists() else f"no {runs.BEST_MODEL} was saved"
        return (f"{what} is {value} at {where}: training stopped before saving this epoch ({kept}); "
                f"try a lower learning rate (now {trainer.config.optimizer.learning_rate}) or check the input data")


class ProgressBar(TrainingCallback):
    """A Keras progress bar per epoch and one line of validation results."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.bar = None

    def on_epoch_begin(self, trainer, epoch):
        import keras

        shown = self.verbose and trainer.chief
        if shown:
            print(f"Epoch {epoch}/{trainer.config.epochs}", flush=True)
        self.bar = keras.utils.Progbar(trainer.steps, stateful_metrics=["loss"], verbose=1 if shown else 0)

    def on_step_end(self, trainer, epoch, step, loss):
        self.bar.update(step, values=[("loss", loss)])

    def on_epoch_end(self, trainer, epoch, logs):
        if self.verbose and trainer.chief:
            shown = {k: v for k, v in logs.items() if k.startswith("val_") or k in ("loss", "seconds")}
            print("  " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()), flush=True)


class BatchNormRecompute(TrainingCallback):
    """Re-estimates the BatchNorm moving statistics from the current weights after each epoch's
    training steps ("precise BN", Wu and Johnson 2021, with one large batch).

    One forward pass in training mode over the first ``images`` training images (no
    augmentation) runs with the momentum of every trainable BatchNorm layer set to 0, so the
    moving mean and variance become that batch's statistics under the weights that will be
    validated and saved. The moving averages of a network trained from scratch with a large
    learning rate lag behind its weights, and its inference-mode outputs are then far off
    (Mask R-CNN: validation loss 14.7 with the moving averages, 1.10 after recomputing, 1.0 in
    training mode)."""

    def __init__(self, images: int):
        self.images = int(images)
        self.layers: list = []
        self.forward = None
        self.distributed = None

    def on_build(self, trainer):
        self.layers = batch_norm_layers(trainer.model, trainable_only=True)
        if not self.layers:
            return
        config = trainer.config
        dataset = make_dataset(config.tfrecords, "train", fold=config.fold, batch_size=self.images,
                               image_size=config.image_size, task=trainer.task, training=False, augment=False,
                               cache=False, seed=config.seed).take(1)
        self.distributed = trainer.strategy.experimental_distribute_dataset(dataset)

    def on_train_steps_end(self, trainer, epoch):
        import tensorflow as tf

        if not self.layers:
            return
        strategy, model = trainer.strategy, trainer.model

        def replica_forward(images, targets):
            del targets
            model(images, training=True)

        momenta = [layer.momentum for layer in self.layers]
        for layer in self.layers:
            layer.momentum = 0.0
        try:
            if self.forward is None:  # traced while the momenta are 0, used only while they are
                self.forward = tf.function(lambda batch: strategy.run(replica_forward, args=batch))
            for batch in self.distributed:
                self.forward(batch)
        finally:
            for layer, momentum in zip(self.layers, momenta):
                layer.momentum = momentum


class TensorBoardLogger(TrainingCallback):
    """Scalars of every epoch under RUN_DIR/logs/train and logs/validation (chief only)."""

    def __init__(self):
        self.writers: dict = {}

    def on_train_begin(self, trainer):
        import tensorflow as tf

        if trainer.chief:
            self.writers = {split: tf.summary.create_file_writer(str(trainer.run_dir / runs.LOG_DIR / split))
                            for split in ("train", "validation")}

    def on_epoch_end(self, trainer, epoch, logs):
        import tensorflow as tf

        for split, writer in self.writers.items():
            with writer.as_default(step=epoch):
                for key, value in logs.items():
                    if key != "seconds" and (split == "validation") == key.startswith("val_"):
                        tf.summary.scalar(key.removeprefix("val_"), value)
            writer.flush()


class BestModel(TrainingCallback):
    """best.keras: the model of the epoch with the best monitored value (chief only)."""

    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self.best: float | None = None

    def on_train_begin(self, trainer):
        history = History(trainer.run_dir / runs.HISTORY_FILE, enabled=False)
        history.keep_until(trainer.start_epoch)
        self.best = history.best(trainer.config.monitor, trainer.config.monitor_mode)

    def on_epoch_end(self, trainer, epoch, logs):
        if not trainer.chief:
            return
        monitor, mode = trainer.config.monitor, trainer.config.monitor_mode
        current = logs[monitor]
        improved = self.best is None or (current > self.best if mode == "max" else current < self.best)
        path = trainer.run_dir / runs.BEST_MODEL
        if improved or not path.exists():
            self.best = current if improved else self.best
            save_model_atomic(trainer.model, path)
            if self.verbose:
                print(f"  {monitor} {current:.4f}: saved {runs.BEST_MODEL}", flush=True)


class HistoryCSV(TrainingCallback):
    """history.csv, one row per epoch (chief only; a resumed run keeps its earlier rows)."""

    def __init__(self):
        self.history: History | None = None

    def on_train_begin(self, trainer):
        self.history = History(trainer.run_dir / runs.HISTORY_FILE, enabled=trainer.chief)
        self.history.keep_until(trainer.start_epoch)

    def on_epoch_end(self, trainer, epoch, logs):
        self.history.append({"epoch": epoch, **logs})


class BackupAndResume(TrainingCallback):
    """A checkpoint of model, optimizer and epoch count after every epoch in RUN_DIR/backup/,
    restored when the run starts again (so a killed run resumes after its last finished epoch);
    removed when training completes."""

    def __init__(self):
        self.checkpoint = None
        self.manager = None

    def on_build(self, trainer):
        import tensorflow as tf

        backup_dir = trainer.run_dir / runs.BACKUP_DIR
        self.checkpoint = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer,
                                              epochs_done=trainer.epoch_counter)
        latest = tf.train.latest_checkpoint(str(backup_dir))
        if latest:
            self.checkpoint.read(latest).assert_existing_objects_matched()
        directory = backup_dir if trainer.chief else trainer.run_dir / f".worker-backup-{os.getpid()}"
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(directory), max_to_keep=1)

    def on_epoch_end(self, trainer, epoch, logs):
        trainer.epoch_counter.assign(epoch)
        self.manager.save(checkpoint_number=epoch)

    def on_train_end(self, trainer):
        directory = trainer.run_dir / runs.BACKUP_DIR if trainer.chief else Path(self.manager.directory)
        shutil.rmtree(directory, ignore_errors=True)


class FinalModel(TrainingCallback):
    """final.keras: the model after the last epoch (chief only)."""

    def on_train_end(self, trainer):
        if trainer.chief:
            save_model_atomic(trainer.model, trainer.run_dir / runs.FINAL_MODEL)


class EpochEndFunction(TrainingCallback):
    """Calls ``function(epoch, logs)`` after each epoch's backup is written (tests use it to
    interrupt a run)."""

    def __init__(self, function: Callable[[int, dict[str, float]], None]):
        self.function = function

    def on_epoch_end(self, trainer, epoch, logs):
        self.function(epoch, logs)


def write_run_config(run_dir: Path, mapping: dict[str, Any]) -> None:
    import yaml

    write_text_atomic(run_dir / runs.CONFIG_FILE, yaml.safe_dump(mapping, sort_keys=True))


def default_callbacks(trainer: "Trainer", verbose: bool = True,
                      on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> list[TrainingCallback]:
    """The standard duties, in the order that keeps the run folder consistent."""
    callbacks: list[TrainingCallback] = [NonFiniteLossGuard(), ProgressBar(verbose)]
    if trainer.config.bn_recompute_images > 0:
        callbacks.append(BatchNormRecompute(trainer.config.bn_recompute_images))
    # final.keras is saved before the backup is removed, so a crash in between resumes
    callbacks += [TensorBoardLogger(), BestModel(verbose), HistoryCSV(), FinalModel(), BackupAndResume()]
    if on_epoch_end is not None:
        callbacks.append(EpochEndFunction(on_epoch_end))
    return callbacks

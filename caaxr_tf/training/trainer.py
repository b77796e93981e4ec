"""The generic trainer: one custom loop for every task under every tf.distribute strategy.

One loop (``strategy.run`` inside a ``tf.function``) serves one device, MirroredStrategy and
MultiWorkerMirroredStrategy, so checkpoints, metrics, history and progress are the same code
everywhere (Keras' ``model.fit`` does not work under MultiWorkerMirroredStrategy with Keras 3:
keras-team/keras#20585). What is trained comes from the run's task (its targets, model, loss
and metrics); what happens around the steps comes from callbacks (see ``callbacks``).

    trainer = Trainer(config, run_dir)      # config: a resolved RunConfig
    result = trainer.fit()                  # build() is called by fit() when needed
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from caaxr_tf.config import ConfigError
from caaxr_tf.training.callbacks import BestModel, HistoryCSV, TrainingCallback, default_callbacks
from caaxr_tf.models.precision import PrecisionError, check_precision
from caaxr_tf.training.config import RunConfig, mixed_policy, needs_loss_scaling
from caaxr_tf.training.distribute import is_chief, make_strategy, num_workers
from caaxr_tf.data.pipeline import balanced_repeats, make_dataset
from caaxr_tf.tasks import get_task
from caaxr_tf.tasks.classification import balanced_class_weights

logger = logging.getLogger("caaxr_tf.train")


@dataclass
class TrainResult:
    """The history rows of the whole run, the best monitored value, and a checksum of the
    trainable weights (workers that stayed in sync report the same number)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    checksum: float = 0.0


class Trainer:
    """Builds a run's datasets, model, optimizer and metrics under a strategy, and trains it.

    ``callbacks`` defaults to ``default_callbacks`` (checkpoint/resume, best model, history,
    TensorBoard, BatchNorm re-estimation, the non-finite loss guard, progress).
    """

    def __init__(self, config: RunConfig, run_dir: str | Path, strategy=None, *, verbose: bool = True,
                 callbacks: Sequence[TrainingCallback] | None = None,
                 on_epoch_end: Callable[[int, dict[str, float]], None] | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.strategy = strategy if strategy is not None else make_strategy(config.strategy)
        self.verbose = verbose
        self.chief = is_chief(self.strategy)
        self.task = get_task(config.task).from_config(config)
        self._callbacks = callbacks
        self._on_epoch_end = on_epoch_end
        self.built = False
        self.validation_batches = 0  # of the last validation

    # ------------------------------------------------------------------ building

    def build(self) -> "Trainer":
        """Datasets, model, optimizer, metrics and the distributed steps; restores a backup."""
        import keras
        import tensorflow as tf

        config, strategy = self.config, self.strategy
        keras.utils.set_random_seed(int(config.seed))
        policy = mixed_policy(config.mixed_precision)
        if policy == "mixed_bfloat16":
            try:
                check_precision("bfloat16")
            except PrecisionError:
                raise ConfigError(
                    "mixed_precision: bfloat16 needs a CPU with avx512_bf16 or amx_bf16 (or a GPU of compute "
                    "capability 8.0 or later); this device has neither, and emulated bfloat16 is slower than "
                    "float32. Train with mixed_precision: false") from None
        if policy:
            keras.mixed_precision.set_global_policy(policy)
        self.num_replicas = strategy.num_replicas_in_sync
        self.num_workers = num_workers(strategy)
        self.global_batch = int(config.batch_size)
        if self.global_batch % self.num_replicas:
            raise ConfigError(f"batch size {self.global_batch} is not divisible by the {self.num_replicas} replicas")
        try:
            self._make_datasets()
            with strategy.scope():
                self.model = self.task.build_model(config)
        except (ValueError, FileNotFoundError, RuntimeError, TypeError) as error:
            # missing shards, bad model arguments, weights of another architecture or unreachable
            raise ConfigError(str(error).splitlines()[0] if str(error) else repr(error)) from error
        with strategy.scope():
            self.optimizer = config.optimizer.build(loss_scaling=needs_loss_scaling(config.mixed_precision))
            self.optimizer.build(self.model.trainable_variables)
            self.train_metrics = [] if self.task.owns_loss else self.task.make_metrics()
            self.val_metrics = self.task.make_metrics()
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.val_loss_tracker = keras.metrics.Mean(name="val_loss")
            self.component_trackers = {name: keras.metrics.Mean(name=f"loss_{name}")
                                       for name in (self.task.loss_components if self.task.owns_loss else ())}
            self.epoch_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_done")
        self._check_monitor()
        self.callbacks = list(self._callbacks) if self._callbacks is not None else default_callbacks(
            self, self.verbose, self._on_epoch_end)
        for callback in self.callbacks:
            callback.on_build(self)
        self.start_epoch = int(self.epoch_counter.numpy())
        if self.start_epoch:
            logger.info("resuming %s after epoch %d", self.run_dir, self.start_epoch)
        self.train_step = make_train_step(
            self.task, strategy, self.model, self.optimizer, self.loss_tracker, global_batch=self.global_batch,
            component_trackers=self.component_trackers, train_metrics=self.train_metrics,
            loss_scaling=needs_loss_scaling(config.mixed_precision), jit=config.jit,
            augment_seed=int(config.seed) if augments_in(config, self.task) == "step" else None)
        self.val_step = make_val_step(self)
        self.built = True
        return self

    def _make_datasets(self) -> None:
        data = training_datasets(self.config, self.task, self.global_batch, self.num_workers)
        self.train_dataset, self.steps, self.val_dataset, self.val_steps = data.train, data.steps, data.val, data.val_steps
        self.train_count, self.val_count = data.train_count, data.val_count

    def logged_keys(self) -> list[str]:
        """The values each epoch logs (history.csv columns)."""
        keys = ["loss", *(tracker.name for tracker in self.component_trackers.values())]
        keys += self.task.metric_value_names(self.train_metrics)
        keys += ["val_loss", *self.task.metric_value_names(self.val_metrics, prefix="val_"), "seconds"]
        return keys

    def _check_monitor(self) -> None:
        keys = self.logged_keys()
        if self.config.monitor not in keys:
            raise ConfigError(f"monitor {self.config.monitor!r} is not among the logged values: {', '.join(keys)}")

    # ------------------------------------------------------------------ training

    def fit(self) -> TrainResult:
        """Train epochs ``start_epoch + 1 .. config.epochs``; returns the TrainResult."""
        import tensorflow as tf

        if not self.built:
            self.build()
        config, strategy = self.config, self.strategy
        frozen = sum(1 for layer in self.model.layers if not layer.trainable)
        print(
            f"{config.model} on {config.protocol} fold {config.fold}: {self.train_count} training / {self.val_count} "
            f"validation images, {self.steps} steps of {self.global_batch} per epoch, {self.num_replicas} replica(s) "
            f"({type(strategy).__name__}), weights={config.weights} "
            f"({'backbone frozen' if frozen else 'all layers train'}), epochs {self.start_epoch + 1}..{config.epochs}",
            flush=True,
        )
        self._print_class_balance()
        for callback in self.callbacks:
            callback.on_train_begin(self)
        train_iterator = iter(strategy.experimental_distribute_dataset(self.train_dataset))
        distributed_val = strategy.experimental_distribute_dataset(self.val_dataset)
        history: list[dict[str, Any]] = []
        for epoch in range(self.start_epoch + 1, int(config.epochs) + 1):
            started = time.perf_counter()
            for tracker in [self.loss_tracker, self.val_loss_tracker, *self.component_trackers.values(),
                            *self.train_metrics, *self.val_metrics]:
                tracker.reset_state()
            for callback in self.callbacks:
                callback.on_epoch_begin(self, epoch)
            for step in range(1, self.steps + 1):
                self.train_step(train_iterator)
                running_loss = float(self.loss_tracker.result())
                for callback in self.callbacks:
                    callback.on_step_end(self, epoch, step, running_loss)
            for callback in self.callbacks:
                callback.on_train_steps_end(self, epoch)
            self.validation_batches = self._validate(distributed_val)
            logs = self._epoch_logs(started)
            for callback in self.callbacks:
                callback.on_epoch_end(self, epoch, logs)
            history.append({"epoch": epoch, **logs})
        for callback in self.callbacks:
            callback.on_train_end(self)
        # Trainable weights only: batch-norm moving statistics are each worker's own.
        checksum = float(sum(tf.reduce_sum(tf.abs(tf.cast(v, tf.float64))) for v in self.model.trainable_variables))
        if self.num_workers > 1:
            print(f"weights checksum {checksum:.6f}", flush=True)
        best = next((c.best for c in self.callbacks if isinstance(c, BestModel)), None)
        # the whole run's rows (a resumed run's earlier epochs too) where the history is kept
        rows = next((c.history.rows for c in self.callbacks if isinstance(c, HistoryCSV)), history)
        return TrainResult(history=rows, best=best, checksum=checksum)

    def _validate(self, distributed_val) -> int:
        iterator = iter(distributed_val)
        taken = 0
        while self.val_steps is None or taken < self.val_steps:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            self.val_step(batch)
            taken += 1
        return taken

    def _epoch_logs(self, started: float) -> dict[str, float]:
        logs: dict[str, float] = {"loss": float(self.loss_tracker.result())}
        logs.update({tracker.name: float(tracker.result()) for tracker in self.component_trackers.values()})
        logs.update(self.task.metric_values(self.train_metrics))
        logs["val_loss"] = float(self.val_loss_tracker.result())
        logs.update(self.task.metric_values(self.val_metrics, prefix="val_"))
        logs["seconds"] = round(time.perf_counter() - started, 3)
        return logs

    def _print_class_balance(self) -> None:
        balance = self.config.class_balance
        if balance == "none":
            return
        counts = self.config.training_class_counts()
        factors = balanced_class_weights(counts) if balance == "weights" else balanced_repeats(counts)
        what = "loss weights" if balance == "weights" else "oversampling factors"
        names = self.config.class_names
        print(f"class_balance {balance}: training images per class "
              + ", ".join(f"{n} {c}" for n, c in zip(names, counts)) + f"; {what} "
              + ", ".join(f"{n} {f:.3f}" for n, f in zip(names, factors)), flush=True)


@dataclass
class TrainingData:
    """A run's training and validation datasets and how many steps an epoch takes of each
    (``val_steps`` None: one pass)."""

    train: Any
    steps: int
    val: Any
    val_steps: int | None
    train_count: int
    val_count: int


def training_datasets(config: RunConfig, task, global_batch: int, num_workers: int = 1) -> TrainingData:
    """The training input of a run as the trainer builds it (the benchmark measures it too)."""
    fold_counts = config.summary()["counts"][f"fold{config.fold}"]
    train_count = sum(fold_counts["train"].values())
    val_count = sum(fold_counts["val"].values())
    if train_count == 0:
        raise ConfigError(f"{config.tfrecords}: fold {config.fold} has no training images")
    common = dict(fold=config.fold, batch_size=global_batch, image_size=config.image_size, task=task,
                  seed=config.seed, cache=config.cache)
    class_repeats = None
    pass_size = train_count
    if config.class_balance == "sampling":
        counts = config.training_class_counts()
        class_repeats = balanced_repeats(counts)
        pass_size = round(sum(c * r for c, r in zip(counts, class_repeats)))
    steps = int(config.steps_per_epoch or max(1, pass_size // global_batch))
    train = make_dataset(config.tfrecords, "train", training=True, augment=augments_in(config, task) == "pipeline",
                         repeat=True, drop_remainder=True, shuffle_buffer=config.shuffle_buffer,
                         class_repeats=class_repeats, **common)
    # Several workers must take the same number of validation steps: repeat and count them.
    val_steps = config.validation_steps
    if num_workers > 1 and not val_steps:
        val_steps = max(1, math.ceil(val_count / global_batch))
    val = make_dataset(config.tfrecords, "val", training=False, augment=False, repeat=bool(val_steps), **common)
    return TrainingData(train, steps, val, int(val_steps) if val_steps else None, train_count, val_count)


def augments_in(config: RunConfig, task) -> str | None:
    """Where a run's training batches are augmented: "pipeline", "step" or None (not at all)."""
    if not (config.augment and task.supports_augmentation):
        return None
    return config.augment_in


def make_train_step(task, strategy, model, optimizer, loss_tracker, *, global_batch: int,
                    component_trackers: dict | None = None, train_metrics: Sequence = (),
                    loss_scaling: bool = False, jit: bool = False, augment_seed: int | None = None):
    """The distributed training step: a tf.function that takes one batch from an iterator of
    distributed batches and runs the replica step under ``strategy`` (the benchmark times it
    too). The loss of each replica is its share of the global batch's mean
    (``compute_average_loss`` over ``global_batch``), so every replica count gives the same
    update; ``loss_tracker`` receives the global batch's loss.

    ``augment_seed`` (``augment_in: step``) augments each replica's batch inside the step with
    ``task.augment_in_step``, stateless from (seed, step × replicas + replica): reproducible, a
    resumed run continues the sequence (the step count is the optimizer's, checkpointed), and
    no two replicas draw the same transforms."""
    import tensorflow as tf

    component_trackers = component_trackers or {}
    num_replicas = strategy.num_replicas_in_sync

    def replica_train_step(images, targets):
        with tf.GradientTape() as tape:
            if task.owns_loss:
                losses = model.compute_losses(images, targets, training=True)
                loss = losses["loss"] / num_replicas
                outputs = None
            else:
                outputs = model(images, training=True)
                losses = {}
                loss = tf.nn.compute_average_loss(task.per_example_loss(targets, outputs),
                                                  global_batch_size=global_batch)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss) if loss_scaling else loss
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        loss_tracker.update_state(loss * num_replicas)
        for key, tracker in component_trackers.items():
            if key in losses:
                tracker.update_state(losses[key])
        if train_metrics:
            truth, predictions = task.metric_inputs(targets, outputs)
            for metric in train_metrics:
                metric.update_state(truth, predictions)

    # XLA compiles the replica step; reading the iterator cannot be compiled.
    replica_step = tf.function(replica_train_step, jit_compile=True) if jit else replica_train_step
    if augment_seed is not None:
        compiled_step = replica_step

        def replica_step(images, targets):  # the augmentation stays outside an XLA cluster
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            step = tf.cast(tf.convert_to_tensor(optimizer.iterations), tf.int64)
            seed = tf.stack([tf.constant(augment_seed, tf.int64), step * num_replicas + tf.cast(replica, tf.int64)])
            images, targets = task.augment_in_step(images, targets, seed)
            compiled_step(images, targets)

    @tf.function(reduce_retracing=True)
    def train_step(iterator):
        images, targets = next(iterator)
        strategy.run(replica_step, args=(images, targets))

    return train_step


def make_val_step(trainer: Trainer):
    """The distributed validation step: loss and metrics of one batch of distributed batches."""
    import tensorflow as tf

    task, model = trainer.task, trainer.model

    def replica_val_step(images, targets):
        outputs = model(images, training=False)
        if task.owns_loss:
            loss = model.compute_losses(images, targets, training=False)["loss"]
        else:
            loss = tf.reduce_mean(task.per_example_loss(targets, outputs))
        trainer.val_loss_tracker.update_state(loss)
        truth, predictions = task.metric_inputs(targets, outputs)
        for metric in trainer.val_metrics:
            metric.update_state(truth, predictions)

    @tf.function(reduce_retracing=True)
    def val_step(batch):
        trainer.strategy.run(replica_val_step, args=batch)

    return val_step

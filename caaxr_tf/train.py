"""Training on one protocol and fold, under any tf.distribute strategy.

    python -m caaxr_tf.train --protocol 3class --model mobilenetv2 --fold 1 \
        --tfrecords TFRECORDS --out runs/3class-mobilenetv2-f1

One custom training loop (``strategy.run`` inside a ``tf.function``) serves every strategy —
one device, MirroredStrategy and MultiWorkerMirroredStrategy — so checkpoints, metrics,
history and progress are the same code everywhere. (``model.fit`` does not work under
MultiWorkerMirroredStrategy with Keras 3: keras-team/keras#20585.)

The run folder (docs/run_dir.md) gets the resolved config, history.csv, TensorBoard logs,
best.keras (by the monitored validation metric), final.keras, and a checkpoint after every
epoch in backup/: started again with the same arguments, a killed run resumes after its last
finished epoch.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import yaml  # noqa: E402

from caaxr_tf import runs  # noqa: E402
from caaxr_tf.config import CONFIG_DIR, apply_overrides, deep_merge, load_yaml  # noqa: E402

logger = logging.getLogger("caaxr_tf.train")

PROTOCOLS = ("seg", "2class", "3class", "4class")
STRATEGIES = ("auto", "one", "mirrored", "multiworker")
CLASS_BALANCE = ("none", "weights", "sampling")
# Keys whose change does not make a run folder "another run" (a finished run can be extended).
RESUMABLE_KEYS = {"epochs", "strategy", "tfrecords"}


class ConfigError(ValueError):
    """A problem with the arguments, found before any training starts."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops before the epoch is saved."""


# --- configuration -----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS)
    parser.add_argument("--model", required=True, help="registry name, e.g. unet, segnet, maskrcnn, mobilenetv2")
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--tfrecords", required=True, help="folder with one sub-folder per protocol (or the protocol folder)")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--config", help="YAML file merged over configs/train.yaml")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument("--validation-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--weights", help="none | imagenet | PATH")
    parser.add_argument("--strategy", choices=STRATEGIES)
    parser.add_argument("--mixed-precision", action="store_true", default=None)
    parser.add_argument("--jit", action="store_true", default=None, help="XLA-compile the training step")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--class-balance", choices=CLASS_BALANCE,
                        help="classifiers: none (default, the paper) | weights (class-weighted loss) | sampling (oversampling)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any resolved key, e.g. --set model_kwargs.base_filters=16")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def locate_protocol_dir(tfrecords: str | Path, protocol: str) -> Path:
    """``--tfrecords`` may name the folder of all protocols or the protocol folder itself."""
    from caaxr_tf.data.tfrecords import read_summary_file

    root = Path(tfrecords)
    for candidate in (root / protocol, root):
        summary_path = candidate / "summary.json"
        if summary_path.exists():
            try:
                summary = read_summary_file(summary_path)
            except (OSError, ValueError) as error:
                raise ConfigError(str(error)) from None
            if summary.get("protocol") != protocol:
                raise ConfigError(
                    f"{candidate} holds the TFRecords of protocol {summary.get('protocol')!r}, not {protocol!r}"
                )
            return candidate.resolve()
    raise ConfigError(f"no TFRecords for protocol {protocol!r} under {root} (expected {root / protocol}/summary.json)")


LAYERED_SECTIONS = ("defaults", "segmentation", "classification", "models")


def layered_config(base: Mapping[str, Any], extra: Mapping[str, Any], task: str, model: str) -> dict[str, Any]:
    """Merge train.yaml (``base``) with a --config file (``extra``).

    ``extra`` may hold flat keys, train.yaml's layered sections, or both. Section by section,
    the file wins over train.yaml, and more specific sections win over general ones:
    defaults < the task's section < ``models.<model>`` < the file's flat keys. So one file can
    carry settings for several models (``caaxr_tf.cv --config`` gives every model the same
    file) without a task-wide key overriding a model's own setting in train.yaml.
    """
    extra = dict(extra)
    layers = {name: extra.pop(name) for name in LAYERED_SECTIONS if name in extra}
    config: dict[str, Any] = {}
    for section in ("defaults", task):
        config = deep_merge(config, base.get(section) or {})
        config = deep_merge(config, layers.get(section) or {})
    config = deep_merge(config, (base.get("models") or {}).get(model) or {})
    config = deep_merge(config, (layers.get("models") or {}).get(model) or {})
    return deep_merge(config, extra)


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Merge configs/train.yaml, --config, flags and --set into one flat run config."""
    from caaxr_tf.data.tfrecords import read_summary_file
    from caaxr_tf.models import model_task

    protocol_dir = locate_protocol_dir(args.tfrecords, args.protocol)
    summary = read_summary_file(protocol_dir / "summary.json")
    task = summary["task"]
    try:
        expected_task = model_task(args.model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if expected_task != task:
        raise ConfigError(f"model {args.model!r} is a {expected_task} model but protocol {args.protocol!r} is {task}")
    if not 1 <= args.fold <= int(summary["folds"]):
        raise ConfigError(f"fold {args.fold} does not exist: {protocol_dir} has folds 1..{summary['folds']}")

    base = load_yaml(CONFIG_DIR / "train.yaml")
    try:
        extra = load_yaml(args.config) if args.config else {}
    except (OSError, ValueError) as error:
        raise ConfigError(f"--config: {error}") from None
    config = layered_config(base, extra, task, args.model)
    flags = {
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "validation_steps": args.validation_steps,
        "batch_size": args.batch_size,
        "weights": args.weights,
        "strategy": args.strategy,
        "mixed_precision": args.mixed_precision,
        "jit": args.jit,
        "seed": args.seed,
        "class_balance": args.class_balance,
    }
    config.update({k: v for k, v in flags.items() if v is not None})
    if args.lr is not None:
        config["optimizer"] = {**config["optimizer"], "learning_rate": args.lr}
    config.update(
        protocol=args.protocol,
        task=task,
        model=args.model,
        fold=args.fold,
        tfrecords=str(protocol_dir),
        class_names=list(summary["classes"]),
    )
    try:
        config = apply_overrides(config, args.overrides)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_numbers(config)
    balance = str(config.get("class_balance", "none"))
    if balance not in CLASS_BALANCE:
        raise ConfigError(f"unknown class_balance {balance!r}; expected one of {', '.join(CLASS_BALANCE)}")
    if balance != "none" and task != "classification":
        raise ConfigError(f"class_balance {balance!r} applies to classifiers; protocol {args.protocol!r} is {task}")
    if config["strategy"] not in STRATEGIES:
        raise ConfigError(f"unknown strategy {config['strategy']!r}; expected one of {', '.join(STRATEGIES)}")
    weights = str(config["weights"])
    if weights not in ("none", "imagenet") and not Path(weights).exists():
        raise ConfigError(f"weights file not found: {weights}")
    return dict(sorted(config.items()))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_numbers(config: Mapping[str, Any]) -> None:
    """Raise ConfigError for a numeric setting that would train nothing or nonsense
    (``--steps-per-epoch -3``, ``--lr nan``, ``--batch-size 0``, ``--set optimizer=5``...)."""
    at_least = {"epochs": 1, "batch_size": 1, "image_size": 1, "shuffle_buffer": 1}
    optional_at_least = {"steps_per_epoch": 1, "validation_steps": 1, "bn_recompute_images": 0}
    for key, low in {**at_least, **optional_at_least}.items():
        value = config.get(key)
        if value is None and (key in optional_at_least or key not in config):
            continue
        if not _is_int(value) or value < low:
            raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
    if not _is_int(config.get("seed", 0)):
        raise ConfigError(f"seed must be an integer, got {config.get('seed')!r}")
    optimizer = config.get("optimizer")
    if not isinstance(optimizer, Mapping) or not isinstance(optimizer.get("name"), str):
        raise ConfigError(f"optimizer must be a mapping with a name (adam or sgd), got {optimizer!r}")
    rate = optimizer.get("learning_rate")
    if not _is_number(rate) or not math.isfinite(rate) or rate <= 0:
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(rate, str) else ""
        raise ConfigError(f"learning rate must be a finite number > 0, got {rate!r}{hint}")
    for key, value in optimizer.items():
        if key not in ("name", "learning_rate") and _is_number(value) and not math.isfinite(value):
            raise ConfigError(f"optimizer.{key} must be finite, got {value!r}")


# --- distribution ------------------------------------------------------------------------


def cluster_size() -> int:
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}").get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def make_strategy(name: str):
    """``auto``: MultiWorkerMirroredStrategy when TF_CONFIG names several workers,
    MirroredStrategy with several GPUs, else one device."""
    import tensorflow as tf

    if name == "auto":
        if cluster_size() > 1:
            name = "multiworker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one"
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
    return tf.distribute.OneDeviceStrategy(device)


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


# --- pieces of the loop ------------------------------------------------------------------


def make_optimizer(config: dict[str, Any]):
    import keras

    settings = dict(config["optimizer"])
    name = settings.pop("name").lower()
    if name == "adam":
        optimizer = keras.optimizers.Adam(**settings)
    elif name == "sgd":
        optimizer = keras.optimizers.SGD(**settings)
    else:
        raise ConfigError(f"unknown optimizer {name!r} (adam or sgd)")
    if config["mixed_precision"]:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def covid_index(class_names: Sequence[str]) -> int:
    return list(class_names).index("covid") if "covid" in class_names else 0


def make_metrics(config: dict[str, Any]) -> list:
    """Stateful metrics updated inside the replica step."""
    import keras

    from caaxr_tf import metrics

    if config["task"] == "segmentation":
        return [metrics.Dice(name="dice"), metrics.IoU(name="iou")]
    names = config["class_names"]
    covid = covid_index(names)
    return [
        keras.metrics.CategoricalAccuracy(name="accuracy"),
        metrics.ClasswiseAUC(len(names), class_names=names, name="auc"),
        metrics.SensitivityAtSpecificity(0.99, class_id=covid, name="sens_at_99_spec"),
        metrics.SensitivityAtSpecificity(0.90, class_id=covid, name="sens_at_90_spec"),
    ]


def metric_values(metric_list: list, class_names: Sequence[str], prefix: str = "") -> dict[str, float]:
    values: dict[str, float] = {}
    for metric in metric_list:
        result = metric.result()
        array = result.numpy() if hasattr(result, "numpy") else result
        if getattr(array, "ndim", 0) == 1:  # class-wise AUC
            for name, value in zip(class_names, array.tolist()):
                values[f"{prefix}{metric.name}_{name}"] = float(value)
            values[f"{prefix}{metric.name}_mean"] = float(sum(array.tolist()) / max(1, len(array)))
        else:
            values[f"{prefix}{metric.name}"] = float(array)
    return values


def training_class_counts(config: dict[str, Any]) -> list[int]:
    """Images per class (in ``class_names`` order) in the training split of the run's fold."""
    from caaxr_tf.data.pipeline import read_summary

    counts = read_summary(config["tfrecords"])["counts"][f"fold{config['fold']}"]["train"]
    return [int(counts.get(name, 0)) for name in config["class_names"]]


def balanced_class_weights(class_counts: Sequence[int]) -> list[float]:
    """Loss weight ``N / (C * n_c)`` per class (scikit-learn's "balanced"); 0 for an absent class.

    Every class then contributes the same total weight, and the weights average to 1 over the
    training images, so the loss keeps its scale."""
    present = [count for count in class_counts if count > 0]
    total = sum(present)
    return [total / (len(present) * count) if count > 0 else 0.0 for count in class_counts]


def per_example_loss(config: dict[str, Any], targets, predictions, class_weights=None):
    """One loss value per image; ``class_weights`` [C] scales each image's loss by the weight
    of its (one-hot) class."""
    import keras
    import tensorflow as tf

    predictions = tf.cast(predictions, tf.float32)
    if config["loss"] in ("binary_crossentropy", "bce_dice"):
        loss = tf.reduce_mean(keras.losses.binary_crossentropy(targets, predictions), axis=[1, 2])
        if config["loss"] == "bce_dice":
            # soft Dice per image: helps when lesions cover a few percent of the image
            overlap = tf.reduce_sum(targets * predictions, axis=[1, 2, 3])
            total = tf.reduce_sum(targets + predictions, axis=[1, 2, 3])
            loss += 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)
        return loss
    if config["loss"] == "categorical_crossentropy":
        loss = keras.losses.categorical_crossentropy(targets, predictions)
        if class_weights is not None:
            loss *= tf.reduce_sum(tf.cast(targets, tf.float32) * class_weights, axis=-1)
        return loss
    raise ConfigError(f"unknown loss {config['loss']!r}")


def make_datasets(config: dict[str, Any], global_batch: int, num_workers: int):
    """Training and validation datasets, with the number of steps each epoch takes."""
    from caaxr_tf.data.pipeline import balanced_repeats, make_dataset, read_summary

    summary = read_summary(config["tfrecords"])
    fold_counts = summary["counts"][f"fold{config['fold']}"]
    train_count = sum(fold_counts["train"].values())
    val_count = sum(fold_counts["val"].values())
    if train_count == 0:
        raise ConfigError(f"{config['tfrecords']}: fold {config['fold']} has no training images")
    task = "detection" if config["loss"] == "model" else None
    common = dict(fold=config["fold"], batch_size=global_batch, image_size=config["image_size"], task=task,
                  seed=config["seed"], cache=config["cache"])
    class_repeats = None
    pass_size = train_count
    if config.get("class_balance", "none") == "sampling":
        counts = training_class_counts(config)
        class_repeats = balanced_repeats(counts)
        pass_size = round(sum(c * r for c, r in zip(counts, class_repeats)))
    steps = config["steps_per_epoch"] or max(1, pass_size // global_batch)
    train = make_dataset(config["tfrecords"], "train", training=True, augment=bool(config["augment"]) and task is None,
                         repeat=True, drop_remainder=True, shuffle_buffer=config["shuffle_buffer"],
                         class_repeats=class_repeats, **common)
    # Several workers must take the same number of validation steps: repeat and count them.
    val_steps = config["validation_steps"]
    if num_workers > 1 and not val_steps:
        val_steps = max(1, math.ceil(val_count / global_batch))
    val = make_dataset(config["tfrecords"], "val", training=False, augment=False, repeat=bool(val_steps), **common)
    return train, int(steps), val, (int(val_steps) if val_steps else None), train_count, val_count


# Loss components a model that computes its own losses (Mask R-CNN) reports.
LOSS_COMPONENTS = ("rpn_objectness", "rpn_box", "head_class", "head_box", "mask")


def make_component_trackers(owns_loss: bool) -> dict:
    import keras

    return {key: keras.metrics.Mean(name=f"loss_{key}") for key in LOSS_COMPONENTS} if owns_loss else {}


def make_train_step(config: dict[str, Any], strategy, model, optimizer, loss_tracker, component_trackers: dict,
                    train_metrics: list):
    """The distributed training step: a tf.function that takes one batch from an iterator of
    distributed batches and runs the replica step under ``strategy`` (the benchmark times it too)."""
    import tensorflow as tf

    owns_loss = config["loss"] == "model"
    num_replicas = strategy.num_replicas_in_sync
    global_batch = int(config["batch_size"])
    class_weights = None
    if config.get("class_balance", "none") == "weights":
        class_weights = tf.constant(balanced_class_weights(training_class_counts(config)), tf.float32)

    def replica_train_step(images, targets):
        with tf.GradientTape() as tape:
            if owns_loss:
                losses = model.compute_losses(images, targets, training=True)
                loss = losses["loss"] / num_replicas
                predictions = None
            else:
                predictions = model(images, training=True)
                losses = {}
                loss = tf.nn.compute_average_loss(per_example_loss(config, targets, predictions, class_weights),
                                                  global_batch_size=global_batch)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss) if config["mixed_precision"] else loss
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        loss_tracker.update_state(loss * num_replicas)
        for key, tracker in component_trackers.items():
            if key in losses:
                tracker.update_state(losses[key])
        for metric in train_metrics:
            metric.update_state(targets, tf.cast(predictions, tf.float32))

    # XLA compiles the replica step; reading the iterator cannot be compiled.
    replica_step = tf.function(replica_train_step, jit_compile=True) if config["jit"] else replica_train_step

    @tf.function(reduce_retracing=True)
    def train_step(iterator):
        images, targets = next(iterator)
        strategy.run(replica_step, args=(images, targets))

    return train_step


class History:
    """history.csv: one row per finished epoch, rewritten whole so it is never half a row."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            with open(path, newline="", encoding="utf-8") as handle:
                self.rows = [{k: float(v) if k != "epoch" else int(v) for k, v in row.items()} for row in csv.DictReader(handle)]

    def keep_until(self, epoch: int) -> None:
        self.rows = [row for row in self.rows if row["epoch"] <= epoch]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        temporary = self.path.with_suffix(".csv.tmp")
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(temporary, self.path)

    def best(self, monitor: str, mode: str) -> float | None:
        values = [row[monitor] for row in self.rows if monitor in row and not math.isnan(row[monitor])]
        if not values:
            return None
        return max(values) if mode == "max" else min(values)


def diverged_message(what: str, value: float, epoch: int, step: int | None, config: Mapping[str, Any],
                     run_dir: Path) -> str:
    """The error when the loss stops being finite: where, what was (not) saved, what to try."""
    where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
    best = run_dir / runs.BEST_MODEL
    kept = f"{best} keeps an earlier epoch" if best.exists() else f"no {runs.BEST_MODEL} was saved"
    rate = (config.get("optimizer") or {}).get("learning_rate")
    return (f"{what} is {value} at {where}: training stopped before saving this epoch ({kept}); "
            f"try a lower learning rate (now {rate}) or check the input data")


def save_model_atomic(model, path: Path) -> None:
    temporary = path.with_name(path.stem + ".tmp.keras")
    model.save(temporary)
    os.replace(temporary, path)


# --- the loop ----------------------------------------------------------------------------


def make_bn_recompute(config: dict[str, Any], strategy, model) -> Callable[[], None] | None:
    """A function that re-estimates the BatchNorm moving statistics from the current weights.

    With ``bn_recompute_images: N`` (> 0), after each epoch's training steps one forward pass
    in training mode over the first N training images (no augmentation) runs with the
    momentum of every trainable BatchNorm layer set to 0, so the moving mean and variance
    become that batch's statistics under the weights that will be validated and saved. The
    moving averages of a network trained from scratch with a large learning rate lag behind
    its weights, and its inference-mode outputs are then far off (Mask R-CNN: validation loss
    14.7 with the moving averages, 1.10 after recomputing, 1.0 in training mode). This is
    "precise BN" (Wu and Johnson, 2021) with a single large batch. Returns None when off.
    """
    import tensorflow as tf

    from caaxr_tf.data.pipeline import make_dataset
    from caaxr_tf.models.layers import batch_norm_layers

    count = int(config.get("bn_recompute_images") or 0)
    layers = batch_norm_layers(model, trainable_only=True)
    if count <= 0 or not layers:
        return None
    task = "detection" if config["loss"] == "model" else None
    dataset = make_dataset(config["tfrecords"], "train", fold=config["fold"], batch_size=count,
                           image_size=config["image_size"], task=task, training=False, augment=False,
                           cache=False, seed=config["seed"]).take(1)
    distributed = strategy.experimental_distribute_dataset(dataset)

    def replica_forward(images, targets):
        del targets
        model(images, training=True)

    forward = None

    def recompute() -> None:
        nonlocal forward
        momenta = [layer.momentum for layer in layers]
        for layer in layers:
            layer.momentum = 0.0
        try:
            if forward is None:  # traced while the momenta are 0, used only while they are
                forward = tf.function(lambda batch: strategy.run(replica_forward, args=batch))
            for batch in distributed:
                forward(batch)
        finally:
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum

    return recompute


def train(
    config: dict[str, Any],
    run_dir: Path,
    strategy,
    *,
    verbose: bool = True,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train with ``config`` (as resolved by ``resolve_config``) into ``run_dir``.

    Returns the final history rows. ``on_epoch_end(epoch, logs)`` runs after each epoch's
    checkpoint is written (tests use it to interrupt a run).

    Raises ``NonFiniteLossError`` when the training or validation loss stops being finite
    (that epoch is neither checkpointed nor saved as best), and ``tf.errors.DataLossError``
    naming the shard when a shard of the fold is damaged.
    """
    from caaxr_tf.data.pipeline import shard_files
    from caaxr_tf.data.shards import naming_corrupt_shards

    try:
        files = [f for split in ("train", "val") for f in shard_files(config["tfrecords"], split, config["fold"])]
    except (FileNotFoundError, ValueError) as error:  # a missing shard or fold
        raise ConfigError(str(error)) from error
    with naming_corrupt_shards(files):
        return _train(config, run_dir, strategy, verbose=verbose, on_epoch_end=on_epoch_end)


def _train(
    config: dict[str, Any],
    run_dir: Path,
    strategy,
    *,
    verbose: bool = True,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    from caaxr_tf.data.pipeline import balanced_repeats
    from caaxr_tf.models import build_model

    chief = is_chief(strategy)
    keras.utils.set_random_seed(int(config["seed"]))
    if config["mixed_precision"]:
        keras.mixed_precision.set_global_policy("mixed_float16")
    num_replicas = strategy.num_replicas_in_sync
    num_workers = max(1, cluster_size()) if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else 1
    global_batch = int(config["batch_size"])
    if global_batch % num_replicas:
        raise ConfigError(f"batch size {global_batch} is not divisible by the {num_replicas} replicas")

    owns_loss = config["loss"] == "model"
    try:
        train_ds, steps, val_ds, val_steps, train_count, val_count = make_datasets(config, global_batch, num_workers)
        with strategy.scope():
            num_classes = len(config["class_names"]) if config["task"] == "classification" else None
            model = build_model(config["model"], num_classes=num_classes, weights=config["weights"],
                                input_shape=(config["image_size"], config["image_size"], 1), **config["model_kwargs"])
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as error:
        # missing shards, bad model arguments, weights of another architecture or unreachable
        raise ConfigError(str(error).splitlines()[0] if str(error) else repr(error)) from error
    with strategy.scope():
        optimizer = make_optimizer(config)
        optimizer.build(model.trainable_variables)
        train_metrics = make_metrics(config) if not owns_loss else []
        val_metrics = make_metrics(config)
        loss_tracker = keras.metrics.Mean(name="loss")
        val_loss_tracker = keras.metrics.Mean(name="val_loss")
        component_trackers = make_component_trackers(owns_loss)
        epoch_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_done")

    backup_dir = run_dir / runs.BACKUP_DIR
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epochs_done=epoch_counter)
    latest = tf.train.latest_checkpoint(str(backup_dir))
    if latest:
        checkpoint.read(latest).expect_partial()
        logger.info("resuming %s after epoch %d", run_dir, int(epoch_counter.numpy()))
    start_epoch = int(epoch_counter.numpy())

    frozen = sum(1 for layer in model.layers if not layer.trainable)
    print(
        f"{config['model']} on {config['protocol']} fold {config['fold']}: {train_count} training / {val_count} "
        f"validation images, {steps} steps of {global_batch} per epoch, {num_replicas} replica(s) "
        f"({type(strategy).__name__}), weights={config['weights']} "
        f"({'backbone frozen' if frozen else 'all layers train'}), epochs {start_epoch + 1}..{config['epochs']}",
        flush=True,
    )
    balance = config.get("class_balance", "none")
    if balance != "none":
        counts = training_class_counts(config)
        factors = balanced_class_weights(counts) if balance == "weights" else balanced_repeats(counts)
        what = "loss weights" if balance == "weights" else "oversampling factors"
        print(f"class_balance {balance}: training images per class "
              + ", ".join(f"{n} {c}" for n, c in zip(config["class_names"], counts)) + f"; {what} "
              + ", ".join(f"{n} {f:.3f}" for n, f in zip(config["class_names"], factors)), flush=True)

    def replica_val_step(images, targets):
        outputs = model(images, training=False)
        if owns_loss:
            loss = model.compute_losses(images, targets, training=False)["loss"]
            predictions, truth = outputs["mask"], targets["mask"]
        else:
            predictions = outputs["mask"] if isinstance(outputs, dict) else outputs
            loss = tf.reduce_mean(per_example_loss(config, targets, predictions))
            truth = targets
        val_loss_tracker.update_state(loss)
        for metric in val_metrics:
            metric.update_state(truth, tf.cast(predictions, tf.float32))

    train_step = make_train_step(config, strategy, model, optimizer, loss_tracker, component_trackers, train_metrics)
    recompute_bn = make_bn_recompute(config, strategy, model)

    @tf.function(reduce_retracing=True)
    def val_step(batch):
        strategy.run(replica_val_step, args=batch)

    history = History(run_dir / runs.HISTORY_FILE, enabled=chief)
    history.keep_until(start_epoch)
    monitor, mode = config["monitor"], config.get("monitor_mode", "max")
    best = history.best(monitor, mode)
    writers = {}
    if chief:
        writers = {
            "train": tf.summary.create_file_writer(str(run_dir / runs.LOG_DIR / "train")),
            "validation": tf.summary.create_file_writer(str(run_dir / runs.LOG_DIR / "validation")),
        }
    manager = tf.train.CheckpointManager(checkpoint, str(backup_dir if chief else run_dir / f".worker-backup-{os.getpid()}"),
                                         max_to_keep=1)

    train_iterator = iter(strategy.experimental_distribute_dataset(train_ds))
    distributed_val = strategy.experimental_distribute_dataset(val_ds)
    for epoch in range(start_epoch + 1, int(config["epochs"]) + 1):
        started = time.perf_counter()
        for tracker in [loss_tracker, val_loss_tracker, *component_trackers.values(), *train_metrics, *val_metrics]:
            tracker.reset_state()
        progress = keras.utils.Progbar(steps, stateful_metrics=["loss"], verbose=1 if verbose and chief else 0)
        if verbose and chief:
            print(f"Epoch {epoch}/{config['epochs']}", flush=True)
        for step in range(steps):
            train_step(train_iterator)
            running_loss = float(loss_tracker.result())
            if not math.isfinite(running_loss):
                raise NonFiniteLossError(diverged_message("training loss", running_loss, epoch, step + 1, config, run_dir))
            progress.update(step + 1, values=[("loss", running_loss)])
        if recompute_bn is not None:
            recompute_bn()
        val_iterator = iter(distributed_val)
        taken = 0
        while val_steps is None or taken < val_steps:
            try:
                batch = next(val_iterator)
            except StopIteration:
                break
            val_step(batch)
            taken += 1

        logs: dict[str, float] = {"loss": float(loss_tracker.result())}
        logs.update({tracker.name: float(tracker.result()) for tracker in component_trackers.values()})
        logs.update(metric_values(train_metrics, config["class_names"]))
        logs["val_loss"] = float(val_loss_tracker.result())
        if taken and not math.isfinite(logs["val_loss"]):
            raise NonFiniteLossError(diverged_message("validation loss", logs["val_loss"], epoch, None, config, run_dir))
        logs.update(metric_values(val_metrics, config["class_names"], prefix="val_"))
        logs["seconds"] = round(time.perf_counter() - started, 3)
        if verbose and chief:
            shown = {k: v for k, v in logs.items() if k.startswith("val_") or k in ("loss", "seconds")}
            print("  " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()), flush=True)

        if chief:
            for split, writer in writers.items():
                with writer.as_default(step=epoch):
                    for key, value in logs.items():
                        if key == "seconds":
                            continue
                        if (split == "validation") == key.startswith("val_"):
                            tf.summary.scalar(key.removeprefix("val_"), value)
                writer.flush()
            current = logs.get(monitor)
            if current is None:
                raise ConfigError(f"monitor {monitor!r} is not among the logged values: {', '.join(logs)}")
            improved = best is None or (current > best if mode == "max" else current < best)
            if improved or not (run_dir / runs.BEST_MODEL).exists():
                best = current if improved else best
                save_model_atomic(model, run_dir / runs.BEST_MODEL)
                if verbose:
                    print(f"  {monitor} {current:.4f}: saved {runs.BEST_MODEL}", flush=True)
            history.append({"epoch": epoch, **logs})
        epoch_counter.assign(epoch)
        manager.save(checkpoint_number=epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch, logs)

    # Printed by every worker: workers that stayed in sync print the same number. Trainable
    # weights only: batch-norm moving statistics are each worker's own (no synchronised BN).
    checksum = float(sum(tf.reduce_sum(tf.abs(tf.cast(v, tf.float64))) for v in model.trainable_variables))
    if num_workers > 1:
        print(f"weights checksum {checksum:.6f}", flush=True)
    if chief:
        save_model_atomic(model, run_dir / runs.FINAL_MODEL)
        shutil.rmtree(backup_dir, ignore_errors=True)
    else:
        shutil.rmtree(manager.directory, ignore_errors=True)
    return {"history": history.rows, "best": best, "checksum": checksum}


def prepare_run_dir(run_dir: Path, config: dict[str, Any], chief: bool) -> bool:
    """Write config.yaml; refuse a folder that holds another run. Returns True when the run
    is already complete."""
    config_path = run_dir / runs.CONFIG_FILE
    if config_path.exists():
        previous = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        differing = sorted(k for k in set(previous) | set(config) if k not in RESUMABLE_KEYS and previous.get(k) != config.get(k))
        if differing:
            raise ConfigError(
                f"{run_dir} holds a run with other settings ({', '.join(differing)}); use another --out or delete it"
            )
        history = History(run_dir / runs.HISTORY_FILE, enabled=False)
        done = (run_dir / runs.FINAL_MODEL).exists() and history.rows and history.rows[-1]["epoch"] >= int(config["epochs"])
        if done:
            return True
    if chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        temporary = config_path.with_suffix(".yaml.tmp")
        temporary.write_text(yaml.safe_dump(config, sort_keys=True), encoding="utf-8")
        os.replace(temporary, config_path)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import tensorflow as tf

    try:
        run_dir = Path(args.out)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--out {run_dir} exists and is not a folder")
        config = resolve_config(args)
        strategy = make_strategy(config["strategy"])
        if prepare_run_dir(run_dir, config, is_chief(strategy)):
            print(f"{run_dir}: already trained for {config['epochs']} epochs; nothing to do")
            return 0
        result = train(config, run_dir, strategy, verbose=not args.quiet)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, tf.errors.DataLossError) as error:
        print(f"error: {getattr(error, 'message', None) or error}", file=sys.stderr)
        return 1
    best = result["best"]
    print(f"done: {run_dir} (best {config['monitor']} {best:.4f})" if best is not None else f"done: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training on one protocol and fold, under any tf.distribute strategy.

    python -m caaxr_tf.train --protocol 3class --model mobilenetv2 --fold 1 \
        --tfrecords TFRECORDS --out runs/3class-mobilenetv2-f1

The command parses its arguments and hands over: the configuration is resolved and checked by
``caaxr_tf.training.config`` (caaxr_tf/configs/train.yaml, ``--config``, flags, ``--set``), the run's task
comes from the task registry, and ``caaxr_tf.training.Trainer`` trains it (one custom loop for
one device, MirroredStrategy and MultiWorkerMirroredStrategy).

The run folder (docs/run_dir.md) gets the resolved config, history.csv, TensorBoard logs,
best.keras (by the monitored validation metric), final.keras, and a checkpoint after every
epoch in backup/: started again with the same arguments, a killed run resumes after its last
finished epoch.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from caaxr_tf.logs import quiet_tensorflow_logs

quiet_tensorflow_logs()

import yaml  # noqa: E402

from caaxr_tf import runs  # noqa: E402
from caaxr_tf.config import ConfigError  # noqa: E402
from caaxr_tf.training.callbacks import History, NonFiniteLossError, write_run_config  # noqa: E402
from caaxr_tf.training.config import (  # noqa: E402
    CLASS_BALANCE,
    RECORDS_KEYS,
    RESUMABLE_KEYS,
    STRATEGIES,
    RunConfig,
    locate_protocol_dir,
    records_difference,
    resolve_run_config,
)
from caaxr_tf.training.distribute import is_chief, make_strategy  # noqa: E402
from caaxr_tf.training.trainer import Trainer, TrainResult  # noqa: E402
from caaxr_tf.data.protocols import available_protocols  # noqa: E402
from caaxr_tf.data.schema import shard_files  # noqa: E402
from caaxr_tf.data.shards import naming_corrupt_shards  # noqa: E402

__all__ = ["ConfigError", "NonFiniteLossError", "locate_protocol_dir", "main", "make_strategy", "parse_args",
           "prepare_run_dir", "resolve_config", "run_training", "train"]

# --------------------------------------------------------------------------- arguments

def _mixed_precision_flag(value: str) -> str:
    if value not in ("float16", "bfloat16"):
        raise argparse.ArgumentTypeError(f"expected float16 or bfloat16 (or the flag alone for float16), got {value!r}")
    return value


# Training flags shared with caaxr_tf.cv: (flag, argparse options, RunConfig key).
TRAINING_FLAGS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("--config", dict(help="YAML file merged over caaxr_tf/configs/train.yaml (flat keys or its sections)"), ""),
    ("--epochs", dict(type=int), "epochs"),
    ("--steps-per-epoch", dict(type=int), "steps_per_epoch"),
    ("--validation-steps", dict(type=int), "validation_steps"),
    ("--batch-size", dict(type=int), "batch_size"),
    ("--lr", dict(type=float, help="learning rate"), "learning_rate"),
    ("--weights", dict(help="none | imagenet | PATH"), "weights"),
    ("--strategy", dict(choices=STRATEGIES), "strategy"),
    ("--mixed-precision", dict(nargs="?", const=True, default=None, type=_mixed_precision_flag,
                               metavar="float16|bfloat16",
                               help="train under Keras' mixed policy, float32 variables (alone: float16; bfloat16 "
                                    "on CPUs with avx512_bf16/amx_bf16 or GPUs)"), "mixed_precision"),
    ("--jit", dict(action="store_true", default=None, help="XLA-compile the training step"), "jit"),
    ("--augment-in", dict(choices=("pipeline", "step"), help="where the training augmentation runs: the tf.data "
                                                            "pipeline (default) or the training step (on the "
                                                            "accelerator, when there is one)"), "augment_in"),
    ("--seed", dict(type=int), "seed"),
    ("--class-balance", dict(choices=CLASS_BALANCE, help="classifiers: none (default, the paper) | weights "
                                                         "(class-weighted loss) | sampling (oversampling)"),
     "class_balance"),
)


def protocol_names() -> list[str]:
    """Every protocol that caaxr_tf/configs/protocols.yaml defines, over all source sets."""
    return sorted({name for names in available_protocols().values() for name in names})


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The training flags (and ``--set``), as ``caaxr_tf.train`` and ``caaxr_tf.cv`` take them."""
    group = parser.add_argument_group("training")
    for flag, options, _ in TRAINING_FLAGS:
        group.add_argument(flag, **options)
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override any resolved key, e.g. --set model_kwargs.base_filters=16")


def training_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig settings given on the command line (None: not given)."""
    return {key: getattr(args, flag.lstrip("-").replace("-", "_")) for flag, _, key in TRAINING_FLAGS if key}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", required=True, choices=protocol_names())
    parser.add_argument("--model", required=True, help="registry name, e.g. unet, segnet, maskrcnn, mobilenetv2")
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--tfrecords", required=True, help="folder with one sub-folder per protocol (or the protocol folder)")
    parser.add_argument("--out", required=True, help="run folder")
    add_training_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The run's RunConfig from parsed arguments (see caaxr_tf.training.config)."""
    return resolve_run_config(args.tfrecords, args.protocol, args.model, args.fold, config_file=args.config,
                              flags=training_flags(args), overrides=args.overrides)


# --------------------------------------------------------------------------- running


def prepare_run_dir(run_dir: Path, config: RunConfig, chief: bool) -> bool:
    """Write config.yaml; refuse a folder that holds another run. Returns True when the run
    is already complete.

    Another run: any setting but ``epochs`` and ``strategy`` differs, or the records do
    (`records_difference`: the same summary.json fingerprint, or without one the same path).
    """
    mapping = config.to_mapping()
    config_path = Path(run_dir) / runs.CONFIG_FILE
    if config_path.exists():
        try:
            previous = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise ConfigError(f"{config_path}: cannot be read as the run's configuration ({error}); "
                              "use another --out or delete it") from None
        if not isinstance(previous, dict):
            raise ConfigError(f"{config_path}: expected a mapping of settings, found {type(previous).__name__}; "
                              "use another --out or delete it")
        differing = sorted(k for k in set(previous) | set(mapping)
                           if k not in RESUMABLE_KEYS | RECORDS_KEYS and previous.get(k) != mapping.get(k))
        records = records_difference(previous, mapping)
        if records:
            differing.insert(0, records)
        if differing:
            raise ConfigError(
                f"{run_dir} holds a run with other settings ({', '.join(differing)}); use another --out or delete it"
            )
        history = History(Path(run_dir) / runs.HISTORY_FILE, enabled=False)
        done = ((Path(run_dir) / runs.FINAL_MODEL).exists() and history.rows
                and history.rows[-1]["epoch"] >= int(config.epochs))
        if done:
            return True
    if chief:
        write_run_config(Path(run_dir), mapping)
    return False


def train(config: RunConfig, run_dir: str | Path, strategy=None, *, verbose: bool = True,
          on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``config`` into ``run_dir`` (whose config.yaml `prepare_run_dir` wrote).

    Raises ``NonFiniteLossError`` when the training or validation loss stops being finite
    (that epoch is neither checkpointed nor saved as best), ``tf.errors.DataLossError`` naming
    the shard when a shard of the fold is damaged, and ``ConfigError`` for settings that fail
    when the model and data are built.
    """
    try:
        files = [f for split in ("train", "val") for f in shard_files(config.tfrecords, split, config.fold)]
    except (FileNotFoundError, ValueError) as error:  # a missing shard or fold
        raise ConfigError(str(error)) from error
    with naming_corrupt_shards(files):
        return Trainer(config, run_dir, strategy, verbose=verbose, on_epoch_end=on_epoch_end).fit()


# What a run folder holds once an epoch has finished (a failed start without any is undone).
EPOCH_OUTPUTS = (runs.HISTORY_FILE, runs.BACKUP_DIR, runs.BEST_MODEL, runs.FINAL_MODEL)


def discard_failed_start(run_dir: Path, before: list[str] | None) -> None:
    """Undo what a first start that failed before finishing an epoch wrote (config.yaml, logs/),
    so that the corrected command is not refused as "another run": the folder itself when this
    start created it (``before`` None), else only the entries that were not there before."""
    if not run_dir.is_dir() or any((run_dir / name).exists() for name in EPOCH_OUTPUTS):
        return
    if before is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for entry in run_dir.iterdir():
        if entry.name not in before:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def run_training(config: RunConfig, run_dir: str | Path, strategy=None, *, verbose: bool = True) -> TrainResult | None:
    """Prepare the run folder and train; None when the run is already complete.

    A first start (no config.yaml yet) that fails before its first epoch is saved (a setting
    found unusable when the model or data are built, a diverging loss, a damaged shard)
    leaves the run folder as it found it, so a corrected command can start the run.
    """
    strategy = strategy if strategy is not None else make_strategy(config.strategy)
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} exists and is not a folder")
    before = sorted(entry.name for entry in run_dir.iterdir()) if run_dir.is_dir() else None
    fresh = before is None or runs.CONFIG_FILE not in before
    chief = is_chief(strategy)
    if prepare_run_dir(run_dir, config, chief):
        return None
    try:
        return train(config, run_dir, strategy, verbose=verbose)
    except Exception:
        if fresh and chief:
            discard_failed_start(run_dir, before)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import tensorflow as tf

    run_dir = Path(args.out)
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--out {run_dir} exists and is not a folder")
        config = resolve_config(args)
        result = run_training(config, run_dir, verbose=not args.quiet)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, tf.errors.DataLossError) as error:
        print(f"error: {getattr(error, 'message', None) or error}", file=sys.stderr)
        return 1
    except OSError as error:  # e.g. an --out that cannot be created or written
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result is None:
        print(f"{run_dir}: already trained for {config.epochs} epochs; nothing to do")
    elif result.best is not None:
        print(f"done: {run_dir} (best {config.monitor} {result.best:.4f})")
    else:
        print(f"done: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

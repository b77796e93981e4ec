"""The typed configuration of one training run, and how it is resolved.

Resolution order (later wins): caaxr_tf/configs/train.yaml's ``defaults`` < its sections of the run's
task (e.g. ``segmentation``, then ``detection``) < ``models.<name>`` < a ``--config`` file (flat
keys or the same sections; the file wins over train.yaml within each level) < command-line flags
< ``--set key=value``. The result is checked strictly (`RunConfig`): an unknown key is an error
that names the valid keys. It is saved as RUN_DIR/config.yaml.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from caaxr_tf.config import CONFIG_DIR, ConfigError, apply_overrides, deep_merge, from_mapping, load_yaml, to_mapping

STRATEGIES = ("auto", "one", "mirrored", "multiworker")
CLASS_BALANCE = ("none", "weights", "sampling")
OPTIMIZERS = ("adam", "sgd", "nadam", "adamw", "rmsprop")
# Keys whose change does not make a run folder "another run" (a finished run can be extended).
RESUMABLE_KEYS = {"epochs", "strategy", "tfrecords"}

_POSITIVE = {"min": 1}
_FINITE = {"finite": True}


@dataclass(frozen=True)
class OptimizerConfig:
    """A Keras optimizer by name with its settings (only those given are passed on)."""

    name: Literal["adam", "sgd", "nadam", "adamw", "rmsprop"]
    learning_rate: float = field(metadata={"label": "learning rate", "finite": True, "gt": 0})
    momentum: float | None = field(default=None, metadata=_FINITE)
    nesterov: bool | None = None
    beta_1: float | None = field(default=None, metadata=_FINITE)
    beta_2: float | None = field(default=None, metadata=_FINITE)
    epsilon: float | None = field(default=None, metadata=_FINITE)
    weight_decay: float | None = field(default=None, metadata=_FINITE)
    clipnorm: float | None = field(default=None, metadata=_FINITE)
    clipvalue: float | None = field(default=None, metadata=_FINITE)

    def settings(self) -> dict[str, Any]:
        """The keyword arguments given (``name`` left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "name" and getattr(self, f.name) is not None}

    def to_mapping(self) -> dict[str, Any]:
        return {"name": self.name, **self.settings()}

    def build(self, mixed_precision: bool = False):
        import keras

        classes = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "nadam": keras.optimizers.Nadam,
                   "adamw": keras.optimizers.AdamW, "rmsprop": keras.optimizers.RMSprop}
        try:
            optimizer = classes[self.name](**self.settings())
        except (TypeError, ValueError) as error:  # a setting this optimizer does not have (e.g. momentum for adam)
            raise ConfigError(f"optimizer {self.name}: {error}") from None
        return keras.optimizers.LossScaleOptimizer(optimizer) if mixed_precision else optimizer


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run depends on; RUN_DIR/config.yaml holds it."""

    # what is trained on what (filled in by resolve_run_config)
    protocol: str
    task: str
    model: str
    fold: int = field(metadata=_POSITIVE)
    tfrecords: str
    class_names: list[str]
    # how (caaxr_tf/configs/train.yaml and overrides)
    batch_size: int = field(metadata=_POSITIVE)
    epochs: int = field(metadata=_POSITIVE)
    optimizer: OptimizerConfig
    loss: str
    monitor: str
    monitor_mode: Literal["max", "min"] = "max"
    image_size: int = field(default=224, metadata=_POSITIVE)
    seed: int = 0
    steps_per_epoch: int | None = field(default=None, metadata=_POSITIVE)
    validation_steps: int | None = field(default=None, metadata=_POSITIVE)
    weights: str = "none"
    strategy: Literal["auto", "one", "mirrored", "multiworker"] = "auto"
    mixed_precision: bool = False
    jit: bool = False
    shuffle_buffer: int = field(default=2048, metadata=_POSITIVE)
    cache: bool = True
    augment: bool = True
    bn_recompute_images: int = field(default=0, metadata={"min": 0})
    class_balance: Literal["none", "weights", "sampling"] = "none"
    model_kwargs: dict = field(default_factory=dict)
    loss_kwargs: dict = field(default_factory=dict)
    target_names: list[str] = field(default_factory=list)  # float targets (regression protocols)
    target_ranges: dict = field(default_factory=dict)  # {target: [low, high]} from summary.json

    def to_mapping(self) -> dict[str, Any]:
        """Plain data, keys sorted (what config.yaml holds)."""
        return dict(sorted(to_mapping(self).items()))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @property
    def protocol_dir(self) -> Path:
        return Path(self.tfrecords)

    def summary(self) -> dict[str, Any]:
        from caaxr_tf.data.schema import read_summary

        return read_summary(self.tfrecords)

    def training_class_counts(self) -> list[int]:
        """Images per class (in ``class_names`` order) in the training split of the run's fold."""
        counts = self.summary()["counts"][f"fold{self.fold}"]["train"]
        return [int(counts.get(name, 0)) for name in self.class_names]


def config_from_mapping(data: Mapping[str, Any], where: str = "run config") -> RunConfig:
    """A RunConfig from plain data (a config.yaml), strictly."""
    try:
        return from_mapping(RunConfig, data, "")
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}" if where != "run config" else str(error)) from None


def locate_protocol_dir(tfrecords: str | Path, protocol: str) -> Path:
    """``--tfrecords`` may name the folder of all protocols or the protocol folder itself."""
    from caaxr_tf.data.schema import SUMMARY_FILE, read_summary_file

    root = Path(tfrecords)
    for candidate in (root / protocol, root):
        summary_path = candidate / SUMMARY_FILE
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


def layered_sections() -> tuple[str, ...]:
    """The sections of caaxr_tf/configs/train.yaml (and of a --config file): defaults, one per task
    (and task family), models."""
    from caaxr_tf.tasks import available_tasks, get_task

    sections: list[str] = ["defaults"]
    for name in available_tasks():
        for section in get_task(name).config_sections():
            if section not in sections:
                sections.append(section)
    return (*sections, "models")


def layered_config(base: Mapping[str, Any], extra: Mapping[str, Any], task_sections: Sequence[str],
                   model: str) -> dict[str, Any]:
    """Merge train.yaml (``base``) with a --config file (``extra``).

    ``extra`` may hold flat keys, train.yaml's layered sections, or both. Section by section,
    the file wins over train.yaml, and more specific sections win over general ones:
    defaults < the task's sections < ``models.<model>`` < the file's flat keys. So one file can
    carry settings for several models (``caaxr_tf.cv --config`` gives every model the same
    file) without a task-wide key overriding a model's own setting in train.yaml.
    """
    sections = layered_sections()
    extra = dict(extra)
    layers = {name: extra.pop(name) for name in sections if name in extra}
    config: dict[str, Any] = {}
    for section in ("defaults", *task_sections):
        config = deep_merge(config, base.get(section) or {})
        config = deep_merge(config, layers.get(section) or {})
    config = deep_merge(config, (base.get("models") or {}).get(model) or {})
    config = deep_merge(config, (layers.get("models") or {}).get(model) or {})
    return deep_merge(config, extra)


def run_task(protocol_task: str, model: str, protocol: str):
    """The task class of a model on a protocol; ConfigError naming both when they do not fit."""
    from caaxr_tf.models import model_task
    from caaxr_tf.tasks import UnknownTaskError, task_for

    try:
        kind = model_task(model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        return task_for(protocol_task, kind)
    except UnknownTaskError as error:
        raise ConfigError(f"model {model!r} is a {kind} model but protocol {protocol!r} is {protocol_task} ({error})"
                          ) from None


def resolve_run_config(
    tfrecords: str | Path,
    protocol: str,
    model: str,
    fold: int = 1,
    *,
    config_file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """The resolved, checked configuration of one run (see the module docstring).

    ``flags`` are the command line's settings (None values are left out); ``learning_rate``
    among them sets ``optimizer.learning_rate``.
    """
    from caaxr_tf.data.schema import SUMMARY_FILE, read_summary_file

    protocol_dir = locate_protocol_dir(tfrecords, protocol)
    summary = read_summary_file(protocol_dir / SUMMARY_FILE)
    task = run_task(summary["task"], model, protocol)
    if not 1 <= fold <= int(summary["folds"]):
        raise ConfigError(f"fold {fold} does not exist: {protocol_dir} has folds 1..{summary['folds']}")

    base = load_yaml(CONFIG_DIR / "train.yaml")
    try:
        extra = load_yaml(config_file) if config_file else {}
    except (OSError, ValueError) as error:
        raise ConfigError(f"--config: {error}") from None
    config = layered_config(base, extra, task.config_sections(), model)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    learning_rate = flags.pop("learning_rate", None)
    config.update(flags)
    if learning_rate is not None:
        config["optimizer"] = {**(config.get("optimizer") or {}), "learning_rate": learning_rate}
    config.update(protocol=protocol, task=task.name, model=model, fold=fold, tfrecords=str(protocol_dir),
                  class_names=[str(c) for c in summary["classes"]])
    if summary.get("target_names"):
        config["target_names"] = [str(t) for t in summary["target_names"]]
    if summary.get("target_ranges"):
        config["target_ranges"] = {str(k): [float(b) for b in v] for k, v in summary["target_ranges"].items()}
    try:
        config = apply_overrides(config, overrides)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    resolved = config_from_mapping(config)
    task.check_config(resolved)
    weights = str(resolved.weights)
    if weights not in ("none", "imagenet") and not Path(weights).exists():
        raise ConfigError(f"weights file not found: {weights}")
    return resolved


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig saved in a run folder."""
    from caaxr_tf import runs

    return config_from_mapping(runs.load_run_config(run_dir), f"{Path(run_dir) / runs.CONFIG_FILE}")


def describe(config: RunConfig) -> str:
    return json.dumps(config.to_mapping(), sort_keys=True)

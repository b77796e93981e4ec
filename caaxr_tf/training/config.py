"""The typed configuration of one training run, and how it is resolved.

Resolution order (later wins): caaxr_tf/configs/train.yaml's ``defaults`` < its sections of the run's
task (e.g. ``segmentation``, then ``detection``) < ``models.<name>`` < a ``--config`` file (flat
keys or the same sections; the file wins over train.yaml within each level) < command-line flags
< ``--set key=value``. The result is checked strictly (`RunConfig`): an unknown key is an error
that names the valid keys. train.yaml and a ``--config`` file are checked whole first (every
section, each ``models.<name>`` a registered model; `check_layers`), their errors naming the
file; ``target_names`` / ``target_ranges`` are checked against the records (`check_targets`)
and ``loss_kwargs`` against the options the loss declares (``caaxr_tf.losses.LOSS_OPTIONS``),
all before anything is written. It is saved as RUN_DIR/config.yaml.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from caaxr_tf.config import (
    CONFIG_DIR,
    ConfigError,
    apply_overrides,
    check_known_keys,
    check_partial,
    deep_merge,
    from_mapping,
    load_yaml,
    to_mapping,
)
from caaxr_tf import runs
from caaxr_tf.data.protocols import _target_ranges
from caaxr_tf.data.schema import SUMMARY_FILE, read_summary, read_summary_file
from caaxr_tf.data.summary import locate_protocol
from caaxr_tf.models import available_models, model_task
from caaxr_tf.tasks import UnknownTaskError, available_tasks, get_task, task_for

STRATEGIES = ("auto", "one", "mirrored", "multiworker")
CLASS_BALANCE = ("none", "weights", "sampling")
OPTIMIZERS = ("adam", "sgd", "nadam", "adamw", "rmsprop")
# Keys whose change does not make a run folder "another run" (a finished run can be extended).
RESUMABLE_KEYS = {"epochs", "strategy"}
# The records a run trains on: compared by `records_difference`, not key by key.
RECORDS_KEYS = {"tfrecords", "records_fingerprint"}

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

    def build(self, loss_scaling: bool = False):
        import keras

        classes = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "nadam": keras.optimizers.Nadam,
                   "adamw": keras.optimizers.AdamW, "rmsprop": keras.optimizers.RMSprop}
        try:
            optimizer = classes[self.name](**self.settings())
        except (TypeError, ValueError) as error:  # a setting this optimizer does not have (e.g. momentum for adam)
            raise ConfigError(f"optimizer {self.name}: {error}") from None
        return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scaling else optimizer


# ``mixed_precision`` settings → the Keras policy (None: float32). ``true`` keeps its old meaning
# (float16); bfloat16 has float32's exponent range, so only float16 needs loss scaling.
MIXED_POLICIES: dict[Any, str | None] = {False: None, True: "mixed_float16", "float16": "mixed_float16",
                                         "bfloat16": "mixed_bfloat16"}


def mixed_policy(setting: bool | str) -> str | None:
    """The Keras dtype policy of a ``mixed_precision`` setting; None for float32."""
    return MIXED_POLICIES[setting]


def needs_loss_scaling(setting: bool | str) -> bool:
    return mixed_policy(setting) == "mixed_float16"


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
    # false | true (= float16) | float16 | bfloat16: compute under Keras' mixed policy, float32 variables
    mixed_precision: bool | Literal["float16", "bfloat16"] = False
    jit: bool = False
    shuffle_buffer: int = field(default=2048, metadata=_POSITIVE)
    cache: bool = True
    augment: bool = True
    # where the augmentation runs: the tf.data pipeline (CPU) or the training step (the replica's device)
    augment_in: Literal["pipeline", "step"] = "pipeline"
    bn_recompute_images: int = field(default=0, metadata={"min": 0})
    class_balance: Literal["none", "weights", "sampling"] = "none"
    model_kwargs: dict = field(default_factory=dict)
    loss_kwargs: dict = field(default_factory=dict)
    target_names: list[str] = field(default_factory=list)  # float targets (regression protocols)
    target_ranges: dict = field(default_factory=dict)  # {target: [low, high]} from summary.json
    # summary.json "fingerprint" of the records ("" when it has none): the same records moved
    # to another folder are the same run's data, other records at the same path are not
    records_fingerprint: str = ""

    def to_mapping(self) -> dict[str, Any]:
        """Plain data, keys sorted (what config.yaml holds)."""
        return dict(sorted(to_mapping(self).items()))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @property
    def protocol_dir(self) -> Path:
        return Path(self.tfrecords)

    def summary(self) -> dict[str, Any]:
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
    root = Path(tfrecords)
    try:
        candidate = locate_protocol(root, protocol)
    except FileNotFoundError:
        raise ConfigError(f"no TFRecords for protocol {protocol!r} under {root} "
                          f"(expected {root / protocol}/summary.json)") from None
    try:
        summary = read_summary_file(candidate / SUMMARY_FILE)
    except (OSError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if summary.get("protocol") != protocol:
        raise ConfigError(f"{candidate} holds the TFRecords of protocol {summary.get('protocol')!r}, not {protocol!r}")
    return candidate


def layered_sections() -> tuple[str, ...]:
    """The sections of caaxr_tf/configs/train.yaml (and of a --config file): defaults, one per task
    (and task family), models."""
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


def check_layers(data: Mapping[str, Any], flat_keys: bool) -> None:
    """Check a whole train.yaml (``flat_keys`` False: sections only) or ``--config`` file
    (sections and flat keys), every section included, not only those the run merges: each
    key and value of its sections (as `RunConfig` takes them), and every ``models.<name>``
    a registered model. ConfigError naming the key, the closest valid one and the valid ones."""
    sections = layered_sections()
    if flat_keys:
        check_known_keys(data, [*sections, *(f.name for f in dataclasses.fields(RunConfig))])
        check_partial(RunConfig, {k: v for k, v in data.items() if k not in sections})
    else:
        check_known_keys(data, sections, what="section", listed="valid sections")
    for section in sections:
        if section != "models" and data.get(section) is not None:
            check_partial(RunConfig, data[section], section)
    models = data.get("models")
    if models is None:
        return
    if not isinstance(models, Mapping):
        raise ConfigError(f"models must be a mapping of model names to settings, got {models!r}")
    check_known_keys(models, available_models(), "models", what="model", listed="valid models")
    for name, settings in models.items():
        check_partial(RunConfig, settings, f"models.{name}")


def run_task(protocol_task: str, model: str, protocol: str):
    """The task class of a model on a protocol; ConfigError naming both when they do not fit."""
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
    protocol_dir = locate_protocol_dir(tfrecords, protocol)
    summary = read_summary_file(protocol_dir / SUMMARY_FILE)
    task = run_task(summary["task"], model, protocol)
    if not 1 <= fold <= int(summary["folds"]):
        raise ConfigError(f"fold {fold} does not exist: {protocol_dir} has folds 1..{summary['folds']}")

    base_file = CONFIG_DIR / "train.yaml"
    base = load_yaml(base_file)
    try:
        check_layers(base, flat_keys=False)
    except ConfigError as error:
        raise ConfigError(f"{base_file}: {error}") from None
    try:
        extra = load_yaml(config_file) if config_file else {}
    except (OSError, ValueError) as error:
        raise ConfigError(f"--config: {error}") from None
    try:
        check_layers(extra, flat_keys=True)
    except ConfigError as error:
        raise ConfigError(f"--config: {config_file}: {error}") from None
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
    config["records_fingerprint"] = str(summary.get("fingerprint") or "")  # what the records are, not a setting
    resolved = config_from_mapping(config)
    check_targets(resolved, summary)
    task.check_config(resolved)
    weights = str(resolved.weights)
    if weights not in ("none", "imagenet") and not Path(weights).exists():
        raise ConfigError(f"weights file not found: {weights}")
    return resolved


def check_targets(config: RunConfig, summary: Mapping[str, Any]) -> None:
    """``target_names`` must be the records' own (summary.json: each record's ``targets`` holds
    exactly those values, in that order); ``target_ranges`` may narrow or widen a target's range
    but must name known targets with finite ``[low, high]``, ``low < high``."""
    expected = [str(t) for t in summary.get("target_names") or []]
    if list(config.target_names) != expected:
        held = f"targets {expected}" if expected else "no float targets"
        raise ConfigError(f"target_names {list(config.target_names)} does not match the records: {config.tfrecords} "
                          f"holds {held} (summary.json target_names); target_names comes from the protocol")
    _target_ranges(config.target_ranges, expected, "target_ranges")


def records_difference(previous: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Why the records of ``current`` (a config mapping) are not those a run folder's
    ``previous`` config.yaml trained on; None when they are the same.

    Both summary fingerprints known: they decide (a folder moved or copied elsewhere is the
    same data; a folder rebuilt in place with other data is not). Otherwise (a config.yaml
    written before fingerprints were kept, records without one) only the same resolved path
    counts as the same records.
    """
    old_path, new_path = previous.get("tfrecords"), current.get("tfrecords")
    old_print, new_print = previous.get("records_fingerprint") or "", current.get("records_fingerprint") or ""
    change = f"tfrecords {old_path} -> {new_path}" if old_path != new_path else f"tfrecords {new_path}"
    if old_print and new_print:
        if old_print == new_print:
            return None
        return f"{change}, other records: summary.json fingerprint {old_print[:12]} -> {new_print[:12]}"
    if old_path is not None and new_path is not None and Path(str(old_path)).resolve() == Path(str(new_path)).resolve():
        return None
    where = "the run's config.yaml" if not old_print else "the records' summary.json"
    return f"{change}, no records fingerprint in {where} to show they hold the same records"


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig saved in a run folder."""
    return config_from_mapping(runs.load_run_config(run_dir), f"{Path(run_dir) / runs.CONFIG_FILE}")


def describe(config: RunConfig) -> str:
    return json.dumps(config.to_mapping(), sort_keys=True)

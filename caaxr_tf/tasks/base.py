"""The Task base class and the task registry.

A task owns everything that depends on what is predicted — and nothing else:

* inputs: the per-record part of the tf.data pipeline that is cached (``decode``), its batch
  augmentation (``augment``) and the training target (``target``);
* training: the model it builds (``build_model``), the loss per example, the metrics updated
  inside the distributed step and how they are logged;
* evaluation: the metrics JSON, the per-image CSV and the plots of one split, the constant
  predictions a model has to beat (``baselines``) and the columns of the CV tables;
* serving: the named outputs of the exported signatures and the JSON record that
  ``caaxr_tf.predict`` prints per image.

The trainer, the evaluator, cross-validation, export and predict are generic: they look the
task up here. The task of a run is the registered class whose ``protocol_task`` is the task
named in the protocol's summary.json and whose ``model_task`` is the registry task of the
model (Mask R-CNN, a ``detection`` model, on a ``segmentation`` protocol gives the detection
task). Adding a task means adding one module under ``caaxr_tf/tasks/`` (``TASKS``, a
``caaxr_tf.registry.Registry``, imports every module of the package on first use) and its
section in caaxr_tf/configs/train.yaml.

This module imports no task module and nothing from the data pipeline at import time, so the
pipeline can resolve task names without an import cycle.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

from caaxr_tf.registry import Registry

if TYPE_CHECKING:
    import keras
    import numpy as np
    import tensorflow as tf


class UnknownTaskError(ValueError):
    """A task name (e.g. from a summary.json or a run's config.yaml) that no task module defines."""


# Every module of the caaxr_tf.tasks package is imported on the first lookup (each registers its
# task classes); see caaxr_tf/registry.py.
TASKS: Registry[type["Task"]] = Registry("task", package="caaxr_tf.tasks", error=UnknownTaskError)


def register_task(cls: type["Task"]) -> type["Task"]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    return TASKS.register(cls.name, cls)


def available_tasks() -> list[str]:
    return TASKS.names()


def get_task(name: str) -> type["Task"]:
    """The task class registered as ``name``; ``UnknownTaskError`` lists the known ones."""
    return TASKS.get(name)


def task_for(protocol_task: str, model_task: str) -> type["Task"]:
    """The task that runs a ``model_task`` model on a ``protocol_task`` protocol."""
    classes = TASKS.values()
    if protocol_task not in {cls.protocol_task for cls in classes}:
        raise UnknownTaskError(
            f"unknown protocol task {protocol_task!r}; known tasks: {', '.join(TASKS.names())}"
        )
    for cls in classes:
        if cls.protocol_task == protocol_task and cls.model_task == model_task:
            return cls
    kinds = sorted({cls.model_task for cls in classes if cls.protocol_task == protocol_task})
    raise UnknownTaskError(f"a {model_task} model cannot run on a {protocol_task} protocol "
                           f"(it takes {' or '.join(kinds)} models)")


def task_of_run(task: str, model: str | None = None) -> type["Task"]:
    """The task class of a run folder's ``task`` and ``model``. Run folders written before the
    detection task existed name the protocol's task (``segmentation``) for Mask R-CNN: a
    registered model of another kind picks the task that runs that kind on the protocol."""
    cls = get_task(task)
    if not model:
        return cls
    from caaxr_tf.models import model_task

    try:
        kind = model_task(model)
    except ValueError:  # not a registered model (e.g. a hand-made run): the named task
        return cls
    return cls if kind == cls.model_task else task_for(cls.protocol_task, kind)


@dataclass
class EvalContext:
    """What a task's ``evaluate`` needs besides the predictions: where its files go and how
    they are titled. ``tag`` is the file-name tag (``""`` for the default evaluation)."""

    out_dir: Path
    tag: str
    title: str
    plots: bool = True
    num_examples: int = 4
    files: dict[str, str] = field(default_factory=dict)
    # The task's own options of this evaluation (the fields of its ``options_type``, unset ones
    # left out; run folders among them opened by `Task.open_options`).
    options: dict[str, Any] = field(default_factory=dict)
    # Where the evaluated split comes from and how the run feeds its model.
    protocol_dir: Path | None = None
    split: str = "test"
    fold: int = 1
    image_size: int | None = None
    batch_size: int = 16

    def path(self, kind: str, suffix: str) -> Path:
        """``out_dir/<kind><tag>.<suffix>``, recorded in ``files`` under ``kind``."""
        self.files[kind] = f"{kind}{self.tag}.{suffix}"
        return self.out_dir / self.files[kind]


@dataclass
class EvalResult:
    """A task's evaluation of one split: the metrics (JSON-ready) and one CSV row per image."""

    metrics: dict[str, Any]
    header: list[str]
    rows: list[list[Any]]


Predict = Callable[[Any], Any]


@dataclass(frozen=True)
class BootstrapInputs:
    """What ``evaluate --bootstrap`` resamples (`Task.bootstrap_inputs`): ``metric(y_true,
    y_score, **kwargs)`` returns the task's headline numbers (a dict, named as in
    metrics.json) from per-image arrays whose first axis is the image, in the rows' order."""

    metric: Callable[..., Any]
    y_true: Any
    y_score: Any
    kwargs: dict[str, Any]


class Task:
    """Base class of the registered tasks (see the module docstring)."""

    name: ClassVar[str] = ""
    protocol_task: ClassVar[str] = ""
    model_task: ClassVar[str] = ""
    losses: ClassVar[tuple[str, ...]] = ()
    # The model computes its own losses (``model.compute_losses(images, targets)``).
    owns_loss: ClassVar[bool] = False
    # Names of the model's own loss terms (logged as ``loss_<name>``) when it owns its loss.
    loss_components: ClassVar[tuple[str, ...]] = ()
    supports_augmentation: ClassVar[bool] = True
    # Serving outputs that ``prediction_record`` reports (predict prints other per-image
    # outputs of at most two dimensions as they are).
    reported_outputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, class_names: Sequence[str], *, loss: str | None = None,
                 loss_kwargs: Mapping[str, Any] | None = None, target_names: Sequence[str] = ()):
        self.class_names = [str(name) for name in class_names]
        self.target_names = [str(name) for name in target_names]  # float targets (regression)
        if loss is not None and loss not in self.losses:
            raise ValueError(f"unknown loss {loss!r} for the {self.name} task; expected one of {', '.join(self.losses)}")
        self.loss = loss or (self.losses[0] if self.losses else None)
        self.loss_kwargs = dict(loss_kwargs or {})

    # Loss weights or oversampling by class (``class_balance``) make sense for this task.
    supports_class_balance: ClassVar[bool] = False
    # The model outputs class scores that Grad-CAM can explain (``caaxr_tf.explain``):
    # ``evaluate --cam/--localization/--tfrecords``, ``export --cam``, ``predict --cam``.
    supports_cam: ClassVar[bool] = False
    # caaxr calibrate: a temperature and operating thresholds fitted on the probabilities
    supports_calibration: ClassVar[bool] = False
    # ``overlay`` draws a picture of a prediction (``caaxr_tf.predict --overlay``).
    has_overlay: ClassVar[bool] = False

    @classmethod
    def config_sections(cls) -> tuple[str, ...]:
        """The sections of caaxr_tf/configs/train.yaml this task's runs read, general to specific."""
        return (cls.name,)

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise ConfigError for settings of a resolved RunConfig that this task cannot use."""
        from caaxr_tf.config import ConfigError

        if config.loss not in cls.losses:
            raise ConfigError(f"unknown loss {config.loss!r} for the {cls.name} task; "
                              f"expected one of {', '.join(cls.losses)}")
        from caaxr_tf.losses import check_loss_options

        check_loss_options(config.loss, config.loss_kwargs, cls.losses)
        if config.class_balance != "none" and not cls.supports_class_balance:
            raise ConfigError(f"class_balance {config.class_balance!r} applies to classifiers; "
                              f"protocol {config.protocol!r} is {cls.protocol_task}")
        if config.augment and not cls.supports_augmentation:
            raise ConfigError(f"augment: the {cls.name} task cannot be augmented (its targets would not follow); "
                              "set augment to false")

    @classmethod
    def from_config(cls, config: Any, summary: Mapping[str, Any] | None = None) -> "Task":
        """The task of a resolved run config (``caaxr_tf.training.config.RunConfig``)."""
        return cls(config.class_names, loss=config.loss, loss_kwargs=config.loss_kwargs,
                   target_names=config.target_names)

    # ------------------------------------------------------------------ inputs (tf.data)

    def decode(self, record: Mapping[str, "tf.Tensor"], image_size: int) -> dict[str, "tf.Tensor"]:
        """The deterministic, cached part of one parsed record: at least ``image`` (uint8
        [S, S, 1]), ``label`` and ``id``; the task adds what its target needs."""
        from caaxr_tf.data.pipeline import decode_common

        return decode_common(record, image_size)

    def augment(self, images: "tf.Tensor", batch: Mapping[str, "tf.Tensor"], seed: "tf.Tensor"
                ) -> tuple["tf.Tensor", dict[str, "tf.Tensor"]]:
        """Random augmentation of a batch (float32 images 0..255); returns the images and the
        batch entries it changed (e.g. the masks that follow a geometric transform)."""
        from caaxr_tf.data.pipeline import augment_batch

        augmented, _ = augment_batch(images, None, seed)
        return augmented, {}

    def augment_in_step(self, images: "tf.Tensor", targets: Any, seed: "tf.Tensor") -> tuple["tf.Tensor", Any]:
        """``augment_in: step``: the same augmentation as ``augment``, applied inside the training
        step to the model's inputs and training targets (so an accelerator runs it). A task whose
        ``augment`` changes batch entries (masks) maps them onto its targets."""
        augmented, changed = self.augment(images, {}, seed)
        if changed:
            raise NotImplementedError(f"{type(self).__name__}.augment_in_step must move {sorted(changed)} with the images")
        return augmented, targets

    def target(self, batch: Mapping[str, "tf.Tensor"]) -> Any:
        """The training target of a batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ model and training

    def build_model(self, config: Any) -> "keras.Model":
        """The run's model (``config``: a RunConfig), built inside the strategy's scope."""
        from caaxr_tf.models import build_model

        return build_model(config.model, weights=config.weights,
                           input_shape=(config.image_size, config.image_size, 1), **config.model_kwargs)

    def per_example_loss(self, targets: Any, outputs: Any) -> "tf.Tensor":
        """One loss value per example [B]."""
        raise NotImplementedError

    def make_metrics(self) -> list["keras.metrics.Metric"]:
        """Fresh stateful metrics, updated with ``metric_inputs`` inside the replica step."""
        return []

    def metric_inputs(self, targets: Any, outputs: Any) -> tuple[Any, Any]:
        """``(y_true, y_pred)`` for the metrics from a batch's targets and model outputs."""
        return targets, outputs

    def metric_values(self, metrics: Sequence["keras.metrics.Metric"], prefix: str = "") -> dict[str, float]:
        """The logged values of the metrics (history.csv columns, TensorBoard scalars)."""
        values: dict[str, float] = {}
        for metric in metrics:
            result = metric.result()
            array = result.numpy() if hasattr(result, "numpy") else result
            if getattr(array, "ndim", 0) == 1:  # one value per class
                for name, value in zip(self.class_names, array.tolist()):
                    values[f"{prefix}{metric.name}_{name}"] = float(value)
                values[f"{prefix}{metric.name}_mean"] = float(sum(array.tolist()) / max(1, len(array)))
            else:
                values[f"{prefix}{metric.name}"] = float(array)
        return values

    def metric_value_names(self, metrics: Sequence["keras.metrics.Metric"], prefix: str = "") -> list[str]:
        """The names ``metric_values`` will log, known before any update (a per-class metric
        carries ``class_names``)."""
        names: list[str] = []
        for metric in metrics:
            if getattr(metric, "class_names", None):
                names += [f"{prefix}{metric.name}_{name}" for name in metric.class_names] + [f"{prefix}{metric.name}_mean"]
            else:
                names.append(f"{prefix}{metric.name}")
        return names

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, predict: Predict, dataset: Any, context: EvalContext) -> EvalResult:
        """Predict every batch of ``dataset`` (``(images, targets, ids)``) and score the split;
        plots go to ``context`` paths."""
        raise NotImplementedError

    def format_metrics(self, metrics: Mapping[str, Any]) -> list[str]:
        """The lines of the printed summary of one evaluation (after its title line)."""
        return []

    def baselines(self, protocol_dir: Path, split: str, fold: int, subsets: Sequence[str]
                  ) -> dict[str, dict[str, dict[str, Any]]]:
        """Metrics of constant predictions on the split: ``{"" or subset: {name: metrics}}``."""
        return {}

    def metric_columns(self, subsets: Sequence[str] = ()) -> list[str]:
        """The metric columns of results.csv."""
        return ["num_images"]

    def paper_columns(self, subsets: Sequence[str] = ()) -> list[tuple[str, str]]:
        """``(results.csv column, header)`` of the mean ± std table."""
        return []

    def row_from_metrics(self, metrics: Mapping[str, Any],
                         subset_metrics: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """The results.csv cells of one evaluation (and its subset evaluations)."""
        return {"num_images": metrics.get("num_images")}

    def describe_metrics(self) -> str:
        """What the numbers of the CV table are, for results.md."""
        return ""

    # ------------------------------------------------------------------ options

    # The task's own settings of an evaluation or export: a dataclass whose fields are the
    # option keys (None: the task has none). `add_arguments` puts them on the evaluate and
    # export command lines and `options_from_args` reads them back, so those commands name no
    # task; `check_options` refuses options of other tasks, `open_options` opens the run folders
    # they name, `options_tag` tags the evaluation's files and `serving_model` applies them to
    # the exported model.
    options_type: ClassVar[type | None] = None
    # The command-line flag of each option key (for messages).
    option_flags: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, command: str) -> None:
        """Add the task's options to the ``command`` ("evaluate" or "export") parser."""

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The task's options given on the command line (`add_arguments`); unset ones left out."""
        return {key: getattr(args, key) for key in cls.option_flags
                if getattr(args, key, None) is not None}

    def check_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """``options`` without unset ones; a ValueError naming the flag of one this task does not take."""
        options = {key: value for key, value in (options or {}).items() if value is not None}
        known = {f.name for f in dataclasses.fields(self.options_type)} if self.options_type else set()
        for key in options:
            if key not in known:
                owners = [get_task(name) for name in available_tasks()]
                owners = [cls for cls in owners if key in cls.option_flags]
                flag = owners[0].option_flags[key] if owners else key
                where = " or ".join(sorted({cls.name for cls in owners})) or "no"
                raise ValueError(f"{flag} applies to {where} runs; this run's task is {self.name}")
        return options

    def open_options(self, options: Mapping[str, Any], open_run: Callable[[Any], Any]) -> dict[str, Any]:
        """The options with the run folders they name opened (``open_run(path)`` gives a
        `caaxr_tf.runs.Run`); as they are by default."""
        return dict(options)

    def options_tag(self, options: Mapping[str, Any]) -> str:
        """The file-name tag of an evaluation with ``options`` ("" by default)."""
        return ""

    def bootstrap_inputs(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> "BootstrapInputs | None":
        """The per-image data and metric of this task's patient-clustered bootstrap intervals,
        from an evaluation's rows (as written to predictions.csv); None: the task has none."""
        return None

    def serving_model(self, model: Any, image_size: int, options: Mapping[str, Any],
                      open_run: Callable[[Any], Any]) -> tuple[Any, dict[str, Any]]:
        """The model to export with ``options`` and what the export's metadata records of them
        (the model as it is by default)."""
        return model, {}

    # ------------------------------------------------------------------ prediction

    # Why ``predict --cam`` draws no CAM overlays for this task's exports (None: it does,
    # where the export has a ``cam`` output).
    no_cam_overlays: ClassVar[str | None] = None

    def predict_inputs(self, model: Any, paths: Sequence[Any], predict_files: Callable[[list[Path]], Any],
                       batch_size: int) -> Any:
        """The records of ``paths`` for ``caaxr_tf.predict``: None (the default) when they are
        image files that predict finds and predicts itself; a task with inputs of its own (CT
        patient folders) returns an iterator of records, ``predict_files(files)`` predicting
        plain files."""
        return None

    # ------------------------------------------------------------------ serving

    def serving_inputs(self, images: "tf.Tensor", invert: "tf.Tensor", bit_depth: "tf.Tensor",
                       image_size: int) -> "tf.Tensor":
        """``serving_default``: a batch of encoded images → the model's input batch, exactly as
        the tf.data pipeline prepares it (default: ``caaxr_tf.export.decode_images``)."""
        from caaxr_tf.data.serving import decode_images

        return decode_images(images, invert, bit_depth, image_size)

    def check_preprocessed(self, images: "tf.Tensor", image_size: int) -> "tf.Tensor":
        """``predict_preprocessed``: ``images`` after the checks of a client's own preprocessing
        (default: shape [N, S, S, 1] and values in 0..255)."""
        from caaxr_tf.data.serving import check_preprocessed

        return check_preprocessed(images, image_size)

    def serving_outputs(self, outputs: Any) -> dict[str, "tf.Tensor"]:
        """Named outputs of the exported signatures from the model's outputs; every output has
        the batch as its first dimension (TF Serving's REST row format needs it)."""
        import tensorflow as tf

        def as_float32(tensor):
            tensor = tf.convert_to_tensor(tensor)
            return tf.cast(tensor, tf.float32) if tensor.dtype.is_floating else tensor

        if isinstance(outputs, Mapping):
            return {str(key): as_float32(value) for key, value in outputs.items()}
        if isinstance(outputs, (list, tuple)):
            raise ValueError(f"cannot name {len(outputs)} unnamed model outputs; return a dict instead")
        return {"output": as_float32(outputs)}

    def prediction_record(self, outputs: Mapping[str, "np.ndarray"], index: int) -> dict[str, Any]:
        """The JSON fields that ``caaxr_tf.predict`` prints for image ``index`` of a batch."""
        return {}

    def overlay(self, pixels: "np.ndarray", outputs: Mapping[str, "np.ndarray"]) -> "np.ndarray | None":
        """``caaxr_tf.predict --overlay``: an RGB uint8 picture of one image's prediction over its
        model input ``pixels`` (uint8 [S, S]), or None when the task has none."""
        return None

    def check_model(self, model: "keras.Model", image_size: int) -> None:
        """Raise ValueError when ``model`` does not fit this task (checked before an export)."""

    def check_outputs(self, outputs: Mapping[str, "np.ndarray"]) -> None:
        """Raise ValueError when the served outputs do not fit this task (checked on load)."""


def check_finite(values: "np.ndarray", ids: Sequence[str]) -> None:
    """A model with NaN weights scores DICE 0 or 1 and AUC 0.5 silently: refuse it instead."""
    import numpy as np

    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        first = ", ".join(ids[i] for i in np.flatnonzero(bad)[:3])
        raise ValueError(
            f"the model's outputs are not finite (NaN or Inf) for {int(bad.sum())} image(s) of this batch "
            f"(e.g. {first}): the model is broken (trained with a non-finite loss?); nothing was written"
        )


def format_value(value: Any) -> str:
    """A metric value for the printed tables: 4 decimals, ``n/a`` for undefined."""
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

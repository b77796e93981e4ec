"""A run folder written by ``caaxr_tf.train``, opened for evaluation, export, prediction and CV.

    run = Run(run_dir)
    run.settings        the config.yaml settings readers use, typed, fallbacks in one place
    run.protocol        the records' summary.json (`ProtocolSummary`), read once
    run.task()          the run's Task with all its arguments (class names, target names and
                        ranges, the task's options): evaluation and serving build the same task
    run.model(which)    the best (or final) Keras model
    run.predictor()     ``images -> numpy outputs`` of that model (one traced graph)
    run.dataset(split)  the run's fold of a split, prepared for that task, for evaluation

`Run` is the one way a run folder is opened (evaluate, export, predict, CV, explain, the
infection and severity tools); the folder's files are named in `caaxr_tf.run_files`
(re-exported here). The strict `caaxr_tf.training.config.RunConfig` is the training side's
view of the same config.yaml (``caaxr_tf.training.config.read_run_config``); a run folder of
an older or foreign version need not pass it to be evaluated or exported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from caaxr_tf.data.pipeline import IMAGE_SIZE, make_dataset
from caaxr_tf.data.schema import SUMMARY_FILE
from caaxr_tf.data.summary import ProtocolSummary, locate_protocol
from caaxr_tf.models.outputs import predict_function
from caaxr_tf.run_files import (  # noqa: F401  (re-exported)
    BACKUP_DIR,
    BEST_MODEL,
    CONFIG_FILE,
    EVAL_DIR,
    FINAL_MODEL,
    HISTORY_FILE,
    LOG_DIR,
    load_run_config,
    load_run_model,
)
from caaxr_tf.tasks import Task, task_of_run

MODEL_FILES = {"best": BEST_MODEL, "final": FINAL_MODEL}


@dataclass(frozen=True)
class RunSettings:
    """What readers of a run folder use of its config.yaml, typed (a run of an older version
    may lack keys: the defaults below are the readers' long-standing fallbacks)."""

    tfrecords: str = ""
    task: str = ""
    model: str = ""
    protocol: str = ""
    fold: int = 1
    image_size: int = IMAGE_SIZE
    batch_size: int = 32
    class_names: list[str] = field(default_factory=list)
    target_names: list[str] = field(default_factory=list)
    target_ranges: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any], where: Path) -> "RunSettings":
        if not isinstance(config, Mapping):
            raise ValueError(f"{where} is not a mapping: not a run folder written by caaxr_tf.train")
        return cls(
            tfrecords=str(config.get("tfrecords") or ""),
            task=str(config.get("task") or ""),
            model=str(config.get("model") or ""),
            protocol=str(config.get("protocol") or ""),
            fold=int(config.get("fold") or 1),
            image_size=int(config.get("image_size") or IMAGE_SIZE),
            batch_size=int(config.get("batch_size") or 32),
            class_names=[str(c) for c in config.get("class_names") or []],
            target_names=[str(t) for t in config.get("target_names") or []],
            target_ranges={str(k): [float(b) for b in v] for k, v in (config.get("target_ranges") or {}).items()},
        )


class Run:
    """A run folder (see the module docstring). ``FileNotFoundError`` for a missing folder or
    config.yaml, ``ValueError`` for a config.yaml that is not a run's."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            raise FileNotFoundError(f"run folder {self.path} does not exist")
        self.config: dict[str, Any] = load_run_config(self.path)  # the whole mapping, as written
        self.settings = RunSettings.from_mapping(self.config, self.path / CONFIG_FILE)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ------------------------------------------------------------------ the records

    @property
    def protocol_dir(self) -> Path:
        """The records the run trained on (config.yaml ``tfrecords``)."""
        if not self.settings.tfrecords:
            raise ValueError(f"{self.path / CONFIG_FILE} has no 'tfrecords' entry: not a run folder written by "
                             "caaxr_tf.train")
        return Path(self.settings.tfrecords)

    @functools.cached_property
    def protocol(self) -> ProtocolSummary:
        """The summary.json of the run's records, read once."""
        return ProtocolSummary.read(self.protocol_dir)

    def locate_protocol(self, tfrecords: str | Path | None) -> Path:
        """Other records for this run (``TFRECORDS`` or ``TFRECORDS/<the run's protocol>``;
        None: the run's own)."""
        if tfrecords is None:
            return self.protocol_dir
        return locate_protocol(tfrecords, self.settings.protocol or None)

    # ------------------------------------------------------------------ the task

    def _records(self) -> ProtocolSummary | None:
        """The records' summary where the config.yaml lacks a setting; None when the run names
        no records or they are gone (an exported run needs only its config and model)."""
        if not self.settings.tfrecords or not (self.protocol_dir / SUMMARY_FILE).exists():
            return None
        return self.protocol

    @property
    def task_name(self) -> str:
        records = None if self.settings.task else self._records()
        return self.settings.task or (records.task if records else "")

    @property
    def class_names(self) -> list[str]:
        """The run's classes (config.yaml), else its records'."""
        records = None if self.settings.class_names else self._records()
        return list(self.settings.class_names or (records.classes if records else []))

    def task_arguments(self) -> dict[str, Any]:
        """The keyword arguments every Task of this run gets besides its class names."""
        records = None if self.settings.target_names else self._records()
        arguments: dict[str, Any] = {"target_names": self.settings.target_names or (records.target_names if records
                                                                                      else [])}
        if self.settings.target_ranges:
            arguments["target_ranges"] = self.settings.target_ranges
        return arguments

    def task_class(self) -> type[Task]:
        """The registered task class of the run (an unknown task is a ValueError listing the known ones)."""
        return task_of_run(self.task_name, self.settings.model or None)

    def task(self) -> Task:
        """The run's Task: the one place a run's task is built, with its class names, target
        names and ranges (serving clamps regression outputs to the ranges; so does evaluation).
        A config.yaml the task rejects is a ValueError naming the file."""
        task_class = self.task_class()
        try:
            return task_class(self.class_names, **self.task_arguments())
        except ValueError as error:
            raise ValueError(f"{self.path / CONFIG_FILE}: {error}") from None

    # ------------------------------------------------------------------ the model

    def model_path(self, which: str = "best") -> Path:
        if which not in MODEL_FILES:
            raise ValueError(f"unknown model file {which!r}; expected one of {', '.join(MODEL_FILES)}")
        return self.path / MODEL_FILES[which]

    def model(self, which: str = "best"):
        """The best (or final) model, custom objects registered, not compiled."""
        self.model_path(which)
        return load_run_model(self.path, which)

    def predictor(self, which: str = "best", model: Any = None) -> Callable[[Any], Any]:
        """``images -> numpy outputs`` of the ``which`` model (or ``model``) through one graph."""
        return predict_function(self.model(which) if model is None else model)

    # ------------------------------------------------------------------ data

    def dataset(self, split: str, *, task: Task | None = None, protocol_dir: str | Path | None = None,
                batch_size: int | None = None, fold: int | None = None, **kwargs: Any):
        """Batches of the run's fold of ``split`` for evaluation (no shuffling, augmentation or
        cache): the run's own records unless ``protocol_dir``; ``task`` defaults to `task`."""
        options = dict(training=False, augment=False, cache=False, image_size=self.settings.image_size)
        options.update(kwargs)
        return make_dataset(self.protocol_dir if protocol_dir is None else protocol_dir, split,
                            fold=self.settings.fold if fold is None else fold,
                            batch_size=int(batch_size or self.settings.batch_size),
                            task=self.task() if task is None else task, **options)

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_DIR


def open_run(run: "str | Path | Run") -> Run:
    """A Run as given, or the Run of a folder."""
    return run if isinstance(run, Run) else Run(run)

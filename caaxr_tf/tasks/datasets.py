"""Datasets of a protocol split for a task given by name (or the protocol's own task).

`caaxr_tf.data.pipeline.make_dataset` takes a Task object and names no task; this module is
the convenience above it that resolves a registered task name, or None for the protocol's own
task, against the protocol's summary.json (moved here from the pipeline, which is below the
task layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tensorflow as tf

from caaxr_tf.data import pipeline
from caaxr_tf.data.schema import read_summary
from caaxr_tf.tasks.base import Task, get_task


def resolve_task(task: "str | Task | None", summary: dict[str, Any], tfrecord_dir: str | Path,
                 max_boxes: int | None = None) -> Task:
    """The task whose targets a dataset yields: a Task as given, a registered task name, or
    (None) the protocol's own task. A task that cannot run on the protocol is a ValueError."""
    if task is not None and not isinstance(task, str):
        return task
    task_class = get_task(task or summary["task"])
    if task_class.protocol_task != summary["task"]:
        raise ValueError(f"{tfrecord_dir} holds a {summary['task']} protocol; it has no masks or targets "
                         f"for task {task_class.name!r}")
    options = {"max_boxes": max_boxes} if max_boxes is not None else {}
    return task_class(summary["classes"], target_names=summary.get("target_names") or (), **options)


def make_dataset(tfrecord_dir: str | Path, split: str, *, task: "str | Task | None" = None,
                 max_boxes: int | None = None, **kwargs: Any) -> tf.data.Dataset:
    """`caaxr_tf.data.pipeline.make_dataset` with ``task`` a Task, a registered task name or
    None (the protocol's own task); ``max_boxes`` is the detection task's option."""
    summary = read_summary(tfrecord_dir)
    return pipeline.make_dataset(tfrecord_dir, split, task=resolve_task(task, summary, tfrecord_dir, max_boxes),
                                 **kwargs)

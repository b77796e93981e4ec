"""Registered tasks: what is predicted, and everything that depends on it (see ``base``).

    from caaxr_tf.tasks import get_task, task_for
    task = get_task("segmentation")(class_names=["lesion"])

Task modules are imported on first use of the registry, not here: the data pipeline imports
this package to resolve task names, and the task modules import the pipeline.
"""

from caaxr_tf.tasks.base import (
    TASKS,
    EvalContext,
    EvalResult,
    Task,
    UnknownTaskError,
    available_tasks,
    get_task,
    register_task,
    task_for,
    task_of_run,
)

__all__ = [
    "TASKS",
    "EvalContext",
    "EvalResult",
    "Task",
    "UnknownTaskError",
    "available_tasks",
    "get_task",
    "register_task",
    "task_for",
    "task_of_run",
]

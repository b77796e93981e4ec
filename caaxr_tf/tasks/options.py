"""The tasks' own options on the evaluate and export command lines (see `Task.add_arguments`):
the generic commands add and read every registered task's options without naming a task."""

from __future__ import annotations

import argparse
from typing import Any

from caaxr_tf.tasks.base import available_tasks, get_task


def _task_classes() -> list[type]:
    """The registered task classes, one per own `Task.add_arguments` (a subclass inheriting
    its parent's options adds them once)."""
    classes, seen = [], set()
    for name in available_tasks():
        cls = get_task(name)
        hook = cls.__dict__.get("add_arguments") or next(
            (base.__dict__["add_arguments"] for base in cls.__mro__ if "add_arguments" in base.__dict__), None)
        if hook not in seen:
            seen.add(hook)
            classes.append(cls)
    return classes


def add_task_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Every registered task's own options on the ``command`` command line."""
    for cls in _task_classes():
        cls.add_arguments(parser, command)


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The task options given on the command line (unset ones left out)."""
    options: dict[str, Any] = {}
    for cls in _task_classes():
        options.update(cls.options_from_args(args))
    return options

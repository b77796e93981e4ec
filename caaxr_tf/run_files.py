"""The files of a run folder written by ``caaxr_tf.train`` (opened through `caaxr_tf.runs.Run`).

    RUN_DIR/config.yaml    resolved configuration (see docs/run_dir.md)
    RUN_DIR/best.keras     best model by the monitored validation metric
    RUN_DIR/final.keras    model after the last epoch
    RUN_DIR/history.csv    one row per epoch
    RUN_DIR/logs/          TensorBoard event files (train/, validation/)
    RUN_DIR/backup/        checkpoints to resume an interrupted run (removed when it completes)
    RUN_DIR/eval/          metrics.json and plots from ``caaxr_tf.evaluate``
    RUN_DIR/calibration.json  temperature and operating thresholds from ``caaxr calibrate``
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import yaml

import caaxr_tf.metrics  # noqa: F401  (registers custom objects)
import caaxr_tf.models  # noqa: F401

CONFIG_FILE = "config.yaml"
BEST_MODEL = "best.keras"
FINAL_MODEL = "final.keras"
HISTORY_FILE = "history.csv"
LOG_DIR = "logs"
BACKUP_DIR = "backup"
EVAL_DIR = "eval"
CALIBRATION_FILE = "calibration.json"


def load_run_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a run folder written by caaxr_tf.train")
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def load_run_model(run_dir: str | Path, which: str = "best"):
    """Load the best (or final) model of a run, with the project's custom objects registered."""
    path = Path(run_dir) / (BEST_MODEL if which == "best" else FINAL_MODEL)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the run in {run_dir} has not saved a {which} model yet")
    return keras.saving.load_model(path, compile=False)

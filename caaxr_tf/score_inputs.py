"""What ``caaxr score`` reads: a protocol's labels (`load_protocol`) and a predictions file
(`read_predictions`), and the error a file that cannot be scored raises (`PredictionsError`).

Apart from `caaxr_tf.scoring` so that the scorers of each kind of prediction
(`caaxr_tf.scoring`, `caaxr_tf.scoring_tasks`) share them without importing each other.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

MANIFEST_FILE = "manifest.csv"
SUMMARY_FILE = "summary.json"
DEFAULT_TOLERANCE = 1e-3
DEFAULT_MAX_MISSING = 0.05
MAX_LISTED = 20


class PredictionsError(ValueError):
    """A predictions file that cannot be scored; the message lists the problems by id and field."""


@dataclass
class Protocol:
    """What scoring needs from a protocol folder: its classes and the manifest rows of a split."""

    path: Path
    task: str
    class_names: list[str]
    rows: list[dict[str, str]]  # manifest rows of the split, in manifest order
    split: str
    fold: int

    @property
    def ids(self) -> list[str]:
        return [r["image_id"] for r in self.rows]


def load_protocol(protocol_dir: str | Path, split: str = "test", fold: int = 1) -> Protocol:
    """The protocol's summary.json classes and the manifest rows of ``split`` in ``fold``."""
    protocol_dir = Path(protocol_dir)
    summary_path, manifest_path = protocol_dir / SUMMARY_FILE, protocol_dir / MANIFEST_FILE
    for path in (summary_path, manifest_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --protocol must be a protocol folder TFRECORDS/PROTOCOL")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    with open(manifest_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    column = f"split_fold{fold}"
    if rows and column not in rows[0]:
        folds = sorted(k for k in rows[0] if k.startswith("split_fold"))
        raise ValueError(f"{manifest_path} has no fold {fold} (columns {', '.join(folds)})")
    chosen = [r for r in rows if r.get(column) == split]
    if not chosen:
        raise ValueError(f"no images in the {split} split of fold {fold} in {manifest_path}")
    return Protocol(protocol_dir, str(summary.get("task", "classification")), [str(c) for c in summary.get("classes", [])],
                    chosen, split, fold)


def read_predictions(path: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, records)`` of a CSV or JSON-lines predictions file (values as read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} not found")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        records, columns = [], []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PredictionsError(f"{path}: line {number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise PredictionsError(f"{path}: line {number}: not a JSON object")
            records.append(record)
            columns += [k for k in record if k not in columns]
        return columns, records
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        records = list(reader)
        return list(reader.fieldnames or []), records


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")

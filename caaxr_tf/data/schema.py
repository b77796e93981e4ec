"""The on-disk contract shared by the shard writer and every reader of the shards.

Under ``TFRECORDS/<protocol>/``: ``summary.json`` (classes, task, counts, the shard files of
each split), ``manifest.csv`` (one row per image) and the shards, whose records follow
``feature_spec``. The writer (``caaxr_tf.data.tfrecords``) and the readers (the tf.data
pipeline, evaluation, export) both import this module; it imports neither of them, nor
OpenCV, and TensorFlow only inside ``feature_spec``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"
MANIFEST_FILE = "manifest.csv"
SPLITS = ("train", "val", "test")
GROUPED_HALVES = "grouped_halves"  # summary.json split_scheme of protocols with half splits
ALL_SHARDS = "all"  # their one set of shards, holding every record once


def feature_spec() -> dict:
    """The tf.train.Example schema of every record.

    ``mask/encoded`` (a PNG mask at the stored image's size, for sources with pixel-level
    masks) and ``targets`` (float targets of regression protocols, named by the summary's
    ``target_names``) are written only by protocols that have them; other records parse them
    as empty.
    """
    import tensorflow as tf

    scalar_int = tf.io.FixedLenFeature([], tf.int64)
    scalar_str = tf.io.FixedLenFeature([], tf.string)
    return {
        "image/encoded": scalar_str,
        "image/format": tf.io.FixedLenFeature([], tf.string, default_value="png"),
        "image/bit_depth": scalar_int,
        "image/invert": scalar_int,
        "image/height": scalar_int,
        "image/width": scalar_int,
        "image/original_height": scalar_int,
        "image/original_width": scalar_int,
        "image/id": scalar_str,
        "image/source": scalar_str,
        "patient/id": scalar_str,
        "label": scalar_int,
        "label/name": scalar_str,
        "bbox/xmin": tf.io.VarLenFeature(tf.float32),
        "bbox/ymin": tf.io.VarLenFeature(tf.float32),
        "bbox/xmax": tf.io.VarLenFeature(tf.float32),
        "bbox/ymax": tf.io.VarLenFeature(tf.float32),
        "bbox/finding": tf.io.VarLenFeature(tf.string),
        "findings": tf.io.VarLenFeature(tf.string),
        "mask/encoded": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "targets": tf.io.VarLenFeature(tf.float32),
        "series/id": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "slice/index": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    }


def read_summary_file(path: str | os.PathLike) -> dict[str, Any]:
    """A protocol's summary.json; ``ValueError`` naming the file when it cannot be read."""
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"{path}: cannot be read as JSON ({error})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(summary).__name__}")
    return summary


def read_summary(tfrecord_dir: str | os.PathLike) -> dict[str, Any]:
    """The summary.json of a protocol folder; errors name the file."""
    path = Path(tfrecord_dir) / SUMMARY_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {tfrecord_dir} is not a protocol folder written by tools/make_tfrecords.py"
        )
    return read_summary_file(path)


def split_key(split: str, fold: int) -> str:
    """The summary's key of a split: ``test`` or ``fold<k>/<split>``."""
    return "test" if split == "test" else f"fold{fold}/{split}"


def shard_files(tfrecord_dir: str | os.PathLike, split: str, fold: int = 1) -> list[str]:
    """The shard files of one split; a clear error when the split, fold or shards are missing."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    tfrecord_dir = Path(tfrecord_dir)
    summary = read_summary(tfrecord_dir)
    if split != "test" and not 1 <= fold <= int(summary["folds"]):
        raise ValueError(f"fold {fold} does not exist in {tfrecord_dir}: it has folds 1..{summary['folds']}")
    key = split_key(split, fold)
    names = summary["shards"].get(key, [])
    if summary.get("split_scheme") == GROUPED_HALVES:
        if split == "test" and not 1 <= fold <= int(summary["folds"]):
            raise ValueError(f"fold {fold} does not exist in {tfrecord_dir}: it has folds 1..{summary['folds']}")
        key, names = f"fold{fold}/{split}", summary["shards"].get(ALL_SHARDS, [])
    files = [str(tfrecord_dir / name) for name in names]
    missing = [f for f in files if not Path(f).exists()]
    if not files or missing:
        what = "no shards" if not files else f"missing shard {missing[0]}"
        raise FileNotFoundError(f"{tfrecord_dir}: {what} for split {key}")
    return files


def split_members(summary: dict[str, Any], split: str, fold: int = 1) -> list[str] | None:
    """The image ids of a split of a ``grouped_halves`` protocol (whose shards hold every record
    once; fold k's train, val and test are chosen by id), None for other protocols.

    Fold k of such a protocol is the grouped random half split with seed k - 1: ``test`` is
    its test half, ``train`` and ``val`` share its training half.
    """
    if summary.get("split_scheme") != GROUPED_HALVES:
        return None
    key = f"fold{fold}/{split}"
    members = (summary.get("split_members") or {}).get(key)
    if members is None:
        raise ValueError(f"summary.json of protocol {summary.get('protocol')!r} lists no members for {key}")
    return [str(image_id) for image_id in members]

"""Checking TFRecord shards against their protocol's summary.json, and naming a bad one.

``tools/make_tfrecords.py`` records each shard's record count, size and SHA-256 in
``summary.json`` (``shard_files``). ``verify_protocol`` reads every shard back: TensorFlow's
reader checks each record's framing (length and the masked CRC32C of the length and of the
data), and the count, size and digest are compared with the summary. A cheap form (existence
and size only) runs on every rerun.

While training or evaluating, TensorFlow reports a damaged shard as a ``DataLossError``
that does not say which file it was; ``naming_corrupt_shards`` re-raises it naming the
shard(s) and the command that rebuilds them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

VERIFY_HINT = "rebuild it with tools/make_tfrecords.py --verify (same arguments)"


@dataclass(frozen=True)
class ShardProblem:
    """One shard that is missing or does not hold what summary.json says."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_info(path: str | os.PathLike, records: int) -> dict[str, Any]:
    """What summary.json records about one shard: records, bytes, sha256."""
    return {"records": int(records), "bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def count_records(path: str | os.PathLike) -> int:
    """Records in a TFRecord file, every record's length and data CRC checked.

    Raises ``tf.errors.DataLossError`` for a truncated or corrupted file.
    """
    import tensorflow as tf

    dataset = tf.data.TFRecordDataset(str(path))
    return int(dataset.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1).numpy())


def check_shard(path: str | os.PathLike, expected: Mapping[str, Any] | None = None, *, full: bool = True) -> str | None:
    """Why ``path`` is not the shard ``expected`` describes (None when it is).

    ``full=False`` checks existence and size only; ``full=True`` also reads every record
    (CRCs) and compares the record count and SHA-256.
    """
    import tensorflow as tf

    path = Path(path)
    if not path.is_file():
        return "missing"
    expected = expected or {}
    size = path.stat().st_size
    if "bytes" in expected and size != int(expected["bytes"]):
        return f"{size} bytes, summary.json says {int(expected['bytes'])} (truncated or replaced)"
    if not full:
        return None
    try:
        records = count_records(path)
    except tf.errors.DataLossError as error:
        return f"corrupt TFRecord data ({error.message.strip().split(' [Op:')[0]})"
    if "records" in expected and records != int(expected["records"]):
        return f"{records} records, summary.json says {int(expected['records'])}"
    if "sha256" in expected and file_sha256(path) != expected["sha256"]:
        return "contents differ from the SHA-256 in summary.json (records read back without CRC errors)"
    return None


def verify_protocol(protocol_dir: str | os.PathLike, summary: Mapping[str, Any], *, full: bool = True) -> list[ShardProblem]:
    """Every shard of a protocol checked against ``summary`` (its summary.json).

    Summaries written before per-shard entries existed give no sizes or digests: their
    shards are still read back and each split's total compared with ``counts``.
    """
    protocol_dir = Path(protocol_dir)
    recorded = summary.get("shard_files") or {}
    problems: list[ShardProblem] = []
    checked: set[str] = set()  # part shards are listed under several folds: read each once
    for split, names in (summary.get("shards") or {}).items():
        split_problems, total = [], 0
        for name in names:
            if recorded and name in checked:
                continue
            checked.add(name)
            path = protocol_dir / name
            reason = check_shard(path, recorded.get(name), full=full)
            if reason is not None:
                split_problems.append(ShardProblem(str(path), reason))
            elif full and not recorded:
                total += count_records(path)
        expected = _split_total(summary, split)
        if full and not recorded and not split_problems and expected is not None and total != expected:
            split_problems.append(ShardProblem(str(protocol_dir / split), f"{total} records, summary.json counts {expected}"))
        problems.extend(split_problems)
    return problems


def _split_total(summary: Mapping[str, Any], split: str) -> int | None:
    counts = summary.get("counts") or {}
    if split == "test":
        return sum((counts.get("test") or {}).values())
    fold, _, part = split.partition("/")
    values = ((counts.get(fold) or {}).get(part)) if part else None
    return sum(values.values()) if isinstance(values, Mapping) else None


def find_corrupt_shards(files: Iterable[str | os.PathLike]) -> list[ShardProblem]:
    """The files among ``files`` that cannot be read through (missing, truncated, bad CRC)."""
    problems = []
    for path in files:
        reason = check_shard(path, None, full=True)
        if reason is not None:
            problems.append(ShardProblem(str(path), reason))
    return problems


@contextlib.contextmanager
def naming_corrupt_shards(files: Iterable[str | os.PathLike]) -> Iterator[None]:
    """Re-raise a ``DataLossError`` from reading ``files`` with the damaged shard(s) named."""
    import tensorflow as tf

    files = [str(f) for f in files]
    try:
        yield
    except tf.errors.DataLossError as error:
        problems = find_corrupt_shards(files)
        if problems:
            named = "; ".join(str(p) for p in problems)
            message = f"corrupt TFRecord shard{'s' if len(problems) > 1 else ''}: {named}; {VERIFY_HINT}"
        else:
            message = f"reading the TFRecord shards failed ({error.message.strip()}); {VERIFY_HINT}"
        raise tf.errors.DataLossError(None, None, message) from error

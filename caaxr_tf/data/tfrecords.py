"""TFRecord shards for every protocol and fold.

Layout under ``out_dir/<protocol>/``::

    test-00000-of-00004.tfrecord ...          the fixed test set, written once
    fold1/train-00000-of-00008.tfrecord ...   fold k: training and validation shards
    fold1/val-00000-of-00002.tfrecord ...
    manifest.csv                               image_id, patient_id, source, label, split_fold1, ...
    summary.json                               counts per split and class, skipped inputs, warnings

Every file is written under a temporary name and renamed when complete; ``summary.json`` comes
last, so its presence means the protocol is complete. A rerun with the same arguments and inputs
finds the summary's fingerprint unchanged and skips the protocol; an interrupted run keeps the
shards it finished and writes the rest (the bytes are the same either way).
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import json
import multiprocessing
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from caaxr_tf.config import load_config
from caaxr_tf.data import protocols as protocols_lib
from caaxr_tf.data.records import ReadResult, Sample, Skipped
from caaxr_tf.data.staging import StagedImage, stage_task

FORMAT_VERSION = 2  # 2: image/encoded may hold the source JPEG/PNG bytes
STAGING_DIR = ".staging"


def feature_spec() -> dict:
    """The tf.train.Example schema of every record."""
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
    }


def make_example(sample: Sample, staged: StagedImage, encoded: bytes, label: int, label_name: str) -> bytes:
    """Serialise one record."""
    import tensorflow as tf

    def ints(*values: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))

    def floats(values: Iterable[float]) -> tf.train.Feature:
        return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))

    def strings(*values: str) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8") for v in values]))

    boxes = np.asarray(staged.boxes, dtype=np.float32).reshape(-1, 4)
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/format": strings(staged.format),
        "image/bit_depth": ints(staged.bit_depth),
        "image/invert": ints(int(sample.invert)),
        "image/height": ints(staged.height),
        "image/width": ints(staged.width),
        "image/original_height": ints(staged.original_height),
        "image/original_width": ints(staged.original_width),
        "image/id": strings(sample.image_id),
        "image/source": strings(sample.source),
        "patient/id": strings(sample.patient_id),
        "label": ints(label),
        "label/name": strings(label_name),
        "bbox/xmin": floats(boxes[:, 0]),
        "bbox/ymin": floats(boxes[:, 1]),
        "bbox/xmax": floats(boxes[:, 2]),
        "bbox/ymax": floats(boxes[:, 3]),
        "bbox/finding": strings(*staged.box_findings),
        "findings": strings(*sample.findings),
    }
    # deterministic=True sorts the feature map by key; otherwise protobuf writes it in an order
    # that depends on the process's hash seed, and two builds differ byte for byte.
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def shard_names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i:05d}-of-{count:05d}.tfrecord" for i in range(count)]


def num_shards(num_records: int, records_per_shard: int) -> int:
    """At least two shards when there are two records, so two workers can split a split by file."""
    if num_records == 0:
        return 0
    return max(min(2, num_records), -(-num_records // max(1, records_per_shard)))


def write_atomic_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# --- reading the sources -----------------------------------------------------------------


def read_sources(source: str, data_root: Path, needed: Iterable[str], data_config: Mapping[str, Any]) -> dict[str, ReadResult]:
    """Run the reader of every source a protocol set needs. Schema errors propagate."""
    results: dict[str, ReadResult] = {}
    for name in sorted(set(needed)):
        if name == "caaxr":
            from caaxr_tf.data.caaxr import read_caaxr

            results[name] = read_caaxr(data_root, data_config)
        elif name == "chexpert":
            from caaxr_tf.data.chexpert import read_chexpert

            section = data_config["chexpert"]
            results[name] = read_chexpert(data_root / section.get("root", "chexpert"), section)
        elif name == "covid-chestxray":
            from caaxr_tf.data.covid_chestxray import read_covid_chestxray

            section = data_config["covid_chestxray"]
            results[name] = read_covid_chestxray(data_root / section.get("root", "."), section)
        else:
            raise ValueError(f"no reader for source {name!r} (source set {source!r})")
    return results


# --- staging -----------------------------------------------------------------------------


class Stager:
    """Decodes images once per run (in parallel processes) and remembers the outcome."""

    def __init__(self, staging_dir: Path, storage_size: int, workers: int, progress: bool):
        self.staging_dir = staging_dir
        self.storage_size = storage_size
        self.workers = max(1, workers)
        self.progress = progress
        self.staged: dict[str, StagedImage | None] = {}
        self.dropped: dict[str, list[Skipped]] = {}
        self._pool = None

    def start(self) -> None:
        """Start the worker processes now, so their start-up overlaps the reading of the CSVs."""
        if self.workers > 1 and self._pool is None:
            # spawn, not fork: the parent may hold TensorFlow's threads
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)

    def stage(self, samples: Sequence[Sample], description: str) -> None:
        todo = [s for s in samples if s.image_id not in self.staged]
        if not todo:
            return
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        tasks = [(s, str(self.staging_dir), self.storage_size) for s in todo]
        if self.workers == 1 or len(tasks) < 2:
            results: Iterable = map(stage_task, tasks)
        else:
            self.start()
            results = self._pool.imap_unordered(stage_task, tasks, chunksize=4)
        for image_id, staged, dropped in tqdm(
            results, total=len(tasks), desc=description, unit="img", disable=not self.progress, leave=False
        ):
            self.staged[image_id] = staged
            self.dropped[image_id] = dropped

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


# --- one protocol ------------------------------------------------------------------------


def fingerprint(payload: Mapping[str, Any], members: Mapping[str, Sequence[Sample]]) -> str:
    """Hash of the arguments and of every candidate input file (path, size, mtime)."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8"))
    for class_name in sorted(members):
        for sample in members[class_name]:
            try:
                stat = os.stat(sample.path)
                file_state = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                file_state = "missing"
            digest.update(f"{class_name}|{sample.image_id}|{sample.path}|{file_state}|{sample!r}\n".encode("utf-8"))
    return digest.hexdigest()


def is_complete(protocol_dir: Path, expected_fingerprint: str) -> bool:
    summary_path = protocol_dir / "summary.json"
    if not summary_path.exists():
        return False
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if summary.get("fingerprint") != expected_fingerprint:
        return False
    return all((protocol_dir / name).exists() for names in summary.get("shards", {}).values() for name in names)


def select_and_stage(
    spec: protocols_lib.ProtocolSpec,
    members: Mapping[str, Sequence[Sample]],
    stager: Stager,
    seed: int,
) -> tuple[dict[str, list[Sample]], list[Skipped], list[str]]:
    """Draw each class up to its target, replacing images that fail to decode or lose all
    their boxes, from the same seeded order. Returns the chosen samples (with only their valid
    boxes), what was skipped and warnings."""
    chosen: dict[str, list[Sample]] = {}
    skipped: list[Skipped] = []
    warnings: list[str] = []
    needs_boxes = spec.task == "segmentation"
    for class_spec in spec.classes:
        order = protocols_lib.candidate_order(members[class_spec.name], seed, spec.source, spec.name, class_spec.name)
        target = len(order) if class_spec.count is None else class_spec.count
        picked: list[Sample] = []
        position = 0
        while len(picked) < target and position < len(order):
            batch = order[position : position + (target - len(picked))]
            position += len(batch)
            stager.stage(batch, f"{spec.name}/{class_spec.name}: decoding")
            for sample in batch:
                staged = stager.staged[sample.image_id]
                skipped.extend(stager.dropped.get(sample.image_id, []))
                if staged is None:
                    continue
                if needs_boxes and sample.boxes and not staged.boxes:
                    skipped.append(Skipped(sample.path, "boxes", "no valid box left; image left out of seg"))
                    continue
                picked.append(sample)
        if class_spec.count is not None and len(picked) < class_spec.count:
            warnings.append(
                f"{spec.name}: class {class_spec.name}: only {len(picked)} usable images for a target "
                f"of {class_spec.count}; using all of them"
            )
        chosen[class_spec.name] = sorted(picked, key=lambda s: s.image_id)
    # the same file may be reported twice when several classes stage it; keep one line each
    unique = list(dict.fromkeys(skipped))
    return chosen, unique, warnings


def write_protocol(
    spec: protocols_lib.ProtocolSpec,
    chosen: Mapping[str, Sequence[Sample]],
    stager: Stager,
    protocol_dir: Path,
    seed: int,
    records_per_shard: int,
    progress: bool,
) -> tuple[dict[str, list[str]], dict[str, Any], list[dict[str, str]]]:
    """Split, write the manifest and the shards. Returns shard names, counts and manifest rows."""
    class_names = spec.class_names
    items = [(s.image_id, s.patient_id, c) for c in class_names for s in chosen[c]]
    parts = protocols_lib.assign_parts(items, class_names, spec.test_fraction, spec.num_parts, seed)

    rows: list[dict[str, str]] = []
    by_split: dict[str, list[tuple[Sample, int, str]]] = {"test": []}
    for fold in range(1, spec.folds + 1):
        by_split[f"fold{fold}/train"] = []
        by_split[f"fold{fold}/val"] = []
    for label, class_name in enumerate(class_names):
        for sample in chosen[class_name]:
            part = parts[sample.image_id]
            row = {
                "image_id": sample.image_id,
                "patient_id": sample.patient_id,
                "source": sample.source,
                "label": class_name,
                "label_index": str(label),
            }
            for fold in range(1, spec.folds + 1):
                split = protocols_lib.split_of(part, fold)
                row[f"split_fold{fold}"] = split
                key = "test" if split == "test" else f"fold{fold}/{split}"
                if split != "test" or fold == 1:
                    by_split[key].append((sample, label, class_name))
            for subset_name, subset in spec.subsets.items():
                box_findings = stager.staged[sample.image_id].box_findings
                row[f"subset_{subset_name}"] = str(int(protocols_lib.in_subset(box_findings, subset)))
            rows.append(row)
    rows.sort(key=lambda r: r["image_id"])

    protocol_dir.mkdir(parents=True, exist_ok=True)
    for leftover in protocol_dir.rglob("*.tmp"):  # from an interrupted run
        leftover.unlink()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["image_id"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic_text(protocol_dir / "manifest.csv", buffer.getvalue())

    import tensorflow as tf

    shards: dict[str, list[str]] = {}
    total = sum(len(v) for v in by_split.values())
    bar = tqdm(total=total, desc=f"{spec.name}: writing shards", unit="rec", disable=not progress, leave=False)
    for key, entries in by_split.items():
        entries = sorted(entries, key=lambda e: e[0].image_id)
        rng = np.random.default_rng(protocols_lib.stable_seed(seed, spec.source, spec.name, key))
        entries = [entries[i] for i in rng.permutation(len(entries))]
        count = num_shards(len(entries), records_per_shard)
        folder, prefix = (protocol_dir, key) if "/" not in key else (protocol_dir / key.split("/")[0], key.split("/")[1])
        folder.mkdir(parents=True, exist_ok=True)
        names = shard_names(prefix, count)
        relative = [str((folder / n).relative_to(protocol_dir)) for n in names]
        shards[key] = relative
        for index, name in enumerate(names):
            chunk = entries[index * len(entries) // count : (index + 1) * len(entries) // count]
            final = folder / name
            if final.exists():
                bar.update(len(chunk))
                continue
            temporary = folder / (name + ".tmp")
            with tf.io.TFRecordWriter(str(temporary)) as shard:
                for sample, label, class_name in chunk:
                    staged = stager.staged[sample.image_id]
                    with open(staged.encoded_path, "rb") as handle:
                        encoded = handle.read()
                    shard.write(make_example(sample, staged, encoded, label, class_name))
                    bar.update(1)
            os.replace(temporary, final)
    bar.close()

    counts: dict[str, Any] = {"total": dict(Counter(r["label"] for r in rows))}
    counts["test"] = dict(Counter(c for _, _, c in by_split["test"]))
    for fold in range(1, spec.folds + 1):
        counts[f"fold{fold}"] = {
            split: dict(Counter(c for _, _, c in by_split[f"fold{fold}/{split}"])) for split in ("train", "val")
        }
    for subset_name in spec.subsets:
        column = f"subset_{subset_name}"
        counts[f"subset_{subset_name}"] = {
            "test": sum(1 for r in rows if r[column] == "1" and r["split_fold1"] == "test"),
            "all": sum(1 for r in rows if r[column] == "1"),
        }
    return shards, counts, rows


def _write_and_summarize(
    spec: protocols_lib.ProtocolSpec,
    chosen: Mapping[str, Sequence[Sample]],
    stager: Stager,
    protocol_dir: Path,
    seed: int,
    records_per_shard: int,
    progress: bool,
    summary: dict[str, Any],
) -> None:
    """Write a protocol's shards, then fill in and write its summary.json (last: it marks the protocol complete)."""
    shards, counts, _ = write_protocol(spec, chosen, stager, protocol_dir, seed, records_per_shard, progress)
    summary.update(counts=counts, shards=shards)
    write_atomic_text(protocol_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=False) + "\n")


# --- the whole job -----------------------------------------------------------------------


def build_tfrecords(
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    source: str = "caaxr",
    protocols: Sequence[str] | str = "all",
    folds: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    storage_size: int = 512,
    records_per_shard: int = 256,
    data_overrides: Sequence[str] = (),
    protocol_overrides: Sequence[str] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Build the shards of the chosen protocols; returns each protocol's summary."""
    data_root, out_dir = Path(data_root), Path(out_dir)
    data_config = load_config("data", data_overrides)
    protocol_config = load_config("protocols", protocol_overrides)
    if folds is not None:
        protocol_config.setdefault("splits", {})["folds"] = int(folds)
    specs = protocols_lib.load_protocols(source, protocol_config)
    names = list(specs) if protocols in ("all", ["all"], ("all",)) else [protocols] if isinstance(protocols, str) else list(protocols)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"unknown protocol(s) {', '.join(unknown)} for source {source}; known: {', '.join(specs)}")
    if not data_root.is_dir():
        raise FileNotFoundError(f"data root not found: {data_root}")

    stager = Stager(out_dir / STAGING_DIR, storage_size, workers or os.cpu_count() or 1, progress)
    stager.start()
    import tensorflow  # noqa: F401  (here, while the workers start, rather than in the writer thread)

    # Shards of protocol N are written in a thread while the workers decode protocol N + 1.
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
    pending: dict[str, concurrent.futures.Future] = {}
    summaries: dict[str, dict[str, Any]] = {}
    try:
        # Read everything first: a schema error stops the run before anything is written.
        needed = {c.source for n in names for c in specs[n].classes}
        readings = read_sources(source, data_root, needed, data_config)
        for name, reading in readings.items():
            log(f"read {name}: {len(reading.samples)} images, {len(reading.skipped)} skipped, excluded {reading.excluded or 'none'}")
            for item in reading.skipped[:5]:
                log(f"  skipped {item}")
            if len(reading.skipped) > 5:
                log(f"  ... and {len(reading.skipped) - 5} more (see summary.json)")
        samples_by_source = {name: reading.samples for name, reading in readings.items()}

        for name in names:
            spec = specs[name]
            members, excluded = protocols_lib.classify(spec, samples_by_source)
            payload = {
                "format_version": FORMAT_VERSION,
                "source": source,
                "protocol": asdict(spec),
                "seed": seed,
                "storage_size": storage_size,
                "records_per_shard": records_per_shard,
            }
            stamp = fingerprint(payload, members)
            protocol_dir = out_dir / name
            if is_complete(protocol_dir, stamp):
                summary = json.loads((protocol_dir / "summary.json").read_text(encoding="utf-8"))
                log(f"{name}: up to date, skipped (delete {protocol_dir} to rebuild)")
                summaries[name] = summary
                continue
            chosen, skipped, warnings = select_and_stage(spec, members, stager, seed)
            for warning in warnings:
                log(f"WARNING: {warning}")
            reader_skips = [s for src in spec.sources for s in readings[src].skipped]
            reader_excluded: Counter = Counter()
            for src in spec.sources:
                reader_excluded.update({f"{src}: {k}": v for k, v in readings[src].excluded.items()})
            reader_excluded.update(excluded)
            summary = {
                "protocol": name,
                "source": source,
                "task": spec.task,
                "classes": spec.class_names,
                "targets": {c.name: c.count for c in spec.classes},
                "folds": spec.folds,
                "seed": seed,
                "storage_size": storage_size,
                "counts": None,
                "shards": None,
                "subsets": {k: dict(v) for k, v in spec.subsets.items()},
                "warnings": warnings,
                "excluded": dict(sorted(reader_excluded.items())),
                "skipped": [s.as_dict() for s in reader_skips + skipped],
                "fingerprint": stamp,
            }
            pending[name] = writer.submit(
                _write_and_summarize, spec, chosen, stager, protocol_dir, seed, records_per_shard, progress, summary
            )
            summaries[name] = summary
        for name, future in pending.items():
            future.result()
            log(format_counts(summaries[name]))
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        stager.close()
    shutil.rmtree(out_dir / STAGING_DIR, ignore_errors=True)
    return summaries


def format_counts(summary: Mapping[str, Any]) -> str:
    """A small table: one row per class, one column per split."""
    classes = summary["classes"]
    counts = summary["counts"]
    columns = ["total", "test"]
    for fold in range(1, summary["folds"] + 1):
        columns += [f"fold{fold}/train", f"fold{fold}/val"]

    def cell(column: str, class_name: str) -> int:
        if "/" in column:
            fold, split = column.split("/")
            return counts[fold][split].get(class_name, 0)
        return counts[column].get(class_name, 0)

    width = max(10, *(len(c) for c in classes))
    lines = [f"{summary['protocol']} ({summary['task']}, {len(summary['skipped'])} skipped inputs)"]
    lines.append(f"  {'class':<{width}} " + " ".join(f"{c:>12}" for c in columns))
    for class_name in classes:
        lines.append(f"  {class_name:<{width}} " + " ".join(f"{cell(c, class_name):>12}" for c in columns))
    for key, value in counts.items():
        if key.startswith("subset_"):
            lines.append(f"  subset {key[7:]}: {value['test']} test images")
    return "\n".join(lines)

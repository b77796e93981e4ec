"""TFRecord shards for every protocol and fold: ``build_tfrecords`` and the ``caaxr-make-tfrecords``
command (``python tools/make_tfrecords.py``).

Layout under ``out_dir/<protocol>/``::

    test-00000-of-00004.tfrecord ...          the fixed test set, written once
    fold1/train-00000-of-00008.tfrecord ...   fold k: training and validation shards
    fold1/val-00000-of-00002.tfrecord ...
    manifest.csv                               image_id, patient_id, source, label, split_fold1, ...
                                               (and view, sex, age where the source gives them)
    summary.json                               counts per split and class, skipped inputs, warnings

The sources are read through the source registry (``caaxr_tf.data.sources``), the protocols
come from caaxr_tf/configs/protocols.yaml (``caaxr_tf.data.protocols``), the record schema is
``caaxr_tf.data.schema.feature_spec``. Records gain ``mask/encoded`` in protocols whose samples
have pixel masks, ``targets`` in regression protocols and ``series/id``/``slice/index`` for
slice sources; the records of other protocols are as before, byte for byte.

Every file is written under a temporary name and renamed when complete; ``summary.json`` comes
last, so its presence means the protocol is complete. A run produces exactly what its arguments
say, or refuses before writing anything:

* same arguments and inputs (the summary's fingerprint) and intact shards: "up to date";
* same fingerprint but a shard missing, of the wrong size or (with ``verify``) failing its
  CRCs, record count or SHA-256: those shards are written again;
* another fingerprint: ``OutputConflictError`` naming what differs (seed, storage size, inputs,
  ...), unless ``overwrite``, which removes the protocol's old outputs before writing;
* an interrupted run (``.building.json`` present, no summary) with the same fingerprint keeps
  the shards it finished and writes the rest (the bytes are the same either way); with another
  fingerprint its partial outputs are discarded.

Only one run writes under ``out_dir`` at a time (``caaxr_tf.locks.FolderLock``).

``--runner beam`` (``runner="beam"``) decodes the images in an Apache Beam pipeline
(``caaxr_tf.data.beam_build``, imported only then) instead of the local process pool; the rest
is this module's code for both runners, so they write the same bytes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from caaxr_tf.config import load_config
from caaxr_tf.data import protocols as protocols_lib
from caaxr_tf.data.records import ReadResult, Sample, SchemaError, Skipped
from caaxr_tf.data.schema import ALL_SHARDS, MANIFEST_FILE, SUMMARY_FILE, read_summary_file
from caaxr_tf.data.shards import ShardProblem, shard_info, verify_protocol
from caaxr_tf.data.sources import check_data_config, read_source
from caaxr_tf.data.stager import BeamPipelineError, Stager, WorkerDiedError  # noqa: F401  (re-exported)
from caaxr_tf.data.staging import StagedImage
from caaxr_tf.io import atomic_path, write_text_atomic
from caaxr_tf.locks import FolderLock, FolderLockedError
from caaxr_tf.logs import quiet_tensorflow_logs

FORMAT_VERSION = 3  # 2: image/encoded may hold the source JPEG/PNG bytes; 3: non-test records once, in part shards
PARTS_DIR = "parts"  # part<p>-*.tfrecord: the non-test records of part p, listed under every fold that uses them
STAGING_DIR = ".staging"
BUILDING_FILE = ".building.json"  # a protocol being written: its build settings and fingerprint


class OutputConflictError(ValueError):
    """``out_dir`` holds a protocol built with other arguments or inputs; nothing was written."""


RUNNERS = ("local", "beam")


def make_example(
    sample: Sample,
    staged: StagedImage,
    encoded: bytes,
    label: int,
    label_name: str,
    *,
    mask: bytes | None = None,
    targets: Sequence[float] | None = None,
    series: bool = False,
) -> bytes:
    """Serialise one record (``caaxr_tf.data.schema.feature_spec``).

    ``mask`` (PNG bytes, ``b""`` for an image without one), ``targets`` and ``series``
    (``series/id``, ``slice/index``) add their features only when given, so the records of
    protocols without them stay as they were.
    """
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
    if mask is not None:
        feature["mask/encoded"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[mask]))
    if targets is not None:
        feature["targets"] = floats(targets)
    if series:
        feature["series/id"] = strings(sample.series_id)
        feature["slice/index"] = ints(sample.slice_index)
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


def is_temporary(path: Path) -> bool:
    """A file being written under a temporary name, or left so by an interrupted run:
    ``caaxr_tf.io.atomic_path``'s ``.<stem>.tmp-<pid>-<id><suffix>``, or an older version's ``.tmp``."""
    return (path.name.startswith(".") and ".tmp-" in path.name) or path.suffix == ".tmp"


# --- reading the sources -----------------------------------------------------------------


def read_sources(source: str, data_root: Path, needed: Iterable[str], data_config: Mapping[str, Any]) -> dict[str, ReadResult]:
    """Run the registered reader (``caaxr_tf.data.sources.read_source``) of every source in
    ``needed``; ``source``, the source set's name, is not used (kept for callers). Schema and
    config errors propagate."""
    results: dict[str, ReadResult] = {}
    for name in sorted(set(needed)):
        results[name] = read_source(name, Path(data_root), data_config)
    return results


# --- staging -----------------------------------------------------------------------------


def _file_state(path: str) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def input_lines(members: Mapping[str, Sequence[Sample]]) -> Iterable[str]:
    """One line per candidate input: class, id, path, file state (size, mtime), record, and the
    mask file's state for a sample with a mask (a changed mask is a changed input)."""
    for class_name in sorted(members):
        for sample in members[class_name]:
            mask = f"|mask {_file_state(sample.mask_path)}" if sample.mask_path else ""
            yield f"{class_name}|{sample.image_id}|{sample.path}|{_file_state(sample.path)}|{sample!r}{mask}\n"


def fingerprint(payload: Mapping[str, Any], members: Mapping[str, Sequence[Sample]]) -> str:
    """Hash of the arguments and of every candidate input file (path, size, mtime)."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8"))
    for line in input_lines(members):
        digest.update(line.encode("utf-8"))
    return digest.hexdigest()


def build_settings(payload: Mapping[str, Any], members: Mapping[str, Sequence[Sample]]) -> dict[str, Any]:
    """What a protocol's outputs depend on, recorded in summary.json (``build``) so that a
    rerun with other arguments can say what differs."""
    digest = hashlib.sha256()
    for line in input_lines(members):
        digest.update(line.encode("utf-8"))
    return {
        **json.loads(json.dumps(payload, sort_keys=True, default=str)),
        "candidates": {name: len(samples) for name, samples in sorted(members.items())},
        "inputs": digest.hexdigest(),
    }


def describe_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two ``build_settings`` (``old`` may come from a
    summary.json of an older version that recorded only seed and storage size)."""
    lines = []
    for key in ("seed", "storage_size", "records_per_shard", "source", "format_version"):
        if key in old and old[key] != new.get(key):
            lines.append(f"{key} {old[key]} -> {new.get(key)}")
    old_protocol, new_protocol = old.get("protocol") or {}, new.get("protocol") or {}
    for key in sorted(set(old_protocol) | set(new_protocol)):
        if key in old_protocol and old_protocol.get(key) != new_protocol.get(key):
            if key == "classes":
                lines.append("protocol classes, rules or target counts changed")
            else:
                lines.append(f"protocol {key} {old_protocol.get(key)} -> {new_protocol.get(key)}")
    if "inputs" in old and old["inputs"] != new.get("inputs"):
        before, after = old.get("candidates") or {}, new.get("candidates") or {}
        counts = ", ".join(f"{name} {before.get(name, '?')} -> {after.get(name, 0)}" for name in after
                           if before.get(name) != after.get(name))
        lines.append(
            "input files or data settings changed (an image added, removed, edited or fixed, a CSV or "
            "--set changed)" + (f"; candidate images: {counts}" if counts else "")
        )
    if not lines:
        lines.append("built by an earlier version or with other data settings (no comparable build record)")
    return lines


@dataclass
class ProtocolPlan:
    """What a run does with one protocol folder, decided before anything is written.

    ``action``: ``up to date``, ``build`` (nothing there, or partial outputs of another
    run that are discarded), ``resume`` (an interrupted run with the same fingerprint),
    ``repair`` (complete, but the shards in ``broken`` are rewritten), ``replace``
    (--overwrite of another build) or ``refuse``.
    """

    action: str
    reason: str = ""
    broken: list[ShardProblem] = field(default_factory=list)
    summary: dict[str, Any] | None = None


def _has_outputs(protocol_dir: Path) -> bool:
    return protocol_dir.is_dir() and any(
        p.name in (SUMMARY_FILE, MANIFEST_FILE, BUILDING_FILE) or p.suffix == ".tfrecord" or is_temporary(p)
        for p in protocol_dir.rglob("*")
    )


def plan_protocol(protocol_dir: Path, stamp: str, settings: Mapping[str, Any], *, overwrite: bool,
                  verify: bool) -> ProtocolPlan:
    """Compare what ``protocol_dir`` holds with what this run would write."""
    summary_path = protocol_dir / SUMMARY_FILE
    if summary_path.exists():
        try:
            summary = read_summary_file(summary_path)
        except ValueError as error:
            return ProtocolPlan("replace" if overwrite else "refuse", str(error))
        if summary.get("fingerprint") != stamp:
            old = summary.get("build") or {k: summary[k] for k in ("seed", "storage_size") if k in summary}
            reason = "built with other arguments or inputs: " + "; ".join(describe_differences(old, settings))
            return ProtocolPlan("replace" if overwrite else "refuse", reason)
        broken = verify_protocol(protocol_dir, summary, full=verify)
        if broken:
            return ProtocolPlan("repair", f"{len(broken)} damaged shard(s)", broken)
        return ProtocolPlan("up to date", summary=summary)
    marker = protocol_dir / BUILDING_FILE
    if marker.exists():
        try:
            building = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            building = {}
        if isinstance(building, dict) and building.get("fingerprint") == stamp:
            return ProtocolPlan("resume", "an interrupted run with the same arguments")
    if _has_outputs(protocol_dir):
        return ProtocolPlan("build", "partial outputs of an interrupted run with other arguments are discarded")
    return ProtocolPlan("build")


def remove_outputs(protocol_dir: Path, only: Iterable[str | os.PathLike] | None = None) -> None:
    """Remove what make_tfrecords writes in ``protocol_dir`` (summary.json first, so the folder
    never looks complete while old and new files mix): all of it, or summary.json plus ``only``."""
    (protocol_dir / SUMMARY_FILE).unlink(missing_ok=True)
    if only is not None:
        for path in only:
            Path(path).unlink(missing_ok=True)
        return
    (protocol_dir / BUILDING_FILE).unlink(missing_ok=True)
    (protocol_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for path in sorted(protocol_dir.rglob("*")):
        if path.is_file() and (path.suffix == ".tfrecord" or is_temporary(path)):
            path.unlink()
    for folder in sorted(protocol_dir.glob("fold*"), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def protocol_boxes(staged: StagedImage, spec: protocols_lib.ProtocolSpec) -> tuple[list, list[str]]:
    """The staged (normalised) boxes and their findings that ``spec`` keeps (its ``box_findings``)."""
    if not spec.box_findings:
        return list(staged.boxes), list(staged.box_findings)
    wanted = set(spec.box_findings)
    kept = [(box, name) for box, name in zip(staged.boxes, staged.box_findings) if name.strip().lower() in wanted]
    return [box for box, _ in kept], [name for _, name in kept]


def target_values(sample: Sample, spec: protocols_lib.ProtocolSpec) -> list[float] | Skipped:
    """The protocol's float targets of ``sample`` from its labels, or why it has none."""
    values = []
    for name in spec.targets:
        value = sample.labels.get(name)
        if value is None or not math.isfinite(float(value)):
            return Skipped(sample.path, f"labels: {name}", f"no value for target {name!r} of protocol {spec.name}")
        values.append(float(value))
    return values


def select_and_stage(
    spec: protocols_lib.ProtocolSpec,
    members: Mapping[str, Sequence[Sample]],
    stager: Stager,
    seed: int,
) -> tuple[dict[str, list[Sample]], list[Skipped], list[str]]:
    """Draw each class up to its target, replacing images that fail to decode (or whose mask
    does), lose all the boxes their class was chosen by, or lack a target value, from the same
    seeded order. Returns the chosen samples, what was skipped and warnings."""
    chosen: dict[str, list[Sample]] = {}
    skipped: list[Skipped] = []
    warnings: list[str] = []
    for class_spec in spec.classes:
        # a class chosen by its boxes: an image whose boxes are all invalid is no member
        needs_boxes = class_spec.rule == "has_boxes"
        order = protocols_lib.candidate_order(members[class_spec.name], seed, spec.source, spec.name, class_spec.name)
        target = len(order) if class_spec.count is None else class_spec.count
        picked: list[Sample] = []
        position = 0
        while len(picked) < target and position < len(order):
            batch = order[position : position + (target - len(picked))]
            position += len(batch)
            usable = []
            for sample in batch:
                values = target_values(sample, spec)
                if isinstance(values, Skipped):
                    skipped.append(values)
                else:
                    usable.append(sample)
            stager.stage(usable, f"{spec.name}/{class_spec.name}: decoding")
            for sample in usable:
                staged = stager.get(sample)
                skipped.extend(stager.dropped_for(sample))
                if staged is None:
                    continue
                if needs_boxes and protocols_lib.keep_box_findings(sample, spec.box_findings).boxes \
                        and not protocol_boxes(staged, spec)[0]:
                    skipped.append(Skipped(sample.path, "boxes", f"no valid box left; image left out of {spec.name}"))
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
) -> tuple[dict[str, list[str]], dict[str, Any], list[dict[str, str]], dict[str, dict[str, Any]]]:
    """Split, write the manifest and the shards. Returns shard names, counts, manifest rows and
    each shard's records, bytes and SHA-256.

    What a protocol's records hold beyond the common features is decided here, for all its
    records alike: ``mask/encoded`` when any chosen sample has a pixel mask (``b""`` for those
    without), ``targets`` when the protocol names targets, ``series/id``/``slice/index`` when
    any sample is a slice of a series. The manifest gains ``target_<name>`` and
    ``series_id``/``slice_index`` columns in the same cases.
    """
    class_names = spec.class_names
    items = [(s.image_id, s.patient_id, c) for c in class_names for s in chosen[c]]
    halves = spec.split_scheme == protocols_lib.GROUPED_HALVES
    if halves:  # every record written once; the summary lists each fold's members
        half_splits = protocols_lib.assign_half_splits(items, spec.folds, spec.val_fraction, seed, spec.source, spec.name)
        parts = {}
    else:
        parts = protocols_lib.assign_parts(items, class_names, spec.test_fraction, spec.num_parts, seed)
    samples = [s for c in class_names for s in chosen[c]]
    with_masks = any(s.mask_path for s in samples)
    with_series = any(s.series_id for s in samples)
    with_views = any(s.view for s in samples)
    demographics = sorted({k for s in samples for k, v in s.demographics.items() if v})

    rows: list[dict[str, str]] = []
    by_part: dict[int, list[tuple[Sample, int, str]]] = {}
    by_split: dict[str, list[tuple[Sample, int, str]]] = {"test": []} if not halves else {ALL_SHARDS: []}
    for fold in range(1, spec.folds + 1 if not halves else 1):
        by_split[f"fold{fold}/train"] = []
        by_split[f"fold{fold}/val"] = []
    for label, class_name in enumerate(class_names):
        for sample in chosen[class_name]:
            part = parts.get(sample.image_id)
            if halves:
                by_split[ALL_SHARDS].append((sample, label, class_name))
            else:
                by_part.setdefault(part, []).append((sample, label, class_name))
            row = {
                "image_id": sample.image_id,
                "patient_id": sample.patient_id,
                "source": sample.source,
                "label": class_name,
                "label_index": str(label),
            }
            for fold in range(1, spec.folds + 1):
                split = half_splits[sample.image_id][fold - 1] if halves else protocols_lib.split_of(part, fold)
                row[f"split_fold{fold}"] = split
                if halves:
                    continue
                key = "test" if split == "test" else f"fold{fold}/{split}"
                if split != "test" or fold == 1:
                    by_split[key].append((sample, label, class_name))
            for subset_name, subset in spec.subsets.items():
                box_findings = protocol_boxes(stager.get(sample), spec)[1]
                row[f"subset_{subset_name}"] = str(int(protocols_lib.in_subset(box_findings, subset)))
            for name, value in zip(spec.targets, target_values(sample, spec)):
                row[f"target_{name}"] = repr(value)
            if with_series:
                row["series_id"], row["slice_index"] = sample.series_id, str(sample.slice_index)
            if with_views:  # metadata for per-slice scoring (caaxr score --slice-by); not in the shards
                row["view"] = sample.view
            for name in demographics:
                row[name] = sample.demographics.get(name, "")
            rows.append(row)
    rows.sort(key=lambda r: r["image_id"])

    protocol_dir.mkdir(parents=True, exist_ok=True)
    for leftover in [p for p in protocol_dir.rglob("*") if p.is_file() and is_temporary(p)]:
        leftover.unlink()  # from an interrupted run
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["image_id"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(protocol_dir / MANIFEST_FILE, buffer.getvalue())

    import tensorflow as tf

    if halves:
        shards, planned = plan_member_shards(by_split[ALL_SHARDS], spec, protocol_dir, seed, records_per_shard)
    else:
        shards, planned = plan_part_shards(by_part, spec, protocol_dir, seed, records_per_shard)
    # Shards that this build does not name (another run's) must not survive next to it.
    wanted = {path for path, _ in planned}
    for stale in protocol_dir.rglob("*.tfrecord"):
        if stale not in wanted:
            stale.unlink()

    def record(sample: Sample, label: int, class_name: str) -> bytes:
        staged = stager.get(sample)
        with open(staged.encoded_path, "rb") as handle:
            encoded = handle.read()
        mask = None
        if with_masks:
            mask = b""
            if staged.mask_path:
                with open(staged.mask_path, "rb") as handle:
                    mask = handle.read()
        if spec.box_findings:
            boxes, findings = protocol_boxes(staged, spec)
            staged = dataclasses.replace(staged, boxes=boxes, box_findings=findings)
        targets = target_values(sample, spec) if spec.targets else None
        return make_example(sample, staged, encoded, label, class_name, mask=mask, targets=targets, series=with_series)

    shard_files: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=sum(len(c) for _, c in planned), desc=f"{spec.name}: writing shards", unit="rec",
               disable=not progress, leave=False)
    for final, chunk in planned:
        final.parent.mkdir(parents=True, exist_ok=True)
        if not final.exists():  # else finished by an interrupted run with the same fingerprint
            with atomic_path(final) as temporary:
                with tf.io.TFRecordWriter(str(temporary)) as shard:
                    for sample, label, class_name in chunk:
                        shard.write(record(sample, label, class_name))
        bar.update(len(chunk))
        shard_files[str(final.relative_to(protocol_dir))] = shard_info(final, len(chunk))
    bar.close()

    if halves:
        return shards, half_split_counts(rows, spec.folds), rows, shard_files
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
    return shards, counts, rows, shard_files


def half_split_counts(rows: Sequence[Mapping[str, str]], folds: int) -> dict[str, Any]:
    """The summary's ``counts`` of a ``grouped_halves`` protocol: per fold, the class counts of
    train, val and test (``test`` at the top level: fold 1's)."""
    counts: dict[str, Any] = {"total": dict(Counter(r["label"] for r in rows))}
    for fold in range(1, folds + 1):
        counts[f"fold{fold}"] = {split: dict(Counter(r["label"] for r in rows if r[f"split_fold{fold}"] == split))
                                 for split in ("train", "val", "test")}
    counts["test"] = counts["fold1"]["test"]
    return counts


def half_split_members(rows: Sequence[Mapping[str, str]], folds: int) -> dict[str, list[str]]:
    """``{"fold<k>/<split>": [image ids]}`` of a ``grouped_halves`` protocol (summary.json
    ``split_members``: the pipeline selects a fold's records from the shared shards by id)."""
    return {f"fold{fold}/{split}": [r["image_id"] for r in rows if r[f"split_fold{fold}"] == split]
            for fold in range(1, folds + 1) for split in ("train", "val", "test")}


def plan_part_shards(
    by_part: Mapping[int, Sequence[tuple[Sample, int, str]]],
    spec: protocols_lib.ProtocolSpec,
    protocol_dir: Path,
    seed: int,
    records_per_shard: int,
) -> tuple[dict[str, list[str]], list[tuple[Path, list]]]:
    """Where each record goes: every image is written once. Part 0 (the test split) goes to
    ``test-*``, part p (1..num_parts) to ``parts/part<p>-*``; the summary's ``fold<k>/val``
    lists part k's shards and ``fold<k>/train`` those of the other non-test parts, so
    ``shard_files(dir, split, fold)`` assembles a fold from the part shards.

    Returns the summary's ``shards`` (split key -> shard names relative to ``protocol_dir``) and
    the shards to write (final path, its records in order). A part's records are in a seeded
    order of their image ids, so the bytes do not depend on the run or the worker count.
    """
    part_shards: dict[int, list[str]] = {}
    planned: list[tuple[Path, list]] = []  # (final path, its records)
    for part in range(spec.num_parts + 1):
        key = "test" if part == 0 else f"part{part}"
        entries = sorted(by_part.get(part, []), key=lambda e: e[0].image_id)
        rng = np.random.default_rng(protocols_lib.stable_seed(seed, spec.source, spec.name, key))
        entries = [entries[i] for i in rng.permutation(len(entries))]
        count = num_shards(len(entries), records_per_shard)
        folder = protocol_dir if part == 0 else protocol_dir / PARTS_DIR
        names = shard_names(key, count)
        part_shards[part] = [str((folder / n).relative_to(protocol_dir)) for n in names]
        for index, name in enumerate(names):
            planned.append((folder / name, entries[index * len(entries) // count : (index + 1) * len(entries) // count]))
    shards: dict[str, list[str]] = {"test": part_shards[0]}
    for fold in range(1, spec.folds + 1):
        shards[f"fold{fold}/train"] = [
            name for part in range(1, spec.num_parts + 1)
            if protocols_lib.split_of(part, fold) == "train" for name in part_shards[part]
        ]
        shards[f"fold{fold}/val"] = list(part_shards[fold])
    return shards, planned


def plan_member_shards(
    entries: Sequence[tuple[Sample, int, str]],
    spec: protocols_lib.ProtocolSpec,
    protocol_dir: Path,
    seed: int,
    records_per_shard: int,
) -> tuple[dict[str, list[str]], list[tuple[Path, list]]]:
    """The shards of a protocol whose splits are lists of members (``grouped_halves``): every
    record once, in ``all-*`` shards in a seeded order of the image ids; the summary's
    ``split_members`` says which records each fold's splits take."""
    entries = sorted(entries, key=lambda e: e[0].image_id)
    rng = np.random.default_rng(protocols_lib.stable_seed(seed, spec.source, spec.name, ALL_SHARDS))
    entries = [entries[i] for i in rng.permutation(len(entries))]
    count = num_shards(len(entries), records_per_shard)
    names = shard_names(ALL_SHARDS, count)
    planned = [(protocol_dir / name, entries[index * len(entries) // count : (index + 1) * len(entries) // count])
               for index, name in enumerate(names)]
    return {ALL_SHARDS: list(names)}, planned


def split_warnings(name: str, class_names: Sequence[str], counts: Mapping[str, Any], folds: int) -> list[str]:
    """Warnings about splits a training run cannot use well: an empty validation split (no
    early stopping or best model to choose from), a training split of one class (a classifier
    learns nothing to tell classes apart)."""
    warnings = []
    for fold in range(1, folds + 1):
        splits = counts.get(f"fold{fold}") or {}
        val, train = splits.get("val") or {}, splits.get("train") or {}
        if not sum(val.values()):
            warnings.append(f"{name}: fold {fold}: the validation split is empty (too few images or groups "
                            "for the folds); a run on it cannot validate")
        present = sorted(c for c, n in train.items() if n)
        if len(class_names) > 1 and len(present) < 2:
            held = ", ".join(f"{c}: {train[c]}" for c in present) or "no images"
            warnings.append(f"{name}: fold {fold}: the training split holds one class only ({held}) of "
                            f"{', '.join(class_names)}")
    return warnings


def _write_and_summarize(
    spec: protocols_lib.ProtocolSpec,
    chosen: Mapping[str, Sequence[Sample]],
    stager: Stager,
    protocol_dir: Path,
    seed: int,
    records_per_shard: int,
    progress: bool,
    summary: dict[str, Any],
    plan: ProtocolPlan | None = None,
) -> None:
    """Clear what ``plan`` says must go, write a protocol's shards, then fill in and write its
    summary.json (last: it marks the protocol complete)."""
    plan = plan or ProtocolPlan("build")
    protocol_dir.mkdir(parents=True, exist_ok=True)
    if plan.action == "repair":
        remove_outputs(protocol_dir, only=[p.path for p in plan.broken])
    elif plan.action != "resume":
        remove_outputs(protocol_dir)
    building = {"fingerprint": summary["fingerprint"], "build": summary.get("build"), "pid": os.getpid()}
    write_text_atomic(protocol_dir / BUILDING_FILE, json.dumps(building, indent=2) + "\n")
    shards, counts, rows, shard_files = write_protocol(spec, chosen, stager, protocol_dir, seed, records_per_shard, progress)
    summary.update(counts=counts, shards=shards, shard_files=shard_files)
    summary["warnings"] = list(summary["warnings"]) + split_warnings(spec.name, spec.class_names, counts, spec.folds)
    if spec.split_scheme == protocols_lib.GROUPED_HALVES:
        summary.update(split_scheme=spec.split_scheme, split_members=half_split_members(rows, spec.folds))
    write_text_atomic(protocol_dir / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=False) + "\n")
    (protocol_dir / BUILDING_FILE).unlink(missing_ok=True)


# --- the whole job -----------------------------------------------------------------------


def effective_storage_size(spec: protocols_lib.ProtocolSpec, storage_size: int) -> int:
    """The records' longest side for ``spec``: its own ``storage_size``, else ``--storage-size``."""
    return storage_size if spec.storage_size is None else spec.storage_size


def staging_dir(out_dir: Path, size: int, default_size: int) -> Path:
    """Where images staged at ``size`` wait: ``.staging``, or ``.staging/<size>px`` for a size a
    protocol sets for itself."""
    return out_dir / STAGING_DIR if size == default_size else out_dir / STAGING_DIR / f"{size}px"


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
    overwrite: bool = False,
    verify: bool = False,
    runner: str = "local",
    beam_options: str | Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Build the shards of the chosen protocols; returns each protocol's summary.

    ``runner``: ``local`` (the default) decodes the images on a local process pool; ``beam``
    runs that per-image stage as an Apache Beam pipeline (``caaxr_tf.data.beam_build``, imported
    only then) with ``beam_options`` (a command-line string, e.g. ``"--runner=DirectRunner
    --direct_num_workers=2 --direct_running_mode=multi_processing"``; default: the DirectRunner on
    ``workers`` processes). Everything else -- selection, splits, manifest, shards, summary.json,
    the rerun rules -- is the same code for both, so both write the same bytes; the runner is not
    part of the fingerprint.

    ``overwrite`` replaces protocols built with other arguments or inputs (otherwise they
    raise ``OutputConflictError`` before anything is written; an up-to-date protocol is kept
    either way); ``verify`` reads every shard
    of an up-to-date protocol back (CRCs, record counts, SHA-256) and rewrites the damaged
    ones. Raises ``ValueError`` for bad arguments, ``SchemaError`` for a CSV without its
    columns, ``FolderLockedError`` while another run writes to ``out_dir`` and
    ``WorkerDiedError`` when an image kills its decoding process twice.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    for name, value, low in (("workers", workers, 1), ("storage_size", storage_size, 0),
                             ("records_per_shard", records_per_shard, 1), ("folds", folds, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if beam_options is not None and runner != "beam":
        raise ValueError("beam_options (--beam-options) needs runner 'beam' (--runner beam)")
    data_config = load_config("data", data_overrides)
    check_data_config(data_config)
    protocol_config = load_config("protocols", protocol_overrides)
    specs = protocols_lib.load_protocols(source, protocol_config)
    names = list(specs) if protocols in ("all", ["all"], ("all",)) else [protocols] if isinstance(protocols, str) else list(protocols)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"unknown protocol(s) {', '.join(unknown)} for source {source}; known: {', '.join(specs)}")
    if folds is not None:  # --folds overrides the folds of every selected protocol (each checks its own limit)
        specs = {name: protocols_lib.with_folds(spec, folds) if name in names else spec for name, spec in specs.items()}
    if not data_root.is_dir():
        raise FileNotFoundError(f"data root not found: {data_root}")

    # One stager per storage size (a protocol may set its own, e.g. CT slices keep theirs).
    sizes = {name: effective_storage_size(specs[name], storage_size) for name in names}
    if runner == "beam":
        try:
            from caaxr_tf.data.beam_build import BeamStager  # apache_beam: only for --runner beam
        except ImportError as error:
            raise ValueError(f"--runner beam needs Apache Beam (pip install 'caaxr-tf[beam]'): {error}") from None

        def new_stager(folder: Path, size: int) -> Stager:
            return BeamStager(folder, size, workers or os.cpu_count() or 1, progress, beam_options, log=log)
    else:
        def new_stager(folder: Path, size: int) -> Stager:
            return Stager(folder, size, workers or os.cpu_count() or 1, progress)
    stagers = {size: new_stager(staging_dir(out_dir, size, storage_size), size)
               for size in dict.fromkeys(sizes.values())}
    for stager in stagers.values():
        stager.start()
    import tensorflow  # noqa: F401  (here, while the workers start, rather than in the writer thread)

    created_out = not out_dir.exists()
    lock: FolderLock | None = None
    # Shards of protocol N are written in a thread while the workers decode protocol N + 1; the
    # protocols whose images are all staged by then (3class, 4class reuse 2class's) are written
    # side by side, one thread per worker, once the pool is idle.
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers or os.cpu_count() or 1, len(names))),
                                                   thread_name_prefix="shard-writer")
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

        jobs = []
        for name in names:
            spec = specs[name]
            members, excluded = protocols_lib.classify(spec, samples_by_source)
            empty = [c for c in spec.class_names if not members[c]]
            if empty:
                raise ValueError(
                    f"protocol {name}: no candidate images for class(es) {', '.join(empty)} "
                    f"(sources read: {', '.join(f'{k} {len(v)} images' for k, v in samples_by_source.items())}); "
                    f"nothing was written"
                )
            payload = {
                "format_version": FORMAT_VERSION,
                "source": source,
                "protocol": spec.payload(),
                "seed": seed,
                "storage_size": sizes[name],
                "records_per_shard": records_per_shard,
            }
            jobs.append((name, spec, members, excluded, fingerprint(payload, members), build_settings(payload, members)))

        # Nothing is written before every protocol's plan is known to be acceptable.
        lock = FolderLock(out_dir, purpose="make_tfrecords " + " ".join(sys.argv[1:])).acquire()
        plans = {name: plan_protocol(out_dir / name, stamp, settings, overwrite=overwrite, verify=verify)
                 for name, _, _, _, stamp, settings in jobs}
        refused = {name: plan for name, plan in plans.items() if plan.action == "refuse"}
        if refused:
            details = "\n".join(f"  {out_dir / name}: {plan.reason}" for name, plan in refused.items())
            raise OutputConflictError(
                f"{out_dir} holds protocol(s) that these arguments would not produce; nothing was written:\n"
                f"{details}\nuse another --out, or --overwrite to replace them"
            )

        if runner == "beam":
            # One pipeline per storage size for the first draws of every protocol to build (a
            # pipeline's start-up is the costly part); select_and_stage below finds them staged
            # and runs another pipeline only for replacements of unusable images.
            first: dict[int, list[Sample]] = {}
            for name, spec, members, _, _, _ in jobs:
                if plans[name].action != "up to date":
                    first.setdefault(sizes[name], []).extend(first_draws(spec, members, seed))
            for size, samples in first.items():
                stagers[size].stage(samples, f"beam: staging at {size or 'original'} px")

        for name, spec, members, excluded, stamp, settings in jobs:
            protocol_dir = out_dir / name
            plan = plans[name]
            if plan.action == "up to date":
                log(f"{name}: up to date, skipped" + (" (all shards verified)" if verify else ""))
                summaries[name] = plan.summary
                continue
            if plan.reason:
                log(f"{name}: {plan.action}: {plan.reason}")
                for problem in plan.broken:
                    log(f"  {problem}")
            stager = stagers[sizes[name]]
            chosen, skipped, warnings = select_and_stage(spec, members, stager, seed)
            empty = [c for c in spec.class_names if not chosen[c]]
            if empty:
                raise ValueError(f"protocol {name}: no usable images for class(es) {', '.join(empty)} "
                                 f"(every candidate was skipped; see the skipped inputs)")
            # readers' warnings (e.g. an empty ground-truth mask), each naming its file, first
            warnings = [str(w) for src in spec.sources for w in readings[src].warnings] + warnings
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
                **({"target_names": list(spec.targets)} if spec.targets else {}),
                **({"target_ranges": {k: list(v) for k, v in spec.target_ranges.items()}} if spec.target_ranges else {}),
                "folds": spec.folds,
                "seed": seed,
                "storage_size": sizes[name],
                "counts": None,
                "shards": None,
                "subsets": {k: dict(v) for k, v in spec.subsets.items()},
                "warnings": warnings,
                "excluded": dict(sorted(reader_excluded.items())),
                "skipped": [s.as_dict() for s in reader_skips + skipped],
                "fingerprint": stamp,
                "build": settings,
            }
            pending[name] = writer.submit(
                _write_and_summarize, spec, chosen, stager, protocol_dir, seed, records_per_shard, progress, summary, plan
            )
            summaries[name] = summary
        for name, future in pending.items():
            future.result()
            log(format_counts(summaries[name]))
            spec = specs[name]
            for warning in split_warnings(name, spec.class_names, summaries[name]["counts"], spec.folds):
                log(f"WARNING: {warning}")
        # Kept after a failure or interruption: a rerun reuses what it still matches.
        shutil.rmtree(out_dir / STAGING_DIR, ignore_errors=True)
        if runner == "beam":
            log_beam_metrics(stagers.values(), {n: summaries[n] for n in pending}, log)
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        for stager in stagers.values():
            stager.close()
        if lock is not None:
            lock.release()
            if created_out and out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()  # a run refused before writing leaves no empty folder behind
    return summaries


def first_draws(spec: protocols_lib.ProtocolSpec, members: Mapping[str, Sequence[Sample]], seed: int,
                margin: float = 0.02) -> list[Sample]:
    """The images ``select_and_stage`` draws first for each class (its target count from the
    seeded order, those with the protocol's target values), plus a small margin (2 %, at least
    one) of the next ones, likely replacements. Staging more than is used changes no output: only
    the images ``select_and_stage`` draws are reported or written."""
    drawn: list[Sample] = []
    for class_spec in spec.classes:
        order = protocols_lib.candidate_order(members[class_spec.name], seed, spec.source, spec.name, class_spec.name)
        target = len(order) if class_spec.count is None else class_spec.count
        extra = 0 if target >= len(order) else max(1, math.ceil(target * margin))
        drawn.extend(s for s in order[: target + extra] if not isinstance(target_values(s, spec), Skipped))
    return drawn


def log_beam_metrics(stagers: Iterable[Stager], summaries: Mapping[str, Mapping[str, Any]],
                     log: Callable[[str], None]) -> None:
    """The Beam counters of every staging pipeline, summed, and the shard bytes the driver wrote."""
    totals: Counter = Counter()
    pipelines = 0
    for stager in stagers:
        totals.update(getattr(stager, "counters", {}))
        pipelines += getattr(stager, "pipelines", 0)
    shard_bytes = sum(entry.get("bytes", 0) for summary in summaries.values()
                      for entry in (summary.get("shard_files") or {}).values())
    log(f"beam metrics ({pipelines} pipeline(s)): images read {totals.get('images_read', 0)}, "
        f"images skipped {totals.get('images_skipped', 0)}, staged bytes written "
        f"{totals.get('staged_bytes_written', 0)}; shard bytes (driver) {shard_bytes}")


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


# --- the command ---------------------------------------------------------------------------

USAGE = """Write the TFRecord shards of the protocols of one source set (caaxr_tf/configs/protocols.yaml).

    caaxr-make-tfrecords --data-root DATA --out TFRECORDS [--source caaxr] [--protocol all]
        [--overwrite] [--verify]          (or: python tools/make_tfrecords.py ...)

A rerun with the same arguments and inputs skips finished protocols ("up to date") and
rewrites any shard that is missing or of the wrong size; --verify also reads every shard back
(CRCs, record counts, SHA-256 against summary.json) and rewrites the damaged ones. A protocol
folder built with other arguments or inputs is refused, naming what differs, unless
--overwrite. Exit status: 0 done, 2 error (one line on stderr, nothing half-written).
"""


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; ``--source`` and ``--protocol`` choices come from caaxr_tf/configs/protocols.yaml
    (a protocol that the chosen source set lacks is an error naming the set's protocols)."""
    protocol_sets = protocols_lib.available_protocols()
    names = sorted({name for names in protocol_sets.values() for name in names})
    parser = argparse.ArgumentParser(prog="caaxr-make-tfrecords", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True,
                        help="the source set's data root: caaxr: the folder with bimcv/, caaxr/, chexpert/; "
                             "covid-chestxray, qata, covid-ctset: the collection's own folder")
    parser.add_argument("--out", required=True, help="output folder; one sub-folder per protocol")
    parser.add_argument("--source", default="caaxr", choices=list(protocol_sets), help="source set (default caaxr)")
    parser.add_argument("--protocol", default="all", choices=["all", *names],
                        help="a protocol of the source set, or all of them (default)")
    parser.add_argument("--folds", type=_int_at_least(1), default=None,
                        help="number of folds of every selected protocol (default: caaxr_tf/configs/protocols.yaml)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=_int_at_least(1), default=os.cpu_count() or 1, help="decoding processes")
    parser.add_argument("--storage-size", type=_int_at_least(0), default=512,
                        help="longest side kept in the records; 0 keeps the original size (a protocol may set its own)")
    parser.add_argument("--records-per-shard", type=_int_at_least(1), default=256)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace protocols that --out holds from other arguments or inputs")
    parser.add_argument("--verify", action="store_true",
                        help="read every shard back (CRCs, record counts, SHA-256) and rewrite damaged ones")
    parser.add_argument("--set", dest="data_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override caaxr_tf/configs/data.yaml, e.g. --set chexpert.uncertain=positive")
    parser.add_argument("--set-protocol", dest="protocol_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override caaxr_tf/configs/protocols.yaml, e.g. --set-protocol caaxr.2class.classes.covid.count=100")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--runner", choices=list(RUNNERS), default="local",
                        help="where the per-image decoding runs: local (a process pool, the default) or beam "
                             "(an Apache Beam pipeline; pip install 'caaxr-tf[beam]'); both write the same bytes")
    parser.add_argument("--beam-options", default=None, metavar="OPTIONS",
                        help="Beam pipeline options as one string, with --runner beam, written with '=': "
                             "--beam-options='--runner=FlinkRunner ...' (default: "
                             "'--runner=DirectRunner --direct_num_workers=<--workers> "
                             "--direct_running_mode=multi_processing')")
    args = parser.parse_args(argv)
    if args.beam_options is not None and args.runner != "beam":
        parser.error("--beam-options needs --runner beam")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``caaxr-make-tfrecords``: build the shards; 0 when done, 2 with one error line."""
    quiet_tensorflow_logs()

    try:
        args = parse_args(argv)
    except ValueError as error:  # a malformed caaxr_tf/configs/protocols.yaml
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        summaries = build_tfrecords(
            args.data_root,
            args.out,
            source=args.source,
            protocols=args.protocol,
            folds=args.folds,
            seed=args.seed,
            workers=args.workers,
            storage_size=args.storage_size,
            records_per_shard=args.records_per_shard,
            data_overrides=args.data_overrides,
            protocol_overrides=args.protocol_overrides,
            progress=not args.no_progress and sys.stderr.isatty(),
            overwrite=args.overwrite,
            verify=args.verify,
            runner=args.runner,
            beam_options=args.beam_options,
        )
    except (SchemaError, OSError, ValueError, FolderLockedError, WorkerDiedError, BeamPipelineError) as error:
        # OSError: e.g. a full disk while staging or writing (no file is left under a final name)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        tf = sys.modules.get("tensorflow")  # imported by the build, after its workers start
        if tf is None or not isinstance(error, tf.errors.OpError):
            raise
        print(f"error: {error.message}", file=sys.stderr)  # e.g. the shard writer on a full disk
        return 2
    elapsed = time.perf_counter() - started
    images = sum(sum(s["counts"]["total"].values()) for s in summaries.values())
    print(f"done: {len(summaries)} protocol(s), {images} records in total, {elapsed:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

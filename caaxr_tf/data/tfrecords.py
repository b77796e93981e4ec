"""TFRecord shards for every protocol and fold.

Layout under ``out_dir/<protocol>/``::

    test-00000-of-00004.tfrecord ...          the fixed test set, written once
    fold1/train-00000-of-00008.tfrecord ...   fold k: training and validation shards
    fold1/val-00000-of-00002.tfrecord ...
    manifest.csv                               image_id, patient_id, source, label, split_fold1, ...
    summary.json                               counts per split and class, skipped inputs, warnings

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
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from caaxr_tf.config import load_config
from caaxr_tf.data import protocols as protocols_lib
from caaxr_tf.data.records import ReadResult, Sample, Skipped
from caaxr_tf.data.shards import ShardProblem, shard_info, verify_protocol
from caaxr_tf.data.staging import StagedImage, stage_task
from caaxr_tf.locks import FolderLock

FORMAT_VERSION = 2  # 2: image/encoded may hold the source JPEG/PNG bytes
STAGING_DIR = ".staging"
BUILDING_FILE = ".building.json"  # a protocol being written: its build settings and fingerprint
SUMMARY_FILE = "summary.json"
MANIFEST_FILE = "manifest.csv"


class OutputConflictError(ValueError):
    """``out_dir`` holds a protocol built with other arguments or inputs; nothing was written."""


class WorkerDiedError(RuntimeError):
    """A decoding process died (e.g. killed by the out-of-memory killer) twice on one image."""


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
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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
    """Decodes images once per run (in parallel processes) and remembers the outcome.

    The workers run in a ``ProcessPoolExecutor``: when one dies (kill -9, the kernel's
    out-of-memory killer) the pool breaks instead of waiting forever for the lost task. At
    most ``2 * workers`` images are in flight, so the suspects are known: each is decoded
    again alone in a fresh process; an image that kills its process a second time stops
    the run with ``WorkerDiedError`` naming it. Staged results do not depend on the worker
    count or on such retries.
    """

    def __init__(self, staging_dir: Path, storage_size: int, workers: int, progress: bool):
        self.staging_dir = staging_dir
        self.storage_size = storage_size
        self.workers = max(1, workers)
        self.progress = progress
        self.staged: dict[str, StagedImage | None] = {}
        self.dropped: dict[str, list[Skipped]] = {}
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _new_pool(self, workers: int) -> concurrent.futures.ProcessPoolExecutor:
        # spawn, not fork: the parent may hold TensorFlow's threads
        return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def start(self) -> None:
        """Start the worker processes now, so their start-up overlaps the reading of the CSVs."""
        if self.workers > 1 and self._pool is None:
            self._pool = self._new_pool(self.workers)
            for _ in range(self.workers):  # each submission spawns a process while none is idle
                self._pool.submit(int)

    def _record(self, outcome: tuple[str, StagedImage | None, list[Skipped]]) -> None:
        image_id, staged, dropped = outcome
        self.staged[image_id] = staged
        self.dropped[image_id] = dropped

    def stage(self, samples: Sequence[Sample], description: str) -> None:
        todo = [s for s in samples if s.image_id not in self.staged]
        if not todo:
            return
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        tasks = [(s, str(self.staging_dir), self.storage_size) for s in todo]
        bar = tqdm(total=len(tasks), desc=description, unit="img", disable=not self.progress, leave=False)
        try:
            if self.workers == 1 or len(tasks) < 2:
                for task in tasks:
                    self._record(stage_task(task))
                    bar.update(1)
                return
            while tasks:
                suspects, tasks = self._run_pool(tasks, bar)
                if suspects:
                    self._retry_alone(suspects, bar)
        finally:
            bar.close()

    def _run_pool(self, tasks: list, bar) -> tuple[list, list]:
        """Run ``tasks`` in the pool. Returns ([], []) when all finished, else the tasks that
        were in flight when a worker died and those not yet submitted."""
        from concurrent.futures.process import BrokenProcessPool

        if self._pool is None:
            self._pool = self._new_pool(self.workers)
        window = 2 * self.workers
        queue = list(reversed(tasks))
        in_flight: dict[concurrent.futures.Future, tuple] = {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < window:
                    task = queue.pop()
                    in_flight[self._pool.submit(stage_task, task)] = task
                done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    outcome = future.result()  # BrokenProcessPool when a worker died
                    del in_flight[future]
                    self._record(outcome)
                    bar.update(1)
        except BrokenProcessPool:
            self._discard_pool()
            finished = [f for f, _ in in_flight.items() if f.done() and f.exception() is None]
            for future in finished:
                self._record(future.result())
                bar.update(1)
                del in_flight[future]
            return list(in_flight.values()), list(reversed(queue))
        return [], []

    def _retry_alone(self, suspects: list, bar) -> None:
        """Decode each suspect alone in a fresh process; a second death names the image."""
        from concurrent.futures.process import BrokenProcessPool

        for task in suspects:
            pool = self._new_pool(1)
            try:
                self._record(pool.submit(stage_task, task).result())
                bar.update(1)
            except BrokenProcessPool:
                sample = task[0]
                raise WorkerDiedError(
                    f"{sample.path}: image: the decoding process died twice while reading it (killed by a "
                    f"signal, e.g. the out-of-memory killer); free memory, use fewer --workers, or remove "
                    f"the file"
                ) from None
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

    def _discard_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        self._discard_pool()


# --- one protocol ------------------------------------------------------------------------


def input_lines(members: Mapping[str, Sequence[Sample]]) -> Iterable[str]:
    """One line per candidate input: class, id, path, file state (size, mtime) and record."""
    for class_name in sorted(members):
        for sample in members[class_name]:
            try:
                stat = os.stat(sample.path)
                file_state = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                file_state = "missing"
            yield f"{class_name}|{sample.image_id}|{sample.path}|{file_state}|{sample!r}\n"


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
        p.name in (SUMMARY_FILE, MANIFEST_FILE, BUILDING_FILE) or p.suffix in (".tfrecord", ".tmp")
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
        if path.is_file() and (path.suffix in (".tfrecord", ".tmp")):
            path.unlink()
    for folder in sorted(protocol_dir.glob("fold*"), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


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
    planned: list[tuple[Path, list]] = []  # (final path, its records)
    for key, entries in by_split.items():
        entries = sorted(entries, key=lambda e: e[0].image_id)
        rng = np.random.default_rng(protocols_lib.stable_seed(seed, spec.source, spec.name, key))
        entries = [entries[i] for i in rng.permutation(len(entries))]
        count = num_shards(len(entries), records_per_shard)
        folder, prefix = (protocol_dir, key) if "/" not in key else (protocol_dir / key.split("/")[0], key.split("/")[1])
        names = shard_names(prefix, count)
        shards[key] = [str((folder / n).relative_to(protocol_dir)) for n in names]
        for index, name in enumerate(names):
            planned.append((folder / name, entries[index * len(entries) // count : (index + 1) * len(entries) // count]))
    # Shards that this build does not name (another run's) must not survive next to it.
    wanted = {path for path, _ in planned}
    for stale in protocol_dir.rglob("*.tfrecord"):
        if stale not in wanted:
            stale.unlink()

    shard_files: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=sum(len(c) for _, c in planned), desc=f"{spec.name}: writing shards", unit="rec",
               disable=not progress, leave=False)
    for final, chunk in planned:
        final.parent.mkdir(parents=True, exist_ok=True)
        if not final.exists():  # else finished by an interrupted run with the same fingerprint
            temporary = final.with_name(final.name + ".tmp")
            try:
                with tf.io.TFRecordWriter(str(temporary)) as shard:
                    for sample, label, class_name in chunk:
                        staged = stager.staged[sample.image_id]
                        with open(staged.encoded_path, "rb") as handle:
                            encoded = handle.read()
                        shard.write(make_example(sample, staged, encoded, label, class_name))
                os.replace(temporary, final)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
        bar.update(len(chunk))
        shard_files[str(final.relative_to(protocol_dir))] = shard_info(final, len(chunk))
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
    return shards, counts, rows, shard_files


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
    write_atomic_text(protocol_dir / BUILDING_FILE, json.dumps(building, indent=2) + "\n")
    shards, counts, _, shard_files = write_protocol(spec, chosen, stager, protocol_dir, seed, records_per_shard, progress)
    summary.update(counts=counts, shards=shards, shard_files=shard_files)
    write_atomic_text(protocol_dir / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=False) + "\n")
    (protocol_dir / BUILDING_FILE).unlink(missing_ok=True)


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
    overwrite: bool = False,
    verify: bool = False,
) -> dict[str, dict[str, Any]]:
    """Build the shards of the chosen protocols; returns each protocol's summary.

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

    created_out = not out_dir.exists()
    lock: FolderLock | None = None
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
                "protocol": asdict(spec),
                "seed": seed,
                "storage_size": storage_size,
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
            chosen, skipped, warnings = select_and_stage(spec, members, stager, seed)
            empty = [c for c in spec.class_names if not chosen[c]]
            if empty:
                raise ValueError(f"protocol {name}: no usable images for class(es) {', '.join(empty)} "
                                 f"(every candidate was skipped; see the skipped inputs)")
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
                "build": settings,
            }
            pending[name] = writer.submit(
                _write_and_summarize, spec, chosen, stager, protocol_dir, seed, records_per_shard, progress, summary, plan
            )
            summaries[name] = summary
        for name, future in pending.items():
            future.result()
            log(format_counts(summaries[name]))
        # Kept after a failure or interruption: a rerun reuses what it still matches.
        shutil.rmtree(out_dir / STAGING_DIR, ignore_errors=True)
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        stager.close()
        if lock is not None:
            lock.release()
            if created_out and out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()  # a run refused before writing leaves no empty folder behind
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

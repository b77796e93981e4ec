#!/usr/bin/env python
"""Throughput and latency of caaxr-tf, each against a reference implementation or a limit.

    python tools/benchmark.py {pipeline,tfrecords,train,inference,ct,all} [more sections] [--quick]
        [--data-root DIR | --synthetic tiny|small|realistic] [--source caaxr|covid-chestxray]
        [--workers N] [--repeats N] [--models unet,mobilenetv2,maskrcnn] [--no-torch]
        [--work-dir DIR] --json OUT.json

Sections:

* ``pipeline``: images/s that ``make_dataset`` delivers for training (224x224, batch 32,
  augmentation on), cold (first epoch, cache off: parse, decode, invert, resize) and warm
  (in-memory cache filled), against a PyTorch DataLoader with the same number of workers
  reading the same PNG bytes with PIL (same inversion/scaling, bicubic resize to 224), against
  a second DataLoader that reads each source file (16-bit PNG / JPEG at its own size) every
  epoch, as a user without this project writes it, and against the decode limit: a bare
  cv2.imdecode + cv2.resize loop over the same bytes in as many processes.
* ``tfrecords``: images/s of ``build_tfrecords`` (every protocol) with 1 and 2 worker
  processes against the same decode limit over the source files, and the peak resident
  memory of the whole process tree (parent and workers) at two dataset sizes.
* ``train``: images/s of the training step of ``caaxr_tf.train`` (its replica step under
  OneDeviceStrategy, on a batch held in memory) for unet, mobilenetv2 and maskrcnn (when
  registered) at the paper's batch sizes, and the model's own input pipeline throughput over
  the step's (the input must never be the bottleneck). With a GPU: mixed precision and XLA
  on/off.
* ``inference``: latency per image of the exported SavedModel (``serving_default`` on encoded
  PNGs, ``predict_preprocessed`` on float32 images) at batch 1 and 32 against the Keras model.
  ``--precision bfloat16`` adds rows of each model built at ``--precision-sizes`` (224,512)
  computing in bfloat16 against float32 at ``--precision-batches`` (1,32), in turns;
  ``--precision-only`` measures only those (no training run, no export).

* ``tfrecords-beam`` (not part of ``all``; needs ``pip install 'caaxr-tf[beam]'``): the same
  all-protocol build with ``--runner beam`` (Beam's DirectRunner, ``--workers`` processes)
  against the local process pool with as many workers, taken in turns in fresh child processes:
  images/s and the peak summed RSS of each process tree, and whether every output file is
  identical (sha256) between the two.
* ``ct`` (not part of ``all``): seconds per CT patient (slice selection + classification,
  ``fpn_resnet50v2``) for sequences of 35, 130 and 406 slices against the published way
  (OpenCV reads, ``model.predict`` slice by slice), and the memory a 406-slice patient adds;
  see ``benchmarks.ct`` (``--ct-slices``, ``--ct-image-size``).

Each figure is the median of several repeats; the table and the JSON give the ratio to its
reference and whether each target is met. Measurements that would disturb each other (the
PyTorch peer, the decode limit, TFRecord builds) run in fresh child processes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from benchmarks import REPO, child_env
from caaxr_tf.logs import quiet_tensorflow_logs

quiet_tensorflow_logs()

SCHEMA_VERSION = 1
SECTIONS = ("pipeline", "tfrecords", "train", "inference")
CT_SECTION = "ct"  # asked for by name only (minutes per patient on a CPU at 512 px)
BEAM_SECTION = "tfrecords-beam"  # asked for by name only: needs the beam extra (apache-beam)
EXTRA_SECTIONS = (CT_SECTION, BEAM_SECTION)
BEAM_DIRECT = "--runner=DirectRunner --direct_num_workers={workers} --direct_running_mode=multi_processing"
IMAGE_SIZE = 224
PIPELINE_BATCH = 32
PIPELINE_PROTOCOL = "2class"  # every source has it, and it holds the most images
STORAGE_SIZE = 512  # the default of build_tfrecords and make_tfrecords.py --storage-size
# model -> protocol it trains on (the batch size comes from caaxr_tf/configs/train.yaml: 4, 10, 16)
TRAIN_MODELS = {"unet": "seg", "mobilenetv2": "2class", "maskrcnn": "seg"}
PAPER_BATCH = {"unet": 4, "mobilenetv2": 10, "maskrcnn": 16}
INFERENCE_MODELS = {"mobilenetv2": "2class", "unet": "seg"}
RESULT_MARK = "@@BENCHMARK-RESULT "
CPU_UNITS = {"images/s": "images/CPU-s", "ms/image": "CPU-ms/image"}
MIB = 1024.0 * 1024.0

# The targets. ``per_worker``: the figure is divided by its worker count first (a build with
# two workers against a one-process decode limit).
TARGETS: list[dict[str, Any]] = [
    dict(section="pipeline", name="warm vs PyTorch", figure="tf_warm", reference="torch", op=">=", threshold=5.0,
         description="make_dataset warm >= 5x the PyTorch DataLoader"),
    dict(section="pipeline", name="cold vs PyTorch", figure="tf_cold", reference="torch", op=">=", threshold=1.0,
         description="make_dataset cold >= 1.0x the PyTorch DataLoader (identical bytes)"),
    dict(section="pipeline", name="cold vs source peer", figure="tf_cold", reference="torch_source", op=">=",
         threshold=10.0, description="make_dataset cold >= 10x the PyTorch DataLoader reading the source files"),
    dict(section="pipeline", name="warm vs source peer", figure="tf_warm", reference="torch_source", op=">=",
         threshold=5.0, description="make_dataset warm >= 5x the PyTorch DataLoader reading the source files"),
    dict(section="pipeline", name="cold vs decode limit", figure="tf_cold", reference="limit", op=">=", threshold=0.5,
         description="make_dataset cold >= 0.5x the cv2 decode limit"),
    # the same three with the augmentation moved into the training step (augment_in: step)
    dict(section="pipeline", name="warm vs PyTorch, augment_in step", figure="tf_warm_plain", reference="torch",
         op=">=", threshold=5.0, description="make_dataset warm >= 5x the PyTorch DataLoader, augmentation in the step"),
    dict(section="pipeline", name="cold vs PyTorch, augment_in step", figure="tf_cold_plain", reference="torch",
         op=">=", threshold=1.0,
         description="make_dataset cold >= 1.0x the PyTorch DataLoader (identical bytes), augmentation in the step"),
    dict(section="pipeline", name="cold vs decode limit, augment_in step", figure="tf_cold_plain", reference="limit",
         op=">=", threshold=0.5, description="make_dataset cold >= 0.5x the cv2 decode limit, augmentation in the step"),
    dict(section="tfrecords", name="1 worker vs decode limit", figure="build_w1", reference="limit_w1", op=">=",
         threshold=0.8, per_worker=True, description="build_tfrecords, 1 worker >= 0.8x the decode limit per worker"),
    dict(section="tfrecords", name="2 workers vs decode limit", figure="build_w2", reference="limit_w1", op=">=",
         threshold=0.8, per_worker=True,
         description="build_tfrecords, 2 workers: per worker >= 0.8x the decode limit per worker"),
    dict(section="tfrecords", name="2 workers vs 1", figure="build_w2", reference="build_w1", op=">=", threshold=1.7,
         cpu=False, description="build_tfrecords with 2 workers >= 1.7x 1 worker"),
    dict(section="tfrecords", name="peak memory growth", figure="peak_rss_large", reference="peak_rss_small", op="<=",
         threshold=1.2, description="peak RSS (parent + workers) at the larger dataset <= 1.2x the smaller"),
]


# --------------------------------------------------------------------------- small helpers


def median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(values)) if values else None


def figure(values: Sequence[float] | None, unit: str, *, reference: str | None = None, label: str = "",
           status: str = "ok", reason: str | None = None, cpu_values: Sequence[float | None] | None = None,
           **extra: Any) -> dict[str, Any]:
    """One measured quantity: every repeat and their median; the ratios are filled in by
    ``link_ratios``. ``cpu_values`` normalise the same repeats by the CPU time spent instead of
    the wall time (images per CPU-second, or CPU-ms per image): on cores shared with other
    work they show efficiency independently of how much of the machine the run got."""
    values = [float(v) for v in values or []]
    cpu = [float(v) for v in cpu_values or [] if v is not None]
    return {
        "label": label,
        "status": status,
        "reason": reason,
        "unit": unit,
        "values": values,
        "median": median(values) if status == "ok" else None,
        "reference": reference,
        "ratio": None,
        "cpu_unit": CPU_UNITS.get(unit),
        "cpu_values": cpu,
        "cpu_median": median(cpu) if status == "ok" and cpu else None,
        "cpu_ratio": None,
        **extra,
    }


def skipped(unit: str, reason: str, label: str = "", reference: str | None = None) -> dict[str, Any]:
    return figure([], unit, reference=reference, label=label, status="skipped", reason=reason)


def link_ratios(figures: dict[str, dict[str, Any]]) -> None:
    """Each figure's median over its reference's median (same section), wall and CPU."""
    for item in figures.values():
        ref = figures.get(item.get("reference") or "")
        if ref is None:
            continue
        if item["median"] is not None and ref["median"]:
            item["ratio"] = item["median"] / ref["median"]
        if item.get("cpu_median") is not None and ref.get("cpu_median"):
            item["cpu_ratio"] = item["cpu_median"] / ref["cpu_median"]


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


class LoadSampler:
    """The 1-minute load average every few seconds while the benchmark runs (other users of
    the cores show up here)."""

    def __init__(self, interval: float = 5.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            values = load_average()
            if values:
                self.samples.append(values[0])
            self._stop.wait(interval)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {}
        return {"min": min(self.samples), "median": median(self.samples), "max": max(self.samples),
                "samples": len(self.samples)}


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, GPU (if any) and library versions."""
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    import keras
    import tensorflow as tf

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        gpus.append(details.get("device_name", device.name))
    try:
        import torch

        torch_version: str | None = torch.__version__
    except ImportError:
        torch_version = None
    import cv2

    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": memory_gib,
        "gpu": gpus or None,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "torch": torch_version,
        "opencv": cv2.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }


# --------------------------------------------------------------------------- child processes
# Peers and limits run in fresh interpreters: no TensorFlow thread pools beside them, a clean
# fork for their own worker pools, and a process tree whose memory can be measured alone.


def run_child(job: str, spec: dict[str, Any], *, sample_memory: bool = False, timeout: float = 3600) -> dict[str, Any]:
    """Run ``job`` in a child interpreter; return its JSON result (with ``peak_rss_tree`` in
    bytes when ``sample_memory``: the largest sum of RSS over the child and its descendants)."""
    with tempfile.TemporaryDirectory(prefix="caaxr-bench-child-") as scratch:
        out_path, err_path = Path(scratch) / "stdout", Path(scratch) / "stderr"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.benchmark", "--child", job, json.dumps(spec)],
                stdout=out, stderr=err, cwd=str(REPO), env=child_env(),
            )
            peak = sample_tree_rss(process, timeout) if sample_memory else None
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise RuntimeError(f"benchmark child {job} ran past {timeout:.0f} s")
        lines = out_path.read_text().splitlines()
        results = [line[len(RESULT_MARK):] for line in lines if line.startswith(RESULT_MARK)]
        if process.returncode != 0 or not results:
            tail = "\n".join(err_path.read_text().splitlines()[-15:])
            raise RuntimeError(f"benchmark child {job} failed (exit {process.returncode}):\n{tail}")
    result = json.loads(results[-1])
    if peak is not None:
        result["peak_rss_tree"] = peak
    return result


def sample_tree_rss(process: subprocess.Popen, timeout: float, interval: float = 0.02) -> int | None:
    """Poll the RSS of ``process`` and all its descendants until it exits; the peak sum."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        root = psutil.Process(process.pid)
    except psutil.NoSuchProcess:
        return None
    peak = 0
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        total = 0
        try:
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in members:
            try:
                total += member.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak = max(peak, total)
        time.sleep(interval)
    return peak


def child_main(job: str, spec: dict[str, Any]) -> None:
    jobs: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "decode": child_decode_limit,
        "torch": child_torch_peer,
        "build": child_build,
    }
    result = jobs[job](spec)
    print(RESULT_MARK + json.dumps(result), flush=True)


# --- the decode limit: cv2.imdecode + cv2.resize, nothing else

_BLOBS: list[bytes] = []


def _decode_range(task: tuple[int, int]) -> tuple[int, float]:
    """Decode and resize images start..stop (cycling over the bytes); (count, CPU seconds)."""
    import cv2
    import numpy as np

    cpu = time.process_time()
    start, stop = task
    size = _DECODE_SIZE
    for index in range(start, stop):
        blob = _BLOBS[index % len(_BLOBS)]
        pixels = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
        cv2.resize(pixels, (size, size), interpolation=cv2.INTER_CUBIC)
    return stop - start, time.process_time() - cpu


_DECODE_SIZE = IMAGE_SIZE


def _noop(_: int) -> int:
    return os.getpid()


def child_decode_limit(spec: dict[str, Any]) -> dict[str, Any]:
    """images/s of a bare decode + resize loop over the files' bytes (read into memory first),
    in ``workers`` forked processes (one: in this process)."""
    global _BLOBS
    _BLOBS = [Path(p).read_bytes() for p in spec["files"]]
    count = len(_BLOBS)
    workers = int(spec["workers"])
    total = max(int(spec["min_images"]), count)
    chunk = 8
    tasks = [(start, min(start + chunk, total)) for start in range(0, total, chunk)]
    rates, cpu_rates = [], []

    def record(started: float, results: Iterable[tuple[int, float]]) -> None:
        results = list(results)
        done, cpu = sum(r[0] for r in results), sum(r[1] for r in results)
        rates.append(done / (time.perf_counter() - started))
        cpu_rates.append(done / cpu if cpu > 0 else None)

    if workers <= 1:
        _decode_range((0, min(count, 4)))  # warm-up: libraries loaded, caches touched
        for _ in range(int(spec["repeats"])):
            record(time.perf_counter(), map(_decode_range, tasks))
    else:
        # fork: the workers inherit the bytes; this process holds no TensorFlow threads
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(_noop, range(workers * 4))
            pool.map(_decode_range, [(0, min(count, 2))] * workers)
            for _ in range(int(spec["repeats"])):
                started = time.perf_counter()
                record(started, pool.imap_unordered(_decode_range, tasks))
    return {"status": "ok", "values": rates, "cpu_values": cpu_rates, "images": count, "images_per_repeat": total}


# --- the PyTorch DataLoader peer


def child_torch_peer(spec: dict[str, Any]) -> dict[str, Any]:
    """images/s of a torch DataLoader (PIL decode, inversion/scaling, bicubic resize to 224,
    optionally the same kind of augmentation), with persistent workers; the first epoch
    (worker start-up) is not timed."""
    try:
        import torch
        from torch.utils.data import DataLoader
    except ImportError as error:
        return {"status": "skipped", "reason": f"torch is not installed ({error}); pip install -e .[bench]"}
    entries = json.loads(Path(spec["index"]).read_text())
    dataset = TorchXrayDataset(entries, IMAGE_SIZE, bool(spec["augment"]), int(spec.get("seed", 0)))
    loader = DataLoader(dataset, batch_size=int(spec["batch"]), shuffle=True, num_workers=int(spec["workers"]),
                        persistent_workers=int(spec["workers"]) > 0, drop_last=False,
                        generator=torch.Generator().manual_seed(0))
    for _ in loader:  # warm-up epoch: workers started, files in the page cache
        pass
    rates, cpu_rates = [], []
    for _ in range(int(spec["repeats"])):
        seen = 0
        cpu = tree_cpu_seconds()
        started = time.perf_counter()
        while seen < int(spec["min_images"]):
            for images, _labels in loader:
                seen += int(images.shape[0])
        rates.append(seen / (time.perf_counter() - started))
        spent = tree_cpu_seconds()
        cpu_rates.append(seen / (spent - cpu) if cpu is not None and spent is not None and spent > cpu else None)
    return {"status": "ok", "values": rates, "cpu_values": cpu_rates, "images": len(entries), "torch": torch.__version__}


def tree_cpu_seconds() -> float | None:
    """CPU seconds of this process and its live descendants (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


class TorchXrayDataset:
    """Map-style dataset: the training preprocessing written with PIL/NumPy/torch."""

    def __init__(self, entries: list, size: int, augment: bool, seed: int):
        self.entries = entries
        self.size = size
        self.augment = augment
        self.seed = seed
        self.calls = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        import numpy as np
        import torch
        from PIL import Image

        path, bit_depth, invert, label = self.entries[index]
        with Image.open(path) as image:
            eight_bit = image.mode in ("L", "P", "RGB", "RGBA")
            if image.mode not in ("L", "I", "I;16", "I;16B", "F"):
                image = image.convert("L")
            pixels = np.asarray(image, dtype=np.float32)
        # the range rule of preprocess_image: 9..15 bits -> 2**bits - 1, else the file's own range
        if 8 < bit_depth < 16:
            full_range = float(2 ** bit_depth - 1)
        else:
            full_range = 255.0 if eight_bit else 65535.0
        pixels = np.minimum(pixels, full_range)
        if invert:
            pixels = full_range - pixels
        pixels *= 255.0 / full_range
        resized = Image.fromarray(pixels).resize((self.size, self.size), Image.Resampling.BICUBIC)
        out = np.clip(np.round(np.asarray(resized)), 0, 255).astype(np.uint8)
        tensor = torch.from_numpy(out).float()[None]
        if self.augment:
            tensor = self._augment(tensor, index)
        return tensor, int(label)

    def _augment(self, image, index: int):
        """Rotation ±7°, shift ±5 %, zoom ±10 % (bilinear), contrast and brightness."""
        import torch
        import torch.nn.functional as F

        self.calls += 1
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index * 7919 + self.calls)
        u = torch.rand(6, generator=generator)
        angle = (u[0] * 2 - 1) * 7.0 * math.pi / 180.0
        scale = 1.0 + (u[3] * 2 - 1) * 0.1
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[cos, -sin, float(u[1] * 2 - 1) * 0.1], [sin, cos, float(u[2] * 2 - 1) * 0.1]])
        grid = F.affine_grid(theta[None], [1, 1, self.size, self.size], align_corners=False)
        warped = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        contrast = 1.0 + float(u[4] * 2 - 1) * 0.2
        brightness = float(u[5] * 2 - 1) * 0.1 * 255.0
        mean = warped.mean()
        return ((warped - mean) * contrast + mean + brightness).clamp(0.0, 255.0)


# --- one build_tfrecords run


def rss_now() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def child_build(spec: dict[str, Any]) -> dict[str, Any]:
    """Time build_tfrecords (TensorFlow imported first, as any caller has it) and report how
    the time splits between staging (decode/resize/PNG encode in the workers) and writing the
    shards (a thread of the parent process, overlapping the staging of the next protocol)."""
    import resource

    import tensorflow as tf  # noqa: F401  (the shard writer needs it; not part of the build time)

    from caaxr_tf.data import tfrecords as tfr

    phases = {"stage": 0.0, "write": 0.0}
    stage, write = tfr.Stager.stage, tfr.write_protocol

    def timed_stage(self, samples, description):
        started = time.perf_counter()
        try:
            return stage(self, samples, description)
        finally:
            phases["stage"] += time.perf_counter() - started

    def timed_write(*args, **kwargs):
        started = time.perf_counter()
        try:
            return write(*args, **kwargs)
        finally:
            phases["write"] += time.perf_counter() - started

    tfr.Stager.stage, tfr.write_protocol = timed_stage, timed_write
    if spec.get("runner") == "beam":
        from caaxr_tf.data import beam_build

        beam_stage = beam_build.BeamStager.stage

        def timed_beam_stage(self, samples, description):
            started = time.perf_counter()
            try:
                return beam_stage(self, samples, description)
            finally:
                phases["stage"] += time.perf_counter() - started

        beam_build.BeamStager.stage = timed_beam_stage
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    rss_before = rss_now()

    def cpu_seconds() -> float:
        own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime

    cpu = cpu_seconds()
    started = time.perf_counter()
    summaries = tfr.build_tfrecords(spec["data_root"], out, source=spec["source"], protocols=spec["protocols"],
                                    workers=int(spec["workers"]), storage_size=int(spec.get("storage_size", 512)),
                                    progress=False, log=lambda line: None, runner=spec.get("runner", "local"),
                                    beam_options=spec.get("beam_options"))
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu  # the pool is joined by now, so its workers are counted
    ids: set[str] = set()
    records = 0
    for name, summary in summaries.items():
        with open(out / name / "manifest.csv", newline="", encoding="utf-8") as handle:
            ids.update(row["image_id"] for row in csv.DictReader(handle))
        # the records written (a part shard serves several folds)
        records += sum(entry["records"] for entry in summary["shard_files"].values())
    if not spec.get("keep"):
        shutil.rmtree(out, ignore_errors=True)
    # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN is the largest single waited-for worker
    return {
        "status": "ok",
        "seconds": seconds,
        "cpu_seconds": cpu,
        "images": len(ids),
        "image_ids": sorted(ids) if spec.get("return_ids") else None,
        "records": records,
        "stage_seconds": phases["stage"],
        "write_seconds": phases["write"],
        "rss_before_build": rss_before,
        "maxrss_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "maxrss_largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


# --------------------------------------------------------------------------- data


class Bench:
    """Shared state: arguments, work folder, data root, TFRecords, results."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.quick = args.quick
        self.workers = args.workers
        self.repeats = args.repeats or (2 if args.quick else 5)
        self.data_root: Path | None = None
        self.tfrecords: Path | None = None
        self.dataset_info: dict[str, Any] = {}

    def log(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp} load {load_average()[:1]}] {message}", flush=True)

    # --- data preparation

    def prepare_data(self, tfrecords: bool = True) -> None:
        args = self.args
        if args.data_root:
            self.data_root = Path(args.data_root).resolve()
            if not self.data_root.is_dir():
                raise SystemExit(f"error: data root not found: {self.data_root}")
        else:
            self.data_root = self.synthetic_root(args.synthetic, self.work / f"data-{args.synthetic}")
        if not tfrecords:
            self.dataset_info = {"source": args.source, "data_root": str(self.data_root),
                                 "synthetic": None if args.data_root else args.synthetic}
            return
        self.tfrecords = self.work / f"tfrecords-{args.source}"
        self.log(f"TFRecords for {PIPELINE_PROTOCOL} and seg under {self.tfrecords}")
        from caaxr_tf.data.tfrecords import build_tfrecords

        # a cache of this work folder: replaced when the data or arguments changed
        build_tfrecords(self.data_root, self.tfrecords, source=args.source, protocols=[PIPELINE_PROTOCOL, "seg"],
                        workers=self.workers, progress=False, log=lambda line: None, overwrite=True)
        summary = json.loads((self.tfrecords / PIPELINE_PROTOCOL / "summary.json").read_text())
        self.dataset_info = {
            "source": args.source,
            "data_root": str(self.data_root),
            "synthetic": None if args.data_root else args.synthetic,
            "protocol": PIPELINE_PROTOCOL,
            "images": sum(summary["counts"]["total"].values()),
            "train_images": sum(summary["counts"]["fold1"]["train"].values()),
            "storage_size": summary.get("storage_size"),
        }

    def synthetic_root(self, scale: str, root: Path, counts: dict[str, int] | None = None) -> Path:
        """Generate (or reuse) a synthetic data root; ``counts`` registers a custom scale."""
        from caaxr_tf.data import synthetic

        manifest = root / synthetic.MANIFEST_NAME
        if manifest.exists():
            return root
        if counts is not None:
            synthetic.SCALES[scale] = counts  # a benchmark-only size between the named ones
        self.log(f"generating the synthetic {scale} set in {root}")
        shutil.rmtree(root, ignore_errors=True)
        synthetic.generate(root, scale=scale, seed=0, workers=self.workers)
        return root


def scaled_counts(total: int) -> dict[str, int]:
    """The tiny set's proportions scaled to about ``total`` images."""
    from caaxr_tf.data import synthetic

    tiny = synthetic.SCALES["tiny"]
    factor = total / sum(tiny.values())
    return {name: max(1, round(count * factor)) for name, count in tiny.items()}


def source_files(source: str, data_root: Path, image_ids: Iterable[str]) -> list[str]:
    """The files the readers give for ``image_ids`` (what the stager decodes)."""
    from caaxr_tf.config import load_config
    from caaxr_tf.data import protocols as protocols_lib
    from caaxr_tf.data.tfrecords import read_sources

    specs = protocols_lib.load_protocols(source, load_config("protocols"))
    needed = {c.source for spec in specs.values() for c in spec.classes}
    readings = read_sources(source, data_root, needed, load_config("data"))
    paths = {s.image_id: s.path for reading in readings.values() for s in reading.samples}
    wanted = set(image_ids)
    return sorted(str(paths[i]) for i in wanted if i in paths and not str(paths[i]).lower().endswith((".dcm", ".dicom")))


def subset_covid_chestxray(data_root: Path, out: Path, fraction: float) -> Path:
    """A covid-chestxray root with the first ``fraction`` of metadata.csv's rows (the rest of
    the root is linked, not copied)."""
    if (out / "metadata.csv").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for entry in data_root.iterdir():
        if entry.name != "metadata.csv":
            target = out / entry.name
            if not target.exists():
                target.symlink_to(entry.resolve())
    with open(data_root / "metadata.csv", newline="", encoding="utf-8", errors="replace") as handle:
        rows = list(csv.reader(handle))
    keep = rows[: 1 + max(1, round((len(rows) - 1) * fraction))]
    with open(out / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(keep)
    return out


# --------------------------------------------------------------------------- pipeline


def extract_split(tfrecord_dir: Path, split: str, out: Path) -> list[list]:
    """Write the encoded images of a split to files; returns [path, bit_depth, invert, label]."""
    import tensorflow as tf

    from caaxr_tf.data.pipeline import parse_record, shard_files

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    records = tf.data.TFRecordDataset(shard_files(tfrecord_dir, split, 1)).map(parse_record)
    for index, record in enumerate(records.as_numpy_iterator()):
        encoded = record["image/encoded"]
        suffix = ".png" if encoded[:4] == b"\x89PNG" else ".jpg"
        path = out / f"{index:06d}{suffix}"
        path.write_bytes(encoded)
        entries.append([str(path), int(record["image/bit_depth"]), int(record["image/invert"]), int(record["label"])])
    return entries


def take_images(iterator, count: int, exact: bool = False) -> tuple[float, float | None]:
    """(images/s, images per CPU-second of this process) while at least ``count`` images are
    taken. ``exact`` counts ``count`` only: for a first epoch, whose last batch may be filled up
    from the (by then complete) cache of the next one."""
    seen = 0
    cpu = time.process_time()
    started = time.perf_counter()
    while seen < count:
        seen += int(next(iterator)[0].shape[0])
    wall, spent = time.perf_counter() - started, time.process_time() - cpu
    done = count if exact else seen
    return done / wall, (done / spent if spent > 0 else None)


def bench_pipeline(bench: Bench) -> dict[str, Any]:
    from caaxr_tf.tasks.datasets import make_dataset

    tfr = bench.tfrecords / PIPELINE_PROTOCOL
    train_images = bench.dataset_info["train_images"]
    min_images = max(train_images, 150 if bench.quick else 1000)
    repeats = bench.repeats
    figures: dict[str, dict[str, Any]] = {}
    notes: list[str] = []

    def dataset(cache: bool, augment: bool = True):
        # repeat=True and one iterator, as the training loop reads it
        return make_dataset(tfr, "train", batch_size=PIPELINE_BATCH, image_size=IMAGE_SIZE, training=True,
                            augment=augment, cache=cache, repeat=True, seed=0)

    bench.log(f"pipeline: make_dataset cold (cache off), {repeats} x >= {min_images} images")
    # Steady state: tf.data decodes ahead (a whole epoch into the shuffle buffer, plus the
    # prefetch buffers), so the window starts after one untimed epoch and the work in flight
    # at its two ends cancels out.
    iterator = iter(dataset(cache=False))
    take_images(iterator, max(2 * train_images, 100))
    cold = [take_images(iterator, min_images) for _ in range(repeats)]
    figures["tf_cold"] = figure([w for w, _ in cold], "images/s", reference="torch", cpu_values=[c for _, c in cold],
                                label="make_dataset cold (cache off: parse+decode+invert+resize+augment)")

    bench.log("pipeline: make_dataset first epoch into a fresh cache, then warm epochs")
    first, warm = [], []
    for _ in range(repeats):
        iterator = iter(dataset(cache=True))
        first.append(take_images(iterator, train_images, exact=True))  # the first epoch fills the cache
        warm.append(take_images(iterator, max(min_images, 3 * train_images)))
    figures["tf_first_epoch"] = figure([w for w, _ in first], "images/s", reference="torch",
                                       cpu_values=[c for _, c in first],
                                       label="make_dataset first epoch (fresh in-memory cache)")
    figures["tf_warm"] = figure([w for w, _ in warm], "images/s", reference="torch", cpu_values=[c for _, c in warm],
                                label="make_dataset warm (cached)")

    # augment_in: step — the same pipeline without the augmentation, which the training step does
    bench.log("pipeline: the same without augmentation (augment_in: step), cold and warm")
    iterator = iter(dataset(cache=False, augment=False))
    take_images(iterator, max(2 * train_images, 100))
    cold_plain = [take_images(iterator, min_images) for _ in range(repeats)]
    warm_plain = []
    for _ in range(repeats):
        iterator = iter(dataset(cache=True, augment=False))
        take_images(iterator, train_images, exact=True)
        warm_plain.append(take_images(iterator, max(min_images, 3 * train_images)))
    figures["tf_cold_plain"] = figure([w for w, _ in cold_plain], "images/s", reference="torch",
                                      cpu_values=[c for _, c in cold_plain],
                                      label="make_dataset cold, augmentation in the training step (augment_in: step)")
    figures["tf_warm_plain"] = figure([w for w, _ in warm_plain], "images/s", reference="torch",
                                      cpu_values=[c for _, c in warm_plain],
                                      label="make_dataset warm, augmentation in the training step (augment_in: step)")

    entries = extract_split(tfr, "train", bench.work / "peer-files" / PIPELINE_PROTOCOL)
    index = bench.work / "peer-files" / f"{PIPELINE_PROTOCOL}.json"
    index.write_text(json.dumps(entries))
    files = [e[0] for e in entries]
    bench.log(f"pipeline: decode limit, {bench.workers} processes")
    limit = run_child("decode", {"files": files, "workers": bench.workers, "repeats": repeats,
                                 "min_images": min_images})
    figures["limit"] = figure(limit["values"], "images/s", cpu_values=limit["cpu_values"],
                              label=f"decode limit: cv2.imdecode+resize, {bench.workers} processes")

    for key, augment in (("torch", False), ("torch_augment", True)):
        label = f"PyTorch DataLoader, {bench.workers} workers, PIL decode+bicubic" + (" + augmentation" if augment else "")
        if bench.args.no_torch:
            figures[key] = skipped("images/s", "--no-torch given", label=label, reference="limit")
            continue
        bench.log(f"pipeline: {label}")
        result = run_child("torch", {"index": str(index), "workers": bench.workers, "batch": PIPELINE_BATCH,
                                     "augment": augment, "repeats": repeats, "min_images": min_images})
        if result["status"] != "ok":
            figures[key] = skipped("images/s", result["reason"], label=label, reference="limit")
        else:
            figures[key] = figure(result["values"], "images/s", reference="limit", label=label,
                                  cpu_values=result["cpu_values"])
    bench_source_peer(bench, tfr, figures, notes)
    figures["limit"]["reference"] = None
    notes.append(f"{train_images} training images of {PIPELINE_PROTOCOL} (fold 1), batch {PIPELINE_BATCH}, "
                 f"{IMAGE_SIZE}x{IMAGE_SIZE}; {bench.workers} worker(s) for every peer; tf.data uses its own "
                 "thread pool (one thread per core).")
    notes.append("tf.data is read as train.py reads it (repeat, one iterator). Cold: steady state with the cache "
                 "off, timed after one untimed epoch (tf.data decodes up to an epoch ahead into the shuffle buffer); "
                 "first epoch: a fresh iterator filling the in-memory cache, exactly one epoch counted. The PyTorch "
                 "peer's first epoch (worker start-up) is not timed either.")
    return {"figures": figures, "notes": notes, "settings": {"min_images": min_images, "repeats": repeats}}


def source_peer_entries(source: str, data_root: Path, protocol_dir: Path, split: str = "train",
                        fold: int = 1) -> list[list]:
    """[source path, bit_depth (0: the file's own range), invert, label index] of each image of a
    protocol's split, from its manifest.csv and the source's reader: what a user without this
    project would hand a Dataset."""
    from caaxr_tf.config import load_config
    from caaxr_tf.data import protocols as protocols_lib
    from caaxr_tf.data.schema import MANIFEST_FILE
    from caaxr_tf.data.tfrecords import read_sources

    specs = protocols_lib.load_protocols(source, load_config("protocols"))
    needed = {c.source for spec in specs.values() for c in spec.classes}
    readings = read_sources(source, data_root, needed, load_config("data"))
    samples = {s.image_id: s for reading in readings.values() for s in reading.samples}
    entries = []
    with open(protocol_dir / MANIFEST_FILE, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            sample = samples.get(row["image_id"])
            if row[f"split_fold{fold}"] != split or sample is None or str(sample.path).lower().endswith((".dcm", ".dicom")):
                continue
            entries.append([str(sample.path), int(sample.bit_depth or 0), int(bool(sample.invert)), int(row["label_index"])])
    return entries


def bench_source_peer(bench: Bench, protocol_dir: Path, figures: dict[str, dict[str, Any]], notes: list[str]) -> None:
    """``torch_source``: a PyTorch DataLoader that reads every training image from its source file
    each epoch (16-bit PNG / JPEG at its own size), with the same inversion, bit-depth scaling,
    bicubic resize to 224 and augmentation as the identical-bytes peer, and as many workers."""
    label = f"PyTorch DataLoader on the source files, {bench.workers} workers, PIL decode+bicubic + augmentation"
    if bench.args.no_torch:
        figures["torch_source"] = skipped("images/s", "--no-torch given", label=label, reference="limit")
        return
    entries = source_peer_entries(bench.args.source, bench.data_root, protocol_dir)
    index = bench.work / "peer-files" / f"{PIPELINE_PROTOCOL}-sources.json"
    index.write_text(json.dumps(entries))
    # it reads sources of up to 3,000 px: one epoch per repeat bounds its time
    repeats = 2 if bench.quick else 3
    bench.log(f"pipeline: {label}, {repeats} x 1 epoch of {len(entries)} images")
    result = run_child("torch", {"index": str(index), "workers": bench.workers, "batch": PIPELINE_BATCH,
                                 "augment": True, "repeats": repeats, "min_images": len(entries)})
    if result["status"] != "ok":
        figures["torch_source"] = skipped("images/s", result["reason"], label=label, reference="limit")
        return
    from PIL import Image

    pixels = []
    for path, *_ in entries:
        try:
            with Image.open(path) as image:
                pixels.append(image.width * image.height)
        except OSError:
            continue
    megapixels = sum(pixels) / max(1, len(pixels)) / 1e6
    figures["torch_source"] = figure(result["values"], "images/s", reference="limit", label=label,
                                     cpu_values=result["cpu_values"], images=len(entries),
                                     mean_source_megapixels=round(megapixels, 3))
    notes.append(f"torch_source reads the {len(entries)} training images from their source files (mean "
                 f"{megapixels:.2f} megapixels) every epoch; its targets compare tf.data with what the records save.")


# --------------------------------------------------------------------------- tfrecords


def stored_as_they_are(files: Sequence[str], storage_size: int) -> int:
    """How many of ``files`` the TFRecord builder stores with their own bytes at ``storage_size``."""
    from caaxr_tf.data.images import load_image
    from caaxr_tf.data.staging import keeps_source_bytes

    kept = 0
    for path in files:
        try:
            loaded = load_image(path)
        except Exception:  # noqa: BLE001 — unusable files are the builder's to report
            continue
        kept += keeps_source_bytes(loaded, storage_size)
    return kept


def full_size_synthetic(bench: Bench) -> bool:
    """True for a synthetic set whose BIMCV images have their real sizes (``--synthetic realistic``)."""
    from caaxr_tf.data import synthetic

    return bool(bench.args.synthetic) and bench.args.synthetic in synthetic.FULL_SIZE_SCALES


def quarter_synthetic_root(bench: Bench) -> Path:
    """A synthetic set with a quarter of the images of ``--synthetic``'s scale, at the same sizes."""
    from caaxr_tf.data import synthetic

    scale = bench.args.synthetic
    name = f"{scale}-quarter"
    synthetic.FULL_SIZE_SCALES.add(name)
    counts = {category: max(1, round(count / 4)) for category, count in synthetic.SCALES[scale].items()}
    return bench.synthetic_root(name, bench.work / f"data-{name}", counts)


def bench_tfrecords(bench: Bench) -> dict[str, Any]:
    args = bench.args
    repeats = 1 if bench.quick else max(2, min(3, bench.repeats))
    figures: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    runs: dict[str, list[dict[str, Any]]] = {}
    scratch = bench.work / "tfrecords-bench"
    image_ids: list[str] = []
    for workers in (1, 2):
        runs[f"w{workers}"] = []
        for repeat in range(repeats):
            bench.log(f"tfrecords: build_tfrecords (all protocols), {workers} worker(s), run {repeat + 1}/{repeats}")
            result = run_child("build", {"data_root": str(bench.data_root), "out": str(scratch / f"w{workers}"),
                                         "source": args.source, "protocols": "all", "workers": workers,
                                         "storage_size": STORAGE_SIZE, "return_ids": not image_ids})
            image_ids = image_ids or result.pop("image_ids")
            runs[f"w{workers}"].append(result)
        values = [r["images"] / r["seconds"] for r in runs[f"w{workers}"]]
        figures[f"build_w{workers}"] = figure(
            values, "images/s", reference="limit_w1" if workers == 1 else "build_w1",
            cpu_values=[r["images"] / r["cpu_seconds"] for r in runs[f"w{workers}"]],
            label=f"build_tfrecords, {workers} worker(s), all protocols", workers=workers,
            per_worker=[v / workers for v in values],
            stage_seconds=median([r["stage_seconds"] for r in runs[f"w{workers}"]]),
            write_seconds=median([r["write_seconds"] for r in runs[f"w{workers}"]]),
            seconds=median([r["seconds"] for r in runs[f"w{workers}"]]),
            images=runs[f"w{workers}"][0]["images"], records=runs[f"w{workers}"][0]["records"],
        )

    full_size = full_size_synthetic(bench)
    if full_size:
        notes.append("build_w1_original is not measured on full-size sources: it would copy every 2,000-3,000 px "
                     "PNG into about 4.8 records.")
    if not bench.quick and not full_size:
        # The same build keeping every source at its own size: no image needs shrinking, so every
        # greyscale PNG/JPEG goes into the records as it is and only the rest is re-encoded.
        runs["w1_original"] = []
        for repeat in range(repeats):
            bench.log(f"tfrecords: build_tfrecords, 1 worker, --storage-size 0, run {repeat + 1}/{repeats}")
            runs["w1_original"].append(run_child("build", {
                "data_root": str(bench.data_root), "out": str(scratch / "w1-original"), "source": args.source,
                "protocols": "all", "workers": 1, "storage_size": 0}))
        items = runs["w1_original"]
        figures["build_w1_original"] = figure(
            [r["images"] / r["seconds"] for r in items], "images/s", reference="limit_w1",
            cpu_values=[r["images"] / r["cpu_seconds"] for r in items],
            label="build_tfrecords, 1 worker, --storage-size 0 (sources kept at their size)", workers=1,
            seconds=median([r["seconds"] for r in items]), images=items[0]["images"], records=items[0]["records"])

    files = source_files(args.source, bench.data_root, image_ids)
    kept = stored_as_they_are(files, STORAGE_SIZE)
    notes.append(f"At --storage-size {STORAGE_SIZE}, {kept} of {len(files)} source images are greyscale PNG/JPEG that "
                 "fit and go into the records with their own bytes; the others are shrunk (or converted to grey) "
                 "and PNG-encoded.")
    for workers in (1, 2):
        bench.log(f"tfrecords: decode limit over {len(files)} source files, {workers} process(es)")
        limit = run_child("decode", {"files": files, "workers": workers, "repeats": max(3, repeats),
                                     "min_images": max(len(files), 100 if bench.quick else 500)})
        figures[f"limit_w{workers}"] = figure(limit["values"], "images/s", cpu_values=limit["cpu_values"],
                                              reference=None if workers == 1 else "limit_w1",
                                              label=f"decode limit over the source files, {workers} process(es)")

    # Peak memory of the whole build (parent + workers) at two dataset sizes.
    sizes = (30, 60) if bench.quick else (500, 2000)  # synthetic sets of reduced size
    memory_roots = []
    if args.source == "covid-chestxray":
        fraction = 0.25
        memory_roots = [("small", subset_covid_chestxray(bench.data_root, bench.work / "memory-subset-25", fraction)),
                        ("large", bench.data_root)]
        notes.append("Peak memory: the first 25 % of metadata.csv's rows against all of them.")
    elif full_size:
        memory_roots = [("small", quarter_synthetic_root(bench)), ("large", bench.data_root)]
        notes.append(f"Peak memory: a quarter of the {args.synthetic} set (same image sizes) against all of it.")
    else:
        for label, total in zip(("small", "large"), sizes):
            root = bench.synthetic_root(f"bench{total}", bench.work / f"data-bench{total}", scaled_counts(total))
            memory_roots.append((label, root))
        notes.append(f"Peak memory: synthetic sets of about {sizes[0]} and {sizes[1]} images (tiny's proportions).")
    for label, root in memory_roots:
        bench.log(f"tfrecords: peak memory, {label} set ({root}), {bench.workers} workers")
        result = run_child("build", {"data_root": str(root), "out": str(scratch / f"memory-{label}"),
                                     "source": args.source, "protocols": "all", "workers": bench.workers},
                           sample_memory=True)
        tree = result.get("peak_rss_tree")
        if tree is None:  # no psutil: the parent's peak plus the largest worker's
            tree = result["maxrss_main"] + result["maxrss_largest_worker"] * bench.workers
            note = "psutil missing: peak memory estimated from getrusage (main + workers x largest worker)."
            if note not in notes:
                notes.append(note)
        figures[f"peak_rss_{label}"] = figure(
            [tree / MIB], "MiB", reference="peak_rss_small" if label == "large" else None,
            label=f"peak RSS (parent + workers), {result['images']} images", images=result["images"],
            maxrss_main_mib=result["maxrss_main"] / MIB, maxrss_largest_worker_mib=result["maxrss_largest_worker"] / MIB,
            rss_before_build_mib=result["rss_before_build"] / MIB,
        )
        # the same peak less what the parent held before the build (TensorFlow and all): growth
        figures[f"peak_net_{label}"] = figure(
            [(tree - result["rss_before_build"]) / MIB], "MiB", reference="peak_net_small" if label == "large" else None,
            label=f"peak RSS less the parent's RSS before the build, {result['images']} images")
    for workers in (1, 2):
        item = figures[f"build_w{workers}"]
        notes.append(f"{workers} worker(s): {item['images']} images, {item['records']} records, "
                     f"{item['seconds']:.1f} s in all; staging {item['stage_seconds']:.1f} s (decode, and resize + PNG "
                     f"encode where needed, in the workers), writing {item['write_seconds']:.1f} s (summed over the "
                     f"parent's shard-writer threads, one per worker, overlapping the next protocol's staging).")
    notes.append("The build time counts from build_tfrecords() with TensorFlow already imported; the worker pool's "
                 "start-up is inside it.")
    return {"figures": figures, "notes": notes, "settings": {"repeats": repeats, "memory_sizes": list(sizes)}}


def output_digests(out: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def bench_tfrecords_beam(bench: Bench) -> dict[str, Any]:
    """build_tfrecords (all protocols) with --runner beam (DirectRunner, multi_processing)
    against the local pool, same worker count, in turns; images/s, peak RSS of the process tree,
    byte identity of the outputs."""
    try:
        import apache_beam  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "apache-beam is not installed (the beam extra)", "figures": {}}
    args = bench.args
    repeats = 1 if bench.quick else max(1, min(2, bench.repeats))
    workers = bench.workers
    options = BEAM_DIRECT.format(workers=workers)
    scratch = bench.work / "tfrecords-beam-bench"
    runs: dict[str, list[dict[str, Any]]] = {"local": [], "beam": []}
    identical: list[bool] = []
    for repeat in range(repeats):
        for runner in ("local", "beam"):  # in turns, so a change of load hits both
            bench.log(f"tfrecords-beam: build_tfrecords (all protocols), runner {runner}, {workers} worker(s), "
                      f"run {repeat + 1}/{repeats}")
            spec = {"data_root": str(bench.data_root), "out": str(scratch / runner), "source": args.source,
                    "protocols": "all", "workers": workers, "storage_size": STORAGE_SIZE, "keep": True,
                    "runner": runner}
            if runner == "beam":
                spec["beam_options"] = options
            runs[runner].append(run_child("build", spec, sample_memory=True))
        local, beam = output_digests(scratch / "local"), output_digests(scratch / "beam")
        identical.append(bool(local) and local == beam)
        bench.log(f"tfrecords-beam: {len(local)} output files, identical: {identical[-1]}")
    figures: dict[str, dict[str, Any]] = {}
    for runner in ("local", "beam"):
        items = runs[runner]
        label = (f"build_tfrecords, local pool, {workers} worker(s)" if runner == "local"
                 else f"build_tfrecords, --runner beam ({options})")
        figures[f"build_{runner}"] = figure(
            [r["images"] / r["seconds"] for r in items], "images/s", reference="build_local" if runner == "beam" else None,
            cpu_values=[r["images"] / r["cpu_seconds"] for r in items], label=label, workers=workers,
            seconds=median([r["seconds"] for r in items]), stage_seconds=median([r["stage_seconds"] for r in items]),
            images=items[0]["images"], records=items[0]["records"])
        trees = [r.get("peak_rss_tree") for r in items]
        if all(t is not None for t in trees):
            figures[f"peak_rss_{runner}"] = figure(
                [t / MIB for t in trees], "MiB", reference="peak_rss_local" if runner == "beam" else None,
                label=f"peak RSS of the process tree, {runner}")
    notes = [
        f"Outputs byte-identical between the runners (sha256 of every file): {all(identical)} in {len(identical)} run(s).",
        "CPU time: the build process and its waited-for children; the DirectRunner's worker processes (started "
        "through a shell that it waits for) are counted, and so are its job-service threads in the parent.",
        "The Beam figure includes the DirectRunner's start-up (worker processes, job service) and the driver's "
        "shard writing, which both runners do alike.",
    ]
    shutil.rmtree(scratch, ignore_errors=True)
    return {"figures": figures, "notes": notes, "settings": {"repeats": repeats, "beam_options": options,
                                                           "identical": identical}}


# --------------------------------------------------------------------------- train


def train_config(bench: Bench, model: str, protocol: str, overrides: Sequence[str] = ()):
    """The RunConfig of ``model`` on ``protocol``, as ``caaxr_tf.train`` resolves it (one device,
    nothing pretrained)."""
    from caaxr_tf.training import resolve_run_config

    return resolve_run_config(bench.tfrecords, protocol, model, flags={"strategy": "one", "weights": "none"},
                              overrides=list(overrides))


def measure_input(config, min_images: int) -> tuple[tuple, tuple]:
    """The model's own training input (``training_datasets``, as the trainer builds it): (images/s,
    images/CPU-s) of the first epoch (decoding into the cache) and of later, cached epochs."""
    from caaxr_tf.tasks import get_task
    from caaxr_tf.training.trainer import training_datasets

    batch = int(config.batch_size)
    data = training_datasets(config, get_task(config.task).from_config(config), batch)
    iterator = iter(data.train)
    cold = take_images(iterator, data.steps * batch)  # drop_remainder: whole batches of the first epoch
    warm = take_images(iterator, max(data.steps * 2, -(-min_images // batch)) * batch)
    return cold, warm


class HeldStep(NamedTuple):
    """The trainer's distributed training step over one batch held in memory, with what it updates."""

    step: Callable[[Any], None]
    iterator: Any
    model: Any
    loss_tracker: Any
    batch: tuple


def build_held_step(config) -> HeldStep:
    """The trainer's own step (same task, model, optimizer, loss, metrics and strategy.run inside
    a tf.function) on the first training batch, repeated, so no input cost. The caller sets the
    seed and the mixed-precision policy."""
    import tensorflow as tf

    from caaxr_tf.training import Trainer, make_strategy

    strategy = make_strategy("one")
    trainer = Trainer(config, tempfile.mkdtemp(prefix="held-step-"), strategy, verbose=False, callbacks=[]).build()
    one_batch = next(iter(trainer.train_dataset))
    held = tf.data.Dataset.from_tensors(one_batch).repeat()
    iterator = iter(strategy.experimental_distribute_dataset(held))
    return HeldStep(trainer.train_step, iterator, trainer.model, trainer.loss_tracker, one_batch)


def time_held_step(held: HeldStep, warmup: int, steps: int, repeats: int) -> list[tuple[float, float | None]]:
    """(images/s, images/CPU-s) of ``repeats`` runs of ``steps`` steps, after ``warmup`` steps."""
    for _ in range(warmup):
        held.step(held.iterator)
    float(held.loss_tracker.result())
    images = steps * int(held.batch[0].shape[0])
    rates = []
    for _ in range(repeats):
        cpu = time.process_time()
        started = time.perf_counter()
        for _ in range(steps):
            held.step(held.iterator)
        float(held.loss_tracker.result())  # waits for the last step
        spent = time.process_time() - cpu
        rates.append((images / (time.perf_counter() - started), images / spent if spent > 0 else None))
    return rates


def measure_step(config, warmup: int, steps: int, repeats: int) -> list[tuple[float, float | None]]:
    """images/s of train.py's replica step (see ``build_held_step``) on one batch held in memory;
    ``config`` is a RunConfig (``train_config``)."""
    import keras

    from caaxr_tf.training.config import mixed_policy

    keras.utils.set_random_seed(int(config.seed))
    policy = mixed_policy(config.mixed_precision)
    if policy:
        keras.mixed_precision.set_global_policy(policy)
    try:
        return time_held_step(build_held_step(config), warmup, steps, repeats)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def bench_train(bench: Bench) -> dict[str, Any]:
    import resource

    import tensorflow as tf

    from caaxr_tf.models import available_models
    from caaxr_tf.tasks import get_task

    figures: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    extra_targets: list[dict[str, Any]] = []
    registered = set(available_models())
    wanted = bench.args.models or list(TRAIN_MODELS)
    if bench.quick and not bench.args.models:
        # a CPU step of unet (batch 4) or maskrcnn (batch 16) takes tens of seconds to minutes
        for model in wanted[:]:
            if model != "mobilenetv2":
                figures[f"step_{model}"] = skipped("images/s", "--quick (pass --models to include it)",
                                                   label=f"{model} training step")
                wanted.remove(model)
    from caaxr_tf.models.precision import supported_precisions

    gpu = bool(tf.config.list_physical_devices("GPU"))
    # (mixed_precision setting, XLA); the figure's suffix names the variant
    variants: list[tuple[Any, bool]] = [(False, False)]
    if gpu:
        variants += [(True, False), (False, True), (True, True)]
    else:
        notes.append("No GPU: float16 mixed precision and XLA variants skipped (measured on CPU without XLA).")
    if "bfloat16" in supported_precisions():
        variants.append(("bfloat16", False))
    else:
        notes.append("This CPU has neither avx512_bf16 nor amx_bf16: the mixed_bfloat16 step is not measured.")
    repeats = 1 if bench.quick else max(2, min(3, bench.repeats))
    for model in wanted:
        protocol = TRAIN_MODELS[model]
        if model not in registered:
            figures[f"step_{model}"] = skipped("images/s", f"model {model!r} is not registered yet", label=f"{model} step")
            continue
        config = train_config(bench, model, protocol)
        batch = int(config.batch_size)
        if batch != PAPER_BATCH[model]:
            notes.append(f"{model}: caaxr_tf/configs/train.yaml gives batch {batch}, the paper {PAPER_BATCH[model]}.")
        bench.log(f"train: {model} input pipeline (make_datasets), batch {batch}")
        inputs = [measure_input(config, 200 if bench.quick else 1000) for _ in range(1 if bench.quick else 2)]
        # On CPU a step of the big models takes seconds: time few of them.
        heavy = model in ("unet", "maskrcnn") and not gpu
        steps = 1 if (bench.quick or heavy) else 3
        warmup = 1 if (bench.quick or heavy) else 2
        for mixed, jit in variants:
            mixed_tag = "bf16" if mixed == "bfloat16" else "mp"
            suffix = "" if not (mixed or jit) else "_" + "_".join(n for n, on in ((mixed_tag, mixed), ("xla", jit)) if on)
            bench.log(f"train: {model} step{suffix} ({warmup} warm-up, {steps} step(s) per repeat, batch {batch})")
            label = f"{model} training step, batch {batch}" + (
                f" ({'mixed ' + ('bfloat16' if mixed == 'bfloat16' else 'float16') if mixed else 'float32'}, "
                f"XLA {'on' if jit else 'off'})" if (gpu or mixed) else "")
            reference = f"step_{model}" if suffix else None
            try:
                rates = measure_step(dataclasses.replace(config, mixed_precision=mixed, jit=jit), warmup, steps,
                                     min(repeats, 2) if heavy else repeats)
            except Exception as error:  # a variant this model cannot run: recorded, the others go on
                if not suffix:
                    raise
                figures[f"step_{model}{suffix}"] = skipped("images/s", f"{type(error).__name__}: {str(error)[:200]}",
                                                           label=label, reference=reference)
                continue
            figures[f"step_{model}{suffix}"] = figure(
                [w for w, _ in rates], "images/s", cpu_values=[c for _, c in rates], label=label, reference=reference,
                batch=batch, protocol=protocol, steps_per_repeat=steps,
                process_peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
        if config.augment and get_task(config.task).supports_augmentation:
            bench.log(f"train: {model} step with the augmentation inside (augment_in: step)")
            rates = measure_step(dataclasses.replace(config, augment_in="step"), warmup, steps,
                                 min(repeats, 2) if heavy else repeats)
            figures[f"step_{model}_augstep"] = figure(
                [w for w, _ in rates], "images/s", cpu_values=[c for _, c in rates], reference=f"step_{model}",
                label=f"{model} training step, batch {batch}, augmentation in the step (augment_in: step)",
                batch=batch, protocol=protocol, steps_per_repeat=steps)
        for kind, position in (("cold", 0), ("warm", 1)):
            figures[f"input_{kind}_{model}"] = figure(
                [i[position][0] for i in inputs], "images/s", reference=f"step_{model}",
                cpu_values=[i[position][1] for i in inputs],
                label=f"{model} input, {'first epoch' if kind == 'cold' else 'cached epochs'} (make_datasets)")
        for kind in ("cold", "warm"):
            extra_targets.append({"name": f"{model} input {kind} vs step", "figure": f"input_{kind}_{model}",
                                  "reference": f"step_{model}", "op": ">=", "threshold": 5.0,
                                  "description": f"{model}: input pipeline ({kind}) >= 5x the training step"})
    notes.append("Step throughput: the step of caaxr_tf.train (replicated, same pieces) under OneDeviceStrategy "
                 "on one batch held in memory; the input figures are measured alone, before the model is built. On a "
                 "CPU-only machine both share the same cores during real training.")
    peaks = ", ".join(f"{key.removeprefix('step_')} {item['process_peak_rss_mib'] / 1024:.1f} GiB"
                      for key, item in figures.items() if "process_peak_rss_mib" in item)
    if peaks:
        notes.append(f"Peak resident memory of the benchmark process after each model's steps (models in this order, "
                     f"so each is an upper bound for its own step): {peaks}.")
    return {"figures": figures, "notes": notes, "extra_targets": extra_targets,
            "settings": {"repeats": repeats, "gpu": gpu}}


# --------------------------------------------------------------------------- inference


def time_calls_in_turns(calls: dict[str, Callable[[], Any]], batch: int, repeats: int,
                        min_seconds: float) -> dict[str, dict[str, list]]:
    """ms per image (wall and CPU) of each call, one value per repeat; each repeat calls until
    ``min_seconds`` pass. The repeats are taken in turns (A, B, C, A, B, C, ...), so a change
    of load on a shared machine falls on every call alike and their ratios stay fair."""
    import tensorflow as tf

    def runner(call: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for value in tf.nest.flatten(call()):
                if hasattr(value, "numpy"):
                    value.numpy()  # wait for the result
        return run

    runners = {name: runner(call) for name, call in calls.items()}
    for run in runners.values():
        run()
        run()  # warm-up: tracing, allocations
    results = {name: {"values": [], "cpu_values": []} for name in calls}
    for _ in range(repeats):
        for name, run in runners.items():
            count = 0
            cpu = time.process_time()
            started = time.perf_counter()
            while True:
                run()
                count += 1
                elapsed = time.perf_counter() - started
                if elapsed >= min_seconds:
                    break
            results[name]["values"].append(elapsed / count / batch * 1000.0)
            results[name]["cpu_values"].append((time.process_time() - cpu) / count / batch * 1000.0)
    return results


def bench_precision(bench: Bench, models: Sequence[str], figures: dict[str, dict[str, Any]], notes: list[str],
                    precision: str) -> None:
    """ms/image of each model computing in ``precision`` (``caaxr_tf.models.precision``) against
    float32, per image size and batch, the two taken in turns."""
    import numpy as np
    import tensorflow as tf

    from caaxr_tf.models import build_model
    from caaxr_tf.models.precision import check_precision, with_precision

    try:
        check_precision(precision)
    except ValueError as error:
        notes.append(f"{precision} rows not measured: {error}")
        return
    sizes = [int(v) for v in str(bench.args.precision_sizes).split(",") if v.strip()]
    batches = [int(v) for v in str(bench.args.precision_batches).split(",") if v.strip()]
    min_seconds = 0.3 if bench.quick else 1.0
    for model_name in models:
        for size in sizes:
            kwargs = {"num_classes": 2} if model_name != "unet" else {}
            model = build_model(model_name, input_shape=(size, size, 1), weights="none", **kwargs)
            copies = {"float32": model, precision: with_precision(model, precision)}
            steps = {name: tf.function(lambda x, m=m: m(x, training=False), reduce_retracing=True)
                     for name, m in copies.items()}
            for batch in batches:
                if batch * size * size > bench.args.precision_max_pixels:
                    for name in copies:
                        figures[f"prec_{name}_{model_name}_{size}_b{batch}"] = skipped(
                            "ms/image", f"over --precision-max-pixels ({batch} x {size}^2)",
                            label=f"{model_name} {size} px, batch {batch}, {name}")
                    continue
                x = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, size, size, 1)).astype(np.float32))
                bench.log(f"inference precision: {model_name} {size} px, batch {batch}: float32 vs {precision}")
                calls = {name: (lambda step=step: step(x)) for name, step in steps.items()}
                timings = time_calls_in_turns(calls, batch, bench.repeats, min_seconds)
                reference = f"prec_float32_{model_name}_{size}_b{batch}"
                for name in copies:
                    figures[f"prec_{name}_{model_name}_{size}_b{batch}"] = figure(
                        unit="ms/image", reference=None if name == "float32" else reference,
                        label=f"{model_name} {size} px, batch {batch}, Keras in tf.function, {name}",
                        **timings[name])
                outputs = {name: np.asarray(tf.nest.flatten(step(x[:1]))[0], np.float32) for name, step in steps.items()}
                figures[f"prec_{precision}_{model_name}_{size}_b{batch}"]["max_abs_difference"] = float(
                    np.max(np.abs(outputs[precision] - outputs["float32"])))
                row = {name: figures[f"prec_{name}_{model_name}_{size}_b{batch}"] for name in copies}
                bench.log("  " + ", ".join(f"{name} {row[name]['median']:.1f} ms/image (CPU {row[name]['cpu_median']:.1f})"
                                           for name in copies)
                          + f", max |difference| {row[precision]['max_abs_difference']:.2g}")
    notes.append(f"Precision rows: the model (random weights, built at each size) in float32 and as "
                 f"caaxr_tf.models.precision.with_precision(model, {precision!r}) (mixed policy, float32 inputs and "
                 "outputs), each called through tf.function (the graph the export serves), the two taken in turns; "
                 "max_abs_difference: largest output difference on one image.")


def bench_inference(bench: Bench) -> dict[str, Any]:
    figures: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    extra_targets: list[dict[str, Any]] = []
    if getattr(bench.args, "precision_only", False):
        models = [m for m in INFERENCE_MODELS if m in (bench.args.models or list(INFERENCE_MODELS))]
        bench_precision(bench, models, figures, notes, bench.args.precision or "bfloat16")
        return {"figures": figures, "notes": notes, "extra_targets": extra_targets,
                "settings": {"repeats": bench.repeats, "models": models, "precision_only": True}}
    try:
        from caaxr_tf.export import export_run
    except ImportError as error:
        return {"status": "skipped", "reason": f"caaxr_tf.export is not available yet ({error})",
                "figures": {}, "notes": ["Inference skipped: the export module has not landed."]}
    import numpy as np
    import tensorflow as tf

    from caaxr_tf import runs
    from caaxr_tf import train as train_lib
    from caaxr_tf.data.pipeline import parse_record, preprocess_image, shard_files
    from caaxr_tf.tasks.datasets import make_dataset

    # One model by default: a CPU call of unet at batch 32 takes about a minute.
    models = [m for m in INFERENCE_MODELS if m in (bench.args.models or ["mobilenetv2"])] or ["mobilenetv2"]
    repeats = bench.repeats
    min_seconds = 0.3 if bench.quick else 1.0
    for model_name in models:
        protocol = INFERENCE_MODELS[model_name]
        tfr = bench.tfrecords / protocol
        run_dir = bench.work / "inference-runs" / model_name
        shutil.rmtree(run_dir, ignore_errors=True)
        bench.log(f"inference: {model_name}: one-step training run, then export")
        config = train_config(bench, model_name, protocol,
                              ["epochs=1", "steps_per_epoch=1", "validation_steps=1", "batch_size=2"])
        train_lib.run_training(config, run_dir, verbose=False)
        export_dir = export_run(run_dir, bench.work / "exports" / f"bench-{model_name}")
        loaded = tf.saved_model.load(str(export_dir))
        serving = loaded.signatures["serving_default"]
        preprocessed_sig = loaded.signatures["predict_preprocessed"]
        model = runs.load_run_model(run_dir, "best")

        raw = list(tf.data.TFRecordDataset(shard_files(tfr, "test")).map(parse_record).take(32).as_numpy_iterator())
        while len(raw) < 32:
            raw += raw
        encoded = [r["image/encoded"] for r in raw[:32]]
        bit_depths = np.array([r["image/bit_depth"] for r in raw[:32]], np.int32)
        inverts = np.array([bool(r["image/invert"]) for r in raw[:32]])
        images = next(iter(make_dataset(tfr, "test", batch_size=32, cache=False)))[0]
        while images.shape[0] < 32:
            images = tf.concat([images, images], axis=0)
        images = images[:32]

        @tf.function(reduce_retracing=True)
        def keras_compiled(pixels):
            return model(pixels, training=False)

        def preprocess_batch(enc, bits, inv):
            return tf.map_fn(lambda item: preprocess_image(item[0], item[1], item[2], IMAGE_SIZE), (enc, bits, inv),
                             fn_output_signature=tf.TensorSpec([IMAGE_SIZE, IMAGE_SIZE, 1], tf.uint8))

        @tf.function(reduce_retracing=True)
        def keras_compiled_encoded(enc, bits, inv):
            return model(tf.cast(preprocess_batch(enc, bits, inv), tf.float32), training=False)

        for batch in (1, 32):
            x = tf.constant(images[:batch])
            enc = tf.constant(encoded[:batch])
            inv = tf.constant(inverts[:batch])
            bits = tf.constant(bit_depths[:batch])
            key = f"{model_name}_b{batch}"
            calls = {
                # key: (callable, reference, label)
                f"keras_eager_{key}": (lambda: model(x, training=False), None,
                                       f"{model_name} Keras model(x) eager, float32, batch {batch}"),
                f"keras_{key}": (lambda: keras_compiled(x), None,
                                 f"{model_name} Keras model(x) in tf.function, float32, batch {batch}"),
                f"saved_pre_{key}": (lambda: preprocessed_sig(images=x), f"keras_{key}",
                                     f"{model_name} SavedModel predict_preprocessed, batch {batch}"),
                f"keras_enc_eager_{key}": (
                    lambda: model(tf.cast(preprocess_batch(enc, bits, inv), tf.float32), training=False), None,
                    f"{model_name} preprocess_image + Keras eager, PNG, batch {batch}"),
                f"keras_enc_{key}": (lambda: keras_compiled_encoded(enc, bits, inv), None,
                                     f"{model_name} preprocess_image + Keras in tf.function, PNG, batch {batch}"),
                f"saved_enc_{key}": (lambda: serving(images=enc, invert=inv, bit_depth=bits), f"keras_enc_{key}",
                                     f"{model_name} SavedModel serving_default, PNG, batch {batch}"),
            }
            active = {}
            for name, (call, reference, label) in calls.items():
                if bench.quick and "eager" in name:
                    figures[name] = skipped("ms/image", "--quick", label=label)
                else:
                    active[name] = (call, reference, label)
            bench.log(f"inference: {model_name}, batch {batch}: {', '.join(active)} (repeats in turns)")
            timings = time_calls_in_turns({n: c for n, (c, _, _) in active.items()}, batch, repeats, min_seconds)
            for name, (_, reference, label) in active.items():
                figures[name] = figure(unit="ms/image", reference=reference, label=label, **timings[name])
            for kind, ref in (("pre", "keras"), ("enc", "keras_enc")):
                what = "predict_preprocessed" if kind == "pre" else "serving_default"
                extra_targets.append({"name": f"{model_name} {what} b{batch} vs Keras", "figure": f"saved_{kind}_{key}",
                                      "reference": f"{ref}_{key}", "op": "<=", "threshold": 1.0,
                                      "description": f"{model_name} SavedModel {what} latency <= Keras, batch {batch}"})
    if bench.args.precision:
        bench_precision(bench, models, figures, notes, bench.args.precision)
    notes.append("Latency per image = wall time of one call / batch size, outputs fetched; median of repeats, each "
                 f"at least {min_seconds} s of calls after two warm-up calls, the variants of one batch size taken in "
                 "turns. The models are one-step training runs (weights do not change the cost).")
    notes.append("Keras references (the targets compare against them): model(x, training=False) inside a "
                 "tf.function, as model.predict runs it; for PNG input the project's preprocess_image mapped over the "
                 "batch in the same tf.function. The eager rows call the same code without tf.function.")
    return {"figures": figures, "notes": notes, "extra_targets": extra_targets,
            "settings": {"repeats": repeats, "models": models}}


# --------------------------------------------------------------------------- targets and tables


def bench_ct(bench: Bench) -> dict[str, Any]:
    """Seconds per CT patient against the published way, and memory (``benchmarks.ct``)."""
    from benchmarks import ct as ct_benchmark

    args = bench.args
    lengths = [int(n) for n in str(args.ct_slices).split(",") if n.strip()]
    precision = getattr(args, "ct_precision", "float32")
    result = ct_benchmark.run(bench.work / "ct", lengths, args.ct_image_size, repeats=bench.repeats,
                              workers=args.workers, log=bench.log, precision=precision,
                              memory=not getattr(args, "ct_no_memory", False))
    figures: dict[str, dict[str, Any]] = {}
    targets = []
    for item in result["patients"].values():
        n = item["slices"]
        figures[f"caaxr_{n}"] = figure(item["caaxr_seconds"], "s/patient", reference=f"reference_{n}",
                                       label=f"{n} slices ({item['kept']} kept), caaxr_tf.ct.patients")
        figures[f"reference_{n}"] = figure(item["reference_seconds"], "s/patient",
                                           label=f"{n} slices, OpenCV + model.predict per slice")
        suffix = f"_{precision}"
        if f"caaxr{suffix}_median" in item:
            figures[f"caaxr{suffix}_{n}"] = figure(
                item[f"caaxr{suffix}_seconds"], "s/patient", reference=f"reference_{n}",
                label=f"{n} slices, caaxr_tf.ct.patients, model in {precision} "
                      f"(verdict {'same' if item[f'caaxr{suffix}_same_verdict'] else 'DIFFERENT'}, "
                      f"{item[f'caaxr{suffix}_covid_slices']} vs {item['covid_slices']} COVID slices)")
            figures[f"reference{suffix}_{n}"] = figure(
                item[f"reference{suffix}_seconds"], "s/patient", reference=f"reference_{n}",
                label=f"{n} slices, OpenCV + model.predict per slice, model in {precision}")
        targets.append(dict(name=f"{n} slices vs reference", figure=f"caaxr_{n}", reference=f"reference_{n}",
                            op="<=", threshold=round(1 / ct_benchmark.TARGET_SPEEDUP, 4), cpu=False,
                            description=f"CT patient of {n} slices: time <= 1/3 of the published way"))
    notes = [f"model {result['model']} at {result['image_size']} px, batch {result['batch_size']}; "
             f"paper (Tesla P100): {ct_benchmark.PAPER_SECONDS}; GPU: {result['gpu']}"]
    memory = result.get("memory")
    if memory:
        notes.append(f"memory a {memory['slices']}-slice patient adds beyond the warmed-up model (peak RSS): "
                     f"caaxr {memory['caaxr']['added_gib']:.3f} GiB (target <= {ct_benchmark.MEMORY_LIMIT_GIB} GiB), "
                     f"reference {memory['reference']['added_gib']:.3f} GiB")
    return {"figures": figures, "notes": notes, "extra_targets": targets, "ct": result}


def meets(ratio: float, op: str, threshold: float) -> bool:
    return ratio >= threshold if op == ">=" else ratio <= threshold


def evaluate_targets(sections: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target with its value, reference, ratio and pass/fail (None when not measured)."""
    items = [dict(item) for item in TARGETS]
    for section, result in sections.items():
        items += [{"section": section, **extra} for extra in result.get("extra_targets", [])]
    results = []
    for item in items:
        if item["section"] not in sections:
            continue
        figures = sections[item["section"]].get("figures", {})
        value_fig, ref_fig = figures.get(item["figure"]), figures.get(item["reference"])
        value = value_fig["median"] if value_fig else None
        reference = ref_fig["median"] if ref_fig else None
        if value is not None and item.get("per_worker"):
            value /= value_fig.get("workers", 1)
        ratio = value / reference if value is not None and reference else None
        # images per CPU-second are per worker already; a speed-up has no CPU counterpart
        cpu_value = value_fig.get("cpu_median") if value_fig and item.get("cpu", True) else None
        cpu_reference = ref_fig.get("cpu_median") if ref_fig else None
        cpu_ratio = cpu_value / cpu_reference if cpu_value is not None and cpu_reference else None
        passed, note = None, None
        if ratio is None:
            reasons = [f["reason"] for f in (value_fig, ref_fig) if f and f.get("reason")]
            note = "not measured" + (f": {reasons[0]}" if reasons else "")
        else:
            passed = meets(ratio, item["op"], item["threshold"])
        cpu_passed = meets(cpu_ratio, item["op"], item["threshold"]) if cpu_ratio is not None else None
        results.append({"per_worker": False, "cpu": True, **item, "value": value, "reference_value": reference, "ratio": ratio,
                        "cpu_ratio": cpu_ratio, "cpu_passed": cpu_passed,
                        "passed": passed, "note": note})
    return results


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        return f"{value:.{digits - 1}f}" if magnitude >= 1 else f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable in a terminal as well)."""
    cells = [[str(h) for h in headers]] + [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells[1:]]
    return "\n".join(lines)


def report_tables(report: dict[str, Any]) -> str:
    parts = []
    machine = report["machine"]
    load = report["load_average"]
    parts.append(
        f"Machine: {machine['cpu_model']}, {machine['usable_cores']} of {machine['cores']} cores usable, "
        f"{machine['memory_gib']} GiB, GPU {', '.join(machine['gpu']) if machine['gpu'] else 'none'}; "
        f"TensorFlow {machine['tensorflow']}, Keras {machine['keras']}, torch {machine['torch'] or 'not installed'}.\n"
        f"Load average (1 min) before {load['before'][:1]}, during min/median/max "
        f"{load['during'].get('min')}/{load['during'].get('median')}/{load['during'].get('max')}, after {load['after'][:1]}."
    )
    dataset = report["dataset"]
    parts.append(f"Data: {dataset.get('source')} from {dataset.get('data_root')}"
                 f"{' (synthetic ' + dataset['synthetic'] + ')' if dataset.get('synthetic') else ''}"
                 + (f"; {dataset.get('protocol')}: {dataset.get('images')} images, {dataset.get('train_images')} in "
                    "training." if dataset.get("protocol") else "."))
    for name, section in report["sections"].items():
        parts.append(f"\n## {name}")
        if section.get("status") != "ok":
            parts.append(f"skipped: {section.get('reason')}")
            continue
        rows = []
        for key, item in section["figures"].items():
            value = item["median"] if item["status"] == "ok" else f"skipped ({item['reason']})"
            spread = (f"{fmt(min(item['values']))}..{fmt(max(item['values']))}" if len(item["values"]) > 1 else "")
            cpu = f"{fmt(item['cpu_median'])} {item['cpu_unit']}" if item.get("cpu_median") is not None else ""
            rows.append([key, item["label"], value, item["unit"], spread, item["reference"] or "",
                         fmt(item["ratio"]) if item["ratio"] is not None else "", cpu,
                         fmt(item["cpu_ratio"]) if item.get("cpu_ratio") is not None else ""])
        parts.append(table(["key", "figure", "median", "unit", "range", "reference", "ratio", "per CPU time",
                            "CPU ratio"], rows))
        for note in section.get("notes", []):
            parts.append(f"* {note}")
    parts.append("\n## targets")
    rows = []
    for target in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[target["passed"]]
        cpu_verdict = {True: "pass", False: "fail", None: ""}[target.get("cpu_passed")]
        rows.append([target["section"], target["description"], fmt(target["ratio"]),
                     f"{target['op']} {target['threshold']}", verdict + (f" ({target['note']})" if target["note"] else ""),
                     f"{fmt(target['cpu_ratio'])} {cpu_verdict}" if target.get("cpu_ratio") is not None else ""])
    parts.append(table(["section", "target", "ratio", "needed", "result", "same on CPU time"], rows))
    return "\n".join(parts)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="+", choices=[*SECTIONS, *EXTRA_SECTIONS, "all"], help="what to measure")
    parser.add_argument("--quick", action="store_true", help="tiny synthetic set, few repeats (< 5 minutes)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data-root", help="a data root in the real layouts (see docs/data_layouts.md)")
    data.add_argument("--synthetic", choices=["tiny", "small", "realistic"],
                      help="generate a synthetic set (default: tiny with --quick, else small); realistic: BIMCV "
                      "PNGs at their real sizes (2,000-3,000 px, 12 bits stored)")
    parser.add_argument("--source", default="caaxr", choices=["caaxr", "covid-chestxray"])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes for the peers and the builds (default: the cores)")
    parser.add_argument("--repeats", type=int, help="repeats per figure (default 5, 2 with --quick)")
    parser.add_argument("--models", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                        help=f"models of the train/inference sections (default {','.join(TRAIN_MODELS)})")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--work-dir", help="keep data, TFRecords and exports here (reused by a later run); "
                        "default: a temporary folder, removed at the end")
    parser.add_argument("--ct-slices", default="35,130,406", help="ct: sequence lengths")
    parser.add_argument("--ct-image-size", type=int, default=512, help="ct: model input (the published 512)")
    parser.add_argument("--ct-precision", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="ct: also time both paths with the model in this precision")
    parser.add_argument("--ct-no-memory", action="store_true", help="ct: skip the memory children")
    parser.add_argument("--precision", default=None, choices=("bfloat16", "float16"),
                        help="inference: add rows of the model computing in this precision (224 and 512 px)")
    parser.add_argument("--precision-sizes", default="224,512", help="inference: image sizes of the precision rows")
    parser.add_argument("--precision-batches", default="1,32", help="inference: batch sizes of the precision rows")
    parser.add_argument("--precision-max-pixels", type=int, default=32 * 512 * 512,
                        help="inference: skip precision rows whose batch holds more pixels")
    parser.add_argument("--precision-only", action="store_true",
                        help="inference: only the precision rows (no training run, no export)")
    args = parser.parse_args(argv)
    if "all" in args.sections:
        args.sections = list(SECTIONS) + [s for s in args.sections if s in EXTRA_SECTIONS]
    args.sections = [s for s in (*SECTIONS, *EXTRA_SECTIONS) if s in args.sections]
    if args.data_root is None and args.synthetic is None:
        args.synthetic = "tiny" if args.quick else "small"
    if args.synthetic and args.source != "caaxr":
        parser.error("--synthetic makes a CAAXR-layout set; use --data-root with --source covid-chestxray")
    unknown = [m for m in args.models or [] if m not in TRAIN_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(TRAIN_MODELS)}")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="caaxr-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "command": ["tools/benchmark.py", *(argv if argv is not None else sys.argv[1:])],
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "settings": {"quick": args.quick, "workers": args.workers, "sections": args.sections,
                     "image_size": IMAGE_SIZE, "pipeline_batch": PIPELINE_BATCH},
    }
    bench = Bench(args, work)
    report["settings"]["repeats"] = bench.repeats
    runners = {"pipeline": bench_pipeline, "tfrecords": bench_tfrecords, "train": bench_train,
               "inference": bench_inference, CT_SECTION: bench_ct, BEAM_SECTION: bench_tfrecords_beam}
    sections: dict[str, dict[str, Any]] = {}
    try:
        with LoadSampler() as sampler:
            report["machine"] = machine_info()
            needs_data = set(args.sections) - {CT_SECTION} - ({"inference"} if args.precision_only else set())
            if needs_data:  # the ct section makes its own patients, precision rows their own images
                # the beam comparison needs the data only, not the pipeline section's TFRecords
                bench.prepare_data(tfrecords=bool(needs_data - {BEAM_SECTION}))
            for name in args.sections:
                section_started = time.perf_counter()
                try:
                    result = runners[name](bench)
                except Exception as error:  # one failing section must not lose the others
                    import traceback

                    traceback.print_exc()
                    result = {"status": "error", "reason": f"{type(error).__name__}: {error}", "figures": {}}
                result.setdefault("status", "ok")
                result.setdefault("reason", None)
                link_ratios(result.get("figures", {}))
                result["seconds"] = round(time.perf_counter() - section_started, 1)
                result["load_average_after"] = load_average()
                sections[name] = result
        report["dataset"] = bench.dataset_info
        report["sections"] = sections
        report["targets"] = evaluate_targets(sections)
        report["load_average"] = {"before": load_before, "during": sampler.summary(), "after": load_average()}
        report["seconds"] = round(time.perf_counter() - started, 1)
        print()
        print(report_tables(report))
        print(f"\n{report['seconds']:.0f} s in all; work folder {work}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {args.json}")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(s.get("status") == "error" for s in sections.values()) else 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2], json.loads(sys.argv[3]))
    else:
        sys.exit(main())

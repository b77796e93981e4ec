"""The staging stage of ``build_tfrecords`` on Apache Beam (``caaxr make-tfrecords --runner beam``).

Imported only when ``--runner beam`` is chosen: nothing else in the package imports
``apache_beam`` (an optional extra, ``pip install 'caaxr-tf[beam]'``).

What runs on Beam is the expensive per-image work: read, decode, check, invert/scale the bit
depth, resize and PNG-encode each candidate image (and its mask) -- the very function the local
process pool calls, ``caaxr_tf.data.staging.stage_task``, one element per image keyed by its
``staging_id``. Everything that decides *what* is written stays in the driver and is the local
build's code, unchanged: reading the sources, the fingerprint and rerun rules, the seeded
selection with its replacement rule, the splits, the manifest, the shard plan (names and record
order), the serialisation of each record, the atomic shard writing and ``summary.json``. So the
two runners write the same files byte for byte.

* An unusable image is not an exception in the pipeline: the DoFn sends it to the ``skipped``
  tagged output with the same ``Skipped`` lines the local runner reports; the driver applies the
  same replacement rule (the next image of the seeded order) as the local build.
* The pipeline writes only the staged cache (``<out>/.staging``, each file under a temporary name
  and renamed when complete) and its result lines in a temporary folder there; no file under a
  final name (shard, manifest, summary) is written before the pipeline has finished, so a failed
  pipeline leaves nothing under the final names. A rerun reuses the staged files it still matches.
* The staging, data root and output paths are plain local paths (``open``/``os``): workers on a
  cluster must see them at the same paths (a shared POSIX filesystem); see README.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from caaxr_tf.data.records import Sample, Skipped
from caaxr_tf.data.staging import StagedImage, staging_id, stage_task
from caaxr_tf.data.stager import BeamPipelineError, Stager

NAMESPACE = "caaxr.make_tfrecords"
SKIPPED_TAG = "skipped"
# Test hook: the DoFn raises on the image with this id (a pipeline that dies mid-way).
FAIL_ON_ENV = "CAAXR_BEAM_TEST_FAIL_ON_IMAGE"


def default_options(workers: int) -> list[str]:
    """The DirectRunner on ``workers`` local processes (the local build's ``--workers``)."""
    return ["--runner=DirectRunner", f"--direct_num_workers={max(1, workers)}",
            "--direct_running_mode=multi_processing"]


def parse_options(beam_options: str | Sequence[str] | None, workers: int) -> list[str]:
    if beam_options is None:
        return default_options(workers)
    return shlex.split(beam_options) if isinstance(beam_options, str) else list(beam_options)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class StageImageFn(beam.DoFn):
    """One image: ``stage_task`` (the local pool's function). Usable images on the main output
    as ``(staging_id, staged, dropped)``; unusable ones on the ``skipped`` output."""

    def __init__(self, staging_dir: str, storage_size: int):
        super().__init__()
        self.staging_dir = staging_dir
        self.storage_size = storage_size
        self.images_read = Metrics.counter(NAMESPACE, "images_read")
        self.images_skipped = Metrics.counter(NAMESPACE, "images_skipped")
        self.bytes_written = Metrics.counter(NAMESPACE, "staged_bytes_written")

    def setup(self) -> None:
        from caaxr_tf.data.staging import init_stage_worker

        init_stage_worker()  # OpenCV on one thread, as in the local pool's workers
        os.makedirs(self.staging_dir, exist_ok=True)

    def process(self, element: tuple[str, Sample]) -> Iterable[Any]:
        key, sample = element
        if os.environ.get(FAIL_ON_ENV) and os.environ[FAIL_ON_ENV] == sample.image_id:
            raise RuntimeError(f"test hook {FAIL_ON_ENV}: failing on {sample.image_id}")
        self.images_read.inc()
        staged_key, staged, dropped = stage_task((sample, self.staging_dir, self.storage_size))
        assert staged_key == key, (staged_key, key)
        record = {"key": key, "staged": asdict(staged) if staged is not None else None,
                  "dropped": [d.as_dict() for d in dropped]}
        if staged is None:
            self.images_skipped.inc()
            yield beam.pvalue.TaggedOutput(SKIPPED_TAG, json.dumps(record))
            return
        written = 0
        for path in (staged.encoded_path, staged.mask_path):
            if path and os.path.dirname(path) == os.path.abspath(self.staging_dir):
                written += _file_size(path)
        self.bytes_written.inc(written)
        yield json.dumps(record)


def run_staging(samples: Sequence[Sample], staging_dir: Path, storage_size: int,
                options: Sequence[str]) -> tuple[list[tuple[str, StagedImage | None, list[Skipped]]], dict[str, int]]:
    """Stage ``samples`` in one Beam pipeline. Returns each one's ``(staging_id, staged,
    dropped)`` and the pipeline's counters. Raises ``BeamPipelineError`` when the pipeline fails."""
    staging_dir = Path(staging_dir).absolute()
    staging_dir.mkdir(parents=True, exist_ok=True)
    results_dir = staging_dir / f".beam-results-{uuid.uuid4().hex[:12]}"
    elements = sorted(((staging_id(s), s) for s in samples), key=lambda e: e[0])
    try:
        pipeline = beam.Pipeline(options=PipelineOptions(list(options)))
        outputs = (
            pipeline
            | "Candidates" >> beam.Create(elements, reshuffle=True)
            | "Stage" >> beam.ParDo(StageImageFn(str(staging_dir), int(storage_size))).with_outputs(
                SKIPPED_TAG, main="staged")
        )
        outputs.staged | "WriteStaged" >> beam.io.WriteToText(str(results_dir / "staged"), file_name_suffix=".jsonl")
        outputs[SKIPPED_TAG] | "WriteSkipped" >> beam.io.WriteToText(str(results_dir / "skipped"),
                                                                     file_name_suffix=".jsonl")
        try:
            result = pipeline.run()
            result.wait_until_finish()
        except Exception as error:  # the runner's own error types vary by runner
            raise BeamPipelineError(f"the Beam staging pipeline failed: {type(error).__name__}: "
                                    f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}") from error
        outcomes = []
        for path in sorted(results_dir.glob("*.jsonl")):
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    record = json.loads(line)
                    staged = StagedImage(**record["staged"]) if record["staged"] is not None else None
                    outcomes.append((record["key"], staged, [Skipped(**d) for d in record["dropped"]]))
        missing = {key for key, _ in elements} - {key for key, _, _ in outcomes}
        if missing:
            raise BeamPipelineError(f"the Beam staging pipeline returned no result for {len(missing)} image(s)")
        return outcomes, query_counters(result)
    finally:
        shutil.rmtree(results_dir, ignore_errors=True)


def query_counters(result: Any) -> dict[str, int]:
    counters: dict[str, int] = {}
    try:
        queried = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    except Exception:  # a runner without metrics support
        return counters
    for counter in queried.get("counters", []):
        value = counter.committed if counter.committed is not None else counter.attempted
        counters[counter.key.metric.name] = counters.get(counter.key.metric.name, 0) + int(value or 0)
    return counters


class BeamStager(Stager):
    """``Stager`` whose ``stage`` runs one Beam pipeline over the images not yet staged (instead
    of the local process pool). Counters of all its pipelines are summed in ``counters``."""

    def __init__(self, staging_dir: Path, storage_size: int, workers: int, progress: bool,
                 beam_options: str | Sequence[str] | None = None, log=print):
        super().__init__(staging_dir, storage_size, workers, progress)
        self.options = parse_options(beam_options, self.workers)
        self.counters: dict[str, int] = {}
        self.pipelines = 0
        self.log = log

    def start(self) -> None:  # no pool to start
        return None

    def stage(self, samples: Sequence[Sample], description: str) -> None:
        todo = list({staging_id(s): s for s in samples if staging_id(s) not in self.staged}.values())
        if not todo:
            return
        self.log(f"{description}: {len(todo)} image(s) on Beam ({' '.join(self.options)})")
        outcomes, counters = run_staging(todo, self.staging_dir, self.storage_size, self.options)
        self.pipelines += 1
        for name, value in counters.items():
            self.counters[name] = self.counters.get(name, 0) + value
        for outcome in outcomes:
            self._record(outcome)

    def close(self) -> None:
        return None

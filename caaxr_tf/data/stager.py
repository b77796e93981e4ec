"""The staging stage of the shard build on the local process pool (``Stager``), and its errors.

Apart from ``tfrecords`` so that the Beam runner (``beam_build``) can subclass it without an
import cycle; ``tfrecords`` re-exports these names.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from caaxr_tf.data.records import Sample, Skipped
from caaxr_tf.data.staging import StagedImage, init_stage_worker, stage_task, staging_id


class WorkerDiedError(RuntimeError):
    """A decoding process died (e.g. killed by the out-of-memory killer) twice on one image."""


class BeamPipelineError(RuntimeError):
    """The Beam staging pipeline (``--runner beam``) failed; nothing was written under a final name."""


class Stager:
    """Decodes images once per run (in parallel processes) and remembers the outcome.

    The workers run in a ``ProcessPoolExecutor``: when one dies (kill -9, the kernel's
    out-of-memory killer) the pool breaks instead of waiting forever for the lost task. At
    most ``2 * workers`` images are in flight, so the suspects are known: each is decoded
    again alone in a fresh process; an image that kills its process a second time stops
    the run with ``WorkerDiedError`` naming it. Staged results do not depend on the worker
    count or on such retries. Results are kept by ``staging_id`` (the image and the sample
    fields staging reads), so an image that two sources give with other boxes or a mask is
    staged for each.
    """

    def __init__(self, staging_dir: Path, storage_size: int, workers: int, progress: bool):
        self.staging_dir = staging_dir
        self.storage_size = storage_size
        self.workers = max(1, workers)
        self.progress = progress
        self.staged: dict[str, StagedImage | None] = {}
        self.dropped: dict[str, list[Skipped]] = {}
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def get(self, sample: Sample) -> StagedImage | None:
        """The staged image of ``sample`` (None: it could not be used); it must be staged."""
        return self.staged[staging_id(sample)]

    def dropped_for(self, sample: Sample) -> list[Skipped]:
        """What staging ``sample`` dropped or reported."""
        return self.dropped.get(staging_id(sample), [])

    def _new_pool(self, workers: int) -> concurrent.futures.ProcessPoolExecutor:
        # spawn, not fork: the parent may hold TensorFlow's threads
        return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=init_stage_worker)

    def start(self) -> None:
        """Start the worker processes now, so their start-up overlaps the reading of the CSVs."""
        if self.workers > 1 and self._pool is None:
            self._pool = self._new_pool(self.workers)
            for _ in range(self.workers):  # each submission spawns a process while none is idle
                self._pool.submit(int)

    def _record(self, outcome: tuple[str, StagedImage | None, list[Skipped]]) -> None:
        key, staged, dropped = outcome
        self.staged[key] = staged
        self.dropped[key] = dropped

    def stage(self, samples: Sequence[Sample], description: str) -> None:
        todo = list({staging_id(s): s for s in samples if staging_id(s) not in self.staged}.values())
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
                    # popped only once submitted: submit raises BrokenProcessPool when a worker
                    # died since the last wait, and the task must then stay queued, not vanish
                    future = self._pool.submit(stage_task, queue[-1])
                    in_flight[future] = queue.pop()
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

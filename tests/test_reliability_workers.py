"""Issue 17 case 3: a decoding worker killed by the kernel (kill -9, the out-of-memory killer)
must not hang make_tfrecords. Real processes: the CLI runs with --workers 2 and a watchdog
kills any of its children whose resident memory passes a threshold, as the OOM killer does."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.data.images import encode_png

REPO = Path(__file__).resolve().parents[1]
THRESHOLD_MB = 150  # an idle worker holds about 55 MB; decoding the large image takes > 300 MB
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


def covid_tree(root: Path) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    rows = ["patientid,finding,view,modality,filename"]
    for index in range(8):
        pixels = np.full((40, 48), 25 * index, np.uint8)
        pixels[4:12, index : index + 20] = 255
        cv2.imwrite(str(images / f"img{index}.png"), pixels)
        rows.append(f"p{index},{'COVID-19' if index < 4 else 'No Finding'},PA,X-ray,img{index}.png")
    # 9000 x 9000 16-bit (81 MP, under the 100 MP limit): about 0.2 MB on disk, 160 MB decoded
    large = np.tile(np.arange(9000, dtype=np.uint16) * 7, (9000, 1))
    (images / "large.png").write_bytes(encode_png(large))
    rows.append("p8,COVID-19,PA,X-ray,large.png")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def resident_mb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def run_with_oom_killer(argv: list[str], kills_allowed: int, timeout: float = 240) -> tuple[subprocess.CompletedProcess, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    process = subprocess.Popen([sys.executable, str(REPO / "tools" / "make_tfrecords.py"), *argv], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kills, deadline = 0, time.monotonic() + timeout
    try:
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"make_tfrecords still running after {timeout} s: hung after {kills} kill(s)")
            if kills < kills_allowed:
                for child in children(process.pid):
                    if resident_mb(child) > THRESHOLD_MB:
                        os.kill(child, signal.SIGKILL)
                        kills += 1
                        break
            time.sleep(0.005)
        out, err = process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), kills


def examples(protocol_dir: Path) -> dict[str, tf.train.Example]:
    found = {}
    for shard in sorted(protocol_dir.rglob("*.tfrecord")):
        for raw in tf.data.TFRecordDataset(str(shard)):
            example = tf.train.Example.FromString(raw.numpy())
            found[f"{shard.relative_to(protocol_dir)}:{example.features.feature['image/id'].bytes_list.value[0]}"] = example
    return found


@pytest.mark.slow
def test_a_worker_killed_twice_on_one_image_names_it_and_never_hangs(tmp_path):
    root = covid_tree(tmp_path / "covid")
    out = tmp_path / "out"
    result, kills = run_with_oom_killer(["--data-root", str(root), "--out", str(out), "--source", "covid-chestxray",
                                         "--protocol", "2class", "--workers", "2", "--no-progress"], kills_allowed=2)
    assert kills == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert errors == [f"error: {root / 'images' / 'large.png'}: image: the decoding process died twice while reading "
                      "it (killed by a signal, e.g. the out-of-memory killer); free memory, use fewer --workers, "
                      "or remove the file"]
    assert not (out / "2class" / "summary.json").exists() and not list(out.rglob("*.tfrecord"))


@contextlib.contextmanager
def oom_killer_thread(kills_allowed: int):
    """The same watchdog for the worker processes of this very process."""
    stop, kills = threading.Event(), []

    def watch() -> None:
        while not stop.is_set() and len(kills) < kills_allowed:
            for child in children(os.getpid()):
                if resident_mb(child) > THRESHOLD_MB:
                    os.kill(child, signal.SIGKILL)
                    kills.append(child)
                    break
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield kills
    finally:
        stop.set()
        thread.join()


def test_a_worker_killed_once_is_retried_and_the_shards_are_unchanged(tmp_path):
    root = covid_tree(tmp_path / "covid")
    out = tmp_path / "out"
    build = dict(source="covid-chestxray", protocols="2class", progress=False, log=lambda line: None)
    with oom_killer_thread(kills_allowed=1) as kills:
        tfr.build_tfrecords(root, out, workers=2, **build)
    assert len(kills) == 1
    reference = tmp_path / "reference"
    tfr.build_tfrecords(root, reference, workers=1, **build)
    assert (out / "2class" / "manifest.csv").read_bytes() == (reference / "2class" / "manifest.csv").read_bytes()
    ours = examples(out / "2class")
    assert ours == examples(reference / "2class")
    assert {key.split(":", 1)[1] for key in ours} == {str(f"b'img{i}.png'") for i in range(8)} | {"b'large.png'"}


class _PoolBrokenAtSubmit:
    """A process pool as ``concurrent.futures`` leaves it once a worker died between two waits:
    the first ``healthy_submits`` run the task; the next submit raises ``BrokenProcessPool``."""

    def __init__(self, healthy_submits: int):
        self.healthy_submits = healthy_submits

    def submit(self, function, *args):
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        if self.healthy_submits == 0:
            raise BrokenProcessPool("a child process terminated abruptly")
        self.healthy_submits -= 1
        future = Future()
        future.set_result(function(*args))
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


@pytest.mark.parametrize("healthy_submits", [0, 1, 3])
def test_a_pool_that_breaks_at_submit_loses_no_image(tmp_path, healthy_submits):
    """The race behind a CI failure: the watchdog killed a worker after one wait returned and
    before the next submit, so ``submit`` itself raised; the task it was given must be staged
    (once the pool is rebuilt), not dropped (KeyError in ``Stager.get`` afterwards)."""
    from caaxr_tf.data import stager as stager_module
    from caaxr_tf.data.records import Sample

    images = tmp_path / "images"
    images.mkdir()
    samples = []
    for index in range(6):
        cv2.imwrite(str(images / f"img{index}.png"), np.full((20, 24), 30 * index, np.uint8))
        samples.append(Sample(image_id=f"img{index}.png", patient_id=f"p{index}", source="covid-chestxray",
                              path=str(images / f"img{index}.png"), labels=("COVID-19",)))
    pools = iter([_PoolBrokenAtSubmit(healthy_submits)])

    class BreakingStager(stager_module.Stager):
        def _new_pool(self, workers):  # the first pool breaks; the rebuilt ones are healthy
            return next(pools, _PoolBrokenAtSubmit(10**6))

    stager = BreakingStager(tmp_path / "staging", storage_size=16, workers=2, progress=False)
    stager.stage(samples, "test")
    assert [stager.get(sample) is not None for sample in samples] == [True] * 6
